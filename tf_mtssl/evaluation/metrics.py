"""Evaluation metrics of the three transfer protocols (paper_spec 7).

- `depth_metrics`, `depth_metric_sums`, `DepthMetricAccumulator`: NYU depth (paper_spec 7.3): the
  threshold accuracies delta < 1.25^i and the error measures of Eigen et al. (NIPS 2014), in TF ops
  (usable inside `tf.function`), per image and pooled over all pixels.
- `top_k_accuracy`: ImageNet classification top-1 / top-5 ("Recall@5", paper_spec 7.1).
- `voc_detection_map`: PASCAL VOC detection AP / mAP (paper_spec 7.2), a NumPy port of the rules of the
  VOC devkit (`VOCevaldet.m`, and its Python port `voc_eval.py` of py-faster-rcnn).
"""

from typing import Dict, Optional, Sequence

import numpy as np
import tensorflow as tf

# Eigen et al.: delta_i = fraction of pixels with max(d / d*, d* / d) < 1.25 ** i.
DELTA_BASE = 1.25
DEPTH_METRIC_NAMES = ("delta1", "delta2", "delta3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10")
ROOT_MEAN_METRICS = ("rmse", "rmse_log")  # square roots of means of squares; the others plain means


def depth_metric_sums(pred: tf.Tensor, gt: tf.Tensor, mask: Optional[tf.Tensor] = None,
                      min_pred_depth: float = 1e-3, max_depth: Optional[float] = None) -> Dict[str, tf.Tensor]:
  """Per-image sums of each depth metric's per-pixel term (axis 0 = images), and `num_valid` per image.

  Terms (d = prediction, d* = ground truth): [max(d / d*, d* / d) < 1.25 ** i] for delta{i},
  |d - d*| / d* (abs_rel), (d - d*)^2 / d* (sq_rel), (d - d*)^2 (rmse), (ln d - ln d*)^2 (rmse_log),
  |log10 d - log10 d*| (log10). A metric is the mean of its term over valid pixels (rmse and rmse_log
  its square root): over one image's pixels for the per-image figure, over all pixels of a set for
  the pooled one (`depth_metrics_from_sums`).

  A pixel is valid when its ground truth is finite and > 0 (missing Kinect depth is stored as 0),
  `mask` (if given) is true there and, with `max_depth`, the ground truth is <= max_depth (the NYU
  protocol caps depth at 10 m). Predictions are clamped to [min_pred_depth, max_depth] (the usual clamp
  of Eigen-style evaluation code; the lower one keeps the logs finite).

  Args:
    pred, gt: float [B, ...] of one shape; mask: optional bool (or 0/1) of that shape.
  Returns:
    {name: float32 [B] for DEPTH_METRIC_NAMES, "num_valid": int64 [B]}.
  """
  pred = tf.convert_to_tensor(pred, tf.float32)
  gt = tf.convert_to_tensor(gt, tf.float32)
  pred.shape.assert_is_compatible_with(gt.shape)
  if gt.shape.rank is not None and gt.shape.rank < 2:
    raise ValueError(f"depth_metric_sums expects [images, ...] tensors, got shape {gt.shape}")
  valid = tf.logical_and(gt > 0.0, tf.math.is_finite(gt))
  if max_depth is not None:
    valid = tf.logical_and(valid, gt <= max_depth)
    pred = tf.minimum(pred, max_depth)
  if mask is not None:
    mask = tf.cast(mask, tf.bool)
    mask.shape.assert_is_compatible_with(gt.shape)
    valid = tf.logical_and(valid, mask)
  # Invalid pixels are replaced by 1 before any division or log, then selected out with `valid`.
  d = tf.where(valid, tf.maximum(pred, min_pred_depth), 1.0)
  d_star = tf.where(valid, gt, 1.0)
  weights = tf.cast(valid, tf.float32)
  axes = tf.range(1, tf.rank(gt))

  def total(values):
    return tf.reduce_sum(values * weights, axis=axes)

  ratio = tf.maximum(d / d_star, d_star / d)
  diff = d - d_star
  log_diff = tf.math.log(d) - tf.math.log(d_star)
  out = {f"delta{i}": total(tf.cast(ratio < DELTA_BASE ** i, tf.float32)) for i in (1, 2, 3)}
  out.update(abs_rel=total(tf.abs(diff) / d_star), sq_rel=total(tf.square(diff) / d_star),
             rmse=total(tf.square(diff)), rmse_log=total(tf.square(log_diff)),
             log10=total(tf.abs(log_diff) / tf.math.log(10.0)),
             num_valid=tf.reduce_sum(tf.cast(valid, tf.int64), axis=axes))
  return out


