import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from tf_mtssl.tasks import relative_position as rp

# paper_spec 3.1 label layout: (dx, dy) of the second patch relative to the first -> class.
SPEC_LAYOUT = {(-1, -1): 0, (0, -1): 1, (1, -1): 2, (-1, 0): 3, (1, 0): 4, (-1, 1): 5, (0, 1): 6, (1, 1): 7}
OPTS = rp.RelativePositionOptions(patch_size=32, gap=16, jitter=3, hidden=32, reduce_channels=8)


def test_label_layout_matches_the_spec():
  for (dx, dy), label in SPEC_LAYOUT.items():
    assert rp.label_for_offset(dx, dy) == label
  with pytest.raises(ValueError):
    rp.label_for_offset(0, 0)


def coordinate_image(h, w):
  """Pixel (y, x) holds (y, x, 0): a patch's position can be read back from its pixels."""
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  return tf.constant(np.stack([yy, xx, np.zeros_like(yy)], -1), tf.float32)


@pytest.mark.parametrize("seed", range(5))
def test_patch_grid_geometry_can_be_read_back(seed):
  image = coordinate_image(200, 230)
  patches, top_left = rp.sample_patch_grid(image, tf.constant([seed, 7]), OPTS)
  patches, top_left = patches.numpy(), top_left.numpy()
  p, step = OPTS.patch_size, OPTS.patch_size + OPTS.gap
  for i in range(rp.NUM_PATCHES):
    y, x = patches[i, 0, 0, 0], patches[i, 0, 0, 1]
    assert (y, x) == tuple(top_left[i])                      # the patch is where it says
    assert patches[i, -1, -1, 0] == y + p - 1 and patches[i, -1, -1, 1] == x + p - 1
  origin = top_left[rp.CENTER] - step  # nominal cell origins differ from jittered ones by <= jitter
  for i in range(rp.NUM_PATCHES):
    r, c = divmod(i, 3)
    assert np.all(np.abs(top_left[i] - (origin + [r * step, c * step])) <= 2 * OPTS.jitter)
  # Every (centre, neighbour k) pair: the neighbour's position relative to the centre gives label k.
  for label, cell in enumerate(rp.NEIGHBOURS):
    delta = top_left[cell] - top_left[rp.CENTER]
    dy, dx = np.round(delta / step).astype(int)
    assert SPEC_LAYOUT[(int(dx), int(dy))] == label
    # Same row/column: within the jitter; neighbouring row/column: a patch plus the gap away.
    assert np.all(np.abs(delta - np.array([dy, dx]) * step) <= 2 * OPTS.jitter)


def test_rescale_keeps_pixel_count_in_range_and_fits_the_grid():
  opts = rp.RelativePositionOptions()
  for i, (h, w) in enumerate([(375, 500), (1200, 900), (100, 100)]):
    out = rp.rescale_for_grid(tf.zeros([h, w, 3], tf.uint8), tf.constant([i, 0]), opts)
    oh, ow = out.shape[:2]
    assert min(oh, ow) >= rp.grid_extent(opts)
    if min(h, w) * np.sqrt(opts.max_pixels / (h * w)) > rp.grid_extent(opts):  # not forced up
      assert opts.min_pixels * 0.98 <= oh * ow <= opts.max_pixels * 1.02


def test_colour_dropping_keeps_one_channel_and_rms_50():
  patches = tf.random.uniform([9, 32, 32, 3], 0, 255, seed=1)
  out = rp.drop_colors(patches, tf.constant([3, 4]), 50.0).numpy()
  np.testing.assert_allclose(np.sqrt((out ** 2).mean(axis=(1, 2, 3))), 50.0, rtol=1e-4)
  spread = out.reshape(9, -1, 3).std(axis=1)
  assert np.all((spread > 10).sum(axis=1) == 1)  # one signal channel, two near-silent noise channels


def test_pixelation_applies_with_probability():
  patches = tf.random.uniform([200, 32, 32, 3], 0, 255, seed=2)
  out = rp.pixelate(patches, tf.constant([5, 6]), 1 / 3).numpy()
  changed = np.abs(out - patches.numpy()).max(axis=(1, 2, 3)) > 1e-3
  assert 0.2 < changed.mean() < 0.47


def test_dataset_batches_nine_patches_per_image(tmp_path):
  """(The loss falling when one batch is overfitted: tests/test_task_contract.py, for every task.)"""
  task = helpers.tiny_task("rp")
  batch = helpers.first_batch(task, helpers.write_photos(tmp_path / "photos"), batch_size=2)
  assert batch["patches"].shape == (2, 9, task.options.patch_size, task.options.patch_size, 3)
  assert task.trunk_inputs(batch).shape[0] == 18


def test_head_predicts_8_classes_per_pair():
  task = helpers.tiny_task("rp")
  head = task.build_head((2, 2, 128))
  logits = head(np.zeros((2 * 9, 2, 2, 128), np.float32))
  assert tuple(logits.shape) == (2, 8, 8) and logits.dtype == "float32"


