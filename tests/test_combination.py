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
PRETRAIN_FLAGFILES = [f for f in FLAGFILES
                      if not os.path.basename(f).startswith(("detection", "linear", "depth", "study"))]
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
    assert f"{name}/loss" in tags and f"{name}/trunk_update_norm" in tags
  from tf_mtssl import checkpoints
  lasso = checkpoints.restore_lasso(str(run))
  assert lasso.rows == ["rp", "col", "ex", "ms"]
  assert np.isfinite(lasso.alphas().numpy()).all()


OPTIMIZER_FLAGS = ("learning_rate", "warmup_steps", "rmsprop_rho", "rmsprop_momentum", "rmsprop_epsilon",
                   "weight_decay", "trunk_update")


def paper_optimizer_settings():
  """The distinct optimizer settings of the paper flagfiles ({flag: value} each)."""
  settings = set()
  for stem in PAPER_CONFIGS:
    fv = parse_pretrain_flagfile(helpers.REPO_ROOT / "flags" / f"{stem}.cfg")
    settings.add(tuple((k, getattr(fv, k)) for k in OPTIMIZER_FLAGS))
  return [dict(s) for s in sorted(settings)]


def last_update_norms(tmp_path, settings, steps=3):
  """Per-task trunk update norms at the last of `steps` steps of a tiny trunk with every registered task."""
  from tf_mtssl import train
  names = task_registry.registered_tasks()
  config = train.TrainConfig(train_steps=steps, batch_size=2, log_every=1, checkpoint_every=steps,
                             image_summary_every=0, grad_cosine_every=0, progress_bar=False, **settings)
  trainer = train.Trainer(str(tmp_path), {n: helpers.tiny_task(n) for n in names}, helpers.TINY_TRUNK, config,
                          {n: "embedded" for n in names})
  return {n: m["trunk_update_norm"] for n, m in trainer.train().items()}


def test_per_task_trunk_updates_stay_within_a_small_factor_at_the_paper_settings(tmp_path):
  settings = paper_optimizer_settings()
  assert len(settings) == 1, f"paper flagfiles disagree on the optimizer: {settings}"
  norms = last_update_norms(tmp_path / "paper", settings[0])
  assert all(v > 0 for v in norms.values()), norms
  # Each task's RMSProp normalises its own gradient scale (tf_mtssl/optimizer.py): 1.2x measured.
  assert max(norms.values()) / min(norms.values()) < 2.0, norms
  # The check has power: TF-slim's epsilon 1.0 leaves the raw gradient scales in the updates.
  unnormalised = last_update_norms(tmp_path / "slim", {**settings[0], "rmsprop_epsilon": 1.0})
  assert max(unnormalised.values()) / min(unnormalised.values()) > 4.0, unnormalised
