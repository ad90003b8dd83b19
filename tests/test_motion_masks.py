"""Tests of the motion-mask generator (tf_mtssl.data.motion_masks, tf_mtssl.make_motion_masks)."""

import json
import os
import pathlib
import subprocess
import sys

import cv2
import numpy as np
import pytest
import tensorflow as tf

from tf_mtssl.data import motion_mask_records as mask_records
from tf_mtssl.data import motion_masks as mm

REPO = pathlib.Path(__file__).resolve().parents[1]
QUIET = dict(progress=False, log=lambda *a: None)


def _texture(rng, h, w, cell):
  """Smooth random colour texture plus fine noise: something optical flow can follow."""
  coarse = rng.uniform(0, 255, (max(2, h // cell), max(2, w // cell), 3)).astype(np.float32)
  tex = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 12, (h, w, 3))
  return np.clip(tex, 0, 255).astype(np.uint8)


def synthetic_video(path, pan=(0.0, 0.0), frames=20, h=96, w=128, seed=0, velocity=(2.5, 1.0),
                    object_size=(34, 26)):
  """Writes an MJPG video of a textured ellipse moving over a textured background seen by a camera
  panning by `pan` pixels per frame; returns the true masks (bool [h, w] per frame)."""
  rng = np.random.default_rng(seed)
  margin = int((abs(pan[0]) + abs(pan[1])) * frames) + 8
  background = _texture(rng, h + 2 * margin, w + 2 * margin, 6)
  ow, oh = object_size
  obj = _texture(rng, oh, ow, 3)
  support = np.zeros((oh, ow), np.uint8)
  cv2.ellipse(support, (ow // 2, oh // 2), (ow // 2 - 1, oh // 2 - 1), 0, 0, 360, 255, -1)
  writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (w, h))
  masks = []
  for t in range(frames):
    cam_x, cam_y = margin + pan[0] * t, margin + pan[1] * t  # camera origin in scene coordinates
    frame = cv2.warpAffine(background, np.float32([[1, 0, -cam_x], [0, 1, -cam_y]]), (w, h))
    shift = np.float32([[1, 0, 20 + velocity[0] * t + margin - cam_x], [0, 1, 30 + velocity[1] * t + margin - cam_y]])
    alpha = (cv2.warpAffine(support, shift, (w, h)).astype(np.float32) / 255)[..., None]
    frame = (frame * (1 - alpha) + cv2.warpAffine(obj, shift, (w, h)) * alpha).astype(np.uint8)
    writer.write(frame)
    masks.append(alpha[..., 0] >= 0.5)
  writer.release()
  return masks


def read_records(folder):
  """[(video id, frame index, height, width, parsed dict)] of every example in the folder's shards."""
  out = []
  for serialized in tf.data.TFRecordDataset(mask_records.list_shards(str(folder))):
    feature = tf.train.Example.FromString(serialized.numpy()).features.feature
    out.append((feature[mask_records.VIDEO_ID_KEY].bytes_list.value[0].decode(),
                feature[mask_records.FRAME_INDEX_KEY].int64_list.value[0], feature[mask_records.HEIGHT_KEY].int64_list.value[0],
                feature[mask_records.WIDTH_KEY].int64_list.value[0],
                {k: v.numpy() for k, v in mask_records.parse_example(serialized).items()}))
  return out


def mean_iou(folder, true_masks):
  ious = []
  for _, index, _, _, parsed in read_records(folder):
    pred, true = parsed["mask"][..., 0] > 127, true_masks[index]
    ious.append((pred & true).sum() / (pred | true).sum())
  return float(np.mean(ious))


@pytest.mark.parametrize("pan", [(0.0, 0.0), (1.5, 0.75)], ids=["static_camera", "slow_pan"])
def test_masks_match_the_moving_object(tmp_path, pan):
  true_masks = synthetic_video(tmp_path / "v.avi", pan=pan)
  summary = mm.generate(str(tmp_path / "v.avi"), str(tmp_path / "out"), mm.MaskOptions(frame_step=1), **QUIET)
  assert summary.targets == 16 and summary.kept >= 14, summary.text()
  assert mean_iou(tmp_path / "out", true_masks) >= 0.7


def test_pan_needs_camera_motion_compensation(tmp_path, monkeypatch):
  """Without the homography, the panning background moves faster than the object: the masks fail."""
  true_masks = synthetic_video(tmp_path / "v.avi", pan=(1.5, 0.75))
  monkeypatch.setattr(mm, "residual_motion", lambda flow, *a, **k: (np.linalg.norm(flow, axis=-1), 1.0))
  summary = mm.generate(str(tmp_path / "v.avi"), str(tmp_path / "out"), mm.MaskOptions(frame_step=1), **QUIET)
  assert summary.kept == 0 or mean_iou(tmp_path / "out", true_masks) < 0.5


def test_record_round_trip(tmp_path):
  synthetic_video(tmp_path / "clip one.avi", frames=12)
  opts = mm.MaskOptions(frame_step=3, examples_per_shard=2)
  summary = mm.generate(str(tmp_path), str(tmp_path / "out"), opts, debug_dir=str(tmp_path / "debug"),
                        debug_every=1, **QUIET)
  records = read_records(tmp_path / "out")
  assert summary.kept == len(records) == 3  # targets 2, 5, 8 (t-2 and t+2 must exist)
  assert sorted(p.name for p in (tmp_path / "out").glob("*.tfrecord")) == [
      "clip_one-00000-of-00002.tfrecord", "clip_one-00001-of-00002.tfrecord"]
  capture = cv2.VideoCapture(str(tmp_path / "clip one.avi"))
  frames = [capture.read()[1] for _ in range(12)]
  for video_id, index, height, width, parsed in records:
    assert video_id == "clip_one" and index in (2, 5, 8)
    assert parsed["image"].dtype == np.uint8 and parsed["image"].shape == (height, width, 3) == (96, 128, 3)
    assert parsed["mask"].dtype == np.uint8 and parsed["mask"].shape == (96, 128, 1)
    assert set(np.unique(parsed["mask"])) <= {0, 255}
    # The frame itself in RGB order, up to JPEG loss (compared after a blur: chroma subsampling of the
    # noisy texture dominates the pixel-wise error).
    blur = lambda x: cv2.blur(x.astype(np.float32), (5, 5))
    error = np.abs(blur(parsed["image"]) - blur(cv2.cvtColor(frames[index], cv2.COLOR_BGR2RGB))).mean()
    error_if_bgr = np.abs(blur(parsed["image"]) - blur(frames[index])).mean()
    assert error < 3 and error < error_if_bgr / 5, (error, error_if_bgr)
  assert len(list((tmp_path / "debug").glob("clip_one_*.png"))) == 3
  done = json.loads((tmp_path / "out" / mm.DONE_FILE).read_text())
  assert done["videos"]["clip_one"]["kept"] == 3


def test_resume_after_interruption(tmp_path, monkeypatch):
  videos = tmp_path / "videos"
  videos.mkdir()
  synthetic_video(videos / "a.avi", frames=10, seed=1)
  synthetic_video(videos / "b.avi", frames=10, seed=2)
  out = tmp_path / "out"
  real_frame_mask = mm.frame_mask
  calls = []

  def interrupted(*args, **kwargs):  # dies in the middle of the second video
    calls.append(1)
    if len(calls) == 8:  # a.avi has 6 target frames (2..7)
      raise KeyboardInterrupt
    return real_frame_mask(*args, **kwargs)

  monkeypatch.setattr(mm, "frame_mask", interrupted)
  with pytest.raises(KeyboardInterrupt):
    mm.generate(str(videos), str(out), mm.MaskOptions(frame_step=1), **QUIET)
  monkeypatch.setattr(mm, "frame_mask", real_frame_mask)
  done = json.loads((out / mm.DONE_FILE).read_text())
  assert list(done["videos"]) == ["a"]
  assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary shard left
  shard_a = out / done["videos"]["a"]["shards"][0]
  mtime = shard_a.stat().st_mtime_ns

  with pytest.raises(ValueError, match="flow_gap"):  # one dataset, one set of options
    mm.generate(str(videos), str(out), mm.MaskOptions(frame_step=1, flow_gap=1), resume=True, **QUIET)
  summary = mm.generate(str(videos), str(out), mm.MaskOptions(frame_step=1), resume=True, **QUIET)
  assert (summary.resumed, summary.done) == (1, 1) and summary.kept > 0
  assert shard_a.stat().st_mtime_ns == mtime
  assert {r[0] for r in read_records(out)} == {"a", "b"}
  again = mm.generate(str(videos), str(out), mm.MaskOptions(frame_step=1), resume=True, **QUIET)
  assert (again.resumed, again.done) == (2, 0)


def test_corrupt_and_truncated_videos_are_skipped(tmp_path):
  videos = tmp_path / "videos"
  videos.mkdir()
  synthetic_video(videos / "good.avi")
  (videos / "noise.avi").write_bytes(np.random.default_rng(0).bytes(20000))
  data = (videos / "good.avi").read_bytes()
  (videos / "truncated.avi").write_bytes(data[:len(data) // 2])
  logged = []
  summary = mm.generate(str(videos), str(tmp_path / "out"), mm.MaskOptions(frame_step=1), progress=False,
                        log=logged.append)
  reasons = dict(summary.failed)
  assert set(reasons) == {str(videos / "noise.avi"), str(videos / "truncated.avi")}
  assert "unreadable" in reasons[str(videos / "noise.avi")]
  assert "truncated" in reasons[str(videos / "truncated.avi")]
  assert sum("Skipping" in line for line in logged) == 2
  assert summary.done == 1 and {r[0] for r in read_records(tmp_path / "out")} == {"good"}


@pytest.mark.slow
def test_binary_fails_only_when_nothing_is_produced(tmp_path):
  (tmp_path / "bad.mp4").write_bytes(b"not a video at all")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  result = subprocess.run([sys.executable, "-m", "tf_mtssl.make_motion_masks", f"--videos={tmp_path}",
                           f"--output_dir={tmp_path / 'out'}", "--noprogress"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert "unreadable" in result.stdout and "no motion mask could be produced" in result.stderr


def test_bad_arguments_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    mm.list_videos(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="No video files"):
    mm.list_videos(str(tmp_path))
  with pytest.raises(ValueError, match="flow_preset"):
    mm.MaskOptions(flow_preset="slowest")
  with pytest.raises(ValueError, match="max_mask_fraction"):
    mm.MaskOptions(min_mask_fraction=0.6, max_mask_fraction=0.5)
  assert mm.video_ids([pathlib.Path("x/a b.mp4"), pathlib.Path("y/a b.avi")]) == ["a_b", "a_b-2"]
