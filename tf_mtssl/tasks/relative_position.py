"""Relative patch position (`rp`): Doersch, Gupta & Efros 2015 as used by this paper (paper_spec 3.1).

Sampling (paper_spec 3.1, C1 = Doersch's own re-implementation): the image is rescaled so its pixel
count is uniform in [150k, 450k] (aspect kept); a 3x3 grid of 96-px cells with 48-px gaps is placed
at a random origin and every patch is jittered independently by an integer in [-7, 7]. Each example is
the whole grid (9 patches): the centre patch is paired with each of its 8 neighbours, so one example
gives all 8 classes once [I: C1 uses every adjacent pair of larger grids; pairing with the centre
keeps the classes balanced and shares the 9 trunk passes among 8 pairs].

Label of a pair (first, second) = where `second` sits relative to `first` (paper_spec 3.1 layout):
  (dx, dy): (-1,-1)=0 (0,-1)=1 (1,-1)=2 (-1,0)=3 (1,0)=4 (-1,1)=5 (0,1)=6 (1,1)=7
i.e. the row-major index of the neighbour in the 3x3 grid with the centre skipped (dy grows downward).

Per-patch preprocessing: pixelation with p = 1/3 (down to s x s, s = sqrt(U(10^2, 95^2)) scaled by
patch/96, then back up); then either colour dropping (keep one random channel minus its mean, the
other two i.i.d. U(-0.5, 0.5) noise, then RMS normalisation to 50 — the original's scaling, C1; the
VGG mean subtraction of paper_spec 2.2 has no meaning once two channels are noise) or, with
`harmonize` (paper_spec 6), colorization's gray input `tf_mtssl.model.color.to_gray_input`.

Head [I, paper_spec 3.1 recommendation, mirrors the original]: per patch 1x1 conv to
`reduce_channels` (+BN, ReLU), flatten, FC `hidden` (+BN, ReLU) with weights shared by all patches;
pairs are the concatenation (centre, neighbour); FC `hidden` (+BN, ReLU) -> FC `hidden` (ReLU) ->
FC 8. The 1x1 reduction (256 channels at 96 px: 6x6x256 = 9216 inputs) keeps fc6 at the original
AlexNet fc6 size instead of a 151M-parameter layer on 6x6x1024.
"""

import dataclasses
from typing import Optional

import keras
import tensorflow as tf
from keras import layers

from tf_mtssl.data import sources
from tf_mtssl.data.sources import NUM_CORRUPT_KEY
from tf_mtssl.tasks.base import Task

GRID = 3
NUM_PATCHES = GRID * GRID
CENTER = NUM_PATCHES // 2
NEIGHBOURS = [i for i in range(NUM_PATCHES) if i != CENTER]  # label k <-> grid cell NEIGHBOURS[k]
NUM_CLASSES = len(NEIGHBOURS)


def label_for_offset(dx: int, dy: int) -> int:
  """paper_spec 3.1 layout: offset (dx, dy) of the second patch w.r.t. the first -> class."""
  if (dx, dy) == (0, 0) or max(abs(dx), abs(dy)) != 1:
    raise ValueError(f"Not a neighbour offset: {(dx, dy)}")
  return NEIGHBOURS.index((dy + 1) * GRID + (dx + 1))


@dataclasses.dataclass(frozen=True)
class RelativePositionOptions:
  patch_size: int = dataclasses.field(default=96, metadata={"help": "Patch side in px (paper_spec 3.1: 96)."})
  gap: int = dataclasses.field(default=48, metadata={"help": "Gap between grid cells in px (paper_spec 3.1: 48)."})
  jitter: int = dataclasses.field(default=7, metadata={"help": "Max per-patch jitter in px (paper_spec 3.1: 7)."})
  pixelation_prob: float = dataclasses.field(
      default=1 / 3, metadata={"help": "Probability of pixelating a patch (paper_spec 3.1: 1/3)."})
  min_pixels: int = dataclasses.field(
      default=150_000, metadata={"help": "Min image pixel count after rescaling, at 96-px patches "
                                         "(scaled by (patch_size/96)^2; paper_spec 3.1)."})
  max_pixels: int = dataclasses.field(
      default=450_000, metadata={"help": "Max image pixel count after rescaling, at 96-px patches."})
  reduce_channels: int = dataclasses.field(
      default=256, metadata={"help": "1x1-conv channels before the per-patch FC (see module doc)."})
  hidden: int = dataclasses.field(default=4096, metadata={"help": "Width of the head's FC layers (C1: 4096)."})
  rms_scale: float = dataclasses.field(
      default=50.0, metadata={"help": "Colour-dropped patches are scaled to this RMS (C1: 50)."})