def _finish(name: str, mean):
  return tf.sqrt(mean) if name in ROOT_MEAN_METRICS else mean


def depth_metrics(pred: tf.Tensor, gt: tf.Tensor, mask: Optional[tf.Tensor] = None,
                  min_pred_depth: float = 1e-3, max_depth: Optional[float] = None) -> Dict[str, tf.Tensor]:
  """Depth-estimation metrics pooled over all valid pixels of a batch, in TF ops (for `tf.function`).

  Definitions (Eigen et al. 2014; d = prediction, d* = ground truth, means over the valid pixels):
    delta{1,2,3}: mean[max(d / d*, d* / d) < 1.25 ** {1,2,3}]   (higher is better; paper_spec 7.3
                  reports delta1 as "% pixels below 1.25")
    abs_rel:  mean(|d - d*| / d*)          sq_rel:  mean((d - d*)^2 / d*)
    rmse:     sqrt(mean((d - d*)^2))       rmse_log: sqrt(mean((ln d - ln d*)^2))
    log10:    mean(|log10 d - log10 d*|)
  Validity, clamping and `max_depth` as in `depth_metric_sums`. If no pixel is valid every metric is
  NaN (0 / 0) and `num_valid` is 0. Sets of batches, per image or pooled: `DepthMetricAccumulator`.

  Args:
    pred: predicted depth, float, any shape (e.g. [B, H, W] or [B, H, W, 1]).
    gt: ground-truth depth, same shape as `pred`.
    mask: optional bool (or 0/1) tensor of the same shape; False excludes a pixel.
  Returns:
    Dict of float32 scalars named in DEPTH_METRIC_NAMES plus `num_valid` (int64 scalar).
  """
  flat = lambda x: None if x is None else tf.reshape(x, [1, -1])  # noqa: E731 (one "image")
  sums = depth_metric_sums(flat(tf.convert_to_tensor(pred, tf.float32)), flat(tf.convert_to_tensor(gt, tf.float32)),
                           flat(mask), min_pred_depth, max_depth)
  n = tf.cast(sums["num_valid"][0], tf.float32)
  out = {name: _finish(name, tf.math.divide(sums[name][0], n)) for name in DEPTH_METRIC_NAMES}
  return {**out, "num_valid": sums["num_valid"][0]}


class DepthMetricAccumulator:
  """Collects `depth_metric_sums` of a test set; reports both NYU aggregations, named as such.

  `per_image_mean`: each image's metrics (over its valid pixels), averaged over the images that have
  a valid pixel (Eigen et al.'s evaluation code and most NYU tables). `pooled`: every valid pixel of
  the set weighs the same (rmse = sqrt of the mean squared error over all pixels).
  """

  def __init__(self):
    self._sums = {name: [] for name in DEPTH_METRIC_NAMES + ("num_valid",)}

  def add(self, sums: Dict[str, object], num_images: Optional[int] = None) -> None:
    """Adds the first `num_images` images (default: all) of one `depth_metric_sums` result."""
    for name, values in sums.items():
      values = np.asarray(values, np.float64).reshape(-1)
      self._sums[name].append(values[:num_images] if num_images is not None else values)

  def result(self) -> Dict[str, object]:
    """{"per_image_mean": {metric: float}, "pooled": {...}, "num_images", "num_images_without_valid_pixels",
    "num_valid_pixels"}. Raises ValueError if no pixel is valid."""
    sums = {name: np.concatenate(v) if v else np.zeros([0]) for name, v in self._sums.items()}
    counts = sums["num_valid"]
    total = float(counts.sum())
    if total == 0:
      raise ValueError("No valid ground-truth pixel in the evaluated images")
    have = counts > 0
    root = lambda name, x: np.sqrt(x) if name in ROOT_MEAN_METRICS else x  # noqa: E731
    pooled = {name: float(root(name, sums[name].sum() / total)) for name in DEPTH_METRIC_NAMES}
    per_image = {name: float(np.mean(root(name, sums[name][have] / counts[have]))) for name in DEPTH_METRIC_NAMES}
    return {"per_image_mean": per_image, "pooled": pooled, "num_images": int(counts.size),
            "num_images_without_valid_pixels": int((~have).sum()), "num_valid_pixels": int(total)}


