"""The 313 ab bins of colorization and the soft encoding of ab targets (paper_spec 3.2).

The bin set (`ab_bin_centers`) is Zhang's `pts_in_hull.npy` (the same 313 points, in the same order,
are printed in OpenCV's `samples/dnn/colorization.cpp`). It is derived here by a rule that reproduces
that set exactly [I: found by us, not stated by Zhang]: a point c of the step-10 ab grid is a bin iff
the square c + [-10, 10]^2 (one grid step around c, L-infinity) meets the convex hull of the ab values
of all 8-bit sRGB colours. (Any half-width in [9.74, 10.06] gives the same 313 points; one grid step
is the natural choice inside that interval.) Bins are sorted by (a, b), Zhang's order, so his
`prior_probs.npy` can be used as a prior file.

Soft encoding (paper_spec 3.2): each target pixel gets its k = 5 nearest bins, weighted by
exp(-d^2 / 2 sigma^2), sigma = 5, normalised to sum 1. It is cheap: a table over the integer ab plane
(`neighbour_table`) gives the k nearest bins of the rounded ab value (one gather), and only the k
exact distances are computed, so the weights are exact for those bins (no 313-way distance per
pixel).
"""

import functools
from typing import Dict, Tuple

import cv2
import numpy as np
import tensorflow as tf

from tf_mtssl.model import color

NUM_BINS = 313         # paper_spec 3.2: Q = 313 in-gamut bins
BIN_STEP = 10.0        # paper_spec 3.2: grid size 10 in ab
TARGET_STRIDE = 8      # paper_spec 3.2 [R]: this paper predicts at stride 8
# Target ab is sampled at the centre of each 8x8 cell [I: Zhang takes offset 0 at stride 4].
TARGET_OFFSET = TARGET_STRIDE // 2
# The table of nearest bins covers the integer ab plane [-128, 127]^2 (sRGB ab lies in about
# [-87, 99] x [-108, 95]; values outside are clamped to the border).
LUT_MIN = -128
LUT_SIZE = 256


# ---------------------------------------------------------------------------------------------------
# The 313 ab bins.


def rgb_cube_surface(levels: int = 256) -> np.ndarray:
  """All 8-bit sRGB colours on the surface of the RGB cube, float64 [6 * levels^2, 3] in [0, 1].

  The ab image of the cube's interior lies inside the image of its surface (Lab is a continuous
  bijection of the cube and projection to ab keeps the outline), so the surface has the same ab hull
  as all 256^3 colours at 1/40 of the cost (checked against all colours when the rule was found).
  """
  v = np.arange(levels, dtype=np.float64) / (levels - 1)
  u, w = [g.ravel() for g in np.meshgrid(v, v, indexing="ij")]
  faces = []
  for channel in range(3):
    others = [c for c in range(3) if c != channel]
    for value in (0.0, 1.0):
      face = np.empty((u.size, 3))
      face[:, channel] = value
      face[:, others[0]] = u
      face[:, others[1]] = w
      faces.append(face)
  return np.concatenate(faces)


def _convex_polygon(points: np.ndarray) -> np.ndarray:
  """Convex hull vertices of 2-D points, counter-clockwise in (a, b), float64 [V, 2]."""
  hull = cv2.convexHull(np.ascontiguousarray(points, np.float32)).reshape(-1, 2).astype(np.float64)
  x, y = hull[:, 0], hull[:, 1]
  area2 = np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y)
  return hull if area2 > 0 else hull[::-1]


def _inside_convex_polygon(points: np.ndarray, polygon: np.ndarray, tol: float = 1e-6) -> np.ndarray:
  """bool [N]: points [N, 2] inside or on the counter-clockwise convex polygon [V, 2]."""
  edges = np.roll(polygon, -1, axis=0) - polygon                     # [V, 2]
  rel = points[:, None, :] - polygon[None, :, :]                     # [N, V, 2]
  cross = edges[None, :, 0] * rel[..., 1] - edges[None, :, 1] * rel[..., 0]
  signed_dist = cross / np.linalg.norm(edges, axis=1)[None, :]
  return np.all(signed_dist >= -tol, axis=1)


@functools.lru_cache(maxsize=1)
def _derived_bin_centers() -> np.ndarray:
  ab = color.rgb_to_lab(tf.constant(rgb_cube_surface(), tf.float64)).numpy()[:, 1:]
  gamut = _convex_polygon(ab)
  square = BIN_STEP * np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], np.float64)
  # Minkowski sum hull + square: c is inside iff c + [-10, 10]^2 meets the hull.
  dilated = _convex_polygon((gamut[:, None, :] + square[None]).reshape(-1, 2))
  axis = np.arange(-150.0, 151.0, BIN_STEP)
  grid = np.stack(np.meshgrid(axis, axis, indexing="ij"), axis=-1).reshape(-1, 2)  # sorted by (a, b)
  centers = grid[_inside_convex_polygon(grid, dilated)].astype(np.float32)
  if centers.shape != (NUM_BINS, 2):  # the rule is exact today; fail loudly if numerics ever change it
    raise RuntimeError(f"ab bin derivation gave {centers.shape[0]} bins, expected {NUM_BINS}")
  centers.setflags(write=False)
  return centers


