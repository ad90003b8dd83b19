"""Linear evaluation (paper_spec 7.1): a frozen trunk, block 3 pooled to 3x3xC, a linear softmax.

Protocol:
  - The trunk is FROZEN: it runs in inference mode (batch norm with its moving averages), under
    `tf.stop_gradient`, and none of its variables is given to the optimizer, so its weights (batch-norm
    statistics included) stay bit-identical.
  - Representation: block 3 adaptively average-pooled to grid x grid (3x3, `tf_mtssl.model.pooling.pool_to_grid`;
    paper_spec 7.1: "a 3x3x1024 representation"), flattened (9,216 values at C = 1024).
  - Classifier: one dense layer to the classes, softmax cross-entropy, SGD with momentum and a
    piecewise-constant learning rate (paper_spec 7.1 [I]: lr 0.1, momentum 0.9, step decays).
  - Feature standardisation [I]: the flattened features go through batch normalisation without scale
    and offset (batch statistics while training, moving averages at evaluation, as MAE's linear
    probes do), because block 3 is a raw residual sum whose scale differs between trunks (random init
    vs pretrained) by orders of magnitude, which a fixed SGD learning rate cannot serve. At evaluation
    it is a fixed affine map, so the classifier is still linear in the features. `feature_norm="none"`
    turns it off.
  - Eval-time lasso (paper_spec 5, "Eval Only Lasso"; `lasso_l1` set): the classifier reads its own
    alpha-weighted combination of the N block-3 unit outputs (a `LassoCombination` with the one row
    "eval"); the alpha row is trained with the classifier, and the loss adds its L1 penalty
    l1 * ||alpha||_1. The trunk stays frozen.
  - Feature cache: with the trunk frozen and no augmentation, the pooled features of every image are
    computed once (kept in host memory) and the classifier trains on them, which is much faster than
    running the trunk every step. With the lasso, the cache holds every unit's pooled map
    [N, grid, grid, C]; pooling and the alpha combination are both linear, so combining pooled units is
    exactly pooling the combination. With `augment` (random-resized crops + flips, paper_spec 7.1 [I])
    features change every step and are computed on the fly.
  - Metrics: top-1 and top-5 accuracy (`tf_mtssl.evaluation.metrics.top_k_accuracy`; top-5 is the paper's
    "Recall@5") on the evaluation split, every `eval_every` steps and at the end.
"""

import dataclasses
import logging
import time
import weakref
from typing import Dict, Iterable, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

from tf_mtssl.core import schedules
from tf_mtssl.core import configs
from tf_mtssl.evaluation import metrics
from tf_mtssl.model import preprocessing
from tf_mtssl.core import progress as progress_lib
from tf_mtssl.data import sources
from tf_mtssl.data import classification as classification_set
from tf_mtssl.evaluation import common
from tf_mtssl.model.pooling import pool_to_grid
from tf_mtssl.data.sources import NUM_CORRUPT_KEY

