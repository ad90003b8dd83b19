"""The prepared GPU check (issue 18 item 4); `bench/gpu_check.sh` runs it.

  python -m bench.gpu_check [--quick] [--json PATH] [--budget_s 450]

Prints the GPU's facts (nvidia-smi: name, memory, driver, CUDA; TensorFlow's CUDA / cuDNN build),
then one bench table (bench.common.format_table) of these parts, at the paper's shapes:
  trunk_step       our trunk vs keras ResNetV2; fp32 and bf16, each with and without XLA
  multitask_step   the four-task step vs the sum of single-task steps, live pipelines vs fixed
                   batches, and --jit_compile on vs off
  input_pipeline   every task's pipeline on all host cores vs what its training step consumes
  scaling          MirroredStrategy over the visible GPUs vs one replica
Each part runs in its own process (GPU memory is freed between parts) under its own time budget, and
all of them under `--budget_s` (7.5 minutes: the script stays under 8); a part out of time is killed
(its process group) and the table's foot says so; the JSON is rewritten after every part, so whatever ran is
kept. Without a GPU visible to TensorFlow it says so and runs the quick mode (tiny shapes) of the
same parts, so the script is known to work anywhere.

JSON (bench's format, plus `gpu`): PATH, else $OUT/gpu_check.json when $OUT is set, else
bench/results/gpu_check_<mode>.json.
"""

import argparse
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from bench import common
from bench.common import Row

DEFAULT_BUDGET_S = 450
# (part, "module:function", function arguments, budget in seconds on a GPU (full), on a CPU (quick)),
# in the order they run: when the total budget runs short, the last ones get what is left.
PARTS = (
    ("trunk_step", "bench.trunk_step:reference_rows", (), 45, 70),
    ("trunk_xla", "bench.trunk_step:xla_rows", (), 75, 90),
    ("multitask_step", "bench.multitask_step:step_rows", (), 100, 80),
    ("pipeline_rp", "bench.input_pipeline:throughput_row", ("rp",), 40, 35),
    ("pipeline_col", "bench.input_pipeline:throughput_row", ("col",), 40, 35),
    ("pipeline_ex", "bench.input_pipeline:throughput_row", ("ex",), 40, 35),
    ("pipeline_ms", "bench.input_pipeline:throughput_row", ("ms",), 40, 35),
    ("scaling", "bench.scaling:run", (), 60, 80),
    ("multitask_jit", "bench.multitask_step:jit_rows", (), 60, 60),
)
MIN_PART_S = 15  # a part with less time left than this is skipped


def _command_output(command) -> str:
  try:
    return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout
  except (OSError, subprocess.SubprocessError):
    return ""


def gpu_facts() -> dict:
  """nvidia-smi's GPUs (name, memory, driver), its CUDA version, and TensorFlow's GPUs and build."""
  import tensorflow as tf
  facts = {"nvidia_smi": bool(shutil.which("nvidia-smi")), "gpus": [], "cuda_driver": ""}
  if facts["nvidia_smi"]:
    query = _command_output(["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version",
                             "--format=csv,noheader"])
    facts["gpus"] = [dict(zip(("index", "name", "memory", "driver"), (f.strip() for f in line.split(","))))
                     for line in query.splitlines() if line.count(",") == 3]
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", _command_output(["nvidia-smi"]))
    facts["cuda_driver"] = cuda.group(1) if cuda else ""
  build = tf.sysconfig.get_build_info()
  facts.update(tensorflow_gpus=len(tf.config.list_physical_devices("GPU")),
               tensorflow_cuda=build.get("cuda_version", ""), tensorflow_cudnn=build.get("cudnn_version", ""))
  return facts


def format_facts(facts: dict) -> str:
  lines = [f"GPU {g['index']}: {g['name']}, {g['memory']}, driver {g['driver']}" for g in facts["gpus"]]
  if facts["gpus"]:
    lines.append(f"CUDA (driver) {facts['cuda_driver'] or '?'}")
  lines.append(f"TensorFlow sees {facts['tensorflow_gpus']} GPU(s); built with CUDA "
               f"{facts['tensorflow_cuda'] or 'none'}, cuDNN {facts['tensorflow_cudnn'] or 'none'}")
  if not facts["tensorflow_gpus"]:
    lines.append("No GPU found" + (" by TensorFlow (nvidia-smi sees one: a CPU-only TensorFlow?)" if facts["gpus"]
                                   else " (no nvidia-smi GPU)") + ": running the quick table (--quick) on the CPU.")
  lines.append(f"CPU: {os.cpu_count()} cores, flags {common.cpu_flags()}; load {common.load_average():.2f}")
  return "\n".join(lines)


