import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import skimage.color
import skimage.data
import skimage.io
import skimage.transform
import tensorflow as tf

from tests import helpers
from tf_mtssl import tasks
from tf_mtssl.model import color
from tf_mtssl.tasks.colorization import bins as col_bins
from tf_mtssl.tasks.colorization import task as col
from tf_mtssl.tasks.colorization import prior as col_prior

# Zhang et al.'s pts_in_hull.npy, as printed in OpenCV's samples/dnn/colorization.cpp (Debian opencv-doc
# 4.6.0): the set is convex on the step-10 grid, so it is fully given by the b range of each a column
# (a, b_min, b_max).
ZHANG_BIN_COLUMNS = [
    (-90, 50, 90), (-80, 20, 90), (-70, 0, 90), (-60, -20, 90), (-50, -30, 100), (-40, -40, 100),
    (-30, -50, 100), (-20, -50, 100), (-10, -60, 100), (0, -70, 100), (10, -80, 90), (20, -80, 90),
    (30, -90, 90), (40, -100, 90), (50, -100, 80), (60, -110, 80), (70, -110, 80), (80, -110, 70),
    (90, -110, 70), (100, -90, 0)]
# Its first and last entries, in its order.
ZHANG_FIRST = [(-90, 50), (-90, 60), (-90, 70), (-90, 80), (-90, 90), (-80, 20)]
ZHANG_LAST = [(100, -40), (100, -30), (100, -20), (100, -10), (100, 0)]

SIZE = 64


def small_options(**kw):
  return col.ColorizationOptions(**{"head_width": 16, "upsample_width": 16, **kw})


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """Real photos plus one single-channel (grayscale) PNG, with a precomputed prior beside them."""
  folder = helpers.write_photos(tmp_path_factory.mktemp("col") / "photos", size=80)
  camera = skimage.data.camera()[::4, ::4]  # a real grayscale photo, saved as a 1-channel PNG
  skimage.io.imsave(os.path.join(folder, "zz_camera_gray.png"), camera, check_contrast=False)
  prior, stats = col_prior.compute_prior(folder, num_images=0)
  assert stats == {"images": 4, "gray_images": 1, "pixels": stats["pixels"]}
  col_prior.save_prior(col_prior.default_prior_path(folder), prior)
  return folder


# ---- bins, soft encoding, weights ------------------------------------------------------------------


def test_bin_centers_are_zhangs_313_in_his_order():
  centers = col_bins.ab_bin_centers()
  assert centers.shape == (313, 2) and centers.dtype == np.float32
  expected = [(a, b) for a, lo, hi in ZHANG_BIN_COLUMNS for b in range(lo, hi + 1, 10)]
  assert len(expected) == 313
  assert [tuple(map(int, c)) for c in centers] == expected
  assert [tuple(map(int, c)) for c in centers[:6]] == ZHANG_FIRST
  assert [tuple(map(int, c)) for c in centers[-5:]] == ZHANG_LAST


def test_every_srgb_colour_is_within_one_grid_step_of_a_bin():
  v = np.arange(0, 256, 3) / 255.0  # 86^3 colours, plus the cube's surface at full 8-bit resolution
  dense = np.stack(np.meshgrid(v, v, v, indexing="ij"), axis=-1).reshape(-1, 3)
  rgb = np.concatenate([dense, col_bins.rgb_cube_surface()])
  ab = color.rgb_to_lab(tf.constant(rgb, tf.float32)).numpy()[:, 1:]
  # Stronger than "within one grid step": the grid point nearest to every colour's ab is a bin, so
  # every colour is within 5 * sqrt(2) < 10 of a bin.
  grid = np.round(ab / col_bins.BIN_STEP).astype(np.int64)
  bins = np.round(col_bins.ab_bin_centers() / col_bins.BIN_STEP).astype(np.int64)
  code = lambda g: (g[:, 0] + 100) * 1000 + (g[:, 1] + 100)
  assert np.isin(code(grid), code(bins)).all()
  assert np.abs(ab - grid * col_bins.BIN_STEP).max() <= col_bins.BIN_STEP / 2


