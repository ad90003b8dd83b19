"""CIE Lab conversion in TensorFlow, and the gray trunk input of colorization (paper_spec 2.2, 3.2).

One place for colour science (used by colorization, harmonized relative position, the colorization
prior and the ab bin set). Pure TF ops on any leading dims, so every function runs inside `tf.data`
maps and `tf.function`s.

Conventions follow `skimage.color` (paper_spec 3.2: Zhang et al. use skimage `rgb2lab`), so Lab
values match theirs: sRGB with the IEC 61966-2-1 transfer curve, the skimage sRGB -> XYZ matrix,
reference white D65 / 2 degree observer (0.95047, 1, 1.08883) and the CIE 1976 L*a*b* formulas with
skimage's constants (0.008856, 7.787). L is in [0, 100]; a and b of sRGB colours lie within about
[-87, 99] x [-108, 95].
"""

import numpy as np
import tensorflow as tf

from tf_mtssl.model import preprocessing

# skimage.color.colorconv.xyz_from_rgb (sRGB primaries, D65).
XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                         [0.212671, 0.715160, 0.072169],
                         [0.019334, 0.119193, 0.950227]], np.float64)
RGB_FROM_XYZ = np.linalg.inv(XYZ_FROM_RGB)
D65_WHITE = np.array([0.95047, 1.0, 1.08883], np.float64)  # skimage xyz_tristimulus_values D65, "2"

_SRGB_THRESHOLD = 0.04045      # sRGB-encoded value where the curve turns linear
_LINEAR_THRESHOLD = 0.0031308  # the same point on the linear side
_LAB_EPSILON = 0.008856        # (6/29)^3 as skimage rounds it
_LAB_KAPPA = 7.787             # slope of the linear part of f, as skimage rounds it
_LAB_EPSILON_F = 0.2068966     # f(epsilon) = 6/29: where the inverse of f turns linear


def _float(x: tf.Tensor) -> tf.Tensor:
  x = tf.convert_to_tensor(x)
  return x if x.dtype in (tf.float32, tf.float64) else tf.cast(x, tf.float32)


def _matmul_last(x: tf.Tensor, matrix: np.ndarray) -> tf.Tensor:
  """x[..., 3] @ matrix.T over the channel axis."""
  return tf.linalg.matvec(tf.constant(matrix, x.dtype), x)


def ensure_rgb(image: tf.Tensor) -> tf.Tensor:
  """[..., 1] gray -> [..., 3] by replication; [..., 4] RGBA -> RGB; [..., 3] unchanged.

  The channel count must be known statically; anything else raises naming it.
  """
  image = tf.convert_to_tensor(image)
  channels = image.shape[-1]
  if channels == 3:
    return image
  if channels == 1:
    return tf.repeat(image, 3, axis=-1)
  if channels == 4:
    return image[..., :3]
  raise ValueError(f"Expected an image with 1, 3 or 4 channels (static last dim), got shape {image.shape}")


def srgb_to_linear(rgb: tf.Tensor) -> tf.Tensor:
  """sRGB-encoded values in [0, 1] -> linear light."""
  rgb = _float(rgb)
  curved = tf.pow((tf.maximum(rgb, _SRGB_THRESHOLD) + 0.055) / 1.055, 2.4)
  return tf.where(rgb > _SRGB_THRESHOLD, curved, rgb / 12.92)


def linear_to_srgb(linear: tf.Tensor) -> tf.Tensor:
  """Linear light -> sRGB-encoded values (not clipped)."""
  linear = _float(linear)
  curved = 1.055 * tf.pow(tf.maximum(linear, _LINEAR_THRESHOLD), 1.0 / 2.4) - 0.055
  return tf.where(linear > _LINEAR_THRESHOLD, curved, linear * 12.92)


def rgb_to_lab(rgb: tf.Tensor) -> tf.Tensor:
  """sRGB [..., 3] -> CIE Lab [..., 3] (L in [0, 100]), as `skimage.color.rgb2lab`.

  Args:
    rgb: uint8 in [0, 255], or float in [0, 1] (float32 or float64; other dtypes become float32).
  """
  rgb = tf.convert_to_tensor(rgb)
  if rgb.dtype == tf.uint8:
    rgb = tf.cast(rgb, tf.float32) / 255.0
  rgb = _float(rgb)
  xyz = _matmul_last(srgb_to_linear(rgb), XYZ_FROM_RGB) / tf.constant(D65_WHITE, rgb.dtype)
  f = tf.where(xyz > _LAB_EPSILON, tf.pow(tf.maximum(xyz, _LAB_EPSILON), 1.0 / 3.0),
               _LAB_KAPPA * xyz + 16.0 / 116.0)
  fx, fy, fz = tf.unstack(f, axis=-1)
  return tf.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def lab_to_rgb(lab: tf.Tensor, clip: bool = True) -> tf.Tensor:
  """CIE Lab [..., 3] -> sRGB in [0, 1], as `skimage.color.lab2rgb` (Z < 0 clamped to 0 like skimage).

  Args:
    lab: float Lab.
    clip: clip to [0, 1] (skimage always does); False keeps out-of-gamut values visible.
  """
  lab = _float(lab)
  lightness, a, b = tf.unstack(lab, axis=-1)
  fy = (lightness + 16.0) / 116.0
  f = tf.stack([a / 500.0 + fy, fy, tf.maximum(fy - b / 200.0, 0.0)], axis=-1)
  xyz = tf.where(f > _LAB_EPSILON_F, tf.pow(f, 3.0), (f - 16.0 / 116.0) / _LAB_KAPPA)
  rgb = linear_to_srgb(_matmul_last(xyz * tf.constant(D65_WHITE, lab.dtype), RGB_FROM_XYZ))
  return tf.clip_by_value(rgb, 0.0, 1.0) if clip else rgb


def lightness_to_rgb(lightness: tf.Tensor) -> tf.Tensor:
  """L [..., 1] (or [...]) -> the gray sRGB [..., 3] in [0, 1] of Lab (L, 0, 0)."""
  lightness = _float(lightness)
  if lightness.shape.rank and lightness.shape[-1] == 1:
    lightness = lightness[..., 0]
  zeros = tf.zeros_like(lightness)
  return lab_to_rgb(tf.stack([lightness, zeros, zeros], axis=-1))


def lightness_to_gray_input(lightness: tf.Tensor) -> tf.Tensor:
  """L [..., 1] -> the trunk's gray input [..., 3] (paper_spec 2.2, see `to_gray_input`)."""
  return preprocessing.rgb_to_trunk_input(255.0 * lightness_to_rgb(lightness))


def to_gray_input(rgb: tf.Tensor) -> tf.Tensor:
  """The grayscale trunk input of colorization and harmonized relative position (paper_spec 2.2, 6).

  RGB -> Lab, keep L, set a = b = 0, back to RGB (a gray image whose three channels are equal),
  then the same VGG mean subtraction as RGB inputs (`preprocessing.rgb_to_trunk_input`), so conv1
  always sees 3 channels with matching statistics [I: paper_spec 2.2].

  Args:
    rgb: uint8 or float RGB in [0, 255] (the trunk convention), any leading dims; 1 (gray) or
      4 (RGBA) channels are accepted and converted.
  Returns:
    float32 [..., 3].
  """
  rgb = ensure_rgb(rgb)
  rgb01 = tf.cast(rgb, tf.float32) / 255.0
  return lightness_to_gray_input(rgb_to_lab(rgb01)[..., :1])
