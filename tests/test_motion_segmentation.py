import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from tf_mtssl.data import motion_mask_records
from tf_mtssl.tasks import motion_segmentation as ms


def write_shard(path, n=4, size=(72, 96), corrupt_every=0):
  """Frames whose red square is exactly the moving mask, so alignment can be checked after crops."""
  rng = np.random.default_rng(0)
  with tf.io.TFRecordWriter(str(path)) as w:
    for i in range(n):
      frame = rng.integers(0, 60, size=size + (3,), dtype=np.uint8)  # dark textured background (BGR)
      mask = np.zeros(size, np.uint8)
      y, x = rng.integers(5, 30), rng.integers(5, 50)
      mask[y:y + 30, x:x + 36] = 255
      frame[mask > 0] = (0, 0, 255)  # red in BGR
      w.write(motion_mask_records.make_example(frame, mask, "synthetic", i).SerializeToString())
      if corrupt_every and i % corrupt_every == 0:
        w.write(b"this is not a tf.train.Example")
  return str(path)


def test_crops_keep_frame_and_mask_aligned(tmp_path):
  data = write_shard(tmp_path / "masks.tfrecord")
  task = ms.MotionSegmentationTask(ms.MotionSegmentationOptions(predict_stride=8), image_size=64)
  batch = helpers.first_batch(task, data, batch_size=4)
  assert batch["frame"].shape == (4, 64, 64, 3) and batch["mask"].shape == (4, 8, 8, 1)
  red = tf.image.resize(tf.cast((batch["frame"][..., 0] > 150) & (batch["frame"][..., 2] < 100),
                                tf.float32)[..., None], [8, 8], method="area").numpy()
  # JPEG blurs the square's border a little; the area-averaged maps agree closely.
  assert np.abs(red - batch["mask"].numpy()).mean() < 0.08
  assert batch["mask"].numpy().max() > 0.9 and batch["mask"].numpy().min() == 0.0


def test_corrupt_records_are_skipped_and_counted(tmp_path):
  data = write_shard(tmp_path / "masks.tfrecord", n=4, corrupt_every=2)
  task = ms.MotionSegmentationTask(image_size=32)
  batches = iter(task.build_dataset(data, 4, seed=0))
  counts = [int(tf.reduce_max(next(batches)["num_corrupt"])) for _ in range(3)]
  assert counts[-1] > 0 and counts == sorted(counts)


@pytest.mark.parametrize("stride", [8, 16])
def test_head_predicts_one_logit_per_location(stride):
  task = ms.MotionSegmentationTask(ms.MotionSegmentationOptions(head_width=8, predict_stride=stride), image_size=64)
  out = task.build_head((4, 4, 128))(np.zeros((2, 4, 4, 128), np.float32))
  assert tuple(out.shape) == (2, 64 // stride, 64 // stride, 1) and out.dtype == "float32"


def test_mask_iou():
  t = tf.constant([[1.0, 1.0, 0.0, 0.0]])
  assert float(ms.mask_iou(t, tf.constant([[0.9, 0.1, 0.8, 0.0]]))) == pytest.approx(1 / 3)
  assert float(ms.mask_iou(tf.zeros([1, 4]), tf.zeros([1, 4]))) == 1.0


def test_an_embedded_batch_has_moving_and_static_pixels():
  """(The loss falling when this batch is overfitted: tests/test_task_contract.py.)"""
  task = helpers.tiny_task("ms")
  batch = helpers.first_batch(task, "embedded", batch_size=4)
  moving = float((batch["mask"].numpy() > 0).mean())
  assert 0.0 < moving < 1.0, moving  # both moving and static pixels to learn from


def test_missing_mask_source_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    ms.MotionSegmentationTask(image_size=32).build_dataset(str(tmp_path), 2)


def test_example_equals_one_crop_of_frame_and_mask_joined():
  """Frame and mask cropped apart, then joined and resized together: the same example as the crop
  of the 4-channel frame + mask (`preprocessing.random_crop_resize`)."""
  from tf_mtssl.model import preprocessing
  rng = np.random.default_rng(1)
  record = {"image": tf.constant(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)),
            "mask": tf.constant(255 * rng.integers(0, 2, (60, 90, 1), dtype=np.uint8)),
            "num_corrupt": tf.constant(0, tf.int64)}
  task = ms.MotionSegmentationTask(ms.MotionSegmentationOptions(predict_stride=8), image_size=48)
  for i in range(4):
    seed = tf.constant([i, 3])
    example = task.example_from_record(record, seed)
    both = preprocessing.random_crop_resize(tf.concat([record["image"], record["mask"]], -1), 48, seed,
                                            task.options.min_crop_scale)
    np.testing.assert_array_equal(example["frame"], both[..., :3])
    expected_mask = tf.image.resize(both[..., 3:] / 255.0, [6, 6], method="area")
    np.testing.assert_array_equal(example["mask"], tf.clip_by_value(expected_mask, 0.0, 1.0))
