"""Runs every benchmark and prints one table (figure, reference, ratio, goal, pass/miss).

  python -m bench [--quick] [--only NAME[,NAME]] [--json PATH]

Each benchmark module exposes `run(quick) -> list[bench.common.Row]`; it compares side by side in
one process with warm-up excluded. `--quick` uses tiny shapes (a few minutes on a 2-core CPU); the
full mode uses the paper's shapes. Results are also written as JSON with the machine, TF version,
device and dtype, so runs can be compared.
"""

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import time

from bench.common import format_table

# name -> module; each module's `run(quick)` returns a list of Rows.
BENCHMARKS = {
    "trunk_step": "bench.trunk_step",
}


def machine_info(dtype: str):
  import tensorflow as tf
  gpus = tf.config.list_physical_devices("GPU")
  return {"machine": platform.node(), "processor": platform.processor() or platform.machine(),
          "cpus": os.cpu_count(), "python": platform.python_version(), "tensorflow": tf.__version__,
          "device": ", ".join(d.name for d in gpus) or "CPU", "dtype": dtype,
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="tiny shapes, few steps")
  parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
  parser.add_argument("--json", default="bench/results/latest.json", help="where to write the results")
  args = parser.parse_args(argv)
  names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
  unknown = [n for n in names if n not in BENCHMARKS]
  if unknown:
    parser.error(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
  rows, errors = [], {}
  for name in names:
    start = time.time()
    try:
      rows.extend(importlib.import_module(BENCHMARKS[name]).run(args.quick))
    except Exception as e:  # noqa: BLE001 - one failing benchmark must not hide the others
      errors[name] = f"{type(e).__name__}: {e}"
      print(f"[bench] {name} failed: {errors[name]}", file=sys.stderr)
    print(f"[bench] {name} done in {time.time() - start:.0f}s", file=sys.stderr)
  print(format_table(rows))
  result = {"mode": "quick" if args.quick else "full", **machine_info("float32"),
            "rows": [r.as_dict() for r in rows], "errors": errors}
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump(result, f, indent=1)
  print(f"\nJSON: {args.json}")
  return 1 if errors else 0


if __name__ == "__main__":
  sys.exit(main())
