"""tf_mtssl.tasks.exemplar.triplet_loss: the semi-hard triplet loss against brute-force NumPy references."""

import numpy as np
import pytest
import tensorflow as tf

from tf_mtssl.tasks.exemplar import triplet_loss as losses


def np_distances(emb, distance):
  e = np.asarray(emb, np.float64)
  if distance == "cosine":
    e = e / np.sqrt(np.maximum(np.sum(e * e, axis=1, keepdims=True), 1e-12))
    d = np.maximum(1.0 - e @ e.T, 0.0)
  else:
    d = np.sum((e[:, None, :] - e[None, :, :]) ** 2, axis=-1)
  np.fill_diagonal(d, 0.0)
  return d


def np_semihard_bruteforce(labels, emb, margin, distance):
  """The rule, pair by pair: semi-hard negative, else the farthest; mean over (a, p) pairs."""
  d = np_distances(emb, distance)
  n = len(labels)
  total, pairs = 0.0, 0
  for a in range(n):
    negatives = [d[a, k] for k in range(n) if labels[k] != labels[a]]
    for p in range(n):
      if p == a or labels[p] != labels[a]:
        continue
      pairs += 1
      if not negatives:
        continue
      farther = [x for x in negatives if x > d[a, p]]
      d_an = min(farther) if farther else max(negatives)
      total += max(0.0, margin + d[a, p] - d_an)
  return total / pairs if pairs else 0.0


def np_addons_semihard(labels, emb, margin):
  """NumPy transcription of tensorflow-addons' vectorised `triplet_semihard_loss` ("L_2"): tiled
  [N*N, N] mask, masked min/max by offsetting, sum over positives / number of positives."""
  d = np_distances(emb, "squared_l2")
  labels = np.asarray(labels).reshape(-1, 1)
  n = len(labels)
  adjacency = labels == labels.T
  adjacency_not = ~adjacency
  d_tile = np.tile(d, [n, 1])
  mask = np.tile(adjacency_not, [n, 1]) & (d_tile > d.T.reshape(-1, 1))
  mask_final = (mask.sum(1, keepdims=True) > 0).reshape(n, n).T
  maxs = d_tile.max(1, keepdims=True)
  negatives_outside = (((d_tile - maxs) * mask).min(1, keepdims=True) + maxs).reshape(n, n).T
  mins = d.min(1, keepdims=True)
  negatives_inside = np.tile(((d - mins) * adjacency_not).max(1, keepdims=True) + mins, [1, n])
  semi_hard = np.where(mask_final, negatives_outside, negatives_inside)
  loss_mat = margin + d - semi_hard
  mask_positives = adjacency.astype(np.float64) - np.eye(n)
  return np.sum(np.maximum(loss_mat * mask_positives, 0.0)) / np.sum(mask_positives)


def random_batch(rng, normalize):
  num_labels = int(rng.integers(2, 7))
  views = rng.integers(1, 6, size=num_labels)
  labels = np.repeat(np.arange(num_labels), views)
  rng.shuffle(labels)
  dim = int(rng.integers(3, 17))
  centres = rng.normal(size=(num_labels, dim))
  emb = centres[labels] + rng.normal(scale=float(rng.uniform(0.3, 2.0)), size=(len(labels), dim))
  if normalize:
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  return labels.astype(np.int32), emb.astype(np.float32)


@pytest.mark.parametrize("distance", ["cosine", "squared_l2"])
def test_matches_bruteforce_on_random_batches(distance):
  rng = np.random.default_rng(0)
  for trial in range(30):
    labels, emb = random_batch(rng, normalize=trial % 2 == 0)
    margin = float(rng.choice([0.2, 0.5, 1.0]))
    got = float(losses.triplet_semihard_loss(labels, emb, margin=margin, distance=distance))
    want = np_semihard_bruteforce(labels, emb, margin, distance)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"trial {trial}")


def test_squared_l2_reproduces_addons_arithmetic():
  rng = np.random.default_rng(1)
  for trial in range(30):
    labels, emb = random_batch(rng, normalize=True)
    if np.sum(np.unique(labels, return_counts=True)[1] > 1) == 0:
      continue  # addons divides by zero without positive pairs
    got = float(losses.triplet_semihard_loss(labels, emb, margin=1.0, distance="squared_l2"))
    np.testing.assert_allclose(got, np_addons_semihard(labels, emb, 1.0), rtol=1e-5, atol=1e-5,
                               err_msg=f"trial {trial}")


def test_random_batches_have_positive_loss():
  labels, emb = random_batch(np.random.default_rng(2), normalize=True)
  assert float(losses.triplet_semihard_loss(labels, emb)) > 0.05


