"""Shared benchmark helpers: the result row and table of `python -m bench`, timing, the settings of
the quick and full modes, data specs, trainers on fixed batches, and child processes.

Timing on a shared machine. Other processes take cores at random moments, so a comparison is timed
in interleaved rounds (A, B, A, B, ...) after the warm-up, and each side's figure is its best round
(the least disturbed one, as `timeit` recommends); every row also records the 1-minute load average
when it was measured, so a reader can tell a quiet run from a busy one.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

from tf_mtssl.core import quiet  # noqa: F401,E402  (before TensorFlow: silences its start-up noise)

from tf_mtssl import cli  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("rp", "col", "ex", "ms")

# The quick mode: the smoke trunk and heads of flags/smoke.cfg at 64 px (seconds per module).
_SMOKE = cli.read_flagfile(os.path.join(REPO_ROOT, "flags", "smoke.cfg"))
QUICK_TRUNK = {k: int(_SMOKE[k]) for k in ("depth", "output_stride", "base_width")}
QUICK_IMAGE_SIZE = int(_SMOKE["image_size"])
QUICK_OPTIONS = {name: {k[len(name) + 1:]: v for k, v in _SMOKE.items() if k.startswith(f"{name}_")}
                 for name in TASKS}
# The full mode: the paper's shapes (flags/rp_col_ex_ms.cfg): ResNet-101 to block 3 at output stride
# 16, 224-px images, 96-px rp patches, 8 exemplar views, the task options' defaults (paper_spec 3).
PAPER_TRUNK = dict(depth=101, output_stride=16, base_width=64)
PAPER_IMAGE_SIZE = 224
# Source images per task batch in the step benchmarks. The paper's batches (rp 56, col 40, ex 16,
# ms 32) do not fit this 2-core CPU's time and the shared machine's memory; throughput per image
# changes little beyond a few images. Batch 8 (paper shapes: rp = 72 patches), except ex: 2 source
# images = 16 views of 224 px (it needs >= 2 images; 8 would be 64 views, ~13 GB of activations).
BATCHES = {True: {"rp": 4, "col": 4, "ex": 2, "ms": 4}, False: {"rp": 8, "col": 8, "ex": 2, "ms": 8}}


def trunk_config(quick: bool) -> dict:
  return dict(QUICK_TRUNK if quick else PAPER_TRUNK)


def image_size(quick: bool) -> int:
  return QUICK_IMAGE_SIZE if quick else PAPER_IMAGE_SIZE


def trunk_name(config: dict) -> str:
  return f"R{config['depth']}" + ("" if config.get("base_width", 64) == 64 else f"/w{config['base_width']}")


def make_task(name: str, quick: bool, **overrides):
  """Task `name` at the mode's image size and options (quick: smoke heads; full: paper defaults)."""
  from tf_mtssl import tasks
  from tf_mtssl.core import configs
  values = {**(QUICK_OPTIONS[name] if quick else {}), **overrides}
  options = configs.from_dict(tasks.task_class(name).Options, values)
  return tasks.make_task(name, options=options, image_size=image_size(quick))


# ---------------------------------------------------------------------------------------------------
# Data.


def _skimage_photo_folder() -> str:
  """A temporary folder of scikit-image's colour photos at their original sizes (no embedded data)."""
  import skimage.data
  from PIL import Image
  folder = tempfile.mkdtemp(prefix="bench_photos_")
  for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina"):
    Image.fromarray(getattr(skimage.data, name)()).save(os.path.join(folder, f"{name}.png"))
  return folder


