"""Box utilities for Faster R-CNN. Boxes are `[ymin, xmin, ymax, xmax]` in pixels, float32.

Coordinates are continuous (a box's height is ymax - ymin, no "+1"); only the VOC metric
(`tf_mtssl.evaluation.metrics`) uses the devkit's inclusive "+1" areas.
"""

import math
from typing import Sequence

import tensorflow as tf

# Largest log-scale change a decoded delta may apply (Detectron / py-faster-rcnn: log(1000 / 16)),
# so a wild early prediction cannot overflow exp().
MAX_LOG_SCALE = math.log(1000.0 / 16.0)


def generate_anchors(feature_height, feature_width, stride: int, scales: Sequence[float],
                     aspect_ratios: Sequence[float], offset: float = 0.0) -> tf.Tensor:
  """Anchors of a stride-`stride` feature map, ordered (row, column, anchor) -> [Hf * Wf * A, 4].

  A = len(scales) * len(aspect_ratios), scale-major: anchor a = i_scale * len(ratios) + i_ratio. An
  anchor of scale s and ratio r (height / width) has area s^2: height s * sqrt(r), width s / sqrt(r).
  Feature cell (i, j) is centred on image pixel coordinates (stride * i + offset, stride * j + offset).
  Offset 0 ([I], Detectron2's default): slim's `conv2d_same` strided convolutions centre cell i's
  receptive field at pixel 16 i + 2 (+-1 with the input's parity), a small fraction of the stride;
  `FasterRCNN`'s RoI crops use the same mapping (feature coordinate = pixel / stride).

  Args:
    feature_height, feature_width: int or scalar int tensors.
    stride: feature stride in pixels (16, paper_spec 7.2).
    scales: anchor sides in pixels (py-faster-rcnn at shorter side 600: 128, 256, 512).
    aspect_ratios: height / width ratios (0.5, 1, 2).
    offset: image coordinate of the centre of cell (0, 0).
  """
  sizes = []
  for s in scales:
    for r in aspect_ratios:
      if s <= 0 or r <= 0:
        raise ValueError(f"Anchor scales and aspect ratios must be positive, got {scales}, {aspect_ratios}")
      sizes.append((s * math.sqrt(r), s / math.sqrt(r)))
  hw = tf.constant(sizes, tf.float32)                                           # [A, 2]
  ys = tf.cast(tf.range(feature_height), tf.float32) * stride + offset
  xs = tf.cast(tf.range(feature_width), tf.float32) * stride + offset
  cy, cx = tf.meshgrid(ys, xs, indexing="ij")                                   # [Hf, Wf]
  centers = tf.stack([cy, cx], axis=-1)[:, :, None, :]                          # [Hf, Wf, 1, 2]
  half = hw[None, None, :, :] / 2.0                                             # [1, 1, A, 2]
  anchors = tf.concat([centers - half, centers + half], axis=-1)                # [Hf, Wf, A, 4]
  return tf.reshape(anchors, [-1, 4])


def area(boxes: tf.Tensor) -> tf.Tensor:
  return tf.maximum(boxes[..., 2] - boxes[..., 0], 0.0) * tf.maximum(boxes[..., 3] - boxes[..., 1], 0.0)


def pairwise_iou(boxes1: tf.Tensor, boxes2: tf.Tensor) -> tf.Tensor:
  """IoU of every pair: [..., N, 4] x [..., M, 4] -> [..., N, M] (leading dims broadcast).

  Degenerate boxes (zero area) get IoU 0 with everything.
  """
  b1 = boxes1[..., :, None, :]
  b2 = boxes2[..., None, :, :]
  ih = tf.maximum(tf.minimum(b1[..., 2], b2[..., 2]) - tf.maximum(b1[..., 0], b2[..., 0]), 0.0)
  iw = tf.maximum(tf.minimum(b1[..., 3], b2[..., 3]) - tf.maximum(b1[..., 1], b2[..., 1]), 0.0)
  inter = ih * iw
  union = area(boxes1)[..., :, None] + area(boxes2)[..., None, :] - inter
  return tf.math.divide_no_nan(inter, union)


def _center_size(boxes):
  h = boxes[..., 2] - boxes[..., 0]
  w = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * h, boxes[..., 1] + 0.5 * w, h, w


def encode(boxes: tf.Tensor, anchors: tf.Tensor, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> tf.Tensor:
  """Regression targets of `boxes` relative to `anchors` (same shape [..., 4]) -> [..., 4].

  (dy, dx, dh, dw) = (wy (y - ya) / ha, wx (x - xa) / wa, wh log(h / ha), ww log(w / wa)), with
  (y, x) box centres (R-CNN parameterisation). Second-stage heads use weights (10, 10, 5, 5)
  (py-faster-rcnn / Detectron), the RPN (1, 1, 1, 1).
  """
  y, x, h, w = _center_size(boxes)
  ya, xa, ha, wa = _center_size(anchors)
  ha, wa = tf.maximum(ha, 1e-6), tf.maximum(wa, 1e-6)
  h, w = tf.maximum(h, 1e-6), tf.maximum(w, 1e-6)
  return tf.stack([weights[0] * (y - ya) / ha, weights[1] * (x - xa) / wa,
                   weights[2] * tf.math.log(h / ha), weights[3] * tf.math.log(w / wa)], axis=-1)


def decode(deltas: tf.Tensor, anchors: tf.Tensor, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> tf.Tensor:
  """Inverse of `encode`: deltas [..., 4] applied to anchors [..., 4] (broadcastable) -> boxes."""
  ya, xa, ha, wa = _center_size(anchors)
  dy, dx = deltas[..., 0] / weights[0], deltas[..., 1] / weights[1]
  dh = tf.minimum(deltas[..., 2] / weights[2], MAX_LOG_SCALE)
  dw = tf.minimum(deltas[..., 3] / weights[3], MAX_LOG_SCALE)
  y, x = ya + dy * ha, xa + dx * wa
  h, w = ha * tf.exp(dh), wa * tf.exp(dw)
  return tf.stack([y - 0.5 * h, x - 0.5 * w, y + 0.5 * h, x + 0.5 * w], axis=-1)


def clip_boxes(boxes: tf.Tensor, image_shape: tf.Tensor) -> tf.Tensor:
  """Clips boxes [B, N, 4] to their image [B, 2] (height, width) window [0, h] x [0, w]."""
  hw = tf.cast(image_shape, tf.float32)[:, None, :]                             # [B, 1, 2]
  limits = tf.concat([hw, hw], axis=-1)
  return tf.clip_by_value(boxes, 0.0, limits)


def inside_image(boxes: tf.Tensor, image_shape: tf.Tensor) -> tf.Tensor:
  """bool [B, N]: box [N, 4] (or [B, N, 4]) lies entirely inside image [B, 2] (height, width)."""
  hw = tf.cast(image_shape, tf.float32)
  boxes = boxes if boxes.shape.rank == 3 else boxes[None]
  return ((boxes[..., 0] >= 0.0) & (boxes[..., 1] >= 0.0) &
          (boxes[..., 2] <= hw[:, None, 0]) & (boxes[..., 3] <= hw[:, None, 1]))


def smooth_l1(x: tf.Tensor, beta: float) -> tf.Tensor:
  """Elementwise Huber-style smooth L1: 0.5 x^2 / beta if |x| < beta else |x| - 0.5 beta (beta 0 -> L1)."""
  ax = tf.abs(x)
  if beta <= 0.0:
    return ax
  return tf.where(ax < beta, 0.5 * tf.square(x) / beta, ax - 0.5 * beta)
