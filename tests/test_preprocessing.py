"""Shared image preprocessing: the windowed antialiased resize and the random square crop."""

import numpy as np
import pytest
import skimage.data
import tensorflow as tf

from tf_mtssl.model import preprocessing


@pytest.fixture(scope="module")
def photo():
  return tf.constant(skimage.data.astronaut()[::2, ::3])  # 256 x 171, uint8


@pytest.mark.parametrize("size", [(620, 410), (400, 300), (90, 61), (256, 400)])  # up, near 1, down, mixed
def test_resize_window_equals_the_slice_of_the_whole_resize(photo, size):
  full = tf.image.resize(photo, size, method="bilinear", antialias=True).numpy()
  rng = np.random.default_rng(sum(size))
  windows = [((0, 0), size), ((0, 0), (size[0] // 3, size[1] // 4))]  # whole image, a corner
  for _ in range(4):  # interior and far-border windows
    extent = (int(rng.integers(1, size[0] + 1)), int(rng.integers(1, size[1] + 1)))
    windows.append(((int(rng.integers(0, size[0] - extent[0] + 1)), int(rng.integers(0, size[1] - extent[1] + 1))),
                    extent))
  for begin, extent in windows:
    out = preprocessing.resize_window(photo, tf.constant(size), tf.constant(begin), tf.constant(extent)).numpy()
    expected = full[begin[0]:begin[0] + extent[0], begin[1]:begin[1] + extent[1]]
    assert out.shape == expected.shape and out.dtype == np.float32
    # Float rounding of the shifted sample positions only: 1e-4 of the [0, 255] range.
    np.testing.assert_allclose(out, expected, rtol=0, atol=255 * 1e-4)


def test_random_crop_resize_is_its_crop_then_resize_and_flip(photo):
  for i in range(6):
    seed = tf.constant([i, 5])
    y, x, side, flip = (t.numpy() for t in preprocessing.random_square_crop(tf.shape(photo), seed, 0.5))
    assert 0.5 * 171 - 1 <= side <= 171 and 0 <= y <= 256 - side and 0 <= x <= 171 - side
    expected = tf.image.resize(photo[y:y + side, x:x + side], [48, 48], method="bilinear", antialias=True).numpy()
    if flip:
      expected = expected[:, ::-1]
    np.testing.assert_array_equal(preprocessing.random_crop_resize(photo, 48, seed, 0.5).numpy(), expected)