def _synthetic_mask_shard() -> str:
  """A temporary motion-mask shard: scikit-image photos as frames, a centred box as the moving
  region (the pipeline's cost depends on the sizes and codecs, not on what the mask shows)."""
  import numpy as np
  import skimage.data
  import tensorflow as tf
  from tf_mtssl.data import motion_mask_records
  folder = tempfile.mkdtemp(prefix="bench_masks_")
  with tf.io.TFRecordWriter(os.path.join(folder, "photos-00000-of-00001.tfrecord")) as writer:
    for index, name in enumerate(("astronaut", "coffee", "chelsea", "rocket")):
      rgb = getattr(skimage.data, name)()
      mask = np.zeros(rgb.shape[:2], np.uint8)
      h, w = mask.shape
      mask[h // 4:3 * h // 4, w // 4:3 * w // 4] = 255
      writer.write(motion_mask_records.make_example(rgb[..., ::-1].copy(), mask, name, index).SerializeToString())
  return folder


def jpeg_photo_folder(width: int = 500, height: int = 375) -> str:
  """A temporary folder of real photos as JPEG files (quality 90), each centre-cropped to 4:3 and
  resized to `width` x `height` (portrait photos to height x width): what a large training set looks
  like on disk (500x375 is ImageNet's most common size), read and decoded anew every epoch; one size
  for all, so every image costs a pipeline the same. The photos are the embedded set's when prepared,
  else scikit-image's; the embedded colorization prior is copied beside them when there is one."""
  from PIL import Image
  from tf_mtssl.data import embedded, sources
  key = f"jpeg{width}x{height}"
  if key in _DATA:
    return _DATA[key]
  photos = str(embedded.images_dir()) if embedded.images_dir().is_dir() else _skimage_photo_folder()
  folder = tempfile.mkdtemp(prefix="bench_jpeg_")
  for path in sources.list_image_files(photos):
    image = Image.open(path).convert("RGB")
    w, h = (width, height) if image.size[0] >= image.size[1] else (height, width)
    scale = min(image.size[0] / w, image.size[1] / h)  # the largest w:h box, centred
    box_w, box_h = w * scale, h * scale
    left, top = (image.size[0] - box_w) / 2, (image.size[1] - box_h) / 2
    image = image.resize((w, h), Image.LANCZOS, box=(left, top, left + box_w, top + box_h))
    image.save(os.path.join(folder, os.path.splitext(os.path.basename(path))[0] + ".jpg"), quality=90)
  prior = embedded.root() / "colorization_prior.npy"
  if prior.is_file():
    shutil.copy(prior, os.path.join(folder, "colorization_prior.npy"))
  _DATA[key] = folder
  return folder


_DATA: Dict[str, str] = {}


def data_spec(task: str) -> str:
  """Source spec of `task`: `embedded` when prepared (python -m tf_mtssl.data.prepare), else
  temporary scikit-image data, so a clean clone benchmarks without preparing anything."""
  from tf_mtssl.data import embedded
  kind = "masks" if task == "ms" else "images"
  if kind not in _DATA:
    prepared = (embedded.motion_masks_dir() if kind == "masks" else embedded.images_dir()).is_dir()
    _DATA[kind] = "embedded" if prepared else (_synthetic_mask_shard() if kind == "masks" else
                                               _skimage_photo_folder())
  return _DATA[kind]


# ---------------------------------------------------------------------------------------------------
# Rows and the table.


def cpu_flags() -> str:
  """The CPU's vector / bfloat16 features that matter to these benchmarks (from /proc/cpuinfo)."""
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((line for line in f if line.startswith("flags")), "").split()
  except OSError:
    return "unknown"
  wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")
  return " ".join(x for x in wanted if x in flags) or "none of " + ",".join(wanted)


def cpu_has_bf16() -> bool:
  """Native bfloat16 arithmetic (AVX512-BF16 or AMX); without it oneDNN emulates bf16, slowly."""
  return any(x in cpu_flags().split() for x in ("avx512_bf16", "amx_bf16"))


def load_average() -> float:
  """1-minute load average (what `uptime` prints first)."""
  return os.getloadavg()[0]


@dataclasses.dataclass
class Row:
  """One line of the bench table: this project's figure against a reference, with a goal."""
  name: str
  figure: float
  unit: str
  reference: Optional[float] = None      # the reference's figure (same unit), if any
  ratio: Optional[float] = None          # figure / reference (or the ratio the goal is about)
  goal: str = ""                         # on the ratio, e.g. ">= 1.0"
  note: str = ""
  dtype: str = "float32"
  load: float = dataclasses.field(default_factory=load_average)  # when the row was made

  def __post_init__(self):
    if self.goal:
      op, value = self.goal.split()
      if op not in _OPS:
        raise ValueError(f"Bad goal {self.goal!r} of row {self.name!r}; use one of {sorted(_OPS)} and a number")
      float(value)
      if self.ratio is None:
        raise ValueError(f"Row {self.name!r} has a goal but no ratio")

  @property
  def met(self) -> Optional[bool]:
    if not self.goal:
      return None
    op, value = self.goal.split()
    return _OPS[op](self.ratio, float(value))

  def as_dict(self):
    return {**dataclasses.asdict(self), "met": self.met}


_OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b, ">": lambda a, b: a > b}


