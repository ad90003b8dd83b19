"""Tests of depth fine-tuning (paper_spec 7.3) and its sources."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from tf_mtssl.evaluation import metrics
from tf_mtssl.model import trunk as trunk_lib
from tf_mtssl.data import depth as depth_sources
from tf_mtssl.evaluation import common, depth, outputs

CROP = 64


def _network(lasso_l1=None, **trunk_kw):
  trunk = trunk_lib.build_trunk(**{**helpers.TINY_TRUNK, **trunk_kw})
  return depth.DepthNetwork(trunk, num_upprojections=3, lasso_l1=lasso_l1)


def test_unpool_puts_each_value_top_left_of_a_zero_block():
  x = tf.reshape(tf.range(1.0, 5.0), [1, 2, 2, 1])
  up = depth.Unpool2x()(x)[0, :, :, 0].numpy()
  np.testing.assert_array_equal(up, [[1, 0, 2, 0], [0, 0, 0, 0], [3, 0, 4, 0], [0, 0, 0, 0]])


def test_decoder_output_is_upsampled_to_the_input():
  net = _network()
  assert net.decoder.output.shape[-1] == 1
  assert net(tf.zeros([2, CROP, 80, 3]), training=False).shape == (2, CROP, 80)


def test_berhu_matches_its_definition_and_ignores_invalid_pixels():
  pred = tf.constant([[1.0, 2.0, 3.0, 100.0]])
  gt = tf.constant([[1.5, 2.0, 1.0, 0.0]])  # last pixel invalid (0): its huge residual is ignored
  valid = depth.valid_mask(gt)
  r = np.array([0.5, 0.0, 2.0])
  c = 0.2 * 2.0
  expected = np.where(r <= c, r, (r ** 2 + c ** 2) / (2 * c)).mean()
  np.testing.assert_allclose(float(depth.berhu_loss(pred, gt, valid)), expected, rtol=1e-6)
  assert float(depth.berhu_loss(pred, tf.zeros_like(gt), depth.valid_mask(tf.zeros_like(gt)))) == 0.0


def test_stereo_split_train_and_test_never_share_a_pixel():
  source = depth_sources.DepthSource("embedded", crop_height=CROP, crop_width=CROP)
  assert set(p.name for p in source.pairs) == {"aloe", "motorcycle"}
  for pair in source.pairs:
    cut = int(pair.target.shape[1] * (1 - source.test_fraction))
    lefts = [left for name, _, left in source.test_tiles() if name == pair.name]
    assert lefts and min(lefts) >= cut
  test = list(source.test_dataset().as_numpy_iterator())
  assert len(test) == len(source.test_tiles())
  train = next(iter(source.train_dataset(seed=0).batch(4)))
  assert train["image"].shape == (4, CROP, CROP, 3) and train["depth"].shape == (4, CROP, CROP)
  assert float(tf.reduce_max(train["depth"])) > 0.0  # inverse depth from disparity


@pytest.mark.slow
def test_depth_fine_tuning_overfits_a_tiny_set():
  source = depth_sources.DepthSource("embedded", crop_height=CROP, crop_width=CROP)
  tiles = next(iter(source.test_dataset().batch(4)))  # 4 fixed real crops with ground truth
  tf.random.set_seed(0)
  config = depth.DepthConfig(train_steps=25, batch_size=4, optimizer="sgd", learning_rate=0.01,
                             lr_boundaries=(), weight_decay=0.0)
  trainer = depth.DepthTrainer(_network(), config)
  outs = [trainer.train_step(tiles) for _ in range(config.train_steps)]
  losses = np.array([float(o["berhu"]) for o in outs])
  delta1 = np.array([float(o["delta1"]) for o in outs])  # of each step's (training-mode) prediction
  assert losses[-5:].mean() < 0.5 * losses[:5].mean(), losses
  assert delta1[-5:].mean() > delta1[:5].mean() + 0.3 and delta1[-5:].mean() > 0.6, delta1
  assert trainer.skipped_train_batches == 0


@pytest.mark.slow
def test_batches_without_valid_ground_truth_are_skipped_and_counted():
  trainer = depth.DepthTrainer(_network(), depth.DepthConfig(lr_boundaries=()))
  images = tf.random.uniform([2, CROP, CROP, 3], 0, 255, seed=2)
  empty = {"image": images, "depth": tf.zeros([2, CROP, CROP])}
  weights = [v.numpy().copy() for v in trainer.network.trainable_variables]
  assert trainer.train_step(empty) is None and trainer.skipped_train_batches == 1
  assert all(np.array_equal(w, v.numpy()) for w, v in zip(weights, trainer.network.trainable_variables))
  valid = {"image": images[:1], "depth": tf.fill([1, CROP, CROP], 2.0)}  # a smaller last batch (padded)
  result = trainer.evaluate(tf.data.Dataset.from_tensors(empty).concatenate(
      tf.data.Dataset.from_tensors(valid)))
  assert result["skipped_test_batches"] == 1 and result["test_batches"] == 2
  for aggregation in depth.AGGREGATIONS:
    assert all(np.isfinite(result[aggregation][k]) for k in ("delta1", "abs_rel", "rmse", "rmse_log", "log10"))
  assert result["num_valid_pixels"] == CROP * CROP and result["num_images"] == 1  # padding dropped
  alone = trainer.evaluate(tf.data.Dataset.from_tensors(valid))  # unpadded: the same metrics
  assert all(np.isclose(alone["pooled"][k], result["pooled"][k], rtol=1e-5) for k in ("delta1", "abs_rel", "rmse"))
  with pytest.raises(ValueError, match="No valid ground-truth pixel"):
    trainer.evaluate(tf.data.Dataset.from_tensors(empty))


def test_eval_lasso_row_exists_and_is_penalised():
  l1 = 0.05
  network = _network(lasso_l1=l1, depth=26)  # 2 block-3 units
  trainer = depth.DepthTrainer(network, depth.DepthConfig(lr_boundaries=()))
  alpha_var = network.lasso.alpha_variable(common.EVAL_LASSO_ROW)
  assert network.lasso.rows == [common.EVAL_LASSO_ROW]
  assert any(v is alpha_var for v in network.trainable_variables)
  alpha_var.assign([0.6, -0.8])
  images = tf.random.uniform([2, CROP, CROP, 3], 0, 255, seed=3)
  gt = tf.random.uniform([2, CROP, CROP], 1.0, 3.0, seed=4)
  _, out = trainer.loss(images, gt, training=True)  # eager: the terms of the training loss
  np.testing.assert_allclose(float(out["lasso_l1"]), l1 * 1.4, rtol=1e-6)
  np.testing.assert_allclose(float(out["loss"]), float(out["berhu"]) + l1 * 1.4, rtol=1e-5)


@pytest.mark.slow
def test_binary_trains_the_eval_lasso_row_on_the_embedded_pairs(tmp_path):
  # In its own process: binaries define absl flags at import, as pretrain does.
  run = subprocess.run(
      [sys.executable, "-m", "tf_mtssl.finetune_depth", "--init=random", "--depth=26", "--base_width=8",
       f"--crop_height={CROP}", f"--crop_width={CROP}", "--train_steps=3", "--batch_size=2",
       "--eval_batch_size=32", "--lr_boundaries=", "--learning_rate=0.01", "--lasso=eval",
       "--lasso_l1=0.05", f"--output_dir={tmp_path}"],
      capture_output=True, text=True, timeout=300, cwd=helpers.REPO_ROOT,
      env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert run.returncode == 0, run.stderr[-3000:]
  text = (tmp_path / outputs.RESULTS_FILE).read_text()
  result = json.loads(text)
  assert 0.0 <= result["per_image_mean"]["delta1"] <= 1.0 and 0.0 <= result["pooled"]["delta1"] <= 1.0
  assert result["data"]["kind"] == "stereo"
  assert result["skipped_train_batches"] == 0 and result["evaluation"] == "depth"
  assert result["trunk"] == {"init": "random", "source": "random", "seed": 0,
                             "trunk": trunk_lib.trunk_config(depth=26, base_width=8)}
  assert "flags" not in result and '"depth": 101' not in text  # only what was used
  assert json.loads((tmp_path / outputs.SOURCE_FILE).read_text())["trunk"] == result["trunk"]
  alpha = np.array(result["eval_lasso_alpha"])
  assert alpha.shape == (2,) and not np.allclose(alpha, [0.0, 1.0])  # trained away from its init
  assert result["final_train"]["lasso_l1"] > 0
  assert "per_image_mean: delta1=" in run.stdout and "pooled: delta1=" in run.stdout
  helpers.assert_progress_bar(run.stderr, 3)


def test_nyu_tfds_source_trains_on_crops_and_tests_at_full_resolution_offline(tmp_path):
  """tfds:nyu_depth_v2 via tfds' offline mock (random data): FCRN-style training crops; the test split
  gives the whole frame at the training resolution, the ground truth at 640 x 480 and the Eigen crop."""
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=2, data_dir=str(tmp_path)):
    os.makedirs(tfds.builder("nyu_depth_v2", data_dir=str(tmp_path)).data_dir)  # "prepared"
    source = depth_sources.DepthSource("tfds:nyu_depth_v2", tfds_data_dir=str(tmp_path), crop_height=228,
                                       crop_width=304, resize_height=240, resize_width=320,
                                       eval_crop=depth_sources.EIGEN_CROP)
    train = next(iter(source.train_dataset(seed=0)))
    test = list(source.test_dataset())
  assert train["image"].shape == (228, 304, 3) and train["depth"].shape == (228, 304)
  assert len(test) == 2 and test[0]["depth"].dtype == tf.float32
  assert test[0]["image"].shape == (240, 320, 3) and test[0]["depth"].shape == (480, 640)
  mask = test[0]["mask"].numpy()
  assert mask.sum() == (471 - 45) * (601 - 41) and mask[45, 41] and not mask[44, 41] and not mask[45, 601]
  with pytest.raises(ValueError, match="eval_crop applies to the full-resolution tfds"):
    depth_sources.DepthSource("embedded", crop_height=CROP, crop_width=CROP, eval_crop=(0, 10, 0, 10))
  with pytest.raises(FileNotFoundError, match="never downloads"):
    depth_sources.DepthSource("tfds:nyu_depth_v2", tfds_data_dir=str(tmp_path / "none"), crop_height=228,
                              crop_width=304)


def test_evaluation_upsamples_to_the_ground_truth_and_reports_per_image_and_pooled():
  """Two test images at a quarter of the ground truth's resolution, one with far more valid pixels:
  the prediction is upsampled to the ground truth, depth beyond max_depth is not scored (and
  predictions are clipped to it), and both aggregations match a NumPy reference."""
  rng = np.random.default_rng(0)
  trainer = depth.DepthTrainer(_network(), depth.DepthConfig(lr_boundaries=(), max_depth=4.0))
  images = tf.constant(rng.uniform(0, 255, (2, 32, 48, 3)), tf.float32)
  gt = rng.uniform(1.0, 5.0, (2, 128, 192)).astype(np.float32)   # some pixels beyond max_depth
  gt[1] *= 0.5                                                  # image 2 nearer: other errors
  mask = np.ones(gt.shape, bool)
  mask[1, :, 20:] = False                                       # image 2: a narrow crop only
  result = trainer.evaluate(tf.data.Dataset.from_tensors({"image": images, "depth": gt, "mask": mask}))
  pred = trainer.network(images, training=False, size=(128, 192)).numpy()
  assert pred.shape == gt.shape
  pred = np.clip(pred, 1e-3, 4.0)
  valid = mask & (gt <= 4.0)
  per_image = [np.abs(pred[i][valid[i]] - gt[i][valid[i]]) / gt[i][valid[i]] for i in range(2)]
  np.testing.assert_allclose(result["per_image_mean"]["abs_rel"], np.mean([e.mean() for e in per_image]), rtol=1e-4)
  np.testing.assert_allclose(result["pooled"]["abs_rel"], np.concatenate(per_image).mean(), rtol=1e-4)
  sq = [(pred[i][valid[i]] - gt[i][valid[i]]) ** 2 for i in range(2)]
  np.testing.assert_allclose(result["per_image_mean"]["rmse"], np.mean([np.sqrt(e.mean()) for e in sq]), rtol=1e-4)
  np.testing.assert_allclose(result["pooled"]["rmse"], np.sqrt(np.concatenate(sq).mean()), rtol=1e-4)
  assert result["num_valid_pixels"] == valid.sum() and result["num_images"] == 2
  # The aggregations really differ here (image 2: few, nearer pixels), so the test tells them apart.
  assert abs(result["per_image_mean"]["rmse"] - result["pooled"]["rmse"]) > 0.05 * result["pooled"]["rmse"]


@pytest.mark.slow
def test_binary_runs_the_nyu_flagfile_protocol_on_mock_tfds(tmp_path):
  """flags/depth_nyu.cfg end to end on tfds' offline mock of nyu_depth_v2 (random frames): full-
  resolution scoring inside the Eigen crop, 10 m cap, per-image and pooled figures in the results file."""
  script = (
      "import os, sys, tensorflow_datasets as tfds\n"
      "from absl import app\n"
      "import tf_mtssl.finetune_depth as binary\n"
      "from tf_mtssl import cli\n"
      "data_dir = sys.argv[1]\n"
      "with tfds.testing.mock_data(num_examples=2, data_dir=data_dir):\n"
      "  os.makedirs(tfds.builder('nyu_depth_v2', data_dir=data_dir).data_dir)\n"
      "  app.run(cli.run_main(binary.main), argv=['finetune_depth'] + sys.argv[2:])\n")
  run = subprocess.run(
      [sys.executable, "-c", script, str(tmp_path / "tfds"), "--flagfile=flags/depth_nyu.cfg",
       f"--tfds_data_dir={tmp_path / 'tfds'}", "--init=random", "--depth=14", "--base_width=8",
       "--train_steps=1", "--batch_size=2", "--eval_batch_size=2", "--eval_every=0", "--log_every=1",
       f"--output_dir={tmp_path / 'out'}"],
      capture_output=True, text=True, timeout=300, cwd=helpers.REPO_ROOT,
      env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads((tmp_path / "out" / outputs.RESULTS_FILE).read_text())
  assert result["data"]["eval_crop"] == list(depth_sources.EIGEN_CROP) and result["config"]["max_depth"] == 10.0
  assert result["num_images"] == 2 and result["data"]["resize"] == [240, 320]
  assert result["num_valid_pixels"] <= 2 * (471 - 45) * (601 - 41)
  assert set(result["per_image_mean"]) == set(result["pooled"]) == set(metrics.DEPTH_METRIC_NAMES)
