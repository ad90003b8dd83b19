"""Depth sources for the depth fine-tuning (paper_spec 7.3).

Specs (`DepthSource(spec, ...)`):
  `tfds:nyu_depth_v2`  NYU Depth v2 as prepared by tensorflow-datasets in `tfds_data_dir` (never
                       downloaded): `image` uint8 [480, 640, 3], `depth` in metres; splits `train`
                       and `validation` (the 654 labelled test images). Training: frames optionally
                       resized (image bilinear, depth nearest, so unknown pixels stay unknown) to
                       resize_height x resize_width, then random crop_height x crop_width crops with a
                       random horizontal flip. Test (the standard protocol of Eigen et al. and FCRN):
                       the network sees the whole frame at the training resolution (resized as for
                       training), and is scored against the ground truth at its FULL resolution
                       (640 x 480) inside `eval_crop` (`EIGEN_CROP`), its prediction upsampled to it
                       (`tf_mtssl.evaluation.depth`); the depth cap is the evaluation's `max_depth`.
  `embedded`           the embedded real stereo pairs with ground truth (`embedded.stereo_dir()`:
                       Middlebury Motorcycle from scikit-image, Aloe from opencv-doc);
  a folder             stereo pairs in the same layout: `<folder>/<pair>/left.{png,jpg}` and
                       `<folder>/<pair>/disparity.npy` (float32 [H, W] disparity of the left image in
                       pixels, NaN or <= 0 = unknown).

Stereo pairs: the target is INVERSE depth, `disparity / DISPARITY_UNIT` (so values are O(1) like NYU
metres). The files carry no calibration (focal length, baseline, Middlebury's `doffs`), so disparity
cannot be turned into metric depth; it is proportional to inverse depth up to that offset. The delta
metrics are unchanged by inverting both prediction and truth (max(p/t, t/p) = max((1/p)/(1/t),
(1/t)/(1/p))), so delta1 on inverse depth equals delta1 on depth; the error measures (abs_rel, rmse,
...) are those of inverse depth. Each pair is first resized so its longer side is at most
`stereo_max_side` (image bilinear antialiased, disparity nearest and multiplied by the horizontal
scale, since disparity is in pixels) and then crops are taken at that resolution, never rescaled, so
a target value means the same depth in every crop.
Train / test split of a pair: its columns are cut at (1 - test_fraction) x width; training crops are
random crops (plus a random horizontal flip) entirely inside the left part, the test split is the
fixed grid of non-overlapping crop_height x crop_width tiles of the right part (the remainder that does
not fill a tile is unused). Train and test never share a pixel.

Training elements are {"image": float32 [h, w, 3] RGB in [0, 255], "depth": float32 [h, w], 0 =
unknown}; test elements add "mask": bool [H, W], the pixels that are scored (the crop), and their
"depth" may be larger than "image" (tfds: full resolution). Training datasets are infinite and
shuffled, test datasets finite and in a fixed order.
"""

import dataclasses
import logging
import os
from typing import List, Optional, Tuple

import numpy as np
import tensorflow as tf

from tf_mtssl.core import configs
from tf_mtssl.data import embedded, sources

_AUTOTUNE = tf.data.AUTOTUNE
DISPARITY_UNIT = 32.0  # pixels of disparity per unit of the inverse-depth target [I]
# [I] Eigen et al. 2014's evaluation crop of the 480 x 640 NYU frames (rows 45-470, columns 41-600),
# as top, bottom, left, right (bottom/right exclusive); the crop of FCRN's, BTS's and AdaBins' NYU code.
EIGEN_CROP = (45, 471, 41, 601)
KINDS = ("tfds", "stereo")


@dataclasses.dataclass(frozen=True)
class StereoPair:
  name: str
  image: np.ndarray    # uint8 [H, W, 3]
  target: np.ndarray   # float32 [H, W] inverse depth, 0 = unknown