@pytest.fixture(scope="module")
def photo():
  import skimage.data
  return tf.constant(skimage.data.coffee())  # 400 x 600 uint8


@pytest.mark.parametrize("shape", [(400, 600), (170, 260), (60, 90)])  # down- and upscaled, forced up
def test_rescaled_patch_grid_equals_rescaling_the_whole_image_then_cutting(photo, shape):
  image = tf.image.resize(photo, shape, antialias=True)
  for i in range(3):
    scale_seed, grid_seed = tf.constant([i, 1]), tf.constant([i, 2])
    patches, top_left = rp.rescaled_patch_grid(image, scale_seed, grid_seed, OPTS)
    expected, expected_top_left = rp.sample_patch_grid(rp.rescale_for_grid(image, scale_seed, OPTS), grid_seed, OPTS)
    np.testing.assert_array_equal(top_left, expected_top_left)  # the same geometry
    np.testing.assert_allclose(patches, expected, rtol=0, atol=255 * 1e-4)  # float rounding only


def test_pixelate_resamples_exactly_the_chosen_patches():
  patches = tf.random.uniform([12, 32, 32, 3], 0, 255, seed=3)
  seed = tf.constant([8, 1])
  out = rp.pixelate(patches, seed, 0.5).numpy()
  sizes, chosen = (t.numpy() for t in rp.pixelation_draws(12, 32, seed, 0.5))
  assert 0 < chosen.sum() < 12
  assert sizes.min() >= int(10 * 32 / 96) and sizes.max() <= int(95 * 32 / 96)
  for i in range(12):
    expected = patches[i]
    if chosen[i]:
      small = tf.image.resize(patches[i], [sizes[i], sizes[i]], method="area")
      expected = tf.image.resize(small, [32, 32], method="bilinear")
    np.testing.assert_array_equal(out[i], expected.numpy())


def test_colour_dropping_keeps_the_centred_channel_exactly():
  patches = tf.random.uniform([6, 32, 32, 3], 0, 255, seed=4)
  out = rp.drop_colors(patches, tf.constant([1, 9]), 50.0).numpy()
  for o, x in zip(out, patches.numpy()):
    kept = int(np.argmax(o.std(axis=(0, 1))))
    noise = np.delete(o, kept, axis=-1)
    centred = x[..., kept] - x[..., kept].mean()
    scale = o[..., kept].std() / centred.std()
    np.testing.assert_allclose(o[..., kept], centred * scale, rtol=1e-4, atol=1e-3)
    # The noise channels are U(-0.5, 0.5) (in 256 levels) before the common scaling.
    levels = np.unique(np.round((noise / scale + 0.5) * 256 - 0.5, 3))
    assert levels.min() >= 0 and levels.max() <= 255 and np.allclose(levels, np.round(levels), atol=1e-2)
    assert len(levels) > 250 and abs(np.mean(noise / scale)) < 0.02 and abs(np.var(noise / scale) - 1 / 12) < 0.005


@pytest.mark.parametrize("harmonize", [False, True])
def test_pipeline_and_trunk_inputs_equal_the_reference_preprocessing(photo, harmonize):
  """The pipeline's example (windowed rescale, pixelation) and `trunk_inputs` (the colour step) give
  what rescaling the whole image, cutting the grid and `preprocess_patches` give."""
  task = rp.RelativePositionTask(OPTS, harmonize=harmonize)
  image = tf.image.resize(photo, (150, 220), antialias=True)
  for i in range(3):
    seed = tf.constant([i, 4])
    example = task.example_from_image(image, seed)
    assert set(example) == ({"patches"} if harmonize else {"patches", "colour_keep", "colour_noise"})
    inputs = task.trunk_inputs({k: v[None] for k, v in example.items()}).numpy()
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
    grid, _ = rp.sample_patch_grid(rp.rescale_for_grid(image, seeds[0], OPTS), seeds[1], OPTS)
    expected = task.preprocess_patches(grid, seeds[2]).numpy()
    assert inputs.shape == expected.shape == (9, 32, 32, 3)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(inputs, expected, rtol=0, atol=1e-3 * scale)


def test_colour_step_draws_the_same_noise_under_xla(photo):
  """`trunk_inputs` runs in the train step, which --jit_compile compiles: its random draws must not
  change under XLA (TF's float draws do, its integer draws do not)."""
  task = rp.RelativePositionTask(OPTS)
  examples = [task.example_from_image(photo, tf.constant([i, 8])) for i in range(2)]
  batch = {k: tf.stack([e[k] for e in examples]) for k in examples[0]}
  plain = tf.function(task.trunk_inputs)(batch).numpy()
  compiled = tf.function(task.trunk_inputs, jit_compile=True)(batch).numpy()
  np.testing.assert_allclose(compiled, plain, rtol=1e-4, atol=1e-4 * np.abs(plain).max())
