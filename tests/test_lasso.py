import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from tf_mtssl.model.lasso import LassoCombination


def units(n=5, shape=(2, 3, 3, 4), seed=0):
  rng = np.random.default_rng(seed)
  return [tf.constant(rng.normal(size=shape), tf.float32) for _ in range(n)]


def test_output_equals_the_last_unit_at_init():
  layer = LassoCombination(["rp", "col"], num_units=5, l1=0.1)
  u = units()
  for row in ("rp", "col"):
    np.testing.assert_array_equal(layer(u, row=row).numpy(), u[-1].numpy())
  np.testing.assert_allclose(float(layer.l1_penalty("rp")), 0.1)


def test_l1_term_cannot_be_driven_to_zero_by_rescaling():
  layer = LassoCombination(["a"], num_units=4, l1=1.0)
  v = layer.alpha_variable("a")
  v.assign([0.3, -0.2, 0.5, 0.1])
  out, penalty = layer(units(4), row="a").numpy(), float(layer.l1_penalty("a"))
  for scale in (1e-6, 1e-3, 10.0):
    v.assign(np.array([0.3, -0.2, 0.5, 0.1]) * scale)
    np.testing.assert_allclose(float(layer.l1_penalty("a")), penalty, rtol=1e-5)
    helpers.assert_close(layer(units(4), row="a").numpy(), out, rtol=1e-4)
  assert penalty >= 1.0  # ||alpha||_1 >= ||alpha||_2 = 1: bounded below, minimum only at one-hot rows


def test_alpha_sparsifies_on_units_that_carry_signal():
  # Only units 1 and 3 (of 6) predict the target; alpha starts on the last unit (noise).
  rng = np.random.default_rng(0)
  n, signal = 6, (1, 3)
  data = [rng.normal(size=(256, 2, 2, 3)).astype(np.float32) for _ in range(n)]
  target = (data[signal[0]] + data[signal[1]]).mean(axis=(1, 2)) @ np.array([1.0, -2.0, 0.5], np.float32)
  layer = LassoCombination(["toy"], num_units=n, l1=0.05)
  head = keras.Sequential([keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1)])
  head.build((None, 2, 2, 3))
  variables = [layer.alpha_variable("toy")] + head.trainable_variables
  opt = keras.optimizers.Adam(0.03)

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      pred = head(layer([tf.constant(d) for d in data], row="toy"))[:, 0]
      loss = tf.reduce_mean(tf.square(pred - target)) + layer.l1_penalty("toy")
    opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return loss

  for _ in range(400):
    step()
  alpha = np.abs(layer.alpha("toy").numpy())
  assert alpha[list(signal)].sum() > 0.95 * alpha.sum(), alpha
  assert np.all(np.delete(alpha, signal) < 0.05), alpha


def test_serializable():
  layer = LassoCombination(["a", "b"], num_units=3, l1=0.2, name="lasso")
  clone = keras.layers.deserialize(keras.layers.serialize(layer))
  assert clone.rows == ["a", "b"] and clone.num_units == 3 and clone.l1 == 0.2


@pytest.mark.parametrize("kwargs", [dict(rows=[]), dict(rows=["a", "a"]), dict(num_units=0), dict(l1=-1.0)])
def test_bad_arguments(kwargs):
  with pytest.raises(ValueError):
    LassoCombination(**{"rows": ["a"], "num_units": 3, "l1": 0.1, **kwargs})


def test_alpha_image_is_tasks_by_units():
  image = LassoCombination(["a", "b"], num_units=4).alpha_image(cell=2)
  assert tuple(image.shape) == (4, 8, 3)
  assert float(tf.reduce_min(image)) >= 0.0 and float(tf.reduce_max(image)) <= 1.0
