"""The trunk's input convention (paper_spec 2.2): RGB in [0, 255] minus the VGG channel means."""

import tensorflow as tf

# paper_spec 2.2 / S1: "VGG-style" per-channel RGB means; no std division.
VGG_RGB_MEAN = (123.68, 116.779, 103.939)


def rgb_to_trunk_input(rgb: tf.Tensor) -> tf.Tensor:
  """uint8 or float RGB in [0, 255], any leading dims -> float32 mean-subtracted trunk input."""
  return tf.cast(rgb, tf.float32) - tf.constant(VGG_RGB_MEAN, tf.float32)


def trunk_input_to_rgb(x: tf.Tensor) -> tf.Tensor:
  """Inverse of `rgb_to_trunk_input`, for display: float RGB in [0, 1]."""
  return tf.clip_by_value((tf.cast(x, tf.float32) + tf.constant(VGG_RGB_MEAN, tf.float32)) / 255.0, 0.0, 1.0)


def random_crop_resize(image: tf.Tensor, size: int, seed: tf.Tensor, min_scale: float = 0.35) -> tf.Tensor:
  """Random square crop covering [min_scale, 1] of the shorter side, resized to `size`, random flip.

  Stateless (seed: int32/int64 [2]) so pipelines are reproducible. uint8 in -> float32 [0, 255] out.
  """
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  short = tf.minimum(h, w)
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4)
  scale = tf.random.stateless_uniform([], seeds[0], min_scale, 1.0)
  crop = tf.maximum(1, tf.cast(tf.cast(short, tf.float32) * scale, tf.int32))
  y = tf.random.stateless_uniform([], seeds[1], 0, h - crop + 1, dtype=tf.int32)
  x = tf.random.stateless_uniform([], seeds[2], 0, w - crop + 1, dtype=tf.int32)
  patch = image[y:y + crop, x:x + crop]
  patch = tf.image.resize(patch, [size, size], method="bilinear", antialias=True)
  flip = tf.random.stateless_uniform([], seeds[3]) < 0.5
  return tf.cond(flip, lambda: tf.image.flip_left_right(patch), lambda: patch)
