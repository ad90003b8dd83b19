"""Linear evaluation binary (paper_spec 7.1): frozen trunk, block 3 pooled to 3x3xC, linear softmax.

  python -m tf_mtssl.evaluate_linear --model_dir=runs/pretrain                 # embedded set
  python -m tf_mtssl.evaluate_linear --init=random --model_dir=runs/pretrain   # Random Init row
  python -m tf_mtssl.evaluate_linear --flagfile=flags/linear_imagenet.cfg --model_dir=runs/mtl \
      --tfds_data_dir=/data/tfds

Prints top-1 / top-5 on the evaluation split, writes them to TensorBoard (--output_dir) and to
--output_dir/result.json. See `tf_mtssl.evaluation.linear` for the protocol.

The probe sets (`--data=fashion_mnist`, `--data=objects`, tf_mtssl.data.probe_sets), `--probes=knn` or
a `--weight_decays` list run `tf_mtssl.evaluation.probes` instead: the linear probe once per weight
decay, the one with the best --val_split top-1 kept, and/or the cosine kNN probe with k chosen on
--val_split; every top-1 with its standard error, on --eval_split (default: test for probe sets):

  python -m tf_mtssl.evaluate_linear --model_dir=runs/ex --data=fashion_mnist --probes=linear,knn \
      --image_size=64 --crop_fraction=1
"""

import dataclasses
import logging
import os

import keras
from absl import app, flags

from tf_mtssl import flag_utils
from tf_mtssl.data import classification_set
from tf_mtssl.evaluation import common, linear, probes

FLAGS = flags.FLAGS

flags.DEFINE_enum("init", "pretrained", list(common.INIT_MODES),
                  "pretrained: the trunk of --model_dir or --trunk_keras; random: random weights (the "
                  "paper's Random Init baseline, paper_spec 7.4), architecture of --model_dir if given, "
                  "else of --depth/--output_stride/--base_width.")
flags.DEFINE_string("model_dir", "", "Pretraining run directory (run_config.json + checkpoints).")
flags.DEFINE_string("checkpoint", "", "Checkpoint prefix in --model_dir (e.g. ckpt-100); empty = latest.")
flags.DEFINE_string("trunk_keras", "", "An exported trunk: trunk.keras file or export directory "
                    "(python -m tf_mtssl.export ...), instead of --model_dir.")
flags.DEFINE_string("data", "embedded", "Labelled data: 'embedded' (tiny set from the embedded photos), "
                    "'tfds:imagenet2012' (prepared in --tfds_data_dir, never downloaded), an ImageFolder "
                    "root (root/<split>/<label>/*.jpg), or a TFRecord pattern with '{split}' "
                    "(image/encoded + image/class/label).")
flags.DEFINE_string("tfds_data_dir", None, "tensorflow-datasets data_dir with prepared datasets "
                    "(None: the tfds default, ~/tensorflow_datasets).")
flags.DEFINE_string("train_split", "train", "Split the classifier is trained on.")
flags.DEFINE_string("eval_split", "", "Split top-1/top-5 are reported on; empty = the source's "
                    "validation split (validation for tfds/TFRecords, val for folders and embedded).")
flags.DEFINE_integer("label_offset", 0, "Subtracted from TFRecord labels (slim ImageNet TFRecords: 1).")
flags.DEFINE_integer("num_classes", 0, "Classes of TFRecord data; 0 = scan the training labels once.")
flags.DEFINE_integer("image_size", 224, "Side of the crops fed to the trunk (paper_spec 7.1 [I]: 224).")
flags.DEFINE_float("crop_fraction", 0.875, "Centre crops: resize the shorter side to "
                   "image_size / crop_fraction, then crop [I].")
flags.DEFINE_boolean("augment", False, "Train on random-resized crops + flips (paper_spec 7.1 [I]); "
                     "features are then computed every step (no cache).")
flags.DEFINE_boolean("cache_features", True, "Compute the frozen trunk's pooled features once and "
                     "train the classifier on them (only without --augment).")