def test_neighbour_table_matches_brute_force():
  table = col_bins.neighbour_table(5)
  centers = col_bins.ab_bin_centers().astype(np.float64)
  rng = np.random.default_rng(1)
  for a, b in rng.integers(-128, 128, (300, 2)):
    d = np.sqrt(((centers - (a, b)) ** 2).sum(-1))
    got = table[a + 128, b + 128]
    np.testing.assert_allclose(d[got], np.sort(d)[:5])  # the 5 smallest distances, nearest first


def test_soft_targets_sum_to_one_and_weight_the_nearest_bin_most():
  encoder = col_bins.TargetEncoder(np.ones(313), k=5, sigma=5.0)
  rng = np.random.default_rng(2)
  ab = rng.uniform(-80, 80, (4, 6, 6, 2)).astype(np.float32)
  bins, weights = encoder.soft_encode(tf.constant(ab))
  bins, weights = bins.numpy(), weights.numpy()
  assert bins.shape == weights.shape == (4, 6, 6, 5)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
  centers = col_bins.ab_bin_centers()
  d2 = ((ab[..., None, :] - centers) ** 2).sum(-1)  # [4, 6, 6, 313]
  best = np.take_along_axis(bins, weights.argmax(-1)[..., None], -1)[..., 0]
  np.testing.assert_array_equal(best, d2.argmin(-1))
  # Gaussian weights, sigma = 5: w_i / w_j = exp(-(d_i^2 - d_j^2) / 50) for the chosen bins.
  chosen = np.take_along_axis(d2, bins, -1)
  np.testing.assert_allclose(weights / weights[..., :1], np.exp(-(chosen - chosen[..., :1]) / 50.0), rtol=1e-3)
  np.testing.assert_array_equal(encoder.most_likely_bin(tf.constant(bins), tf.constant(weights)).numpy(), best)


def test_rebalance_weights_average_one_under_the_prior():
  rng = np.random.default_rng(3)
  prior = rng.dirichlet(np.full(313, 0.3))
  w = col_prior.rebalance_weights(prior, 0.5)
  assert abs(np.sum(prior * w) - 1.0) < 1e-9
  # Rare bins weigh more; with lambda = 1 every weight is 1.
  assert w[prior.argmin()] > 1.0 > w[prior.argmax()]
  np.testing.assert_allclose(col_prior.rebalance_weights(prior, 1.0), 1.0)
  # The per-pixel weights of targets drawn from the prior average 1 too.
  encoder = col_bins.TargetEncoder(w)
  samples = col_bins.ab_bin_centers()[rng.choice(313, size=(1, 200, 200), p=prior)]
  targets = encoder(tf.constant(samples + rng.uniform(-2, 2, samples.shape)), tf.constant([False]))
  assert abs(float(tf.reduce_mean(targets["pixel_weights"])) - 1.0) < 0.02


def test_smoothing_preserves_mass_and_spreads_with_sigma_5():
  hist = np.zeros(313)
  zero = [tuple(c) for c in col_bins.ab_bin_centers()].index((0.0, 0.0))
  hist[zero] = 7.0
  p = col_prior.smooth_histogram(hist)
  assert abs(p.sum() - 1.0) < 1e-12 and p.argmax() == zero
  right = [tuple(c) for c in col_bins.ab_bin_centers()].index((10.0, 0.0))
  np.testing.assert_allclose(p[right] / p[zero], np.exp(-100 / 50.0))


# ---- prior files ------------------------------------------------------------------------------------


def test_prior_file_with_wrong_size_is_a_clear_error(tmp_path, photos):
  bad = tmp_path / "prior.npy"
  np.save(bad, np.ones(300))
  with pytest.raises(ValueError, match=r"shape \(300,\).*313"):
    col_prior.load_prior(bad)
  task = col.ColorizationTask(small_options(prior_path=str(bad)), image_size=SIZE)
  with pytest.raises(ValueError, match="313"):
    task.build_dataset(photos, 2)
  missing = col.ColorizationTask(small_options(prior_path=str(tmp_path / "nope.npy")), image_size=SIZE)
  with pytest.raises(FileNotFoundError, match="nope.npy"):
    missing.build_dataset(photos, 2)


