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
