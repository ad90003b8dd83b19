"""Colorization (`col`): Zhang, Isola & Efros 2016 as used by this paper (paper_spec 3.2).

Input: the L channel of a random crop (the uint8 crop, converted on the accelerator in `trunk_inputs`)
as the 3-channel gray image of `tf_mtssl.model.color.to_gray_input` (paper_spec 2.2). Target: the crop's ab colour at stride 8 (paper_spec 3.2 [R]: this paper predicts at
stride 8), as a distribution over the Q = 313 in-gamut ab bins.

The bins and the soft encoding of the targets (k = 5 nearest bins, sigma = 5) are in
`tf_mtssl.tasks.colorization.bins`. Rebalancing (paper_spec 3.2, `tf_mtssl.tasks.colorization.prior`): each pixel is weighted by
the rebalancing weight of its target's most likely bin; crops that are gray everywhere
(|a|, |b| <= 5) get weight 0 (Zhang's `NonGrayMaskLayer`).

Head [I, paper_spec 3.2 recommendation]: block 3 (stride 16) -> 3x3 conv `head_width` + BN + ReLU ->
4x4 transposed conv x2 `upsample_width` + BN + ReLU -> 1x1 conv to 313 float32 logits at stride 8.
Loss: the rebalanced soft cross-entropy, averaged over pixels and examples. Metric: top-1 bin accuracy
at stride 8 over the pixels of colour crops.

The rebalancing prior is looked up when the dataset is built: `--col_prior_path` if given (must
exist); else `colorization_prior.npy` beside the data (the embedded data's root or an image folder,
written by `python -m tf_mtssl.colorization_prior` or the `colorization_prior` step of
`tf_mtssl.prepare_embedded`); else it is computed from `prior_num_images` images of the training
source at start-up, with a logged warning. Computing rather than falling back to a uniform prior is
deliberate: a uniform prior makes every weight 1, silently switching off the class rebalancing the
method relies on (Zhang et al.: without it, predictions collapse to desaturated colours), while a
smoothed 313-bin histogram is well estimated from ~1000 images in a few seconds.
"""

import dataclasses
import logging
import math
import os
from typing import Dict, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from tf_mtssl.core import configs
from tf_mtssl.model import color
from tf_mtssl.model import preprocessing
from tf_mtssl.model import trunk as trunk_lib
from tf_mtssl.data import sources
from tf_mtssl.data.sources import NUM_CORRUPT_KEY
from tf_mtssl.tasks.base import Task
from tf_mtssl.tasks.colorization import bins as ab_bins
from tf_mtssl.tasks.colorization import prior as prior_lib

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# The task.


@dataclasses.dataclass(frozen=True)
class ColorizationOptions:
  head_width: int = configs.field(512, "Channels of the head's 3x3 conv on block 3 (paper_spec 3.2 [I]: 512).")
  upsample_width: int = configs.field(256, "Channels of the head's x2 transposed conv (paper_spec 3.2 [I]: 256).")
  num_neighbors: int = configs.field(5, "Nearest bins of the soft encoding (paper_spec 3.2: 5; Zhang's code: 10).")
  sigma: float = configs.field(5.0, "Gaussian sigma of the soft encoding, ab units (paper_spec 3.2: 5).")
  rebalance_lambda: float = configs.field(0.5, "Class rebalancing: mix of prior and uniform (paper_spec 3.2: 0.5).")
  gray_threshold: float = configs.field(ab_bins.GRAY_THRESHOLD, "Crops with |a|,|b| <= this everywhere are gray: weight 0 (paper_spec 3.2).")
  prior_path: str = configs.field("", "Rebalancing prior .npy (313 floats, e.g. from "
                                    "`python -m tf_mtssl.colorization_prior`); empty: "
                                    "colorization_prior.npy beside the data, else computed at start-up.")
  prior_num_images: int = configs.field(1000, "Images used when the prior has to be computed at start-up.")
  min_crop_scale: float = configs.field(0.6875, "Smallest random crop, as a fraction of the shorter side "
                                        "(paper_spec 3.2 [I]: Zhang's 176 of 256 px).")
  temperature: float = configs.field(0.38, "Annealed-mean temperature of the TensorBoard predictions (Zhang: 0.38).")


