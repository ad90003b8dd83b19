"""Metric-learning losses: the exemplar task's semi-hard triplet loss (paper_spec 3.3).

`triplet_semihard_loss` implements the rule of FaceNet (Schroff et al. 2015) as shipped in
`tf.contrib.losses.metric_learning` / tensorflow-addons `triplet_semihard_loss` (both gone from
TF 2.21 / Keras 3), which Google's exemplar re-implementation that follows this paper uses
(paper_spec 3.3, S6). Every (anchor a, positive p) pair with equal labels and a != p is one term;
its negative n (label different from a's) is
  the closest negative strictly farther from a than p ("semi-hard"), or, if there is none,
  the farthest negative from a;
and the loss is the mean over all (a, p) pairs of max(0, margin + d(a, p) - d(a, n)).

Distances: "cosine" (1 - cosine similarity, the paper's choice with margin 0.5, paper_spec 3.3) or
"squared_l2", which reproduces tensorflow-addons' default `distance_metric="L_2"` exactly (the same
pairwise matrix, clamped at 0 with a zero diagonal, and the same mining), except for degenerate batches
where addons is undefined or arbitrary: with no (a, p) pair addons divides by zero (NaN) and with a
single label it hinges against a meaningless "farthest negative"; here such pairs contribute 0 and
the loss is 0.

Vectorised without the O(N^3) tiled mask of the addons code: each anchor's negative distances are
sorted once and the semi-hard negative of every (a, p) pair is found by binary search
(`tf.searchsorted`, strict `>`), so memory is O(N^2).
"""

from typing import Tuple

import tensorflow as tf

DISTANCES = ("cosine", "squared_l2")


def pairwise_distances(embeddings: tf.Tensor, distance: str = "cosine") -> tf.Tensor:
  """Distance matrix [N, N] (float32, or float64 for float64 input; >= 0, zero diagonal) of [N, D].

  "cosine": 1 - <a, b> / (|a| |b|) (embeddings are L2-normalised here first, so zero vectors are safe
  and have distance 1 to everything); "squared_l2": |a - b|^2 by the Gram-matrix expansion, as addons'
  `pairwise_distance(squared=True)`. Neither takes a square root, so identical embeddings have finite
  gradients.
  """
  if distance not in DISTANCES:
    raise ValueError(f"Unknown distance {distance!r}; choose one of {DISTANCES}")
  x = tf.convert_to_tensor(embeddings)
  # float16/bfloat16 (mixed precision) are promoted; float64 is kept (exact gradient checks).
  x = tf.cast(x, tf.float64 if x.dtype == tf.float64 else tf.float32)
  x.shape.assert_has_rank(2)
  if distance == "cosine":
    x = tf.math.l2_normalize(x, axis=1)
    d = 1.0 - tf.matmul(x, x, transpose_b=True)
  else:
    sq = tf.reduce_sum(tf.square(x), axis=1)
    d = sq[:, None] + sq[None, :] - 2.0 * tf.matmul(x, x, transpose_b=True)
  d = tf.maximum(d, 0.0)  # rounding can make same-point distances slightly negative
  return tf.linalg.set_diag(d, tf.zeros(tf.shape(d)[:1], d.dtype))


def semihard_negative_distances(labels: tf.Tensor, distances: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  """For every pair (a, p): d(a, n) of its semi-hard negative n (see module docstring).

  Args:
    labels: int [N].
    distances: float [N, N].
  Returns:
    neg_dist: [N, N], dtype of `distances`; entry (a, p) is d(a, n) (0 where a has no negative at all).
    has_negative: bool [N]; whether anchor a has any negative.
  """
  labels = tf.reshape(labels, [-1])
  n = tf.shape(labels)[0]
  negative = tf.not_equal(labels[:, None], labels[None, :])
  num_negatives = tf.reduce_sum(tf.cast(negative, tf.int32), axis=1)
  # Each row: the anchor's negative distances ascending, non-negatives (+inf) last.
  inf = tf.constant(float("inf"), distances.dtype)
  sorted_neg = tf.sort(tf.where(negative, distances, inf), axis=1)
  # First index whose distance is strictly greater than d(a, p): "right" side of equal values.
  first_farther = tf.searchsorted(sorted_neg, distances, side="right", out_type=tf.int32)
  semihard = tf.gather(sorted_neg, tf.minimum(first_farther, n - 1), batch_dims=1)
  farthest = tf.gather(sorted_neg, tf.maximum(num_negatives - 1, 0), batch_dims=1)
  neg_dist = tf.where(first_farther < num_negatives[:, None], semihard, farthest[:, None])
  has_negative = num_negatives > 0
  # Rows without negatives hold +inf: replace (in the forward pass, and so in the gradient too).
  return tf.where(has_negative[:, None], neg_dist, tf.zeros_like(neg_dist)), has_negative


def triplet_semihard_loss(labels: tf.Tensor, embeddings: tf.Tensor, margin: float = 0.5,
                          distance: str = "cosine") -> tf.Tensor:
  """Semi-hard triplet loss over all in-batch (anchor, positive) pairs; float32 scalar (float64 for
  float64 embeddings).

  Args:
    labels: int [N]; equal labels = views of the same source image (the exemplar surrogate class).
    embeddings: float [N, D] (half precision is computed in float32).
    margin: hinge margin (paper_spec 3.3: 0.5 with cosine distance).
    distance: "cosine" or "squared_l2" (see module docstring).
  Returns:
    mean over (a, p) pairs of max(0, margin + d(a, p) - d(a, n)); pairs whose anchor has no negative
    contribute 0, and a batch without any (a, p) pair gives 0.
  """
  labels = tf.reshape(labels, [-1])
  d = pairwise_distances(embeddings, distance)
  neg_dist, has_negative = semihard_negative_distances(labels, d)
  n = tf.shape(labels)[0]
  positive = tf.logical_and(tf.equal(labels[:, None], labels[None, :]),
                            tf.logical_not(tf.eye(n, dtype=tf.bool)))
  hinge = tf.nn.relu(tf.cast(margin, d.dtype) + d - neg_dist)
  hinge = tf.where(tf.logical_and(positive, has_negative[:, None]), hinge, tf.zeros_like(hinge))
  num_pairs = tf.reduce_sum(tf.cast(positive, d.dtype))
  return tf.math.divide_no_nan(tf.reduce_sum(hinge), num_pairs)
