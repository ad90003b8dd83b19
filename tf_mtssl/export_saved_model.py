"""Exports the trunk of a pretraining run as a versioned SavedModel (TF Serving layout).

  python -m tf_mtssl.export_saved_model --model_dir=runs/smoke --export_dir=exports/smoke

Restores the latest (or --checkpoint) checkpoint of --model_dir, rebuilds the trunk from the run's
run_config.json and writes EXPORT_DIR/<next version>/ with the signatures `serving_default` (encoded
images) and `image_tensor` (float images), the Keras file assets.extra/trunk.keras and
assets.extra/export_metadata.json. See tf_mtssl/serving/export.py for the signatures' inputs and outputs.
"""

from tf_mtssl.core import quiet  # noqa: F401  (first: silences TensorFlow's start-up noise)

import os

from absl import app

from tf_mtssl import cli
from tf_mtssl.runs import exports
from tf_mtssl.serving import export

cli.define_flags(export.ExportConfig)


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"Unexpected arguments {argv[1:]}")
  config = cli.config_from_flags(export.ExportConfig)
  version, path = export.export_run(config.model_dir, config.export_dir, checkpoint=config.checkpoint or None,
                                    image_size=config.image_size, export_units=config.export_units)
  meta = exports.read_metadata(path)
  print(f"Exported {meta['checkpoint']} as version {version}: {os.path.abspath(path)}")
  for name, sig in sorted(meta["signatures"].items()):
    inputs = ", ".join(f"{k} {v['dtype']} {v['shape']}" for k, v in sig["inputs"].items())
    print(f"  signature {name}({inputs}) -> {', '.join(sorted(sig['outputs']))}")
  print(f"  Keras trunk:  {os.path.join(os.path.abspath(path), meta['keras_file'])}")
  print(f"  Metadata:     {os.path.join(os.path.abspath(path), exports.EXTRA_DIR, exports.METADATA_FILE)}")


if __name__ == "__main__":
  app.run(cli.run_main(main))
