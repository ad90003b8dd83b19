"""Labelled image sources for the linear evaluation (paper_spec 7.1).

Specs (`ClassificationSource(spec, ...)`):
  `embedded`             the tiny labelled set made from the embedded photos (below), splits train / val;
  `fashion_mnist`, `objects`  the probe sets of `tf_mtssl.data.probe_sets` (splits train / val / test,
                         reported on test; `groups(split)` names each example's source photo);
  `tfds:NAME`            a tensorflow-datasets classification set already prepared in `tfds_data_dir`
                         (e.g. `tfds:imagenet2012`; never downloaded), features `image` and `label`;
  a folder               ImageFolder layout `root/<split>/<label>/*.jpg`; class indices are the sorted
                         label folders of the training split;
  a TFRecord pattern     `tf.train.Example`s with `image/encoded` and `image/class/label` (slim / TPU
                         ImageNet convention); the pattern holds `{split}`, e.g.
                         `/data/imagenet/{split}-*` (split `train` / `validation`).

Every split is a finite, unshuffled `tf.data.Dataset` of {"image": uint8 [H, W, 3], "label": int32,
NUM_CORRUPT_KEY: int64 (images skipped so far)}: unreadable images are skipped and counted, as in
`tf_mtssl.data.sources`.

The embedded set (so that `python -m tf_mtssl.evaluate_linear` runs out of the box): every embedded
photo is one class named after its file stem (`skimage_astronaut` -> `astronaut`), except the photo
pairs of one scene, which share a class (`SCENE_OF`: leuvenA/B, graf1/3, aero1/3): 28 classes from the
31 photos. Examples are square crops, made on the fly and deterministic (stateless random numbers
seeded by a hash of the file stem and the crop index): each photo is cut across its longer axis into
a training region (the first 2/3) and a validation region (the last 1/3), so training and validation
crops never share a pixel; crops of both splits have a side uniform in [0.6, 1.0] x the shorter side
of the validation region, and are resized to `image_size`. `EMBEDDED_CROPS` crops per class per split
(24 train / 8 val), divided among the photos of the class.
"""

import os
import re
from typing import Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from tf_mtssl.data import embedded, probe_sets, sources
from tf_mtssl.tasks.base import NUM_CORRUPT_KEY

_AUTOTUNE = tf.data.AUTOTUNE
KINDS = ("embedded", "probe_set", "tfds", "folder", "tfrecord")
# The evaluation split each kind uses when none is given.
DEFAULT_EVAL_SPLIT = {"embedded": "val", "probe_set": "test", "tfds": "validation", "folder": "val",
                      "tfrecord": "validation"}

# Embedded set (see the module docstring).
EMBEDDED_SPLITS = ("train", "val")
EMBEDDED_CROPS = {"train": 24, "val": 8}      # per class [I]: a few hundred examples in all
EMBEDDED_TRAIN_FRACTION = 2.0 / 3.0           # of the longer axis; the rest is the validation region
EMBEDDED_CROP_SCALE = (0.6, 1.0)              # x the shorter side of the validation region
SCENE_OF = {"leuvenA": "leuven", "leuvenB": "leuven", "graf1": "graf", "graf3": "graf",
            "aero1": "aero", "aero3": "aero"}  # two photos of one scene: one class


def source_kind(spec: str) -> str:
  if spec == "embedded":
    return "embedded"
  if spec in probe_sets.PROBE_SETS:
    return "probe_set"
  if spec.startswith("tfds:"):
    return "tfds"
  if "{split}" in spec:
    return "tfrecord"
  if os.path.isdir(spec):
    return "folder"
  if any(c in spec for c in "*?[") or ".tfrecord" in spec:
    raise ValueError(f"TFRecord data {spec!r} must hold a '{{split}}' placeholder naming the split, "
                     "e.g. /data/imagenet/{split}-*")
  raise FileNotFoundError(f"Classification data not found: {spec} (expected 'embedded', 'tfds:NAME', "
                          "an ImageFolder directory root/<split>/<label>/*, or a TFRecord pattern with "
                          "'{split}')")


