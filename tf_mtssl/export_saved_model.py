"""Exports the trunk of a pretraining run as a versioned SavedModel (TF Serving layout).

  python -m tf_mtssl.export_saved_model --model_dir=runs/smoke --export_dir=exports/smoke

Restores the latest (or --checkpoint) checkpoint of --model_dir, rebuilds the trunk from the run's
run_config.json and writes EXPORT_DIR/<next version>/ with the signatures `serving_default` (encoded
images) and `image_tensor` (float images), the Keras file assets.extra/trunk.keras and
assets.extra/export_metadata.json. See tf_mtssl/serving/export.py for the signatures' inputs and outputs.
"""

from tf_mtssl.core import quiet  # noqa: F401  (first: silences TensorFlow's start-up noise)

import os

from absl import app, flags

from tf_mtssl.serving import export as export_lib
from tf_mtssl import cli as flag_utils

FLAGS = flags.FLAGS

flags.DEFINE_string("model_dir", "runs/pretrain", "Pretraining run directory (python -m tf_mtssl.pretrain "
                    "--model_dir): run_config.json and checkpoints.")
flags.DEFINE_string("export_dir", "exports/tf_mtssl", "Export base directory; each export adds the next "
                    "integer version directory (what TF Serving's --model_base_path points to).")
flags.DEFINE_string("checkpoint", "", "Checkpoint prefix to export (absolute, or relative to --model_dir, "
                    "e.g. ckpt-10); empty: the latest.")
flags.DEFINE_integer("image_size", export_lib.DEFAULT_IMAGE_SIZE,
                     "Side of the square the serving_default signature resizes decoded images to (centre "
                     "square crop keeping the aspect ratio, then resize); paper_spec 7.1 [I]: 224.")
flags.DEFINE_boolean("export_units", False, "Also output every block-3 unit (unit_01 ...) from the "
                     "image_tensor signature, for lasso users (paper_spec 5).")


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"Unexpected arguments {argv[1:]}")
  version, path = export_lib.export_run(FLAGS.model_dir, FLAGS.export_dir, checkpoint=FLAGS.checkpoint or None,
                                        image_size=FLAGS.image_size, export_units=FLAGS.export_units)
  meta = export_lib.read_metadata(path)
  print(f"Exported {meta['checkpoint']} as version {version}: {os.path.abspath(path)}")
  for name, sig in sorted(meta["signatures"].items()):
    inputs = ", ".join(f"{k} {v['dtype']} {v['shape']}" for k, v in sig["inputs"].items())
    print(f"  signature {name}({inputs}) -> {', '.join(sorted(sig['outputs']))}")
  print(f"  Keras trunk:  {os.path.join(os.path.abspath(path), meta['keras_file'])}")
  print(f"  Metadata:     {os.path.join(os.path.abspath(path), export_lib.EXTRA_DIR, export_lib.METADATA_FILE)}")


if __name__ == "__main__":
  app.run(flag_utils.run_main(main))
