"""Imports a tf-slim ResNet-v2 checkpoint as a tf_mtssl run directory (paper_spec 2.1, 7.4).

  # The authors' released RP+Col+Ex+MS model (google-deepmind/multiself): VGG preprocessing.
  python -m tf_mtssl.import_checkpoint --slim_checkpoint=multiself/model.ckpt --model_dir=runs/multiself
  # slim's ImageNet resnet_v2_101 (the "INet Labels" baseline): inputs in [-1, 1].
  python -m tf_mtssl.import_checkpoint --slim_checkpoint=resnet_v2_101.ckpt --model_dir=runs/inet_labels \
      --preprocessing=inception

Writes --model_dir/run_config.json (trunk architecture, input convention, what was imported and what
was ignored) and --model_dir/ckpt-0 (named item `trunk`), which every evaluation (--model_dir),
`tf_mtssl.export_saved_model` and so the server accept. See `tf_mtssl.runs.slim_import`.
"""

from tf_mtssl.core import quiet  # noqa: F401  (first: silences TensorFlow's start-up noise)

from absl import app, flags

from tf_mtssl import cli as flag_utils
from tf_mtssl.model import preprocessing
from tf_mtssl.runs import slim_import as slim_checkpoint
from tf_mtssl.model import trunk as trunk_lib

FLAGS = flags.FLAGS

flags.DEFINE_string("slim_checkpoint", None, "tf-slim ResNet-v2 checkpoint: a prefix (model.ckpt-N, "
                    "resnet_v2_101.ckpt) or a directory (its latest checkpoint).")
flags.DEFINE_string("model_dir", None, "New run directory to write (must not exist or be empty).")
flags.DEFINE_enum("depth", "101", [str(d) for d in sorted(trunk_lib.UNITS_PER_BLOCK)],
                  "ResNet-v2 depth of the checkpoint (paper_spec 2.1: 101); must match its units.")
flags.DEFINE_enum("output_stride", "16", [str(s) for s in trunk_lib.VALID_OUTPUT_STRIDES],
                  "Output stride the imported trunk runs at (paper_spec 2.1: 16; the released model "
                  "was run at 32 in its README). No weight depends on it.")
flags.DEFINE_enum("preprocessing", preprocessing.VGG, sorted(preprocessing.INPUT_CONVENTIONS),
                  "Input convention the checkpoint was trained with, recorded and applied by every "
                  "consumer: vgg = " + preprocessing.INPUT_CONVENTIONS[preprocessing.VGG] +
                  ", the multiself model; inception = " +
                  preprocessing.INPUT_CONVENTIONS[preprocessing.INCEPTION] + ".")
flags.DEFINE_string("scope", "", "Slim scope of the network (e.g. resnet_v2_101); empty = the only "
                    "ResNet-v2 scope in the checkpoint.")
flags.mark_flags_as_required(["slim_checkpoint", "model_dir"])


def main(argv):
  del argv
  report = slim_checkpoint.import_slim_checkpoint(
      FLAGS.slim_checkpoint, FLAGS.model_dir, depth=int(FLAGS.depth), output_stride=int(FLAGS.output_stride),
      convention=FLAGS.preprocessing, scope=FLAGS.scope)
  trunk = report["trunk"]
  print(f"Imported {report['num_imported']} variables of {report['scope']} from {report['slim_checkpoint']}")
  print(f"Trunk:       ResNet-{trunk['depth']} v2 to block 3, output stride {trunk['output_stride']}, "
        f"base width {trunk['base_width']}")
  print(f"Input:       {FLAGS.preprocessing} ({preprocessing.INPUT_CONVENTIONS[FLAGS.preprocessing]})")
  ignored = ", ".join(f"{part} ({n})" for part, n in report["ignored_summary"].items())
  print(f"Ignored:     {len(report['ignored'])} variables: {ignored or 'none'} "
        "(every name is listed in run_config.json)")
  print(f"Run:         {report['model_dir']}  (checkpoint {report['checkpoint']})")


if __name__ == "__main__":
  app.run(flag_utils.run_main(main))