class ColorizationTask(Task):
  name = "col"
  Options = ColorizationOptions

  def __init__(self, options: Optional[ColorizationOptions] = None, **kwargs):
    super().__init__(options, **kwargs)
    o = self.options
    if self.image_size % ab_bins.TARGET_STRIDE:
      raise ValueError(f"col needs image_size divisible by {ab_bins.TARGET_STRIDE}, got {self.image_size}")
    self.require("head_width", o.head_width >= 1, ">= 1")
    self.require("upsample_width", o.upsample_width >= 1, ">= 1")
    self.require("num_neighbors", 1 <= o.num_neighbors <= ab_bins.NUM_BINS, f"in [1, {ab_bins.NUM_BINS}] (the ab bins)")
    self.require("sigma", o.sigma > 0, "> 0")
    self.require("rebalance_lambda", 0.0 < o.rebalance_lambda <= 1.0, "in (0, 1]")
    self.require("gray_threshold", o.gray_threshold >= 0, ">= 0")
    self.require("temperature", o.temperature > 0, "> 0")
    self.require("min_crop_scale", 0.0 < o.min_crop_scale <= 1.0, "in (0, 1]")
    self.require("prior_num_images", o.prior_num_images >= 1, ">= 1")
    self._priors: Dict[Tuple[str, Optional[str]], np.ndarray] = {}

  @property
  def target_size(self) -> int:
    return self.image_size // ab_bins.TARGET_STRIDE

  # ---- prior ------------------------------------------------------------------------------------
  def prior(self, data: str, tfds_data_dir: Optional[str] = None, seed: int = 0) -> np.ndarray:
    """The smoothed ab prior p~ [313] for source `data` (see the module docstring); cached."""
    key = (data, tfds_data_dir)
    if key not in self._priors:
      o = self.options
      path = o.prior_path or prior_lib.default_prior_path(data)
      if o.prior_path or (path and os.path.exists(path)):
        prior = prior_lib.load_prior(path)
        log.info("col: rebalancing prior from %s", path)
      else:
        log.warning(
            "col: no colorization prior %s; computing it from %d images of %r now. Precompute it with "
            "`python -m tf_mtssl.colorization_prior --data=%s` (or pass --col_prior_path).",
            f"at {path}" if path else f"for {data!r}", o.prior_num_images, data, data)
        prior, _ = prior_lib.compute_prior(
            data, num_images=o.prior_num_images, seed=seed, tfds_data_dir=tfds_data_dir,
            gray_threshold=o.gray_threshold)
      self._priors[key] = prior
    return self._priors[key]

  def target_encoder(self, prior: np.ndarray) -> ab_bins.TargetEncoder:
    weights = prior_lib.rebalance_weights(prior, self.options.rebalance_lambda)
    return ab_bins.TargetEncoder(weights, k=self.options.num_neighbors, sigma=self.options.sigma)

  # ---- input pipeline ---------------------------------------------------------------------------
  def example_from_image(self, image: tf.Tensor, seed: tf.Tensor) -> Dict[str, tf.Tensor]:
    """One crop: uint8 [H, W, C] (C = 1, 3 or 4) -> the RGB crop, its stride-8 ab and the gray flag.

    Lab is computed here only where the targets need it: at the stride-8 target pixels (1/64 of the
    crop), and at every pixel only for crops whose targets are all gray (is_gray must look at the
    whole crop; a colourful target pixel already settles it). The trunk's L input is made from the
    uint8 crop in `trunk_inputs`, i.e. on the accelerator, where the full-resolution rgb -> Lab -> gray
    conversion (most of this pipeline's CPU cost before, bench.input_pipeline) is cheap.
    """
    crop = preprocessing.random_crop_resize(color.ensure_rgb(image), self.image_size, seed,
                                            min_scale=self.options.min_crop_scale)
    crop = tf.clip_by_value(crop, 0.0, 255.0)
    threshold = self.options.gray_threshold
    target_ab = color.rgb_to_lab(crop[ab_bins.TARGET_OFFSET::ab_bins.TARGET_STRIDE, ab_bins.TARGET_OFFSET::ab_bins.TARGET_STRIDE] / 255.0)[..., 1:]
    colourful = tf.reduce_max(tf.abs(target_ab)) > threshold
    is_gray = tf.cond(colourful, lambda: tf.constant(False),
                      lambda: ab_bins.is_gray_image(color.rgb_to_lab(crop / 255.0)[..., 1:], threshold))
    return {
        "image": tf.cast(tf.round(crop), tf.uint8),  # the trunk's input (via L) and the truth
        "target_ab": target_ab,
        "is_gray": is_gray,
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
    return color.to_gray_input(batch["image"])

  # ---- model ------------------------------------------------------------------------------------
  def build_head(self, feature_shape):
    h, w, c = (int(d) for d in feature_shape)
    t = self.target_size
    factor = t // h if h else 0
    if h * factor != t or w * factor != t or factor & (factor - 1):
      raise ValueError(f"col head: block-3 features {h}x{w} cannot be upsampled by a power of 2 to the "
                       f"stride-{ab_bins.TARGET_STRIDE} target {t}x{t} (image_size {self.image_size}); use an "
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
    logits = layers.Conv2D(ab_bins.NUM_BINS, 1, dtype="float32", name="logits")(x)
    return keras.Model(features, logits, name="col_head")

  @staticmethod
  def _bn(name):
    return trunk_lib.batch_normalization(name)  # the trunk's constants and fused mixed-precision kernel

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
    nearest = ab_bins.TargetEncoder.most_likely_bin(bins, batch["target_weights"])
    correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), nearest), tf.float32)
    colour = tf.cast(pixel_weights > 0, tf.float32)
    accuracy = tf.math.divide_no_nan(tf.reduce_sum(correct * colour), tf.reduce_sum(colour))
    return loss, {"top1_bin_accuracy": accuracy}

  def summary_images(self, batch, predictions, max_images: int = 3):
    """[k, H, 3W, 3]: gray input | truth | prediction (annealed mean, T = `temperature`)."""
    lightness = color.rgb_to_lab(batch["image"][:max_images])[..., :1]
    gray = preprocessing.trunk_input_to_rgb(color.lightness_to_gray_input(lightness))
    truth = tf.cast(batch["image"][:max_images], tf.float32) / 255.0
    ab = ab_bins.annealed_mean_ab(predictions[:max_images], self.options.temperature)
    ab = tf.image.resize(ab, tf.shape(lightness)[1:3], method="bilinear")
    predicted = color.lab_to_rgb(tf.concat([lightness, ab], axis=-1))
    return {"gray_truth_prediction": tf.concat([gray, truth, predicted], axis=2)}
