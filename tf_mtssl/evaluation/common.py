"""What the evaluations share: the trunk to evaluate and where it came from, the output folder it
owns, learning-rate schedules, the results file.

Trunk sources (paper_spec 7, 7.4), resolved once by `load_trunk` into the trunk and its provenance:
  init="pretrained", model_dir   the trunk of a pretraining run (rebuilt from its run_config.json,
                                 weights of its newest readable or a named checkpoint);
  init="pretrained", trunk_keras an exported trunk (`tf_mtssl.serving.export`): a `trunk.keras` file or an
                                 export directory (its newest version);
  init="random"                  the same architecture with random weights, the paper's "Random Init"
                                 baseline (paper_spec 7.4): the architecture of `model_dir` when given
                                 (so the baseline matches the pretrained run), else `trunk_config`.

Provenance. An evaluation's output folder belongs to one trunk: `claim_output_dir` records the
provenance in `trunk_source.json` before anything else is written there and refuses a folder made
from another source (or holding files of an unrecorded one), naming both, rather than resuming its
checkpoints or mixing its summaries; another --output_dir is the user's explicit choice, never a
silent one. Every evaluation writes its results to `results.json` (`write_results`) with that
provenance, so a result is never credited to a trunk it was not trained from.
"""

import json
import logging
import os
from typing import Dict, NamedTuple, Optional, Sequence

import keras

from tf_mtssl.runs import checkpoints
from tf_mtssl.model import preprocessing
from tf_mtssl.model import trunk as trunk_lib

log = logging.getLogger(__name__)

INIT_MODES = ("pretrained", "random")
EVAL_LASSO_ROW = "eval"  # the evaluation head's own alpha row (paper_spec 5, "Eval Only Lasso")
RESULTS_FILE = "results.json"
SOURCE_FILE = "trunk_source.json"
# Provenance entries that describe a source without telling two trunks apart.
_DESCRIPTIVE_KEYS = ("architecture_of", "exported_from")


class TrunkSource(NamedTuple):
  """What `load_trunk` returns: the trunk and where it came from.

  provenance["source"] is one of:
    "run":    model_dir, checkpoint (the prefix read), step, trunk (architecture), weights_sha256;
    "export": export_dir, version, keras_file, trunk (when recorded), exported_from (the run and
              checkpoint of the export, when recorded), weights_sha256;
    "keras_file": keras_file, weights_sha256;
    "random": trunk (architecture), seed, architecture_of (the run whose architecture it took).
  provenance["init"] is "pretrained" or "random". Paths are absolute.
  """
  trunk: keras.Model
  provenance: Dict


def load_trunk(init: str, *, model_dir: str = "", checkpoint: str = "", trunk_keras: str = "",
               trunk_config: Optional[dict] = None, seed: int = 0) -> TrunkSource:
  """Resolves the trunk source of an evaluation once: (trunk, provenance); see `TrunkSource`.

  Raises:
    ValueError: unknown `init`, a combination of sources that does not name one trunk, or only
      damaged checkpoints.
    FileNotFoundError: a run directory without run_config.json or without checkpoint, a missing
      export.
  """
  if init not in INIT_MODES:
    raise ValueError(f"--init must be one of {INIT_MODES}, got {init!r}")
  if init == "pretrained":
    if bool(model_dir) == bool(trunk_keras):
      raise ValueError("--init=pretrained needs exactly one of --model_dir (a pretraining run) or "
                       f"--trunk_keras (an exported trunk); got model_dir={model_dir!r}, "
                       f"trunk_keras={trunk_keras!r}; --init=random for a random trunk")
    if model_dir:
      config = checkpoints.load_run_config(model_dir)  # first: "not a run" before "no checkpoint"
      trunk, path = checkpoints.trunk_from_run(model_dir, checkpoint or None)
      step = path.rsplit("-", 1)[-1]
      return TrunkSource(trunk, {
          "init": init, "source": "run", "model_dir": os.path.abspath(model_dir),
          "checkpoint": os.path.abspath(path), "step": int(step) if step.isdigit() else None,
          "trunk": config["trunk"], "weights_sha256": checkpoints.fingerprint(trunk.weights)})
    trunk, provenance = _load_keras_trunk(trunk_keras)
    return TrunkSource(trunk, {"init": init, **provenance,
                               "weights_sha256": checkpoints.fingerprint(trunk.weights)})
  if trunk_keras:
    raise ValueError("--init=random takes its architecture from --model_dir or the trunk flags "
                     "(--depth, --output_stride, --base_width), not from --trunk_keras")
  config = checkpoints.load_run_config(model_dir)["trunk"] if model_dir else dict(trunk_config or {})
  config = trunk_lib.trunk_config(**config)
  keras.utils.set_random_seed(seed)
  return TrunkSource(trunk_lib.build_trunk(**config), {
      "init": init, "source": "random", "trunk": config, "seed": seed,
      **({"architecture_of": os.path.abspath(model_dir)} if model_dir else {})})


