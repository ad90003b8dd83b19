"""Import of tf-slim ResNet-v2 checkpoints into the trunk (paper_spec 2.1, 7.4).

The authors released their best model (RP+Col+Ex+MS, ResNet-101 v2 through block 3) as a TF1 tf-slim
checkpoint (S1: `resnet_v2.resnet_v2_101(..., scope='resnet_v2_101')` under
`resnet_arg_scope(batch_norm_epsilon=1e-5, batch_norm_scale=True)`); the "INet Labels" baseline is
slim's ImageNet `resnet_v2_101` checkpoint of the same layout. `tf_mtssl.model.trunk` follows slim's layout
layer for layer, so the import is a mapping of names:

  slim (under SCOPE, e.g. resnet_v2_101)                     trunk layer
  conv1/{weights,biases}                                     conv1
  blockB/unit_U/bottleneck_v2/preact/{gamma,beta,moving_*}   blockB_unitU_preact_bn
  blockB/unit_U/bottleneck_v2/shortcut/{weights,biases}      blockB_unitU_shortcut
  blockB/unit_U/bottleneck_v2/conv{1,2}/weights              blockB_unitU_conv{1,2}
  blockB/unit_U/bottleneck_v2/conv{1,2}/BatchNorm/...        blockB_unitU_conv{1,2}_bn
  blockB/unit_U/bottleneck_v2/conv3/{weights,biases}         blockB_unitU_conv3

Kernels are HWIO in both. Everything else in the checkpoint (block 4, `postnorm`, `logits`,
`global_step`, optimizer slots, other scopes) is ignored and listed. A variable the trunk needs that
is missing, has another shape, or holds a non-finite value is refused with its name; so is a
`depth` whose units per block differ from the checkpoint's. Reading uses `tf.train.load_checkpoint`
(no TF1 graph). Output stride changes no weight (a strided 3x3 conv and its rate-2 form share the
kernel, paper_spec 2.1), so one checkpoint imports at 8, 16 or 32.
"""

import collections
import dataclasses
import os
import re
import shutil
import uuid
from typing import Dict, List, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from tf_mtssl.core import configs
from tf_mtssl.runs import checkpoints
from tf_mtssl.model import preprocessing
from tf_mtssl.model import trunk as trunk_lib

BN_SLOTS = ("gamma", "beta", "moving_mean", "moving_variance")  # Keras BatchNormalization weight order
CONV_SLOTS = ("weights", "biases")                             # Keras Conv2D: kernel, bias
_UNIT_LAYER = re.compile(r"block(\d+)_unit(\d+)_(preact_bn|shortcut|conv[123]|conv[12]_bn)$")
_UNIT_NAME = re.compile(r"block(\d+)/unit_(\d+)/bottleneck_v2/")
_ROOT_MARK = "/conv1/weights"
_FIRST_UNIT_MARK = "/block1/unit_1/bottleneck_v2/conv1/weights"



@dataclasses.dataclass(frozen=True)
class ImportConfig:
  """`python -m tf_mtssl.import_checkpoint`: which slim checkpoint, imported how, written where."""
  slim_checkpoint: str = configs.field("", "tf-slim ResNet-v2 checkpoint: a prefix (model.ckpt-N, resnet_v2_101.ckpt) "
                                       "or a directory (its latest checkpoint). Required.")
  model_dir: str = configs.field("", "New run directory to write (must not exist or be empty). Required.")
  depth: int = configs.field(101, "ResNet-v2 depth of the checkpoint (paper_spec 2.1: 101); must match its units.",
                             choices=sorted(trunk_lib.UNITS_PER_BLOCK))
  output_stride: int = configs.field(16, "Output stride the imported trunk runs at (paper_spec 2.1: 16; the "
                                     "released model was run at 32 in its README). No weight depends on it.",
                                     choices=trunk_lib.VALID_OUTPUT_STRIDES)
  preprocessing: str = configs.field(preprocessing.VGG, "Input convention the checkpoint was trained with, recorded "
                                     "and applied by every consumer: vgg = "
                                     + preprocessing.INPUT_CONVENTIONS[preprocessing.VGG] + ", the multiself "
                                     "model; inception = " + preprocessing.INPUT_CONVENTIONS[preprocessing.INCEPTION]
                                     + ".", choices=sorted(preprocessing.INPUT_CONVENTIONS))
  scope: str = configs.field("", "Slim scope of the network (e.g. resnet_v2_101); empty = the only ResNet-v2 "
                             "scope in the checkpoint.")

  def __post_init__(self):
    missing = [f"--{n}" for n in ("slim_checkpoint", "model_dir") if not getattr(self, n)]
    if missing:
      raise ValueError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")

