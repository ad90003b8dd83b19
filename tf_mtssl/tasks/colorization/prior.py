"""The colorization prior p~ over the 313 ab bins, and the class-rebalancing weights (paper_spec 3.2).

  python -m tf_mtssl.colorization_prior --data=embedded
  python -m tf_mtssl.colorization_prior --data=tfds:imagenet2012 --tfds_data_dir=... \
      --num_images=10000 --output=/data/imagenet_colorization_prior.npy

Estimation (Zhang et al. 2016, paper_spec 3.2): every pixel of every colour image votes for its most
likely bin q* (the argmax of its soft encoding, the bin that picks its training weight); the normalised
histogram is smoothed with a Gaussian of sigma = 5 ab units over the bin centres (each bin's mass is
spread over the bins with weights exp(-d^2 / 2 sigma^2), normalised per source bin so the total stays
1) [I: Zhang smooths "the distribution" with G_sigma; the exact kernel support is not given]. Images
are first shrunk so their longer side is at most `max_side` (the colour statistics of a photo do not
depend on its resolution; it bounds the cost). Gray images (|a|, |b| <= 5 everywhere) are left out,
as they get weight 0 in training [I: Zhang's prior_probs.npy may include them].

Rebalancing: w(q) = ((1 - lambda) p~(q) + lambda / Q)^-1, scaled so that E_p~[w] = sum_q p~(q) w(q) = 1,
lambda = 0.5 (`rebalance_weights`).

Storage: a float64 .npy of shape (313,) summing to 1, in the bin order of
`tf_mtssl.tasks.colorization.bins.ab_bin_centers` (Zhang's order, so his `prior_probs.npy` loads too).
Default place: beside the data (`default_prior_path`).
"""

import dataclasses
import logging
import os
import pathlib
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import tensorflow as tf

from tf_mtssl.core import configs, files
from tf_mtssl.model import color
from tf_mtssl.data import embedded, sources
from tf_mtssl.tasks.colorization import bins as ab_bins

log = logging.getLogger(__name__)

PRIOR_FILENAME = "colorization_prior.npy"
PHOTOS_PRIOR_FILENAME = "colorization_prior_photos.npy"  # of the `photos` source (images/ + photos/)
PRIOR_SIGMA = 5.0  # paper_spec 3.2: the prior is smoothed with a Gaussian, sigma = 5


def default_prior_path(data: str) -> Optional[pathlib.Path]:
  """Where the prior of source `data` lives by default: beside the data.

  `embedded` -> `tf_mtssl.data.embedded.root()/colorization_prior.npy`; `photos` ->
  `root()/colorization_prior_photos.npy`; an image folder ->
  `<folder>/colorization_prior.npy`; other sources (tfds, TFRecords) -> None (pass a path).
  """
  if data == "embedded":
    return embedded.root() / PRIOR_FILENAME
  if data == "photos":
    return embedded.root() / PHOTOS_PRIOR_FILENAME
  if not data.startswith("tfds:") and os.path.isdir(data):
    return pathlib.Path(data) / PRIOR_FILENAME
  return None


