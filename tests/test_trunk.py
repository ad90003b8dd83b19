import keras
import numpy as np
import pytest

from tests import helpers
from tf_mtssl.model import trunk as trunk_lib


@pytest.mark.parametrize("depth,units", [(14, 1), (26, 2)])
def test_block3_units_share_one_shape_at_output_stride_16(depth, units):
  model = trunk_lib.build_trunk(depth, output_stride=16, base_width=8)
  out = model(np.zeros((2, 64, 64, 3), np.float32))
  assert len(out["units"]) == units == trunk_lib.num_block3_units(depth)
  for u in out["units"]:
    assert tuple(u.shape) == (2, 4, 4, trunk_lib.feature_channels(8))
  np.testing.assert_array_equal(out["block3"], out["units"][-1])


@pytest.mark.parametrize("output_stride,side", [(8, 8), (16, 4), (32, 2)])
def test_output_stride(output_stride, side):
  model = trunk_lib.build_trunk(14, output_stride=output_stride, base_width=8)
  assert tuple(model(np.zeros((1, 64, 64, 3), np.float32))["block3"].shape) == (1, side, side, 128)


def test_dilation_follows_slim_stack_blocks_dense():
  # Output stride 8: block 2's last stride is removed, so every block-3 3x3 conv runs at rate 2.
  model = trunk_lib.build_trunk(26, output_stride=8, base_width=8)
  assert [model.get_layer(f"block3_unit{i}_conv2").dilation_rate for i in (1, 2)] == [(2, 2), (2, 2)]
  assert model.get_layer("block2_unit2_conv2").strides == (1, 1)
  # Output stride 16: the stride of block 3's last unit is removed; nothing follows it in block 3.
  model = trunk_lib.build_trunk(26, output_stride=16, base_width=8)
  assert model.get_layer("block3_unit2_conv2").strides == (1, 1)
  assert model.get_layer("block2_unit2_conv2").strides == (2, 2)


@pytest.mark.slow
def test_resnet101_block3_units_and_parameter_count_match_keras_applications():
  model = trunk_lib.build_trunk(101)
  out = model.compute_output_spec(keras.KerasTensor((1, 224, 224, 3)))
  assert len(out["units"]) == 23
  assert all(tuple(u.shape) == (1, 14, 14, 1024) for u in out["units"])
  ref = keras.applications.ResNet101V2(weights=None, include_top=False, input_shape=(224, 224, 3))
  cut = keras.Model(ref.input, ref.get_layer("conv4_block23_out").output)
  assert model.count_params() == cut.count_params()  # the same architecture, weight for weight


def test_batch_norm_settings_follow_resnet_arg_scope():
  model = trunk_lib.build_trunk(14, base_width=8)
  bn = model.get_layer("block1_unit1_preact_bn")
  assert bn.epsilon == 1e-5 and bn.scale and bn.center


