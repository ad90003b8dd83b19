"""The motion-mask record format (paper_spec 3.4): what `tf_mtssl.data.motion_masks` writes and the `ms`
task reads. Sharded TFRecords of `tf.train.Example`, one per target frame: the frame as JPEG and its
mask as a 1-channel PNG at the frame's resolution (0 = static, 255 = moving), with the video id, the
frame's index and its size."""

import glob
import os
from typing import Dict, List

import cv2
import numpy as np
import tensorflow as tf

# tf.train.Example feature names.
IMAGE_KEY = "image/encoded"  # JPEG bytes of the frame (RGB)
MASK_KEY = "mask/encoded"  # 1-channel PNG, same size as the frame, 0 = static, 255 = moving
VIDEO_ID_KEY = "video/id"  # bytes
FRAME_INDEX_KEY = "video/frame_index"  # int64, 0-based index of the frame in the source video
HEIGHT_KEY = "image/height"  # int64
WIDTH_KEY = "image/width"  # int64

SHARD_PATTERN = "*.tfrecord"  # what the ms task globs in the output folder


def parse_example(serialized: tf.Tensor) -> Dict[str, tf.Tensor]:
  """Serialized tf.train.Example -> {"image": uint8 [H, W, 3], "mask": uint8 [H, W, 1]} (mask 0/255)."""
  features = tf.io.parse_single_example(serialized, {
      IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
      MASK_KEY: tf.io.FixedLenFeature([], tf.string),
  })
  image = tf.io.decode_jpeg(features[IMAGE_KEY], channels=3)
  mask = tf.io.decode_png(features[MASK_KEY], channels=1)
  image.set_shape([None, None, 3])
  mask.set_shape([None, None, 1])
  return {"image": image, "mask": mask}


def list_shards(folder: str) -> List[str]:
  """Finished shards in a mask folder (temporary files of an unfinished run are not matched)."""
  files = sorted(glob.glob(os.path.join(folder, SHARD_PATTERN)))
  if not files:
    raise FileNotFoundError(f"No motion-mask shards ({SHARD_PATTERN}) in {folder}; run "
                            "`python -m tf_mtssl.make_motion_masks` (or python -m tf_mtssl.prepare_embedded).")
  return files


def _encode(ext: str, image: np.ndarray, params=()) -> bytes:
  ok, data = cv2.imencode(ext, image, list(params))
  if not ok:
    raise ValueError(f"Encoding a frame as {ext} failed")
  return data.tobytes()


def make_example(frame_bgr: np.ndarray, mask: np.ndarray, video_id: str, frame_index: int,
                 jpeg_quality: int = 95) -> tf.train.Example:
  """The tf.train.Example of one frame and its 0/255 mask."""
  feature = {
      IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[
          _encode(".jpg", frame_bgr, (cv2.IMWRITE_JPEG_QUALITY, jpeg_quality))])),
      MASK_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[_encode(".png", mask)])),
      VIDEO_ID_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[video_id.encode()])),
      FRAME_INDEX_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[frame_index])),
      HEIGHT_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[frame_bgr.shape[0]])),
      WIDTH_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[frame_bgr.shape[1]])),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature))
