"""Exporting a pretrained trunk: serving signatures, TF Serving versioning, the Keras trunk file.

Layout written by `export_run` / `export_trunk` (TF Serving's: one integer directory per version):

  EXPORT_DIR/<version>/saved_model.pb, variables/     the SavedModel (signatures below)
  EXPORT_DIR/<version>/assets.extra/trunk.keras        the trunk as a Keras file (`load_keras_trunk`)
  EXPORT_DIR/<version>/assets.extra/export_metadata.json   run_config, checkpoint, version, ...

`assets.extra/` is the SavedModel's place for files that are not part of the graph; TF Serving ignores
everything in it except warm-up requests, so a real TF Serving binary serves the directory unchanged.
A version is written to a hidden temporary directory under EXPORT_DIR and renamed into place, so a
crash never leaves a half-written version (TF Serving only looks at integer directory names).

Signatures (outputs identical in both, computed at inference: batch norm uses its moving averages):
  serving_default: `image_bytes` DT_STRING [batch], encoded JPEG/PNG/GIF/BMP. Each image is decoded to
    RGB, centre-cropped to a square (side = its shorter side: the aspect ratio is kept, the longer side
    is trimmed equally on both ends), resized to image_size x image_size (bilinear, antialiased) and
    normalised inside the graph by the run's recorded input convention (`tf_mtssl.model.preprocessing`:
    VGG means for pretraining runs, paper_spec 2.2; [-1, 1] for an imported slim ImageNet model).
  image_tensor: `images` DT_FLOAT [batch, H, W, 3], RGB in [0, 255], used at its own size (the trunk is
    fully convolutional), normalised in the graph the same way; with `export_units`, also every
    block-3 unit output. Clients always send plain RGB, whatever the trunk's convention.
  Outputs:
    features  [batch, C]        global average of block 3 (C = 1024 for the paper's trunk);
    block3    [batch, h, w, C]  the block-3 map (h = w = 14 at 224 px, output stride 16);
    grid      [batch, 3, 3, C]  block 3 average-pooled to the 3x3 grid of the linear evaluation
                                (paper_spec 7.1; `pool_to_grid`);
    unit_01 .. unit_NN          (image_tensor, export_units only) block-3 unit outputs, for the lasso
                                (paper_spec 5); the last one equals block3.
The same functions are attributes of the loaded object (`loaded.image_tensor(images)`), which is what
`keras.layers.TFSMLayer(path, call_endpoint="image_tensor")` calls.
"""

import datetime
import json
import os
import re
import shutil
import uuid
from typing import Dict, List, Optional, Tuple

import keras
import tensorflow as tf

from tf_mtssl.runs import checkpoints
from tf_mtssl.model import preprocessing

SERVING_DEFAULT = "serving_default"
IMAGE_TENSOR = "image_tensor"
SIGNATURES = (SERVING_DEFAULT, IMAGE_TENSOR)
BYTES_INPUT = "image_bytes"
TENSOR_INPUT = "images"
FEATURES, BLOCK3, GRID = "features", "block3", "grid"
EXTRA_DIR = "assets.extra"
KERAS_FILE = "trunk.keras"
METADATA_FILE = "export_metadata.json"
DEFAULT_IMAGE_SIZE = 224   # paper_spec 7.1 [I]: 224 x 224 centre crops
LINEAR_EVAL_GRID = 3       # paper_spec 7.1: a 3x3xC representation
INPUT_CONVENTION_KEY = "input_convention"   # in export_metadata.json
RESIZE_POLICY = ("centre square crop (side = the shorter side, aspect ratio kept), then bilinear "
                 "antialiased resize to image_size x image_size")
_TMP_PREFIX = ".tmp-export-"


# ---- pooling (shared with the linear evaluation) ---------------------------------------------------
def _bin_edges(size, grid: int, index: int):
  """[floor(i * size / g), ceil((i + 1) * size / g)): adaptive pooling bins (as torch's
  AdaptiveAvgPool2d); never empty, and they overlap by one row when size is not a multiple of g."""
  return (index * size) // grid, -((-(index + 1) * size) // grid)


