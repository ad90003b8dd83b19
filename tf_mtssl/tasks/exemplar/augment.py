"""Exemplar augmentations (paper_spec 3.3, C5: Dosovitskiy et al. 2014) in core TF ops.

One source image gives `num_views` views; every view is an independent random draw of
  geometry   translation (+-0.2 of the seed patch), scaling (x0.7-1.4), rotation (+-20 deg) and a
             horizontal flip, applied in ONE bilinear resampling (`ImageProjectiveTransformV3`) of
             the seed patch's neighbourhood, straight to `size` x `size`;
  contrast 1 every pixel's projection on the principal colour components of the source image's
             pixels is scaled by a factor in [0.5, 2] (independent per component);
  contrast 2 HSV saturation and value raised to a power in [0.25, 4], multiplied by [0.7, 1.4] and
             shifted by [-0.1, 0.1] (independent draws for S and V [I]);
  hue        shifted by [-0.1, 0.1] (in turns of the colour circle).
The seed patch (the "surrogate class" of C5) is one random square per source image, shared by its
views, with side `seed_crop_fraction` x the shorter image side [I: C5 used 32-px seeds of
96-px-plus images; the paper's crop is unknown]. Out-of-image samples reflect the image, so rotated
and shrunk views have no constant-colour corners.

Factor ranges symmetric in log space (scale, contrast, power, multiplier) are sampled log-uniformly so
that x and 1/x are equally likely [I: C5 gives only the ranges]. Everything is drawn with stateless
random ops from one seed per source image, so a pipeline is reproducible.
"""

import dataclasses
import math
from typing import Tuple

import tensorflow as tf

# A source image whose canvas would be downscaled by less than this is sampled directly by the
# projective transform (its bilinear step stays < 1 / (0.8 * 0.7) = 1.8 px at the strongest zoom-out);
# larger images are first shrunk with an anti-aliased resize, so views do not alias.
_MIN_UNFILTERED_SCALE = 0.8
# Pixels used to estimate the principal colour components (a strided subsample of the canvas).
_PCA_PIXELS = 4096


@dataclasses.dataclass(frozen=True)
class ExemplarAugmentation:
  """Ranges of the exemplar augmentations (paper_spec 3.3 / C5 unless marked [I])."""
  seed_crop_fraction: float = 0.6        # [I] seed patch side / shorter image side
  max_translation: float = 0.2           # C5: shift within 0.2 of the patch size, per axis
  scale_range: Tuple[float, float] = (0.7, 1.4)
  max_rotation_degrees: float = 20.0
  pca_contrast_range: Tuple[float, float] = (0.5, 2.0)   # "contrast 1"
  hsv_power_range: Tuple[float, float] = (0.25, 4.0)     # "contrast 2"
  hsv_factor_range: Tuple[float, float] = (0.7, 1.4)
  hsv_max_shift: float = 0.1
  max_hue_shift: float = 0.1
  flip: bool = True

  def __post_init__(self):
    if not 0.0 < self.seed_crop_fraction <= 1.0:
      raise ValueError(f"seed_crop_fraction must be in (0, 1], got {self.seed_crop_fraction}")
    for name in ("scale_range", "pca_contrast_range", "hsv_power_range", "hsv_factor_range"):
      lo, hi = getattr(self, name)
      if not 0.0 < lo <= hi:
        raise ValueError(f"{name} must satisfy 0 < low <= high, got {(lo, hi)}")
    for name in ("max_translation", "max_rotation_degrees", "hsv_max_shift", "max_hue_shift"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def _log_uniform(shape, seed, lo: float, hi: float) -> tf.Tensor:
  return tf.exp(tf.random.stateless_uniform(shape, seed, math.log(lo), math.log(hi)))


def view_transforms(seed: tf.Tensor, num_views: int, canvas_hw: tf.Tensor, size: int,
                    params: ExemplarAugmentation) -> tf.Tensor:
  """Random projective transforms (output pixel -> canvas pixel), float32 [num_views, 8].

  The seed patch (side `seed_crop_fraction` x the canvas' shorter side) lies at a random place in the
  canvas; each view is centred on it plus a translation, and maps `size` output pixels onto
  seed_side / scale canvas pixels, rotated and optionally mirrored about the view centre.
  """
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 6)
  hw = tf.cast(canvas_hw, tf.float32)
  seed_side = params.seed_crop_fraction * tf.reduce_min(hw)
  # Pixel centres are at integer coordinates: the seed centre keeps the whole seed inside the canvas.
  low = (seed_side - 1.0) / 2.0
  centre_yx = low + tf.random.stateless_uniform([2], seeds[0]) * (hw - 1.0 - 2.0 * low)
  shift_yx = tf.random.stateless_uniform([num_views, 2], seeds[1], -params.max_translation,
                                         params.max_translation) * seed_side
  scale = _log_uniform([num_views], seeds[2], *params.scale_range)
  max_angle = math.radians(params.max_rotation_degrees)
  angle = tf.random.stateless_uniform([num_views], seeds[3], -max_angle, max_angle)
  if params.flip:
    mirror = tf.where(tf.random.stateless_uniform([num_views], seeds[4]) < 0.5, -1.0, 1.0)
  else:
    mirror = tf.ones([num_views])
  step = seed_side / (float(size) * scale)  # canvas pixels per output pixel
  cos, sin = tf.cos(angle) * step, tf.sin(angle) * step
  a0, a1 = cos * mirror, -sin
  b0, b1 = sin * mirror, cos
  c = (size - 1) / 2.0
  cy = centre_yx[0] + shift_yx[:, 0]
  cx = centre_yx[1] + shift_yx[:, 1]
  zeros = tf.zeros([num_views])
  return tf.stack([a0, a1, cx - (a0 + a1) * c, b0, b1, cy - (b0 + b1) * c, zeros, zeros], axis=1)


