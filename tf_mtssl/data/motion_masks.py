"""Motion masks from videos: the targets of the motion-segmentation task (paper_spec 3.4).

The originals got their masks from uNLC (Pathak et al., optical flow + non-local consensus) or, as
recalled for this paper, from Improved Dense Trajectories (Wang & Schmid 2013: tracks with camera-motion
compensation by a homography fitted with RANSAC; points on tracks that still move are "moving").
Neither is available offline here, so ours is an approximation of the IDT idea on dense flow, chosen
because it is fast on a CPU (DIS flow: ~1000 pairs/s at 256 px) and needs no training:

  1. Frames are resized so the shorter side is `short_side` (never up-scaled). For a target frame t,
     dense optical flow (OpenCV DIS) is computed from t to t+gap and from t to t-gap, so both flows
     live on frame t's pixel grid and the mask is aligned with frame t.
  2. Camera-motion compensation: a global homography is fitted to each flow field with RANSAC (as IDT
     does with its matches); the motion it explains is subtracted, leaving the residual motion. A
     frame whose homography explains too few flow vectors (`min_inlier_fraction`) is dropped: the
     camera motion could not be separated from the object motion.
  3. Adaptive threshold: a pixel moves in one direction if its residual exceeds
     max(`min_motion`, median + `mad_k` * 1.4826 * MAD) of that residual map (robust noise level of
     the mostly static background; the floor stops flow noise becoming "motion" in static shots).
  4. Temporal consistency: a pixel is moving only if it moves w.r.t. both the previous and the next
     frame (forward/backward agreement). This removes the halos of occlusion/disocclusion in front of
     and behind an object (each appears in one direction only) and one-pair flow glitches.
  5. Clean-up: morphological opening then closing (kernel relative to the image size), connected
     components smaller than `min_component_fraction` of the image removed, holes filled.
  6. Frames whose mask covers less than `min_mask_fraction` or more than `max_mask_fraction` of the
     image are uninformative (nothing moves / the camera fit failed) and dropped; the reasons are counted.

Inferred choices (not from the paper): all thresholds and sizes are ours, checked on synthetic videos
with known masks (tests/test_motion_masks.py) and on vtest.avi overlays.

Output: sharded TFRecords of `tf.train.Example` with the feature names below (frame as JPEG, mask as a
1-channel PNG at the frame's resolution, 0 = static, 255 = moving). Shards of one video are written to
temporary names and renamed when the whole video is done; `done.json` in the output folder lists the
finished videos with their options and counts, so an interrupted run resumes video by video.
`parse_example` decodes the records for the `ms` task.
"""

import collections
import dataclasses
import functools
import glob
import json
import os
import pathlib
import re
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from tf_mtssl.core import configs, files
from tf_mtssl.data.motion_mask_records import make_example

DONE_FILE = "done.json"
VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")
DIS_PRESETS = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
               "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}
DROP_REASONS = ("too_little_motion", "too_much_motion", "camera_fit_failed")


