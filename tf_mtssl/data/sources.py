"""Image sources: one spec string -> a tf.data stream of decoded RGB images.

Specs:
  `embedded`                the real photos of the embedded default data (`tf_mtssl.data.embedded`);
  `photos`                  those and the more varied photos of `embedded.photos_dir()` (natural-image
                            pretraining; none of them is in a probe set, `tf_mtssl.data.probe_sets`);
  `fashion_mnist`           the 53,000 unlabelled Fashion-MNIST training images that no probe split
                            holds (28x28 gray, given as RGB; `tf_mtssl.data.probe_sets`);
  `tfds:NAME[:SPLIT]`       a tensorflow-datasets dataset already prepared in `tfds_data_dir`
                            (never downloaded; SPLIT defaults to `train`), image feature `image`;
  a folder                  every .jpg/.jpeg/.png/.bmp/.gif below it (recursively);
  a TFRecord file or glob   `tf.train.Example`s with the encoded image under `image/encoded`
                            (TF Object Detection / slim convention) or `image`.

Unreadable, corrupt or truncated images are skipped, never a crash: decoding errors are dropped by
`ignore_errors` and counted by comparing stream positions (`scan` below), so every element carries
`num_corrupt`, the number skipped so far, which the trainer logs to TensorBoard.
"""

import glob
import os
from typing import List, Optional

import tensorflow as tf

from tf_mtssl.data import embedded
from tf_mtssl.tasks.base import NUM_CORRUPT_KEY

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
PHOTOS_SPEC = "photos"
FASHION_MNIST_SPEC = "fashion_mnist"
# Sources of gray still images: tasks that need colour (col) or video (ms) refuse them.
GRAY_SOURCES = (FASHION_MNIST_SPEC,)


def require_colour_source(spec: str, task: str, why: str) -> None:
  """Raises ValueError naming the task when `spec` is a gray source (`GRAY_SOURCES`)."""
  if spec in GRAY_SOURCES:
    raise ValueError(f"Task {task} cannot train on --data={spec}: {why}; {spec} holds gray still images. "
                     f"Train {task} on colour photos (e.g. 'photos' or 'embedded').")
_AUTOTUNE = tf.data.AUTOTUNE


def list_image_files(folder: str) -> List[str]:
  """Sorted image files below `folder`; raises naming the folder if missing or empty."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"Image folder not found: {folder}")
  files = sorted(
      os.path.join(dirpath, f) for dirpath, _, names in os.walk(folder) for f in names
      if f.lower().endswith(IMAGE_EXTENSIONS))
  if not files:
    raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found in folder: {folder}")
  return files


def list_tfrecord_files(pattern: str) -> List[str]:
  files = sorted(glob.glob(pattern))
  if not files:
    raise FileNotFoundError(f"No TFRecord files match: {pattern}")
  for f in files:
    if os.path.getsize(f) == 0:
      raise ValueError(f"Empty TFRecord file: {f}")
  return files


def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
  """Encoded JPEG/PNG/BMP/GIF bytes -> uint8 [H, W, 3]; gray and RGBA are converted to RGB."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _parse_example_image(serialized: tf.Tensor) -> tf.Tensor:
  features = tf.io.parse_single_example(serialized, {
      "image/encoded": tf.io.FixedLenFeature([], tf.string, default_value=""),
      "image": tf.io.FixedLenFeature([], tf.string, default_value=""),
  })
  return tf.where(tf.strings.length(features["image/encoded"]) > 0, features["image/encoded"],
                  features["image"])


