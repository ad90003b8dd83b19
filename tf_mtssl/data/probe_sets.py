"""Labelled probe sets with statistical power, prepared from Debian packages (issue 19).

Two sets, each used by name (`fashion_mnist`, `objects`) in `tf_mtssl.evaluate_linear` and
`tf_mtssl.study`; each has the splits `train` (the probe is fitted on it), `val` (its
hyper-parameters are chosen on it) and `test` (reported, never used for a choice):

  fashion_mnist  Debian `dataset-fashion-mnist` (MIT; Zalando's real 28x28 gray product photos, 10
                 classes). train = 500 images per class of the 60,000 training images, val = 200 other
                 training images per class, test = all 10,000 test images. The remaining 53,000 training
                 images, unlabelled, are a pretraining source (`sources` spec `fashion_mnist`): no
                 probe image (train, val or test) is ever among them. Gray images: the tasks that need
                 colour (col) or video (ms) refuse this source with a one-line error.
  objects        Debian `tuxpaint-stamps-default` (GPL-2): real photos of single objects with a
                 transparent background, one folder per category (`OBJECT_CATEGORIES`: 8 categories,
                 the cartoon and symbol stamps left out). Every object photo belongs to ONE split
                 (never split by crop: a fixed permutation per category, `OBJECT_SPLIT_FRACTIONS`),
                 and is composited `OBJECT_COMPOSITES[split]` times onto crops of held-out real
                 background photos (`backgrounds/<split>/`, from `plasma-workspace-wallpapers`, never a
                 pretraining source; background photos are split between train/val/test too), at a
                 random scale, position and flip. Composites of one photo are correlated, so standard
                 errors are clustered by photo (`groups`).

Which stamps are photos: a stamp is taken as a photo when fewer than `MAX_FLAT_FRACTION` of the
horizontally adjacent opaque pixel pairs have identical gray values (`flat_fraction`): drawings are
filled with flat colour (0.6-1.0 here: the bee, hedgehog and echidna drawings), photos have texture
and noise (0.01-0.46, palette-quantised flower photos the highest). The threshold was set after
looking at every stamp of the 8 categories (contact sheets); `EXCLUDED_STAMPS` lists the two that
pass it but are not photographs of the object (a toy bear, a rendered whale). Stamps without any transparent pixel are left out
(nothing to composite).

Files, under `tf_mtssl.data.embedded.root()`:
  probes/fashion_mnist.npz   {split}_images uint8 [N, 28, 28], {split}_labels int64 [N],
                             {split}_source_index (row in the package's file) for train/val;
  pretrain/fashion_mnist.npy uint8 [53000, 28, 28], the unlabelled pretraining images;
  probes/objects.npz         {split}_images uint8 [N, S, S, 3] RGB, {split}_labels, {split}_groups
                             (index of the object photo in objects.json's list);
  probes/objects.json        classes, every object photo (split, source path, flat fraction) and the
                             backgrounds per split;
  probes/stamps/...          the stamp PNGs used (original bytes), probes/backgrounds/<split>/*.jpg.
"""

import fnmatch
import gzip
import hashlib
import json
import pathlib
import tempfile
from typing import Dict, List, Optional, Tuple

import numpy as np

from tf_mtssl.data import embedded

PROBE_SETS = ("fashion_mnist", "objects")
SPLITS = ("train", "val", "test")

# ---- fashion-mnist -------------------------------------------------------------------------------
FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_DIR = "usr/share/datasets/fashion-mnist"
FASHION_FILES = {"train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
                 "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot")  # the package's README order
FASHION_PER_CLASS = {"train": 500, "val": 200}  # issue 19: "e.g. 500 per class"; val [I]
FASHION_SEED = 19
FASHION_LICENCE = "MIT (Expat), Zalando SE 2017; Debian dataset-fashion-mnist, /usr/share/doc/dataset-fashion-mnist/copyright"