def test_conv2d_same_pads_like_slim():
  # slim: a stride-2 7x7 conv pads 3 on each side, then VALID -> ceil(n / 2) outputs for any n.
  for n in (31, 32, 33):
    model = trunk_lib.build_trunk(14, base_width=8)
    assert model.get_layer("conv1")(model.get_layer("conv1_pad")(np.zeros((1, n, n, 3), np.float32))).shape[1] == -(-n // 2)
  assert model.get_layer("conv1_pad").padding == ((3, 3), (3, 3))


@pytest.mark.parametrize("kwargs", [dict(depth=18), dict(output_stride=4), dict(base_width=6)])
def test_bad_architecture_is_rejected_with_its_value(kwargs):
  with pytest.raises(ValueError, match=str(list(kwargs.values())[0])):
    trunk_lib.build_trunk(**{"depth": 14, **kwargs})


def _policy_layers(policy, *builds):
  keras.mixed_precision.set_global_policy(policy)
  try:
    return [build() for build in builds]
  finally:
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_fused_batch_norm_equals_keras_batch_norm(policy):
  """Same outputs, gradients and moving statistics as keras.layers.BatchNormalization, training and
  inference, in float32 (Keras' own ops) and bfloat16 (the fused kernel)."""
  import tensorflow as tf
  # momentum 0.5 (not 0.997) so one step moves the statistics visibly
  fused, plain = _policy_layers(policy, lambda: trunk_lib.batch_normalization("a", momentum=0.5),
                                lambda: trunk_lib.batch_normalization("b", batch_norm="keras", momentum=0.5))
  assert isinstance(fused, trunk_lib.FusedBatchNormalization) and type(plain) is keras.layers.BatchNormalization
  x = tf.random.stateless_normal([4, 5, 6, 8], [0, 1], mean=3.0, stddev=2.0)
  rng = np.random.default_rng(0)
  for layer in (fused, plain):
    layer.build(x.shape)
  for a, b in zip(fused.weights, plain.weights):
    b.assign(rng.uniform(0.5, 1.5, b.shape).astype(np.float32))
    a.assign(b)
  initial_mean = plain.moving_mean.numpy().copy()
  grads, outs = [], []
  for layer in (fused, plain):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = layer(x, training=True)
      loss = tf.reduce_sum(tf.sin(tf.cast(y, tf.float32)) * tf.range(8.0))  # non-linear: grads not ~0
    outs.append(tf.cast(y, tf.float32).numpy())
    grads.append([tf.cast(g, tf.float32).numpy() for g in tape.gradient(loss, [x] + layer.trainable_weights)])
    assert y.dtype == ("bfloat16" if policy == "mixed_bfloat16" else "float32")
  tolerance = dict(rtol=2e-2, atol=2e-2) if policy == "mixed_bfloat16" else dict(rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(outs[0], outs[1], **tolerance)
  for g, h in zip(*grads):
    np.testing.assert_allclose(g, h, rtol=tolerance["rtol"], atol=tolerance["atol"] * np.abs(h).max())
  for a, b in zip(fused.weights, plain.weights):  # moving statistics updated alike
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5)
  assert np.abs(fused.moving_mean.numpy() - initial_mean).min() > 1e-4  # they did move
  np.testing.assert_allclose(tf.cast(fused(x, training=False), tf.float32), tf.cast(plain(x, training=False), tf.float32),
                             **tolerance)


def test_bfloat16_trunk_step_casts_only_its_input_and_output():
  """Under mixed_bfloat16 the trunk's train step keeps activations in bfloat16: no batch norm casts
  them to float32 and back (Keras' own batch norm casts every one)."""
  import tensorflow as tf

  def activation_casts(model):
    images = tf.zeros([2, 32, 32, 3])

    @tf.function
    def step():
      with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.cast(model(images, training=True)["block3"], tf.float32))
      return tape.gradient(loss, model.trainable_variables)

    ops = step.get_concrete_function().graph.get_operations()
    return sum(1 for op in ops if op.type == "Cast" and op.outputs[0].shape.rank == 4
               and op.inputs[0].op.type not in ("ReadVariableOp", "Conv2DBackpropFilter"))  # not the kernels'

  fused, plain = _policy_layers("mixed_bfloat16", lambda: trunk_lib.build_trunk(14, base_width=8),
                                lambda: trunk_lib.build_trunk(14, base_width=8, batch_norm="keras"))
  assert activation_casts(fused) <= 3  # the input, the output, its gradient
  assert activation_casts(plain) > 30  # 10 batch norms x (2 forward + 1 or 2 backward)


def test_trunk_with_fused_batch_norm_saves_and_loads(tmp_path):
  model = trunk_lib.build_trunk(14, base_width=8)
  path = str(tmp_path / "trunk.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  assert isinstance(loaded.get_layer("block1_unit1_preact_bn"), trunk_lib.FusedBatchNormalization)
  x = np.random.default_rng(1).normal(size=(1, 32, 32, 3)).astype(np.float32)
  helpers.assert_close(loaded(x)["block3"], model(x)["block3"], rtol=1e-5)