def pool_to_grid(features: tf.Tensor, grid: int = LINEAR_EVAL_GRID) -> tf.Tensor:
  """Adaptive average pooling of [B, h, w, C] features to [B, grid, grid, C].

  paper_spec 7.1: the linear evaluation reads block 3 reduced to 3x3xC (9,216 values at C = 1024);
  how the paper reduced it is not recovered, adaptive average pooling is the inferred choice [I].
  At 224 px (14x14 block 3) the bins are rows/columns [0, 5), [4, 10), [9, 14). Works for static or
  dynamic h, w (any h, w >= 1) in eager and graph mode; inside a Keras functional model use
  `GridAveragePooling`.
  """
  if int(grid) != grid or grid < 1:
    raise ValueError(f"grid must be a positive integer, got {grid!r}")
  features = tf.convert_to_tensor(features)
  if features.shape.rank is not None and features.shape.rank != 4:
    raise ValueError(f"pool_to_grid expects [batch, h, w, channels] features, got shape {features.shape}")
  # Static sizes give Python-int slices (a simpler graph); unknown ones fall back to tf.shape.
  dynamic = tf.shape(features)
  h = features.shape[1] if features.shape[1] is not None else dynamic[1]
  w = features.shape[2] if features.shape[2] is not None else dynamic[2]
  rows = []
  for i in range(grid):
    h0, h1 = _bin_edges(h, grid, i)
    cells = []
    for j in range(grid):
      w0, w1 = _bin_edges(w, grid, j)
      cells.append(tf.reduce_mean(features[:, h0:h1, w0:w1, :], axis=[1, 2]))
    rows.append(tf.stack(cells, axis=1))
  return tf.stack(rows, axis=1)


@keras.saving.register_keras_serializable(package="tf_mtssl")
class GridAveragePooling(keras.layers.Layer):
  """`pool_to_grid` as a Keras layer: [B, h, w, C] -> [B, grid, grid, C]."""

  def __init__(self, grid: int = LINEAR_EVAL_GRID, **kwargs):
    super().__init__(**kwargs)
    if int(grid) != grid or grid < 1:
      raise ValueError(f"grid must be a positive integer, got {grid!r}")
    self.grid = int(grid)

  def call(self, features):
    return pool_to_grid(features, self.grid)

  def compute_output_shape(self, input_shape):
    return (input_shape[0], self.grid, self.grid, input_shape[-1])

  def get_config(self):
    return {**super().get_config(), "grid": self.grid}


# ---- in-graph input handling ----------------------------------------------------------------------
def decode_and_resize(image_bytes: tf.Tensor, image_size: int = DEFAULT_IMAGE_SIZE) -> tf.Tensor:
  """One encoded image (scalar string) -> float32 [image_size, image_size, 3] RGB in [0, 255].

  See RESIZE_POLICY. Undecodable bytes raise tf.errors.InvalidArgumentError.
  """
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  side = tf.minimum(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  square = image[top:top + side, left:left + side]
  resized = tf.image.resize(square, [image_size, image_size], method="bilinear", antialias=True)
  return tf.ensure_shape(resized, [image_size, image_size, 3])


def decode_batch(image_bytes: tf.Tensor, image_size: int = DEFAULT_IMAGE_SIZE) -> tf.Tensor:
  """[B] encoded images -> float32 [B, image_size, image_size, 3] in [0, 255]."""
  return tf.map_fn(lambda b: decode_and_resize(b, image_size), image_bytes,
                   fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))


def unit_output_name(index: int, num_units: int) -> str:
  """unit_01 ... (zero-padded so the names sort in unit order)."""
  return f"unit_{index:0{max(2, len(str(num_units)))}d}"


def trunk_outputs(trunk: keras.Model, images: tf.Tensor, grid: int = LINEAR_EVAL_GRID,
                  with_units: bool = False,
                  convention: str = preprocessing.DEFAULT_CONVENTION) -> Dict[str, tf.Tensor]:
  """The exported outputs for float RGB images in [0, 255] (inference mode), normalised by the
  trunk's input `convention`."""
  out = trunk(preprocessing.rgb_to_trunk_input(images, convention), training=False)
  block3 = out["block3"]
  result = {FEATURES: tf.reduce_mean(block3, axis=[1, 2]), BLOCK3: block3, GRID: pool_to_grid(block3, grid)}
  if with_units:
    units = out["units"]
    result.update({unit_output_name(i, len(units)): u for i, u in enumerate(units, start=1)})
  return result