def rescale_for_grid(image: tf.Tensor, seed: tf.Tensor, opts: RelativePositionOptions) -> tf.Tensor:
  """Resize so the pixel count is uniform in [min, max] (scaled to the patch size), and large enough
  for the jittered 3x3 grid. uint8/float -> float32 [0, 255]."""
  image = tf.cast(image, tf.float32)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  area_scale = (opts.patch_size / 96.0) ** 2
  target_pixels = tf.random.stateless_uniform([], seed, opts.min_pixels * area_scale,
                                              opts.max_pixels * area_scale)
  scale = tf.sqrt(target_pixels / (shape[0] * shape[1]))
  extent = float(grid_extent(opts))
  scale = tf.maximum(scale, extent / tf.reduce_min(shape))  # the grid must fit (small sources)
  size = tf.cast(tf.math.ceil(shape * scale), tf.int32)
  return tf.image.resize(image, size, method="bilinear", antialias=True)


def grid_extent(opts: RelativePositionOptions) -> int:
  return GRID * opts.patch_size + (GRID - 1) * opts.gap + 2 * opts.jitter


def sample_patch_grid(image: tf.Tensor, seed: tf.Tensor, opts: RelativePositionOptions):
  """Cuts the jittered 3x3 grid of patches from `image` (already large enough).

  Returns:
    patches: [9, P, P, C] in grid row-major order (centre = index 4), same dtype as `image`.
    top_left: int32 [9, 2] (y, x) of every patch in `image`.
  """
  p, step, jitter = opts.patch_size, opts.patch_size + opts.gap, opts.jitter
  shape = tf.shape(image)
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
  span = (GRID - 1) * step + p
  origin_y = tf.random.stateless_uniform([], seeds[0], jitter, shape[0] - span - jitter + 1, tf.int32)
  origin_x = tf.random.stateless_uniform([], seeds[1], jitter, shape[1] - span - jitter + 1, tf.int32)
  cells = tf.constant([[r * step, c * step] for r in range(GRID) for c in range(GRID)], tf.int32)
  offsets = tf.random.stateless_uniform([NUM_PATCHES, 2], seeds[2], -jitter, jitter + 1, tf.int32)
  top_left = cells + tf.stack([origin_y, origin_x]) + offsets
  top_left = tf.clip_by_value(top_left, 0, tf.stack([shape[0] - p, shape[1] - p]))
  patches = tf.stack([image[top_left[i, 0]:top_left[i, 0] + p, top_left[i, 1]:top_left[i, 1] + p]
                      for i in range(NUM_PATCHES)])
  patches = tf.ensure_shape(patches, [NUM_PATCHES, p, p, image.shape[-1]])
  return patches, top_left


def pixelate(patches: tf.Tensor, seed: tf.Tensor, prob: float) -> tf.Tensor:
  """With probability `prob` per patch: down to s x s (s = sqrt(U(10^2, 95^2)) * P/96), back up."""
  n, p = tf.shape(patches)[0], patches.shape[1]
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
  lo, hi = (10.0 * p / 96.0) ** 2, (95.0 * p / 96.0) ** 2
  sizes = tf.maximum(1, tf.cast(tf.sqrt(tf.random.stateless_uniform([n], seeds[0], lo, hi)), tf.int32))
  apply = tf.random.stateless_uniform([n], seeds[1]) < prob

  def one(args):
    patch, size, do = args
    small = tf.image.resize(patch, tf.stack([size, size]), method="area")
    return tf.where(do, tf.image.resize(small, [p, p], method="bilinear"), patch)

  return tf.map_fn(one, (patches, sizes, apply), fn_output_signature=tf.float32)


def drop_colors(patches: tf.Tensor, seed: tf.Tensor, rms_scale: float) -> tf.Tensor:
  """Colour dropping (paper_spec 3.1): keep one random channel minus its mean, replace the others
  by U(-0.5, 0.5) noise (pixel units), then scale the patch to RMS `rms_scale`."""
  n = tf.shape(patches)[0]
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
  keep = tf.random.stateless_uniform([n], seeds[0], 0, 3, tf.int32)
  keep_mask = tf.one_hot(keep, 3)[:, None, None, :]
  centred = patches - tf.reduce_mean(patches, axis=[1, 2], keepdims=True)
  noise = tf.random.stateless_uniform(tf.shape(patches), seeds[1], -0.5, 0.5)
  dropped = keep_mask * centred + (1.0 - keep_mask) * noise
  rms = tf.sqrt(tf.reduce_mean(tf.square(dropped), axis=[1, 2, 3], keepdims=True))
  return dropped * (rms_scale / tf.maximum(rms, 1e-3))


class _GroupPatches(layers.Layer):
  """[B*9, D] per-patch codes -> [B, 8, 2D] (centre, neighbour) pairs in label order."""

  def call(self, codes):
    grouped = keras.ops.reshape(codes, (-1, NUM_PATCHES, codes.shape[-1]))
    centre = keras.ops.repeat(grouped[:, CENTER:CENTER + 1], NUM_CLASSES, axis=1)
    neighbours = keras.ops.take(grouped, NEIGHBOURS, axis=1)
    return keras.ops.concatenate([centre, neighbours], axis=-1)

  def compute_output_shape(self, input_shape):
    return (None, NUM_CLASSES, 2 * input_shape[-1])