def _load_keras_trunk(path: str):
  """(trunk, provenance) of a `trunk.keras` file, or an export directory / version directory."""
  if os.path.isdir(path):
    from tf_mtssl.serving import export as export_lib  # only this path needs the export module
    version_dir = export_lib.version_dir(path)
    trunk = export_lib.load_keras_trunk(version_dir)
    metadata = export_lib.read_metadata(version_dir)
    provenance = {"source": "export", "export_dir": os.path.abspath(version_dir),
                  "version": metadata.get("version"),
                  "keras_file": os.path.abspath(os.path.join(version_dir, export_lib.EXTRA_DIR,
                                                             export_lib.KERAS_FILE))}
    if "trunk" in metadata:
      provenance["trunk"] = metadata["trunk"]
    if "model_dir" in metadata:
      provenance["exported_from"] = {k: metadata.get(k) for k in ("model_dir", "checkpoint", "step")}
  elif os.path.isfile(path):
    from tf_mtssl.model import lasso  # noqa: F401  (registers the project's custom layers)
    trunk = keras.models.load_model(path, compile=False)
    provenance = {"source": "keras_file", "keras_file": os.path.abspath(path)}
  else:
    raise FileNotFoundError(f"Exported trunk not found: {path} (--trunk_keras takes a trunk.keras "
                            "file or an export directory)")
  outputs = trunk.output
  if not isinstance(outputs, dict) or not {"block3", "units"} <= set(outputs):
    raise ValueError(f"{path} is not a tf_mtssl trunk: its outputs must be a dict with 'block3' and "
                     f"'units', got {type(outputs).__name__}")
  return trunk, provenance


def load_keras_trunk(path: str) -> keras.Model:
  """A `trunk.keras` file, or an export directory / version directory of `tf_mtssl.serving.export`."""
  return _load_keras_trunk(path)[0]


def input_convention(provenance: Dict) -> str:
  """The input convention (`tf_mtssl.model.preprocessing`) a trunk source was trained with, as recorded there.

  A run: its run_config.json (pretraining runs: VGG, paper_spec 2.2; imported slim checkpoints: as
  imported); an export, or a `trunk.keras` file inside one (`<version>/assets.extra/`, beside
  export_metadata.json): the export's metadata; random init with a run's architecture: that run's, so
  the baseline sees the same inputs. A `.keras` file without export metadata, or random init of the
  flags' architecture: VGG, what pretraining uses.
  """
  source = provenance.get("source")
  if source == "run":
    return checkpoints.input_convention(checkpoints.load_run_config(provenance["model_dir"]))
  if source == "random" and provenance.get("architecture_of"):
    return checkpoints.input_convention(checkpoints.load_run_config(provenance["architecture_of"]))
  if source in ("export", "keras_file"):
    from tf_mtssl.serving import export as export_lib  # only this path needs the export module
    version_dir = provenance.get("export_dir") or os.path.dirname(os.path.dirname(provenance["keras_file"]))
    if os.path.isfile(os.path.join(version_dir, export_lib.EXTRA_DIR, export_lib.METADATA_FILE)):
      return export_lib.input_convention(version_dir)
  return preprocessing.DEFAULT_CONVENTION