def format_table(rows: List[Row]) -> str:
  header = (f"{'benchmark':46s} {'figure':>10s} {'reference':>10s} {'ratio':>7s} {'goal':>8s} {'result':6s} "
            f"{'load':>5s}  unit / note")
  lines = [header, "-" * len(header)]
  for r in rows:
    ref = f"{r.reference:10.4g}" if r.reference is not None else f"{'-':>10s}"
    ratio = f"{r.ratio:7.3f}" if r.ratio is not None else f"{'-':>7s}"
    verdict = {True: "pass", False: "MISS", None: "-"}[r.met]
    dtype = "" if r.dtype == "float32" else f" ({r.dtype})"
    lines.append(f"{r.name[:46]:46s} {r.figure:10.4g} {ref} {ratio} {r.goal:>8s} {verdict:6s} {r.load:5.1f}  "
                 f"[{r.unit}]{dtype}" + (f"  {r.note}" if r.note else ""))
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Timing.


def fetch(result):
  """Waits for `result` (any nest of tensors) by copying it to the host."""
  import tensorflow as tf
  for t in tf.nest.flatten(result):
    if hasattr(t, "numpy"):
      t.numpy()


def time_calls(fn: Callable[[], object], warmup: int, repeats: int,
               clock: Callable[[], float] = time.perf_counter) -> float:
  """Seconds per call of `fn` (its result fetched to host), warm-up calls excluded.

  clock: wall time by default; `time.process_time` counts this process's CPU seconds instead (all
  its threads), which other processes on a shared machine do not inflate."""
  for _ in range(warmup):
    fetch(fn())
  start = clock()
  for _ in range(repeats):
    fetch(fn())
  return (clock() - start) / repeats