# ---- objects -------------------------------------------------------------------------------------
STAMPS_PACKAGE = "tuxpaint-stamps-default"
STAMPS_DIR = "usr/share/tuxpaint/stamps"
OBJECT_CATEGORIES = ("animals/mammals", "animals/birds", "food/fruit", "plants/flowers", "food/vegetables",
                     "household/tools", "hobbies/music", "animals/fish")
MAX_FLAT_FRACTION = 0.6
# Pass the flatness rule but are no photo of the object: a toy bear, a rendered whale.
EXCLUDED_STAMPS = ("animals/mammals/bears/toys/*", "animals/mammals/aquatic/whale.png")
OBJECT_SPLIT_FRACTIONS = {"val": 0.2, "test": 0.3}  # of each category's photos, at least 2 each [I]
OBJECT_COMPOSITES = {"train": 8, "val": 4, "test": 4}  # per object photo [I]
OBJECT_SIZE = 96          # composites are OBJECT_SIZE^2 px [I]: above every probe image size used here
OBJECT_SCALE = (0.5, 0.9)  # the object's longer side, x OBJECT_SIZE [I]
BACKGROUND_CROP = (0.3, 1.0)  # background crop side, x the photo's shorter side [I]
OBJECT_SEED = 19
STAMPS_LICENCE = "GPL-2 (tuxpaint-stamps, Bill Kendrick et al.; /usr/share/doc/tuxpaint-stamps-default/copyright)"


def probes_dir(root: Optional[pathlib.Path] = None) -> pathlib.Path:
  return pathlib.Path(root or embedded.root()) / "probes"


def fashion_pretrain_path(root: Optional[pathlib.Path] = None) -> pathlib.Path:
  """The 53,000 unlabelled Fashion-MNIST training images that no probe split holds."""
  return pathlib.Path(root or embedded.root()) / "pretrain" / "fashion_mnist.npy"


# ---------------------------------------------------------------------------------------------------
# Loading.


def class_names(name: str) -> List[str]:
  if name == "fashion_mnist":
    return list(FASHION_CLASSES)
  if name == "objects":
    return list(_objects_index()["classes"])
  raise ValueError(f"Unknown probe set {name!r}; known: {', '.join(PROBE_SETS)}")


def _objects_index() -> Dict:
  path = embedded.require(probes_dir() / "objects.json")
  return json.loads(path.read_text())