class TrunkExportModule(tf.Module):
  """What the SavedModel holds: the trunk and the two serving functions."""

  def __init__(self, trunk: keras.Model, image_size: int = DEFAULT_IMAGE_SIZE,
               export_units: bool = False, grid: int = LINEAR_EVAL_GRID,
               convention: str = preprocessing.DEFAULT_CONVENTION):
    super().__init__(name="tf_mtssl_trunk_export")
    if image_size < 16:
      raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    self.trunk = trunk
    self._convention = preprocessing.check_convention(convention)
    self._image_size, self._export_units, self._grid = int(image_size), bool(export_units), int(grid)
    self.serving_default = tf.function(
        self._from_bytes, input_signature=[tf.TensorSpec([None], tf.string, name=BYTES_INPUT)])
    self.image_tensor = tf.function(
        self._from_tensor, input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32,
                                                          name=TENSOR_INPUT)])

  def _from_bytes(self, image_bytes):
    return trunk_outputs(self.trunk, decode_batch(image_bytes, self._image_size), self._grid,
                         convention=self._convention)

  def _from_tensor(self, images):
    return trunk_outputs(self.trunk, images, self._grid, with_units=self._export_units,
                         convention=self._convention)

  def signatures(self) -> dict:
    return {SERVING_DEFAULT: self.serving_default.get_concrete_function(),
            IMAGE_TENSOR: self.image_tensor.get_concrete_function()}


# ---- versions -------------------------------------------------------------------------------------
def list_versions(export_dir: str) -> List[int]:
  """Integer version directories under export_dir (TF Serving's convention), ascending."""
  if not os.path.isdir(export_dir):
    return []
  return sorted(int(n) for n in os.listdir(export_dir)
                if re.fullmatch(r"\d+", n) and os.path.isdir(os.path.join(export_dir, n)))


def latest_version(export_dir: str) -> Tuple[int, str]:
  """(version, path) of the newest version under export_dir."""
  versions = list_versions(export_dir)
  if not versions:
    raise FileNotFoundError(f"No exported version under {export_dir}: expected integer directories "
                            "(run python -m tf_mtssl.export_saved_model first)")
  return versions[-1], os.path.join(export_dir, str(versions[-1]))


def _step_of(checkpoint_path: str) -> Optional[int]:
  match = re.search(r"ckpt-(\d+)$", checkpoint_path)
  return int(match.group(1)) if match else None


def _signature_summary(module: TrunkExportModule) -> dict:
  out = {}
  for name, fn in module.signatures().items():
    inputs = {spec.name: {"dtype": spec.dtype.name, "shape": spec.shape.as_list()}
              for spec in tf.nest.flatten(fn.structured_input_signature)}
    outputs = {k: {"dtype": v.dtype.name, "shape": v.shape.as_list()}
               for k, v in sorted(fn.structured_outputs.items())}
    out[name] = {"inputs": inputs, "outputs": outputs}
  return out


