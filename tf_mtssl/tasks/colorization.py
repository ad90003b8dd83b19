"""Colorization (`col`): Zhang, Isola & Efros 2016 as used by this paper (paper_spec 3.2).

Input: the L channel of a random crop as the 3-channel gray image of `tf_mtssl.color.to_gray_input`
(paper_spec 2.2). Target: the crop's ab colour at stride 8 (paper_spec 3.2 [R]: this paper predicts at
stride 8), as a distribution over the Q = 313 in-gamut ab bins.

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
pixel). Rebalancing (paper_spec 3.2, `tf_mtssl.tasks.colorization_prior`): each pixel is weighted by
the rebalancing weight of its target's most likely bin; crops that are gray everywhere
(|a|, |b| <= 5) get weight 0 (Zhang's `NonGrayMaskLayer`).

Head [I, paper_spec 3.2 recommendation]: block 3 (stride 16) -> 3x3 conv `head_width` + BN + ReLU ->
4x4 transposed conv x2 `upsample_width` + BN + ReLU -> 1x1 conv to 313 float32 logits at stride 8.
Loss: the rebalanced soft cross-entropy, averaged over pixels and examples. Metric: top-1 bin accuracy
at stride 8 over the pixels of colour crops.

The rebalancing prior is looked up when the dataset is built: `--col_prior_path` if given (must
exist); else `colorization_prior.npy` beside the data (the embedded data's root or an image folder,
written by `python -m tf_mtssl.tasks.colorization_prior` or the `colorization_prior` step of
`tf_mtssl.data.prepare_embedded`); else it is computed from `prior_num_images` images of the training
source at start-up, with a logged warning. Computing rather than falling back to a uniform prior is
deliberate: a uniform prior makes every weight 1, silently switching off the class rebalancing the
method relies on (Zhang et al.: without it, predictions collapse to desaturated colours), while a
smoothed 313-bin histogram is well estimated from ~1000 images in a few seconds.
"""

import dataclasses
import functools
import logging
import math
import os
from typing import Dict, Optional, Tuple

import cv2
import keras
import numpy as np
import tensorflow as tf
from keras import layers

from tf_mtssl import color
from tf_mtssl import preprocessing
from tf_mtssl import trunk as trunk_lib
from tf_mtssl.data import sources
from tf_mtssl.tasks.base import NUM_CORRUPT_KEY, Task

log = logging.getLogger(__name__)

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


def _rgb_cube_surface(levels: int = 256) -> np.ndarray:
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
  ab = color.rgb_to_lab(tf.constant(_rgb_cube_surface(), tf.float64)).numpy()[:, 1:]
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


def is_gray_image(ab: tf.Tensor, threshold: float) -> tf.Tensor:
  """True when |a| and |b| are <= threshold at every pixel of ab [..., H, W, 2] (Zhang's rule)."""
  return tf.reduce_max(tf.abs(ab), axis=[-3, -2, -1]) <= threshold


def annealed_mean_ab(logits: tf.Tensor, temperature: float) -> tf.Tensor:
  """Zhang's annealed-mean decoding: ab = sum_q softmax(log p / T)_q c_q. logits [..., 313] -> [..., 2]."""
  probs = tf.nn.softmax(tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1) / temperature, axis=-1)
  return tf.linalg.matmul(probs, tf.constant(ab_bin_centers()))


# ---------------------------------------------------------------------------------------------------
# The task.


@dataclasses.dataclass(frozen=True)
class ColorizationOptions:
  head_width: int = dataclasses.field(
      default=512, metadata={"help": "Channels of the head's 3x3 conv on block 3 (paper_spec 3.2 [I]: 512)."})
  upsample_width: int = dataclasses.field(
      default=256, metadata={"help": "Channels of the head's x2 transposed conv (paper_spec 3.2 [I]: 256)."})
  num_neighbors: int = dataclasses.field(
      default=5, metadata={"help": "Nearest bins of the soft encoding (paper_spec 3.2: 5; Zhang's code: 10)."})
  sigma: float = dataclasses.field(
      default=5.0, metadata={"help": "Gaussian sigma of the soft encoding, ab units (paper_spec 3.2: 5)."})
  rebalance_lambda: float = dataclasses.field(
      default=0.5, metadata={"help": "Class rebalancing: mix of prior and uniform (paper_spec 3.2: 0.5)."})
  gray_threshold: float = dataclasses.field(
      default=5.0, metadata={"help": "Crops with |a|,|b| <= this everywhere are gray: weight 0 (paper_spec 3.2)."})
  prior_path: str = dataclasses.field(
      default="", metadata={"help": "Rebalancing prior .npy (313 floats, e.g. from "
                                    "`python -m tf_mtssl.tasks.colorization_prior`); empty: "
                                    "colorization_prior.npy beside the data, else computed at start-up."})
  prior_num_images: int = dataclasses.field(
      default=1000, metadata={"help": "Images used when the prior has to be computed at start-up."})
  min_crop_scale: float = dataclasses.field(
      default=0.6875, metadata={"help": "Smallest random crop, as a fraction of the shorter side "
                                        "(paper_spec 3.2 [I]: Zhang's 176 of 256 px)."})
  temperature: float = dataclasses.field(
      default=0.38, metadata={"help": "Annealed-mean temperature of the TensorBoard predictions (Zhang: 0.38)."})


