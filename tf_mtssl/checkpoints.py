"""Run directories: the recorded configuration and the checkpoints of a pretraining run.

Layout of `model_dir` (a pretraining run):
  run_config.json        the resolved configuration (trunk architecture, tasks, options, flags), so
                         export and evaluation rebuild the model without repeated flags;
  ckpt-N.*, checkpoint   `tf.train.CheckpointManager` checkpoints whose named items are
                         `trunk`, `heads/<task>`, `lasso`, `optimizer` (the per-task RMSProp states) and `step`, so a
                         downstream job restores the trunk alone (`restore_trunk`);
  train/                 TensorBoard summaries.
"""

import json
import os
from typing import Optional

import keras
import tensorflow as tf

from tf_mtssl import trunk as trunk_lib

RUN_CONFIG = "run_config.json"
# What must agree for a checkpoint to be restorable into the model being built.
ARCHITECTURE_KEYS = ("trunk", "tasks", "task_options", "lasso", "image_size")


def run_config_path(model_dir: str) -> str:
  return os.path.join(model_dir, RUN_CONFIG)


def load_run_config(model_dir: str) -> dict:
  path = run_config_path(model_dir)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{model_dir} is not a tf_mtssl pretraining run: {RUN_CONFIG} is missing")
  with open(path) as f:
    return json.load(f)


def save_run_config(model_dir: str, config: dict) -> None:
  """Writes atomically (temp file + rename), so a crash never leaves a truncated config."""
  os.makedirs(model_dir, exist_ok=True)
  tmp = run_config_path(model_dir) + ".tmp"
  with open(tmp, "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  os.replace(tmp, run_config_path(model_dir))


def check_compatible(model_dir: str, config: dict) -> None:
  """Raises ValueError if `model_dir` holds a run of another architecture (left untouched)."""
  path = run_config_path(model_dir)
  if os.path.isfile(path):
    with open(path) as f:
      existing = json.load(f)
    diffs = [f"{k}: {existing.get(k)!r} in the run vs {config.get(k)!r} now"
             for k in ARCHITECTURE_KEYS if existing.get(k) != config.get(k)]
    if diffs:
      raise ValueError(f"--model_dir {model_dir} holds a checkpoint of another architecture "
                       f"({'; '.join(diffs)}). Use a new --model_dir, or the run's own settings; "
                       "the existing checkpoint was left untouched.")
  elif tf.train.latest_checkpoint(model_dir):
    raise ValueError(f"--model_dir {model_dir} holds a checkpoint but no {RUN_CONFIG}: it is not a "
                     "tf_mtssl run (or one of another version); use a new --model_dir. The "
                     "checkpoint was left untouched.")


def resolve_checkpoint(model_dir: str, checkpoint: Optional[str] = None) -> str:
  """The named checkpoint (a prefix, absolute or relative to model_dir) or the latest one."""
  if checkpoint:
    # A prefix as given (absolute, or relative to the working directory as latest_checkpoint returns
    # it), else relative to model_dir (e.g. "ckpt-10").
    as_given = tf.io.gfile.exists(checkpoint + ".index")
    candidate = checkpoint if as_given or os.path.isabs(checkpoint) else os.path.join(model_dir, checkpoint)
    if not tf.io.gfile.exists(candidate + ".index"):
      raise FileNotFoundError(f"Checkpoint {candidate} not found (no {candidate}.index)")
    return candidate
  latest = tf.train.latest_checkpoint(model_dir)
  if latest is None:
    raise FileNotFoundError(f"No checkpoint in {model_dir}: train first (python -m tf_mtssl.pretrain "
                            f"--model_dir={model_dir}) or pass another run")
  return latest


def build_trunk_from_run(model_dir: str) -> keras.Model:
  return trunk_lib.build_trunk(**load_run_config(model_dir)["trunk"])


def restore_trunk(model_dir: str, checkpoint: Optional[str] = None) -> keras.Model:
  """The trunk of a pretraining run, rebuilt from its run_config.json, with checkpoint weights."""
  path = resolve_checkpoint(model_dir, checkpoint)
  trunk = build_trunk_from_run(model_dir)
  status = tf.train.Checkpoint(trunk=trunk).read(path)
  status.expect_partial().assert_existing_objects_matched()
  return trunk


def restore_lasso(model_dir: str, checkpoint: Optional[str] = None):
  """The lasso layer of a run pretrained with the lasso, or None for a naive run."""
  config = load_run_config(model_dir)
  if config.get("lasso") is None:
    return None
  from tf_mtssl import lasso as lasso_lib
  layer = lasso_lib.LassoCombination(rows=config["tasks"],
                                     num_units=trunk_lib.num_block3_units(config["trunk"]["depth"]),
                                     l1=config["lasso"], name="lasso")
  layer.build(None)
  tf.train.Checkpoint(lasso=layer).read(resolve_checkpoint(model_dir, checkpoint)).expect_partial()
  return layer
