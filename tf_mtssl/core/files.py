"""Files written so that a crash never leaves half of one: every write goes to a temporary name in the
same directory (so the rename stays on one file system) and is renamed over the target."""

import hashlib
import json
import os
import pathlib
import shutil
from typing import Any, Dict, Union

PathLike = Union[str, os.PathLike]


def _tmp_name(path: pathlib.Path) -> pathlib.Path:
  return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_bytes(path: PathLike, data: bytes) -> pathlib.Path:
  """Writes `data` to `path` atomically (parent folders made); returns the path."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = _tmp_name(path)
  tmp.write_bytes(data)
  os.replace(tmp, path)
  return path


def write_text(path: PathLike, text: str) -> pathlib.Path:
  return write_bytes(path, text.encode())


def write_json(path: PathLike, value: Any, indent: int = 2) -> pathlib.Path:
  """JSON with sorted keys; numpy scalars and other numbers are written as floats."""
  return write_text(path, json.dumps(value, indent=indent, sort_keys=True, default=float) + "\n")


def read_json(path: PathLike) -> Any:
  with open(path) as f:
    return json.load(f)


def copy(src: PathLike, dst: PathLike) -> pathlib.Path:
  """Copies `src` to `dst` atomically."""
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  if not src.exists():
    raise FileNotFoundError(f"Source file not found: {src}")
  dst.parent.mkdir(parents=True, exist_ok=True)
  tmp = _tmp_name(dst)
  shutil.copyfile(src, tmp)
  os.replace(tmp, dst)
  return dst


def save_arrays(path: PathLike, arrays: Dict[str, Any]) -> pathlib.Path:
  """A compressed .npz of `arrays`, atomically."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = _tmp_name(path)
  with open(tmp, "wb") as f:
    np.savez_compressed(f, **arrays)
  os.replace(tmp, path)
  return path


def save_array(path: PathLike, array) -> pathlib.Path:
  """One .npy array, atomically."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = _tmp_name(path)
  with open(tmp, "wb") as f:
    np.save(f, array)
  os.replace(tmp, path)
  return path


def sha256_file(path: PathLike) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()