flags.DEFINE_integer("grid", 3, "Block 3 is average-pooled to grid x grid (paper_spec 7.1: 3).")
flags.DEFINE_enum("feature_norm", "batchnorm", list(linear.FEATURE_NORMS),
                  "batchnorm: standardise features by batch norm without affine before the linear "
                  "layer [I]; none: raw features.")
flags.DEFINE_integer("batch_size", 256, "Training batch (paper_spec 7.1 [I]: 256-2048).")
flags.DEFINE_integer("eval_batch_size", 256, "Batch of feature extraction and evaluation.")
flags.DEFINE_integer("train_steps", 2000, "SGD steps (paper_spec 7.1 [I]: 85000 on ImageNet).")
flags.DEFINE_float("learning_rate", 0.1, "Initial learning rate (paper_spec 7.1 [I]: 0.1).")
flags.DEFINE_list("lr_boundaries", ["1200", "1600"], "Steps after which the learning rate is "
                  "multiplied by --lr_decay (paper_spec 7.1 [I]: 50000,75000).")
flags.DEFINE_float("lr_decay", 0.1, "Learning-rate factor at each boundary (paper_spec 7.1 [I]).")
flags.DEFINE_float("momentum", 0.9, "SGD momentum (paper_spec 7.1 [I]).")
flags.DEFINE_float("weight_decay", 0.0, "L2 weight on the classifier kernel [I].")
flags.DEFINE_list("probes", ["linear"], f"Probes of {list(probes.PROBES)}: linear (weight decay chosen on "
                  "--val_split when --weight_decays lists several) and knn (cosine, weighted vote).")
flags.DEFINE_list("weight_decays", [], "Linear probe: weight decays to choose from on --val_split (e.g. "
                  f"{','.join(str(w) for w in probes.WEIGHT_DECAYS)}); empty = --weight_decay alone.")
flags.DEFINE_list("knn_ks", [str(k) for k in probes.KNN_KS], "kNN probe: k values to choose from on --val_split.")
flags.DEFINE_float("knn_temperature", probes.KNN_TEMPERATURE, "kNN probe: vote weights exp(cos / T) (DINO: 0.07).")
flags.DEFINE_string("val_split", "val", "Split the probes' hyper-parameters are chosen on (--probes=knn, "
                    "--weight_decays, probe sets).")
flags.DEFINE_boolean("reestimate_bn", False, "Diagnostic (probes path): re-estimate the trunk's batch-norm "
                     "moving statistics on up to 2048 --train_split images before probing.")
