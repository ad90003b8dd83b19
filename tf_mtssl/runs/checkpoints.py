"""Run directories: the recorded configuration and the checkpoints of a pretraining run.

Layout of `model_dir` (a pretraining run):
  run_config.json        the resolved configuration of the latest start (trunk architecture, tasks,
                         options, flags, the trunk's input convention "preprocessing"), so export and
                         evaluation rebuild and feed the model without repeated flags;
  run_config_history.jsonl  one line per start (append-only): its step, host, PID, the settings that
                         changed since the previous start and the whole resolved configuration, so
                         resuming with other hyper-parameters never loses the earlier ones;
  run.lock               while a pretraining runs: who holds the directory (`tf_mtssl.runs.lock`);
  ckpt-N.*, checkpoint   `tf.train.CheckpointManager` checkpoints whose named items are
                         `trunk`, `heads/<task>`, `lasso`, `optimizer` (the per-task RMSProp states) and `step`, so a
                         downstream job restores the trunk alone (`restore_trunk`);
  train/                 TensorBoard summaries.
"""

import datetime
import hashlib
import json
import logging
import os
import socket
from typing import Dict, List, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from tf_mtssl.core import files
from tf_mtssl.model import preprocessing
from tf_mtssl.model import trunk as trunk_lib

log = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"
RUN_CONFIG_HISTORY = "run_config_history.jsonl"
PREPROCESSING_KEY = "preprocessing"  # the trunk's input convention (`tf_mtssl.model.preprocessing`)
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
  files.write_json(run_config_path(model_dir), config)


def check_compatible(model_dir: str, config: dict) -> None:
  """Raises ValueError if `model_dir` holds a checkpoint of another architecture (left untouched).

  Only a checkpoint guards a directory: a run_config.json left by a start that never saved one
  (e.g. it failed on its inputs) describes no weights, so any architecture may start there.
  """
  if not tf.train.latest_checkpoint(model_dir):
    return
  path = run_config_path(model_dir)
  if not os.path.isfile(path):
    raise ValueError(f"--model_dir {model_dir} holds a checkpoint but no {RUN_CONFIG}: it is not a "
                     "tf_mtssl run (or one of another version); use a new --model_dir. The "
                     "checkpoint was left untouched.")
  with open(path) as f:
    existing = json.load(f)
  diffs = [f"{k}: {existing.get(k)!r} in the run vs {config.get(k)!r} now"
           for k in ARCHITECTURE_KEYS if existing.get(k) != config.get(k)]
  if diffs:
    raise ValueError(f"--model_dir {model_dir} holds a checkpoint of another architecture "
                     f"({'; '.join(diffs)}). Use a new --model_dir, or the run's own settings; "
                     "the existing checkpoint was left untouched.")


def _flatten(config, prefix: str = "") -> Dict[str, object]:
  """{"train": {"learning_rate": 1}} -> {"train.learning_rate": 1}."""
  out = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict) and value:
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def config_changes(previous: dict, current: dict) -> Dict[str, List[object]]:
  """{dotted key: [previous value, current value]} for every setting that differs (None: absent)."""
  before, after = _flatten(previous), _flatten(current)
  return {k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after))
          if before.get(k) != after.get(k)}


def read_config_history(model_dir: str) -> List[dict]:
  """The entries of run_config_history.jsonl, oldest first ([] if there is none)."""
  path = os.path.join(model_dir, RUN_CONFIG_HISTORY)
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def record_start(model_dir: str, config: dict, step: int) -> Dict[str, List[object]]:
  """Appends this start to run_config_history.jsonl and makes `config` the run_config.json.

  Returns the settings that changed since the previous start ({} for the first). A run_config.json
  written before the history existed is first copied into it, so no start's settings are lost.
  """
  os.makedirs(model_dir, exist_ok=True)
  history = read_config_history(model_dir)
  entries = []
  if not history and os.path.isfile(run_config_path(model_dir)):
    history = [{"start": 0, "step": None, "config": load_run_config(model_dir),
                "note": f"the {RUN_CONFIG} found when the history began (its start is not recorded)"}]
    entries.append(history[0])
  previous = history[-1]["config"] if history else None
  changes = config_changes(previous, config) if previous is not None else {}
  entries.append({
      "start": len(history) + 1 if history else 1, "step": int(step),
      "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "host": socket.gethostname(), "pid": os.getpid(),
      "changed": changes if previous is not None else None, "config": config})
  with open(os.path.join(model_dir, RUN_CONFIG_HISTORY), "a") as f:  # append-only
    for entry in entries:
      f.write(json.dumps(entry, sort_keys=True) + "\n")
    f.flush()
    os.fsync(f.fileno())
  save_run_config(model_dir, config)
  return changes


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


def input_convention(config: dict) -> str:
  """The input convention a run's trunk expects (`tf_mtssl.model.preprocessing.INPUT_CONVENTIONS`).

  Runs written before the convention was recorded are pretraining runs: VGG (paper_spec 2.2).
  """
  return preprocessing.check_convention(config.get(PREPROCESSING_KEY, preprocessing.DEFAULT_CONVENTION))


def build_trunk_from_run(model_dir: str) -> keras.Model:
  return trunk_lib.build_trunk(**load_run_config(model_dir)["trunk"])


def is_damage(error: BaseException) -> bool:
  """Whether a checkpoint read failed on damaged files rather than on a checkpoint of another model.

  Measured with TF 2.21: a truncated or empty .data file raises IndexError ("Read less bytes than
  requested"), overwritten bytes DataLossError, a truncated or empty .index or a missing .data file
  a bare OpError, a missing .index NotFoundError. Another model raises AssertionError (unmatched
  objects), ValueError (shapes) or InvalidArgumentError (dtypes): not damage.
  """
  return (isinstance(error, (IndexError, tf.errors.DataLossError, tf.errors.NotFoundError,
                             tf.errors.OutOfRangeError)) or type(error) is tf.errors.OpError)