def test_missing_prior_is_computed_with_a_warning(tmp_path, caplog):
  folder = helpers.write_photos(tmp_path / "photos", size=48, names=("coffee", "chelsea"))
  task = col.ColorizationTask(small_options(), image_size=SIZE)
  with caplog.at_level(logging.WARNING):
    prior = task.prior(folder)
  assert "no colorization prior" in caplog.text and "colorization_prior" in caplog.text
  expected, _ = col_prior.compute_prior(folder, num_images=1000)
  np.testing.assert_allclose(prior, expected)


@pytest.mark.slow
def test_prior_cli_writes_a_loadable_prior(tmp_path, photos):
  out = tmp_path / "p.npy"
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
  run = subprocess.run([sys.executable, "-m", "tf_mtssl.colorization_prior", f"--data={photos}",
                        f"--output={out}", "--num_images=2", "--max_side=64"],
                       capture_output=True, text=True, env=env, timeout=300, cwd=helpers.REPO_ROOT)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "2 colour images" in run.stdout or "1 colour images" in run.stdout
  prior = col_prior.load_prior(out)
  assert prior.shape == (313,) and abs(prior.sum() - 1) < 1e-9
  assert col_prior.default_prior_path("tfds:imagenet2012") is None  # the CLI then needs --output


# ---- the task ---------------------------------------------------------------------------------------


def test_registered():
  assert tasks.task_class("col") is col.ColorizationTask


def test_batches_and_gray_image_gets_zero_weight(photos):
  task = col.ColorizationTask(small_options(), image_size=SIZE)
  ds = task.build_dataset(photos, 5, seed=3)
  batch = next(iter(ds))
  assert batch["image"].shape == (5, SIZE, SIZE, 3) and batch["image"].dtype == tf.uint8
  assert batch["target_ab"].shape == (5, 8, 8, 2)
  assert batch["target_bins"].shape == (5, 8, 8, 5) and batch["target_bins"].dtype == tf.int32
  assert batch["pixel_weights"].shape == (5, 8, 8)
  assert batch["num_corrupt"].shape == (5,)
  np.testing.assert_allclose(tf.reduce_sum(batch["target_weights"], -1), 1.0, rtol=1e-5)
  gray = batch["is_gray"].numpy()
  assert gray.sum() == 1  # the single-channel camera photo: converted, then masked by the gray rule
  weights = batch["pixel_weights"].numpy()
  assert np.all(weights[gray] == 0) and np.all(weights[~gray] > 0)
  # The trunk sees the gray input of the crop.
  expected = color.to_gray_input(batch["image"])
  # One gray level: the crop is rounded to uint8 before the gray conversion (a quantum, not a float
  # rounding tolerance).
  np.testing.assert_allclose(task.trunk_inputs(batch), expected, atol=1.0)


def test_single_channel_tensor_is_handled():
  task = col.ColorizationTask(small_options(), image_size=SIZE)
  example = task.example_from_image(tf.constant(skimage.data.camera()[::4, ::4, None]), tf.constant([1, 2]))
  assert bool(example["is_gray"]) and example["image"].shape == (SIZE, SIZE, 3)