def export_trunk(trunk: keras.Model, export_dir: str, image_size: int = DEFAULT_IMAGE_SIZE,
                 export_units: bool = False, metadata: Optional[dict] = None,
                 max_attempts: int = 5, convention: str = preprocessing.DEFAULT_CONVENTION) -> Tuple[int, str]:
  """Writes the next version of `trunk` under export_dir; returns (version, version_dir).

  `convention`: the trunk's input convention, applied inside both signatures and recorded in the
  metadata (`input_convention`), so whoever loads `trunk.keras` can apply it too.

  The SavedModel, the Keras file and the metadata are written to a temporary directory that is then
  renamed to EXPORT_DIR/<max existing version + 1>; if another exporter took that number meanwhile,
  the next free one is used.
  """
  os.makedirs(export_dir, exist_ok=True)
  module = TrunkExportModule(trunk, image_size=image_size, export_units=export_units, convention=convention)
  tmp = os.path.join(export_dir, f"{_TMP_PREFIX}{uuid.uuid4().hex}")
  try:
    tf.saved_model.save(module, tmp, signatures=module.signatures())
    extra = os.path.join(tmp, EXTRA_DIR)
    os.makedirs(extra, exist_ok=True)
    trunk.save(os.path.join(extra, KERAS_FILE))
    block3_channels = trunk.output["block3"].shape[-1]
    info = {
        **(metadata or {}),
        "image_size": int(image_size), "resize": RESIZE_POLICY,
        INPUT_CONVENTION_KEY: convention,
        "preprocessing": f"{preprocessing.INPUT_CONVENTIONS[convention]}, inside the graph",
        "feature_channels": int(block3_channels), "grid": LINEAR_EVAL_GRID,
        "num_units": len(trunk.output["units"]), "export_units": bool(export_units),
        "signatures": _signature_summary(module),
        "keras_file": f"{EXTRA_DIR}/{KERAS_FILE}",
        "tensorflow_version": tf.__version__, "keras_version": keras.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for _ in range(max_attempts):
      versions = list_versions(export_dir)
      version = (versions[-1] + 1) if versions else 1
      info["version"] = version
      with open(os.path.join(extra, METADATA_FILE), "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
      target = os.path.join(export_dir, str(version))
      try:
        os.rename(tmp, target)  # atomic; fails if another exporter created `target` meanwhile
      except OSError:
        if os.path.exists(target):
          continue
        raise
      return version, target
    raise RuntimeError(f"Could not claim a version number under {export_dir} after {max_attempts} tries")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def export_run(model_dir: str, export_dir: str, checkpoint: Optional[str] = None,
               image_size: int = DEFAULT_IMAGE_SIZE, export_units: bool = False) -> Tuple[int, str]:
  """Exports the trunk of a pretraining run (latest or named checkpoint); returns (version, dir).

  The trunk is rebuilt from the run's run_config.json, so no architecture flags are repeated.
  """
  if not os.path.isdir(model_dir):
    raise FileNotFoundError(f"Pretraining run directory {model_dir} does not exist")
  config = checkpoints.load_run_config(model_dir)
  # The named checkpoint, else the newest readable one (damaged newer ones are named and skipped).
  trunk, path = checkpoints.trunk_from_run(model_dir, checkpoint)
  metadata = {"model_dir": os.path.abspath(model_dir), "checkpoint": os.path.abspath(path),
              "step": _step_of(path), "trunk": config["trunk"], "run_config": config}
  lasso = checkpoints.restore_lasso(model_dir, path)
  if lasso is not None:  # which block-3 units each pretraining task drew on (paper_spec 5)
    metadata["lasso_alphas"] = {row: lasso.alpha(row).numpy().tolist() for row in lasso.rows}
  return export_trunk(trunk, export_dir, image_size=image_size, export_units=export_units,
                      metadata=metadata, convention=checkpoints.input_convention(config))


# ---- reading an export ----------------------------------------------------------------------------
def version_dir(path: str) -> str:
  """A version directory, or the newest version of an export directory."""
  if os.path.isfile(os.path.join(path, "saved_model.pb")):
    return path
  return latest_version(path)[1]


def read_metadata(path: str) -> dict:
  """export_metadata.json of a version directory (or of the newest version of an export dir)."""
  file = os.path.join(version_dir(path), EXTRA_DIR, METADATA_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{file} is missing: not a tf_mtssl export")
  with open(file) as f:
    return json.load(f)


def input_convention(path: str) -> str:
  """The input convention of an export (version or export directory) that `trunk.keras` expects.

  Exports written before it was recorded applied VGG normalisation in their graph (paper_spec 2.2).
  """
  metadata = read_metadata(path)
  return preprocessing.check_convention(metadata.get(INPUT_CONVENTION_KEY, preprocessing.DEFAULT_CONVENTION))


def load_keras_trunk(path: str) -> keras.Model:
  """The trunk as a full Keras model (trainable, batch norm with training semantics) for fine-tuning.

  `path`: a version directory or an export directory (its newest version).
  """
  from tf_mtssl.model import lasso  # noqa: F401  (registers the project's custom layers)
  file = os.path.join(version_dir(path), EXTRA_DIR, KERAS_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{file} is missing: not a tf_mtssl export")
  return keras.models.load_model(file, compile=False)