def _stem_label(path: str) -> str:
  stem = os.path.splitext(os.path.basename(path))[0]
  stem = re.sub(r"^(skimage|opencv)_", "", stem)
  return SCENE_OF.get(stem, stem)


def embedded_photos() -> Tuple[List[str], List[str]]:
  """(photo files, class name of each) of the embedded set; class names sorted give the indices."""
  files = sources.list_image_files(str(embedded.require(embedded.images_dir())))
  return files, [_stem_label(f) for f in files]


def _decode_with_skips(ds: tf.data.Dataset) -> tf.data.Dataset:
  """(encoded, label) -> {"image", "label", NUM_CORRUPT_KEY}; corrupt images dropped and counted."""
  ds = ds.enumerate().map(lambda i, e: (i, sources.decode_rgb(e[0]), e[1]),
                          num_parallel_calls=_AUTOTUNE, deterministic=True)
  ds = ds.ignore_errors(log_warning=True)

  def count(state, element):
    last, total = state
    i, image, label = element
    total = total + i - last - 1
    return (i, total), {"image": image, "label": tf.cast(label, tf.int32), NUM_CORRUPT_KEY: total}

  return ds.scan((tf.constant(-1, tf.int64), tf.constant(0, tf.int64)), count)


def _region_crop(image: tf.Tensor, split: str, seed: tf.Tensor, size: int) -> tf.Tensor:
  """One crop of the embedded set: inside the split's region of the photo, resized to `size`."""
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  landscape = w >= h
  long_side = tf.maximum(h, w)
  cut = tf.cast(tf.cast(long_side, tf.float32) * EMBEDDED_TRAIN_FRACTION, tf.int32)
  # Region [start, end) along the longer axis; the whole of the shorter axis.
  start, end = (0, cut) if split == "train" else (cut, long_side)
  short = tf.minimum(h, w)
  val_short = tf.minimum(short, long_side - cut)
  seeds = tf.random.experimental.stateless_split(seed, 3)
  frac = tf.random.stateless_uniform([], seeds[0], *EMBEDDED_CROP_SCALE)
  side = tf.maximum(1, tf.cast(frac * tf.cast(val_short, tf.float32), tf.int32))
  along = start + tf.random.stateless_uniform([], seeds[1], 0, end - start - side + 1, dtype=tf.int32)
  across = tf.random.stateless_uniform([], seeds[2], 0, short - side + 1, dtype=tf.int32)
  y, x = tf.cond(landscape, lambda: (across, along), lambda: (along, across))
  crop = image[y:y + side, x:x + side]
  crop = tf.image.resize(crop, [size, size], method="bilinear", antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(crop), 0, 255), tf.uint8)