def prepared_tfds_builder(name: str, data_dir: Optional[str], required_features=()):
  """The tensorflow-datasets builder of `name`, which must already be prepared in `data_dir`.

  Never downloads: an unprepared dataset is a FileNotFoundError naming where it was looked for.
  """
  import tensorflow_datasets as tfds  # imported here: only tfds sources need it (slow import)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # noqa: BLE001 - tfds raises many types; re-raise with the spec named
    raise ValueError(f"Unknown tensorflow-datasets dataset {name!r}: {e}") from e
  if not os.path.isdir(builder.data_dir):
    raise FileNotFoundError(
        f"tensorflow-datasets {name!r} is not prepared in {data_dir or '~/tensorflow_datasets'} "
        f"(looked for {builder.data_dir}); tf_mtssl never downloads: prepare it first and pass "
        "--tfds_data_dir.")
  for feature in required_features:
    if feature not in builder.info.features:
      raise ValueError(f"tensorflow-datasets {name!r} has no {feature!r} feature")
  return builder


def _tfds_encoded(name: str, split: str, data_dir: Optional[str]) -> tf.data.Dataset:
  import tensorflow_datasets as tfds
  builder = prepared_tfds_builder(name, data_dir, required_features=("image",))
  ds = builder.as_dataset(split=split, shuffle_files=True,
                          decoders={"image": tfds.decode.SkipDecoding()})
  return ds.map(lambda ex: ex["image"], num_parallel_calls=_AUTOTUNE)


def encoded_images(spec: str, *, split: str = "train", tfds_data_dir: Optional[str] = None) -> tf.data.Dataset:
  """Dataset of encoded image bytes (finite, unshuffled, except tfds which shuffles files)."""
  if spec == "embedded":
    spec = str(embedded.require(embedded.images_dir()))
  if spec == PHOTOS_SPEC:
    files = (list_image_files(str(embedded.require(embedded.images_dir()))) +
             list_image_files(str(embedded.require(embedded.photos_dir()))))
    return tf.data.Dataset.from_tensor_slices(files).map(tf.io.read_file)
  if spec.startswith("tfds:"):
    parts = spec[len("tfds:"):].split(":")
    if len(parts) > 2 or not parts[0]:
      raise ValueError(f"Bad tfds spec {spec!r}; expected tfds:NAME or tfds:NAME:SPLIT")
    return _tfds_encoded(parts[0], parts[1] if len(parts) == 2 else split, tfds_data_dir)
  if os.path.isdir(spec):
    return tf.data.Dataset.from_tensor_slices(list_image_files(spec)).map(tf.io.read_file)
  if any(c in spec for c in "*?[") or spec.endswith((".tfrecord", ".tfrecords")) or ".tfrecord-" in spec:
    files = list_tfrecord_files(spec)
    return tf.data.TFRecordDataset(files).map(_parse_example_image)
  if os.path.isfile(spec):
    raise ValueError(f"Data path {spec} is a single file; give a folder of images or a TFRecord glob")
  raise FileNotFoundError(f"Data path not found: {spec}")


def _count_skipped(last_position, element):
  """scan fn: positions are consecutive before decoding; a gap means elements were skipped."""
  position, decoded = element
  skipped = position - last_position - 1
  return position, (decoded, skipped)


def image_dataset(spec: str, *, seed: int = 0, split: str = "train", shuffle: bool = True,
                  repeat: bool = True, tfds_data_dir: Optional[str] = None,
                  input_context: Optional[tf.distribute.InputContext] = None,
                  shuffle_buffer: int = 2048, cache_decoded: Optional[bool] = None) -> tf.data.Dataset:
  """Stream of {"image": uint8 [H, W, 3], NUM_CORRUPT_KEY: int64 skipped so far}.

  Sharded per input pipeline under a distribution strategy, shuffled with `seed`, repeated.

  cache_decoded: decode every image once and repeat the decoded images from memory (decoding is
  most of a small source's per-image cost: 5 ms per embedded photo here, bench.input_pipeline).
  None (default): only for `embedded` (31 photos, about 50 MB decoded) and `photos` (80 photos of at
  most 1024 px, about 150 MB) when repeating. See
  `shuffle_repeat_decode` for what changes (only the corrupt-image count).
  """
  if spec == FASHION_MNIST_SPEC:  # decoded arrays already: no bytes to decode
    from tf_mtssl.data import probe_sets  # pylint: disable=g-import-not-at-top
    ds = tf.data.Dataset.from_tensor_slices(probe_sets.load_fashion_pretrain())
    if input_context is not None and input_context.num_input_pipelines > 1:
      ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    return shuffle_repeat_decode(ds, lambda gray: {"image": tf.repeat(gray[..., None], 3, axis=-1)}, seed=seed,
                                 shuffle=shuffle, shuffle_buffer=shuffle_buffer, repeat=repeat)
  ds = encoded_images(spec, split=split, tfds_data_dir=tfds_data_dir)
  if input_context is not None and input_context.num_input_pipelines > 1:
    ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
  if cache_decoded is None:
    cache_decoded = repeat and spec in ("embedded", PHOTOS_SPEC)
  return shuffle_repeat_decode(ds, lambda encoded: {"image": decode_rgb(encoded)}, seed=seed, shuffle=shuffle,
                               shuffle_buffer=shuffle_buffer, repeat=repeat, cache_decoded=cache_decoded)


