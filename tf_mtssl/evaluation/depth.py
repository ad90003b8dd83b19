"""Depth fine-tuning (paper_spec 7.3): trunk + FCRN up-projection decoder, berHu loss, delta < 1.25.

Network: trunk (block 3, output stride 16) -> decoder in the style of Laina et al. 2016 ("Deeper
Depth Prediction with Fully Convolutional Residual Networks", FCRN; paper_spec 7.3 [R]):
  batch norm + ReLU (the pre-activation trunk's block-3 end point is a raw residual sum; tf-slim's
  resnet_v2 applies this "postnorm" after its last block) -> 1x1 conv to `width` (C/2: 512 at
  C = 1024, as FCRN's 2048 -> 1024) + batch norm -> `num_upprojections` FCRN up-projection blocks,
  each doubling the resolution and halving the channels -> 3x3 conv to one channel (linear, float32,
  as FCRN). An up-projection block is: 2x zero-insertion unpooling, then
    branch 1: 5x5 conv + BN + ReLU -> 3x3 conv + BN;  branch 2: 5x5 conv + BN;  output ReLU(sum).
  (FCRN's "fast up-projection" computes the same unpool + 5x5 conv with four small convolutions;
  this is the plain form, identical in function.) With 3 blocks [I] the prediction is at stride 2
  (FCRN's output resolution); it is bilinearly upsampled to the label size for the loss and metrics.
  With the eval lasso (paper_spec 5), the decoder reads the "eval" alpha combination of the N
  block-3 unit outputs instead of block 3, and the loss adds its L1 penalty.
The whole network (trunk, decoder, alpha) is fine-tuned.

Loss: berHu (reverse Huber, Laina et al.), chosen because it is the loss FCRN introduced and trained
this decoder with: L1 on small residuals (which keeps a gradient on the many pixels that are nearly
right), L2 beyond c = 0.2 x the batch's largest absolute residual (which weighs the large errors of
distant or thin structures more). It is computed on the target's own units (NYU: metres; the stereo
pairs: inverse depth, see `tf_mtssl.data.depth`) over valid pixels only (ground truth finite
and > 0). L1 on log depth would need positive predictions at every step and weighs near and far
errors equally; berHu on the linear output needs neither.

A batch whose ground truth has no valid pixel is skipped (no update, or left out of the metrics) and
counted (`skipped_train_batches`, `skipped_test_batches`), so no metric is ever NaN.
Test protocol (Eigen et al. 2014, FCRN; paper_spec 7.3 [I]): the network sees each test image at the
resolution its source gives (NYU: the whole frame at the training resolution), its prediction is
bilinearly upsampled to the ground truth's own resolution (NYU: 640 x 480) and scored inside the
source's mask (NYU: the Eigen crop), with ground truth beyond `max_depth` left out and predictions
clipped to it (NYU: 10 m). Every metric of `tf_mtssl.evaluation.metrics` is reported twice, named as such:
`per_image_mean` (each image's metric, averaged over images, as Eigen et al.'s code) and `pooled`
(all valid pixels of the set weighing the same). delta1 is the paper's "% pixels below 1.25".
"""

import dataclasses
import logging
import time
from typing import Dict, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from tf_mtssl.core import schedules
from tf_mtssl.core import configs
from tf_mtssl.data import depth as depth_data  # noqa: F401  (type of `evaluate`'s data)
from tf_mtssl.evaluation import metrics
from tf_mtssl.model import preprocessing
from tf_mtssl.core import progress as progress_lib
from tf_mtssl.model import trunk as trunk_lib
from tf_mtssl.evaluation import common

_AUTOTUNE = tf.data.AUTOTUNE
EVALUATION = "depth"
OPTIMIZERS = ("sgd", "adam")
log = logging.getLogger(__name__)

AGGREGATIONS = ("per_image_mean", "pooled")   # both NYU conventions, named as such
HEADLINE = ("delta1", "abs_rel", "rmse")      # delta1: paper_spec 7.3's metric
BERHU_C_FRACTION = 0.2  # Laina et al.: c = 0.2 * max |residual| of the batch


@keras.saving.register_keras_serializable(package="tf_mtssl")
class Unpool2x(layers.Layer):
  """FCRN unpooling: each value goes to the top-left of a 2x2 block, the other three are zeros."""

  def call(self, x):
    zeros = tf.zeros_like(x)
    # depth_to_space reads channel groups in (dy, dx) order: (0,0) is the top-left position.
    return tf.nn.depth_to_space(tf.concat([x, zeros, zeros, zeros], axis=-1), 2)

  def compute_output_shape(self, input_shape):
    b, h, w, c = input_shape
    return (b, None if h is None else 2 * h, None if w is None else 2 * w, c)