class ClassificationSource:
  """A labelled image source with its class list; `dataset(split)` reads one split.

  Args:
    spec: see the module docstring.
    train_split: the split whose label folders define the classes (ImageFolder) or whose labels are
      scanned when `num_classes` is 0 (TFRecords).
    tfds_data_dir: where prepared tensorflow-datasets live (None: the tfds default).
    label_offset: subtracted from TFRecord labels (slim's ImageNet TFRecords use 1..1000: pass 1).
    num_classes: number of classes of TFRecord data; 0 scans the training split's labels once.
    image_size: side of the embedded set's crops.
  """

  def __init__(self, spec: str, *, train_split: str = "train", tfds_data_dir: Optional[str] = None,
               label_offset: int = 0, num_classes: int = 0, image_size: int = 224):
    self.spec, self.kind = spec, source_kind(spec)
    self.train_split, self.tfds_data_dir = train_split, tfds_data_dir
    self.label_offset, self.image_size = int(label_offset), int(image_size)
    if num_classes < 0:
      raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    self.class_names: Optional[List[str]] = None
    if self.kind == "embedded":
      _, labels = embedded_photos()
      self.class_names = sorted(set(labels))
    elif self.kind == "probe_set":
      self.class_names = probe_sets.class_names(spec)
    elif self.kind == "tfds":
      label = self._tfds_builder().info.features["label"]
      self.class_names = list(label.names) if label.names else None
      num_classes = label.num_classes
    elif self.kind == "folder":
      root = os.path.join(spec, train_split)
      if not os.path.isdir(root):
        raise FileNotFoundError(f"ImageFolder split not found: {root} (expected root/<split>/<label>/*)")
      self.class_names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
      if not self.class_names:
        raise FileNotFoundError(f"No label folders in {root} (expected root/<split>/<label>/*)")
    elif num_classes == 0:  # TFRecords without --num_classes: one pass over the labels
      labels = self._tfrecord_examples(train_split).map(lambda e, l: l)
      num_classes = int(labels.reduce(tf.constant(-1, tf.int64), tf.maximum)) + 1
      if num_classes < 2:
        raise ValueError(f"TFRecords {self._pattern(train_split)} hold fewer than 2 classes")
    self.num_classes = num_classes if self.kind in ("tfds", "tfrecord") else len(self.class_names)

  def default_eval_split(self) -> str:
    return DEFAULT_EVAL_SPLIT[self.kind]

  def groups(self, split: str) -> Optional[List[int]]:
    """The source photo of every example of `split`, in dataset order (probe sets), else None: the
    examples are then taken as independent for standard errors."""
    if self.kind != "probe_set":
      return None
    return probe_sets.load_split(self.spec, split)[2].tolist()

  # ---- readers --------------------------------------------------------------------------------
  def _tfds_builder(self):
    name = self.spec[len("tfds:"):]
    if not name or ":" in name:
      raise ValueError(f"Bad tfds spec {self.spec!r}; expected tfds:NAME (splits come from the "
                       "--train_split / --eval_split flags)")
    return sources.prepared_tfds_builder(name, self.tfds_data_dir, required_features=("image", "label"))

  def _pattern(self, split: str) -> str:
    return self.spec.replace("{split}", split)

  def _tfrecord_examples(self, split: str) -> tf.data.Dataset:
    files = sources.list_tfrecord_files(self._pattern(split))

    def parse(serialized):
      f = tf.io.parse_single_example(serialized, {
          "image/encoded": tf.io.FixedLenFeature([], tf.string),
          "image/class/label": tf.io.FixedLenFeature([], tf.int64)})
      return f["image/encoded"], f["image/class/label"] - self.label_offset

    return tf.data.TFRecordDataset(files).map(parse, num_parallel_calls=_AUTOTUNE)

  def _folder_examples(self, split: str) -> tf.data.Dataset:
    root = os.path.join(self.spec, split)
    if not os.path.isdir(root):
      raise FileNotFoundError(f"ImageFolder split not found: {root} (expected root/<split>/<label>/*)")
    index = {name: i for i, name in enumerate(self.class_names)}
    files, labels = [], []
    for name in sorted(os.listdir(root)):
      if not os.path.isdir(os.path.join(root, name)):
        continue
      if name not in index:
        raise ValueError(f"Label folder {os.path.join(root, name)} is not a class of the training split "
                         f"{os.path.join(self.spec, self.train_split)}")
      found = sources.list_image_files(os.path.join(root, name))
      files += found
      labels += [index[name]] * len(found)
    if not files:
      raise FileNotFoundError(f"No images in {root}")
    return tf.data.Dataset.from_tensor_slices((files, labels)).map(
        lambda f, l: (tf.io.read_file(f), l), num_parallel_calls=_AUTOTUNE)

  def _embedded(self, split: str) -> tf.data.Dataset:
    if split not in EMBEDDED_SPLITS:
      raise ValueError(f"The embedded classification set has splits {EMBEDDED_SPLITS}, got {split!r}")
    files, labels = embedded_photos()
    index = {name: i for i, name in enumerate(self.class_names)}
    photos_per_class: Dict[str, int] = {}
    for name in labels:
      photos_per_class[name] = photos_per_class.get(name, 0) + 1
    # Crops of a class are divided among its photos (the first photos take the remainder).
    counts, seen = [], {}
    for name in labels:
      k = seen.get(name, 0)
      seen[name] = k + 1
      per, extra = divmod(EMBEDDED_CROPS[split], photos_per_class[name])
      counts.append(per + (1 if k < extra else 0))
    stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
    class_of = [index[n] for n in labels]
    size, split_id = self.image_size, EMBEDDED_SPLITS.index(split)

    def crops(photo):
      i = photo["label"]  # the photo's position in `files` (see below)
      key = tf.strings.to_hash_bucket_fast(tf.gather(stems, i), 2**31 - 1)
      label = tf.gather(class_of, i)
      count = tf.cast(tf.gather(counts, i), tf.int64)
      return tf.data.Dataset.range(count).map(lambda k: {
          "image": _region_crop(photo["image"], split, tf.stack([key, split_id * 100_000 + k]), size),
          "label": label, NUM_CORRUPT_KEY: photo[NUM_CORRUPT_KEY]})

    photos = tf.data.Dataset.from_tensor_slices((files, list(range(len(files))))).map(
        lambda f, i: (tf.io.read_file(f), i))
    return _decode_with_skips(photos).flat_map(crops)

  def dataset(self, split: str) -> tf.data.Dataset:
    """Finite, unshuffled dataset of one split (see the module docstring)."""
    if self.kind == "embedded":
      return self._embedded(split)
    if self.kind == "probe_set":
      images, labels, _ = probe_sets.load_split(self.spec, split)
      return tf.data.Dataset.from_tensor_slices({
          "image": images, "label": labels, NUM_CORRUPT_KEY: np.zeros(len(labels), np.int64)})
    if self.kind == "tfds":
      import tensorflow_datasets as tfds
      builder = self._tfds_builder()
      try:
        ds = builder.as_dataset(split=split, shuffle_files=False,
                                decoders={"image": tfds.decode.SkipDecoding()})
      except (ValueError, KeyError) as e:  # an unknown split; re-raised naming the known ones
        raise ValueError(f"{self.spec} has no split {split!r}; splits: {sorted(builder.info.splits)}") from e
      ds = ds.map(lambda ex: (ex["image"], ex["label"]), num_parallel_calls=_AUTOTUNE)
    elif self.kind == "folder":
      ds = self._folder_examples(split)
    else:
      ds = self._tfrecord_examples(split)
    ds = _decode_with_skips(ds)
    num_classes = self.num_classes

    def check(ex):
      label = tf.debugging.assert_less(ex["label"], num_classes, message=f"label >= num_classes "
                                       f"({num_classes}) in {self.spec} split {split}")
      with tf.control_dependencies([label, tf.debugging.assert_non_negative(ex["label"])]):
        return dict(ex, label=tf.identity(ex["label"]))

    return ds.map(check, num_parallel_calls=_AUTOTUNE)

  def describe(self) -> dict:
    return {"spec": self.spec, "kind": self.kind, "num_classes": self.num_classes,
            "class_names": self.class_names[:50] if self.class_names else None}


# ---- preprocessing of the probe (paper_spec 7.1 [I]) -------------------------------------------
def center_crop(image: tf.Tensor, size: int, crop_fraction: float = 0.875) -> tf.Tensor:
  """Resize the shorter side to size / crop_fraction, then the central size x size crop.

  uint8/float [H, W, 3] -> float32 [size, size, 3] in [0, 255]. paper_spec 7.1 [I]: 224 centre crops
  (the usual 256 -> 224 ratio, 0.875).
  """
  if not 0.0 < crop_fraction <= 1.0:
    raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  scale = (size / crop_fraction) / tf.minimum(h, w)
  new_h = tf.maximum(size, tf.cast(tf.round(h * scale), tf.int32))
  new_w = tf.maximum(size, tf.cast(tf.round(w * scale), tf.int32))
  image = tf.image.resize(image, [new_h, new_w], method="bilinear", antialias=True)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return tf.ensure_shape(image[top:top + size, left:left + size], [size, size, 3])