flags.DEFINE_integer("eval_every", 0, "Steps between evaluations (0: only at the end).")
flags.DEFINE_integer("log_every", 100, "Steps between training-loss logs.")
flags.DEFINE_integer("seed", 0, "Seed of random init, shuffling and augmentation.")
flags.DEFINE_string("output_dir", "runs/eval_linear", "TensorBoard summaries and result.json.")
flag_utils.define_trunk_flags()
flag_utils.define_lasso_flags()


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  keras.utils.set_random_seed(FLAGS.seed)  # heads' initialisation, shuffling: reproducible runs
  trunk, trunk_info = common.load_trunk(
      FLAGS.init, model_dir=FLAGS.model_dir, checkpoint=FLAGS.checkpoint, trunk_keras=FLAGS.trunk_keras,
      trunk_config=flag_utils.trunk_config_from_flags(), seed=FLAGS.seed)
  source = classification_set.ClassificationSource(
      FLAGS.data, train_split=FLAGS.train_split, tfds_data_dir=FLAGS.tfds_data_dir,
      label_offset=FLAGS.label_offset, num_classes=FLAGS.num_classes, image_size=FLAGS.image_size)
  eval_split = FLAGS.eval_split or source.default_eval_split()
  config = linear.ProbeConfig(
      train_steps=FLAGS.train_steps, batch_size=FLAGS.batch_size, eval_batch_size=FLAGS.eval_batch_size,
      learning_rate=FLAGS.learning_rate, lr_boundaries=tuple(int(b) for b in FLAGS.lr_boundaries),
      lr_decay=FLAGS.lr_decay, momentum=FLAGS.momentum, weight_decay=FLAGS.weight_decay,
      feature_norm=FLAGS.feature_norm, grid=FLAGS.grid, image_size=FLAGS.image_size,
      crop_fraction=FLAGS.crop_fraction, augment=FLAGS.augment, cache_features=FLAGS.cache_features,
      lasso_l1=FLAGS.lasso_l1 if flag_utils.lasso_applies(FLAGS.lasso, "eval") else None,
      eval_every=FLAGS.eval_every, log_every=FLAGS.log_every, seed=FLAGS.seed)
  print(f"Linear evaluation (paper_spec 7.1): {trunk_info}; data {source.describe()['spec']} "
        f"({source.num_classes} classes), train split {FLAGS.train_split!r}, eval split {eval_split!r}; "
        f"{config}")
  if source.kind == "probe_set" or FLAGS.probes != ["linear"] or FLAGS.weight_decays or FLAGS.reestimate_bn:
    _run_probes(trunk, trunk_info, source, config, eval_split)
    return
  result = linear.ProbeTrainer(trunk, source.num_classes, config).fit(
      source, FLAGS.train_split, eval_split, summary_dir=FLAGS.output_dir)
  result.update(trunk=trunk_info, data=source.describe(), train_split=FLAGS.train_split,
                eval_split=eval_split, lasso=FLAGS.lasso, config=dataclasses.asdict(config),
                flags=FLAGS.flag_values_dict())
  result["top1_se"] = probes.proportion_se(result["top1"], result["num_eval"])
  path = os.path.join(FLAGS.output_dir, "result.json")
  common.write_json(path, result)
  print(f"top1={result['top1']:.4f} (standard error {result['top1_se']:.4f}) top{result['top5_k']}={result['top5']:.4f} "
        f"({result['num_eval']} {eval_split} examples, {source.num_classes} classes, chance top1="
        f"{1.0 / source.num_classes:.4f})")
  print(f"Result:      {os.path.abspath(path)}")
  print(f"TensorBoard: tensorboard --logdir {os.path.abspath(FLAGS.output_dir)}")


def _run_probes(trunk, trunk_info, source, config, eval_split):
  try:
    knn_ks = tuple(int(k) for k in FLAGS.knn_ks)
    weight_decays = tuple(float(w) for w in FLAGS.weight_decays) or (FLAGS.weight_decay,)
  except ValueError as e:
    raise ValueError(f"--knn_ks takes integers and --weight_decays numbers: {e}") from e
  protocol = probes.ProbeProtocol(probes=tuple(FLAGS.probes), weight_decays=weight_decays, knn_ks=knn_ks,
                                  knn_temperature=FLAGS.knn_temperature, train_split=FLAGS.train_split,
                                  val_split=FLAGS.val_split, test_split=eval_split,
                                  reestimate_bn=FLAGS.reestimate_bn)
  result = probes.run_probes(trunk, source, config, protocol)
  result.update(trunk=trunk_info, data=source.describe(), protocol=dataclasses.asdict(protocol),
                config=dataclasses.asdict(config), flags=FLAGS.flag_values_dict())
  path = os.path.join(FLAGS.output_dir, "result.json")
  common.write_json(path, result)
  chance = 1.0 / source.num_classes
  for name in protocol.probes:
    r = result[name]
    chosen = f"weight decay {r['weight_decay']:g}" if name == "linear" else f"k={r['k']}"
    print(f"{name}: top1={r['top1']:.4f} +- {r['se']:.4f} (standard error) on {result['num_test']} "
          f"{eval_split} examples; {chosen} chosen on {FLAGS.val_split} (top1 {r['val_top1']:.4f}); "
          f"chance {chance:.4f}")
  print(f"Result:      {os.path.abspath(path)}")


if __name__ == "__main__":
  app.run(flag_utils.run_main(main))
