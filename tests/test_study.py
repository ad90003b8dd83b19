"""Tests of the study (tf_mtssl.studies.grid, tf_mtssl.studies.report, the tf_mtssl.study binary)."""

import dataclasses
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import helpers
from tf_mtssl.studies import grid as study_grid
from tf_mtssl.studies import report as study_report


def _tiny(**kw):
  base = dict(
      name="t", combinations=("random", "rp"), seeds=(0,), data="fashion_mnist", task_data={},
      trunk=dict(helpers.TINY_TRUNK), image_size=32,
      task_options={"rp": {"patch_size": 16, "gap": 8, "jitter": 2, "hidden": 16, "reduce_channels": 8}},
      train={"batch_size": 4, "task_batch_sizes": {"rp": 2, "ex": 2}, "learning_rate": 1e-3, "warmup_steps": 1,
             "log_every": 1, "grad_cosine_every": 0},
      train_steps=4, eval_points=2, lasso_l1=1e-3, probe_data="objects",
      probe={"train_steps": 10, "batch_size": 32, "lr_boundaries": (), "image_size": 32, "grid": 2, "crop_fraction": 1.0,
             "eval_batch_size": 128, "log_every": 10**9},
      protocol={"weight_decays": (0.0, 0.01), "knn_ks": (1, 5)}, probe_max_examples=60)
  return study_grid.StudyConfig(**{**base, **kw})


def _files(work):
  return {p: os.stat(p).st_mtime_ns for p in sorted(str(x) for x in (work / "evals").glob("*.json"))}


@pytest.mark.slow
def test_killed_study_resumes_without_redoing_cells_and_changed_configs_get_new_cells(tmp_path, caplog):
  study, work = _tiny(), tmp_path / "work"

  class Killed(Exception):
    pass

  def kill_after_two(records):
    if len(records) == 2:
      raise Killed()

  with pytest.raises(Killed):
    study_grid.run_study(study, str(work), on_record=kill_after_two)
  first = _files(work)
  assert len(first) == 2
  records = study_grid.run_study(study, str(work))
  assert [(r["config"], r["step"]) for r in records] == [("random", 0), ("rp", 2), ("rp", 4)]  # seed-major
  after = _files(work)
  assert all(after[p] == t for p, t in first.items())  # finished cells were read back, not redone
  ckpt = next((work / "runs").glob("rp-s0-*")) / "ckpt-4.index"
  ckpt_time = os.stat(ckpt).st_mtime_ns
  caplog.clear()
  with caplog.at_level(logging.INFO, logger=study_grid.__name__):
    again = study_grid.run_study(study, str(work))
  assert _files(work) == after and [r["eval_key"] for r in again] == [r["eval_key"] for r in records]
  assert caplog.text.count("done before") == len(records)  # each cell says it was read back
  # Another probe protocol: the evaluations are new cells, the pretraining runs are reused untouched.
  changed = dataclasses.replace(study, protocol={"weight_decays": (0.0,), "knn_ks": (1, 5)})
  new = study_grid.run_study(changed, str(work))
  assert not {r["eval_key"] for r in new} & {r["eval_key"] for r in records}
  assert {r["run_key"] for r in new} == {r["run_key"] for r in records}
  assert os.stat(ckpt).st_mtime_ns == ckpt_time and len(_files(work)) == 6
  # Another optimiser: a new pretraining run.
  other = dataclasses.replace(study, train={**study.train, "learning_rate": 2e-3})
  assert study_grid.config_key(study_grid.run_spec(other, "rp", 0)) != records[1]["run_key"]
  for r in records:
    assert r["commit"] and 0 <= r["linear_top1"] <= 1 and 0 < r["linear_se"] < 0.5 and r["knn_k"] in (1, 5)
  assert "rp/accuracy" in records[-1]["pretext"]


def test_gray_source_refused_for_col_and_ms_and_bad_grids():
  with pytest.raises(ValueError, match="col cannot train on --data=fashion_mnist: colorization"):
    _tiny(combinations=("random", "rp_col"))
  with pytest.raises(ValueError, match="ms cannot train on --data=fashion_mnist: motion segmentation"):
    _tiny(combinations=("ms",))
  with pytest.raises(ValueError, match="Unknown configuration"):
    _tiny(combinations=("rp", "jigsaw"))
  with pytest.raises(ValueError, match="multiple of --eval_points"):
    _tiny(train_steps=5)


