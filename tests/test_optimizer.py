"""PerTaskRMSProp (paper_spec 4): per-task normalisation, combination, decay once, loss scaling."""

import numpy as np
import pytest
import tensorflow as tf

from tf_mtssl.pretraining import optimizer as optimizer_lib


def make(num_tasks=2, shape=(5,), **kwargs):
  shared = [tf.Variable(np.ones(shape, np.float32), name="trunk/kernel")]
  own = {f"t{i}": [tf.Variable(np.ones((3,), np.float32), name=f"head{i}/kernel")] for i in range(num_tasks)}
  settings = dict(learning_rate=0.01, rho=0.9, momentum=0.0, epsilon=1e-8, weight_decay=0.0)
  return shared, own, optimizer_lib.PerTaskRMSProp(shared, own, **{**settings, **kwargs})


def update_norms(opt, grads):
  """One `apply`; task -> the norm of its trunk update."""
  return {t: m["trunk_update_norm"] for t, m in opt.apply(grads).items()}


def random_grads(opt, scales, seed=0):
  rng = np.random.default_rng(seed)
  return {t: [tf.constant(rng.normal(size=v.shape).astype(np.float32) * scale) for v in opt.variables_of(t)]
          for t, scale in zip(opt.task_names, scales)}


def test_each_task_update_is_normalised_whatever_its_gradient_scale():
  shared, _, opt = make(num_tasks=2)
  grads = random_grads(opt, scales=[1e-4, 1e3])
  metrics = opt.apply(grads)
  for t in opt.task_names:
    # First step, bias-corrected: every element moves by lr * sign(g), so both norms are lr * sqrt(5).
    np.testing.assert_allclose(float(metrics[t]["trunk_update_norm"]), 0.01 * np.sqrt(5), rtol=1e-2)  # eps/|g| <= 1e-2
    # ... while the gradient norms it reports keep the raw scales (1e-4 vs 1e3) apart.
    np.testing.assert_allclose(float(metrics[t]["trunk_gradient_norm"]), np.linalg.norm(grads[t][0].numpy()),
                               rtol=1e-5)


def test_rounding_noise_of_a_zero_true_gradient_barely_moves_a_parameter_at_the_default_epsilon():
  """Biases feeding batch norm have true gradient 0 and float noise of 1e-10..1e-8: they must not take
  full normalised steps (which would make weights depend on the reduction order)."""
  shared, own, opt = make(num_tasks=1, epsilon=optimizer_lib.PerTaskRMSProp.__init__.__kwdefaults__["epsilon"])
  opt.apply({"t0": [tf.fill([5], 1e-8), tf.fill([3], 1e-3)]})
  assert np.abs(1.0 - shared[0].numpy()).max() < 0.011 * 0.01  # at most ~1 % of lr
  np.testing.assert_allclose(own["t0"][0].numpy(), np.full(3, 0.99), rtol=1e-4)  # real gradients: a full step


def test_tf_slim_epsilon_does_not_normalise():
  """The paper flagfiles' former epsilon 1.0 (TF-slim's, under Keras' root) made the updates track the
  raw gradient scale; outside the root it still dominates |g| < 1: the updates differ by the scale ratio."""
  _, _, opt = make(num_tasks=2, epsilon=1.0)
  norms = update_norms(opt, random_grads(opt, scales=[1e-4, 1e-2]))
  assert float(norms["t1"]) / float(norms["t0"]) > 50


@pytest.mark.parametrize("combine", ["sum", "mean"])
def test_trunk_gets_the_sum_or_the_mean_of_the_task_updates_and_heads_their_own(combine):
  shared, own, opt = make(num_tasks=3, combine=combine)
  grads = {t: [tf.fill([5], 2.0 * (i + 1)), tf.fill([3], -1.0)] for i, t in enumerate(opt.task_names)}
  norms = update_norms(opt, grads)
  per_task = 0.01  # lr * sign(g) per element on the first bias-corrected step
  expected_trunk = 1.0 - per_task * (3 if combine == "sum" else 1)
  np.testing.assert_allclose(shared[0].numpy(), np.full(5, expected_trunk), rtol=1e-5)
  for t in opt.task_names:  # every head moves exactly as in a single-task run
    np.testing.assert_allclose(own[t][0].numpy(), np.full(3, 1.0 + per_task), rtol=1e-5)
    np.testing.assert_allclose(float(norms[t]), per_task * np.sqrt(5) / (1 if combine == "sum" else 3), rtol=1e-4)