class RelativePositionTask(Task):
  name = "rp"
  Options = RelativePositionOptions

  def __init__(self, options: Optional[RelativePositionOptions] = None, **kwargs):
    super().__init__(options, **kwargs)
    o = self.options
    self.require("patch_size", o.patch_size >= 16, ">= 16 (one block-3 cell at output stride 16)")
    self.require("gap", o.gap >= 0, ">= 0")
    self.require("jitter", o.jitter >= 0, ">= 0")
    self.require("pixelation_prob", 0 <= o.pixelation_prob <= 1, "in [0, 1]")
    self.require("min_pixels", o.min_pixels > 0, "> 0")
    self.require("max_pixels", o.max_pixels >= o.min_pixels, f">= --rp_min_pixels ({o.min_pixels})")
    self.require("reduce_channels", o.reduce_channels >= 1, ">= 1")
    self.require("hidden", o.hidden >= 1, ">= 1")
    self.require("rms_scale", o.rms_scale > 0, "> 0")

  def preprocess_patches(self, patches: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """float [N, P, P, 3] in [0, 255] -> trunk-ready patches."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
    patches = pixelate(patches, seeds[0], self.options.pixelation_prob)
    if self.harmonize:
      from tf_mtssl.model import color  # paper_spec 6: the same gray preprocessing as colorization
      return color.to_gray_input(patches)
    return drop_colors(patches, seeds[1], self.options.rms_scale)

  def example_from_image(self, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
    image = rescale_for_grid(image, seeds[0], self.options)
    patches, _ = sample_patch_grid(image, seeds[1], self.options)
    return self.preprocess_patches(patches, seeds[2])

  def build_dataset(self, data, batch_size, *, seed=0, tfds_data_dir=None, input_context=None):
    ds = sources.image_dataset(data, seed=seed, tfds_data_dir=tfds_data_dir, input_context=input_context)

    def make(element, element_seed):
      return {"patches": self.example_from_image(element["image"], element_seed),
              NUM_CORRUPT_KEY: element[NUM_CORRUPT_KEY]}

    ds = sources.with_element_seeds(ds, seed).map(make, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

  def trunk_input_shape(self):
    return (self.options.patch_size, self.options.patch_size, 3)

  def trunk_inputs(self, batch):
    p = self.options.patch_size
    return tf.reshape(batch["patches"], [-1, p, p, 3])

  def build_head(self, feature_shape):
    o = self.options
    features = keras.Input(shape=tuple(feature_shape), name="block3")
    x = layers.Conv2D(o.reduce_channels, 1, use_bias=False, name="reduce")(features)
    x = layers.ReLU()(layers.BatchNormalization(name="reduce_bn")(x))
    x = layers.Flatten()(x)
    x = layers.Dense(o.hidden, use_bias=False, name="fc6")(x)
    x = layers.ReLU()(layers.BatchNormalization(name="fc6_bn")(x))
    x = _GroupPatches(name="pairs")(x)
    x = layers.Dense(o.hidden, use_bias=False, name="fc7")(x)
    x = layers.ReLU()(layers.BatchNormalization(name="fc7_bn")(x))
    x = layers.Dense(o.hidden, activation="relu", name="fc8")(x)
    logits = layers.Dense(NUM_CLASSES, dtype="float32", name="logits")(x)
    return keras.Model(features, logits, name="rp_head")

  @staticmethod
  def labels_like(logits: tf.Tensor) -> tf.Tensor:
    return tf.broadcast_to(tf.range(NUM_CLASSES), tf.shape(logits)[:2])

  def loss_and_metrics(self, batch, predictions):
    logits = tf.cast(predictions, tf.float32)
    labels = self.labels_like(logits)
    loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
    accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32))
    return loss, {"accuracy": accuracy}

  def summary_images(self, batch, predictions):
    """The first example's 3x3 grid of (preprocessed) patches, tiled with 2-px gaps."""
    del predictions
    patches = tf.cast(batch["patches"][0], tf.float32)
    lo = tf.reduce_min(patches, axis=[1, 2, 3], keepdims=True)
    hi = tf.reduce_max(patches, axis=[1, 2, 3], keepdims=True)
    patches = tf.pad((patches - lo) / tf.maximum(hi - lo, 1e-6), [[0, 0], [2, 2], [2, 2], [0, 0]])
    rows = [tf.concat(tf.unstack(patches[r * GRID:(r + 1) * GRID]), axis=1) for r in range(GRID)]
    return {"patch_grid": tf.concat(rows, axis=0)[None]}


# Kept at module level for tests and docs: the label of each grid cell paired with the centre.
LABEL_OF_CELL = {cell: k for k, cell in enumerate(NEIGHBOURS)}
assert all(label_for_offset(c % GRID - 1, c // GRID - 1) == k for c, k in LABEL_OF_CELL.items())