def describe_source(provenance: Dict) -> str:
  """One line naming a trunk source, e.g. "run /r/A, checkpoint /r/A/ckpt-20 (step 20)"."""
  kind = provenance.get("source")
  if kind == "run":
    return f"run {provenance['model_dir']}, checkpoint {provenance['checkpoint']} (step {provenance['step']})"
  if kind == "export":
    return f"export {provenance['export_dir']} (version {provenance['version']})"
  if kind == "keras_file":
    return f"trunk file {provenance['keras_file']}"
  if kind == "random":
    arch = provenance.get("trunk", {})
    return ("random init (seed {seed}, depth {depth}, base_width {base_width}, output_stride "
            "{output_stride})".format(seed=provenance.get("seed"), **{k: arch.get(k) for k in
                                                                       ("depth", "base_width", "output_stride")}))
  return json.dumps(provenance, sort_keys=True)


def _identity(provenance: Dict) -> Dict:
  return {k: v for k, v in provenance.items() if k not in _DESCRIPTIVE_KEYS}


def claim_output_dir(output_dir: str, evaluation: str, provenance: Dict) -> bool:
  """Makes `output_dir` the folder of `evaluation` of this trunk; returns True if it already was.

  Writes `trunk_source.json` there first (a new or empty folder). A folder recorded for another
  evaluation or another trunk source, or holding files but no record, is refused (ValueError naming
  both sources) and left untouched.
  """
  path = os.path.join(output_dir, SOURCE_FILE)
  claim = {"evaluation": evaluation, "trunk": provenance}
  if os.path.isfile(path):
    with open(path) as f:
      existing = json.load(f)
    old_trunk = existing.get("trunk", {})
    if existing.get("evaluation") == evaluation and _identity(old_trunk) == _identity(provenance):
      return True
    raise ValueError(
        f"--output_dir {output_dir} holds the {existing.get('evaluation')} evaluation of "
        f"{describe_source(old_trunk)}; this {evaluation} evaluation is of "
        f"{describe_source(provenance)}. Use another --output_dir (or delete that one); nothing in "
        "it was changed.")
  if os.path.isdir(output_dir) and os.listdir(output_dir):
    raise ValueError(
        f"--output_dir {output_dir} already holds files ({', '.join(sorted(os.listdir(output_dir))[:5])}"
        f"{', ...' if len(os.listdir(output_dir)) > 5 else ''}) but no {SOURCE_FILE} saying which trunk "
        f"they come from; this {evaluation} evaluation is of {describe_source(provenance)}. Use another "
        "--output_dir (or delete that one); nothing in it was changed.")
  write_json(path, claim)
  return False


def write_results(output_dir: str, evaluation: str, provenance: Dict, result: Dict) -> str:
  """Writes `results.json` ({"evaluation", "trunk": provenance, **result}); returns its path."""
  path = os.path.join(output_dir, RESULTS_FILE)
  write_json(path, {**result, "evaluation": evaluation, "trunk": provenance})
  return path


def num_units(trunk: keras.Model) -> int:
  return len(trunk.output["units"])


def feature_channels(trunk: keras.Model) -> int:
  return int(trunk.output["block3"].shape[-1])


def unreached_boundaries(boundaries: Sequence[int], train_steps: int) -> list:
  """The learning-rate boundaries a run of `train_steps` steps never reaches."""
  return [int(b) for b in boundaries if int(b) >= train_steps]


def warn_unreached_boundaries(boundaries: Sequence[int], train_steps: int, flag: str = "lr_boundaries") -> Optional[str]:
  """Logs (and returns) a warning when some boundaries lie at or beyond `train_steps`: they are kept
  as given (an explicit schedule is not rescaled behind the user's back), so the rate never decays
  there."""
  late = unreached_boundaries(boundaries, train_steps)
  if not late:
    return None
  message = (f"--{flag} {','.join(map(str, late))} lie at or beyond --train_steps={train_steps}: the "
             "learning rate never decays there. Give boundaries below --train_steps (e.g. 60% and "
             f"80% of it: {int(0.6 * train_steps)},{int(0.8 * train_steps)}) if a decay is wanted.")
  log.warning(message)
  return message


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
