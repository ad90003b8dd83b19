"""Combining tasks (paper_spec 4-6): flagfiles, harmonization, a four-task lasso run."""

import glob
import itertools
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
  from tf_mtssl import cli
  from tf_mtssl.model.lasso import LassoConfig
  from tf_mtssl.model.trunk import TrunkConfig
  from tf_mtssl.pretraining.config import PretrainConfig, TrainConfig
  fv = parse_pretrain_flagfile(path)
  names = task_registry.parse_task_list(fv.tasks)
  # Every configuration of the binary builds (and validates) from the flagfile.
  for config in (PretrainConfig, TrainConfig, LassoConfig):
    cli.config_from_flags(config)
  for name in names:
    cli.task_options_from_flags(name)
  trunk = cli.config_from_flags(TrunkConfig)
  stem = os.path.basename(path)[:-4]
  if stem in PAPER_CONFIGS:
    assert trunk == TrunkConfig(depth=101, output_stride=16, base_width=64)
    expected = [t for t in ("rp", "col", "ex", "ms") if t in stem.split("_")]
    assert names == expected
    assert fv.harmonize == stem.endswith("_h")
    assert fv.lasso == (stem.rsplit("_", 1)[-1] if "lasso" in stem else "none")


@pytest.mark.slow
def test_harmonized_rp_inputs_are_gray(tmp_path):
  task = helpers.tiny_task("rp", harmonize=True)
  batch = helpers.first_batch(task, helpers.write_photos(tmp_path / "photos"), batch_size=2)
  from tf_mtssl.model import preprocessing
  rgb = preprocessing.trunk_input_to_rgb(task.trunk_inputs(batch)).numpy()
  assert np.abs(rgb[..., 0] - rgb[..., 1]).max() < 2e-2 and np.abs(rgb[..., 1] - rgb[..., 2]).max() < 2e-2
  plain = helpers.first_batch(helpers.tiny_task("rp"), str(tmp_path / "photos"), batch_size=2)
  assert np.abs(plain["patches"].numpy()[..., 0] - plain["patches"].numpy()[..., 1]).max() > 1.0


@pytest.mark.slow
def test_exemplar_and_motion_segmentation_stay_rgb_when_harmonized():
  for name in ("ex", "ms"):
    task = helpers.tiny_task(name, harmonize=True)
    rgb = task.trunk_inputs(helpers.first_batch(task, "embedded", batch_size=2)).numpy()
    assert np.abs(rgb[..., 0] - rgb[..., 2]).max() > 5.0


def read_events(log_dir):
  """tag -> [(step, value)] of the scalars, and the set of image tags, of a TensorBoard log dir."""
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  scalars, images = {}, set()
  for events in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
    acc = event_accumulator.EventAccumulator(events, size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    images |= set(acc.Tags()["images"])
    for tag in acc.Tags()["tensors"]:
      values = [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]
      if all(v.ndim == 0 for _, v in values):
        scalars.setdefault(tag, []).extend((step, float(v)) for step, v in values)
      else:  # tf.summary.image writes images as tensors in TF2
        images.add(tag)
  return scalars, images


OPTIMIZER_FLAGS = ("learning_rate", "warmup_steps", "rmsprop_rho", "rmsprop_momentum", "rmsprop_epsilon",
                   "weight_decay", "trunk_update")


def paper_optimizer_settings():
  """The distinct optimizer settings of the paper flagfiles ({flag: value} each)."""
  settings = set()
  for stem in PAPER_CONFIGS:
    fv = parse_pretrain_flagfile(helpers.REPO_ROOT / "flags" / f"{stem}.cfg")
    settings.add(tuple((k, getattr(fv, k)) for k in OPTIMIZER_FLAGS))
  return [dict(s) for s in sorted(settings)]


@pytest.fixture(scope="session")
def four_task_lasso_run(tmp_path_factory):
  """The pretraining binary on every registered task with the lasso, the smoke trunk and the paper
  flagfiles' optimizer settings, 4 steps: one run (a 4-task trace is ~30 s) read by the tests below
  (this module's tests stay on one xdist worker: conftest.ONE_WORKER_MODULES)."""
  settings = paper_optimizer_settings()
  assert len(settings) == 1, f"paper flagfiles disagree on the optimizer: {settings}"
  run = tmp_path_factory.mktemp("four_task_lasso") / "run"
  cmd = [sys.executable, "-m", "tf_mtssl.pretrain", f"--flagfile={helpers.SMOKE_CFG}", "--tasks=all",
         "--lasso=pretrain", f"--model_dir={run}", "--train_steps=4", "--log_every=2", "--grad_cosine_every=2",
         "--image_summary_every=4", "--checkpoint_every=4", "--noprogress_bar"]
  cmd += [f"--{k}={v}" for k, v in settings[0].items()]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=helpers.REPO_ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  return run


@pytest.mark.slow
def test_four_task_lasso_run_writes_alpha_images_and_gradient_cosines(four_task_lasso_run):
  run = four_task_lasso_run
  scalars, images = read_events(str(run / "train"))
  tags = set(scalars) | images
  assert "lasso/alpha" in tags
  names = task_registry.registered_tasks()
  cosines = {f"grad_cosine/{a}_vs_{b}" for a, b in itertools.combinations(sorted(names), 2)}
  assert cosines <= tags
  for tag in cosines:
    assert [step for step, _ in scalars[tag]] == [2, 4], scalars[tag]
    assert all(-1.0 <= value <= 1.0 and value != 0.0 for _, value in scalars[tag]), scalars[tag]
  from tf_mtssl.tasks import base
  for name in names:
    assert {f"{name}/loss", f"{name}/trunk_update_norm", f"{name}/trunk_gradient_norm"} <= tags
    if task_registry.task_class(name).summary_images is not base.Task.summary_images:  # it draws images
      assert any(tag.startswith(f"{name}/") for tag in images), (name, images)
  from tf_mtssl.runs import checkpoints
  lasso = checkpoints.restore_lasso(str(run))
  assert lasso.rows == names
  assert np.isfinite(lasso.alphas().numpy()).all()


@pytest.mark.slow
def test_per_task_trunk_updates_stay_within_a_small_factor_at_the_paper_settings(four_task_lasso_run):
  scalars, _ = read_events(str(four_task_lasso_run / "train"))
  names = task_registry.registered_tasks()

  def last(suffix):
    return {n: max(scalars[f"{n}/{suffix}"])[1] for n in names}  # the value at the last logged step

  updates, gradients = last("trunk_update_norm"), last("trunk_gradient_norm")
  assert all(v > 0 for v in updates.values()) and all(v > 0 for v in gradients.values()), (updates, gradients)
  # Each task's RMSProp normalises its own gradient scale (tf_mtssl/pretraining/optimizer.py): 1.1x measured.
  assert max(updates.values()) / min(updates.values()) < 2.0, updates
  # The check has power: the tasks' trunk gradients, which an optimizer that does not normalise (TF-slim's
  # epsilon 1.0) passes on to the updates, are far apart (measured: ...).
  assert max(gradients.values()) / min(gradients.values()) > 4.0, gradients