_AUTOTUNE = tf.data.AUTOTUNE
EVALUATION = "linear"
FEATURE_NORMS = ("batchnorm", "none")


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """Hyper-parameters of the linear probe (defaults: a short run on the embedded set; the paper
  protocol is flags/linear_imagenet.cfg)."""
  train_steps: int = configs.field(2000, "SGD steps (paper_spec 7.1 [I]: 85000 on ImageNet).")
  batch_size: int = configs.field(256, "Training batch (paper_spec 7.1 [I]: 256-2048).")
  eval_batch_size: int = configs.field(256, "Batch of feature extraction and evaluation.")
  learning_rate: float = configs.field(0.1, "Initial learning rate (paper_spec 7.1 [I]: 0.1).")
  lr_boundaries: Tuple[int, ...] = configs.field((1200, 1600), "Steps after which the learning rate is "
                                                 "multiplied by --lr_decay (paper_spec 7.1 [I]: 50000,75000).")
  lr_decay: float = configs.field(0.1, "Learning-rate factor at each boundary (paper_spec 7.1 [I]).")
  momentum: float = configs.field(0.9, "SGD momentum (paper_spec 7.1 [I]).")
  weight_decay: float = configs.field(0.0, "L2 weight on the classifier kernel [I].")
  feature_norm: str = configs.field("batchnorm", "batchnorm: standardise features by batch norm without affine "
                                    "before the linear layer [I] (a departure from paper_spec 7.1, because block "
                                    "3's scale differs by orders of magnitude between trunks; see "
                                    "flags/linear_imagenet.cfg); none: the paper's plain linear probe on raw "
                                    "features.", choices=FEATURE_NORMS)
  grid: int = configs.field(3, "Block 3 is average-pooled to grid x grid (paper_spec 7.1: 3).")
  image_size: int = configs.field(224, "Side of the crops fed to the trunk (paper_spec 7.1 [I]: 224).")
  crop_fraction: float = configs.field(0.875, "Centre crops: resize the shorter side to image_size / "
                                       "crop_fraction, then crop [I].")
  augment: bool = configs.field(False, "Train on random-resized crops + flips (paper_spec 7.1 [I]); features are "
                                "then computed every step (no cache).")
  cache_features: bool = configs.field(True, "Compute the frozen trunk's pooled features once and train the "
                                       "classifier on them (only without --augment).")
  lasso_l1: Optional[float] = configs.field(None, "L1 weight of the evaluation's own lasso row; None: no "
                                            "eval-time lasso (from --lasso/--lasso_l1).")
  preprocessing: str = configs.field(preprocessing.DEFAULT_CONVENTION, "The trunk's recorded input convention "
                                     "(from its source).")
  eval_every: int = configs.field(0, "Steps between evaluations (0: only at the end).")
  log_every: int = configs.field(100, "Steps between training-loss logs.")
  seed: int = configs.field(0, "Seed of random init, shuffling and augmentation.")
  shuffle_buffer: int = configs.field(10_000, "Shuffle buffer of the training images (with --augment).")
  progress_bar: bool = configs.field(True, "tqdm bars of feature extraction and training.")

  def __post_init__(self):
    for name in ("train_steps", "batch_size", "eval_batch_size", "grid", "image_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.feature_norm not in FEATURE_NORMS:
      raise ValueError(f"feature_norm must be one of {FEATURE_NORMS}, got {self.feature_norm!r}")
    if self.lasso_l1 is not None and self.lasso_l1 < 0:
      raise ValueError(f"lasso l1 must be >= 0, got {self.lasso_l1}")
    if self.weight_decay < 0:
      raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
    preprocessing.check_convention(self.preprocessing)

  @property
  def uses_cache(self) -> bool:
    return self.cache_features and not self.augment


class LinearProbe:
  """(optional eval lasso) -> flatten -> (batch norm without affine) -> dense logits."""

  def __init__(self, num_classes: int, num_units: int, channels: int, grid: int = 3,
               feature_norm: str = "batchnorm", lasso_l1: Optional[float] = None,
               weight_decay: float = 0.0, seed: int = 0):
    if num_classes < 2:
      raise ValueError(f"A classifier needs >= 2 classes, got {num_classes}")
    dim = grid * grid * channels
    self.num_classes, self.grid, self.weight_decay = num_classes, grid, weight_decay
    self.lasso = common.eval_lasso(num_units, lasso_l1)
    self.norm = None
    if feature_norm == "batchnorm":
      self.norm = keras.layers.BatchNormalization(center=False, scale=False, momentum=0.9, epsilon=1e-5,
                                                  name="feature_norm")
      self.norm.build((None, dim))
    self.classifier = keras.layers.Dense(num_classes, dtype="float32", name="linear_classifier",
                                         kernel_initializer=keras.initializers.GlorotUniform(seed=seed))
    self.classifier.build((None, dim))

  @property
  def per_unit(self) -> bool:
    """Whether the probe reads every unit's pooled map ([B, N, g, g, C]) instead of block 3's."""
    return self.lasso is not None

  @property
  def trainable_variables(self):
    out = list(self.classifier.trainable_variables)
    if self.lasso is not None:
      out += self.lasso.trainable_variables
    return out

  def logits(self, pooled: tf.Tensor, training: bool) -> tf.Tensor:
    pooled = tf.cast(pooled, tf.float32)
    if self.lasso is not None:
      pooled = self.lasso(tf.unstack(pooled, axis=1), row=common.EVAL_LASSO_ROW)
    x = tf.reshape(pooled, [tf.shape(pooled)[0], -1])
    if self.norm is not None:
      x = self.norm(x, training=training)
    return self.classifier(x)

  def penalties(self) -> Dict[str, tf.Tensor]:
    """l1: lasso_l1 * ||alpha_eval||_1 (0 without lasso); l2: weight_decay / 2 * ||W||^2."""
    l1 = self.lasso.l1_penalty(common.EVAL_LASSO_ROW) if self.lasso is not None else tf.constant(0.0)
    l2 = 0.5 * self.weight_decay * tf.reduce_sum(tf.square(self.classifier.kernel))
    return {"l1": l1, "l2": l2}

  def alpha(self) -> Optional[np.ndarray]:
    return None if self.lasso is None else self.lasso.alpha(common.EVAL_LASSO_ROW).numpy()


def block3_side(trunk: keras.Model, image_size: int) -> int:
  """Side of block 3 for image_size x image_size inputs (shape inference only, nothing is run)."""
  return int(trunk.compute_output_spec(keras.KerasTensor((1, image_size, image_size, 3)))["block3"].shape[1])


def check_grid_fits(trunk: keras.Model, image_size: int, grid: int) -> None:
  """Raises ValueError unless block 3 of image_size crops has at least grid x grid cells: pooling a
  smaller map to the grid would copy cells (paper_spec 7.1 reads a 3x3 grid of distinct regions)."""
  side = block3_side(trunk, image_size)
  if side >= grid:
    return
  smallest = image_size
  while block3_side(trunk, smallest) < grid:
    smallest *= 2
  low = smallest // 2
  while low + 1 < smallest:  # the first size in (low, smallest] whose block 3 fits
    mid = (low + smallest) // 2
    low, smallest = (low, mid) if block3_side(trunk, mid) >= grid else (mid, smallest)
  raise ValueError(f"--image_size={image_size} gives a {side}x{side} block 3, smaller than the "
                   f"{grid}x{grid} grid of the linear evaluation (paper_spec 7.1); use --image_size >= "
                   f"{smallest} for this trunk")


def pooled_features(trunk: keras.Model, images: tf.Tensor, grid: int, per_unit: bool,
                    convention: str = preprocessing.DEFAULT_CONVENTION) -> tf.Tensor:
  """RGB [B, H, W, 3] in [0, 255] -> frozen-trunk features pooled to [B, g, g, C] (block 3) or
  [B, N, g, g, C] (every block-3 unit, for the eval lasso); `convention`: the trunk's input one."""
  out = trunk(preprocessing.rgb_to_trunk_input(images, convention), training=False)
  if per_unit:
    pooled = tf.stack([pool_to_grid(u, grid) for u in out["units"]], axis=1)
  else:
    pooled = pool_to_grid(out["block3"], grid)
  return tf.stop_gradient(tf.cast(pooled, tf.float32))


def image_batches(source: classification_set.ClassificationSource, split: str, config: ProbeConfig,
                  train: bool, batch_size: int) -> tf.data.Dataset:
  """Batches (images float32 [B, S, S, 3] in [0, 255], labels int32 [B], num_corrupt int64 [B]).

  train=True: shuffled, repeated, random-resized crops + flips when `config.augment`; else one pass
  of centre crops in the split's order.
  """
  ds = source.dataset(split)
  size = config.image_size
  if train:
    ds = ds.shuffle(config.shuffle_buffer, seed=config.seed, reshuffle_each_iteration=True).repeat()
  if train and config.augment:
    ds = sources.with_element_seeds(ds, config.seed)
    ds = ds.map(lambda ex, seed: (preprocessing.random_crop_resize(ex["image"], size, seed),
                                  ex["label"], ex[NUM_CORRUPT_KEY]), num_parallel_calls=_AUTOTUNE)
  else:
    ds = ds.map(lambda ex: (classification_set.center_crop(ex["image"], size, config.crop_fraction),
                            ex["label"], ex[NUM_CORRUPT_KEY]), num_parallel_calls=_AUTOTUNE)
  return ds.batch(batch_size, drop_remainder=train).prefetch(_AUTOTUNE)


# trunk -> {(grid, per_unit, convention): tf.function}: the splits of one evaluation (train, validation,
# test) share one traced forward pass instead of tracing a new function per split (a ResNet-101 trace
# is seconds; TF also warned of the retracing). Weak keys: an entry goes with its trunk.
_FEATURE_FUNCTIONS: "weakref.WeakKeyDictionary[keras.Model, Dict]" = weakref.WeakKeyDictionary()


def feature_function(trunk: keras.Model, grid: int, per_unit: bool,
                     convention: str = preprocessing.DEFAULT_CONVENTION):
  """The `tf.function` images -> `pooled_features(trunk, images, ...)`, one per trunk and settings."""
  per_trunk = _FEATURE_FUNCTIONS.setdefault(trunk, {})
  key = (int(grid), bool(per_unit), convention)
  if key not in per_trunk:
    trunk_ref = weakref.ref(trunk)  # the function must not keep its (weak) key alive
    per_trunk[key] = tf.function(lambda images: pooled_features(trunk_ref(), images, *key), autograph=False,
                                 reduce_retracing=True)
  return per_trunk[key]


def extract_features(trunk: keras.Model, batches: Iterable, grid: int, per_unit: bool,
                     convention: str = preprocessing.DEFAULT_CONVENTION,
                     progress: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray, int]:
  """(pooled features [M, ...], labels [M], images skipped as unreadable) of one pass; `progress`:
  the label of a progress bar (images, rate), None for none."""
  fn = feature_function(trunk, grid, per_unit, convention)
  feats, labels, corrupt = [], [], 0
  with progress_lib.bar(enabled=progress is not None, unit="img", desc=progress, leave=False) as bar:
    for images, batch_labels, num_corrupt in batches:
      feats.append(fn(images).numpy())
      labels.append(batch_labels.numpy())
      corrupt = max(corrupt, int(tf.reduce_max(num_corrupt)))
      bar.update(len(labels[-1]))
  if not feats:
    raise ValueError("The split holds no readable image")
  return np.concatenate(feats), np.concatenate(labels).astype(np.int32), corrupt


class _EpochSampler:
  """Minibatch indices from a stream of seeded random permutations (any batch size)."""

  def __init__(self, n: int, seed: int):
    self.n, self.rng, self.queue = n, np.random.default_rng(seed), np.zeros([0], np.int64)

  def next(self, batch_size: int) -> np.ndarray:
    while self.queue.size < batch_size:
      self.queue = np.concatenate([self.queue, self.rng.permutation(self.n)])
    out, self.queue = self.queue[:batch_size], self.queue[batch_size:]
    return out


class ProbeTrainer:
  """Trains and evaluates a `LinearProbe` on a frozen trunk."""

  def __init__(self, trunk: keras.Model, num_classes: int, config: ProbeConfig):
    """Raises ValueError if block 3 of `config.image_size` crops is smaller than the grid."""
    self.trunk, self.config = trunk, config
    check_grid_fits(trunk, config.image_size, config.grid)
    schedules.warn_unreached_boundaries(config.lr_boundaries, config.train_steps)
    self.probe = LinearProbe(num_classes, common.num_units(trunk), common.feature_channels(trunk),
                             grid=config.grid, feature_norm=config.feature_norm,
                             lasso_l1=config.lasso_l1, weight_decay=config.weight_decay, seed=config.seed)
    self.optimizer = keras.optimizers.SGD(
        schedules.WarmupPiecewise(config.learning_rate, boundaries=config.lr_boundaries, decay=config.lr_decay),
        momentum=config.momentum, name="probe_sgd")
    self.top5_k = min(5, num_classes)

  # ---- steps ----------------------------------------------------------------------------------
  def _losses(self, pooled, labels, training):
    logits = self.probe.logits(pooled, training=training)
    ce = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
    penalties = self.probe.penalties()
    loss = ce + penalties["l1"] + penalties["l2"]
    return logits, {"loss": loss, "cross_entropy": ce, "lasso_l1": penalties["l1"],
                    "weight_decay": penalties["l2"]}

  def _apply(self, pooled, labels):
    variables = self.probe.trainable_variables
    with tf.GradientTape() as tape:
      logits, out = self._losses(pooled, labels, training=True)
    self.optimizer.apply_gradients(zip(tape.gradient(out["loss"], variables), variables))
    out["top1"] = metrics.top_k_accuracy(labels, logits, 1)
    return out

  # autograph=False: no tensor-dependent Python control flow here, and skipping the conversion
  # cuts the first (tracing) step by about a third on CPU.
  @tf.function(autograph=False)
  def train_step_pooled(self, pooled, labels):
    """One SGD step on pooled features; returns the loss terms (computed before the update)."""
    return self._apply(pooled, labels)

  @tf.function(autograph=False)
  def train_step_images(self, images, labels):
    return self._apply(self._pool(images), labels)

  @tf.function(autograph=False)
  def _eval_pooled(self, pooled, labels):
    logits, out = self._losses(pooled, labels, training=False)
    return (metrics.top_k_accuracy(labels, logits, 1), metrics.top_k_accuracy(labels, logits, self.top5_k),
            out["cross_entropy"])

  @tf.function(autograph=False)
  def _pool(self, images):
    return pooled_features(self.trunk, images, self.config.grid, self.probe.per_unit, self.config.preprocessing)

  # ---- on cached features (tf_mtssl.evaluation.probes) ----------------------------------------
  def train_on_features(self, feats: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
    """`train_steps` SGD steps on cached pooled features; returns the last step's loss terms."""
    sampler = _EpochSampler(len(labels), self.config.seed)
    out = {}
    for _ in range(self.config.train_steps):
      idx = sampler.next(self.config.batch_size)
      out = self.train_step_pooled(feats[idx], labels[idx])
    return {k: float(v) for k, v in out.items()}

  def predict(self, feats: np.ndarray) -> np.ndarray:
    """Predicted class of every row of cached pooled features (int [M])."""
    bs = self.config.eval_batch_size
    return np.concatenate([np.argmax(self._logits_eval(feats[i:i + bs]).numpy(), axis=-1)
                           for i in range(0, len(feats), bs)])

  @tf.function(autograph=False, reduce_retracing=True)
  def _logits_eval(self, pooled):
    return self.probe.logits(pooled, training=False)

  # ---- evaluation -----------------------------------------------------------------------------
  def evaluate(self, eval_data) -> Dict[str, float]:
    """Top-1 / top-5 over an evaluation set: cached (features, labels) arrays or image batches."""
    sums, count = np.zeros(3), 0
    bs = self.config.eval_batch_size
    if isinstance(eval_data, tuple):
      all_feats, all_labels = eval_data
      batches = ((all_feats[i:i + bs], all_labels[i:i + bs]) for i in range(0, len(all_labels), bs))
    else:
      batches = ((self._pool(images), labels) for images, labels, _ in eval_data)
    for pooled, batch_labels in batches:
      n = int(batch_labels.shape[0])
      sums += n * np.array([float(v) for v in self._eval_pooled(pooled, batch_labels)])
      count += n
    if count == 0:
      raise ValueError("The evaluation split holds no readable image")
    top1, top5, ce = sums / count
    return {"top1": top1, "top5": top5, "cross_entropy": ce, "num_examples": count}

  # ---- the loop -------------------------------------------------------------------------------
  def fit(self, source: classification_set.ClassificationSource, train_split: str, eval_split: str,
          summary_dir: Optional[str] = None) -> Dict:
    """Trains for `train_steps` and evaluates; returns the result (also logged to TensorBoard)."""
    cfg = self.config
    writer = tf.summary.create_file_writer(summary_dir) if summary_dir else tf.summary.create_noop_writer()
    start = time.time()
    corrupt = {}
    if cfg.uses_cache:
      feats, labels, corrupt["train"] = extract_features(
          self.trunk, image_batches(source, train_split, cfg, False, cfg.eval_batch_size), cfg.grid,
          self.probe.per_unit, cfg.preprocessing, progress=f"features {train_split}" if cfg.progress_bar else None)
      eval_feats, eval_labels, corrupt["eval"] = extract_features(
          self.trunk, image_batches(source, eval_split, cfg, False, cfg.eval_batch_size), cfg.grid,
          self.probe.per_unit, cfg.preprocessing, progress=f"features {eval_split}" if cfg.progress_bar else None)
      eval_data = (eval_feats, eval_labels)
      sampler = _EpochSampler(len(labels), cfg.seed)
      logging.info("Cached pooled features: train %s, eval %s (%.1f s)", feats.shape, eval_feats.shape,
                   time.time() - start)
      num_train = len(labels)

      def next_step():
        idx = sampler.next(cfg.batch_size)
        return self.train_step_pooled(feats[idx], labels[idx])
    else:
      logging.info("No feature cache (%s): the frozen trunk runs at every step",
                   "augmentation" if cfg.augment else "cache_features=False")
      train_iter = iter(image_batches(source, train_split, cfg, True, cfg.batch_size))
      eval_data = image_batches(source, eval_split, cfg, False, cfg.eval_batch_size)
      num_train = None
      last_corrupt = [0]

      def next_step():
        images, batch_labels, num_corrupt = next(train_iter)
        last_corrupt[0] = int(tf.reduce_max(num_corrupt))
        return self.train_step_images(images, batch_labels)

    history, train_out = [], {}
    with writer.as_default(), progress_lib.bar(total=cfg.train_steps, enabled=cfg.progress_bar) as bar:
      for step in range(1, cfg.train_steps + 1):
        train_out = next_step()
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.train_steps:
          values = {k: float(v) for k, v in train_out.items()}
          bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
          for k, v in values.items():
            tf.summary.scalar(f"train/{k}", v, step=step)
          tf.summary.scalar("train/learning_rate", float(self.optimizer.learning_rate), step=step)
          # DEBUG: the progress bar shows the loss; every value is in TensorBoard.
          logging.debug("step %d: %s", step, " ".join(f"{k}={v:.4f}" for k, v in sorted(values.items())))
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.train_steps:
          result = self.evaluate(eval_data)
          for k in ("top1", "top5", "cross_entropy"):
            tf.summary.scalar(f"eval/{k}", result[k], step=step)
          if self.probe.lasso is not None:
            tf.summary.image("eval/lasso_alpha", self.probe.lasso.alpha_image()[None], step=step)
          history.append({"step": step, "top1": result["top1"], "top5": result["top5"]})
          logging.info("step %d eval: top1=%.4f top5=%.4f", step, result["top1"], result["top5"])
    writer.flush()
    if not cfg.uses_cache:
      corrupt["train"] = last_corrupt[0]
      corrupt["eval"] = None  # not tracked on the fly; the cached path counts both splits
    alpha = self.probe.alpha()
    return {
        "top1": result["top1"], "top5": result["top5"], "top5_k": self.top5_k,
        "eval_cross_entropy": result["cross_entropy"], "num_eval": result["num_examples"],
        "num_train": num_train, "num_classes": self.probe.num_classes,
        "final_train": {k: float(v) for k, v in train_out.items()},
        "history": history, "cached_features": cfg.uses_cache, "num_corrupt": corrupt,
        "eval_lasso_alpha": None if alpha is None else alpha.tolist(),
        "seconds": time.time() - start,
    }


@dataclasses.dataclass(frozen=True)
class LinearEvalConfig:
  """What `python -m tf_mtssl.evaluate_linear` evaluates on, and where it writes."""
  data: str = configs.field("embedded", "Labelled data: 'embedded' (tiny set from the embedded photos), the probe "
                            "sets 'fashion_mnist' and 'objects', 'tfds:imagenet2012' (prepared in --tfds_data_dir, "
                            "never downloaded), an ImageFolder root (root/<split>/<label>/*.jpg), or a TFRecord "
                            "pattern with '{split}' (image/encoded + image/class/label).")
  tfds_data_dir: Optional[str] = configs.field(None, "tensorflow-datasets data_dir with prepared datasets (None: "
                                               "the tfds default, ~/tensorflow_datasets).")
  train_split: str = configs.field("train", "Split the classifier is trained on.")
  eval_split: str = configs.field("", "Split top-1/top-5 are reported on; empty = the source's validation split "
                                  "(validation for tfds/TFRecords, val for folders and embedded, test for probe sets).")
  label_offset: int = configs.field(0, "Subtracted from TFRecord labels (slim ImageNet TFRecords: 1).")
  num_classes: int = configs.field(0, "Classes of TFRecord data; 0 = scan the training labels once.")
  output_dir: str = configs.field("runs/eval_linear", "TensorBoard summaries and results.json; reused only by the "
                                  "same trunk source.")


def uses_probe_protocol(source, protocol_requested: bool) -> bool:
  """Probe sets, kNN, a weight-decay grid or the BN diagnostic run `tf_mtssl.evaluation.probes`."""
  return source.kind == "probe_set" or protocol_requested


def evaluate(trunk_source_result, run: LinearEvalConfig, config: ProbeConfig, protocol=None):
  """The linear evaluation of a trunk (`tf_mtssl.runs.trunk_source.TrunkSource`): its output folder
  claimed for that source, the probe (or, with `protocol`, the probes of `tf_mtssl.evaluation.probes`)
  fitted and evaluated, results.json written. Returns (result, its path, the data source)."""
  from tf_mtssl.evaluation import outputs, probes  # pylint: disable=g-import-not-at-top
  trunk, provenance = trunk_source_result
  source = classification_set.ClassificationSource(
      run.data, train_split=run.train_split, tfds_data_dir=run.tfds_data_dir, label_offset=run.label_offset,
      num_classes=run.num_classes, image_size=config.image_size)
  eval_split = run.eval_split or source.default_eval_split()
  # Every check of the inputs before the output folder is claimed: a refused run leaves nothing behind.
  check_grid_fits(trunk, config.image_size, config.grid)
  outputs.claim_output_dir(run.output_dir, EVALUATION, provenance)
  if protocol is not None or source.kind == "probe_set":
    protocol = dataclasses.replace(protocol or probes.ProbeProtocol(), train_split=run.train_split,
                                   test_split=eval_split)
    result = probes.run_probes(trunk, source, config, protocol)
    result.update(data=source.describe(), protocol=dataclasses.asdict(protocol), config=dataclasses.asdict(config))
  else:
    result = ProbeTrainer(trunk, source.num_classes, config).fit(source, run.train_split, eval_split,
                                                                 summary_dir=run.output_dir)
    # Only what was used: the resolved probe settings, not the binary's flag defaults.
    result.update(data=source.describe(), train_split=run.train_split, eval_split=eval_split,
                  config=dataclasses.asdict(config))
    result["top1_se"] = probes.proportion_se(result["top1"], result["num_eval"])
  result["eval_split"] = eval_split
  return result, outputs.write_results(run.output_dir, EVALUATION, provenance, result), source
