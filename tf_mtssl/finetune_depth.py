"""Depth fine-tuning binary (paper_spec 7.3): trunk + FCRN up-projection decoder, berHu, delta < 1.25.

  python -m tf_mtssl.finetune_depth --model_dir=runs/pretrain                 # embedded stereo pairs
  python -m tf_mtssl.finetune_depth --init=random --model_dir=runs/pretrain   # Random Init row
  python -m tf_mtssl.finetune_depth --flagfile=flags/depth_nyu.cfg --model_dir=runs/mtl \
      --tfds_data_dir=/data/tfds

The whole network is fine-tuned; the test split is evaluated with `tf_mtssl.evaluation.metrics.depth_metrics`
(printed, written to TensorBoard under --output_dir and to --output_dir/results.json with the
trunk's provenance; an --output_dir made from another trunk source is refused). See
`tf_mtssl.evaluation.depth` (network, loss) and `tf_mtssl.data.depth` (data, splits).
"""

from tf_mtssl.core import quiet  # noqa: F401  (first: silences TensorFlow's start-up noise)

import logging
import os

import keras
from absl import app

from tf_mtssl import cli
from tf_mtssl.data.depth import DepthDataConfig
from tf_mtssl.evaluation import common, depth, metrics
from tf_mtssl.model.lasso import LassoConfig
from tf_mtssl.model.trunk import TrunkConfig
from tf_mtssl.runs import trunk_source

for _config in (trunk_source.TrunkSourceConfig, TrunkConfig, LassoConfig, DepthDataConfig, depth.DepthConfig):
  cli.define_flags(_config)


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  config = cli.config_from_flags(depth.DepthConfig)
  lasso = cli.config_from_flags(LassoConfig)
  keras.utils.set_random_seed(config.seed)  # heads' initialisation, shuffling: reproducible runs
  source = trunk_source.load(cli.config_from_flags(trunk_source.TrunkSourceConfig), cli.config_from_flags(TrunkConfig),
                             config.seed)
  common.check_pretraining_lasso(lasso.mode, source.provenance)
  print(f"Depth fine-tuning (paper_spec 7.3) of {trunk_source.describe_source(source.provenance)}")
  result, path = depth.evaluate(source, cli.config_from_flags(DepthDataConfig), config, lasso.l1_at("eval"))
  for aggregation in depth.AGGREGATIONS:
    print(f"{aggregation:>14s}: " + " ".join(f"{k}={result[aggregation][k]:.4f}" for k in metrics.DEPTH_METRIC_NAMES))
  print(f"({result['num_images']} test images, {result['num_valid_pixels']} valid test pixels; skipped batches "
        f"without valid ground truth: train {result['skipped_train_batches']}, test {result['skipped_test_batches']})")
  print(f"Result:      {os.path.abspath(path)}")
  print(f"TensorBoard: tensorboard --logdir {os.path.abspath(config.output_dir)}")


if __name__ == "__main__":
  app.run(cli.run_main(main))