def top_k_accuracy(labels: tf.Tensor, logits: tf.Tensor, k: int) -> tf.Tensor:
  """Fraction of examples whose label is among the k highest logits (float32 scalar).

  Args:
    labels: int [B] class indices.
    logits: float [B, num_classes].
    k: 1 for top-1, 5 for top-5 ("Recall@5", paper_spec 7.1). Ties at the k-th logit count as hits
      (`tf.math.in_top_k` semantics).
  """
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  logits = tf.convert_to_tensor(logits, tf.float32)
  labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
  hits = tf.math.in_top_k(targets=labels, predictions=logits, k=k)
  return tf.reduce_mean(tf.cast(hits, tf.float32))


def _as_boxes(x, what: str, image: int) -> np.ndarray:
  a = np.asarray(x, np.float64).reshape(-1, 4) if np.size(x) else np.zeros((0, 4))
  if a.ndim != 2 or a.shape[1] != 4:
    raise ValueError(f"{what} of image {image} must have shape [N, 4], got {np.shape(x)}")
  return a


def box_iou_voc(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """IoU of one box with `boxes` [N, 4] ([ymin, xmin, ymax, xmax], inclusive pixel coordinates).

  Uses the devkit's "+1" convention: a box spanning pixels ymin..ymax is ymax - ymin + 1 pixels tall.
  """
  ih = np.maximum(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]) + 1.0, 0.0)
  iw = np.maximum(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]) + 1.0, 0.0)
  inter = ih * iw
  area = (box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0)
  areas = (boxes[:, 2] - boxes[:, 0] + 1.0) * (boxes[:, 3] - boxes[:, 1] + 1.0)
  return inter / (area + areas - inter)


