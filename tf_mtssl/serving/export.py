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

import dataclasses
import datetime
import json
import os
import shutil
import uuid
from typing import Dict, Optional, Tuple

import keras
import tensorflow as tf

from tf_mtssl.core import configs
from tf_mtssl.model import pooling, preprocessing
from tf_mtssl.runs import checkpoints, exports, trunk_source
from tf_mtssl.runs.exports import EXTRA_DIR, INPUT_CONVENTION_KEY, KERAS_FILE, METADATA_FILE

SERVING_DEFAULT = "serving_default"
IMAGE_TENSOR = "image_tensor"
SIGNATURES = (SERVING_DEFAULT, IMAGE_TENSOR)
BYTES_INPUT = "image_bytes"
TENSOR_INPUT = "images"
FEATURES, BLOCK3, GRID = "features", "block3", "grid"
DEFAULT_IMAGE_SIZE = 224   # paper_spec 7.1 [I]: 224 x 224 centre crops
RESIZE_POLICY = ("centre square crop (side = the shorter side, aspect ratio kept), then bilinear "
                 "antialiased resize to image_size x image_size")
_TMP_PREFIX = ".tmp-export-"


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


def trunk_outputs(trunk: keras.Model, images: tf.Tensor, grid: int = pooling.LINEAR_EVAL_GRID,
                  with_units: bool = False,
                  convention: str = preprocessing.DEFAULT_CONVENTION) -> Dict[str, tf.Tensor]:
  """The exported outputs for float RGB images in [0, 255] (inference mode), normalised by the
  trunk's input `convention`."""
  out = trunk(preprocessing.rgb_to_trunk_input(images, convention), training=False)
  block3 = out["block3"]
  result = {FEATURES: tf.reduce_mean(block3, axis=[1, 2]), BLOCK3: block3, GRID: pooling.pool_to_grid(block3, grid)}
  if with_units:
    units = out["units"]
    result.update({unit_output_name(i, len(units)): u for i, u in enumerate(units, start=1)})
  return result


class TrunkExportModule(tf.Module):
  """What the SavedModel holds: the trunk and the two serving functions."""

  def __init__(self, trunk: keras.Model, image_size: int = DEFAULT_IMAGE_SIZE,
               export_units: bool = False, grid: int = pooling.LINEAR_EVAL_GRID,
               convention: str = preprocessing.DEFAULT_CONVENTION):
    super().__init__(name="tf_mtssl_trunk_export")
    if image_size < 16:
      raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    self.trunk = trunk
    self._convention = preprocessing.check_convention(convention)
    self._image_size, self._export_units, self._grid = int(image_size), bool(export_units), int(grid)
    # No tensor-dependent Python control flow: traced without AutoGraph (as the evaluations' functions).
    self.serving_default = tf.function(
        self._from_bytes, input_signature=[tf.TensorSpec([None], tf.string, name=BYTES_INPUT)], autograph=False)
    self.image_tensor = tf.function(
        self._from_tensor, input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32,
                                                          name=TENSOR_INPUT)], autograph=False)

  def _from_bytes(self, image_bytes):
    return trunk_outputs(self.trunk, decode_batch(image_bytes, self._image_size), self._grid,
                         convention=self._convention)

  def _from_tensor(self, images):
    return trunk_outputs(self.trunk, images, self._grid, with_units=self._export_units,
                         convention=self._convention)

  def signatures(self) -> dict:
    return {SERVING_DEFAULT: self.serving_default.get_concrete_function(),
            IMAGE_TENSOR: self.image_tensor.get_concrete_function()}


# ---- writing ---------------------------------------------------------------------------------------
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
        "feature_channels": int(block3_channels), "grid": pooling.LINEAR_EVAL_GRID,
        "num_units": len(trunk.output["units"]), "export_units": bool(export_units),
        "signatures": _signature_summary(module),
        "keras_file": f"{EXTRA_DIR}/{KERAS_FILE}",
        "tensorflow_version": tf.__version__, "keras_version": keras.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for _ in range(max_attempts):
      versions = exports.list_versions(export_dir)
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


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """`python -m tf_mtssl.export_saved_model`: which run's trunk, exported where and how."""
  model_dir: str = configs.field("runs/pretrain", "Pretraining run directory (python -m tf_mtssl.pretrain "
                                 "--model_dir): run_config.json and checkpoints.")
  export_dir: str = configs.field("exports/tf_mtssl", "Export base directory; each export adds the next integer "
                                  "version directory (what TF Serving's --model_base_path points to).")
  checkpoint: str = configs.field("", "Checkpoint prefix to export (absolute, or relative to --model_dir, e.g. "
                                  "ckpt-10); empty: the newest readable.")
  image_size: int = configs.field(DEFAULT_IMAGE_SIZE, "Side of the square the serving_default signature resizes "
                                  "decoded images to (centre square crop keeping the aspect ratio, then resize); "
                                  "paper_spec 7.1 [I]: 224.")
  export_units: bool = configs.field(False, "Also output every block-3 unit (unit_01 ...) from the image_tensor "
                                     "signature, for lasso users (paper_spec 5).")


def export_run(model_dir: str, export_dir: str, checkpoint: Optional[str] = None,
               image_size: int = DEFAULT_IMAGE_SIZE, export_units: bool = False) -> Tuple[int, str]:
  """Exports the trunk of a pretraining run (latest or named checkpoint); returns (version, dir).

  The trunk comes from the one trunk source of the project (`tf_mtssl.runs.trunk_source.load_trunk`):
  rebuilt from the run's run_config.json, so no architecture flags are repeated; the named checkpoint,
  else the newest readable one (damaged newer ones are named and skipped).
  """
  if not os.path.isdir(model_dir):
    raise FileNotFoundError(f"Pretraining run directory {model_dir} does not exist")
  source = trunk_source.load_trunk("pretrained", model_dir=model_dir, checkpoint=checkpoint or "")
  provenance = source.provenance
  config = checkpoints.load_run_config(model_dir)
  metadata = {"model_dir": provenance["model_dir"], "checkpoint": provenance["checkpoint"],
              "step": provenance["step"], "trunk": config["trunk"], "run_config": config,
              "weights_sha256": provenance["weights_sha256"]}
  lasso = checkpoints.restore_lasso(model_dir, provenance["checkpoint"])
  if lasso is not None:  # which block-3 units each pretraining task drew on (paper_spec 5)
    metadata["lasso_alphas"] = {row: lasso.alpha(row).numpy().tolist() for row in lasso.rows}
  return export_trunk(source.trunk, export_dir, image_size=image_size, export_units=export_units,
                      metadata=metadata, convention=trunk_source.input_convention(provenance))
