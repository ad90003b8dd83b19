"""Linear evaluation (paper_spec 7.1): a frozen trunk, block 3 pooled to 3x3xC, a linear softmax.

Protocol:
  - The trunk is FROZEN: it runs in inference mode (batch norm with its moving averages), under
    `tf.stop_gradient`, and none of its variables is given to the optimizer, so its weights (batch-norm
    statistics included) stay bit-identical.
  - Representation: block 3 adaptively average-pooled to grid x grid (3x3, `export_lib.pool_to_grid`;
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
  - Metrics: top-1 and top-5 accuracy (`tf_mtssl.metrics.top_k_accuracy`; top-5 is the paper's
    "Recall@5") on the evaluation split, every `eval_every` steps and at the end.
"""

import dataclasses
import logging
import time
from typing import Dict, Iterable, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

from tf_mtssl import lasso as lasso_lib
from tf_mtssl import metrics, preprocessing
from tf_mtssl.data import classification_set, sources
from tf_mtssl.evaluation import common
from tf_mtssl.export_lib import pool_to_grid
from tf_mtssl.tasks.base import NUM_CORRUPT_KEY

_AUTOTUNE = tf.data.AUTOTUNE
FEATURE_NORMS = ("batchnorm", "none")


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """Hyper-parameters of the linear probe (defaults: a short run on the embedded set; the paper
  protocol is flags/linear_imagenet.cfg)."""
  train_steps: int = 2000
  batch_size: int = 256
  eval_batch_size: int = 256
  learning_rate: float = 0.1                   # paper_spec 7.1 [I]
  lr_boundaries: Tuple[int, ...] = (1200, 1600)
  lr_decay: float = 0.1                        # paper_spec 7.1 [I]: 0.1 / 0.01 / 0.001
  momentum: float = 0.9                        # paper_spec 7.1 [I]
  weight_decay: float = 0.0                    # L2 on the classifier kernel [I]
  feature_norm: str = "batchnorm"
  grid: int = 3                                # paper_spec 7.1
  image_size: int = 224                        # paper_spec 7.1 [I]
  crop_fraction: float = 0.875                 # centre crops: resize to size / 0.875 first [I]
  augment: bool = False
  cache_features: bool = True
  lasso_l1: Optional[float] = None             # None: no eval-time lasso
  eval_every: int = 0
  log_every: int = 100
  seed: int = 0
  shuffle_buffer: int = 10_000

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
    self.lasso = None
    if lasso_l1 is not None:
      self.lasso = lasso_lib.LassoCombination(rows=[common.EVAL_LASSO_ROW], num_units=num_units,
                                              l1=lasso_l1, name="eval_lasso")
      self.lasso.build(None)
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


def pooled_features(trunk: keras.Model, images: tf.Tensor, grid: int, per_unit: bool) -> tf.Tensor:
  """RGB [B, H, W, 3] in [0, 255] -> frozen-trunk features pooled to [B, g, g, C] (block 3) or
  [B, N, g, g, C] (every block-3 unit, for the eval lasso)."""
  out = trunk(preprocessing.rgb_to_trunk_input(images), training=False)
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


def extract_features(trunk: keras.Model, batches: Iterable, grid: int,
                     per_unit: bool) -> Tuple[np.ndarray, np.ndarray, int]:
  """(pooled features [M, ...], labels [M], images skipped as unreadable) of one pass."""
  fn = tf.function(lambda images: pooled_features(trunk, images, grid, per_unit), autograph=False,
                   reduce_retracing=True)
  feats, labels, corrupt = [], [], 0
  for images, batch_labels, num_corrupt in batches:
    feats.append(fn(images).numpy())
    labels.append(batch_labels.numpy())
    corrupt = max(corrupt, int(tf.reduce_max(num_corrupt)))
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
    self.trunk, self.config = trunk, config
    self.probe = LinearProbe(num_classes, common.num_units(trunk), common.feature_channels(trunk),
                             grid=config.grid, feature_norm=config.feature_norm,
                             lasso_l1=config.lasso_l1, weight_decay=config.weight_decay, seed=config.seed)
    self.optimizer = keras.optimizers.SGD(
        common.lr_schedule(config.learning_rate, config.lr_boundaries, config.lr_decay),
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
    return self._apply(pooled_features(self.trunk, images, self.config.grid, self.probe.per_unit), labels)

  @tf.function(autograph=False)
  def _eval_pooled(self, pooled, labels):
    logits, out = self._losses(pooled, labels, training=False)
    return (metrics.top_k_accuracy(labels, logits, 1), metrics.top_k_accuracy(labels, logits, self.top5_k),
            out["cross_entropy"])

  @tf.function(autograph=False)
  def _pool(self, images):
    return pooled_features(self.trunk, images, self.config.grid, self.probe.per_unit)

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
          self.probe.per_unit)
      eval_feats, eval_labels, corrupt["eval"] = extract_features(
          self.trunk, image_batches(source, eval_split, cfg, False, cfg.eval_batch_size), cfg.grid,
          self.probe.per_unit)
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
    with writer.as_default():
      for step in range(1, cfg.train_steps + 1):
        train_out = next_step()
        if step % cfg.log_every == 0 or step == cfg.train_steps:
          values = {k: float(v) for k, v in train_out.items()}
          for k, v in values.items():
            tf.summary.scalar(f"train/{k}", v, step=step)
          tf.summary.scalar("train/learning_rate", float(self.optimizer.learning_rate), step=step)
          logging.info("step %d: %s", step, " ".join(f"{k}={v:.4f}" for k, v in sorted(values.items())))
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
