import os

import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from tf_mtssl.data import sources


def take(ds, n):
  return [e for e in ds.take(n).as_numpy_iterator()]


def test_corrupt_and_truncated_images_are_skipped_and_counted(tmp_path):
  folder = helpers.write_photos(tmp_path / "photos", size=48)
  good = open(os.path.join(folder, "coffee.png"), "rb").read()
  open(os.path.join(folder, "zz_truncated.png"), "wb").write(good[: len(good) // 3])
  open(os.path.join(folder, "zz_garbage.jpg"), "wb").write(b"not an image at all")
  elements = take(sources.image_dataset(folder, shuffle=False, repeat=True), 9)
  assert all(e["image"].ndim == 3 and e["image"].shape[-1] == 3 for e in elements)
  # Per pass: 4 good files, then the 2 bad ones (sorted names) are skipped.
  assert [int(e["num_corrupt"]) for e in elements] == [0, 0, 0, 0, 2, 2, 2, 2, 4]


def test_cached_decoding_gives_the_same_stream_and_counts_corrupt_images_once(tmp_path):
  folder = helpers.write_photos(tmp_path / "photos", size=24)
  open(os.path.join(folder, "zz_garbage.jpg"), "wb").write(b"not an image at all")
  plain = take(sources.image_dataset(folder, seed=3, cache_decoded=False), 14)
  cached = take(sources.image_dataset(folder, seed=3, cache_decoded=True), 14)
  assert [e["image"].shape for e in plain] == [e["image"].shape for e in cached]
  good = [e["image"].tobytes() for e in plain]
  # Without the cache the corrupt file (the last one) is re-read and counted every epoch; with it, it
  # is counted once, and every element carries that total.
  assert int(plain[-1]["num_corrupt"]) >= 2
  assert [int(e["num_corrupt"]) for e in cached] == [1] * 14
  # 4 good images per epoch, each epoch a permutation of them.
  assert all(sorted(good[i:i + 4]) == sorted(good[:4]) for i in (0, 4, 8))
  assert sorted(e["image"].tobytes() for e in cached[:12]) == sorted(good[:12])
  # Without corrupt files the cached stream is the uncached one, image for image.
  os.remove(os.path.join(folder, "zz_garbage.jpg"))
  assert [e["image"].tobytes() for e in take(sources.image_dataset(folder, seed=5, cache_decoded=True), 10)] == \
      [e["image"].tobytes() for e in take(sources.image_dataset(folder, seed=5, cache_decoded=False), 10)]


def test_gray_and_rgba_images_become_rgb(tmp_path):
  import skimage.io
  skimage.io.imsave(tmp_path / "gray.png", np.full((20, 30), 128, np.uint8), check_contrast=False)
  skimage.io.imsave(tmp_path / "rgba.png", np.full((20, 30, 4), 200, np.uint8), check_contrast=False)
  shapes = {e["image"].shape for e in take(sources.image_dataset(str(tmp_path), repeat=False), 2)}
  assert shapes == {(20, 30, 3)}


def test_tfrecord_source(tmp_path):
  folder = helpers.write_photos(tmp_path / "photos", size=32, names=("coffee",))
  encoded = open(os.path.join(folder, "coffee.png"), "rb").read()
  path = str(tmp_path / "images.tfrecord")
  with tf.io.TFRecordWriter(path) as w:
    for key in ("image/encoded", "image"):
      w.write(tf.train.Example(features=tf.train.Features(feature={
          key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded]))})).SerializeToString())
  elements = take(sources.image_dataset(str(tmp_path / "*.tfrecord"), repeat=False), 5)
  assert len(elements) == 2 and elements[0]["image"].shape == (32, 42, 3)


@pytest.mark.parametrize("spec,error,match", [
    ("/nonexistent/folder", FileNotFoundError, "/nonexistent/folder"),
    ("/nonexistent/*.tfrecord", FileNotFoundError, "nonexistent"),
    ("tfds:bad:spec:x", ValueError, "tfds"),
])
def test_bad_specs_name_the_problem(spec, error, match):
  with pytest.raises(error, match=match):
    sources.encoded_images(spec)


def test_empty_folder_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    sources.encoded_images(str(tmp_path))


def test_unprepared_tfds_dataset_is_an_error_not_a_download(tmp_path):
  with pytest.raises(FileNotFoundError, match="not prepared"):
    sources.encoded_images("tfds:mnist", tfds_data_dir=str(tmp_path))