def load_split(name: str, split: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(images uint8 [N, H, W, 3] RGB, labels int32 [N], groups int64 [N]) of one probe split.

  `groups` names the source photo of each example (standard errors are clustered by it); every
  fashion-mnist image is its own group.
  """
  if name not in PROBE_SETS:
    raise ValueError(f"Unknown probe set {name!r}; known: {', '.join(PROBE_SETS)}")
  if split not in SPLITS:
    raise ValueError(f"Probe set {name!r} has splits {SPLITS}, got {split!r}")
  with np.load(embedded.require(probes_dir() / f"{name}.npz")) as npz:
    images, labels = npz[f"{split}_images"], npz[f"{split}_labels"].astype(np.int32)
    groups = npz[f"{split}_groups"] if f"{split}_groups" in npz else np.arange(len(labels))
  if images.ndim == 3:  # gray: the trunk reads RGB
    images = np.repeat(images[..., None], 3, axis=-1)
  return images, labels, groups.astype(np.int64)


def load_fashion_pretrain() -> np.ndarray:
  """uint8 [53000, 28, 28]: the pretraining images of the fashion-mnist set."""
  return np.load(embedded.require(fashion_pretrain_path()))


# ---------------------------------------------------------------------------------------------------
# Preparation steps (`tf_mtssl.data.prepare_embedded.STEPS`).


def read_idx(data: bytes) -> np.ndarray:
  """An IDX file (the MNIST format, gzipped or not) -> uint8 array."""
  if data[:2] == b"\x1f\x8b":
    data = gzip.decompress(data)
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise ValueError("Not an IDX file of unsigned bytes")
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise ValueError(f"IDX payload of {array.size} bytes does not fill shape {shape}")
  return array.reshape(shape)


def split_fashion_indices(labels: np.ndarray, per_class: Dict[str, int], seed: int) -> Dict[str, np.ndarray]:
  """Fixed per-class draw of probe train / val rows of the training file; the rest is 'pretrain'."""
  rng = np.random.default_rng(seed)
  out = {k: [] for k in (*per_class, "pretrain")}
  for c in np.unique(labels):
    rows = rng.permutation(np.flatnonzero(labels == c))
    start = 0
    for split, n in per_class.items():
      if start + n > len(rows):
        raise ValueError(f"Class {c} has {len(rows)} images, fewer than the {sum(per_class.values())} asked")
      out[split].append(rows[start:start + n])
      start += n
    out["pretrain"].append(rows[start:])
  return {k: np.sort(np.concatenate(v)) for k, v in out.items()}


def prepare_fashion_mnist_step(root: pathlib.Path, cache_dir: Optional[pathlib.Path] = None) -> List:
  from tf_mtssl.data import prepare_embedded as prep
  deb = prep.find_or_download_deb(FASHION_PACKAGE, cache_dir or prep.default_cache_dir())
  if deb is None:
    return []
  version = prep.deb_version(deb)
  with tempfile.TemporaryDirectory() as tmp:
    folder = prep.extract_deb_dir(deb, FASHION_DIR, pathlib.Path(tmp))
    raw = {k: read_idx((folder / f).read_bytes()) for k, f in FASHION_FILES.items()}
  if raw["train_images"].shape != (60000, 28, 28) or raw["test_images"].shape != (10000, 28, 28):
    raise ValueError(f"Unexpected Fashion-MNIST shapes in {deb}: "
                     f"{raw['train_images'].shape}, {raw['test_images'].shape}")
  rows = split_fashion_indices(raw["train_labels"], FASHION_PER_CLASS, FASHION_SEED)
  arrays = {"test_images": raw["test_images"], "test_labels": raw["test_labels"].astype(np.int64)}
  for split in FASHION_PER_CLASS:
    arrays[f"{split}_images"] = raw["train_images"][rows[split]]
    arrays[f"{split}_labels"] = raw["train_labels"][rows[split]].astype(np.int64)
    arrays[f"{split}_source_index"] = rows[split]
  npz = prep.save_npz_atomic(probes_dir(root) / "fashion_mnist.npz", arrays)
  pretrain = prep.save_npy_atomic(fashion_pretrain_path(root), raw["train_images"][rows["pretrain"]])
  source = f"/{FASHION_DIR}/" + "{" + ",".join(FASHION_FILES.values()) + "}"
  counts = ", ".join(f"{k} {len(v)}" for k, v in rows.items())
  return [
      prep.FileRecord(npz, f"{FASHION_PACKAGE} (Debian)", version, source, FASHION_LICENCE,
                      f"probe splits: train {FASHION_PER_CLASS['train']}/class and val "
                      f"{FASHION_PER_CLASS['val']}/class of the training file (seed {FASHION_SEED}), "
                      "test = the 10,000 test images"),
      prep.FileRecord(pretrain, f"{FASHION_PACKAGE} (Debian)", version, source, FASHION_LICENCE,
                      f"unlabelled pretraining images: the training images in no probe split ({counts})"),
  ]


def flat_fraction(rgba: np.ndarray, alpha_threshold: int = 200) -> float:
  """Fraction of horizontally adjacent opaque pixel pairs whose gray values are identical."""
  rgb = rgba[..., :3].astype(np.int32)
  gray = (rgb[..., 0] * 299 + rgb[..., 1] * 587 + rgb[..., 2] * 114) // 1000
  opaque = rgba[..., 3] > alpha_threshold
  pairs = opaque[:, 1:] & opaque[:, :-1]
  if not pairs.any():
    return 1.0
  return float((gray[:, 1:] == gray[:, :-1])[pairs].mean())


def read_rgba(path: pathlib.Path) -> Optional[np.ndarray]:
  """A PNG as uint8 RGBA [H, W, 4] (gray/RGB get an opaque alpha), or None if unreadable."""
  import cv2  # pylint: disable=g-import-not-at-top
  image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
  if image is None:
    return None
  if image.dtype != np.uint8:
    image = (image / 257).astype(np.uint8)
  if image.ndim == 2:
    image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGRA)
  elif image.shape[2] == 3:
    image = cv2.cvtColor(image, cv2.COLOR_BGR2BGRA)
  return cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)


def select_object_photos(stamps: pathlib.Path) -> List[Dict]:
  """Every photo stamp of OBJECT_CATEGORIES (see the module docstring for the rule)."""
  chosen = []
  for category in OBJECT_CATEGORIES:
    files = sorted(p for p in (stamps / category).rglob("*.png")
                   if "cartoon" not in p.relative_to(stamps).parts and not p.stem.endswith("_mirror"))
    for path in files:
      rel = path.relative_to(stamps).as_posix()
      if any(fnmatch.fnmatch(rel, pattern) for pattern in EXCLUDED_STAMPS):
        continue
      rgba = read_rgba(path)
      if rgba is None or rgba[..., 3].min() > 0:
        continue
      flat = flat_fraction(rgba)
      if flat < MAX_FLAT_FRACTION:
        chosen.append({"category": category, "path": rel, "flat_fraction": round(flat, 4)})
  return chosen


def assign_object_splits(photos: List[Dict], seed: int = OBJECT_SEED) -> None:
  """Adds 'split' to every photo: a fixed permutation per category, OBJECT_SPLIT_FRACTIONS of it."""
  for category in OBJECT_CATEGORIES:
    members = [p for p in photos if p["category"] == category]
    key = int.from_bytes(hashlib.sha256(f"{seed}:{category}".encode()).digest()[:8], "big")
    order = np.random.default_rng(key).permutation(len(members))
    n_test = max(2, round(OBJECT_SPLIT_FRACTIONS["test"] * len(members)))
    n_val = max(2, round(OBJECT_SPLIT_FRACTIONS["val"] * len(members)))
    if n_test + n_val >= len(members):
      raise ValueError(f"Category {category} has only {len(members)} photos; need more than {n_test + n_val}")
    for rank, i in enumerate(order):
      members[i]["split"] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"


def composite(obj: np.ndarray, background: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
  """One composite: a random crop of `background` (RGB) with the RGBA `obj` pasted at a random scale,
  position and flip; uint8 [size, size, 3]."""
  import cv2  # pylint: disable=g-import-not-at-top
  h, w = background.shape[:2]
  side = int(rng.uniform(*BACKGROUND_CROP) * min(h, w))
  y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
  canvas = cv2.resize(background[y:y + side, x:x + side], (size, size), interpolation=cv2.INTER_AREA)
  canvas = canvas.astype(np.float32)
  ys, xs = np.nonzero(obj[..., 3] > 0)  # the object's tight box
  obj = obj[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
  if rng.random() < 0.5:
    obj = obj[:, ::-1]
  scale = rng.uniform(*OBJECT_SCALE) * size / max(obj.shape[:2])
  oh, ow = max(1, round(obj.shape[0] * scale)), max(1, round(obj.shape[1] * scale))
  obj = cv2.resize(np.ascontiguousarray(obj), (ow, oh), interpolation=cv2.INTER_AREA).astype(np.float32)
  top, left = rng.integers(0, size - oh + 1), rng.integers(0, size - ow + 1)
  alpha = obj[..., 3:] / 255.0
  region = canvas[top:top + oh, left:left + ow]
  canvas[top:top + oh, left:left + ow] = alpha * obj[..., :3] + (1 - alpha) * region
  return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


def prepare_objects_step(root: pathlib.Path, cache_dir: Optional[pathlib.Path] = None) -> List:
  """Selects the photo stamps, splits them by photo and composites them onto held-out backgrounds."""
  import cv2  # pylint: disable=g-import-not-at-top
  from tf_mtssl.data import prepare_embedded as prep
  backgrounds = {s: sorted((probes_dir(root) / "backgrounds" / s).glob("*.jpg")) for s in SPLITS}
  if not all(backgrounds.values()):
    return []  # no background photos (no apt): retried on the next run
  deb = prep.find_or_download_deb(STAMPS_PACKAGE, cache_dir or prep.default_cache_dir())
  if deb is None:
    return []
  version = prep.deb_version(deb)
  records = []
  with tempfile.TemporaryDirectory() as tmp:
    stamps = prep.extract_deb_dir(deb, STAMPS_DIR, pathlib.Path(tmp))
    photos = select_object_photos(stamps)
    assign_object_splits(photos)
    arrays = {}
    for split in SPLITS:
      bgs = [cv2.cvtColor(cv2.imread(str(p), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB) for p in backgrounds[split]]
      images, labels, groups = [], [], []
      for index, photo in enumerate(photos):
        if photo["split"] != split:
          continue
        obj = read_rgba(stamps / photo["path"])
        key = int.from_bytes(hashlib.sha256(f"{OBJECT_SEED}:{photo['path']}".encode()).digest()[:8], "big")
        rng = np.random.default_rng(key)
        for _ in range(OBJECT_COMPOSITES[split]):
          images.append(composite(obj, bgs[rng.integers(len(bgs))], rng, OBJECT_SIZE))
          labels.append(OBJECT_CATEGORIES.index(photo["category"]))
          groups.append(index)
      arrays[f"{split}_images"] = np.stack(images)
      arrays[f"{split}_labels"] = np.array(labels, np.int64)
      arrays[f"{split}_groups"] = np.array(groups, np.int64)
    for photo in photos:
      dst = prep.copy_atomic(stamps / photo["path"], probes_dir(root) / "stamps" / photo["path"])
      records.append(prep.FileRecord(dst, f"{STAMPS_PACKAGE} (Debian)", version,
                                     f"/{STAMPS_DIR}/{photo['path']}", STAMPS_LICENCE,
                                     f"object photo, {photo['split']} split; flat fraction "
                                     f"{photo['flat_fraction']}"))
  index = {"classes": list(OBJECT_CATEGORIES), "photos": photos,
           "backgrounds": {s: [p.name for p in backgrounds[s]] for s in SPLITS},
           "composites_per_photo": OBJECT_COMPOSITES, "size": OBJECT_SIZE, "seed": OBJECT_SEED,
           "rule": f"flat_fraction < {MAX_FLAT_FRACTION}, some transparency, not {list(EXCLUDED_STAMPS)}"}
  npz = prep.save_npz_atomic(probes_dir(root) / "objects.npz", arrays)
  meta = prep.write_bytes_atomic(probes_dir(root) / "objects.json", (json.dumps(index, indent=1) + "\n").encode())
  counts = {s: int(sum(p["split"] == s for p in photos)) for s in SPLITS}
  derived = "derived: the stamps' licence (GPL-2) and the backgrounds' (GPL-2+) apply"
  records.append(prep.FileRecord(npz, "tf_mtssl.data.probe_sets", version,
                                 "composites of probes/stamps on probes/backgrounds", derived,
                                 f"object photos per split {counts}; composites per photo {OBJECT_COMPOSITES}"))
  records.append(prep.FileRecord(meta, "tf_mtssl.data.probe_sets", version, "index of objects.npz", derived))
  return records
