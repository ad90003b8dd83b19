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

Per-patch preprocessing (the input pipeline pixelates; `trunk_inputs` does the colour step, on the
accelerator): pixelation with p = 1/3 (down to s x s, s = sqrt(U(10^2, 95^2)) scaled by
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
from typing import Dict, Optional

import keras
import tensorflow as tf
from keras import layers

from tf_mtssl.core import configs
from tf_mtssl.model import preprocessing
from tf_mtssl.model import trunk as trunk_lib
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
  patch_size: int = configs.field(96, "Patch side in px (paper_spec 3.1: 96).")
  gap: int = configs.field(48, "Gap between grid cells in px (paper_spec 3.1: 48).")
  jitter: int = configs.field(7, "Max per-patch jitter in px (paper_spec 3.1: 7).")
  pixelation_prob: float = configs.field(1 / 3, "Probability of pixelating a patch (paper_spec 3.1: 1/3).")
  min_pixels: int = configs.field(150_000, "Min image pixel count after rescaling, at 96-px patches "
                                         "(scaled by (patch_size/96)^2; paper_spec 3.1).")
  max_pixels: int = configs.field(450_000, "Max image pixel count after rescaling, at 96-px patches.")
  reduce_channels: int = configs.field(256, "1x1-conv channels before the per-patch FC (see module doc).")
  hidden: int = configs.field(4096, "Width of the head's FC layers (C1: 4096).")
  rms_scale: float = configs.field(50.0, "Colour-dropped patches are scaled to this RMS (C1: 50).")


def rescaled_size(image_hw: tf.Tensor, seed: tf.Tensor, opts: RelativePositionOptions) -> tf.Tensor:
  """int32 [2]: the size the image of shape `image_hw` is rescaled to, so its pixel count is uniform in
  [min, max] (scaled to the patch size; paper_spec 3.1), aspect kept, large enough for the jittered
  3x3 grid."""
  shape = tf.cast(image_hw, tf.float32)
  area_scale = (opts.patch_size / 96.0) ** 2
  target_pixels = tf.random.stateless_uniform([], seed, opts.min_pixels * area_scale,
                                              opts.max_pixels * area_scale)
  scale = tf.sqrt(target_pixels / (shape[0] * shape[1]))
  extent = float(grid_extent(opts))
  scale = tf.maximum(scale, extent / tf.reduce_min(shape))  # the grid must fit (small sources)
  return tf.cast(tf.math.ceil(shape * scale), tf.int32)


def rescale_for_grid(image: tf.Tensor, seed: tf.Tensor, opts: RelativePositionOptions) -> tf.Tensor:
  """The whole image resized to `rescaled_size` (bilinear, antialiased). uint8/float -> float32 [0, 255].

  The input pipeline only resamples the grid's window of it (`rescaled_patch_grid`)."""
  image = tf.cast(image, tf.float32)
  return tf.image.resize(image, rescaled_size(tf.shape(image)[:2], seed, opts), method="bilinear",
                         antialias=True)


def grid_extent(opts: RelativePositionOptions) -> int:
  return GRID * opts.patch_size + (GRID - 1) * opts.gap + 2 * opts.jitter


def patch_positions(image_hw: tf.Tensor, seed: tf.Tensor, opts: RelativePositionOptions) -> tf.Tensor:
  """int32 [9, 2]: (y, x) of the jittered 3x3 grid's patches in an image of shape `image_hw` (large
  enough), in grid row-major order (centre = index 4)."""
  p, step, jitter = opts.patch_size, opts.patch_size + opts.gap, opts.jitter
  shape = tf.convert_to_tensor(image_hw)
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
  span = (GRID - 1) * step + p
  origin_y = tf.random.stateless_uniform([], seeds[0], jitter, shape[0] - span - jitter + 1, tf.int32)
  origin_x = tf.random.stateless_uniform([], seeds[1], jitter, shape[1] - span - jitter + 1, tf.int32)
  cells = tf.constant([[r * step, c * step] for r in range(GRID) for c in range(GRID)], tf.int32)
  offsets = tf.random.stateless_uniform([NUM_PATCHES, 2], seeds[2], -jitter, jitter + 1, tf.int32)
  top_left = cells + tf.stack([origin_y, origin_x]) + offsets
  return tf.clip_by_value(top_left, 0, tf.stack([shape[0] - p, shape[1] - p]))


def _cut_patches(image: tf.Tensor, top_left: tf.Tensor, p: int) -> tf.Tensor:
  patches = tf.stack([image[top_left[i, 0]:top_left[i, 0] + p, top_left[i, 1]:top_left[i, 1] + p]
                      for i in range(NUM_PATCHES)])
  return tf.ensure_shape(patches, [NUM_PATCHES, p, p, image.shape[-1]])


def sample_patch_grid(image: tf.Tensor, seed: tf.Tensor, opts: RelativePositionOptions):
  """Cuts the jittered 3x3 grid of patches from `image` (already large enough).

  Returns:
    patches: [9, P, P, C] in grid row-major order (centre = index 4), same dtype as `image`.
    top_left: int32 [9, 2] (y, x) of every patch in `image`.
  """
  top_left = patch_positions(tf.shape(image)[:2], seed, opts)
  return _cut_patches(image, top_left, opts.patch_size), top_left


def rescaled_patch_grid(image: tf.Tensor, scale_seed: tf.Tensor, grid_seed: tf.Tensor,
                        opts: RelativePositionOptions):
  """`sample_patch_grid(rescale_for_grid(image, scale_seed), grid_seed)` (same patches, to float
  rounding), resampling only the window that holds the grid (`preprocessing.resize_window`): about
  half the rescaled image at the paper's sizes, and no float copy of the source.

  Returns:
    patches: float32 [9, P, P, C] in [0, 255]; top_left: int32 [9, 2] in the rescaled image.
  """
  size = rescaled_size(tf.shape(image)[:2], scale_seed, opts)
  top_left = patch_positions(size, grid_seed, opts)
  begin = tf.reduce_min(top_left, axis=0)
  window = preprocessing.resize_window(image, size, begin, tf.reduce_max(top_left, axis=0) + opts.patch_size - begin)
  return _cut_patches(window, top_left - begin, opts.patch_size), top_left


def pixelation_draws(n: tf.Tensor, patch_size: int, seed: tf.Tensor, prob: float):
  """The random choices of `pixelate` for n patches: the size s (int32 [n]; sqrt(U(10^2, 95^2)) scaled
  by P/96) and whether to pixelate (bool [n], with probability `prob`)."""
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
  lo, hi = (10.0 * patch_size / 96.0) ** 2, (95.0 * patch_size / 96.0) ** 2
  sizes = tf.maximum(1, tf.cast(tf.sqrt(tf.random.stateless_uniform([n], seeds[0], lo, hi)), tf.int32))
  return sizes, tf.random.stateless_uniform([n], seeds[1]) < prob


def pixelate(patches: tf.Tensor, seed: tf.Tensor, prob: float) -> tf.Tensor:
  """With probability `prob` per patch: down to s x s (area), back up (bilinear); see `pixelation_draws`.

  Only the chosen patches (a third at the paper's p) are resampled and scattered back; the others are
  never touched."""
  p = patches.shape[1]
  sizes, apply = pixelation_draws(tf.shape(patches)[0], p, seed, prob)
  chosen = tf.where(apply)[:, 0]

  def one(args):
    patch, size = args
    small = tf.image.resize(patch, tf.stack([size, size]), method="area")
    return tf.image.resize(small, [p, p], method="bilinear")

  resampled = tf.map_fn(one, (tf.gather(patches, chosen), tf.gather(sizes, chosen)),
                        fn_output_signature=tf.float32)
  return tf.tensor_scatter_nd_update(patches, chosen[:, None], resampled)


NOISE_LEVELS = 256  # colour-dropping noise is drawn as bytes: U(-0.5, 0.5) in 256 levels [I]


def colour_drop_draws(n: tf.Tensor, patch_size: int, seed: tf.Tensor):
  """The random choices of `drop_colors` for n patches: the kept channel (int32 [n]) and the noise of
  the two other channels as bytes (uint8 [n, P, P, 2]; value (byte + 0.5) / 256 - 0.5).

  Drawn in the input pipeline, where TF's random ops give the same numbers whatever runs the model
  (its draws change under XLA, --jit_compile): bytes cut from 32-bit draws, 4 per draw."""
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
  keep = tf.random.stateless_uniform([n], seeds[0], 0, 3, tf.int32)
  size = n * patch_size * patch_size * 2
  words = tf.random.stateless_uniform([(size + 3) // 4], seeds[1], minval=None, maxval=None, dtype=tf.int32)
  noise = tf.reshape(tf.bitcast(words, tf.uint8), [-1])[:size]
  return keep, tf.reshape(noise, tf.stack([n, patch_size, patch_size, 2]))


# For each kept channel: where the three channels come from in [noise 0, noise 1, centred kept].
_DROP_SOURCES = ((2, 0, 1), (0, 2, 1), (0, 1, 2))


def drop_colors_with(patches: tf.Tensor, keep: tf.Tensor, noise: tf.Tensor, rms_scale: float) -> tf.Tensor:
  """Colour dropping (paper_spec 3.1) with given draws (`colour_drop_draws`): keep channel `keep` of
  each patch minus its mean, the noise in the two others, then scale the patch to RMS `rms_scale`.
  patches float [n, P, P, 3], keep [n], noise uint8 [n, P, P, 2]."""
  kept = tf.gather(patches, keep[:, None], axis=3, batch_dims=1)                 # [n, P, P, 1]
  centred = kept - tf.reduce_mean(kept, axis=[1, 2], keepdims=True)
  values = (tf.cast(noise, tf.float32) + 0.5) / NOISE_LEVELS - 0.5
  dropped = tf.gather(tf.concat([values, centred], axis=-1), tf.gather(tf.constant(_DROP_SOURCES), keep), axis=3, batch_dims=1)
  rms = tf.sqrt(tf.reduce_mean(tf.square(dropped), axis=[1, 2, 3], keepdims=True))
  return dropped * (rms_scale / tf.maximum(rms, 1e-3))


def drop_colors(patches: tf.Tensor, seed: tf.Tensor, rms_scale: float) -> tf.Tensor:
  """Colour dropping (paper_spec 3.1): keep one random channel minus its mean, replace the others
  by U(-0.5, 0.5) noise (pixel units), then scale the patch to RMS `rms_scale`."""
  return drop_colors_with(patches, *colour_drop_draws(tf.shape(patches)[0], patches.shape[1], seed), rms_scale)


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

  def colour_patches(self, patches: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """The colour step of the patches of one example, float [N, P, P, 3] in [0, 255] -> trunk-ready:
    colour dropping, or with `harmonize` colorization's gray input (paper_spec 6)."""
    if self.harmonize:
      from tf_mtssl.model import color  # paper_spec 6: the same gray preprocessing as colorization
      return color.to_gray_input(patches)
    return drop_colors(patches, seed, self.options.rms_scale)

  def preprocess_patches(self, patches: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """float [N, P, P, 3] in [0, 255] -> trunk-ready patches: pixelation, then `colour_patches`."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
    return self.colour_patches(pixelate(patches, seeds[0], self.options.pixelation_prob), seeds[1])

  def example_from_image(self, image: tf.Tensor, seed: tf.Tensor) -> Dict[str, tf.Tensor]:
    """One example: the pixelated grid ("patches", float32 [9, P, P, 3] in [0, 255]) and, unless
    harmonized, the draws of its colour dropping ("colour_keep", "colour_noise": `colour_drop_draws`).
    `trunk_inputs` applies the colour step (on the accelerator: its pixel-wise passes were a third of
    this pipeline's CPU cost, bench.input_pipeline); together they equal `preprocess_patches`."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
    patches, _ = rescaled_patch_grid(image, seeds[0], seeds[1], self.options)
    pixelation_seed, colour_seed = tf.unstack(tf.random.experimental.stateless_split(seeds[2], 2))
    example = {"patches": pixelate(patches, pixelation_seed, self.options.pixelation_prob)}
    if not self.harmonize:
      example["colour_keep"], example["colour_noise"] = colour_drop_draws(NUM_PATCHES, self.options.patch_size,
                                                                          colour_seed)
    return example

  def build_dataset(self, data, batch_size, *, seed=0, tfds_data_dir=None, input_context=None):
    ds = sources.image_dataset(data, seed=seed, tfds_data_dir=tfds_data_dir, input_context=input_context)

    def make(element, element_seed):
      return {**self.example_from_image(element["image"], element_seed),
              NUM_CORRUPT_KEY: element[NUM_CORRUPT_KEY]}

    ds = sources.with_element_seeds(ds, seed).map(make, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

  def trunk_input_shape(self):
    return (self.options.patch_size, self.options.patch_size, 3)

  def coloured_patches(self, batch) -> tf.Tensor:
    """The batch's trunk-ready patches, float32 [B * 9, P, P, 3]: the colour step with the draws the
    pipeline made (`example_from_image`)."""
    p = self.options.patch_size
    patches = tf.reshape(batch["patches"], [-1, p, p, 3])
    if self.harmonize:
      from tf_mtssl.model import color  # paper_spec 6: the same gray preprocessing as colorization
      return color.to_gray_input(patches)
    return drop_colors_with(patches, tf.reshape(batch["colour_keep"], [-1]),
                            tf.reshape(batch["colour_noise"], [-1, p, p, 2]), self.options.rms_scale)

  def trunk_inputs(self, batch):
    return self.coloured_patches(batch)

  def build_head(self, feature_shape):
    o = self.options
    features = keras.Input(shape=tuple(feature_shape), name="block3")
    x = layers.Conv2D(o.reduce_channels, 1, use_bias=False, name="reduce")(features)
    x = layers.ReLU()(trunk_lib.FusedBatchNormalization(name="reduce_bn")(x))
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
    patches = self.coloured_patches({k: v[:1] for k, v in batch.items() if k.startswith(("patches", "colour_"))})
    lo = tf.reduce_min(patches, axis=[1, 2, 3], keepdims=True)
    hi = tf.reduce_max(patches, axis=[1, 2, 3], keepdims=True)
    patches = tf.pad((patches - lo) / tf.maximum(hi - lo, 1e-6), [[0, 0], [2, 2], [2, 2], [0, 0]])
    rows = [tf.concat(tf.unstack(patches[r * GRID:(r + 1) * GRID]), axis=1) for r in range(GRID)]
    return {"patch_grid": tf.concat(rows, axis=0)[None]}


# Kept at module level for tests and docs: the label of each grid cell paired with the centre.
LABEL_OF_CELL = {cell: k for k, cell in enumerate(NEIGHBOURS)}
assert all(label_for_offset(c % GRID - 1, c // GRID - 1) == k for c, k in LABEL_OF_CELL.items())
