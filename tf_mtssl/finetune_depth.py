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

import dataclasses
import logging
import os

import keras
from absl import app, flags

from tf_mtssl import cli as flag_utils
from tf_mtssl.evaluation import metrics
from tf_mtssl.data import depth as depth_sources
from tf_mtssl.evaluation import depth, outputs
from tf_mtssl.runs import trunk_source

FLAGS = flags.FLAGS

flags.DEFINE_enum("init", "pretrained", list(trunk_source.INIT_MODES),
                  "pretrained: the trunk of --model_dir or --trunk_keras; random: random weights (the "
                  "paper's Random Init baseline, paper_spec 7.4), architecture of --model_dir if given, "
                  "else of --depth/--output_stride/--base_width.")
flags.DEFINE_string("model_dir", "", "Pretraining run directory (run_config.json + checkpoints).")
flags.DEFINE_string("checkpoint", "", "Checkpoint prefix in --model_dir (e.g. ckpt-100); empty = latest.")
flags.DEFINE_string("trunk_keras", "", "An exported trunk: trunk.keras file or export directory, "
                    "instead of --model_dir.")
flags.DEFINE_string("data", "embedded", "Depth data: 'embedded' (the embedded Middlebury stereo pairs, "
                    "inverse depth from disparity), a folder of stereo pairs in that layout, or "
                    "'tfds:nyu_depth_v2' (prepared in --tfds_data_dir, never downloaded).")
flags.DEFINE_string("tfds_data_dir", None, "tensorflow-datasets data_dir with prepared datasets "
                    "(None: the tfds default, ~/tensorflow_datasets).")
flags.DEFINE_string("train_split", "train", "tfds: training split.")
flags.DEFINE_string("test_split", "validation", "tfds: test split (nyu_depth_v2: the 654 test images).")
flags.DEFINE_integer("crop_height", 128, "Height of training crops and test crops/tiles "
                     "(paper_spec 7.3 [I] NYU: 228).")
flags.DEFINE_integer("crop_width", 128, "Width of training crops and test crops/tiles "
                     "(paper_spec 7.3 [I] NYU: 304).")
flags.DEFINE_integer("resize_height", 0, "tfds: resize before cropping (0: keep; NYU [I]: 240).")
flags.DEFINE_integer("resize_width", 0, "tfds: resize before cropping (0: keep; NYU [I]: 320).")
flags.DEFINE_integer("stereo_max_side", 768, "Stereo pairs: resize so the longer side is at most this.")
flags.DEFINE_float("test_fraction", 1.0 / 3.0, "Stereo pairs: right fraction of each pair's columns held "
                   "out as the test split.")
flags.DEFINE_list("eval_crop", [], "tfds: TOP,BOTTOM,LEFT,RIGHT of the scored region of the full-resolution "
                  "test ground truth (bottom/right exclusive); empty = the whole frame (NYU [I]: "
                  f"{','.join(map(str, depth_sources.EIGEN_CROP))}, Eigen et al.'s crop).")
flags.DEFINE_float("max_depth", 0.0, "Test: ground truth beyond this is not scored and predictions are "
                   "clipped to it; 0 = no cap (NYU [I]: 10 m).")
flags.DEFINE_integer("decoder_upprojections", 3, "FCRN up-projection blocks (3: stride 16 -> 2) [I].")
flags.DEFINE_integer("decoder_width", 0, "Channels after the decoder's 1x1 conv; 0 = block-3 channels / 2.")
flags.DEFINE_float("berhu_c", depth.BERHU_C_FRACTION, "berHu threshold as a fraction of the batch's "
                   "largest residual (Laina et al.: 0.2).")
flags.DEFINE_integer("batch_size", 8, "Training batch (FCRN [I]: 16).")
flags.DEFINE_integer("eval_batch_size", 8, "Test batch.")
flags.DEFINE_integer("train_steps", 1000, "Training steps.")
flags.DEFINE_enum("optimizer", "sgd", list(depth.OPTIMIZERS), "sgd (with momentum, FCRN [I]) or adam.")
flags.DEFINE_float("learning_rate", 0.01, "Initial learning rate (FCRN [I]: 1e-2).")
flags.DEFINE_list("lr_boundaries", ["600", "800"], "Steps after which the learning rate is multiplied "
                  "by --lr_decay.")