@pytest.mark.parametrize("num_tasks", [1, 4])
def test_trunk_weight_decay_is_applied_once_per_step_whatever_the_number_of_tasks(num_tasks):
  shared, own, opt = make(num_tasks=num_tasks, weight_decay=0.1)
  zero = {t: [tf.zeros_like(v) for v in opt.variables_of(t)] for t in opt.task_names}
  for _ in range(3):
    opt.apply(zero)
  factor = (1.0 - 0.01 * 0.1) ** 3
  np.testing.assert_allclose(shared[0].numpy(), np.full(5, factor), rtol=1e-6)
  for t in opt.task_names:
    np.testing.assert_allclose(own[t][0].numpy(), np.full(3, factor), rtol=1e-6)


def test_only_kernels_are_decayed():
  assert optimizer_lib.is_decayed(tf.Variable(1.0, name="block1/conv/kernel"))
  for name in ("bn/gamma", "bn/beta", "conv/bias", "alpha_rp"):
    assert not optimizer_lib.is_decayed(tf.Variable(1.0, name=name))


def test_matches_a_numpy_rmsprop_with_momentum_over_several_steps():
  shared, own, opt = make(num_tasks=1, momentum=0.9, weight_decay=0.01,
                          learning_rate=lambda step: 0.01 * tf.minimum(1.0, tf.cast(step + 1, tf.float32) / 2.0))
  w, v, m = np.ones(5), np.zeros(5), np.zeros(5)
  rng = np.random.default_rng(1)
  for k in range(1, 6):
    g = rng.normal(size=5) * 1e-3
    opt.apply({"t0": [tf.constant(g, tf.float32), tf.zeros([3])]})
    lr = 0.01 * min(1.0, k / 2.0)
    v = 0.9 * v + 0.1 * g ** 2
    m = 0.9 * m + lr * g / (np.sqrt(v / (1 - 0.9 ** k)) + 1e-8)
    w = w - m - lr * 0.01 * w
  np.testing.assert_allclose(shared[0].numpy(), w, rtol=1e-5)
  assert int(opt.iterations.numpy()) == 5 and int(opt.task_steps["t0"].numpy()) == 5


def test_dynamic_loss_scale_skips_a_task_with_non_finite_gradients():
  shared, own, opt = make(num_tasks=2, loss_scale="dynamic", initial_loss_scale=8.0)
  np.testing.assert_allclose(float(opt.scale_loss("t0", tf.constant(2.0))), 16.0, rtol=1e-6)
  grads = {"t0": [tf.fill([5], np.inf), tf.fill([3], 1.0)], "t1": [tf.fill([5], 8.0), tf.fill([3], 8.0)]}
  metrics = opt.apply(grads)
  assert float(metrics["t0"]["trunk_update_norm"]) == 0.0 and float(metrics["t1"]["trunk_update_norm"]) > 0
  # The skipped task's gradient norm is reported as 0, not inf (its loss is finite: the run goes on).
  assert float(metrics["t0"]["trunk_gradient_norm"]) == 0.0
  np.testing.assert_allclose(float(metrics["t1"]["trunk_gradient_norm"]), np.sqrt(5.0), rtol=1e-5)  # 8 / scale 8
  np.testing.assert_allclose(own["t0"][0].numpy(), np.ones(3), rtol=0)  # skipped: untouched
  np.testing.assert_allclose(own["t1"][0].numpy(), np.full(3, 0.99), rtol=1e-5)
  np.testing.assert_allclose(shared[0].numpy(), np.full(5, 0.99), rtol=1e-5)  # only t1's update
  assert float(opt.loss_scales["t0"].numpy()) == 4.0 and float(opt.loss_scales["t1"].numpy()) == 8.0
  assert int(opt.task_steps["t0"].numpy()) == 0 and int(opt.task_steps["t1"].numpy()) == 1


def test_bad_settings_are_refused_naming_them():
  with pytest.raises(ValueError, match="epsilon=0"):
    make(epsilon=0.0)
  with pytest.raises(ValueError, match="combine"):
    make(combine="max")


def test_state_round_trips_through_a_checkpoint(tmp_path):
  _, _, opt = make(num_tasks=2, momentum=0.9)
  opt.apply(random_grads(opt, scales=[1.0, 1.0]))
  path = tf.train.Checkpoint(optimizer=opt).save(str(tmp_path / "ckpt"))
  _, _, fresh = make(num_tasks=2, momentum=0.9)
  tf.train.Checkpoint(optimizer=fresh).read(path).assert_existing_objects_matched()
  for a, b in zip(opt.variables, fresh.variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
