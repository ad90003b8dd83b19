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

from absl import app

from tf_mtssl import cli
from tf_mtssl.model import preprocessing
from tf_mtssl.runs import slim_import

cli.define_flags(slim_import.ImportConfig)


def main(argv):
  del argv
  config = cli.config_from_flags(slim_import.ImportConfig)
  report = slim_import.import_slim_checkpoint(config.slim_checkpoint, config.model_dir, depth=config.depth,
                                              output_stride=config.output_stride, convention=config.preprocessing,
                                              scope=config.scope)
  trunk = report["trunk"]
  print(f"Imported {report['num_imported']} variables of {report['scope']} from {report['slim_checkpoint']}")
  print(f"Trunk:       ResNet-{trunk['depth']} v2 to block 3, output stride {trunk['output_stride']}, "
        f"base width {trunk['base_width']}")
  print(f"Input:       {config.preprocessing} ({preprocessing.INPUT_CONVENTIONS[config.preprocessing]})")
  ignored = ", ".join(f"{part} ({n})" for part, n in report["ignored_summary"].items())
  print(f"Ignored:     {len(report['ignored'])} variables: {ignored or 'none'} "
        "(every name is listed in run_config.json)")
  print(f"Run:         {report['model_dir']}  (checkpoint {report['checkpoint']})")


if __name__ == "__main__":
  app.run(cli.run_main(main))