def _bn(name):
  return layers.BatchNormalization(epsilon=trunk_lib.BN_EPSILON, name=name)


def up_projection(x, filters: int, name: str):
  """One FCRN up-projection block (see the module docstring): [B, h, w, c] -> [B, 2h, 2w, filters]."""
  up = Unpool2x(name=f"{name}_unpool")(x)
  b1 = layers.Conv2D(filters, 5, padding="same", use_bias=False, name=f"{name}_br1_conv5")(up)
  b1 = layers.ReLU(name=f"{name}_br1_relu")(_bn(f"{name}_br1_bn1")(b1))
  b1 = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_br1_conv3")(b1)
  b1 = _bn(f"{name}_br1_bn2")(b1)
  b2 = layers.Conv2D(filters, 5, padding="same", use_bias=False, name=f"{name}_br2_conv5")(up)
  b2 = _bn(f"{name}_br2_bn")(b2)
  return layers.ReLU(name=f"{name}_relu")(layers.Add(name=f"{name}_add")([b1, b2]))


def build_depth_decoder(channels: int, num_upprojections: int = 3, width: int = 0,
                        name: str = "depth_decoder") -> keras.Model:
  """FCRN-style decoder: features [B, h, w, channels] -> depth [B, h * 2^k, w * 2^k, 1] (float32).

  Args:
    channels: channels of the trunk features (16 x base_width).
    num_upprojections: k up-projection blocks (3 [I]: stride 16 -> stride 2, FCRN's output stride).
    width: channels after the 1x1 conv; 0 = channels // 2 (FCRN: 1024 from 2048). Each block halves it.
  """
  width = width or channels // 2
  if num_upprojections < 0:
    raise ValueError(f"num_upprojections must be >= 0, got {num_upprojections}")
  if width >> num_upprojections < 1:
    raise ValueError(f"decoder width {width} is too small for {num_upprojections} up-projections "
                     "(each halves the channels)")
  inputs = keras.Input((None, None, channels), name="features")
  x = layers.ReLU(name="postnorm_relu")(_bn("postnorm_bn")(inputs))
  x = layers.Conv2D(width, 1, use_bias=False, name="reduce_conv")(x)
  x = _bn("reduce_bn")(x)
  for i in range(num_upprojections):
    x = up_projection(x, width >> (i + 1), name=f"upproj{i + 1}")
  out = layers.Conv2D(1, 3, padding="same", dtype="float32", name="depth")(x)
  return keras.Model(inputs, out, name=name)


def valid_mask(depth: tf.Tensor) -> tf.Tensor:
  """Pixels with usable ground truth: finite and > 0 (the convention of `metrics.depth_metrics`)."""
  return tf.logical_and(tf.math.is_finite(depth), depth > 0.0)


def berhu_loss(pred: tf.Tensor, gt: tf.Tensor, valid: tf.Tensor,
               c_fraction: float = BERHU_C_FRACTION) -> tf.Tensor:
  """Mean reverse-Huber loss over the valid pixels (Laina et al. 2016).

  |r| if |r| <= c, (r^2 + c^2) / (2c) otherwise, with c = c_fraction * max valid |r| (not
  differentiated). Returns 0 when no pixel is valid (callers skip such batches).
  """
  valid = tf.cast(valid, tf.bool)
  residual = tf.where(valid, tf.abs(tf.cast(pred, tf.float32) - tf.where(valid, gt, 0.0)), 0.0)
  c = tf.stop_gradient(tf.maximum(c_fraction * tf.reduce_max(residual), 1e-6))
  per_pixel = tf.where(residual <= c, residual, (tf.square(residual) + tf.square(c)) / (2.0 * c))
  n = tf.reduce_sum(tf.cast(valid, tf.float32))
  return tf.reduce_sum(tf.where(valid, per_pixel, 0.0)) / tf.maximum(n, 1.0)


