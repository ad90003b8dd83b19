"""Combining tasks (paper_spec 4-6): flagfiles, harmonization, a four-task lasso run."""

import glob
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import helpers
from tf_mtssl import tasks as task_registry

FLAGFILES = sorted(glob.glob(str(helpers.REPO_ROOT / "flags" / "*.cfg")))
PRETRAIN_FLAGFILES = [f for f in FLAGFILES if not os.path.basename(f).startswith(("detection", "linear", "depth"))]
PAPER_CONFIGS = ["rp", "rp_h", "col", "ex", "ms", "rp_col", "rp_col_h", "rp_ex", "rp_ms", "rp_col_ex",
                 "rp_col_ex_ms", "rp_col_ex_ms_lasso_pretrain", "rp_col_ex_ms_lasso_eval",
                 "rp_col_ex_ms_lasso_both"]


def parse_pretrain_flagfile(path):
  from absl import flags
  import tf_mtssl.pretrain  # noqa: F401 - defines the binary's flags
  flags.FLAGS.unparse_flags()  # back to defaults, so parses do not leak between files
  flags.FLAGS(["pretrain", f"--flagfile={path}"])
  return flags.FLAGS


def test_every_paper_configuration_has_a_flagfile():
  stems = {os.path.basename(f)[:-4] for f in FLAGFILES}
  assert set(PAPER_CONFIGS) <= stems


@pytest.mark.parametrize("path", PRETRAIN_FLAGFILES, ids=os.path.basename)
def test_flagfile_parses_and_names_only_registered_tasks(path):
  fv = parse_pretrain_flagfile(path)
  names = task_registry.parse_task_list(fv.tasks)
  stem = os.path.basename(path)[:-4]
  if stem in PAPER_CONFIGS:
    assert fv.depth == "101" and fv.output_stride == "16" and fv.base_width == 64
    expected = [t for t in ("rp", "col", "ex", "ms") if t in stem.split("_")]
    assert names == expected
    assert fv.harmonize == stem.endswith("_h")
    assert fv.lasso == (stem.rsplit("_", 1)[-1] if "lasso" in stem else "none")


def test_harmonized_rp_inputs_are_gray(tmp_path):
  task = helpers.tiny_task("rp", harmonize=True)
  batch = helpers.first_batch(task, helpers.write_photos(tmp_path / "photos"), batch_size=2)
  from tf_mtssl import preprocessing
  rgb = preprocessing.trunk_input_to_rgb(task.trunk_inputs(batch)).numpy()
  assert np.abs(rgb[..., 0] - rgb[..., 1]).max() < 2e-2 and np.abs(rgb[..., 1] - rgb[..., 2]).max() < 2e-2
  plain = helpers.first_batch(helpers.tiny_task("rp"), str(tmp_path / "photos"), batch_size=2)
  assert np.abs(plain["patches"].numpy()[..., 0] - plain["patches"].numpy()[..., 1]).max() > 1.0


def test_exemplar_and_motion_segmentation_stay_rgb_when_harmonized():
  for name in ("ex", "ms"):
    task = helpers.tiny_task(name, harmonize=True)
    rgb = task.trunk_inputs(helpers.first_batch(task, "embedded", batch_size=2)).numpy()
    assert np.abs(rgb[..., 0] - rgb[..., 2]).max() > 5.0


def read_event_tags(log_dir):
  from tensorboard.backend.event_processing import event_accumulator
  tags = set()
  for events in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
    acc = event_accumulator.EventAccumulator(events, size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    tags |= set(acc.Tags()["tensors"]) | set(acc.Tags()["images"])
  return tags


def test_four_task_lasso_run_writes_alpha_images_and_gradient_cosines(tmp_path):
  run = tmp_path / "run"
  cmd = [sys.executable, "-m", "tf_mtssl.pretrain", f"--flagfile={helpers.SMOKE_CFG}", "--tasks=rp,col,ex,ms",
         "--lasso=pretrain", f"--model_dir={run}", "--train_steps=4", "--log_every=2", "--grad_cosine_every=2",
         "--image_summary_every=4", "--checkpoint_every=4", "--noprogress_bar"]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=helpers.REPO_ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  tags = read_event_tags(str(run / "train"))
  assert "lasso/alpha" in tags
  assert {f"grad_cosine/{a}_vs_{b}" for a, b in [("col", "ex"), ("col", "ms"), ("ex", "rp"), ("ms", "rp")]} <= tags
  for name in ("rp", "col", "ex", "ms"):
    assert f"{name}/loss" in tags
  from tf_mtssl import checkpoints
  lasso = checkpoints.restore_lasso(str(run))
  assert lasso.rows == ["rp", "col", "ex", "ms"]
  assert np.isfinite(lasso.alphas().numpy()).all()
