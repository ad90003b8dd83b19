"""Faster R-CNN fine-tuning loop and VOC evaluation (paper_spec 7.2).

`finetune` trains a `FasterRCNN` with SGD + momentum on a step learning-rate schedule, checkpoints
with `tf.train.CheckpointManager` (the newest readable checkpoint of `output_dir` is restored on
start, so a killed job resumes, but only in a folder claimed for the same trunk source:
`tf_mtssl.evaluation.common.claim_output_dir`), writes TensorBoard summaries (losses, learning rate,
mAP, per-class AP, test images with their predicted boxes) and, at the end, `results.json` with the
per-class AP and the trunk's provenance.
"""

import dataclasses
import logging
import math
import os
import time
from typing import Dict, List, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

from tf_mtssl.core import configs
from tf_mtssl.core import schedules
from tf_mtssl.runs import checkpoints
from tf_mtssl.evaluation import metrics
from tf_mtssl.model import preprocessing
from tf_mtssl.core import progress as progress_lib
from tf_mtssl.evaluation.detection.model import FasterRCNN
from tf_mtssl.evaluation import outputs

log = logging.getLogger(__name__)

RESULTS_FILE = outputs.RESULTS_FILE
EVALUATION = "detection"




@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """Optimisation and bookkeeping. Defaults: the VOC07 recipe of paper_spec 7.2 [I] (py-faster-rcnn's
  VOC07 schedule: lr 1e-3 for 50K iterations then 1e-4 to 70K, momentum 0.9). Every field is a flag
  of `tf_mtssl.finetune_detection`."""
  train_steps: int = configs.field(70000, "Training steps (paper_spec 7.2 [I]: 50-70K).")
  learning_rate: float = configs.field(1e-3, "SGD learning rate before the decays (paper_spec 7.2 [I]).")
  lr_decay_steps: Tuple[int, ...] = configs.field((50000,), "Steps at which the learning rate is multiplied "
                                           "by lr_decay_factor.")
  lr_decay_factor: float = configs.field(0.1, "Learning-rate decay factor (1e-3 -> 1e-4).")
  warmup_steps: int = configs.field(100, "[I] Linear warm-up from lr / 3 (Detectron), for random-init trunks.")
  momentum: float = configs.field(0.9, "SGD momentum (paper_spec 7.2 [I]).")
  weight_decay: float = configs.field(1e-4, "[I] L2 weight decay on conv/dense kernels (Detectron's ResNet value).")
  seed: int = configs.field(0, "Seed of initialisation, input order, flips and anchor/RoI sampling.")
  log_every: int = configs.field(20, "Steps between loss summaries and log lines.")
  checkpoint_every: int = configs.field(1000, "Steps between checkpoints.")
  keep_checkpoints: int = configs.field(3, "Checkpoints kept in output_dir.")
  eval_every: int = configs.field(0, "Steps between test-set evaluations (0: only at the end).")
  summary_images: int = configs.field(4, "Test images with their predicted boxes written to TensorBoard.")
  use_07_metric: bool = configs.field(True, "VOC2007 11-point AP (paper_spec 7.2); false: VOC2010+ area AP.")
  progress_bar: bool = configs.field(True, "Show progress bars (step, loss, rate, ETA) on stderr.")

  def __post_init__(self):
    for name in ("train_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.learning_rate <= 0 or not 0 <= self.momentum < 1 or self.weight_decay < 0:
      raise ValueError(f"Bad SGD settings: learning_rate={self.learning_rate}, momentum={self.momentum}, "
                       f"weight_decay={self.weight_decay}")
    if list(self.lr_decay_steps) != sorted(self.lr_decay_steps) or any(s < 1 for s in self.lr_decay_steps):
      raise ValueError(f"lr_decay_steps must be increasing positive steps, got {list(self.lr_decay_steps)}")


def make_optimizer(config: FinetuneConfig) -> keras.optimizers.Optimizer:
  # [I] Detectron's warm-up: linear from lr / 3 over warmup_steps.
  schedule = schedules.WarmupPiecewise(config.learning_rate, config.warmup_steps, config.lr_decay_steps,
                                       config.lr_decay_factor, warmup_start=1.0 / 3.0)
  return keras.optimizers.SGD(learning_rate=schedule, momentum=config.momentum, name="sgd")


def make_train_step(detector: FasterRCNN, optimizer: keras.optimizers.Optimizer, element_spec,
                    weight_decay: float):
  """A `tf.function` (batch, seed [2]) -> losses, shape-polymorphic in the image size.

  autograph=False: the detector has no tensor-dependent Python control flow, and tracing then never
  re-reads source files (autograph does, so a source edited while a run is going broke its evaluation).
  """
  variables = detector.trainable_variables

  @tf.function(input_signature=[element_spec, tf.TensorSpec([2], tf.int64)], autograph=False)
  def train_step(batch, seed):
    with tf.GradientTape() as tape:
      losses = detector.losses_for_batch(batch, seed)
      regularization = detector.regularization_loss(weight_decay)
      total = losses["detection_loss"] + regularization
    grads = tape.gradient(total, variables)
    optimizer.apply_gradients(zip(grads, variables))
    return dict(losses, regularization=regularization, total_loss=total)

  return train_step


def make_detect_fn(detector: FasterRCNN, element_spec):
  spec = {k: element_spec[k] for k in ("image", "image_shape")}

  @tf.function(input_signature=[spec], autograph=False)
  def detect(batch):
    return detector.detect(batch["image"], batch["image_shape"])

  return detect


def draw_detections(images: tf.Tensor, detections: Dict[str, tf.Tensor], min_score: float = 0.3,
                    convention: str = preprocessing.DEFAULT_CONVENTION) -> tf.Tensor:
  """Trunk-input images [B, H, W, 3] (of input `convention`) with boxes scoring >= min_score drawn, in
  [0, 1], for TensorBoard."""
  rgb = preprocessing.trunk_input_to_rgb(images, convention)
  hw = tf.cast(tf.shape(images)[1:3], tf.float32)
  boxes = detections["boxes"] / tf.concat([hw, hw], 0)
  keep = detections["scores"] >= min_score
  boxes = tf.where(keep[..., None], boxes, 0.0)
  colors = tf.constant([[1.0, 0.1, 0.1, 1.0], [0.1, 1.0, 0.1, 1.0], [0.2, 0.4, 1.0, 1.0],
                        [1.0, 1.0, 0.1, 1.0]])
  return tf.image.draw_bounding_boxes(rgb, boxes, colors)


def evaluate(detector: FasterRCNN, eval_ds: tf.data.Dataset, num_classes: int,
             use_07_metric: bool = True, detect_fn=None, summary_images: int = 0,
             progress_bar: bool = False, convention: str = preprocessing.DEFAULT_CONVENTION) -> Dict[str, object]:
  """VOC AP of `detector` on a finite batched `eval_dataset` (`tf_mtssl.evaluation.detection.data`).

  Detections are mapped back to the original image resolution (divided by the resize factors) and
  scored against the original ground truth, difficult objects included as the devkit does.
  Returns {"mAP", "AP" [num_classes], "num_images", "seconds", "images" (first `summary_images` test
  images with their detections drawn, or None)}.
  """
  detect_fn = detect_fn or make_detect_fn(detector, eval_ds.element_spec)
  gt_b, gt_l, gt_d, det_b, det_l, det_s = [], [], [], [], [], []
  drawn = []
  start = time.time()
  bar = progress_lib.bar(enabled=progress_bar, unit="img", desc="test", leave=False)
  for batch in eval_ds:
    out = detect_fn({"image": batch["image"], "image_shape": batch["image_shape"]})
    bar.update(int(batch["image"].shape[0]))
    if summary_images and sum(int(d.shape[0]) for d in drawn) < summary_images:
      drawn.append(draw_detections(batch["image"], out, convention=convention))
    out = {k: v.numpy() for k, v in out.items()}
    b = {k: v.numpy() for k, v in batch.items() if k.startswith("gt_") or k == "scale"}
    for i in range(len(out["num_detections"])):
      valid = b["gt_valid"][i]
      gt_b.append(b["gt_boxes"][i][valid])
      gt_l.append(b["gt_labels"][i][valid])
      gt_d.append(b["gt_difficult"][i][valid])
      n = int(out["num_detections"][i])
      scale = np.tile(b["scale"][i], 2)
      det_b.append(out["boxes"][i, :n] / scale)
      det_l.append(out["classes"][i, :n])
      det_s.append(out["scores"][i, :n])
  bar.close()
  if not gt_b:
    raise ValueError("The evaluation dataset is empty")
  result = metrics.voc_detection_map(gt_b, gt_l, gt_d, det_b, det_l, det_s, num_classes,
                                     use_07_metric=use_07_metric)
  images = tf.concat(drawn, 0)[:summary_images] if drawn else None
  return {"mAP": result["mAP"], "AP": result["AP"], "num_images": len(gt_b),
          "seconds": time.time() - start, "images": images}


def _json_float(x: float):
  return None if x is None or math.isnan(x) else float(x)


def finetune(detector: FasterRCNN, train_ds: tf.data.Dataset, eval_ds: Optional[tf.data.Dataset],
             class_names: List[str], output_dir: str, config: FinetuneConfig, trunk_source: Dict,
             run_info: Optional[dict] = None,
             input_convention: str = preprocessing.DEFAULT_CONVENTION) -> Dict[str, object]:
  """Trains to `config.train_steps` (resuming from `output_dir`), evaluates, writes the results.

  Args:
    detector: the model (its trunk already initialised from a run / an export / randomly).
    train_ds: infinite batched training data (`data.train_dataset`).
    eval_ds: finite batched test data (`data.eval_dataset`), or None to skip evaluation.
    class_names: names of the detector's classes (label order).
    output_dir: checkpoints, `train/` and `eval/` TensorBoard logs, `results.json`. Resumed only
      if it was made from the same trunk source (else ValueError, nothing changed).
    config: optimisation settings.
    trunk_source: the provenance of the detector's trunk (`trunk_source.load_trunk`).
    run_info: more entries of the results file (data, splits, input settings).
    input_convention: the convention of the datasets' trunk-input images (`InputConfig.preprocessing`),
      for the TensorBoard images.
  Returns:
    {"mAP", "AP" {class: value}, "step", "train_images_per_sec", ...} (also written as JSON).
  """
  if len(class_names) != detector.config.num_classes:
    raise ValueError(f"{len(class_names)} class names for a detector of {detector.config.num_classes} classes")
  schedules.warn_unreached_boundaries(config.lr_decay_steps, config.train_steps, flag="lr_decay_steps")
  outputs.claim_output_dir(output_dir, EVALUATION, trunk_source)
  optimizer = make_optimizer(config)
  if detector.lasso is not None and not detector.lasso.built:
    detector.lasso.build(None)
  optimizer.build(detector.trainable_variables)
  step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
  ckpt = tf.train.Checkpoint(detector=detector, optimizer=optimizer, step=step)
  manager = tf.train.CheckpointManager(ckpt, output_dir, max_to_keep=config.keep_checkpoints)
  restored = checkpoints.read_checkpoint(
      lambda prefix: ckpt.read(prefix).assert_existing_objects_matched(), output_dir)
  if restored:
    log.info("Restored %s (step %d)", restored, int(step))
  train_writer = tf.summary.create_file_writer(os.path.join(output_dir, "train"))
  eval_writer = tf.summary.create_file_writer(os.path.join(output_dir, "eval"))
  train_step = make_train_step(detector, optimizer, train_ds.element_spec, config.weight_decay)
  detect_fn = make_detect_fn(detector, eval_ds.element_spec) if eval_ds is not None else None

  def run_eval(at_step: int) -> Optional[dict]:
    if eval_ds is None:
      return None
    result = evaluate(detector, eval_ds, len(class_names), config.use_07_metric, detect_fn,
                      config.summary_images, progress_bar=config.progress_bar, convention=input_convention)
    with eval_writer.as_default(step=at_step):
      tf.summary.scalar("mAP", result["mAP"])
      for name, ap in zip(class_names, result["AP"]):
        if not math.isnan(ap):
          tf.summary.scalar(f"AP/{name}", ap)
      if result["images"] is not None:
        tf.summary.image("detections", result["images"], max_outputs=config.summary_images)
    log.info("step %d: mAP %.4f on %d images (%.1f s)", at_step, result["mAP"], result["num_images"],
             result["seconds"])
    return result

  iterator = iter(train_ds)
  timed_images, timed_seconds = 0, 0.0
  last_losses: Dict[str, float] = {}
  first_step = True
  bar = progress_lib.bar(total=config.train_steps, initial=int(step), enabled=config.progress_bar)
  while int(step) < config.train_steps:
    batch = next(iterator)
    current = int(step)
    start = time.time()
    losses = train_step(batch, tf.constant([config.seed, current], tf.int64))
    loss_value = float(losses["total_loss"])      # synchronises, so the timing is real
    elapsed = time.time() - start
    if first_step:
      first_step = False   # includes tracing: not timed
    else:
      timed_images += int(batch["image"].shape[0])
      timed_seconds += elapsed
    if not math.isfinite(loss_value):
      raise FloatingPointError(f"Non-finite detection loss at step {current}: "
                               f"{ {k: float(v) for k, v in losses.items()} }")
    step.assign_add(1)
    done = int(step)
    bar.update(1)
    bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)   # already on the host: no extra sync
    if done % config.log_every == 0 or done == config.train_steps:
      last_losses = {k: float(v) for k, v in losses.items()}
      with train_writer.as_default(step=done):
        for k, v in last_losses.items():
          tf.summary.scalar(f"loss/{k}" if "loss" in k or k.startswith(("rpn", "rcnn")) else k, v)
        tf.summary.scalar("learning_rate", float(optimizer.learning_rate))
        if timed_seconds > 0:
          tf.summary.scalar("images_per_sec", timed_images / timed_seconds)
      # DEBUG: the progress bar shows the loss; every value is in TensorBoard.
      log.debug("step %d/%d: %s", done, config.train_steps,
               " ".join(f"{k}={v:.4f}" for k, v in sorted(last_losses.items())))
    if done % config.checkpoint_every == 0 or done == config.train_steps:
      manager.save(checkpoint_number=done)
    if config.eval_every and done % config.eval_every == 0 and done < config.train_steps:
      run_eval(done)
  bar.close()
  result = run_eval(int(step))
  images_per_sec = timed_images / timed_seconds if timed_seconds > 0 else None
  summary = {
      "step": int(step),
      "mAP": _json_float(result["mAP"]) if result else None,
      "AP": ({name: _json_float(ap) for name, ap in zip(class_names, result["AP"])} if result else None),
      "num_test_images": result["num_images"] if result else 0,
      "use_07_metric": config.use_07_metric,
      "train_images_per_sec": images_per_sec,
      "final_losses": last_losses,
      "finetune_config": dataclasses.asdict(config),
      "detector_config": dataclasses.asdict(detector.config),
      **(run_info or {}),
  }
  outputs.write_results(output_dir, EVALUATION, trunk_source, summary)
  train_writer.flush()
  eval_writer.flush()
  return summary


@dataclasses.dataclass(frozen=True)
class DetectionRunConfig:
  """What `python -m tf_mtssl.finetune_detection` trains and tests on, and where it writes."""
  data: str = configs.field("embedded", "'tfds:voc/2007' (prepared in --tfds_data_dir, never downloaded) or "
                            "'embedded' (the embedded detection set).")
  tfds_data_dir: Optional[str] = configs.field(None, "tensorflow-datasets data_dir holding prepared datasets.")
  train_split: str = configs.field("", "Training split; empty: train+validation (VOC07 trainval) for tfds, "
                                   "train for the embedded set.")
  test_split: str = configs.field("test", "Evaluation split.")
  eval_max_images: int = configs.field(0, "Evaluate on the first N test images only (0: all).")
  output_dir: str = configs.field("runs/detection", "Checkpoints, TensorBoard logs, results.json; resumed only by "
                                  "the same trunk source.")

  def resolved_train_split(self) -> str:
    return self.train_split or ("train" if self.data == "embedded" else "train+validation")