class ColorizationTask(Task):
  name = "col"
  Options = ColorizationOptions

  def __init__(self, options: Optional[ColorizationOptions] = None, **kwargs):
    super().__init__(options, **kwargs)
    o = self.options
    if self.image_size % TARGET_STRIDE:
      raise ValueError(f"col needs image_size divisible by {TARGET_STRIDE}, got {self.image_size}")
    if o.head_width < 1 or o.upsample_width < 1:
      raise ValueError(f"col head widths must be >= 1, got {o.head_width}, {o.upsample_width}")
    if not 1 <= o.num_neighbors <= NUM_BINS or o.sigma <= 0:
      raise ValueError(f"col needs 1 <= num_neighbors <= {NUM_BINS} and sigma > 0, got {o}")
    if not 0.0 < o.rebalance_lambda <= 1.0:
      raise ValueError(f"col rebalance_lambda must be in (0, 1], got {o.rebalance_lambda}")
    if o.gray_threshold < 0 or o.temperature <= 0 or not 0.0 < o.min_crop_scale <= 1.0:
      raise ValueError(f"Bad col options: {o}")
    self._priors: Dict[Tuple[str, Optional[str]], np.ndarray] = {}

  @property
  def target_size(self) -> int:
    return self.image_size // TARGET_STRIDE

  # ---- prior ------------------------------------------------------------------------------------
  def prior(self, data: str, tfds_data_dir: Optional[str] = None, seed: int = 0) -> np.ndarray:
    """The smoothed ab prior p~ [313] for source `data` (see the module docstring); cached."""
    from tf_mtssl.tasks import colorization_prior  # it imports this module: import at call time
    key = (data, tfds_data_dir)
    if key not in self._priors:
      o = self.options
      path = o.prior_path or colorization_prior.default_prior_path(data)
      if o.prior_path or (path and os.path.exists(path)):
        prior = colorization_prior.load_prior(path)
        log.info("col: rebalancing prior from %s", path)
      else:
        log.warning(
            "col: no colorization prior %s; computing it from %d images of %r now. Precompute it with "
            "`python -m tf_mtssl.tasks.colorization_prior --data=%s` (or pass --col_prior_path).",
            f"at {path}" if path else f"for {data!r}", o.prior_num_images, data, data)
        prior, _ = colorization_prior.compute_prior(
            data, num_images=o.prior_num_images, seed=seed, tfds_data_dir=tfds_data_dir,
            gray_threshold=o.gray_threshold)
      self._priors[key] = prior
    return self._priors[key]

  def target_encoder(self, prior: np.ndarray) -> TargetEncoder:
    from tf_mtssl.tasks import colorization_prior
    weights = colorization_prior.rebalance_weights(prior, self.options.rebalance_lambda)
    return TargetEncoder(weights, k=self.options.num_neighbors, sigma=self.options.sigma)

  # ---- input pipeline ---------------------------------------------------------------------------
  def example_from_image(self, image: tf.Tensor, seed: tf.Tensor) -> Dict[str, tf.Tensor]:
    """One crop: uint8 [H, W, C] (C = 1, 3 or 4) -> L, the RGB crop, stride-8 ab and the gray flag."""
    crop = preprocessing.random_crop_resize(color.ensure_rgb(image), self.image_size, seed,
                                            min_scale=self.options.min_crop_scale)
    crop = tf.clip_by_value(crop, 0.0, 255.0)
    lab = color.rgb_to_lab(crop / 255.0)
    ab = lab[..., 1:]
    return {
        "lightness": lab[..., :1],
        "image": tf.cast(tf.round(crop), tf.uint8),  # the truth, for TensorBoard
        "target_ab": ab[TARGET_OFFSET::TARGET_STRIDE, TARGET_OFFSET::TARGET_STRIDE],
        "is_gray": is_gray_image(ab, self.options.gray_threshold),
    }

  def build_dataset(self, data, batch_size, *, seed=0, tfds_data_dir=None, input_context=None):
    sources.require_colour_source(data, self.name, "colorization predicts the colours of colour images")
    encoder = self.target_encoder(self.prior(data, tfds_data_dir, seed))
    ds = sources.image_dataset(data, seed=seed, tfds_data_dir=tfds_data_dir, input_context=input_context)

    def make(element, element_seed):
      return {**self.example_from_image(element["image"], element_seed),
              NUM_CORRUPT_KEY: element[NUM_CORRUPT_KEY]}

    def encode(batch):  # batched: one vectorised encoding per batch
      return {**batch, **encoder(batch["target_ab"], batch["is_gray"])}

    ds = sources.with_element_seeds(ds, seed).map(make, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True).map(encode, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)

  def trunk_input_shape(self):
    return (self.image_size, self.image_size, 3)

  def trunk_inputs(self, batch):
    return color.lightness_to_gray_input(batch["lightness"])

  # ---- model ------------------------------------------------------------------------------------
  def build_head(self, feature_shape):
    h, w, c = (int(d) for d in feature_shape)
    t = self.target_size
    factor = t // h if h else 0
    if h * factor != t or w * factor != t or factor & (factor - 1):
      raise ValueError(f"col head: block-3 features {h}x{w} cannot be upsampled by a power of 2 to the "
                       f"stride-{TARGET_STRIDE} target {t}x{t} (image_size {self.image_size}); use an "
                       "image_size divisible by the trunk's output stride")
    o = self.options
    features = keras.Input(shape=(h, w, c), name="block3")
    x = layers.Conv2D(o.head_width, 3, padding="same", use_bias=False, name="conv")(features)
    x = layers.ReLU()(self._bn("conv_bn")(x))
    for i in range(int(math.log2(factor))):  # one x2 transposed conv at output stride 16
      x = layers.Conv2DTranspose(o.upsample_width, 4, strides=2, padding="same", use_bias=False,
                                 name=f"upsample{i}")(x)
      x = layers.ReLU()(self._bn(f"upsample{i}_bn")(x))
    if factor == 1:  # output stride 8: same depth, no upsampling
      x = layers.Conv2D(o.upsample_width, 3, padding="same", use_bias=False, name="conv2")(x)
      x = layers.ReLU()(self._bn("conv2_bn")(x))
    logits = layers.Conv2D(NUM_BINS, 1, dtype="float32", name="logits")(x)
    return keras.Model(features, logits, name="col_head")

  @staticmethod
  def _bn(name):
    return layers.BatchNormalization(epsilon=trunk_lib.BN_EPSILON, momentum=trunk_lib.BN_MOMENTUM, name=name)

  def loss_and_metrics(self, batch, predictions):
    logits = tf.cast(predictions, tf.float32)
    bins = batch["target_bins"]
    if logits.shape[1:3] != bins.shape[1:3]:
      raise ValueError(f"col logits {logits.shape} and targets {bins.shape} differ in size")
    log_probs = tf.nn.log_softmax(logits, axis=-1)
    picked = tf.gather(log_probs, bins, batch_dims=3)                               # [B, h, w, k]
    cross_entropy = -tf.reduce_sum(tf.cast(batch["target_weights"], tf.float32) * picked, axis=-1)
    pixel_weights = tf.cast(batch["pixel_weights"], tf.float32)
    loss = tf.reduce_mean(pixel_weights * cross_entropy)
    nearest = TargetEncoder.most_likely_bin(bins, batch["target_weights"])
    correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), nearest), tf.float32)
    colour = tf.cast(pixel_weights > 0, tf.float32)
    accuracy = tf.math.divide_no_nan(tf.reduce_sum(correct * colour), tf.reduce_sum(colour))
    return loss, {"top1_bin_accuracy": accuracy}

  def summary_images(self, batch, predictions, max_images: int = 3):
    """[k, H, 3W, 3]: gray input | truth | prediction (annealed mean, T = `temperature`)."""
    lightness = tf.cast(batch["lightness"][:max_images], tf.float32)
    gray = preprocessing.trunk_input_to_rgb(color.lightness_to_gray_input(lightness))
    truth = tf.cast(batch["image"][:max_images], tf.float32) / 255.0
    ab = annealed_mean_ab(predictions[:max_images], self.options.temperature)
    ab = tf.image.resize(ab, tf.shape(lightness)[1:3], method="bilinear")
    predicted = color.lab_to_rgb(tf.concat([lightness, ab], axis=-1))
    return {"gray_truth_prediction": tf.concat([gray, truth, predicted], axis=2)}
