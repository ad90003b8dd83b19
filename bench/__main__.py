"""Runs the benchmarks and prints one table (figure, reference, ratio, goal, pass/miss, load).

  python -m bench [--quick] [--only NAME[,NAME]] [--json PATH] [--fresh] [--all_rows]

Each benchmark module exposes `run(quick) -> list[bench.common.Row]`; it compares side by side in
one process (or fresh child processes) with warm-up excluded. `--quick` uses tiny shapes (a few
minutes on a 2-core CPU; what CI may run); the full mode uses the paper's shapes (an hour or more
on that CPU: run modules one at a time with --only). Results are written as JSON (default
bench/results/<mode>.json) with the machine, TF version, device and dtype; modules not run now keep
their earlier results in that file (each with its date and load average) unless --fresh, so a full
table can be assembled module by module; --all_rows prints that merged table.

bench/gpu_check.sh (bench.gpu_check): the prepared GPU check, one table of chosen rows in 8 minutes.
"""

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import time

from bench.common import Row, cpu_flags, format_table, load_average

# name -> module; each module's `run(quick)` returns a list of Rows.
BENCHMARKS = {
    "trunk_step": "bench.trunk_step",
    "mixed_precision": "bench.mixed_precision",
    "multitask_step": "bench.multitask_step",
    "steps_per_loop": "bench.steps_per_loop",
    "input_pipeline": "bench.input_pipeline",
    "colorization_encoding": "bench.colorization_encoding",
    "memory": "bench.memory",
    "serving_latency": "bench.serving_latency",
    "scaling": "bench.scaling",
}


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def machine_info() -> dict:
  import keras
  import tensorflow as tf
  gpus = tf.config.list_physical_devices("GPU")
  model = ""
  try:
    with open("/proc/cpuinfo") as f:
      model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
  except OSError:
    pass
  return {"machine": platform.node(), "processor": model or platform.processor() or platform.machine(),
          "cpu_flags": cpu_flags(), "cpus": os.cpu_count(), "python": platform.python_version(),
          "tensorflow": tf.__version__, "keras": keras.__version__,
          "device": ", ".join(d.name for d in gpus) or "CPU",
          "dtype": "float32 unless a row's dtype says otherwise"}


def _read(path: str, mode: str) -> dict:
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, ValueError):
    return {}
  return old if old.get("mode") == mode else {}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="tiny shapes, few steps (a few minutes)")
  parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
  parser.add_argument("--json", default="", help="where to write the results (default bench/results/<mode>.json)")
  parser.add_argument("--fresh", action="store_true", help="drop earlier results of other modules from the JSON")
  parser.add_argument("--all_rows", action="store_true", help="also print the table of every module in the JSON")
  args = parser.parse_args(argv)
  names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
  unknown = [n for n in names if n not in BENCHMARKS]
  if unknown:
    parser.error(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
  mode = "quick" if args.quick else "full"
  path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{mode}.json")
  result = {} if args.fresh else _read(path, mode)
  modules = result.get("modules", {})
  rows, failed = [], []
  for name in names:
    start, load_before, started = time.time(), load_average(), _now()
    entry = {"started": started, "load_before": load_before}
    try:
      module_rows = importlib.import_module(BENCHMARKS[name]).run(args.quick)
      entry["rows"] = [r.as_dict() for r in module_rows]
      rows.extend(module_rows)
    except Exception as e:  # noqa: BLE001 - one failing benchmark must not hide the others
      entry["error"] = f"{type(e).__name__}: {e}"
      failed.append(name)
      print(f"[bench] {name} failed: {entry['error']}", file=sys.stderr)
    entry.update(seconds=round(time.time() - start, 1), load_after=load_average())
    modules[name] = entry
    print(f"[bench] {name} done in {entry['seconds']:.0f}s (load {load_before:.1f} -> "
          f"{entry['load_after']:.1f})", file=sys.stderr, flush=True)
  print(format_table(rows))
  result = {"mode": mode, **machine_info(), "updated": _now(),
            "modules": {n: modules[n] for n in BENCHMARKS if n in modules}}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=1)
  os.replace(path + ".tmp", path)
  if args.all_rows:
    merged = [Row(**{k: v for k, v in r.items() if k != "met"})
              for entry in result["modules"].values() for r in entry.get("rows", [])]
    print(f"\nAll modules in {path}:\n{format_table(merged)}")
  print(f"\nJSON: {path}")
  if failed:
    print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