class DepthNetwork:
  """Trunk + (eval lasso) + decoder; `__call__` maps RGB [B, H, W, 3] in [0, 255] to depth [B, H, W].

  `convention`: the trunk's input convention (`tf_mtssl.model.preprocessing`; the run's recorded one).
  """

  def __init__(self, trunk: keras.Model, num_upprojections: int = 3, width: int = 0,
               lasso_l1: Optional[float] = None, convention: str = preprocessing.DEFAULT_CONVENTION):
    self.trunk = trunk
    self.convention = preprocessing.check_convention(convention)
    self.lasso = common.eval_lasso(common.num_units(trunk), lasso_l1)
    self.decoder = build_depth_decoder(common.feature_channels(trunk), num_upprojections, width)

  @property
  def trainable_variables(self):
    out = self.trunk.trainable_variables + self.decoder.trainable_variables
    return out + (self.lasso.trainable_variables if self.lasso is not None else [])

  def __call__(self, images: tf.Tensor, training: bool, size: Optional[tf.Tensor] = None) -> tf.Tensor:
    """Depth [B, h, w], bilinearly upsampled from the decoder's output to `size` = (h, w) (default:
    the images' size; the evaluation passes the ground truth's)."""
    out = self.trunk(preprocessing.rgb_to_trunk_input(images, self.convention), training=training)
    features = out["block3"] if self.lasso is None else self.lasso(out["units"], row=common.EVAL_LASSO_ROW)
    depth = self.decoder(features, training=training)
    size = tf.shape(images)[1:3] if size is None else size
    return tf.image.resize(tf.cast(depth, tf.float32), size, method="bilinear")[..., 0]

  def penalty(self) -> tf.Tensor:
    return self.lasso.l1_penalty(common.EVAL_LASSO_ROW) if self.lasso is not None else tf.constant(0.0)

  def alpha(self) -> Optional[np.ndarray]:
    return None if self.lasso is None else self.lasso.alpha(common.EVAL_LASSO_ROW).numpy()