def slim_variable_names(layer_name: str, layer: keras.layers.Layer, scope: str) -> List[str]:
  """The slim variable names of one trunk layer's weights, in the order of `layer.weights`."""
  if layer_name == "conv1":
    prefix = f"{scope}/conv1"
  else:
    match = _UNIT_LAYER.match(layer_name)
    if match is None:
      raise ValueError(f"Trunk layer {layer_name!r} has weights but no slim counterpart")
    block, unit, part = match.groups()
    unit_scope = f"{scope}/block{block}/unit_{unit}/bottleneck_v2"
    prefix = {"preact_bn": f"{unit_scope}/preact",
              "conv1_bn": f"{unit_scope}/conv1/BatchNorm",
              "conv2_bn": f"{unit_scope}/conv2/BatchNorm"}.get(part, f"{unit_scope}/{part}")
  if isinstance(layer, layers.BatchNormalization):
    return [f"{prefix}/{slot}" for slot in BN_SLOTS]
  return [f"{prefix}/{slot}" for slot in CONV_SLOTS[:len(layer.weights)]]


def trunk_variable_map(trunk: keras.Model, scope: str) -> List[Tuple[keras.Variable, str, str]]:
  """(trunk variable, slim name, trunk layer name) for every weight of a `tf_mtssl.model.trunk` model."""
  out = []
  for layer in trunk.layers:
    if not layer.weights:
      continue
    for variable, name in zip(layer.weights, slim_variable_names(layer.name, layer, scope)):
      out.append((variable, name, layer.name))
  return out


def find_scope(names: Sequence[str], scope: str = "") -> str:
  """The slim scope holding a ResNet-v2 root and first unit (e.g. `resnet_v2_101`).

  Raises ValueError when `scope` is given but absent, or when none or several scopes qualify.
  """
  present = set(names)
  candidates = sorted(n[:-len(_ROOT_MARK)] for n in present
                      if n.endswith(_ROOT_MARK) and n[:-len(_ROOT_MARK)] + _FIRST_UNIT_MARK in present)
  if scope:
    if scope not in candidates:
      raise ValueError(f"--scope={scope}: the checkpoint has no {scope}{_ROOT_MARK} with "
                       f"{scope}{_FIRST_UNIT_MARK}; ResNet-v2 scopes found: {candidates or 'none'}")
    return scope
  if not candidates:
    raise ValueError(f"Not a tf-slim ResNet-v2 checkpoint: no variable SCOPE{_ROOT_MARK} with "
                     f"SCOPE{_FIRST_UNIT_MARK} among its {len(present)} variables")
  if len(candidates) > 1:
    raise ValueError(f"The checkpoint holds several ResNet-v2 scopes {candidates}: choose one with --scope")
  return candidates[0]


def units_per_block(names: Sequence[str], scope: str) -> Dict[int, int]:
  """{block: number of units} of the slim ResNet-v2 under `scope` (blocks 1-4 as present)."""
  units = collections.defaultdict(int)
  for name in names:
    if not name.startswith(scope + "/"):
      continue
    match = _UNIT_NAME.match(name[len(scope) + 1:])
    if match:
      block, unit = int(match.group(1)), int(match.group(2))
      units[block] = max(units[block], unit)
  return dict(units)


def check_depth(units: Dict[int, int], depth: int, scope: str) -> None:
  """Raises ValueError unless blocks 1-3 of the checkpoint have the units of ResNet-`depth`."""
  trunk_lib.trunk_config(depth)  # an unsupported depth is refused with the supported ones
  found = tuple(units.get(b, 0) for b in (1, 2, 3))
  expected = trunk_lib.UNITS_PER_BLOCK[depth]
  if found != expected:
    fits = [d for d, u in sorted(trunk_lib.UNITS_PER_BLOCK.items()) if u == found]
    hint = f"; it fits --depth={fits[0]}" if fits else "; no supported depth has these units"
    raise ValueError(f"--depth={depth} does not fit the checkpoint: ResNet-{depth} has {expected} units in "
                     f"blocks 1-3, {scope} has {found} (its last block-3 unit is "
                     f"{scope}/block3/unit_{found[2]}){hint}")