def ab_bin_centers() -> np.ndarray:
  """The Q = 313 ab bin centres, float32 [313, 2], sorted by (a, b) (see the module docstring)."""
  return _derived_bin_centers().copy()


@functools.lru_cache(maxsize=4)
def neighbour_table(k: int) -> np.ndarray:
  """int32 [256, 256, k]: the k nearest bins (nearest first) of every integer ab in [-128, 127]^2.

  Entry [a + 128, b + 128]. Ties are broken by bin index (stable sort), so the table is deterministic.
  """
  if not 1 <= k <= NUM_BINS:
    raise ValueError(f"k must be in [1, {NUM_BINS}], got {k}")
  centers = _derived_bin_centers().astype(np.float64)
  axis = np.arange(LUT_MIN, LUT_MIN + LUT_SIZE, dtype=np.float64)
  table = np.empty((LUT_SIZE, LUT_SIZE, k), np.int32)
  bb = axis[:, None]
  for i, a in enumerate(axis):  # one row of a at a time: [256, 313] distances
    d2 = (a - centers[None, :, 0]) ** 2 + (bb - centers[None, :, 1]) ** 2
    table[i] = np.argsort(d2, axis=1, kind="stable")[:, :k]
  table.setflags(write=False)
  return table


class TargetEncoder:
  """Soft encoding + rebalancing weights of ab targets (paper_spec 3.2); TF ops, any leading dims.

  Args:
    bin_weights: float [313] rebalancing weight of each bin (`colorization_prior.rebalance_weights`).
    k: nearest bins per pixel (paper_spec 3.2: 5).
    sigma: Gaussian sigma in ab units (paper_spec 3.2: 5).
  """

  def __init__(self, bin_weights: np.ndarray, k: int = 5, sigma: float = 5.0):
    bin_weights = np.asarray(bin_weights, np.float32)
    if bin_weights.shape != (NUM_BINS,):
      raise ValueError(f"bin_weights must have shape ({NUM_BINS},), got {bin_weights.shape}")
    if sigma <= 0:
      raise ValueError(f"sigma must be > 0, got {sigma}")
    self.k, self.sigma = int(k), float(sigma)
    self.table = tf.constant(neighbour_table(self.k).reshape(-1, self.k))
    self.centers = tf.constant(ab_bin_centers())
    self.bin_weights = tf.constant(bin_weights)

  def soft_encode(self, ab: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
    """ab float [..., 2] -> (bins int32 [..., k], weights float32 [..., k] summing to 1)."""
    ab = tf.cast(ab, tf.float32)
    cell = tf.clip_by_value(tf.cast(tf.round(ab), tf.int32) - LUT_MIN, 0, LUT_SIZE - 1)
    bins = tf.gather(self.table, cell[..., 0] * LUT_SIZE + cell[..., 1])           # [..., k]
    d2 = tf.reduce_sum(tf.square(ab[..., None, :] - tf.gather(self.centers, bins)), axis=-1)
    # softmax == exp(-d^2 / 2 sigma^2) / sum, without underflow for far-off ab.
    return bins, tf.nn.softmax(-d2 / (2.0 * self.sigma ** 2), axis=-1)

  @staticmethod
  def most_likely_bin(bins: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """q* = argmax of the soft target: int32 [...]."""
    best = tf.argmax(weights, axis=-1, output_type=tf.int32)
    return tf.gather(bins, best[..., None], batch_dims=len(bins.shape) - 1)[..., 0]

  def __call__(self, ab: tf.Tensor, is_gray: tf.Tensor) -> Dict[str, tf.Tensor]:
    """Targets of a batch.

    Args:
      ab: float [B, h, w, 2] target ab (already at stride 8).
      is_gray: bool [B]; gray crops get pixel weight 0.
    Returns:
      {"target_bins": int32 [B, h, w, k], "target_weights": float32 [B, h, w, k],
       "pixel_weights": float32 [B, h, w]}.
    """
    bins, weights = self.soft_encode(ab)
    pixel = tf.gather(self.bin_weights, self.most_likely_bin(bins, weights))
    keep = 1.0 - tf.cast(tf.reshape(is_gray, [-1, 1, 1]), tf.float32)
    return {"target_bins": bins, "target_weights": weights, "pixel_weights": pixel * keep}


GRAY_THRESHOLD = 5.0  # paper_spec 3.2: |a|,|b| <= 5 everywhere is a gray image or crop (Zhang's rule)


def is_gray_image(ab: tf.Tensor, threshold: float) -> tf.Tensor:
  """True when |a| and |b| are <= threshold at every pixel of ab [..., H, W, 2] (Zhang's rule)."""
  return tf.reduce_max(tf.abs(ab), axis=[-3, -2, -1]) <= threshold


def annealed_mean_ab(logits: tf.Tensor, temperature: float) -> tf.Tensor:
  """Zhang's annealed-mean decoding: ab = sum_q softmax(log p / T)_q c_q. logits [..., 313] -> [..., 2]."""
  probs = tf.nn.softmax(tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1) / temperature, axis=-1)
  return tf.linalg.matmul(probs, tf.constant(ab_bin_centers()))