def time_interleaved(fns: Dict[str, Callable[[], object]], warmup: int, repeats: int,
                     rounds: int, clock: Callable[[], float] = time.perf_counter) -> Dict[str, float]:
  """Seconds per call of each fn: warm-up excluded, then `rounds` rounds of `repeats` calls of every
  fn in turn; each fn's figure is its best round (see the module docstring). clock: see `time_calls`."""
  for fn in fns.values():
    for _ in range(warmup):
      fetch(fn())
  best = {name: float("inf") for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      best[name] = min(best[name], time_calls(fn, 0, repeats, clock))
  return best


def wait_until_idle(poll_s: float = 0.1, busy_fraction: float = 0.02, quiet_polls: int = 3,
                    timeout_s: float = 120.0) -> None:
  """Returns once this process has used less than `busy_fraction` of a core in each of `quiet_polls`
  consecutive `poll_s` intervals (e.g. when the background threads of its tf.data pipelines have
  filled their buffers), or after `timeout_s`. Several quiet polls in a row, so that threads merely
  starved by other processes on a busy machine are not taken for finished."""
  deadline, quiet_polls_seen = time.perf_counter() + timeout_s, 0
  while quiet_polls_seen < quiet_polls and time.perf_counter() < deadline:
    before = time.process_time()
    time.sleep(poll_s)
    quiet_polls_seen = quiet_polls_seen + 1 if time.process_time() - before < busy_fraction * poll_s else 0


# ---------------------------------------------------------------------------------------------------
# Trainer steps on fixed batches.


def make_trainer(names: Sequence[str], quick: bool, batches: Optional[Dict[str, int]] = None,
                 options: Optional[Dict[str, dict]] = None, data: Optional[Dict[str, str]] = None, **config):
  """A `tf_mtssl.pretraining.trainer.Trainer` of tasks `names` at the mode's shapes, in a temporary model_dir.

  batches: source images per task batch (default `BATCHES[quick]`); options: per-task option
  overrides; data: per-task source specs (default `data_spec`); config: more `TrainConfig` fields.
  """
  from tf_mtssl.pretraining import trainer as train
  batches = {**BATCHES[quick], **(batches or {})}
  tasks = {n: make_task(n, quick, **(options or {}).get(n, {})) for n in names}
  cfg = train.TrainConfig(train_steps=10, batch_size=batches[names[0]],
                          task_batch_sizes={n: batches[n] for n in names}, progress_bar=False,
                          grad_cosine_every=0, **config)
  return train.Trainer(tempfile.mkdtemp(prefix="bench_trainer_"), tasks, trunk_config(quick), cfg,
                       {n: (data or {}).get(n) or data_spec(n) for n in names})


def first_batches(trainer, seed: int = 0) -> dict:
  """One real batch of every task of `trainer` (its own pipelines, at its batch sizes)."""
  return {n: next(iter(t.build_dataset(trainer.data[n], trainer.config.batch_size_for(n), seed=seed)))
          for n, t in trainer.tasks.items()}


def fixed_step(trainer, batches: dict) -> Callable[[], object]:
  """`trainer`'s compiled training step on the same `batches` at every call (no input pipeline)."""
  import tensorflow as tf
  iterators = {n: iter(trainer.strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensors(batches[n]).repeat())) for n in trainer.tasks}
  return lambda: trainer.run_steps(iterators).metrics  # the very step the training loop runs


# ---------------------------------------------------------------------------------------------------
# Child processes (measurements that need a fresh process: peak memory, distribution strategies).

RESULT_PREFIX = "BENCH_RESULT "


def emit_result(result: dict) -> None:
  """In a child: prints the result on the line `spawn_children` reads."""
  print(RESULT_PREFIX + json.dumps(result), flush=True)


def spawn_children(module: str, args: Sequence[str], envs: Sequence[dict] = ({},),
                   timeout_s: float = 1800) -> List[dict]:
  """Runs `python -m module args` once per env (at the same time), from the repository root; returns
  each process's result (`emit_result`). Processes still running after an error or the timeout are
  killed by PID."""
  command = [sys.executable, "-m", module, *args]
  procs = [subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for env in envs]
  try:
    outputs = [p.communicate(timeout=timeout_s) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  results = []
  for p, (out, err) in zip(procs, outputs):
    if p.returncode != 0:
      raise RuntimeError(f"{' '.join(command)} failed (exit {p.returncode}):\n{err[-3000:]}")
    lines = [line for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
      raise RuntimeError(f"{' '.join(command)} printed no result:\n{out[-2000:]}\n{err[-2000:]}")
    results.append(json.loads(lines[-1][len(RESULT_PREFIX):]))
  return results


def module_main(run: Callable[[bool], List[Row]], doc: str) -> None:
  """`python -m bench.NAME [--quick]`: runs one benchmark module, prints its rows and their JSON."""
  import argparse
  parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="tiny shapes, few steps")
  rows = run(parser.parse_args().quick)
  print(format_table(rows))
  print(json.dumps([r.as_dict() for r in rows], indent=1))