flags.DEFINE_float("lr_decay", 0.1, "Learning-rate factor at each boundary.")
flags.DEFINE_float("momentum", 0.9, "SGD momentum (FCRN [I]: 0.9).")
flags.DEFINE_float("weight_decay", 1e-4, "Decoupled weight decay on kernels [I].")
flags.DEFINE_float("clipnorm", 0.0, "Clip the global gradient norm to this; 0 = no clipping [I].")
flags.DEFINE_integer("eval_every", 0, "Steps between test evaluations (0: only at the end).")
flags.DEFINE_integer("log_every", 50, "Steps between training logs.")
flags.DEFINE_integer("seed", 0, "Seed of random init and of the training crops.")
flags.DEFINE_string("output_dir", "runs/finetune_depth", "TensorBoard summaries and results.json; "
                    "reused only by the same trunk source.")
flag_utils.define_trunk_flags()
flag_utils.define_lasso_flags()
flag_utils.define_progress_flag()


def _eval_crop(values):
  if not values:
    return None
  try:
    return tuple(int(v) for v in values)
  except ValueError as e:
    raise ValueError(f"--eval_crop takes TOP,BOTTOM,LEFT,RIGHT pixel numbers, got {','.join(values)!r}") from e


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  keras.utils.set_random_seed(FLAGS.seed)  # heads' initialisation, shuffling: reproducible runs
  trunk, trunk_info = trunk_source.load_trunk(
      FLAGS.init, model_dir=FLAGS.model_dir, checkpoint=FLAGS.checkpoint, trunk_keras=FLAGS.trunk_keras,
      trunk_config=flag_utils.trunk_config_from_flags(), seed=FLAGS.seed)
  source = depth_sources.DepthSource(
      FLAGS.data, crop_height=FLAGS.crop_height, crop_width=FLAGS.crop_width,
      resize_height=FLAGS.resize_height, resize_width=FLAGS.resize_width, train_split=FLAGS.train_split,
      test_split=FLAGS.test_split, tfds_data_dir=FLAGS.tfds_data_dir,
      stereo_max_side=FLAGS.stereo_max_side, test_fraction=FLAGS.test_fraction,
      eval_crop=_eval_crop(FLAGS.eval_crop))
  config = depth.DepthConfig(
      train_steps=FLAGS.train_steps, batch_size=FLAGS.batch_size, eval_batch_size=FLAGS.eval_batch_size,
      optimizer=FLAGS.optimizer, learning_rate=FLAGS.learning_rate,
      lr_boundaries=tuple(int(b) for b in FLAGS.lr_boundaries), lr_decay=FLAGS.lr_decay,
      momentum=FLAGS.momentum, weight_decay=FLAGS.weight_decay, clipnorm=FLAGS.clipnorm,
      berhu_c=FLAGS.berhu_c, max_depth=FLAGS.max_depth, eval_every=FLAGS.eval_every,
      log_every=FLAGS.log_every, seed=FLAGS.seed, progress_bar=FLAGS.progress_bar)
  network = depth.DepthNetwork(
      trunk, num_upprojections=FLAGS.decoder_upprojections, width=FLAGS.decoder_width,
      lasso_l1=FLAGS.lasso_l1 if flag_utils.lasso_applies(FLAGS.lasso, "eval") else None,
      convention=trunk_source.input_convention(trunk_info))
  trainer = depth.DepthTrainer(network, config)
  outputs.claim_output_dir(FLAGS.output_dir, depth.EVALUATION, trunk_info)
  print(f"Depth fine-tuning (paper_spec 7.3) of {trunk_source.describe_source(trunk_info)}; data "
        f"{source.describe()}; {config}")
  result = trainer.fit(source.train_dataset(seed=FLAGS.seed), source.test_dataset(),
                       summary_dir=FLAGS.output_dir)
  # Only what was used: the resolved settings, not the binary's flag defaults.
  result.update(data=source.describe(), lasso=FLAGS.lasso, config=dataclasses.asdict(config),
                decoder={"upprojections": FLAGS.decoder_upprojections, "width": FLAGS.decoder_width},
                preprocessing=network.convention)
  path = outputs.write_results(FLAGS.output_dir, depth.EVALUATION, trunk_info, result)
  for aggregation in depth.AGGREGATIONS:
    print(f"{aggregation:>14s}: " + " ".join(f"{k}={result[aggregation][k]:.4f}"
                                             for k in metrics.DEPTH_METRIC_NAMES))
  print(f"({result['num_images']} test images, {result['num_valid_pixels']} valid test pixels; skipped "
        f"batches without valid ground truth: train {result['skipped_train_batches']}, test "
        f"{result['skipped_test_batches']})")
  print(f"Result:      {os.path.abspath(path)}")
  print(f"TensorBoard: tensorboard --logdir {os.path.abspath(FLAGS.output_dir)}")


if __name__ == "__main__":
  app.run(flag_utils.run_main(main))
