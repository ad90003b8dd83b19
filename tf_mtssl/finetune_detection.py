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
import typing

from absl import app, flags
import keras

from tf_mtssl import cli as flag_utils
from tf_mtssl.evaluation.detection import data as data_lib
from tf_mtssl.evaluation.detection import model as model_lib
from tf_mtssl.evaluation.detection import train as train_lib
from tf_mtssl.evaluation import common, outputs
from tf_mtssl.model import lasso as lasso_lib
from tf_mtssl.runs import trunk_source

FLAGS = flags.FLAGS

flags.DEFINE_enum("init", "pretrained", list(trunk_source.INIT_MODES),
                  "pretrained: trunk from --model_dir or --trunk_keras; random: a fresh trunk, the "
                  "Random Init baseline (paper_spec 7.4), of --model_dir's architecture if given, else "
                  "of --depth/--base_width/--output_stride.")
flags.DEFINE_string("model_dir", "", "Pretraining run directory whose trunk is fine-tuned.")
flags.DEFINE_string("checkpoint", "", "Checkpoint prefix in --model_dir (default: its latest).")
flags.DEFINE_string("trunk_keras", "", "An exported trunk: a trunk.keras file or an export directory.")
flags.DEFINE_string("data", "embedded", "'tfds:voc/2007' (prepared in --tfds_data_dir, never "
                    "downloaded) or 'embedded' (the embedded detection set).")
flags.DEFINE_string("tfds_data_dir", None, "tensorflow-datasets data_dir holding prepared datasets.")
flags.DEFINE_string("train_split", "", "Training split; empty: train+validation (VOC07 trainval) for "
                    "tfds, train for the embedded set.")
flags.DEFINE_string("test_split", "test", "Evaluation split.")
flags.DEFINE_integer("eval_max_images", 0, "Evaluate on the first N test images only (0: all).")
flags.DEFINE_string("output_dir", "runs/detection", "Checkpoints, TensorBoard logs, results.json; "
                    "resumed only by the same trunk source.")
flag_utils.define_trunk_flags()
flag_utils.define_lasso_flags()

_CONFIG_CLASSES = (model_lib.DetectorConfig, data_lib.InputConfig, train_lib.FinetuneConfig)
_NOT_FLAGS = {"num_classes", "preprocessing"}   # from the data; from the trunk's source


def _define_dataclass_flags(cls):
  hints = typing.get_type_hints(cls)
  for field in dataclasses.fields(cls):
    if field.name in _NOT_FLAGS:
      continue
    tp, default, help_text = hints[field.name], field.default, field.metadata["help"]
    if typing.get_origin(tp) is tuple:
      flags.DEFINE_list(field.name, [str(v) for v in default], help_text)
    elif tp is bool:
      flags.DEFINE_boolean(field.name, default, help_text)
    elif tp is int:
      flags.DEFINE_integer(field.name, default, help_text)
    elif tp is float:
      flags.DEFINE_float(field.name, default, help_text)
    elif tp is str:
      flags.DEFINE_string(field.name, default, help_text)
    else:
      raise TypeError(f"{cls.__name__}.{field.name}: unsupported flag type {tp}")


def _dataclass_from_flags(cls, **extra):
  hints = typing.get_type_hints(cls)
  values = {}
  for field in dataclasses.fields(cls):
    if field.name in _NOT_FLAGS:
      continue
    value = getattr(FLAGS, field.name)
    if typing.get_origin(hints[field.name]) is tuple:
      item_type = typing.get_args(hints[field.name])[0]
      try:
        value = tuple(item_type(v) for v in value if v.strip())
      except ValueError as e:
        raise ValueError(f"--{field.name}: expected a comma-separated list of {item_type.__name__}, "
                         f"got {','.join(value)}") from e
    values[field.name] = value
  return cls(**values, **extra)


