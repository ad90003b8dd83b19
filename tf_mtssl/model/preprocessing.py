"""The trunk's input conventions, and the random crops of the pretraining pipelines.

A trunk expects its RGB input normalised the way it was trained. The convention is a recorded property
of a run (`checkpoints.input_convention`, `run_config.json` key "preprocessing") that every consumer
applies: the evaluations, the export's serving signatures and, through them, the server.
  vgg        RGB in [0, 255] minus the per-channel ImageNet means, no std division (paper_spec 2.2;
             the authors' released model, S1): every tf_mtssl pretraining run;
  inception  RGB scaled to [-1, 1] (x / 127.5 - 1): tf-slim's ImageNet classification checkpoints
             (the "INet Labels" baseline, paper_spec 7.4), trained with slim's inception preprocessing.
"""

import tensorflow as tf

# paper_spec 2.2 / S1: "VGG-style" per-channel RGB means; no std division.
VGG_RGB_MEAN = (123.68, 116.779, 103.939)
VGG, INCEPTION = "vgg", "inception"
INPUT_CONVENTIONS = {
    VGG: f"RGB [0, 255] minus VGG means {list(VGG_RGB_MEAN)} (paper_spec 2.2)",
    INCEPTION: "RGB [0, 255] scaled to [-1, 1] (x / 127.5 - 1; tf-slim ImageNet models)",
}
DEFAULT_CONVENTION = VGG  # what pretraining uses (paper_spec 2.2)


def check_convention(convention: str) -> str:
  """Returns `convention` if known, else raises ValueError naming the known ones."""
  if convention not in INPUT_CONVENTIONS:
    raise ValueError(f"Unknown input convention (preprocessing) {convention!r}; choose one of "
                     f"{sorted(INPUT_CONVENTIONS)}")
  return convention


def rgb_to_trunk_input(rgb: tf.Tensor, convention: str = DEFAULT_CONVENTION) -> tf.Tensor:
  """uint8 or float RGB in [0, 255], any leading dims -> float32 trunk input of `convention`."""
  rgb = tf.cast(rgb, tf.float32)
  if check_convention(convention) == INCEPTION:
    return rgb / 127.5 - 1.0
  return rgb - tf.constant(VGG_RGB_MEAN, tf.float32)


def trunk_input_to_rgb(x: tf.Tensor, convention: str = DEFAULT_CONVENTION) -> tf.Tensor:
  """Inverse of `rgb_to_trunk_input`, for display: float RGB in [0, 1]."""
  x = tf.cast(x, tf.float32)
  if check_convention(convention) == INCEPTION:
    rgb = (x + 1.0) * 127.5
  else:
    rgb = x + tf.constant(VGG_RGB_MEAN, tf.float32)
  return tf.clip_by_value(rgb / 255.0, 0.0, 1.0)


def random_square_crop(image_hw: tf.Tensor, seed: tf.Tensor, min_scale: float = 0.35):
  """The random choices of `random_crop_resize` for an image of shape `image_hw`: the square crop's
  top-left y, x and side (int32 scalars; the side covers [min_scale, 1] of the shorter side) and
  whether to flip (bool scalar)."""
  h, w = image_hw[0], image_hw[1]
  short = tf.minimum(h, w)
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4)
  scale = tf.random.stateless_uniform([], seeds[0], min_scale, 1.0)
  crop = tf.maximum(1, tf.cast(tf.cast(short, tf.float32) * scale, tf.int32))
  y = tf.random.stateless_uniform([], seeds[1], 0, h - crop + 1, dtype=tf.int32)
  x = tf.random.stateless_uniform([], seeds[2], 0, w - crop + 1, dtype=tf.int32)
  return y, x, crop, tf.random.stateless_uniform([], seeds[3]) < 0.5


def resize_and_flip(patch: tf.Tensor, size: int, flip: tf.Tensor) -> tf.Tensor:
  """The second half of `random_crop_resize`: `patch` resized to `size` (bilinear, antialiased),
  mirrored left-right where `flip`."""
  patch = tf.image.resize(patch, [size, size], method="bilinear", antialias=True)
  return tf.cond(flip, lambda: tf.image.flip_left_right(patch), lambda: patch)


def random_crop_resize(image: tf.Tensor, size: int, seed: tf.Tensor, min_scale: float = 0.35) -> tf.Tensor:
  """Random square crop covering [min_scale, 1] of the shorter side, resized to `size`, random flip.

  Stateless (seed: int32/int64 [2]) so pipelines are reproducible. uint8 in -> float32 [0, 255] out.
  """
  y, x, crop, flip = random_square_crop(tf.shape(image), seed, min_scale)
  return resize_and_flip(image[y:y + crop, x:x + crop], size, flip)


def resize_window(image: tf.Tensor, size: tf.Tensor, begin: tf.Tensor, extent: tf.Tensor) -> tf.Tensor:
  """Pixels [begin, begin + extent) (y, x) of `tf.image.resize(image, size, "bilinear", antialias=True)`,
  computing only those.

  The same filter that resize runs (ScaleAndTranslate, triangle kernel, antialiased) is applied to the
  input rows and columns the window reads (its kernel support plus 2 px), translated so that every
  output pixel samples the same input position. Equal to resizing the whole image and slicing, up to
  float rounding (|diff| < 1e-2 on [0, 255] values), at the window's share of the cost.

  Args:
    image: [H, W, C] uint8 or float.
    size: int32 [2], the size of the whole resized image.
    begin, extent: int32 [2], the window in the resized image (inside [0, size)).
  Returns:
    float32 [extent[0], extent[1], C].
  """
  in_hw = tf.shape(image)[:2]
  scale = tf.cast(size, tf.float32) / tf.cast(in_hw, tf.float32)
  support = tf.maximum(1.0 / scale, 1.0)  # the triangle's radius 1, stretched when downscaling
  first = tf.cast(begin, tf.float32)
  last = tf.cast(begin + extent, tf.float32)
  lo = tf.clip_by_value(tf.cast(tf.floor(first / scale - support), tf.int32) - 2, 0, in_hw)
  hi = tf.clip_by_value(tf.cast(tf.math.ceil(last / scale + support), tf.int32) + 2, 0, in_hw)
  window = image[lo[0]:hi[0], lo[1]:hi[1]]
  # Output pixel j samples input (j + 0.5 - t) / scale - 0.5 of the window; t = lo * scale - begin
  # makes that the input position of resized pixel begin + j.
  translation = tf.cast(lo, tf.float32) * scale - first
  return tf.raw_ops.ScaleAndTranslate(images=window[None], size=tf.cast(extent, tf.int32), scale=scale,
                                      translation=translation, kernel_type="triangle", antialias=True)[0]
