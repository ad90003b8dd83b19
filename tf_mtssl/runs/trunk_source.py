"""The one trunk source of every evaluation and of the export: a pretraining run, an export, or random
initialisation, resolved once by `load_trunk` into the trunk and its provenance (paper_spec 7, 7.4):

  init="pretrained", model_dir   the trunk of a pretraining run (rebuilt from its run_config.json,
                                 weights of its newest readable or a named checkpoint);
  init="pretrained", trunk_keras an exported trunk (`tf_mtssl.runs.exports`): a `trunk.keras` file or an
                                 export directory (its newest version);
  init="random"                  the same architecture with random weights, the paper's "Random Init"
                                 baseline (paper_spec 7.4): the architecture of `model_dir` when given
                                 (so the baseline matches the pretrained run), else `trunk_config`.

The provenance names the source (run + checkpoint + step, export + version, trunk file, or random init +
seed + architecture) with a SHA-256 of the weights, so results can be credited to exactly one trunk.
"""

import dataclasses
import json
import os
from typing import Dict, NamedTuple, Optional

import keras

from tf_mtssl.core import configs
from tf_mtssl.model import preprocessing
from tf_mtssl.model import trunk as trunk_lib
from tf_mtssl.runs import checkpoints, exports

INIT_MODES = ("pretrained", "random")


@dataclasses.dataclass(frozen=True)
class TrunkSourceConfig:
  """Where an evaluation's (or the export's) trunk comes from: the flags every evaluation shares."""
  init: str = configs.field("pretrained", "pretrained: the trunk of --model_dir or --trunk_keras; random: random "
                            "weights (the paper's Random Init baseline, paper_spec 7.4), with the architecture of "
                            "--model_dir if given, else of --depth/--output_stride/--base_width.",
                            choices=INIT_MODES)
  model_dir: str = configs.field("", "Pretraining run directory (run_config.json + checkpoints).")
  checkpoint: str = configs.field("", "Checkpoint prefix in --model_dir (e.g. ckpt-100); empty = the newest readable.")
  trunk_keras: str = configs.field("", "An exported trunk: a trunk.keras file or an export directory "
                                   "(python -m tf_mtssl.export_saved_model), instead of --model_dir.")


def load(source: TrunkSourceConfig, trunk: Optional[trunk_lib.TrunkConfig] = None, seed: int = 0) -> "TrunkSource":
  """`load_trunk` from the flag configurations (`trunk`: the architecture of a random init without a run)."""
  return load_trunk(source.init, model_dir=source.model_dir, checkpoint=source.checkpoint,
                    trunk_keras=source.trunk_keras, trunk_config=trunk.as_dict() if trunk else None, seed=seed)


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
    version_dir = exports.version_dir(path)
    trunk = exports.load_keras_trunk(version_dir)
    metadata = exports.read_metadata(version_dir)
    provenance = {"source": "export", "export_dir": os.path.abspath(version_dir),
                  "version": metadata.get("version"),
                  "keras_file": os.path.abspath(os.path.join(version_dir, exports.EXTRA_DIR,
                                                             exports.KERAS_FILE))}
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
    version_dir = provenance.get("export_dir") or os.path.dirname(os.path.dirname(provenance["keras_file"]))
    if os.path.isfile(os.path.join(version_dir, exports.EXTRA_DIR, exports.METADATA_FILE)):
      return exports.input_convention(version_dir)
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
