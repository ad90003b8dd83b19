"""Faster R-CNN fine-tuning and VOC evaluation of a trunk (paper_spec 7.2).

  python -m tf_mtssl.finetune_detection --flagfile=flags/detection_voc07.cfg \
      --model_dir=runs/mtl --tfds_data_dir=/data/tfds --output_dir=runs/mtl_voc07
  python -m tf_mtssl.finetune_detection --flagfile=flags/detection_embedded.cfg --init=random

The trunk comes from a pretraining run (--model_dir), an exported trunk (--trunk_keras) or random
initialisation (--init=random: the architecture of --model_dir when given, else of
--depth/--base_width/--output_stride). Resumes from the newest checkpoint in --output_dir when that
folder was made from the same trunk source (trunk_source.json), else refuses it naming both; writes
TensorBoard logs there and, at the end, results.json (mAP, per-class AP, the trunk's provenance).
The detector, input and optimisation flags are the fields of DetectorConfig, InputConfig and
FinetuneConfig (tf_mtssl.evaluation.detection), with their defaults and help.
"""

from tf_mtssl.core import quiet  # noqa: F401  (first: silences TensorFlow's start-up noise)

import dataclasses
import logging
import os

import keras
from absl import app

from tf_mtssl import cli
from tf_mtssl.core import configs
from tf_mtssl.evaluation import common, outputs
from tf_mtssl.evaluation.detection import data as data_lib
from tf_mtssl.evaluation.detection import model as model_lib
from tf_mtssl.evaluation.detection import train as train_lib
from tf_mtssl.model.lasso import LassoConfig
from tf_mtssl.model.trunk import TrunkConfig
from tf_mtssl.runs import trunk_source

for _config in (trunk_source.TrunkSourceConfig, TrunkConfig, LassoConfig, train_lib.DetectionRunConfig,
                model_lib.DetectorConfig, data_lib.InputConfig, train_lib.FinetuneConfig):
  # num_classes comes from the data, preprocessing from the trunk's source.
  cli.define_flags(_config, exclude=("num_classes", "preprocessing"))


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  run = cli.config_from_flags(train_lib.DetectionRunConfig)
  lasso_config = cli.config_from_flags(LassoConfig)
  finetune_config = cli.config_from_flags(train_lib.FinetuneConfig)
  keras.utils.set_random_seed(finetune_config.seed)
  trunk, trunk_info = trunk_source.load(cli.config_from_flags(trunk_source.TrunkSourceConfig),
                                        cli.config_from_flags(TrunkConfig), finetune_config.seed)
  input_config = cli.config_from_flags(data_lib.InputConfig, preprocessing=trunk_source.input_convention(trunk_info))
  common.check_pretraining_lasso(lasso_config.mode, trunk_info)
  lasso = common.eval_lasso(common.num_units(trunk), lasso_config.l1_at("eval"))
  train_split = run.resolved_train_split()
  train_examples, class_names = data_lib.raw_examples(run.data, train_split, run.tfds_data_dir)
  test_examples, _ = data_lib.raw_examples(run.data, run.test_split, run.tfds_data_dir)
  detector_config = cli.config_from_flags(model_lib.DetectorConfig, num_classes=len(class_names))
  detector = model_lib.FasterRCNN(trunk, detector_config, lasso=lasso)
  run_info = {"data": run.data, "train_split": train_split,
              "test_split": run.test_split, "lasso": lasso_config.mode, "class_names": class_names,
              "input_config": dataclasses.asdict(input_config)}
  # Print the protocol (design notes: unstated protocol details cause reproduction gaps): a few lines
  # a person reads; every value is in the results file.
  print(configs.format_lines(
      f"Detection fine-tuning (paper_spec 7.2); every setting is recorded in {train_lib.RESULTS_FILE}", [
          ("trunk", trunk_source.describe_source(trunk_info)),
          ("data", f"{run.data}: train split {train_split!r}, test split {run.test_split!r}, "
                   f"{len(class_names)} classes; lasso {lasso_config.mode}"),
          ("input", configs.describe(input_config, always=(
              "min_side", "max_side", "batch_size", "preprocessing"))),
          ("detector", configs.describe(detector_config, always=("trunk_bn", "anchor_scales"))),
          ("training", configs.describe(finetune_config, always=(
              "train_steps", "learning_rate", "lr_decay_steps"))),
      ]), flush=True)
  results = train_lib.finetune(
      detector,
      data_lib.train_dataset(train_examples, input_config, seed=finetune_config.seed),
      data_lib.eval_dataset(test_examples, input_config, max_images=run.eval_max_images or None),
      class_names, run.output_dir, finetune_config, trunk_source=trunk_info, run_info=run_info,
      input_convention=input_config.preprocessing)
  print(f"mAP ({'VOC07 11-point' if finetune_config.use_07_metric else 'area'}) = {results['mAP']:.4f} "
        f"on {results['num_test_images']} {run.test_split} images at step {results['step']}")
  for name, ap in results["AP"].items():
    print(f"  AP {name:>16s}: {'n/a' if ap is None else f'{ap:.4f}'}")
  if results["train_images_per_sec"]:
    print(f"Training speed: {results['train_images_per_sec']:.2f} images/s")
  print(f"Trunk:       {trunk_source.describe_source(trunk_info)}")
  print(f"Results:     {os.path.abspath(os.path.join(run.output_dir, outputs.RESULTS_FILE))}")
  print(f"TensorBoard: tensorboard --logdir {os.path.abspath(run.output_dir)}")


if __name__ == "__main__":
  app.run(cli.run_main(main))
