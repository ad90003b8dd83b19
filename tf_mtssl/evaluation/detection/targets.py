"""Training targets of the two Faster R-CNN stages (Ren et al. 2015; py-faster-rcnn / Detectron rules).

Boxes are `[ymin, xmin, ymax, xmax]` in pixels. Ground truth comes padded to a fixed number of boxes
per image with a `gt_valid` mask; padding never matches anything. Random subsampling is stateless
(`seed`: int32/int64 [2]), so a training step is reproducible given its seed.
"""

from typing import Dict, Sequence

import tensorflow as tf

from tf_mtssl.evaluation.detection import box_ops


def sample_mask(candidates: tf.Tensor, num: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Picks min(num[b], #candidates[b]) candidates of each row uniformly at random.

  Args:
    candidates: bool [B, N].
    num: int [B] (or scalar) how many to keep per row.
    seed: stateless seed [2].
  Returns:
    bool [B, N], a subset of `candidates`.
  """
  keys = tf.where(candidates, tf.random.stateless_uniform(tf.shape(candidates), seed), -1.0)
  order = tf.argsort(keys, axis=-1, direction="DESCENDING")
  ranks = tf.argsort(order, axis=-1)              # rank of each element in the random order
  num = tf.cast(tf.reshape(num, [-1, 1]), ranks.dtype)
  return tf.logical_and(candidates, ranks < num)


def _masked_iou(boxes: tf.Tensor, gt_boxes: tf.Tensor, gt_valid: tf.Tensor) -> tf.Tensor:
  """IoU [B, N, G], -1 against padded ground truth (so padding is never the best match)."""
  iou = box_ops.pairwise_iou(boxes, gt_boxes)
  return tf.where(gt_valid[:, None, :], iou, -1.0)


def rpn_targets(anchors: tf.Tensor, anchor_valid: tf.Tensor, gt_boxes: tf.Tensor, gt_valid: tf.Tensor,
                seed: tf.Tensor, positive_iou: float = 0.7, negative_iou: float = 0.3,
                batch_per_image: int = 256, positive_fraction: float = 0.5) -> Dict[str, tf.Tensor]:
  """Labels and regression targets of the anchors for the RPN loss (paper_spec 7.2; Ren et al. 3.1.2).

  An anchor is positive if its IoU with some ground truth is >= positive_iou, or if it is (one of)
  the best anchors of a ground-truth box (IoU > 0); negative if its best IoU is < negative_iou and it is
  not positive; otherwise ignored. Anchors not entirely inside the image (`anchor_valid` False) are
  ignored in training (py-faster-rcnn). Then `batch_per_image` anchors are sampled per image, at most
  a `positive_fraction` of them positive, the rest negative.

  Args:
    anchors: [A, 4].
    anchor_valid: bool [B, A].
    gt_boxes: [B, G, 4]; gt_valid: bool [B, G].
    seed: stateless seed [2].
  Returns:
    labels: int32 [B, A]: 1 sampled positive, 0 sampled negative, -1 not in the loss.
    box_targets: [B, A, 4] RPN deltas (weights 1) of each anchor's best ground truth (meaningful
      where labels == 1).
  """
  batch = tf.shape(gt_boxes)[0]
  anchors_b = tf.broadcast_to(anchors[None], [batch, tf.shape(anchors)[0], 4])
  iou = _masked_iou(anchors_b, gt_boxes, gt_valid)
  iou = tf.where(anchor_valid[:, :, None], iou, -1.0)                           # [B, A, G]
  max_iou = tf.reduce_max(iou, axis=2)
  best_gt = tf.argmax(iou, axis=2, output_type=tf.int32)
  gt_best_iou = tf.reduce_max(iou, axis=1)                                       # [B, G]
  is_gt_best = tf.reduce_any(
      (iou >= gt_best_iou[:, None, :]) & (gt_best_iou[:, None, :] > 0.0) & gt_valid[:, None, :], axis=2)
  positive = anchor_valid & ((max_iou >= positive_iou) | is_gt_best)
  negative = anchor_valid & (max_iou >= 0.0) & (max_iou < negative_iou) & ~positive
  # Without any ground truth every valid anchor has IoU -1 (masked): all are negatives.
  negative |= anchor_valid & (max_iou < 0.0)
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
  max_pos = int(batch_per_image * positive_fraction)
  pos = sample_mask(positive, tf.minimum(tf.reduce_sum(tf.cast(positive, tf.int32), 1), max_pos), seeds[0])
  num_neg = batch_per_image - tf.reduce_sum(tf.cast(pos, tf.int32), 1)
  neg = sample_mask(negative, num_neg, seeds[1])
  labels = tf.where(pos, 1, tf.where(neg, 0, -1))
  matched = tf.gather(gt_boxes, best_gt, batch_dims=1)
  return {"labels": labels, "box_targets": box_ops.encode(matched, anchors_b)}


def sample_rois(proposals: tf.Tensor, proposal_valid: tf.Tensor, gt_boxes: tf.Tensor, gt_labels: tf.Tensor,
                gt_valid: tf.Tensor, seed: tf.Tensor, num_rois: int = 512, fg_fraction: float = 0.25,
                fg_iou: float = 0.5, bg_iou_high: float = 0.5, bg_iou_low: float = 0.0,
                box_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0)) -> Dict[str, tf.Tensor]:
  """Samples the second stage's RoIs and their targets (paper_spec 7.2; Detectron's defaults).

  Candidates are the proposals plus the ground-truth boxes (py-faster-rcnn / Detectron add them so
  the head sees perfect foreground early). Foreground: best IoU >= fg_iou, labelled with the matched
  object's class; background: best IoU in [bg_iou_low, bg_iou_high). Per image `num_rois` RoIs, at most
  `fg_fraction` of them foreground; if there are too few candidates, the remaining slots are padding
  (label -1).

  Args:
    proposals: [B, R, 4] (gradients are stopped: approximate joint training, as Ren et al.).
    proposal_valid: bool [B, R].
    gt_boxes: [B, G, 4]; gt_labels: int [B, G] 0-based classes; gt_valid: bool [B, G].
    seed: stateless seed [2].
  Returns:
    rois: [B, S, 4] with S = min(num_rois, R + G).
    labels: int32 [B, S]: 0 background, c + 1 for class c, -1 padding (no loss).
    box_targets: [B, S, 4] deltas (box_weights) to the matched ground truth (meaningful for labels > 0).
  """
  candidates = tf.stop_gradient(tf.concat([proposals, gt_boxes], axis=1))
  valid = tf.concat([proposal_valid, gt_valid], axis=1)
  iou = _masked_iou(candidates, gt_boxes, gt_valid)
  max_iou = tf.reduce_max(iou, axis=2)
  best_gt = tf.argmax(iou, axis=2, output_type=tf.int32)
  fg = valid & (max_iou >= fg_iou)
  # No ground truth at all (IoU -1 everywhere): every candidate is background.
  bg = valid & (max_iou < bg_iou_high) & ((max_iou >= bg_iou_low) | (max_iou < 0.0))
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
  max_fg = int(num_rois * fg_fraction)
  fg_sel = sample_mask(fg, tf.minimum(tf.reduce_sum(tf.cast(fg, tf.int32), 1), max_fg), seeds[0])
  num_bg = num_rois - tf.reduce_sum(tf.cast(fg_sel, tf.int32), 1)
  bg_sel = sample_mask(bg, num_bg, seeds[1])
  # Gather the selected ones (foreground first) into a fixed number of slots.
  key = tf.where(fg_sel, 2, tf.where(bg_sel, 1, 0))
  num_candidates = candidates.shape[1]
  k = min(num_rois, num_candidates) if num_candidates is not None else tf.minimum(
      num_rois, tf.shape(candidates)[1])
  _, index = tf.math.top_k(key, k=k, sorted=True)
  rois = tf.gather(candidates, index, batch_dims=1)
  slot_key = tf.gather(key, index, batch_dims=1)
  matched = tf.gather(best_gt, index, batch_dims=1)
  fg_labels = tf.gather(tf.cast(gt_labels, tf.int32), matched, batch_dims=1) + 1
  labels = tf.where(slot_key == 2, fg_labels, tf.where(slot_key == 1, 0, -1))
  targets = box_ops.encode(tf.gather(gt_boxes, matched, batch_dims=1), rois, box_weights)
  return {"rois": rois, "labels": labels, "box_targets": targets}
