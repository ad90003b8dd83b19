"""Detection examples and their input pipelines (paper_spec 7.2).

Sources (`spec`):
  `tfds:NAME`   a tensorflow-datasets detection set prepared in `tfds_data_dir` (never downloaded), with
                the VOC feature layout: `image`, `objects/bbox` (normalized [ymin, xmin, ymax, xmax]),
                `objects/label`, `objects/is_difficult` (e.g. `tfds:voc/2007`; splits are tfds split
                strings, `train+validation` = VOC07 trainval);
  `embedded`    the embedded detection set (`tf_mtssl.data.detection`), splits `train` / `test`.

Raw examples: image uint8 [H, W, 3], boxes float32 [G, 4] `[ymin, xmin, ymax, xmax]` in pixels of the
original image (VOC's inclusive, 0-based pixel indices: tfds stores (v - 1) / size), labels int32 [G]
(0-based), difficult bool [G].
"""

import dataclasses
from typing import Dict, List, Optional, Tuple

import tensorflow as tf

from tf_mtssl.core import configs
from tf_mtssl.model import preprocessing
from tf_mtssl.data import sources
from tf_mtssl.data import detection as detection_set

_AUTOTUNE = tf.data.AUTOTUNE




@dataclasses.dataclass(frozen=True)
class InputConfig:
  """Resizing and batching (paper_spec 7.2 [I]: shorter side 600, longer at most 1000). Every field is
  a flag of `tf_mtssl.finetune_detection`."""
  min_side: int = configs.field(600, "Images are resized so their shorter side is this (paper_spec 7.2 [I]) ...")
  max_side: int = configs.field(1000, "... unless the longer side would exceed this (py-faster-rcnn).")
  batch_size: int = configs.field(1, "Images per training step (py-faster-rcnn: 1); also the test batch.")
  max_boxes: int = configs.field(64, "Ground-truth boxes padded to this per training image (VOC07: <= 42).")
  flip: bool = configs.field(True, "Random horizontal flips in training.")
  train_use_difficult: bool = configs.field(False, "Train on VOC 'difficult' objects too (py-faster-rcnn: no).")
  preprocessing: str = configs.field(preprocessing.DEFAULT_CONVENTION,
                              "The trunk's input convention (`tf_mtssl.model.preprocessing`), from its source: "
                              "recorded with the run, never a flag.")

  def __post_init__(self):
    if not 16 <= self.min_side <= self.max_side:
      raise ValueError(f"Need 16 <= min_side <= max_side, got {self.min_side}, {self.max_side}")
    if self.batch_size < 1 or self.max_boxes < 1:
      raise ValueError(f"batch_size and max_boxes must be >= 1, got {self.batch_size}, {self.max_boxes}")
    preprocessing.check_convention(self.preprocessing)


def _signature():
  return {"image": tf.TensorSpec([None, None, 3], tf.uint8),
          "boxes": tf.TensorSpec([None, 4], tf.float32),
          "labels": tf.TensorSpec([None], tf.int32),
          "difficult": tf.TensorSpec([None], tf.bool)}


def _tfds_examples(name: str, split: str, data_dir: Optional[str]) -> Tuple[tf.data.Dataset, List[str]]:
  builder = sources.prepared_tfds_builder(name, data_dir, required_features=("image", "objects"))
  objects = builder.info.features["objects"]
  class_names = list(objects["label"].names)
  ds = builder.as_dataset(split=split, shuffle_files=False)

  def convert(ex):
    image = ex["image"]
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.concat([hw, hw], axis=0)
    return {"image": image, "boxes": tf.cast(ex["objects"]["bbox"], tf.float32) * scale,
            "labels": tf.cast(ex["objects"]["label"], tf.int32),
            "difficult": tf.cast(ex["objects"]["is_difficult"], tf.bool)}

  return ds.map(convert, num_parallel_calls=_AUTOTUNE), class_names


def _embedded_examples(split: str, embedded_set: Optional[dict]) -> Tuple[tf.data.Dataset, List[str]]:
  data = embedded_set if embedded_set is not None else detection_set.make_detection_set()
  if split not in ("train", "test"):
    raise ValueError(f"The embedded detection set has splits 'train' and 'test', got {split!r}")
  examples = data[split]
  if not examples:
    raise ValueError(f"The embedded detection set's {split!r} split is empty")
  ds = tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=_signature())
  return ds.cache(), list(data["class_names"])


def raw_examples(spec: str, split: str, tfds_data_dir: Optional[str] = None,
                 embedded_set: Optional[dict] = None) -> Tuple[tf.data.Dataset, List[str]]:
  """Finite, ordered dataset of raw examples and the class names.

  Args:
    spec: `tfds:NAME` or `embedded` (see module docstring).
    split: tfds split string, or `train` / `test` for the embedded set.
    tfds_data_dir: where tensorflow-datasets are prepared.
    embedded_set: an already generated `detection_set.make_detection_set()` result (default: generate
      the default one).
  """
  if spec == "embedded":
    return _embedded_examples(split, embedded_set)
  if spec.startswith("tfds:"):
    return _tfds_examples(sources.tfds_name(spec, "--train_split / --test_split"), split, tfds_data_dir)
  raise ValueError(f"Unknown detection data spec {spec!r}: expected 'embedded' or 'tfds:NAME'")


