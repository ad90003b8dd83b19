"""Motion segmentation (`ms`): Pathak et al. 2017 as used by this paper (paper_spec 3.4).

From a single RGB frame, predict which pixels belong to moving objects. Targets are the offline,
unsupervised masks of `tf_mtssl.make_motion_masks` (TFRecords: frame JPEG + mask PNG, 0 static /
255 moving). The frame gets the trunk's RGB preprocessing (paper_spec 2.2); the same random crop and
flip is applied to frame and mask (they are cropped as one 4-channel image).

Head [I, paper_spec 3.4 recommendation]: block 3 (stride 16) -> 3x3 conv `head_width` + BN + ReLU
-> (with `predict_stride` 8) 4x4 transposed conv x2 + BN + ReLU -> 1x1 conv to one float32 logit per
location. Target: the mask area-averaged to the prediction grid (the fraction of moving pixels per
cell, a soft label). Loss: per-pixel sigmoid cross-entropy (Pathak's per-pixel logistic loss),
averaged over pixels. Metric: mask IoU at threshold 0.5 over the batch.

Data specs: `embedded` (masks made from the embedded videos), a folder of mask shards, or a TFRecord
file/glob. Unreadable records are skipped and counted like corrupt images.
"""

import dataclasses
import os
from typing import Optional

import keras
import tensorflow as tf
from keras import layers

from tf_mtssl import motion_masks, preprocessing
from tf_mtssl.data import embedded, sources
from tf_mtssl.tasks.base import NUM_CORRUPT_KEY, Task


@dataclasses.dataclass(frozen=True)
class MotionSegmentationOptions:
  head_width: int = dataclasses.field(default=256, metadata={"help": "3x3 conv width of the head "
                                                                     "(paper_spec 3.4 [I]: 256)."})
  predict_stride: int = dataclasses.field(default=8, metadata={"help": "Prediction stride, 8 (x2 "
                                                                       "upsampling) or 16 (paper_spec 3.4)."})
  min_crop_scale: float = dataclasses.field(default=0.5, metadata={
      "help": "Random square crops cover this fraction of the shorter side, or more."})


def mask_shards(data: str):
  """Shard files of a mask source spec ('embedded', a folder of shards, a file or glob)."""
  if data == "embedded":
    return motion_masks.list_shards(str(embedded.require(embedded.motion_masks_dir())))
  if os.path.isdir(data):
    return motion_masks.list_shards(data)
  return sources.list_tfrecord_files(data)


class MotionSegmentationTask(Task):
  name = "ms"
  Options = MotionSegmentationOptions

  def __init__(self, options: Optional[MotionSegmentationOptions] = None, **kwargs):
    super().__init__(options, **kwargs)
    if self.options.predict_stride not in (8, 16):
      raise ValueError(f"ms predict_stride must be 8 or 16, got {self.options.predict_stride}")
    if self.image_size % 16:
      raise ValueError(f"ms needs image_size divisible by 16 (the trunk stride), got {self.image_size}")
    if not 0 < self.options.min_crop_scale <= 1:
      raise ValueError(f"ms min_crop_scale must be in (0, 1], got {self.options.min_crop_scale}")

  @property
  def target_size(self) -> int:
    return self.image_size // self.options.predict_stride

  def example_from_record(self, record, seed):
    both = tf.concat([record["image"], record["mask"]], axis=-1)  # one crop/flip for frame and mask
    crop = preprocessing.random_crop_resize(both, self.image_size, seed, self.options.min_crop_scale)
    mask = tf.image.resize(crop[..., 3:] / 255.0, [self.target_size] * 2, method="area")
    return {"frame": crop[..., :3], "mask": tf.clip_by_value(mask, 0.0, 1.0),
            NUM_CORRUPT_KEY: record[NUM_CORRUPT_KEY]}

  def build_dataset(self, data, batch_size, *, seed=0, tfds_data_dir=None, input_context=None):
    del tfds_data_dir  # masks come from the generator's TFRecords
    sources.require_colour_source(data, self.name, "motion segmentation needs motion masks made from "
                                  "video (python -m tf_mtssl.make_motion_masks)")
    files = mask_shards(data)
    ds = tf.data.Dataset.from_tensor_slices(files)
    if input_context is not None and input_context.num_input_pipelines > 1:
      ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(4, len(files)),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.shuffle(1024, seed=seed).repeat()
    ds = sources.decode_skipping_errors(ds, motion_masks.parse_example)
    ds = sources.with_element_seeds(ds, seed).map(self.example_from_record,
                                                  num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

  def trunk_input_shape(self):
    return (self.image_size, self.image_size, 3)

  def trunk_inputs(self, batch):
    return preprocessing.rgb_to_trunk_input(batch["frame"])

  def build_head(self, feature_shape):
    o = self.options
    features = keras.Input(shape=tuple(feature_shape), name="block3")
    x = layers.Conv2D(o.head_width, 3, padding="same", use_bias=False, name="conv")(features)
    x = layers.ReLU()(layers.BatchNormalization(name="conv_bn")(x))
    if o.predict_stride == 8:
      x = layers.Conv2DTranspose(o.head_width, 4, strides=2, padding="same", use_bias=False, name="up")(x)
      x = layers.ReLU()(layers.BatchNormalization(name="up_bn")(x))
    logits = layers.Conv2D(1, 1, dtype="float32", name="logits")(x)
    return keras.Model(features, logits, name="ms_head")

  def loss_and_metrics(self, batch, predictions):
    logits = tf.cast(predictions, tf.float32)
    target = tf.cast(batch["mask"], tf.float32)
    loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=target, logits=logits))
    return loss, {"mask_iou": mask_iou(target, tf.sigmoid(logits))}

  def summary_images(self, batch, predictions, max_images: int = 3):
    """Frame | target mask | predicted probability, side by side."""
    frame = tf.cast(batch["frame"][:max_images], tf.float32) / 255.0
    size = tf.shape(frame)[1:3]
    def as_rgb(m):
      return tf.image.grayscale_to_rgb(tf.image.resize(m, size, method="nearest"))
    target = as_rgb(tf.cast(batch["mask"][:max_images], tf.float32))
    predicted = as_rgb(tf.sigmoid(tf.cast(predictions[:max_images], tf.float32)))
    return {"frame_target_prediction": tf.concat([frame, target, predicted], axis=2)}


def mask_iou(target: tf.Tensor, probability: tf.Tensor, threshold: float = 0.5) -> tf.Tensor:
  """IoU of the thresholded masks over the whole batch; 1 when both are empty."""
  t, p = target > threshold, probability > threshold
  intersection = tf.reduce_sum(tf.cast(t & p, tf.float32))
  union = tf.reduce_sum(tf.cast(t | p, tf.float32))
  return tf.where(union > 0, intersection / tf.maximum(union, 1.0), 1.0)