@pytest.mark.parametrize("distance", ["cosine", "squared_l2"])
def test_well_separated_clusters_give_zero_loss(distance):
  rng = np.random.default_rng(3)
  labels = np.repeat(np.arange(4), 8).astype(np.int32)
  centres = np.eye(16)[:4] * 3.0
  emb = (centres[labels] + rng.normal(scale=0.01, size=(32, 16))).astype(np.float32)
  assert float(losses.triplet_semihard_loss(labels, emb, margin=0.5, distance=distance)) == 0.0
  # The same points with shuffled labels are badly separated.
  assert float(losses.triplet_semihard_loss(rng.permutation(labels), emb, distance=distance)) > 0.1


@pytest.mark.parametrize("distance", ["cosine", "squared_l2"])
@pytest.mark.parametrize("case", ["single_views", "all_equal", "all_distinct", "identical", "zeros"])
def test_degenerate_batches_are_defined(distance, case):
  rng = np.random.default_rng(4)
  labels = {"single_views": [0, 0, 1, 2, 2, 3], "all_equal": [5] * 6, "all_distinct": list(range(6)),
            "identical": [0, 0, 0, 1, 1, 1], "zeros": [0, 0, 1, 1, 2, 2]}[case]
  emb = rng.normal(size=(6, 4)).astype(np.float32)
  if case == "identical":
    emb[:] = emb[0]
  if case == "zeros":
    emb[:] = 0.0
  emb = tf.constant(emb)
  with tf.GradientTape() as tape:
    tape.watch(emb)
    loss = losses.triplet_semihard_loss(tf.constant(labels), emb, margin=0.5, distance=distance)
  grad = tape.gradient(loss, emb)
  assert np.isfinite(float(loss)) and np.all(np.isfinite(grad.numpy())), (float(loss), grad)
  np.testing.assert_allclose(float(loss), np_semihard_bruteforce(labels, emb.numpy(), 0.5, distance),
                             atol=1e-6)
  if case in ("all_equal", "all_distinct"):
    assert float(loss) == 0.0
  if case in ("identical", "zeros") and distance == "squared_l2":
    assert float(loss) == pytest.approx(0.5)  # every distance is 0: margin + 0 - 0


def test_gradient_matches_finite_differences():
  labels, emb = random_batch(np.random.default_rng(5), normalize=True)
  emb = tf.constant(emb, tf.float64)
  f = lambda e: losses.triplet_semihard_loss(labels, e, margin=0.5)  # noqa: E731
  with tf.GradientTape() as tape:
    tape.watch(emb)
    loss = f(emb)
  grad = tape.gradient(loss, emb).numpy()
  rng = np.random.default_rng(6)
  for _ in range(5):
    direction = rng.normal(size=emb.shape)
    eps = 1e-6  # float64 all the way: small enough not to cross a mining or hinge boundary
    numeric = (float(f(emb + eps * direction)) - float(f(emb - eps * direction))) / (2 * eps)
    assert np.sum(grad * direction) == pytest.approx(numeric, rel=1e-5, abs=1e-7)
  assert loss.dtype == tf.float64 and np.abs(grad).max() > 0


def test_works_inside_tf_function_with_unknown_batch():
  f = tf.function(lambda l, e: losses.triplet_semihard_loss(l, e),
                  input_signature=[tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, 8], tf.float32)])
  labels, emb = random_batch(np.random.default_rng(7), normalize=True)
  emb = np.pad(emb, [(0, 0), (0, max(0, 8 - emb.shape[1]))])[:, :8]
  np.testing.assert_allclose(float(f(labels, emb)), np_semihard_bruteforce(labels, emb, 0.5, "cosine"),
                             rtol=1e-5, atol=1e-5)


def test_bfloat16_embeddings_are_computed_in_float32():
  labels, emb = random_batch(np.random.default_rng(8), normalize=True)
  loss = losses.triplet_semihard_loss(labels, tf.constant(emb, tf.bfloat16))
  assert loss.dtype == tf.float32


def test_pairwise_distances_properties_and_bad_distance():
  labels, emb = random_batch(np.random.default_rng(9), normalize=False)
  for distance in losses.DISTANCES:
    d = losses.pairwise_distances(emb, distance).numpy()
    np.testing.assert_allclose(d, np_distances(emb, distance), rtol=1e-4, atol=1e-4)
    assert np.all(np.diag(d) == 0.0) and np.all(d >= 0.0)
  with pytest.raises(ValueError, match="Unknown distance 'l1'"):
    losses.triplet_semihard_loss(labels, emb, distance="l1")