def default_json_path(mode: str) -> str:
  if os.environ.get("OUT"):
    return os.path.join(os.environ["OUT"], "gpu_check.json")
  return os.path.join(common.REPO_ROOT, "bench", "results", f"gpu_check_{mode}.json")


def run_part(part: str, quick: bool, timeout_s: float) -> dict:
  """Runs `part` in a fresh process (its own process group, killed whole on timeout); returns the
  bench JSON entry of a module: rows, or error, and seconds."""
  command = [sys.executable, "-m", "bench.gpu_check", f"--part={part}"] + (["--quick"] if quick else [])
  entry = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_before": common.load_average(),
           "budget_s": round(timeout_s)}
  start = time.perf_counter()
  proc = subprocess.Popen(command, cwd=common.REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True,
                          env={**os.environ, "TF_FORCE_GPU_ALLOW_GROWTH": "true"})
  try:
    out, err = proc.communicate(timeout=timeout_s)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)  # the part and any children it started (bench.scaling's)
    out, err = proc.communicate()
    entry.update(error=f"timed out after {timeout_s:.0f}s (its budget)", timed_out=True)
  else:
    lines = [line for line in out.splitlines() if line.startswith(common.RESULT_PREFIX)]
    if proc.returncode == 0 and lines:
      entry["rows"] = json.loads(lines[-1][len(common.RESULT_PREFIX):])["rows"]
    else:
      tail = (err.strip().splitlines() or ["no output"])[-1]
      entry["error"] = f"exit {proc.returncode}: {tail}"
  entry.update(seconds=round(time.perf_counter() - start, 1), load_after=common.load_average())
  return entry


def _child(part: str, quick: bool) -> None:
  """In the part's process: runs its function, emits its rows."""
  _, target, args, _, _ = next(p for p in PARTS if p[0] == part)
  module, function = target.split(":")
  rows = getattr(importlib.import_module(module), function)(*args, quick=quick)
  rows = [rows] if isinstance(rows, Row) else rows
  common.emit_result({"rows": [r.as_dict() for r in rows]})


def _write(path: str, result: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=1)
  os.replace(path + ".tmp", path)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="the quick table even on a GPU")
  parser.add_argument("--json", default="", help="where to write the results (see above)")
  parser.add_argument("--budget_s", type=float, default=DEFAULT_BUDGET_S, help="time for all parts together")
  parser.add_argument("--only", default="", help=f"comma-separated parts: {', '.join(p[0] for p in PARTS)}")
  parser.add_argument("--part", default="", help=argparse.SUPPRESS)  # internal: one part, in its process
  args = parser.parse_args(argv)
  if args.part:
    _child(args.part, args.quick)
    return 0
  names = [n.strip() for n in args.only.split(",") if n.strip()] or [p[0] for p in PARTS]
  unknown = sorted(set(names) - {p[0] for p in PARTS})
  if unknown:
    parser.error(f"unknown part(s) {unknown}")
  from bench.__main__ import machine_info
  facts = gpu_facts()
  print(format_facts(facts), flush=True)
  quick = args.quick or not facts["tensorflow_gpus"]
  mode = "quick" if quick else "full"
  path = args.json or default_json_path(mode)
  result = {"mode": mode, **machine_info(), "gpu": facts, "budget_s": args.budget_s, "modules": {}}
  deadline = time.perf_counter() + args.budget_s
  rows = []
  for part, _, _, gpu_s, cpu_s in PARTS:
    if part not in names:
      continue
    left = deadline - time.perf_counter()
    if left < MIN_PART_S:
      entry = {"error": f"skipped: {max(left, 0):.0f}s of the {args.budget_s:.0f}s budget left", "timed_out": True}
    else:
      entry = run_part(part, quick, min(cpu_s if quick else gpu_s, left))
    result["modules"][part] = entry
    rows += [Row(**{k: v for k, v in r.items() if k != "met"}) for r in entry.get("rows", [])]
    print(f"[gpu_check] {part}: " + (entry.get("error") or f"{len(entry['rows'])} row(s)")
          + (f" in {entry['seconds']:.0f}s" if "seconds" in entry else ""), file=sys.stderr, flush=True)
    _write(path, result)
  print(common.format_table(rows))
  for name, entry in result["modules"].items():
    if "error" in entry:
      print(f"{name}: {entry['error']}")
  print(f"\nJSON: {path}")
  # Exit 1 only when a part failed; parts out of time are reported above, not failures.
  return 1 if any("error" in e and not e.get("timed_out") for e in result["modules"].values()) else 0


if __name__ == "__main__":
  sys.exit(main())