@dataclasses.dataclass(frozen=True)
class MaskOptions:
  """Settings of the mask generator (all inferred choices, see the module docstring)."""
  short_side: int = configs.field(256, "Frames are resized so the shorter side is this many pixels (never up-scaled); "
                                  "masks and stored frames have this size. 0 = native size.")
  frame_step: int = configs.field(2, "One target frame every N frames (neighbouring frames are near-duplicates).")
  flow_gap: int = configs.field(2, "Flow is computed from frame t to t-gap and t+gap (temporal consistency over both).")
  flow_preset: str = configs.field("fast", f"OpenCV DIS optical-flow preset, one of {sorted(DIS_PRESETS)}.")
  flow_size: int = configs.field(128, "Shorter side (pixels) of the finest level DIS computes flow at: its finest pyramid scale "
                                  "is chosen per video as the nearest power of two from the working size (DIS presets stop "
                                  "at 1/4 or 1/2 resolution, too coarse for small objects).")
  ransac_threshold: float = configs.field(1.0, "RANSAC reprojection threshold (pixels) of the camera-motion homography.")
  min_inlier_fraction: float = configs.field(0.6, "Frames whose homography explains fewer flow vectors than this fraction are dropped.")
  min_motion: float = configs.field(1.0, "Floor of the adaptive threshold on residual motion, in pixels at the working size.")
  mad_k: float = configs.field(5.0, "Adaptive threshold: median + mad_k * 1.4826 * MAD of the residual motion.")
  morph_fraction: float = configs.field(0.015, "Morphological opening/closing kernel size as a fraction of the shorter side.")
  min_component_fraction: float = configs.field(0.002, "Moving blobs smaller than this fraction of the image are removed.")
  min_mask_fraction: float = configs.field(0.005, "Frames whose mask covers less than this fraction of the image are dropped.")
  max_mask_fraction: float = configs.field(0.5, "Frames whose mask covers more than this fraction of the image are dropped.")
  max_frames: int = configs.field(0, "Read at most this many frames per video (0 = all).")
  jpeg_quality: int = configs.field(95, "JPEG quality of stored frames.")
  examples_per_shard: int = configs.field(1000, "At most this many examples per TFRecord shard (shards are per video).")
  keep_truncated: bool = configs.field(False, "Keep the masks of videos that end before their declared length (default: skip them).")

  def __post_init__(self):
    if self.flow_preset not in DIS_PRESETS:
      raise ValueError(f"flow_preset must be one of {sorted(DIS_PRESETS)}, got {self.flow_preset!r}")
    for name in ("frame_step", "flow_gap", "flow_size", "examples_per_shard"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    for name in ("short_side", "max_frames"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    if not 0 <= self.min_mask_fraction < self.max_mask_fraction <= 1:
      raise ValueError(f"Need 0 <= min_mask_fraction < max_mask_fraction <= 1, got "
                       f"{self.min_mask_fraction}, {self.max_mask_fraction}")
    if not 0 <= self.min_inlier_fraction <= 1:
      raise ValueError(f"min_inlier_fraction must be in [0, 1], got {self.min_inlier_fraction}")
    if not 1 <= self.jpeg_quality <= 100:
      raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """Which videos, written where (`generate`'s arguments besides the options)."""
  videos: str = configs.field("data/embedded/videos", "A video file, a folder (searched recursively) or a glob of "
                              "video files.")
  output_dir: str = configs.field("data/motion_masks", "Folder for the TFRecord shards and done.json.")
  resume: bool = configs.field(False, "Skip videos already finished in --output_dir (listed in done.json).")
  debug_dir: str = configs.field("", "If set, overlays (mask in red | residual motion) are written here.")
  debug_every: int = configs.field(25, "Write a debug overlay every this many target frames per video.")
  progress: bool = configs.field(True, "Show a progress bar per video.")


# ---------------------------------------------------------------------------------------------------
# The mask of one frame.


def _dis(preset: str, short_side: int, flow_size: int):
  """DIS flow engine whose finest pyramid level has a shorter side of about `flow_size` pixels."""
  engine = cv2.DISOpticalFlow_create(DIS_PRESETS[preset])
  engine.setFinestScale(int(max(0, round(np.log2(max(short_side, 1) / max(flow_size, 1))))))
  return engine


@functools.lru_cache(maxsize=8)
def _pixel_grid(h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  return xx, yy


def residual_motion(flow: np.ndarray, ransac_threshold: float, grid_step: int = 8
                    ) -> Tuple[np.ndarray, float]:
  """Flow minus the global homography fitted to it (RANSAC); returns (|residual| [H, W], inlier fraction).

  The homography is fitted to the flow sampled every `grid_step` pixels. The inlier fraction is 0 when no
  homography could be fitted (then the residual is the raw flow magnitude).
  """
  h, w = flow.shape[:2]
  ys, xs = np.mgrid[grid_step // 2:h:grid_step, grid_step // 2:w:grid_step]
  src = np.stack([xs.ravel(), ys.ravel()], -1).astype(np.float32)
  dst = src + flow[ys.ravel(), xs.ravel()]
  homography, inliers = cv2.findHomography(src, dst, cv2.RANSAC, ransac_threshold, maxIters=500)
  if homography is None:
    return np.linalg.norm(flow, axis=-1), 0.0
  m = homography.astype(np.float32)
  xx, yy = _pixel_grid(h, w)
  den = m[2, 0] * xx + m[2, 1] * yy + m[2, 2]
  den[np.abs(den) < 1e-6] = 1e-6
  camera_x = (m[0, 0] * xx + m[0, 1] * yy + m[0, 2]) / den - xx
  camera_y = (m[1, 0] * xx + m[1, 1] * yy + m[1, 2]) / den - yy
  return cv2.magnitude(flow[..., 0] - camera_x, flow[..., 1] - camera_y), float(inliers.mean())


def adaptive_threshold(residual: np.ndarray, min_motion: float, mad_k: float) -> float:
  """max(min_motion, median + mad_k * 1.4826 * MAD): a robust noise level of the static majority."""
  sample = residual[::2, ::2]  # the statistics of every 4th pixel are as good, and 4x cheaper
  median = float(np.median(sample))
  mad = float(np.median(np.abs(sample - median)))
  return max(min_motion, median + mad_k * 1.4826 * mad)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
  """Fills background regions not connected to the image border."""
  padded = np.pad(mask, 1)
  flood = padded.copy()
  cv2.floodFill(flood, None, (0, 0), 255)
  return mask | cv2.bitwise_not(flood)[1:-1, 1:-1]


def clean_mask(mask: np.ndarray, opts: MaskOptions) -> np.ndarray:
  """Opening, closing, small-component removal and hole filling of a 0/255 uint8 mask."""
  size = max(3, int(round(opts.morph_fraction * min(mask.shape))) | 1)
  kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
  mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
  mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
  count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
  min_area = opts.min_component_fraction * mask.size
  keep = np.zeros(count, np.uint8)
  keep[1:] = np.where(stats[1:, cv2.CC_STAT_AREA] >= min_area, 255, 0)
  return _fill_holes(keep[labels])


@dataclasses.dataclass
class FrameMask:
  mask: np.ndarray  # uint8 [H, W], 0/255
  residual: np.ndarray  # float32 [H, W]: min of the backward and forward residual motion, in pixels
  threshold: float  # the smaller of the two adaptive thresholds
  inlier_fraction: float  # the smaller of the two homography inlier fractions
  drop_reason: Optional[str]  # one of DROP_REASONS, or None when the frame is kept


def frame_mask(previous: np.ndarray, current: np.ndarray, following: np.ndarray, opts: MaskOptions,
               flow_engine=None) -> FrameMask:
  """Motion mask of `current` from grayscale uint8 frames t-gap, t, t+gap (same size)."""
  flow_engine = flow_engine or _dis(opts.flow_preset, min(current.shape), opts.flow_size)
  moving = None
  residuals, thresholds, inliers = [], [], []
  for other in (previous, following):
    residual, inlier_fraction = residual_motion(flow_engine.calc(current, other, None), opts.ransac_threshold)
    threshold = adaptive_threshold(residual, opts.min_motion, opts.mad_k)
    above = residual > threshold
    moving = above if moving is None else moving & above  # temporal consistency (step 4)
    residuals.append(residual)
    thresholds.append(threshold)
    inliers.append(inlier_fraction)
  mask = clean_mask(moving.astype(np.uint8) * 255, opts)
  fraction = float(np.count_nonzero(mask)) / mask.size
  if min(inliers) < opts.min_inlier_fraction:
    reason = "camera_fit_failed"
  elif fraction < opts.min_mask_fraction:
    reason = "too_little_motion"
  elif fraction > opts.max_mask_fraction:
    reason = "too_much_motion"
  else:
    reason = None
  return FrameMask(mask, np.minimum(*residuals).astype(np.float32), min(thresholds), min(inliers), reason)


def debug_overlay(frame_bgr: np.ndarray, result: FrameMask) -> np.ndarray:
  """[frame with the mask in red | residual motion heat map], with the decision written on it."""
  overlay = frame_bgr.copy()
  red = np.zeros_like(frame_bgr)
  red[..., 2] = 255
  sel = result.mask > 0
  overlay[sel] = (0.5 * overlay[sel] + 0.5 * red[sel]).astype(np.uint8)
  contours, _ = cv2.findContours(result.mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
  cv2.drawContours(overlay, contours, -1, (0, 255, 255), 1)
  heat = np.clip(result.residual / (2 * max(result.threshold, 1e-6)) * 255, 0, 255).astype(np.uint8)
  heat = cv2.applyColorMap(heat, cv2.COLORMAP_INFERNO)
  text = (f"{result.drop_reason or 'kept'} thr={result.threshold:.2f}px inl={result.inlier_fraction:.2f} "
          f"cover={np.count_nonzero(result.mask) / result.mask.size:.3f}")
  panel = np.hstack([overlay, heat])
  panel[:18] //= 3  # dark strip so the text is readable
  cv2.putText(panel, text, (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 255, 0), 1, cv2.LINE_AA)
  return panel


# ---------------------------------------------------------------------------------------------------
# Videos.


class VideoError(Exception):
  """A video that cannot be used (unreadable, truncated, too short); the message says why."""


def list_videos(spec: str) -> List[pathlib.Path]:
  """A video file, a folder (video files below it, recursively) or a glob -> sorted paths."""
  path = pathlib.Path(spec)
  if path.is_dir():
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
    if not files:
      raise FileNotFoundError(f"No video files ({', '.join(VIDEO_EXTENSIONS)}) in folder {spec}")
    return files
  if path.is_file():
    return [path]
  if any(c in spec for c in "*?["):
    files = sorted(pathlib.Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    if not files:
      raise FileNotFoundError(f"No files match the video glob {spec}")
    return files
  raise FileNotFoundError(f"Video path not found: {spec}")


def video_ids(paths: Sequence[pathlib.Path]) -> List[str]:
  """Stable ids from file stems (safe characters); repeated stems get -2, -3, ... in path order."""
  seen = collections.Counter()
  ids = []
  for p in paths:
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", p.stem) or "video"
    seen[base] += 1
    ids.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
  return ids


def working_size(width: int, height: int, short_side: int) -> Tuple[int, int]:
  if short_side <= 0 or min(width, height) <= short_side:
    return width, height
  scale = short_side / min(width, height)
  return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


def read_frames(path: pathlib.Path, opts: MaskOptions, stats: Dict) -> Iterator[Tuple[int, np.ndarray]]:
  """Yields (index, BGR frame at the working size); raises VideoError for unreadable/truncated files.

  `stats` gets "declared" (the container's frame count, 0 if unknown) and "read".
  """
  capture = cv2.VideoCapture(str(path))
  if not capture.isOpened():
    raise VideoError("unreadable (OpenCV cannot open it)")
  try:
    stats["declared"] = max(0, int(capture.get(cv2.CAP_PROP_FRAME_COUNT)))
    stats["read"] = 0
    size = None
    while not opts.max_frames or stats["read"] < opts.max_frames:
      ok, frame = capture.read()
      if not ok or frame is None:
        break
      if size is None:
        size = working_size(frame.shape[1], frame.shape[0], opts.short_side)
      if (frame.shape[1], frame.shape[0]) != size:
        frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
      yield stats["read"], frame
      stats["read"] += 1
  finally:
    capture.release()
  if stats["read"] == 0:
    raise VideoError("unreadable (no frame could be decoded)")
  expected = min(stats["declared"], opts.max_frames) if opts.max_frames else stats["declared"]
  if stats["read"] < expected - 1 and not opts.keep_truncated:  # -1: containers often over-count by one
    raise VideoError(f"truncated (decoded {stats['read']} of {stats['declared']} declared frames)")


class _ShardWriter:
  """Writes one video's examples to temporary shard files; `commit` renames them to final names."""

  def __init__(self, output_dir: pathlib.Path, video_id: str, examples_per_shard: int):
    self._dir, self._id, self._per_shard = output_dir, video_id, examples_per_shard
    self._tmp_paths: List[pathlib.Path] = []
    self._writer = None
    self._count = 0

  def write(self, example: tf.train.Example):
    if self._writer is None or self._count % self._per_shard == 0:
      if self._writer is not None:
        self._writer.close()
      path = self._dir / f".{self._id}-{len(self._tmp_paths):05d}.tmp{os.getpid()}"
      self._tmp_paths.append(path)
      self._writer = tf.io.TFRecordWriter(str(path))
    self._writer.write(example.SerializeToString())
    self._count += 1

  def commit(self) -> List[str]:
    if self._writer is not None:
      self._writer.close()
    n = len(self._tmp_paths)
    names = [f"{self._id}-{k:05d}-of-{n:05d}.tfrecord" for k in range(n)]
    for tmp, name in zip(self._tmp_paths, names):
      os.replace(tmp, self._dir / name)
    return names

  def abort(self):
    if self._writer is not None:
      self._writer.close()
    for tmp in self._tmp_paths:
      tmp.unlink(missing_ok=True)


@dataclasses.dataclass
class VideoResult:
  video_id: str
  path: str
  frames_read: int = 0
  targets: int = 0
  kept: int = 0
  dropped: Dict[str, int] = dataclasses.field(default_factory=lambda: {r: 0 for r in DROP_REASONS})
  shards: List[str] = dataclasses.field(default_factory=list)
  seconds: float = 0.0


def process_video(path: pathlib.Path, video_id: str, output_dir: pathlib.Path, opts: MaskOptions,
                  debug_dir: Optional[pathlib.Path] = None, debug_every: int = 25,
                  progress: bool = True) -> VideoResult:
  """Masks of one video written to its own shards in `output_dir`; raises VideoError if unusable."""
  start = time.time()
  result = VideoResult(video_id, str(path))
  writer = _ShardWriter(output_dir, video_id, opts.examples_per_shard)
  flow_engine = None  # made for the working size of the first frame
  gap = opts.flow_gap
  window = collections.deque(maxlen=2 * gap + 1)  # (index, bgr, gray) of frames t-gap .. t+gap
  stats: Dict = {}
  bar = None
  try:
    for index, frame in read_frames(path, opts, stats):
      if bar is None:
        total = min(stats["declared"], opts.max_frames) if opts.max_frames else stats["declared"]
        bar = tqdm(total=total or None, desc=video_id, unit="frame", disable=not progress, leave=False)
      bar.update(1)
      window.append((index, frame, cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)))
      if flow_engine is None:
        flow_engine = _dis(opts.flow_preset, min(frame.shape[:2]), opts.flow_size)
      if len(window) < window.maxlen:
        continue
      target_index, target_bgr, target_gray = window[gap]
      if (target_index - gap) % opts.frame_step:
        continue
      result.targets += 1
      fm = frame_mask(window[0][2], target_gray, window[-1][2], opts, flow_engine)
      if fm.drop_reason:
        result.dropped[fm.drop_reason] += 1
      else:
        writer.write(make_example(target_bgr, fm.mask, video_id, target_index, opts.jpeg_quality))
        result.kept += 1
      if debug_dir is not None and (result.targets - 1) % debug_every == 0:
        debug_dir.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(debug_dir / f"{video_id}_{target_index:06d}.png"), debug_overlay(target_bgr, fm))
    result.frames_read = stats.get("read", 0)
    if result.frames_read < 2 * gap + 1:
      raise VideoError(f"too short ({result.frames_read} frames; needs {2 * gap + 1} for flow_gap={gap})")
  except BaseException:
    writer.abort()
    raise
  finally:
    if bar is not None:
      bar.close()
  result.shards = writer.commit()
  result.seconds = time.time() - start
  return result


@dataclasses.dataclass
class Summary:
  """What a run did; `failed` lists (path, reason) of the videos that were reported and skipped."""
  videos: int = 0
  done: int = 0
  resumed: int = 0
  failed: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
  frames_read: int = 0
  targets: int = 0
  kept: int = 0
  dropped: Dict[str, int] = dataclasses.field(default_factory=lambda: {r: 0 for r in DROP_REASONS})
  seconds: float = 0.0

  def text(self) -> str:
    lines = [f"videos: {self.videos} found, {self.done} done now, {self.resumed} already done (--resume), "
             f"{len(self.failed)} skipped",
             f"frames: {self.frames_read} read, {self.targets} targets, {self.kept} kept, "
             f"{sum(self.dropped.values())} dropped ({', '.join(f'{k}: {v}' for k, v in self.dropped.items())})"]
    if self.seconds > 0:
      lines.append(f"time: {self.seconds:.1f} s ({self.frames_read / self.seconds:.1f} frames read/s, "
                   f"{self.targets / self.seconds:.1f} targets/s)")
    lines += [f"skipped {path}: {reason}" for path, reason in self.failed]
    return "\n".join(lines)


def _options_dict(opts: MaskOptions) -> Dict:
  """Options that change the masks (the resume check ignores reading limits that do not)."""
  return {k: v for k, v in dataclasses.asdict(opts).items() if k not in ("examples_per_shard",)}


def generate(videos: str, output_dir: str, opts: MaskOptions = MaskOptions(), resume: bool = False,
             debug_dir: Optional[str] = None, debug_every: int = 25, progress: bool = True,
             log=print) -> Summary:
  """Masks of every video of `videos` (file, folder or glob) into sharded TFRecords in `output_dir`.

  Unusable videos are reported (log and `Summary.failed`) and skipped. With `resume`, videos listed in
  `output_dir/done.json` whose shards exist are skipped; resuming with other mask options raises
  ValueError (one dataset should come from one fixed generator, paper_spec 3.4).
  """
  start = time.time()
  paths = list_videos(videos)
  out = pathlib.Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  for stale in out.glob(".*.tmp*"):  # temporary shards of an interrupted run
    stale.unlink()
  done_path = out / DONE_FILE
  done = json.loads(done_path.read_text()) if done_path.exists() else {"options": None, "videos": {}}
  if resume and done["videos"] and done["options"] != _options_dict(opts):
    changed = sorted(k for k, v in _options_dict(opts).items() if (done["options"] or {}).get(k) != v)
    raise ValueError(f"--resume with mask options that differ from the finished videos in {done_path} "
                     f"({', '.join(changed)}); use the same options or another --output_dir")
  if not resume:
    done = {"options": None, "videos": done["videos"]}
  done["options"] = _options_dict(opts)
  summary = Summary(videos=len(paths))
  debug = pathlib.Path(debug_dir) if debug_dir else None
  for path, video_id in zip(paths, video_ids(paths)):
    previous = done["videos"].get(video_id)
    if (resume and previous and previous["path"] == str(path)
        and all((out / s).exists() for s in previous["shards"])):
      summary.resumed += 1
      continue
    try:
      r = process_video(path, video_id, out, opts, debug, debug_every, progress)
    except VideoError as e:
      log(f"Skipping {path}: {e}")
      summary.failed.append((str(path), str(e)))
      continue
    for old in (previous or {}).get("shards", []):  # a re-run replaces the video's old shards
      if old not in r.shards:
        (out / old).unlink(missing_ok=True)
    done["videos"][video_id] = {"path": str(path), "shards": r.shards, "frames_read": r.frames_read,
                                "targets": r.targets, "kept": r.kept, "dropped": r.dropped}
    files.write_json(done_path, done)
    summary.done += 1
    summary.frames_read += r.frames_read
    summary.targets += r.targets
    summary.kept += r.kept
    for k, v in r.dropped.items():
      summary.dropped[k] += v
    log(f"{video_id}: {r.frames_read} frames read, {r.targets} targets, {r.kept} kept "
        f"({r.frames_read / max(r.seconds, 1e-9):.0f} frames/s)")
  files.write_json(done_path, done)
  summary.seconds = time.time() - start
  return summary
