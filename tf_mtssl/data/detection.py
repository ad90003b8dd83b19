"""The embedded detection set: real photo "objects" pasted onto real photo backgrounds, boxes known.

So that detection fine-tuning (paper_spec 7.2) runs out of the box without VOC. Each class is one
embedded photo (by default the apple, the butterfly and the cat); an object instance is the photo's
central region cut out with an elliptical mask, randomly rescaled (with aspect jitter), mirrored and
brightness-jittered, pasted at a random position of a random crop of another embedded photo. The box
is the bounding box of the ellipse. It is generated in memory (a few hundred ms), deterministically
from `seed`; train and test use disjoint random streams (and the same backgrounds, different crops).

Boxes are `[ymin, xmin, ymax, xmax]` in inclusive pixel coordinates (VOC convention: the object
occupies rows ymin..ymax), float32; labels are 0-based int32; no object is marked difficult.
"""

import dataclasses
import pathlib
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from tf_mtssl.data import embedded
from tf_mtssl.data import sources

# Photos of the embedded set used as object classes (file stems in `embedded.images_dir()`).
DEFAULT_CLASS_PHOTOS = ("opencv_apple", "opencv_butterfly", "skimage_chelsea")

Example = Dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DetectionSetOptions:
  """How the synthetic scenes are made."""
  image_size: int = 256                          # square scenes, pixels
  num_train: int = 96
  num_test: int = 48
  objects_per_image: Tuple[int, int] = (1, 3)    # inclusive range
  object_size: Tuple[float, float] = (0.2, 0.5)  # object side as a fraction of image_size
  max_overlap: float = 0.1                       # max IoU between two pasted objects
  seed: int = 0

  def __post_init__(self):
    if self.image_size < 32:
      raise ValueError(f"image_size must be >= 32, got {self.image_size}")
    lo, hi = self.objects_per_image
    if not 1 <= lo <= hi:
      raise ValueError(f"objects_per_image must be 1 <= lo <= hi, got {self.objects_per_image}")
    lo, hi = self.object_size
    if not 0.0 < lo <= hi <= 0.9:
      raise ValueError(f"object_size must satisfy 0 < lo <= hi <= 0.9, got {self.object_size}")
    if self.num_train < 0 or self.num_test < 0:
      raise ValueError("num_train and num_test must be >= 0")


def load_photos(folder: Optional[str] = None) -> List[Tuple[str, np.ndarray]]:
  """(file stem, uint8 RGB [H, W, 3]) of every photo in `folder` (default: the embedded images)."""
  folder = str(folder or embedded.require(embedded.images_dir()))
  photos = []
  for path in sources.list_image_files(folder):
    with Image.open(path) as im:
      photos.append((pathlib.Path(path).stem, np.asarray(im.convert("RGB"))))
  return photos


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def _central_object(photo: np.ndarray) -> np.ndarray:
  """The central square covering 80% of the shorter side: where the subject of these photos is."""
  h, w = photo.shape[:2]
  side = int(0.8 * min(h, w))
  y, x = (h - side) // 2, (w - side) // 2
  return photo[y:y + side, x:x + side]


def _ellipse_mask(height: int, width: int) -> np.ndarray:
  yy = (np.arange(height) + 0.5) / height * 2.0 - 1.0
  xx = (np.arange(width) + 0.5) / width * 2.0 - 1.0
  return (yy[:, None] ** 2 + xx[None, :] ** 2) <= 1.0


def _iou_inclusive(a, b) -> float:
  ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1.0)
  iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1.0)
  inter = ih * iw
  area = lambda r: (r[2] - r[0] + 1.0) * (r[3] - r[1] + 1.0)  # noqa: E731
  return inter / (area(a) + area(b) - inter)


def _make_scene(rng: np.random.Generator, objects: Sequence[np.ndarray], backgrounds: Sequence[np.ndarray],
                opts: DetectionSetOptions) -> Example:
  size = opts.image_size
  bg = backgrounds[rng.integers(len(backgrounds))]
  h, w = bg.shape[:2]
  side = int(min(h, w) * rng.uniform(0.4, 1.0))
  y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
  scene = _resize(bg[y:y + side, x:x + side], size, size).copy()
  boxes, labels = [], []
  for _ in range(rng.integers(opts.objects_per_image[0], opts.objects_per_image[1] + 1)):
    label = int(rng.integers(len(objects)))
    for _attempt in range(20):
      s = rng.uniform(*opts.object_size) * size
      aspect = np.exp(rng.uniform(np.log(0.75), np.log(1.33)))
      oh = int(np.clip(round(s * np.sqrt(aspect)), 8, size - 1))
      ow = int(np.clip(round(s / np.sqrt(aspect)), 8, size - 1))
      oy, ox = int(rng.integers(0, size - oh + 1)), int(rng.integers(0, size - ow + 1))
      box = (oy, ox, oy + oh - 1, ox + ow - 1)
      if all(_iou_inclusive(box, b) <= opts.max_overlap for b in boxes):
        break
    else:
      continue  # no free place found: fewer objects in this scene
    patch = _resize(objects[label], oh, ow).astype(np.float32)
    if rng.random() < 0.5:
      patch = patch[:, ::-1]
    patch = np.clip(patch * rng.uniform(0.8, 1.2), 0, 255)
    mask = _ellipse_mask(oh, ow)
    region = scene[oy:oy + oh, ox:ox + ow]
    region[mask] = patch[mask].astype(np.uint8)
    boxes.append(box)
    labels.append(label)
  return {"image": scene, "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
          "labels": np.asarray(labels, np.int32), "difficult": np.zeros(len(labels), bool)}


def make_detection_set(photos: Optional[Sequence[Tuple[str, np.ndarray]]] = None,
                       class_photos: Sequence[str] = DEFAULT_CLASS_PHOTOS,
                       options: DetectionSetOptions = DetectionSetOptions()) -> Dict[str, object]:
  """Builds the train and test scenes.

  Args:
    photos: (name, uint8 RGB image) pairs; default: every embedded photo (`load_photos()`).
    class_photos: names of the photos that become the object classes (in label order); all the others
      are backgrounds (at least one is needed).
    options: scene parameters and seed.
  Returns:
    {"train": [example, ...], "test": [example, ...], "class_names": [str, ...]}, each example a dict
    image uint8 [S, S, 3], boxes float32 [G, 4], labels int32 [G], difficult bool [G].
  """
  photos = list(photos) if photos is not None else load_photos()
  by_name = dict(photos)
  missing = [n for n in class_photos if n not in by_name]
  if missing:
    raise ValueError(f"Class photos {missing} not among the photos ({sorted(by_name)})")
  if len(set(class_photos)) != len(class_photos) or not class_photos:
    raise ValueError(f"class_photos must be distinct and non-empty, got {list(class_photos)}")
  objects = [_central_object(by_name[n]) for n in class_photos]
  backgrounds = [image for name, image in photos if name not in class_photos]
  if not backgrounds:
    raise ValueError("make_detection_set needs at least one photo that is not a class photo")
  train_seq, test_seq = np.random.SeedSequence(options.seed).spawn(2)
  train_rng, test_rng = np.random.default_rng(train_seq), np.random.default_rng(test_seq)
  return {
      "train": [_make_scene(train_rng, objects, backgrounds, options) for _ in range(options.num_train)],
      "test": [_make_scene(test_rng, objects, backgrounds, options) for _ in range(options.num_test)],
      "class_names": [n.split("_", 1)[-1] for n in class_photos],
  }