def test_statistics_of_the_report():
  s = study_report.summarize([0.80, 0.82, 0.84], [0.004, 0.004, 0.004])
  np.testing.assert_allclose([s["mean"], s["std"]], [0.82, 0.02], rtol=1e-9)
  np.testing.assert_allclose(s["se"], np.sqrt(0.02 ** 2 / 3 + 0.004 ** 2), rtol=1e-9)
  c = study_report.compare(s, study_report.summarize([0.80, 0.80, 0.80], [0.004] * 3))
  np.testing.assert_allclose([c["diff"], c["se"]], [0.02, np.sqrt(s["se"] ** 2 + 0.004 ** 2)], rtol=1e-9)
  assert c["z"] == pytest.approx(c["diff"] / c["se"], rel=1e-9)


@pytest.mark.slow
def test_quick_binary_writes_every_output(tmp_path):
  # One run of the binary (a second one only re-reads cells: resuming is run_study's, tested above).
  out, work = tmp_path / "out", tmp_path / "work"
  cmd = [sys.executable, "-m", "tf_mtssl.study", "--flagfile=flags/study_fashion_mnist.cfg", "--quick",
         "--configs=random,rp_ex", "--seeds=0", f"--output_dir={out}", f"--work_dir={work}"]
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=helpers.REPO_ROOT, env=env)
  assert run.returncode == 0, run.stderr[-3000:]
  for name in ("results.md", "results.csv", "results.json", "accuracy_vs_steps.png", "pretext_metrics.png"):
    assert (out / name).stat().st_size > 0, name
  md = (out / "results.md").read_text()
  assert "Made by `python -m tf_mtssl.study --flagfile=flags/study_fashion_mnist.cfg --quick" in md
  assert "Code commit of this report: " in md and "| RP+Ex | 6 |" in md and "rp_ex − random" in md
  body = json.loads((out / "results.json").read_text())
  assert body["complete"] and len(body["records"]) == 4 and body["commit"]
  assert (out / "results.csv").read_text().startswith("# ")
  assert len(_files(work)) == 4  # one evaluation file per record: what a resumed run reads back


@pytest.mark.parametrize("name", ["study_fashion_mnist", "study_photos"])
def test_study_flagfiles_parse_into_valid_grids(name):
  from absl import flags
  from tf_mtssl import study
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["study", f"--flagfile={helpers.REPO_ROOT / 'flags' / (name + '.cfg')}"])
  _, config = study.study_config_from_flags()
  flags.FLAGS.unparse_flags()
  assert len(config.seeds) >= 3 and config.eval_points >= 3 and config.combinations[0] == "random"
  expected = {"study_fashion_mnist": {"random", "rp", "ex", "rp_ex"},
              "study_photos": {"random", "rp", "col", "ex", "ms", "rp_col", "all", "all_lasso", "rp_col_h"}}[name]
  assert set(config.combinations) == expected
  assert config.depth is not None if name == "study_photos" else config.depth is None


@pytest.mark.slow
def test_weight_change_is_measured_from_the_seeds_exact_initialisation(tmp_path):
  train = {"batch_size": 4, "learning_rate": 1e-10, "warmup_steps": 1, "log_every": 1, "grad_cosine_every": 0,
           "weight_decay": 0.0}
  study = _tiny(combinations=("random", "rp"), train=train, train_steps=2, eval_points=1)
  key = study_grid.config_key(study_grid.run_spec(study, "rp", 0))
  study_grid.pretrain(study, "rp", 0, str(tmp_path / "runs" / f"rp-s0-{key}"), "test")
  record = {"config": "rp", "seed": 0, "step": 2, "run_key": key}
  assert study_grid.weight_change(study, str(tmp_path), record) < 1e-6  # lr 1e-10: still the init
  assert study_grid.weight_change(study, str(tmp_path), {**record, "seed": 1}) is None  # no such run
  assert study_grid.weight_change(study, str(tmp_path), {**record, "step": 0}) is None
