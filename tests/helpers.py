"""Shared test utilities."""

import keras
import numpy as np
import tensorflow as tf

from tf_mtssl import trunk as trunk_lib

TINY_TRUNK = dict(depth=14, output_stride=16, base_width=8)


def first_batch(task, data="embedded", batch_size=4, seed=0):
  return next(iter(task.build_dataset(data, batch_size, seed=seed)))


def overfit_single_batch(task, batch, steps=30, learning_rate=1e-3, trunk_kwargs=None):
  """Trains trunk + the task's head on one batch; returns the loss per step (numpy)."""
  trunk = trunk_lib.build_trunk(**(trunk_kwargs or TINY_TRUNK))
  feats = trunk.compute_output_spec(keras.KerasTensor((1,) + tuple(task.trunk_input_shape())))
  head = task.build_head(tuple(feats["block3"].shape[1:]))
  variables = trunk.trainable_variables + head.trainable_variables
  opt = keras.optimizers.Adam(learning_rate)

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      preds = head(trunk(task.trunk_inputs(batch), training=True)["block3"], training=True)
      loss, _ = task.loss_and_metrics(batch, preds)
    opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return loss

  return np.array([float(step()) for _ in range(steps)])