def resize_scale(height: tf.Tensor, width: tf.Tensor, min_side: int, max_side: int) -> tf.Tensor:
  """Scale making the shorter side min_side unless the longer would exceed max_side (py-faster-rcnn)."""
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  return tf.minimum(min_side / tf.minimum(h, w), max_side / tf.maximum(h, w))


def _resize(image, config: InputConfig):
  shape = tf.shape(image)
  scale = resize_scale(shape[0], shape[1], config.min_side, config.max_side)
  new_hw = tf.cast(tf.round(tf.cast(shape[:2], tf.float32) * scale), tf.int32)
  resized = tf.image.resize(image, new_hw, method="bilinear", antialias=True)
  scale_yx = tf.cast(new_hw, tf.float32) / tf.cast(shape[:2], tf.float32)   # exact per-axis factors
  return preprocessing.rgb_to_trunk_input(resized, config.preprocessing), new_hw, scale_yx


def train_features(example: Dict[str, tf.Tensor], seed: tf.Tensor, config: InputConfig) -> Dict[str, tf.Tensor]:
  """Resize, random flip, drop difficult objects (unless configured), pad boxes to max_boxes."""
  image, new_hw, scale_yx = _resize(example["image"], config)
  boxes = example["boxes"] * tf.tile(scale_yx, [2])
  labels = example["labels"]
  if not config.train_use_difficult:
    keep = tf.logical_not(example["difficult"])
    boxes, labels = tf.boolean_mask(boxes, keep), tf.boolean_mask(labels, keep)
  if config.flip:
    flip = tf.random.stateless_uniform([], seed) < 0.5
    width = tf.cast(new_hw[1], tf.float32)
    flipped = tf.stack([boxes[:, 0], width - boxes[:, 3], boxes[:, 2], width - boxes[:, 1]], axis=1)
    image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
    boxes = tf.cond(flip, lambda: flipped, lambda: boxes)
  n = tf.shape(boxes)[0]
  tf.debugging.assert_less_equal(n, config.max_boxes,
                                 message=f"A training image has more objects than max_boxes={config.max_boxes}")
  pad = config.max_boxes - n
  return {"image": image, "image_shape": new_hw,
          "boxes": tf.pad(boxes, [[0, pad], [0, 0]]),
          "labels": tf.pad(labels, [[0, pad]]),
          "valid": tf.range(config.max_boxes) < n}


def eval_features(example: Dict[str, tf.Tensor], config: InputConfig) -> Dict[str, tf.Tensor]:
  """Resized image plus the original-resolution ground truth (all objects, difficult flags kept)."""
  image, new_hw, scale_yx = _resize(example["image"], config)
  n = tf.shape(example["labels"])[0]
  return {"image": image, "image_shape": new_hw, "scale": scale_yx,
          "gt_boxes": example["boxes"], "gt_labels": example["labels"],
          "gt_difficult": example["difficult"], "gt_valid": tf.ones([n], tf.bool)}


def train_dataset(examples: tf.data.Dataset, config: InputConfig, seed: int = 0,
                  shuffle_buffer: int = 1024) -> tf.data.Dataset:
  """Infinite, shuffled, augmented, batched (images zero-padded to the batch's largest) training data."""
  ds = examples.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
  ds = tf.data.Dataset.zip((ds, tf.data.Dataset.random(seed=seed).batch(2)))
  ds = ds.map(lambda ex, s: train_features(ex, s, config), num_parallel_calls=_AUTOTUNE)
  ds = ds.padded_batch(config.batch_size, padded_shapes={
      "image": [None, None, 3], "image_shape": [2], "boxes": [config.max_boxes, 4],
      "labels": [config.max_boxes], "valid": [config.max_boxes]})
  return ds.prefetch(_AUTOTUNE)


def eval_dataset(examples: tf.data.Dataset, config: InputConfig,
                 max_images: Optional[int] = None) -> tf.data.Dataset:
  """Finite, ordered, batched evaluation data (ground truth padded per batch; `gt_valid` marks it)."""
  if max_images:
    examples = examples.take(max_images)
  ds = examples.map(lambda ex: eval_features(ex, config), num_parallel_calls=_AUTOTUNE, deterministic=True)
  ds = ds.padded_batch(config.batch_size, padded_shapes={
      "image": [None, None, 3], "image_shape": [2], "scale": [2], "gt_boxes": [None, 4],
      "gt_labels": [None], "gt_difficult": [None], "gt_valid": [None]})
  return ds.prefetch(_AUTOTUNE)