def base_width(shapes: Dict[str, Sequence[int]], scope: str) -> int:
  """The trunk's base width from the root conv (slim's generic resnet_v2: 64)."""
  root = list(shapes[f"{scope}/conv1/weights"])
  first = list(shapes[f"{scope}{_FIRST_UNIT_MARK}"])
  if len(root) != 4 or root[:3] != [7, 7, 3] or len(first) != 4 or first[-1] != root[-1]:
    raise ValueError(f"{scope}/conv1/weights has shape {root} and {scope}{_FIRST_UNIT_MARK} {first}: "
                     "the trunk needs a 7x7x3 root conv whose width equals block 1's bottleneck width")
  return int(root[-1])


def _group(name: str, scope: str) -> str:
  """Coarse part of the network an ignored variable belongs to, for the listing."""
  if not name.startswith(scope + "/"):
    return name.split("/")[0] if "/" in name else name
  return name[len(scope) + 1:].split("/")[0]


def ignored_summary(ignored: Sequence[str], scope: str) -> Dict[str, int]:
  """{part (block4, postnorm, logits, global_step, another scope, ...): number of ignored variables}."""
  return dict(sorted(collections.Counter(_group(n, scope) for n in ignored).items()))


def load_slim_trunk(slim_checkpoint: str, depth: int = 101, output_stride: int = 16,
                    scope: str = "") -> Tuple[keras.Model, dict]:
  """Builds the trunk and fills it from a tf-slim ResNet-v2 checkpoint.

  Args:
    slim_checkpoint: a checkpoint prefix (`model.ckpt-123`, `resnet_v2_101.ckpt`) or a directory
      (its latest checkpoint).
    depth: trunk depth; must match the checkpoint's units in blocks 1-3.
    output_stride: 8, 16 or 32 (no weight depends on it).
    scope: the slim scope; empty = the only ResNet-v2 scope in the checkpoint.
  Returns:
    (trunk, report): report has `scope`, `trunk` (config), `num_imported`, `ignored` (names) and
    `ignored_summary`.
  Raises:
    FileNotFoundError: no checkpoint at `slim_checkpoint`.
    ValueError: not a ResNet-v2 checkpoint, a depth that does not fit, a missing, mis-shaped or
      non-finite variable (named).
  """
  path = tf.train.latest_checkpoint(slim_checkpoint) if os.path.isdir(slim_checkpoint) else slim_checkpoint
  # V2 checkpoints are PREFIX.index + PREFIX.data-*; the older V1 format (slim's 2016-2017 zoo) one file.
  if not path or not (tf.io.gfile.exists(path + ".index") or
                      (tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path))):
    raise FileNotFoundError(f"--slim_checkpoint={slim_checkpoint}: no TF checkpoint there (expected "
                            "PREFIX.index and PREFIX.data-*, a V1 checkpoint file, or a directory "
                            "with a `checkpoint` file)")
  try:
    reader = tf.train.load_checkpoint(path)
  except (tf.errors.OpError, ValueError) as e:
    raise ValueError(f"--slim_checkpoint={path}: unreadable checkpoint ({str(e).splitlines()[0][:200]})") from e
  shapes = {name: list(shape) for name, shape in reader.get_variable_to_shape_map().items()}
  scope = find_scope(list(shapes), scope)
  check_depth(units_per_block(list(shapes), scope), depth, scope)
  config = trunk_lib.trunk_config(depth, output_stride, base_width(shapes, scope))
  trunk = trunk_lib.build_trunk(**config)
  mapping = trunk_variable_map(trunk, scope)
  missing = [name for _, name, _ in mapping if name not in shapes]
  if missing:
    more = f" (and {len(missing) - 1} more: {', '.join(missing[1:4])}{', ...' if len(missing) > 4 else ''})"
    raise ValueError(f"{path}: variable {missing[0]} is missing{more if len(missing) > 1 else ''}; "
                     f"the trunk (ResNet-{depth} to block 3) needs all {len(mapping)}")
  for variable, name, layer_name in mapping:
    if shapes[name] != list(variable.shape):
      raise ValueError(f"{path}: variable {name} has shape {shapes[name]}, the trunk's layer {layer_name} "
                       f"expects {list(variable.shape)}")
  for variable, name, layer_name in mapping:
    value = reader.get_tensor(name)
    if not np.issubdtype(np.asarray(value).dtype, np.floating):
      raise ValueError(f"{path}: variable {name} has dtype {np.asarray(value).dtype}, expected a float")
    value = np.asarray(value, np.float32)
    if not np.all(np.isfinite(value)):
      raise ValueError(f"{path}: variable {name} holds non-finite values")
    variable.assign(value)
  used = {name for _, name, _ in mapping}
  ignored = sorted(set(shapes) - used)
  return trunk, {"slim_checkpoint": os.path.abspath(path), "scope": scope, "trunk": config,
                 "num_imported": len(mapping), "ignored": ignored,
                 "ignored_summary": ignored_summary(ignored, scope)}