def test_head_output_is_one_eighth_with_313_channels():
  task = col.ColorizationTask(small_options(), image_size=SIZE)
  head = task.build_head((SIZE // 16, SIZE // 16, 128))
  out = head(tf.zeros([2, SIZE // 16, SIZE // 16, 128]))
  assert out.shape == (2, SIZE // 8, SIZE // 8, 313) and out.dtype == tf.float32
  # Output stride 8: no upsampling needed, same output size.
  head8 = task.build_head((SIZE // 8, SIZE // 8, 128))
  assert head8(tf.zeros([1, SIZE // 8, SIZE // 8, 128])).shape == (1, SIZE // 8, SIZE // 8, 313)
  with pytest.raises(ValueError, match="cannot be upsampled"):
    task.build_head((3, 3, 128))


@pytest.mark.slow
def test_loss_falls_when_overfitting_one_batch(photos):
  task = col.ColorizationTask(small_options(), image_size=SIZE)
  batch = helpers.first_batch(task, data=photos, batch_size=4, seed=1)
  losses = helpers.overfit_single_batch(task, batch, steps=40, learning_rate=3e-3)
  assert np.all(np.isfinite(losses))
  assert losses[-5:].mean() < 0.6 * losses[:3].mean(), losses


def test_loss_and_accuracy_values():
  task = col.ColorizationTask(small_options(), image_size=SIZE)
  encoder = col_bins.TargetEncoder(np.ones(313))
  ab = tf.constant(np.random.default_rng(4).uniform(-60, 60, (2, 8, 8, 2)), tf.float32)
  batch = encoder(ab, tf.constant([False, True]))
  dense = tf.reduce_sum(tf.one_hot(batch["target_bins"], 313) * batch["target_weights"][..., None], axis=-2)
  perfect = tf.math.log(dense + 1e-9)  # predicts the soft target itself: loss = its entropy
  loss_good, metrics = task.loss_and_metrics(batch, perfect)
  loss_flat, _ = task.loss_and_metrics(batch, tf.zeros([2, 8, 8, 313]))
  assert float(metrics["top1_bin_accuracy"]) == 1.0
  assert float(loss_good) < float(loss_flat)
  entropy = -tf.reduce_sum(batch["target_weights"] * tf.math.log(batch["target_weights"]), -1)
  np.testing.assert_allclose(float(loss_good), 0.5 * float(tf.reduce_mean(entropy[0])), rtol=1e-3)
  # The uniform prediction's loss is log(313) on the colour half of the batch, 0 on the gray half.
  np.testing.assert_allclose(float(loss_flat), 0.5 * np.log(313.0), rtol=1e-5)


def test_summary_images(photos):
  task = col.ColorizationTask(small_options(), image_size=SIZE)
  batch = helpers.first_batch(task, data=photos, batch_size=2)
  images = task.summary_images(batch, tf.random.normal([2, 8, 8, 313]))
  img = images["gray_truth_prediction"].numpy()
  assert img.shape == (2, SIZE, 3 * SIZE, 3) and img.min() >= 0.0 and img.max() <= 1.0
  # Left third: gray; middle: the truth crop.
  helpers.assert_close(img[:, :, SIZE:2 * SIZE], batch["image"].numpy() / 255.0, rtol=1e-6)
  assert np.abs(img[:, :, :SIZE] - img[:, :, :SIZE, :1]).max() < 1e-4


def test_annealed_mean_of_a_peaked_prediction_is_its_bin():
  logits = 50.0 * tf.one_hot([[17, 200]], 313)
  ab = col_bins.annealed_mean_ab(logits, 0.38).numpy()
  helpers.assert_close(ab[0], col_bins.ab_bin_centers()[[17, 200]], rtol=1e-5)


def test_col_cfg_is_a_valid_paper_configuration():
  from tf_mtssl import tasks
  cfg = helpers.read_flagfile(helpers.REPO_ROOT / "flags" / "col.cfg")
  assert cfg["tasks"] == "col" and cfg["depth"] == "101" and cfg["output_stride"] == "16"
  options = tasks.options_from_settings("col", cfg)
  assert options == col.ColorizationOptions()  # the cfg spells out the paper defaults
  task = col.ColorizationTask(options, image_size=int(cfg["image_size"]))
  assert task.target_size * 16 == 2 * int(cfg["image_size"])


def test_prepare_embedded_step_writes_the_prior_beside_the_data(tmp_path, monkeypatch, caplog):
  from tf_mtssl.data import prepare as prep
  helpers.write_photos(tmp_path / "images", size=48, names=("coffee", "chelsea"))
  from tf_mtssl import prepare_embedded
  step = next(s for s in prepare_embedded.STEPS if s.name == "colorization_prior")
  manifest = prep.run_steps([step], tmp_path)
  assert [f["path"] for f in manifest["files"]] == ["colorization_prior.npy"]
  monkeypatch.setenv("TF_MTSSL_DATA_DIR", str(tmp_path))
  assert col_prior.default_prior_path("embedded") == tmp_path / "colorization_prior.npy"
  task = col.ColorizationTask(small_options(), image_size=SIZE)
  with caplog.at_level(logging.WARNING):
    prior = task.prior("embedded")
  assert "no colorization prior" not in caplog.text
  np.testing.assert_allclose(prior, col_prior.compute_prior(str(tmp_path / "images"), num_images=0)[0])


def task_crop(task, image, seed):
  from tf_mtssl.model import preprocessing
  return preprocessing.random_crop_resize(image, task.image_size, seed, min_scale=task.options.min_crop_scale)


def _gray_with_colour_dots(offgrid: bool):
  """A SIZE x SIZE gray photo with saturated red pixels every 8 px, off the stride-8 target grid (also
  when mirrored) or on it."""
  image = np.repeat(skimage.data.camera()[::8, ::8, None], 3, axis=-1).copy()
  assert image.shape == (SIZE, SIZE, 3)
  rows = np.arange(1, SIZE, 8) if offgrid else np.arange(col_bins.TARGET_OFFSET, SIZE, col_bins.TARGET_STRIDE)
  image[np.ix_(rows, rows)] = [255, 0, 0]
  return tf.constant(image)


def test_example_targets_and_gray_flag_equal_the_full_resolution_lab():
  """The pipeline computes Lab only at the target pixels (and at all pixels only for crops whose
  targets are gray): the same targets and the same gray flag as from the crop's full Lab."""
  task = col.ColorizationTask(small_options(), image_size=SIZE)
  whole = col.ColorizationTask(small_options(min_crop_scale=1.0), image_size=SIZE)  # crop = the image
  photo = (skimage.transform.resize(skimage.data.coffee(), (90, 120), anti_aliasing=True) * 255).astype(np.uint8)
  camera = tf.constant(np.repeat(skimage.data.camera()[::4, ::4, None], 3, -1))
  cases = [(task, tf.constant(photo), False), (task, camera, True),
           (whole, _gray_with_colour_dots(offgrid=True), False),  # targets gray, colour elsewhere
           (whole, _gray_with_colour_dots(offgrid=False), False)]
  for t, image, gray in cases:
    for i in range(3):
      seed = tf.constant([i, 6])
      example = t.example_from_image(image, seed)
      crop = tf.clip_by_value(task_crop(t, image, seed), 0.0, 255.0)
      lab = color.rgb_to_lab(crop / 255.0).numpy()
      np.testing.assert_allclose(example["target_ab"], lab[4::8, 4::8, 1:], rtol=1e-5, atol=1e-4)
      assert bool(example["is_gray"]) == bool(col_bins.is_gray_image(lab[..., 1:], t.options.gray_threshold)) == gray
      np.testing.assert_array_equal(example["image"], np.round(crop.numpy()).astype(np.uint8))
  # The off-grid case is the one only the full check settles: its targets are all gray.
  example = whole.example_from_image(_gray_with_colour_dots(offgrid=True), tf.constant([0, 6]))
  assert np.abs(example["target_ab"]).max() <= whole.options.gray_threshold and not bool(example["is_gray"])


def test_trunk_input_is_the_lightness_of_the_crop_as_skimage_computes_it(photos):
  task = col.ColorizationTask(small_options(), image_size=SIZE)
  batch = helpers.first_batch(task, data=photos, batch_size=3, seed=2)
  lightness = skimage.color.rgb2lab(batch["image"].numpy())[..., :1]  # from the uint8 crop
  expected = color.lightness_to_gray_input(tf.constant(lightness, tf.float32)).numpy()
  np.testing.assert_allclose(task.trunk_inputs(batch), expected, rtol=0, atol=255 * 1e-4)