def affine_views(canvas: tf.Tensor, transforms: tf.Tensor, size: int) -> tf.Tensor:
  """Resamples `canvas` [H, W, C] once per row of `transforms` [V, 8] -> [V, size, size, C].

  Bilinear, reflecting at the borders (see module docstring); same dtype as `canvas` (uint8 results
  are truncated, not rounded, by the op).
  """
  transforms = tf.cast(transforms, tf.float32)

  def warp(images, rows):
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=rows, output_shape=tf.constant([size, size], tf.int32),
        fill_value=tf.constant(0.0, tf.float32), interpolation="BILINEAR", fill_mode="REFLECT")

  if transforms.shape[0] is not None:
    # One op per view on the shared canvas: the op pairs image i with transform i, and tiling the
    # canvas V times cost a fifth of the warp (bench.input_pipeline).
    return tf.concat([warp(canvas[None], transforms[i:i + 1]) for i in range(transforms.shape[0])], axis=0)
  return warp(tf.tile(canvas[None], tf.stack([tf.shape(transforms)[0], 1, 1, 1])), transforms)


def principal_colour_components(image: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  """Mean colour [3] and principal components (columns of a 3x3 orthonormal matrix) of the pixels of
  `image` [H, W, 3] (uint8, or float in [0, 1]; statistics in [0, 1] units), estimated on a strided
  subsample of at most ~_PCA_PIXELS pixels."""
  shape = tf.shape(image)
  stride = tf.maximum(1, tf.cast(tf.sqrt(tf.cast(shape[0] * shape[1], tf.float32) / _PCA_PIXELS), tf.int32))
  pixels = tf.reshape(tf.image.convert_image_dtype(image[::stride, ::stride], tf.float32), [-1, 3])
  mean = tf.reduce_mean(pixels, axis=0)
  centred = pixels - mean
  cov = tf.matmul(centred, centred, transpose_a=True) / tf.cast(tf.shape(pixels)[0], tf.float32)
  _, vectors = tf.linalg.eigh(cov)  # symmetric PSD: orthonormal eigenvectors even if degenerate
  return mean, vectors


def pca_mixing(mean: tf.Tensor, components: tf.Tensor, factors: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  """"Contrast 1" as one affine colour map per view, x -> x M + offset (x a row of RGB values):
  M = E diag(f_v) E^T and offset = mean - mean M, for mean [3], components E [3, 3], factors [V, 3].
  Returns (M [V, 3, 3], offset [V, 3])."""
  mixing = tf.einsum("ij,vj,kj->vik", components, factors, components)  # symmetric [V, 3, 3]
  return mixing, mean - tf.einsum("i,vik->vk", mean, mixing)


def mix_colours(views: tf.Tensor, mixing: tf.Tensor, offset: tf.Tensor) -> tf.Tensor:
  """views [V, H, W, 3] -> views M_v + offset_v: a batched [V, H*W, 3] x [V, 3, 3] matmul."""
  shape = tf.shape(views)
  mixed = tf.matmul(tf.reshape(views, tf.stack([shape[0], -1, 3])), mixing)
  return tf.reshape(mixed, shape) + offset[:, None, None, :]


def pca_contrast(views: tf.Tensor, mean: tf.Tensor, components: tf.Tensor, factors: tf.Tensor) -> tf.Tensor:
  """"Contrast 1": x -> mean + E diag(f_v) E^T (x - mean) for views [V, H, W, 3], factors [V, 3]."""
  return mix_colours(views, *pca_mixing(mean, components, factors))


def hsv_jitter(views: tf.Tensor, power: tf.Tensor, factor: tf.Tensor, shift: tf.Tensor,
               hue_shift: tf.Tensor) -> tf.Tensor:
  """"Contrast 2" and hue shift on views float [V, H, W, 3] in [0, 1].

  power, factor, shift: [V, 2], for (saturation, value): c -> clip(c ** power * factor + shift, 0, 1).
  hue_shift: [V], added to the hue modulo 1.
  """
  hsv = tf.image.rgb_to_hsv(tf.clip_by_value(views, 0.0, 1.0))
  hue, sv = hsv[..., :1], hsv[..., 1:]
  b = lambda t: t[:, None, None, :]  # noqa: E731 - [V, k] -> broadcast over pixels
  sv = tf.clip_by_value(tf.pow(sv, b(power)) * b(factor) + b(shift), 0.0, 1.0)
  hue = tf.math.floormod(hue + hue_shift[:, None, None, None], 1.0)
  return tf.image.hsv_to_rgb(tf.concat([hue, sv], axis=-1))


def _canvas(image: tf.Tensor, size: int, params: ExemplarAugmentation) -> tf.Tensor:
  """The uint8 image, shrunk (anti-aliased) when its seed patch is much larger than a view."""
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = float(size) / (params.seed_crop_fraction * tf.reduce_min(hw))
  if image.dtype != tf.uint8:
    image = tf.cast(tf.round(tf.clip_by_value(tf.cast(image, tf.float32), 0.0, 255.0)), tf.uint8)

  def shrink():
    new_hw = tf.cast(tf.maximum(tf.round(hw * scale), 1.0), tf.int32)
    small = tf.image.resize(image, new_hw, method="bilinear", antialias=True)
    return tf.cast(tf.round(tf.clip_by_value(small, 0.0, 255.0)), tf.uint8)

  return tf.cond(scale < _MIN_UNFILTERED_SCALE, shrink, lambda: image)


# The colour draws of the views of one image, [num_views, ...] each: what `colour_views` applies.
COLOUR_KEYS = ("colour_mixing", "colour_offset", "hsv_power", "hsv_factor", "hsv_shift", "hue_shift")


def exemplar_geometry(image: tf.Tensor, seed: tf.Tensor, num_views: int, size: int,
                      params: ExemplarAugmentation = ExemplarAugmentation()):
  """The geometric half of `exemplar_views`: the warped views before any colour change, and the
  colour draws that `colour_views` applies to them (the draws need the source image's colour PCA).

  The input pipeline stops here and the model applies the colours (`ExemplarTask.trunk_inputs`):
  the colour changes are pixel-wise float work on every view (HSV round trip, 3x3 mixing), most of
  this pipeline's CPU cost (bench.input_pipeline) and cheap on an accelerator.

  Returns:
    views: uint8 [num_views, size, size, 3]; colour: {key: float32 [num_views, ...]} for COLOUR_KEYS.
  """
  if num_views < 1 or size < 1:
    raise ValueError(f"num_views and size must be >= 1, got {num_views}, {size}")
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 7)
  canvas = _canvas(image, size, params)
  transforms = view_transforms(seeds[0], num_views, tf.shape(canvas)[:2], size, params)
  views = tf.ensure_shape(affine_views(canvas, transforms, size), [num_views, size, size, 3])
  mean, components = principal_colour_components(canvas)
  mixing, offset = pca_mixing(mean, components, _log_uniform([num_views, 3], seeds[1], *params.pca_contrast_range))
  colour = {
      "colour_mixing": mixing, "colour_offset": offset,
      "hsv_power": _log_uniform([num_views, 2], seeds[2], *params.hsv_power_range),
      "hsv_factor": _log_uniform([num_views, 2], seeds[3], *params.hsv_factor_range),
      "hsv_shift": tf.random.stateless_uniform([num_views, 2], seeds[4], -params.hsv_max_shift,
                                               params.hsv_max_shift),
      "hue_shift": tf.random.stateless_uniform([num_views], seeds[5], -params.max_hue_shift, params.max_hue_shift),
  }
  return tf.cast(views, tf.uint8), colour


def colour_views(views: tf.Tensor, colour) -> tf.Tensor:
  """The colour half of `exemplar_views`: contrast 1, contrast 2 and hue on uint8 views [..., S, S, 3]
  with the draws `colour` ({key: [..., k]} for COLOUR_KEYS, the same leading dims); uint8 out."""
  shape = tf.shape(views)
  flat = lambda t, *rest: tf.reshape(t, [-1, *rest])  # noqa: E731 - leading dims -> one view axis
  x = tf.cast(flat(views, shape[-3], shape[-2], 3), tf.float32) / 255.0
  x = mix_colours(x, flat(colour["colour_mixing"], 3, 3), flat(colour["colour_offset"], 3))
  x = hsv_jitter(x, power=flat(colour["hsv_power"], 2), factor=flat(colour["hsv_factor"], 2),
                 shift=flat(colour["hsv_shift"], 2), hue_shift=flat(colour["hue_shift"]))
  # Rounded to uint8 as the views were when the pipeline made them: the same trunk inputs.
  return tf.reshape(tf.cast(tf.round(tf.clip_by_value(x, 0.0, 1.0) * 255.0), tf.uint8), shape)


def exemplar_views(image: tf.Tensor, seed: tf.Tensor, num_views: int, size: int,
                   params: ExemplarAugmentation = ExemplarAugmentation()) -> tf.Tensor:
  """The exemplar views of one source image: `colour_views(*exemplar_geometry(...))`.

  Args:
    image: uint8 [H, W, 3] (or float in [0, 255]).
    seed: int [2] stateless seed; equal seeds give equal views.
    num_views: views per image (paper_spec 3.3: 8).
    size: side of the square views.
    params: augmentation ranges.
  Returns:
    uint8 [num_views, size, size, 3].
  """
  views, colour = exemplar_geometry(image, seed, num_views, size, params)
  return colour_views(views, colour)