def load_prior(path: Union[str, os.PathLike]) -> np.ndarray:
  """Loads and validates a prior file: float [313], finite, >= 0, positive sum; returns it normalised."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"Colorization prior not found: {path}")
  try:
    prior = np.load(path, allow_pickle=False)
  except ValueError as e:
    raise ValueError(f"Colorization prior {path} is not a numeric .npy array: {e}") from e
  return validate_prior(prior, str(path))


def validate_prior(prior: np.ndarray, name: str = "prior") -> np.ndarray:
  prior = np.asarray(prior)
  if prior.shape != (ab_bins.NUM_BINS,):
    raise ValueError(f"Colorization prior {name} has shape {prior.shape}; expected "
                     f"({ab_bins.NUM_BINS},), one probability per ab bin")
  prior = prior.astype(np.float64)
  if not np.all(np.isfinite(prior)) or np.any(prior < 0) or prior.sum() <= 0:
    raise ValueError(f"Colorization prior {name} must be finite, non-negative and not all zero")
  return prior / prior.sum()


def save_prior(path: Union[str, os.PathLike], prior: np.ndarray) -> pathlib.Path:
  """Writes a validated prior atomically (temporary name, then rename)."""
  return files.save_array(path, validate_prior(prior, str(path)))


def rebalance_weights(prior: np.ndarray, lam: float = 0.5) -> np.ndarray:
  """w = ((1 - lam) p~ + lam / Q)^-1 normalised so that sum_q p~_q w_q = 1 (paper_spec 3.2)."""
  prior = validate_prior(prior)
  if not 0.0 < lam <= 1.0:
    raise ValueError(f"lambda must be in (0, 1], got {lam}")
  weights = 1.0 / ((1.0 - lam) * prior + lam / ab_bins.NUM_BINS)
  return weights / np.sum(prior * weights)


@dataclasses.dataclass(frozen=True)
class PriorConfig:
  """What `python -m tf_mtssl.colorization_prior` computes; every field is one of its flags."""
  data: str = configs.field("embedded", "Image source: 'embedded', 'tfds:NAME[:SPLIT]', a folder or a TFRecord "
                            "glob (see tf_mtssl.data.sources).")
  output: str = configs.field("", "Output .npy; empty = colorization_prior.npy beside the data (embedded root "
                              "or the image folder).")
  num_images: int = configs.field(10000, "Images to read (<= 0: the whole source).")
  max_side: int = configs.field(256, "Images are shrunk to this longer side first.")
  seed: int = configs.field(0, "Shuffling seed of the source.")
  tfds_data_dir: str = configs.field("", "tensorflow-datasets data_dir (empty: the tfds default).")
  gray_threshold: float = configs.field(ab_bins.GRAY_THRESHOLD, "Images with |a|,|b| <= this everywhere are "
                                        "skipped (paper_spec 3.2: 5).")
  sigma: float = configs.field(PRIOR_SIGMA, "Gaussian smoothing of the prior, ab units (paper_spec 3.2: 5).")


def smooth_histogram(histogram: np.ndarray, sigma: float = PRIOR_SIGMA) -> np.ndarray:
  """Gaussian smoothing over the bin centres, mass-preserving; returns a distribution [313]."""
  histogram = np.asarray(histogram, np.float64)
  if histogram.shape != (ab_bins.NUM_BINS,) or histogram.sum() <= 0:
    raise ValueError(f"Need a non-empty histogram of shape ({ab_bins.NUM_BINS},), got {histogram.shape}")
  centers = ab_bins.ab_bin_centers().astype(np.float64)
  d2 = np.sum((centers[:, None, :] - centers[None, :, :]) ** 2, axis=-1)
  kernel = np.exp(-d2 / (2.0 * sigma ** 2))
  kernel /= kernel.sum(axis=0, keepdims=True)  # column j: where bin j's mass goes
  smoothed = kernel @ (histogram / histogram.sum())
  return smoothed / smoothed.sum()


def _shrink(image: tf.Tensor, max_side: int) -> tf.Tensor:
  """uint8 [H, W, 3] -> float32 [0, 1], longer side at most `max_side` (aspect kept)."""
  image = tf.cast(image, tf.float32) / 255.0
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = tf.minimum(1.0, max_side / tf.reduce_max(shape))
  size = tf.maximum(1, tf.cast(tf.round(shape * scale), tf.int32))
  return tf.image.resize(image, size, method="bilinear", antialias=True)


def compute_prior(data: str, *, num_images: int = PriorConfig.num_images, max_side: int = PriorConfig.max_side,
                  seed: int = PriorConfig.seed, tfds_data_dir: Optional[str] = None,
                  gray_threshold: float = PriorConfig.gray_threshold, sigma: float = PriorConfig.sigma,
                  k: int = 5) -> Tuple[np.ndarray, Dict[str, int]]:
  """Estimates p~ over the first `num_images` images (all if <= 0) of source `data` (shuffled by `seed`).

  Args:
    data: a source spec of `tf_mtssl.data.sources`.
    num_images: images to read (<= 0: the whole source, for finite sources).
    max_side: images are shrunk to this longer side first.
    seed: shuffling seed.
    tfds_data_dir: where prepared tensorflow-datasets live.
    gray_threshold: images with |a|, |b| <= this everywhere are skipped.
    sigma: Gaussian smoothing, ab units.
    k: nearest bins of the soft encoding whose argmax assigns a pixel (the training rule).
  Returns:
    (prior [313] float64 summing to 1, {"images": used, "gray_images": skipped, "pixels": counted}).
  Raises:
    ValueError: the source has no colour image.
  """
  encoder = ab_bins.TargetEncoder(np.ones(ab_bins.NUM_BINS), k=k)

  def counts(element):
    image = color.ensure_rgb(element["image"])
    ab = color.rgb_to_lab(_shrink(image, max_side))[..., 1:]
    bins = encoder.most_likely_bin(*encoder.soft_encode(ab))
    hist = tf.math.bincount(tf.reshape(bins, [-1]), minlength=ab_bins.NUM_BINS,
                            maxlength=ab_bins.NUM_BINS, dtype=tf.int64)
    return hist, ab_bins.is_gray_image(ab, gray_threshold)

  ds = sources.image_dataset(data, seed=seed, repeat=False, tfds_data_dir=tfds_data_dir)
  if num_images > 0:
    ds = ds.take(num_images)
  ds = ds.map(counts, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
  total = np.zeros(ab_bins.NUM_BINS, np.float64)
  stats = {"images": 0, "gray_images": 0, "pixels": 0}
  for hist, gray in ds.as_numpy_iterator():
    if gray:
      stats["gray_images"] += 1
      continue
    total += hist
    stats["images"] += 1
    stats["pixels"] += int(hist.sum())
  if stats["images"] == 0:
    raise ValueError(f"No colour image in {data!r} ({stats['gray_images']} gray images): cannot "
                     "estimate a colorization prior")
  log.info("colorization prior of %r: %d colour images, %d gray skipped, %d pixels", data,
           stats["images"], stats["gray_images"], stats["pixels"])
  return smooth_histogram(total, sigma), stats


def prepare_embedded_step(root: pathlib.Path) -> List:
  """`tf_mtssl.prepare_embedded` step: the prior of the embedded photos, at root/colorization_prior.npy."""
  from tf_mtssl import __version__
  from tf_mtssl.data import prepare as prepare_embedded
  root = pathlib.Path(root)
  images = root / embedded.images_dir().relative_to(embedded.root())
  prior, stats = compute_prior(str(images), num_images=0)
  path = save_prior(root / PRIOR_FILENAME, prior)
  return [prepare_embedded.FileRecord(
      path, "tf_mtssl", __version__, f"computed from {images.name}/ by tf_mtssl.colorization_prior",
      "derived from the embedded images (see their licences)",
      f"smoothed ab prior over 313 bins (sigma {PRIOR_SIGMA:g}): {stats['images']} colour images, "
      f"{stats['gray_images']} gray skipped, {stats['pixels']} pixels")]


def prepare_photos_step(root: pathlib.Path) -> List:
  """`tf_mtssl.prepare_embedded` step: the prior of the `photos` source (images/ + photos/)."""
  from tf_mtssl import __version__
  from tf_mtssl.data import prepare as prepare_embedded
  root = pathlib.Path(root)
  parts = [compute_prior(str(root / d.relative_to(embedded.root())), num_images=0)
           for d in (embedded.images_dir(), embedded.photos_dir())]
  # Smoothing is linear and keeps mass, so the prior of the union is the pixel-weighted mean.
  stats = {k: sum(s[k] for _, s in parts) for k in parts[0][1]}
  prior = sum(p * s["pixels"] for p, s in parts) / stats["pixels"]
  path = save_prior(root / PHOTOS_PRIOR_FILENAME, prior)
  return [prepare_embedded.FileRecord(
      path, "tf_mtssl", __version__, "computed from images/ and photos/ by tf_mtssl.colorization_prior",
      "derived from the embedded images and photos (see their licences)",
      f"smoothed ab prior over 313 bins (sigma {PRIOR_SIGMA:g}): {stats['images']} colour images, "
      f"{stats['gray_images']} gray skipped, {stats['pixels']} pixels")]
