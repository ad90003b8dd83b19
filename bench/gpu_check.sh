#!/usr/bin/env bash
# The prepared GPU check (issue 18 item 4): nvidia-smi facts, then one bench table of the trunk step
# (fp32 / bf16, with and without XLA), the four-task step at paper shapes (and --jit_compile on/off),
# every input pipeline on all host cores vs its step's consumption, and MirroredStrategy on the GPUs.
# No GPU: it says so and runs the quick table. Each part has its own time budget inside the 450 s of
# bench/gpu_check.py; the outer timeout below keeps the whole under 8 minutes regardless.
# JSON: $OUT/gpu_check.json if $OUT is set, else bench/results/gpu_check_<mode>.json.
#   bash bench/gpu_check.sh [--quick] [--json PATH] [--only PART,...]
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec timeout -k 10 470 "$PY" -m bench.gpu_check "$@"
