"""Exemplar (`ex`): Dosovitskiy et al. 2014 with the triplet loss of this paper (paper_spec 3.3).

Every source image is its own surrogate class: `views` augmented views of it (`tf_mtssl.tasks.exemplar.augment`,
the Dosovitskiy augmentations, 8 views per image as in S6) are embedded by trunk -> global average
pool of block 3 -> FC `embedding_dim` (1000) -> L2 normalisation over the feature axis; the loss is the
semi-hard triplet loss (`tf_mtssl.tasks.exemplar.triplet_loss.triplet_semihard_loss`) with cosine distance and margin 0.5,
the negatives being the views of the other images of the batch ("in-batch negatives", paper_spec 3.3
S7).

Batch layout: a batch of B source images is {"views": uint8 [B, V, S, S, 3] (RGB 0-255, the warped
views before their colour changes), the colour draws `augment.COLOUR_KEYS` ([B, V, ...] floats),
"labels": int32 [B, V] (the source image's index in the batch), NUM_CORRUPT_KEY: int64 [B]};
`trunk_inputs` applies the colours (`augment.colour_views`, on the accelerator: the pixel-wise colour
work was most of the pipeline's CPU cost) and flattens to B*V trunk inputs, image-major (views of
image b are rows b*V..b*V+V-1); the head's [B*V, D] embeddings line up with `labels` flattened the
same way. Views are kept as uint8 until `trunk_inputs` (4x less host memory and host-to-device
traffic than float).
"""

import dataclasses
from typing import Optional

import keras
import tensorflow as tf
from keras import layers

from tf_mtssl.core import configs
from tf_mtssl.tasks.exemplar import augment
from tf_mtssl.tasks.exemplar import triplet_loss as losses
from tf_mtssl.model import preprocessing
from tf_mtssl.data import sources
from tf_mtssl.data.sources import NUM_CORRUPT_KEY
from tf_mtssl.tasks.base import Task


@dataclasses.dataclass(frozen=True)
class ExemplarOptions:
  views: int = configs.field(8, "Augmented views per source image (paper_spec 3.3 / S6: 8); >= 2.")
  embedding_dim: int = configs.field(1000, "Size of the L2-normalised embedding (paper_spec 3.3 / S6: 1000).")
  margin: float = configs.field(0.5, "Triplet margin (paper_spec 3.3: 0.5 with cosine distance).")
  distance: str = configs.field("cosine", "Triplet distance: cosine (paper_spec 3.3) or squared_l2.")
  seed_crop_fraction: float = configs.field(0.6, "Side of the seed patch the views are drawn around, as a fraction "
                                     "of the image's shorter side [I]; in (0, 1].")


def retrieval_accuracy(labels: tf.Tensor, distances: tf.Tensor) -> tf.Tensor:
  """Fraction of rows whose nearest other row (by `distances` [N, N]) has the same label."""
  labels = tf.reshape(labels, [-1])
  n = tf.shape(labels)[0]
  others = tf.linalg.set_diag(distances, tf.fill([n], float("inf")))
  nearest = tf.argmin(others, axis=1, output_type=tf.int32)
  return tf.reduce_mean(tf.cast(tf.equal(tf.gather(labels, nearest), labels), tf.float32))


