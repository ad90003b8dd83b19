"""Linear evaluation binary (paper_spec 7.1): frozen trunk, block 3 pooled to 3x3xC, linear softmax.

  python -m tf_mtssl.evaluate_linear --model_dir=runs/pretrain                 # embedded set
  python -m tf_mtssl.evaluate_linear --init=random --model_dir=runs/pretrain   # Random Init row
  python -m tf_mtssl.evaluate_linear --flagfile=flags/linear_imagenet.cfg --model_dir=runs/mtl \
      --tfds_data_dir=/data/tfds

Prints top-1 / top-5 on the evaluation split, writes them to TensorBoard (--output_dir) and to
--output_dir/results.json with the trunk's provenance; an --output_dir made from another trunk
source is refused (trunk_source.json). See `tf_mtssl.evaluation.linear` for the protocol.

The probe sets (`--data=fashion_mnist`, `--data=objects`, tf_mtssl.data.probe_sets), `--probes=knn` or
a `--weight_decays` list run `tf_mtssl.evaluation.probes` instead: the linear probe once per weight
decay, the one with the best --val_split top-1 kept, and/or the cosine kNN probe with k chosen on
--val_split; every top-1 with its standard error, on --eval_split (default: test for probe sets):

  python -m tf_mtssl.evaluate_linear --model_dir=runs/ex --data=fashion_mnist --probes=linear,knn \
      --image_size=64 --crop_fraction=1
"""

from tf_mtssl.core import quiet  # noqa: F401  (first: silences TensorFlow's start-up noise)

import logging
import os

import keras
from absl import app

from tf_mtssl import cli
from tf_mtssl.core import configs
from tf_mtssl.evaluation import common, linear, probes
from tf_mtssl.model.lasso import LassoConfig
from tf_mtssl.model.trunk import TrunkConfig
from tf_mtssl.runs import trunk_source

for _config in (trunk_source.TrunkSourceConfig, TrunkConfig, LassoConfig, linear.LinearEvalConfig):
  cli.define_flags(_config)
cli.define_flags(linear.ProbeConfig, exclude=("lasso_l1", "preprocessing", "shuffle_buffer"))
# The probes' protocol: used for probe sets, or when --probes, --weight_decays or --reestimate_bn ask for it.
cli.define_flags(probes.ProbeProtocol, exclude=("train_split", "test_split"),
                 defaults={"probes": ("linear",), "weight_decays": ()})


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  run = cli.config_from_flags(linear.LinearEvalConfig)
  lasso = cli.config_from_flags(LassoConfig)
  seed = cli.FLAGS.seed
  keras.utils.set_random_seed(seed)  # heads' initialisation, shuffling: reproducible runs
  source = trunk_source.load(cli.config_from_flags(trunk_source.TrunkSourceConfig), cli.config_from_flags(TrunkConfig),
                             seed)
  common.check_pretraining_lasso(lasso.mode, source.provenance)
  config = cli.config_from_flags(linear.ProbeConfig, lasso_l1=lasso.l1_at("eval"),
                                 preprocessing=trunk_source.input_convention(source.provenance))
  f = cli.FLAGS
  protocol = None
  if list(f.probes) != ["linear"] or f.weight_decays or f.reestimate_bn:
    protocol = cli.config_from_flags(probes.ProbeProtocol, train_split=run.train_split, test_split="",
                                     **({} if f.weight_decays else {"weight_decays": (config.weight_decay,)}))
  print(f"Linear evaluation (paper_spec 7.1) of {trunk_source.describe_source(source.provenance)}; data {run.data}; "
        f"{configs.describe(config)}")
  result, path, data = linear.evaluate(source, run, config, protocol)
  split, chance = result["eval_split"], 1.0 / data.num_classes
  if "num_test" in result:  # the probes' protocol
    for name in ("linear", "knn"):
      if name in result:
        r = result[name]
        chosen = f"weight decay {r['weight_decay']:g}" if name == "linear" else f"k={r['k']}"
        print(f"{name}: top1={r['top1']:.4f} +- {r['se']:.4f} (standard error) on {result['num_test']} {split} "
              f"examples; {chosen} chosen on {f.val_split} (top1 {r['val_top1']:.4f}); chance {chance:.4f}")
  else:
    print(f"top1={result['top1']:.4f} (standard error {result['top1_se']:.4f}) top{result['top5_k']}="
          f"{result['top5']:.4f} ({result['num_eval']} {split} examples, {data.num_classes} classes, chance "
          f"top1={chance:.4f})")
  print(f"Result:      {os.path.abspath(path)}")
  print(f"TensorBoard: tensorboard --logdir {os.path.abspath(run.output_dir)}")


if __name__ == "__main__":
  app.run(cli.run_main(main))