def shuffle_repeat_decode(ds: tf.data.Dataset, decode_fn, *, seed: int, shuffle: bool = True,
                          shuffle_buffer: int = 2048, repeat: bool = True,
                          cache_decoded: bool = False) -> tf.data.Dataset:
  """Shuffles (with `seed`), repeats and decodes the finite dataset of raw elements `ds` with
  `decode_fn` (raw element -> dict of tensors), skipping and counting what does not decode
  (`decode_skipping_errors`).

  cache_decoded: decode every element once and repeat the decoded elements from memory, for small
  sources. The elements are the same, in the same order, as without the cache (the shuffle permutes
  the same number of elements with the same seed) when all decode; undecodable ones are skipped
  once, and every element carries their total number instead of a count that grows every epoch.
  """
  if not cache_decoded:
    if shuffle:
      ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
      ds = ds.repeat()
    return decode_skipping_errors(ds, decode_fn)
  decoded = decode_skipping_errors(ds, decode_fn).cache()
  total = _count_undecodable(ds, decoded)
  if shuffle:
    decoded = decoded.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  if repeat:
    decoded = decoded.repeat()
  return tf.data.Dataset.zip(decoded, total.repeat()).map(lambda e, n: {**e, NUM_CORRUPT_KEY: n})


def _count_undecodable(raw: tf.data.Dataset, decoded: tf.data.Dataset) -> tf.data.Dataset:
  """One element: how many elements of `raw` are missing from `decoded` (its cached decoding).

  Counted lazily, when first asked for. By then the shuffle buffer usually holds the whole first
  pass, so `decoded` is read back from its cache; otherwise this iterator decodes once more.
  """
  def count(ds):
    return ds.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1)
  return tf.data.Dataset.from_tensors(0).map(lambda _: count(raw) - count(decoded)).cache()


def decode_skipping_errors(ds: tf.data.Dataset, decode_fn) -> tf.data.Dataset:
  """Maps `decode_fn` (raw element -> dict of tensors) in parallel, dropping elements whose decoding
  fails (corrupt/truncated data) and adding NUM_CORRUPT_KEY: how many were dropped so far."""
  ds = ds.enumerate()
  ds = ds.map(lambda i, raw: (i, decode_fn(raw)), num_parallel_calls=_AUTOTUNE, deterministic=True)
  ds = ds.ignore_errors(log_warning=True)
  ds = ds.scan(tf.constant(-1, tf.int64), _count_skipped)
  return ds.scan(tf.constant(0, tf.int64),
                 lambda total, e: (total + e[1], {**e[0], NUM_CORRUPT_KEY: total + e[1]}))


def with_element_seeds(ds: tf.data.Dataset, seed: int) -> tf.data.Dataset:
  """Pairs every element with its own stateless seed (int64 [2]): reproducible random augmentation."""
  return tf.data.Dataset.zip((ds, tf.data.Dataset.random(seed=seed).batch(2)))