@dataclasses.dataclass(frozen=True)
class DepthConfig:
  """Fine-tuning hyper-parameters (defaults: a short run on the embedded stereo pairs; the NYU
  protocol is flags/depth_nyu.cfg)."""
  train_steps: int = configs.field(1000, "Training steps.")
  batch_size: int = configs.field(8, "Training batch (FCRN [I]: 16).")
  eval_batch_size: int = configs.field(8, "Test batch.")
  optimizer: str = configs.field("sgd", "sgd (with momentum, FCRN [I]) or adam.", choices=OPTIMIZERS)
  learning_rate: float = configs.field(0.01, "Initial learning rate (FCRN [I]: 1e-2).")
  lr_boundaries: Tuple[int, ...] = configs.field((600, 800), "Steps after which the learning rate is multiplied "
                                                 "by --lr_decay.")
  lr_decay: float = configs.field(0.1, "Learning-rate factor at each boundary.")
  momentum: float = configs.field(0.9, "SGD momentum (FCRN [I]: 0.9).")
  weight_decay: float = configs.field(1e-4, "Decoupled weight decay on kernels [I].")
  clipnorm: float = configs.field(0.0, "Clip the global gradient norm to this; 0 = no clipping [I].")
  berhu_c: float = configs.field(BERHU_C_FRACTION, "berHu threshold as a fraction of the batch's largest residual "
                                 "(Laina et al.: 0.2).")
  max_depth: float = configs.field(0.0, "Test: ground truth beyond this is not scored and predictions are clipped "
                                   "to it; 0 = no cap (NYU [I]: 10 m).")
  decoder_upprojections: int = configs.field(3, "FCRN up-projection blocks (3: stride 16 -> 2) [I].")
  decoder_width: int = configs.field(0, "Channels after the decoder's 1x1 conv; 0 = block-3 channels / 2.")
  eval_every: int = configs.field(0, "Steps between test evaluations (0: only at the end).")
  log_every: int = configs.field(50, "Steps between training logs.")
  seed: int = configs.field(0, "Seed of random init and of the training crops.")
  progress_bar: bool = configs.field(True, "tqdm bars of training and evaluation.")
  output_dir: str = configs.field("runs/finetune_depth", "TensorBoard summaries and results.json; reused only by "
                                  "the same trunk source.")

  def __post_init__(self):
    for name in ("train_steps", "batch_size", "eval_batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
    if not 0.0 < self.berhu_c <= 1.0:
      raise ValueError(f"berhu_c must be in (0, 1], got {self.berhu_c}")
    if self.max_depth < 0:
      raise ValueError(f"max_depth must be >= 0 (0: no cap), got {self.max_depth}")


def make_optimizer(config: DepthConfig) -> keras.optimizers.Optimizer:
  lr = schedules.WarmupPiecewise(config.learning_rate, boundaries=config.lr_boundaries, decay=config.lr_decay)
  kwargs = dict(weight_decay=config.weight_decay or None, global_clipnorm=config.clipnorm or None)
  if config.optimizer == "sgd":
    optimizer = keras.optimizers.SGD(lr, momentum=config.momentum, name="depth_sgd", **kwargs)
  else:
    optimizer = keras.optimizers.Adam(lr, name="depth_adam", **kwargs)
  optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias", "alpha", "moving"])
  return optimizer


def format_metrics(result: Dict[str, object], names=HEADLINE) -> str:
  """One line: 'per_image_mean delta1=... abs_rel=... | pooled delta1=...'."""
  return " | ".join(f"{a} " + " ".join(f"{k}={result[a][k]:.4f}" for k in names) for a in AGGREGATIONS)


class DepthTrainer:
  """Fine-tunes a `DepthNetwork`; counts the batches skipped for lack of valid ground truth."""

  def __init__(self, network: DepthNetwork, config: DepthConfig):
    self.network, self.config = network, config
    schedules.warn_unreached_boundaries(config.lr_boundaries, config.train_steps)
    self.optimizer = make_optimizer(config)
    self.skipped_train_batches = 0

  def loss(self, images, depth, training):
    pred = self.network(images, training=training)
    berhu = berhu_loss(pred, depth, valid_mask(depth), self.config.berhu_c)
    penalty = self.network.penalty()
    return pred, {"loss": berhu + penalty, "berhu": berhu, "lasso_l1": penalty}

  # autograph=False: no tensor-dependent Python control flow here, and skipping the conversion
  # cuts the first (tracing) step by about a third on CPU.
  @tf.function(autograph=False)
  def _step(self, images, depth):
    variables = self.network.trainable_variables
    with tf.GradientTape() as tape:
      pred, out = self.loss(images, depth, training=True)
    self.optimizer.apply_gradients(zip(tape.gradient(out["loss"], variables), variables))
    m = metrics.depth_metrics(tf.stop_gradient(pred), depth)
    out.update(delta1=m["delta1"], abs_rel=m["abs_rel"])
    return out

  def train_step(self, batch: Dict[str, tf.Tensor]) -> Optional[Dict[str, tf.Tensor]]:
    """One update, or None (and counted) when the batch has no valid ground-truth pixel."""
    if not bool(tf.reduce_any(valid_mask(batch["depth"]))):
      self.skipped_train_batches += 1
      return None
    return self._step(batch["image"], batch["depth"])

  @tf.function(autograph=False)
  def _test_sums(self, images, gt, mask):
    """Per-image metric sums of the prediction upsampled to the ground truth's resolution."""
    pred = self.network(images, training=False, size=tf.shape(gt)[1:3])
    return metrics.depth_metric_sums(pred, gt, mask, max_depth=self.config.max_depth or None)

  def evaluate(self, dataset: tf.data.Dataset) -> Dict[str, object]:
    """Depth metrics of `dataset` (batched {"image", "depth", optional "mask"}), per image and pooled.

    Returns {"per_image_mean": {metric: value}, "pooled": {...}, "num_images", "num_valid_pixels",
    "num_images_without_valid_pixels", "test_batches", "skipped_test_batches"}. Batches without a
    valid pixel are skipped and counted in `skipped_test_batches`.
    Raises ValueError if no batch has a valid pixel.
    """
    accumulator = metrics.DepthMetricAccumulator()
    skipped, batches, full, total = 0, 0, None, 0
    with progress_lib.bar(enabled=self.config.progress_bar, unit="img", desc="test", leave=False) as bar:
      for batch in dataset:
        batches += 1
        images, gt = batch["image"], batch["depth"]
        mask = batch["mask"] if "mask" in batch else tf.ones(tf.shape(gt), tf.bool)
        n_images = int(images.shape[0])
        full = full or n_images
        if n_images < full:  # pad a last, smaller batch (its padding is dropped): no second trace
          pad = [[0, full - n_images]]
          images = tf.pad(images, pad + [[0, 0]] * 3)
          gt = tf.pad(gt, pad + [[0, 0]] * 2)
          mask = tf.pad(mask, pad + [[0, 0]] * 2)
        sums = {k: v.numpy()[:n_images] for k, v in self._test_sums(images, gt, mask).items()}
        bar.update(n_images)
        if sums["num_valid"].sum() == 0:
          skipped += 1
          continue
        accumulator.add(sums)
        total += int(sums["num_valid"].sum())
    if total == 0:
      raise ValueError(f"No valid ground-truth pixel in the test split ({batches} batches, all skipped)")
    return {**accumulator.result(), "test_batches": batches, "skipped_test_batches": skipped}

  def fit(self, train_ds: tf.data.Dataset, test_ds: tf.data.Dataset,
          summary_dir: Optional[str] = None) -> Dict:
    """Trains for `train_steps` batches of `train_ds` (unbatched elements) and evaluates on `test_ds`."""
    cfg = self.config
    writer = tf.summary.create_file_writer(summary_dir) if summary_dir else tf.summary.create_noop_writer()
    train_iter = iter(train_ds.batch(cfg.batch_size, drop_remainder=True).prefetch(_AUTOTUNE))
    test_batches = test_ds.batch(cfg.eval_batch_size).prefetch(_AUTOTUNE)
    start, history, out = time.time(), [], {}
    with writer.as_default(), progress_lib.bar(total=cfg.train_steps, enabled=cfg.progress_bar) as bar:
      for step in range(1, cfg.train_steps + 1):
        out = self.train_step(next(train_iter)) or out
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.train_steps:
          values = {k: float(v) for k, v in out.items()}
          if values:  # {} while every batch so far was skipped
            bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
          for k, v in values.items():
            tf.summary.scalar(f"train/{k}", v, step=step)
          tf.summary.scalar("train/skipped_batches", self.skipped_train_batches, step=step)
          tf.summary.scalar("train/learning_rate", float(self.optimizer.learning_rate), step=step)
          # DEBUG: the progress bar shows the loss; every value is in TensorBoard.
          logging.debug("step %d: %s skipped=%d", step,
                       " ".join(f"{k}={v:.4f}" for k, v in sorted(values.items())), self.skipped_train_batches)
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.train_steps:
          result = self.evaluate(test_batches)
          for aggregation in AGGREGATIONS:
            for k in metrics.DEPTH_METRIC_NAMES:
              tf.summary.scalar(f"test/{aggregation}/{k}", result[aggregation][k], step=step)
          tf.summary.scalar("test/skipped_test_batches", result["skipped_test_batches"], step=step)
          if self.network.lasso is not None:
            tf.summary.image("test/lasso_alpha", self.network.lasso.alpha_image()[None], step=step)
          history.append({"step": step, **{a: {k: result[a][k] for k in HEADLINE} for a in AGGREGATIONS}})
          logging.info("step %d test: %s", step, format_metrics(result))
    writer.flush()
    alpha = self.network.alpha()
    return {**result, "skipped_train_batches": self.skipped_train_batches,
            "final_train": {k: float(v) for k, v in out.items()}, "history": history,
            "eval_lasso_alpha": None if alpha is None else alpha.tolist(), "seconds": time.time() - start}


def evaluate(trunk_source_result, data: "depth_data.DepthDataConfig", config: DepthConfig,
             lasso_l1: Optional[float] = None):
  """Depth fine-tuning of a trunk (`tf_mtssl.runs.trunk_source.TrunkSource`): its output folder claimed for
  that source, the network fine-tuned and scored, results.json written. Returns (result, its path)."""
  from tf_mtssl.evaluation import outputs  # pylint: disable=g-import-not-at-top
  from tf_mtssl.runs import trunk_source  # pylint: disable=g-import-not-at-top
  trunk, provenance = trunk_source_result
  source = data.source()
  network = DepthNetwork(trunk, num_upprojections=config.decoder_upprojections, width=config.decoder_width,
                         lasso_l1=lasso_l1, convention=trunk_source.input_convention(provenance))
  trainer = DepthTrainer(network, config)  # validates the settings before the output folder is claimed
  outputs.claim_output_dir(config.output_dir, EVALUATION, provenance)
  log.info("Depth fine-tuning (paper_spec 7.3) of %s; data %s", trunk_source.describe_source(provenance),
           source.describe())
  result = trainer.fit(source.train_dataset(seed=config.seed), source.test_dataset(),
                                             summary_dir=config.output_dir)
  # Only what was used: the resolved settings, not the binary's flag defaults.
  result.update(data=source.describe(), config=dataclasses.asdict(config), lasso_l1=lasso_l1,
                preprocessing=network.convention)
  return result, outputs.write_results(config.output_dir, EVALUATION, provenance, result)