def _check_new_run_dir(model_dir: str) -> None:
  if os.path.isdir(model_dir) and os.listdir(model_dir):
    raise ValueError(f"--model_dir={model_dir} is not empty ({', '.join(sorted(os.listdir(model_dir))[:5])}"
                     f"{', ...' if len(os.listdir(model_dir)) > 5 else ''}): the import writes a new run "
                     "directory; choose another. Nothing was changed.")
  if os.path.exists(model_dir) and not os.path.isdir(model_dir):
    raise ValueError(f"--model_dir={model_dir} exists and is not a directory")


def write_run_dir(trunk: keras.Model, model_dir: str, run_config: dict) -> str:
  """Writes a run directory with `run_config.json` and one checkpoint (`ckpt-0`, named item `trunk`).

  Everything is written to a hidden sibling directory first and renamed into place, so a failure
  leaves nothing half-written; an existing non-empty `model_dir` is refused untouched.
  Returns the checkpoint prefix.
  """
  _check_new_run_dir(model_dir)
  parent = os.path.dirname(os.path.abspath(model_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".tmp-import-{uuid.uuid4().hex}")
  try:
    checkpoints.save_run_config(tmp, run_config)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(trunk=trunk), tmp, max_to_keep=1)
    manager.save(checkpoint_number=0)
    if os.path.isdir(model_dir):
      os.rmdir(model_dir)  # empty (checked above)
    os.rename(tmp, model_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return checkpoints.resolve_checkpoint(model_dir)


def import_slim_checkpoint(slim_checkpoint: str, model_dir: str, depth: int = 101, output_stride: int = 16,
                           convention: str = preprocessing.VGG, scope: str = "") -> dict:
  """tf-slim ResNet-v2 checkpoint -> a tf_mtssl run directory every evaluation and export accept.

  `convention` is the input normalisation the checkpoint was trained with (`tf_mtssl.model.preprocessing`:
  `vgg` for the authors' multiself model, paper_spec 2.2; `inception` for slim's ImageNet zoo); it is
  recorded in run_config.json, and every consumer applies it. Returns the import report (see
  `load_slim_trunk`) with `model_dir` and `checkpoint`.
  """
  preprocessing.check_convention(convention)
  _check_new_run_dir(model_dir)  # before the (slow) read: refuse early, change nothing
  trunk, report = load_slim_trunk(slim_checkpoint, depth=depth, output_stride=output_stride, scope=scope)
  run_config = {
      "trunk": report["trunk"], "tasks": [], "task_options": {}, "lasso": None, "image_size": None,
      "harmonize": False, checkpoints.PREPROCESSING_KEY: convention,
      "imported_from": {k: report[k] for k in ("slim_checkpoint", "scope", "num_imported",
                                               "ignored_summary", "ignored")},
  }
  checkpoint = write_run_dir(trunk, model_dir, run_config)
  return {**report, "model_dir": os.path.abspath(model_dir), "checkpoint": checkpoint,
          "preprocessing": convention}