for _cls in _CONFIG_CLASSES:
  _define_dataclass_flags(_cls)


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  finetune_config = _dataclass_from_flags(train_lib.FinetuneConfig)
  keras.utils.set_random_seed(finetune_config.seed)
  trunk, trunk_info = trunk_source.load_trunk(
      FLAGS.init, model_dir=FLAGS.model_dir, checkpoint=FLAGS.checkpoint, trunk_keras=FLAGS.trunk_keras,
      trunk_config=flag_utils.trunk_config_from_flags(), seed=finetune_config.seed)
  input_config = _dataclass_from_flags(data_lib.InputConfig,
                                       preprocessing=trunk_source.input_convention(trunk_info))
  common.check_pretraining_lasso(FLAGS.lasso, trunk_info)
  lasso = common.eval_lasso(common.num_units(trunk), lasso_lib.l1_at(FLAGS.lasso, "eval", FLAGS.lasso_l1))
  train_split = FLAGS.train_split or ("train" if FLAGS.data == "embedded" else "train+validation")
  train_examples, class_names = data_lib.raw_examples(FLAGS.data, train_split, FLAGS.tfds_data_dir)
  test_examples, _ = data_lib.raw_examples(FLAGS.data, FLAGS.test_split, FLAGS.tfds_data_dir)
  detector_config = _dataclass_from_flags(model_lib.DetectorConfig, num_classes=len(class_names))
  detector = model_lib.FasterRCNN(trunk, detector_config, lasso=lasso)
  run_info = {"data": FLAGS.data, "train_split": train_split,
              "test_split": FLAGS.test_split, "lasso": FLAGS.lasso, "class_names": class_names,
              "input_config": dataclasses.asdict(input_config)}
  # Print the protocol (design notes: unstated protocol details cause reproduction gaps): a few lines
  # a person reads; every value is in the results file.
  print(flag_utils.format_lines(
      f"Detection fine-tuning (paper_spec 7.2); every setting is recorded in {train_lib.RESULTS_FILE}", [
          ("trunk", trunk_source.describe_source(trunk_info)),
          ("data", f"{FLAGS.data}: train split {train_split!r}, test split {FLAGS.test_split!r}, "
                   f"{len(class_names)} classes; lasso {FLAGS.lasso}"),
          ("input", flag_utils.describe_config(input_config, always=(
              "min_side", "max_side", "batch_size", "preprocessing"))),
          ("detector", flag_utils.describe_config(detector_config, always=("trunk_bn", "anchor_scales"))),
          ("training", flag_utils.describe_config(finetune_config, always=(
              "train_steps", "learning_rate", "lr_decay_steps"))),
      ]), flush=True)
  results = train_lib.finetune(
      detector,
      data_lib.train_dataset(train_examples, input_config, seed=finetune_config.seed),
      data_lib.eval_dataset(test_examples, input_config, max_images=FLAGS.eval_max_images or None),
      class_names, FLAGS.output_dir, finetune_config, trunk_source=trunk_info, run_info=run_info,
      input_convention=input_config.preprocessing)
  print(f"mAP ({'VOC07 11-point' if finetune_config.use_07_metric else 'area'}) = {results['mAP']:.4f} "
        f"on {results['num_test_images']} {FLAGS.test_split} images at step {results['step']}")
  for name, ap in results["AP"].items():
    print(f"  AP {name:>16s}: {'n/a' if ap is None else f'{ap:.4f}'}")
  if results["train_images_per_sec"]:
    print(f"Training speed: {results['train_images_per_sec']:.2f} images/s")
  print(f"Trunk:       {trunk_source.describe_source(trunk_info)}")
  print(f"Results:     {os.path.abspath(os.path.join(FLAGS.output_dir, outputs.RESULTS_FILE))}")
  print(f"TensorBoard: tensorboard --logdir {os.path.abspath(FLAGS.output_dir)}")


if __name__ == "__main__":
  app.run(flag_utils.run_main(main))
