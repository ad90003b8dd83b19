"""The layout of an export directory, and reading one back (TF Serving's layout: one integer directory
per version; written by `tf_mtssl.serving.export`):

  EXPORT_DIR/<version>/saved_model.pb, variables/         the SavedModel
  EXPORT_DIR/<version>/assets.extra/trunk.keras            the trunk as a Keras file (`load_keras_trunk`)
  EXPORT_DIR/<version>/assets.extra/export_metadata.json   run_config, checkpoint, version, input convention
"""

import json
import os
import re
from typing import List, Tuple

import keras

from tf_mtssl.model import preprocessing

EXTRA_DIR = "assets.extra"
KERAS_FILE = "trunk.keras"
METADATA_FILE = "export_metadata.json"
INPUT_CONVENTION_KEY = "input_convention"   # in export_metadata.json


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