class ExemplarTask(Task):
  name = "ex"
  Options = ExemplarOptions

  def __init__(self, options: Optional[ExemplarOptions] = None, **kwargs):
    super().__init__(options, **kwargs)
    o = self.options
    self.require("views", o.views >= 2, ">= 2 (a view needs a positive)")
    self.require("embedding_dim", o.embedding_dim >= 1, ">= 1")
    self.require("margin", o.margin >= 0, ">= 0")
    self.require("distance", o.distance in losses.DISTANCES, f"one of {losses.DISTANCES}")
    self.require("seed_crop_fraction", 0.0 < o.seed_crop_fraction <= 1.0, "in (0, 1]")
    self.augmentation = augment.ExemplarAugmentation(seed_crop_fraction=o.seed_crop_fraction)

  # ---- input pipeline -------------------------------------------------------------------------
  def views_from_image(self, image: tf.Tensor, seed: tf.Tensor):
    """uint8 [H, W, 3] -> the geometric views, uint8 [views, image_size, image_size, 3], and their
    colour draws {key: [views, ...]} (`augment.exemplar_geometry`; `coloured_views` applies them)."""
    return augment.exemplar_geometry(image, seed, self.options.views, self.image_size, self.augmentation)

  def coloured_views(self, batch) -> tf.Tensor:
    """The finished views of a batch (`augment.exemplar_views`'s), uint8 [B, views, S, S, 3]."""
    return augment.colour_views(batch["views"], {k: batch[k] for k in augment.COLOUR_KEYS})

  def build_dataset(self, data, batch_size, *, seed=0, tfds_data_dir=None, input_context=None):
    if batch_size < 2:
      raise ValueError(f"ex needs >= 2 source images per batch (negatives come from other images), "
                       f"got batch_size={batch_size}")
    ds = sources.image_dataset(data, seed=seed, tfds_data_dir=tfds_data_dir, input_context=input_context)

    def make(element, element_seed):
      views, colour = self.views_from_image(element["image"], element_seed)
      return {"views": views, **colour, NUM_CORRUPT_KEY: element[NUM_CORRUPT_KEY]}

    ds = sources.with_element_seeds(ds, seed).map(make, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True)
    labels = tf.tile(tf.range(batch_size, dtype=tf.int32)[:, None], [1, self.options.views])
    ds = ds.map(lambda b: {**b, "labels": labels})
    return ds.prefetch(tf.data.AUTOTUNE)

  def trunk_input_shape(self):
    return (self.image_size, self.image_size, 3)

  def trunk_inputs(self, batch):
    return preprocessing.rgb_to_trunk_input(
        tf.reshape(self.coloured_views(batch), (-1,) + self.trunk_input_shape()))

  # ---- model ------------------------------------------------------------------------------------
  def build_head(self, feature_shape):
    features = keras.Input(shape=tuple(feature_shape), name="block3")
    # float32 from the pooling on: the embedding and its normalisation stay precise under mixed
    # precision (the pooled features are small: [N, C]).
    x = layers.GlobalAveragePooling2D(dtype="float32", name="pool")(features)
    x = layers.Dense(self.options.embedding_dim, dtype="float32", name="embedding")(x)
    # Over the FEATURE axis (per example), not the batch axis (design_notes: a public exemplar
    # implementation normalised over axis 0).
    x = layers.UnitNormalization(axis=-1, dtype="float32", name="l2_normalize")(x)
    return keras.Model(features, x, name="ex_head")

  def loss_and_metrics(self, batch, predictions):
    embeddings = tf.cast(predictions, tf.float32)
    labels = tf.reshape(batch["labels"], [-1])
    o = self.options
    loss = losses.triplet_semihard_loss(labels, embeddings, margin=o.margin, distance=o.distance)
    d = losses.pairwise_distances(embeddings, o.distance)
    same = tf.equal(labels[:, None], labels[None, :])
    positive = tf.logical_and(same, tf.logical_not(tf.eye(tf.shape(labels)[0], dtype=tf.bool)))
    mean_over = lambda mask: tf.math.divide_no_nan(  # noqa: E731
        tf.reduce_sum(tf.where(mask, d, 0.0)), tf.reduce_sum(tf.cast(mask, tf.float32)))
    return loss, {
        "retrieval_accuracy": retrieval_accuracy(labels, d),
        # Both distances shrinking together would mean a collapsing embedding.
        "positive_distance": mean_over(positive),
        "negative_distance": mean_over(tf.logical_not(same)),
    }

  def summary_images(self, batch, predictions):
    """The views of the first source image side by side, [1, S, V*S, 3] in [0, 1]."""
    del predictions
    views = tf.cast(self.coloured_views({k: batch[k][:1] for k in ("views",) + augment.COLOUR_KEYS})[0],
                    tf.float32) / 255.0
    return {"views": tf.concat(tf.unstack(views), axis=1)[None]}
