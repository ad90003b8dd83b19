import pytest
"""`python -m bench --quick` on its cheapest module: the table is printed and the JSON written."""

import json
import os
import subprocess
import sys

from tests.helpers import REPO_ROOT


@pytest.mark.slow
def test_quick_bench_prints_the_table_and_writes_json(tmp_path):
  out = tmp_path / "quick.json"
  proc = subprocess.run(
      [sys.executable, "-m", "bench", "--quick", "--only", "colorization_encoding", "--json", str(out)],
      cwd=REPO_ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  header, rule, row = proc.stdout.splitlines()[:3]
  assert header.split()[:6] == ["benchmark", "figure", "reference", "ratio", "goal", "result"]
  assert set(rule) == {"-"}
  assert row.startswith("col target encoding / train step (64px b4)")

  result = json.loads(out.read_text())
  assert result["mode"] == "quick"
  for key in ("machine", "processor", "cpu_flags", "tensorflow", "keras", "device", "dtype"):
    assert result[key], key
  entry = result["modules"]["colorization_encoding"]
  assert "error" not in entry
  (r,) = entry["rows"]
  assert r["unit"] == "ms/batch" and r["goal"] == "< 0.05"
  assert 0 < r["figure"] and 0 < r["reference"]
  assert abs(r["ratio"] - r["figure"] / r["reference"]) < 1e-9  # encoding ms / step ms
  # The verdict follows from the ratio and the goal, in the JSON and in the printed row.
  assert r["met"] is (r["ratio"] < 0.05)
  assert (" pass " if r["met"] else " MISS ") in row
  assert r["load"] >= 0 and entry["seconds"] > 0


def test_gpu_check_script_reports_the_machine_and_writes_json_to_out(tmp_path):
  """bench/gpu_check.sh end to end with no time for any part (the parts are the bench modules')."""
  proc = subprocess.run(["bash", "bench/gpu_check.sh", "--budget_s", "0"], cwd=REPO_ROOT,
                        env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable},
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / "gpu_check.json").read_text())
  gpus = result["gpu"]["tensorflow_gpus"]
  assert result["mode"] == ("full" if gpus else "quick")
  if not gpus:
    assert "No GPU found" in proc.stdout and "running the quick table" in proc.stdout
  from bench import gpu_check
  assert list(result["modules"]) == [p[0] for p in gpu_check.PARTS]
  for entry in result["modules"].values():
    assert entry["error"].startswith("skipped") and entry["timed_out"]
  assert proc.stdout.splitlines()[-1] == f"JSON: {tmp_path / 'gpu_check.json'}"


def test_gpu_check_kills_a_part_out_of_time():
  from bench import gpu_check
  entry = gpu_check.run_part("trunk_step", quick=True, timeout_s=1)
  assert entry["timed_out"] and entry["error"].startswith("timed out") and "rows" not in entry
  assert entry["seconds"] < 30