class UnreadableCheckpointError(ValueError):
  """No readable checkpoint: the message names the damaged files."""


def checkpoint_candidates(directory: str) -> List[str]:
  """Checkpoint prefixes of `directory`, newest (last saved, `tf.train.latest_checkpoint`) first."""
  state = tf.train.get_checkpoint_state(directory)
  if state is None or not state.model_checkpoint_path:
    return []
  older = [p for p in reversed(state.all_model_checkpoint_paths) if p != state.model_checkpoint_path]
  return [state.model_checkpoint_path] + older


def damaged_files(prefix: str) -> str:
  """Which file(s) of checkpoint `prefix` cannot be read: its index, else its data shard(s)."""
  index = prefix + ".index"
  if not tf.io.gfile.exists(index):
    return f"{index} (missing)"
  try:
    tf.train.load_checkpoint(prefix)  # reads the index only
  except (IndexError, tf.errors.OpError):
    return index
  shards = sorted(tf.io.gfile.glob(prefix + ".data-*"))
  return ", ".join(shards) if shards else f"{prefix}.data-* (missing)"


def first_line(error: BaseException) -> str:
  """The first line of an error message (TF errors carry tracebacks and node names after it)."""
  text = (getattr(error, "message", None) or str(error)).strip()
  return text.splitlines()[0] if text else type(error).__name__


def read_checkpoint(read_fn, directory: str, requested: Optional[str] = None) -> Optional[str]:
  """Reads a checkpoint with `read_fn(prefix)`, falling back past damaged ones; returns its prefix.

  `requested`: a checkpoint the user named (prefix absolute, relative to the working directory or to
  `directory`): read it or fail, no fallback. Otherwise the newest checkpoint of `directory` is
  read; if its files are damaged (e.g. a truncated .data file), a warning names them and the next
  older checkpoint is tried, and so on. Returns None when `directory` holds no checkpoint.
  A checkpoint that reads but does not fit (`read_fn` raising AssertionError/ValueError) is not
  damaged: that error is raised as it is, without trying older ones.

  Raises:
    UnreadableCheckpointError: the requested checkpoint, or every checkpoint, is damaged.
  """
  candidates = [resolve_checkpoint(directory, requested)] if requested else checkpoint_candidates(directory)
  damaged = []
  for prefix in candidates:
    try:
      read_fn(prefix)
    except (IndexError, tf.errors.OpError) as e:
      if not is_damage(e):
        raise
      damaged.append(f"{damaged_files(prefix)}: {first_line(e)}")
      log.warning("Checkpoint %s is unreadable (%s)%s", prefix, damaged[-1],
                  "" if requested or prefix == candidates[-1] else "; trying the next older checkpoint")
      continue
    if damaged:
      log.warning("Using %s, the newest readable checkpoint of %s (the newer one(s) are damaged: %s; "
                  "reading deletes nothing, but a run resumed here writes its own checkpoints of those "
                  "steps over them)", prefix, directory, "; ".join(damaged))
    return prefix
  if damaged:
    raise UnreadableCheckpointError(
        f"No readable checkpoint in {directory}: " + "; ".join(damaged) if not requested else
        f"Checkpoint {candidates[0]} is unreadable ({damaged[0]}); name another --checkpoint or "
        "leave it empty for the newest readable one")
  return None


def trunk_from_run(model_dir: str, checkpoint: Optional[str] = None) -> Tuple[keras.Model, str]:
  """(trunk, checkpoint prefix read) of a pretraining run, rebuilt from its run_config.json.

  `checkpoint`: a named one (read or fail), else the newest readable one (damaged newer checkpoints
  are skipped with a warning, see `read_checkpoint`).
  """
  trunk = build_trunk_from_run(model_dir)

  def read(prefix):
    tf.train.Checkpoint(trunk=trunk).read(prefix).expect_partial().assert_existing_objects_matched()

  path = read_checkpoint(read, model_dir, checkpoint)
  if path is None:
    raise FileNotFoundError(f"No checkpoint in {model_dir}: train first (python -m tf_mtssl.pretrain "
                            f"--model_dir={model_dir}) or pass another run")
  return trunk, path


def restore_trunk(model_dir: str, checkpoint: Optional[str] = None) -> keras.Model:
  """The trunk of a pretraining run, rebuilt from its run_config.json, with checkpoint weights."""
  return trunk_from_run(model_dir, checkpoint)[0]


def restore_lasso(model_dir: str, checkpoint: Optional[str] = None):
  """The lasso layer of a run pretrained with the lasso, or None for a naive run."""
  config = load_run_config(model_dir)
  if config.get("lasso") is None:
    return None
  from tf_mtssl.model import lasso as lasso_lib
  layer = lasso_lib.LassoCombination(rows=config["tasks"],
                                     num_units=trunk_lib.num_block3_units(config["trunk"]["depth"]),
                                     l1=config["lasso"], name="lasso")
  layer.build(None)
  read_checkpoint(lambda prefix: tf.train.Checkpoint(lasso=layer).read(prefix).expect_partial(),
                  model_dir, checkpoint)
  return layer


def fingerprint(variables: Sequence) -> str:
  """SHA-256 of the values of `variables`, in order (weights of a trunk, a whole training state)."""
  digest = hashlib.sha256()
  for variable in variables:
    digest.update(np.ascontiguousarray(np.asarray(variable.numpy())).tobytes())
  return digest.hexdigest()
