"""What both evaluations share: the trunk to evaluate, learning-rate schedules, result files.

Trunk sources (paper_spec 7, 7.4):
  init="pretrained", model_dir   the trunk of a pretraining run (rebuilt from its run_config.json,
                                 weights of its latest or named checkpoint);
  init="pretrained", trunk_keras an exported trunk (`tf_mtssl.export_lib`): a `trunk.keras` file or an
                                 export directory (its newest version);
  init="random"                  the same architecture with random weights, the paper's "Random Init"
                                 baseline (paper_spec 7.4): the architecture of `model_dir` when given
                                 (so the baseline matches the pretrained run), else `trunk_config`.
"""

import json
import os
from typing import Dict, Optional, Sequence, Tuple

import keras

from tf_mtssl import checkpoints
from tf_mtssl import trunk as trunk_lib

INIT_MODES = ("pretrained", "random")
EVAL_LASSO_ROW = "eval"  # the evaluation head's own alpha row (paper_spec 5, "Eval Only Lasso")


def load_trunk(init: str, *, model_dir: str = "", checkpoint: str = "", trunk_keras: str = "",
               trunk_config: Optional[dict] = None, seed: int = 0) -> Tuple[keras.Model, Dict]:
  """Returns (trunk, description of where it came from) for the evaluations.

  Raises:
    ValueError: unknown `init`, or a combination of sources that does not name one trunk.
    FileNotFoundError: a run directory without run_config.json or without checkpoint, a missing
      export.
  """
  if init not in INIT_MODES:
    raise ValueError(f"--init must be one of {INIT_MODES}, got {init!r}")
  if init == "pretrained":
    if bool(model_dir) == bool(trunk_keras):
      raise ValueError("--init=pretrained needs exactly one of --model_dir (a pretraining run) or "
                       f"--trunk_keras (an exported trunk); got model_dir={model_dir!r}, "
                       f"trunk_keras={trunk_keras!r}")
    if model_dir:
      config = checkpoints.load_run_config(model_dir)  # first: "not a run" before "no checkpoint"
      path = checkpoints.resolve_checkpoint(model_dir, checkpoint or None)
      trunk = checkpoints.restore_trunk(model_dir, path)
      return trunk, {"init": init, "model_dir": os.path.abspath(model_dir),
                     "checkpoint": os.path.abspath(path), "trunk": config["trunk"]}
    trunk = load_keras_trunk(trunk_keras)
    return trunk, {"init": init, "trunk_keras": os.path.abspath(trunk_keras)}
  if trunk_keras:
    raise ValueError("--init=random takes its architecture from --model_dir or the trunk flags "
                     "(--depth, --output_stride, --base_width), not from --trunk_keras")
  config = checkpoints.load_run_config(model_dir)["trunk"] if model_dir else dict(trunk_config or {})
  keras.utils.set_random_seed(seed)
  trunk = trunk_lib.build_trunk(**config)
  return trunk, {"init": init, "trunk": trunk_lib.trunk_config(**config), "seed": seed,
                 **({"architecture_of": os.path.abspath(model_dir)} if model_dir else {})}


def load_keras_trunk(path: str) -> keras.Model:
  """A `trunk.keras` file, or an export directory / version directory of `tf_mtssl.export_lib`."""
  if os.path.isdir(path):
    from tf_mtssl import export_lib  # only this path needs the export module
    trunk = export_lib.load_keras_trunk(path)
  elif os.path.isfile(path):
    from tf_mtssl import lasso  # noqa: F401  (registers the project's custom layers)
    trunk = keras.models.load_model(path)
  else:
    raise FileNotFoundError(f"Exported trunk not found: {path}")
  outputs = trunk.output
  if not isinstance(outputs, dict) or not {"block3", "units"} <= set(outputs):
    raise ValueError(f"{path} is not a tf_mtssl trunk: its outputs must be a dict with 'block3' and "
                     f"'units', got {type(outputs).__name__}")
  return trunk


def num_units(trunk: keras.Model) -> int:
  return len(trunk.output["units"])


def feature_channels(trunk: keras.Model) -> int:
  return int(trunk.output["block3"].shape[-1])


def lr_schedule(learning_rate: float, boundaries: Sequence[int] = (), decay: float = 0.1):
  """Piecewise-constant learning rate: `learning_rate`, times `decay` after each boundary step."""
  if learning_rate <= 0:
    raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
  boundaries = [int(b) for b in boundaries]
  if any(b <= 0 for b in boundaries) or boundaries != sorted(set(boundaries)):
    raise ValueError(f"lr boundaries must be increasing positive steps, got {boundaries}")
  if not boundaries:
    return learning_rate
  values = [learning_rate * decay ** i for i in range(len(boundaries) + 1)]
  return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def write_json(path: str, result: dict) -> None:
  """Writes atomically (temp file + rename)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=2, sort_keys=True, default=float)
  os.replace(tmp, path)