def list_stereo_pairs(folder: str) -> List[str]:
  """Sorted pair directories under `folder` (those with left.* and disparity.npy)."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"Stereo folder not found: {folder}")
  pairs = []
  for name in sorted(os.listdir(folder)):
    d = os.path.join(folder, name)
    if os.path.isfile(os.path.join(d, "disparity.npy")) and _left_image(d):
      pairs.append(d)
  if not pairs:
    raise FileNotFoundError(f"No stereo pair (<pair>/left.png|jpg + <pair>/disparity.npy) in {folder}")
  return pairs


def _left_image(pair_dir: str) -> Optional[str]:
  for ext in sources.IMAGE_EXTENSIONS:
    path = os.path.join(pair_dir, "left" + ext)
    if os.path.isfile(path):
      return path
  return None


def load_stereo_pair(pair_dir: str, max_side: int) -> StereoPair:
  """Reads one pair and resizes it to a longer side <= max_side (see the module docstring)."""
  image = sources.decode_rgb(tf.io.read_file(_left_image(pair_dir))).numpy()
  disparity = np.load(os.path.join(pair_dir, "disparity.npy")).astype(np.float32)
  if disparity.shape != image.shape[:2]:
    raise ValueError(f"{pair_dir}: disparity.npy has shape {disparity.shape}, the left image "
                     f"{image.shape[:2]}")
  disparity = np.where(np.isfinite(disparity) & (disparity > 0), disparity, 0.0).astype(np.float32)
  h, w = disparity.shape
  scale = min(1.0, max_side / max(h, w))
  if scale < 1.0:
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    image = tf.image.resize(image, [new_h, new_w], method="bilinear", antialias=True)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8).numpy()
    rows = np.minimum((np.arange(new_h) + 0.5) * h / new_h, h - 1).astype(int)
    cols = np.minimum((np.arange(new_w) + 0.5) * w / new_w, w - 1).astype(int)
    disparity = disparity[rows][:, cols] * (new_w / w)  # nearest; disparity is in (new) pixels
  return StereoPair(os.path.basename(os.path.normpath(pair_dir)), image,
                    (disparity / DISPARITY_UNIT).astype(np.float32))


def _random_crop_flip(image, depth, seed, crop_h: int, crop_w: int):
  """Same random crop of image [H, W, 3] and depth [H, W], plus a random horizontal flip."""
  seeds = tf.random.experimental.stateless_split(seed, 2)
  stacked = tf.concat([tf.cast(image, tf.float32), depth[..., None]], axis=-1)
  crop = tf.image.stateless_random_crop(stacked, [crop_h, crop_w, 4], seeds[0])
  crop = tf.image.stateless_random_flip_left_right(crop, seeds[1])
  return {"image": crop[..., :3], "depth": crop[..., 3]}


def _valid_depth(depth):
  return tf.where(tf.math.is_finite(depth) & (depth > 0), depth, 0.0)


@dataclasses.dataclass(frozen=True)
class DepthDataConfig:
  """Which depth data, cropped how (the arguments of `DepthSource`)."""
  data: str = configs.field("embedded", "Depth data: 'embedded' (the embedded Middlebury stereo pairs, inverse "
                            "depth from disparity), a folder of stereo pairs in that layout, or 'tfds:nyu_depth_v2' "
                            "(prepared in --tfds_data_dir, never downloaded).")
  tfds_data_dir: Optional[str] = configs.field(None, "tensorflow-datasets data_dir with prepared datasets (None: "
                                               "the tfds default, ~/tensorflow_datasets).")
  train_split: str = configs.field("train", "tfds: training split.")
  test_split: str = configs.field("validation", "tfds: test split (nyu_depth_v2: the 654 test images).")
  crop_height: int = configs.field(128, "Height of training crops and test crops/tiles (paper_spec 7.3 [I] NYU: 228).")
  crop_width: int = configs.field(128, "Width of training crops and test crops/tiles (paper_spec 7.3 [I] NYU: 304).")
  resize_height: int = configs.field(0, "tfds: resize before cropping (0: keep; NYU [I]: 240).")
  resize_width: int = configs.field(0, "tfds: resize before cropping (0: keep; NYU [I]: 320).")
  stereo_max_side: int = configs.field(768, "Stereo pairs: resize so the longer side is at most this.")
  test_fraction: float = configs.field(1.0 / 3.0, "Stereo pairs: right fraction of each pair's columns held out as "
                                       "the test split.")
  eval_crop: Optional[Tuple[int, ...]] = configs.field(None, "tfds: TOP,BOTTOM,LEFT,RIGHT of the scored region of "
                                                       "the full-resolution test ground truth (bottom/right "
                                                       "exclusive); empty = the whole frame (NYU [I]: "
                                                       f"{','.join(map(str, EIGEN_CROP))}, Eigen et al.'s crop).")

  def source(self) -> "DepthSource":
    if self.eval_crop is not None and len(self.eval_crop) != 4:
      raise ValueError(f"--eval_crop takes TOP,BOTTOM,LEFT,RIGHT pixel numbers, got {self.eval_crop}")
    kwargs = dataclasses.asdict(self)
    return DepthSource(kwargs.pop("data"), **kwargs)


class DepthSource:
  """Train / test datasets of one depth source (see the module docstring).

  Args:
    spec: `tfds:nyu_depth_v2`, `embedded`, or a folder of stereo pairs.
    crop_height, crop_width: size of the training crops and test crops / tiles.
    resize_height, resize_width: tfds only: resize before cropping (0 = keep the size).
    train_split, test_split: tfds split names.
    tfds_data_dir: where prepared tensorflow-datasets live (None: the tfds default).
    stereo_max_side: stereo only: longer side of the pairs after resizing.
    test_fraction: stereo only: the right fraction of each pair's columns held out for testing.
    eval_crop: tfds only: (top, bottom, left, right) of the scored region of the full-resolution test
      ground truth (bottom/right exclusive); None = the whole frame. NYU: `EIGEN_CROP`.
  """

  def __init__(self, spec: str, *, crop_height: int, crop_width: int, resize_height: int = 0,
               resize_width: int = 0, train_split: str = "train", test_split: str = "validation",
               tfds_data_dir: Optional[str] = None, stereo_max_side: int = 768,
               test_fraction: float = 1.0 / 3.0, eval_crop: Optional[Tuple[int, int, int, int]] = None):
    if crop_height < 16 or crop_width < 16:
      raise ValueError(f"crops must be at least 16 x 16 pixels, got {crop_height} x {crop_width}")
    if (resize_height > 0) != (resize_width > 0):
      raise ValueError(f"give both resize_height and resize_width or neither, got {resize_height} x "
                       f"{resize_width}")
    if resize_height and (resize_height < crop_height or resize_width < crop_width):
      raise ValueError(f"resize {resize_height} x {resize_width} is smaller than the crop {crop_height} x "
                       f"{crop_width}")
    if not 0.0 < test_fraction < 1.0:
      raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    self.spec, self.crop = spec, (int(crop_height), int(crop_width))
    self.resize = (int(resize_height), int(resize_width))
    self.train_split, self.test_split, self.tfds_data_dir = train_split, test_split, tfds_data_dir
    self.test_fraction = float(test_fraction)
    self.eval_crop = None if eval_crop is None else tuple(int(v) for v in eval_crop)
    if self.eval_crop is not None:
      c = self.eval_crop
      if len(c) != 4 or not (0 <= c[0] < c[1] and 0 <= c[2] < c[3]):
        raise ValueError(f"eval_crop must be TOP,BOTTOM,LEFT,RIGHT with 0 <= top < bottom and 0 <= left < "
                         f"right, got {eval_crop}")
      if not spec.startswith("tfds:"):
        raise ValueError(f"eval_crop applies to the full-resolution tfds test frames, not to {spec!r} "
                         "(its test split is a grid of tiles, scored whole)")
    if spec.startswith("tfds:"):
      self.kind, self.target = "tfds", "depth in metres"
      self._builder = self._tfds_builder()
      self.pairs: List[StereoPair] = []
    else:
      self.kind = "stereo"
      self.target = f"inverse depth = disparity (px) / {DISPARITY_UNIT:g}"
      folder = str(embedded.require(embedded.stereo_dir())) if spec == "embedded" else spec
      self.pairs = []
      for pair_dir in list_stereo_pairs(folder):
        try:
          self.pairs.append(load_stereo_pair(pair_dir, stereo_max_side))
        except tf.errors.InvalidArgumentError as e:  # undecodable image: skip the pair, say which
          logging.warning("Skipping unreadable stereo pair %s: %s", pair_dir, e.message[:200])
      if not self.pairs:
        raise FileNotFoundError(f"No readable stereo pair in {folder}")
      for pair in self.pairs:
        self._split_column(pair)  # validates sizes early

  # ---- tfds -----------------------------------------------------------------------------------
  def _tfds_builder(self):
    name = sources.tfds_name(self.spec, "--train_split / --test_split")
    return sources.prepared_tfds_builder(name, self.tfds_data_dir, required_features=("image", "depth"))

  def _tfds_split(self, split: str, resize_depth: bool = True) -> tf.data.Dataset:
    """(image, depth) of a split, the image resized to `resize`; the depth too when `resize_depth`."""
    try:
      ds = self._builder.as_dataset(split=split, shuffle_files=split == self.train_split)
    except (ValueError, KeyError) as e:  # an unknown split; re-raised naming the known ones
      raise ValueError(f"{self.spec} has no split {split!r}; splits: {sorted(self._builder.info.splits)}") from e
    rh, rw = self.resize

    def prepare(ex):
      image = tf.cast(ex["image"], tf.float32)
      depth = _valid_depth(tf.cast(ex["depth"], tf.float32))
      if rh:
        image = tf.image.resize(image, [rh, rw], method="bilinear", antialias=True)
        if resize_depth:
          depth = tf.image.resize(depth[..., None], [rh, rw], method="nearest")[..., 0]
      return image, depth

    return ds.map(prepare, num_parallel_calls=_AUTOTUNE)

  def _crop_mask(self, depth: tf.Tensor) -> tf.Tensor:
    """bool [H, W]: True inside `eval_crop` (everywhere without one)."""
    shape = tf.shape(depth)
    if self.eval_crop is None:
      return tf.ones(shape, tf.bool)
    top, bottom, left, right = self.eval_crop
    rows, cols = tf.range(shape[0]), tf.range(shape[1])
    in_rows = tf.logical_and(rows >= top, rows < bottom)
    in_cols = tf.logical_and(cols >= left, cols < right)
    return tf.logical_and(in_rows[:, None], in_cols[None, :])

  # ---- stereo ---------------------------------------------------------------------------------
  def _split_column(self, pair: StereoPair) -> int:
    h, w = pair.target.shape
    cut = int(w * (1.0 - self.test_fraction))
    ch, cw = self.crop
    if h < ch or cut < cw or w - cut < cw:
      raise ValueError(f"Stereo pair {pair.name} ({w} x {h} after resizing) is too small for "
                       f"{cw} x {ch} crops with test_fraction {self.test_fraction:.3f} (training part "
                       f"{cut} px wide, test part {w - cut} px): use smaller crops or a larger "
                       "--stereo_max_side")
    return cut

  def test_tiles(self) -> List[Tuple[str, int, int]]:
    """(pair, top, left) of every test tile, in dataset order."""
    out = []
    ch, cw = self.crop
    for pair in self.pairs:
      h, w = pair.target.shape
      cut = self._split_column(pair)
      for top in range(0, h - ch + 1, ch):
        for left in range(cut, w - cw + 1, cw):
          out.append((pair.name, top, left))
    return out

  # ---- datasets -------------------------------------------------------------------------------
  def train_dataset(self, seed: int = 0, shuffle_buffer: int = 256) -> tf.data.Dataset:
    """Infinite dataset of random training crops (unbatched)."""
    ch, cw = self.crop
    if self.kind == "tfds":
      ds = self._tfds_split(self.train_split).shuffle(shuffle_buffer, seed=seed).repeat()
    else:
      per_pair = []
      for pair in self.pairs:
        cut = self._split_column(pair)
        region = (pair.image[:, :cut], pair.target[:, :cut])
        per_pair.append(tf.data.Dataset.from_tensors(region).repeat())
      # Uniform over pairs [I]: each scene weighs the same whatever its size.
      ds = tf.data.Dataset.sample_from_datasets(per_pair, seed=seed) if len(per_pair) > 1 else per_pair[0]
    ds = sources.with_element_seeds(ds, seed)
    return ds.map(lambda e, s: _random_crop_flip(e[0], e[1], s, ch, cw), num_parallel_calls=_AUTOTUNE)

  def test_dataset(self) -> tf.data.Dataset:
    """Finite dataset of the test split: whole frames with full-resolution ground truth and the
    `eval_crop` mask (tfds), or the fixed tiles, scored whole (stereo)."""
    ch, cw = self.crop
    if self.kind == "tfds":
      def full(image, depth):
        return {"image": image, "depth": depth, "mask": self._crop_mask(depth)}
      return self._tfds_split(self.test_split, resize_depth=False).map(full, num_parallel_calls=_AUTOTUNE)
    by_name = {p.name: p for p in self.pairs}
    images, depths = [], []
    for name, top, left in self.test_tiles():
      pair = by_name[name]
      images.append(pair.image[top:top + ch, left:left + cw].astype(np.float32))
      depths.append(pair.target[top:top + ch, left:left + cw])
    depths = np.stack(depths)
    return tf.data.Dataset.from_tensor_slices({"image": np.stack(images), "depth": depths,
                                               "mask": np.ones(depths.shape, bool)})

  def describe(self) -> dict:
    out = {"spec": self.spec, "kind": self.kind, "target": self.target, "crop": list(self.crop)}
    if self.kind == "stereo":
      out.update(pairs={p.name: list(p.target.shape) for p in self.pairs},
                 test_fraction=self.test_fraction, num_test_tiles=len(self.test_tiles()))
    else:
      out.update(resize=list(self.resize), train_split=self.train_split, test_split=self.test_split,
                 eval_crop=None if self.eval_crop is None else list(self.eval_crop),
                 test_resolution="full (ground truth at its own size, prediction upsampled to it)")
    return out