def average_precision(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = True) -> float:
  """AP from a recall/precision curve (detections in decreasing score order).

  use_07_metric: VOC2007's 11-point interpolated AP (mean over t in {0, 0.1, ..., 1} of the maximum
  precision at recall >= t); otherwise the VOC2010+ area under the monotone (upper envelope)
  precision-recall curve.
  """
  if use_07_metric:
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
      p = np.max(precision[recall >= t]) if np.any(recall >= t) else 0.0
      ap += p / 11.0
    return float(ap)
  mrec = np.concatenate(([0.0], recall, [1.0]))
  mpre = np.concatenate(([0.0], precision, [0.0]))
  mpre = np.maximum.accumulate(mpre[::-1])[::-1]
  i = np.where(mrec[1:] != mrec[:-1])[0]
  return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def voc_detection_map(gt_boxes: Sequence[np.ndarray], gt_labels: Sequence[np.ndarray],
                      gt_difficult: Sequence[np.ndarray], det_boxes: Sequence[np.ndarray],
                      det_labels: Sequence[np.ndarray], det_scores: Sequence[np.ndarray],
                      num_classes: int, iou_threshold: float = 0.5,
                      use_07_metric: bool = True) -> Dict[str, object]:
  """PASCAL VOC detection AP per class and their mean, with the VOC devkit's rules.

  All arguments are per-image lists (one entry per image, same order). Boxes are
  [ymin, xmin, ymax, xmax] in pixels (inclusive coordinates, as in the VOC annotations; areas use the
  devkit's "+1"); labels are 0-based class indices in [0, num_classes).

  Rules (devkit `VOCevaldet.m`): per class, the detections of the whole set are sorted by decreasing
  score; each is matched greedily to the unmatched-yet ground truth of its image with the highest IoU;
  IoU > iou_threshold with a non-difficult, unmatched object is a true positive; with an already matched
  object (duplicate) or below the threshold, a false positive; a detection whose best match is a
  difficult object is ignored (neither). Recall counts only non-difficult objects.

  Classes with no non-difficult ground-truth object get AP = NaN and are excluded from the mAP (the
  devkit would divide by zero); if every class is NaN the mAP is NaN.

  Args:
    gt_boxes: [G_i, 4] float per image.  gt_labels: [G_i] int.  gt_difficult: [G_i] bool.
    det_boxes: [D_i, 4] float.  det_labels: [D_i] int.  det_scores: [D_i] float.
    num_classes: number of object classes (20 for VOC).
    iou_threshold: 0.5 for VOC.
    use_07_metric: True for VOC2007's 11-point AP (the paper's metric, paper_spec 7.2).
  Returns:
    {"mAP": float, "AP": float64 array [num_classes]}.
  """
  n = len(gt_boxes)
  lengths = {len(gt_labels), len(gt_difficult), len(det_boxes), len(det_labels), len(det_scores)}
  if lengths != {n}:
    raise ValueError("voc_detection_map: all per-image lists must have the same length, got "
                     f"gt_boxes={n}, gt_labels={len(gt_labels)}, gt_difficult={len(gt_difficult)}, "
                     f"det_boxes={len(det_boxes)}, det_labels={len(det_labels)}, "
                     f"det_scores={len(det_scores)}")
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")

  gts, dets = [], []
  for i in range(n):
    gb = _as_boxes(gt_boxes[i], "gt_boxes", i)
    gl = np.asarray(gt_labels[i], np.int64).reshape(-1)
    gd = np.asarray(gt_difficult[i], bool).reshape(-1)
    db = _as_boxes(det_boxes[i], "det_boxes", i)
    dl = np.asarray(det_labels[i], np.int64).reshape(-1)
    ds = np.asarray(det_scores[i], np.float64).reshape(-1)
    if not len(gb) == len(gl) == len(gd):
      raise ValueError(f"Image {i}: {len(gb)} gt boxes, {len(gl)} gt labels, {len(gd)} difficult flags")
    if not len(db) == len(dl) == len(ds):
      raise ValueError(f"Image {i}: {len(db)} detection boxes, {len(dl)} labels, {len(ds)} scores")
    for what, labels in (("gt_labels", gl), ("det_labels", dl)):
      if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"Image {i}: {what} must be in [0, {num_classes}), got {labels.tolist()}")
    gts.append((gb, gl, gd))
    dets.append((db, dl, ds))

  ap = np.full([num_classes], np.nan)
  for c in range(num_classes):
    class_gt = [(gb[gl == c], gd[gl == c]) for gb, gl, gd in gts]
    num_positives = sum(int(np.sum(~d)) for _, d in class_gt)
    if num_positives == 0:
      continue
    image_ids = np.concatenate([np.full(np.sum(dl == c), i, np.int64) for i, (_, dl, _) in enumerate(dets)])
    boxes = np.concatenate([db[dl == c] for db, dl, _ in dets])
    scores = np.concatenate([ds[dl == c] for _, dl, ds in dets])
    order = np.argsort(-scores, kind="stable")
    matched = [np.zeros(len(b), bool) for b, _ in class_gt]
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    for rank, d in enumerate(order):
      img = image_ids[d]
      g_boxes, g_difficult = class_gt[img]
      if len(g_boxes) == 0:
        fp[rank] = 1.0
        continue
      ious = box_iou_voc(boxes[d], g_boxes)
      j = int(np.argmax(ious))
      if ious[j] > iou_threshold:
        if g_difficult[j]:
          continue  # matched a difficult object: neither true nor false positive
        if not matched[img][j]:
          tp[rank] = 1.0
          matched[img][j] = True
        else:
          fp[rank] = 1.0  # duplicate detection
      else:
        fp[rank] = 1.0
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / num_positives
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    ap[c] = average_precision(recall, precision, use_07_metric)
  mean_ap = float(np.nanmean(ap)) if np.any(~np.isnan(ap)) else float("nan")
  return {"mAP": mean_ap, "AP": ap}
