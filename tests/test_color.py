import numpy as np
import pytest
import skimage.color
import tensorflow as tf

from tests import helpers
from tf_mtssl.model import color
from tf_mtssl.model import preprocessing


def dense_srgb(levels=52):
  """Every combination of `levels` values per channel (levels^3 colours), float64 [N, 1, 3] in [0, 1]."""
  v = np.linspace(0.0, 1.0, levels)
  return np.stack(np.meshgrid(v, v, v, indexing="ij"), axis=-1).reshape(-1, 1, 3)


def test_rgb_to_lab_matches_skimage_on_dense_srgb_sample():
  rgb = dense_srgb()
  ours = color.rgb_to_lab(tf.constant(rgb, tf.float32)).numpy()
  ref = skimage.color.rgb2lab(rgb)
  assert np.abs(ours - ref).max() < 1e-2
  # uint8 input is read as value / 255.
  u8 = np.arange(256, dtype=np.uint8)[:, None, None].repeat(3, axis=-1)
  helpers.assert_close(color.rgb_to_lab(tf.constant(u8)).numpy(), skimage.color.rgb2lab(u8), rtol=1e-4)


def test_lab_to_rgb_matches_skimage_and_round_trips():
  rgb = dense_srgb(40)
  lab = skimage.color.rgb2lab(rgb)
  back = color.lab_to_rgb(tf.constant(lab, tf.float32)).numpy()
  assert np.abs(back - skimage.color.lab2rgb(lab)).max() < 1e-2
  assert np.abs(back - rgb).max() < 1e-3
  round_trip = color.lab_to_rgb(color.rgb_to_lab(tf.constant(rgb, tf.float64))).numpy()
  assert np.abs(round_trip - rgb).max() < 1e-6
  # Out-of-gamut Lab is clipped like skimage (which also clamps negative Z).
  wild = np.array([[[50.0, 120.0, -120.0], [90.0, -100.0, 110.0], [5.0, 0.0, 90.0]]])
  with pytest.warns(UserWarning):  # skimage warns about the clamped Z of the last colour
    expected = skimage.color.lab2rgb(wild)
  helpers.assert_close(color.lab_to_rgb(tf.constant(wild)).numpy(), expected, rtol=1e-2)


def test_conversion_runs_inside_tf_data():
  rgb = dense_srgb(8).reshape(8, 8, 8, 3).astype(np.float32)
  ds = tf.data.Dataset.from_tensor_slices(rgb).map(color.rgb_to_lab, num_parallel_calls=2)
  out = np.stack(list(ds.as_numpy_iterator()))
  helpers.assert_close(out, skimage.color.rgb2lab(rgb.astype(np.float64)), rtol=1e-4)


def test_gray_input_is_lab_lightness_back_to_rgb_with_vgg_mean():
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (2, 9, 7, 3), dtype=np.uint8)
  out = color.to_gray_input(tf.constant(rgb)).numpy()
  assert out.shape == (2, 9, 7, 3) and out.dtype == np.float32
  # paper_spec 2.2: Lab L with a = b = 0, back to RGB, then the VGG mean subtraction.
  lab = skimage.color.rgb2lab(rgb)
  lab[..., 1:] = 0.0
  expected = skimage.color.lab2rgb(lab) * 255.0 - np.array(preprocessing.VGG_RGB_MEAN)
  assert np.abs(out - expected).max() < 0.05
  # The three channels of the gray image are equal.
  shown = preprocessing.trunk_input_to_rgb(out).numpy()
  assert np.abs(shown - shown[..., :1]).max() < 1e-4


def test_gray_input_keeps_a_gray_image_and_accepts_one_channel():
  gray = np.arange(0, 256, 5, dtype=np.uint8).reshape(1, -1, 1)
  one_channel = color.to_gray_input(tf.constant(gray)).numpy()
  three_channel = color.to_gray_input(tf.constant(np.repeat(gray, 3, axis=-1))).numpy()
  helpers.assert_close(one_channel, three_channel, rtol=1e-6)
  expected = gray.astype(np.float32) - np.array(preprocessing.VGG_RGB_MEAN, np.float32)
  assert np.abs(one_channel - expected).max() < 0.05  # gray in, the same gray out


def test_ensure_rgb():
  rgba = tf.constant(np.full((2, 2, 4), 7, np.uint8))
  assert color.ensure_rgb(rgba).shape == (2, 2, 3)
  with pytest.raises(ValueError, match="1, 3 or 4 channels"):
    color.ensure_rgb(tf.zeros([2, 2, 2]))
