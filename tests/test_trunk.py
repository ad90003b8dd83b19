import keras
import numpy as np
import pytest

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


def test_resnet101_block3_units_and_parameter_count_match_keras_applications():
  model = trunk_lib.build_trunk(101)
  out = model.compute_output_spec(keras.KerasTensor((1, 224, 224, 3)))
  assert len(out["units"]) == 23
  assert all(tuple(u.shape) == (1, 14, 14, 1024) for u in out["units"])
  ref = keras.applications.ResNet101V2(weights=None, include_top=False, input_shape=(224, 224, 3))
  cut = keras.Model(ref.input, ref.get_layer("conv4_block23_out").output)
  assert abs(model.count_params() - cut.count_params()) / cut.count_params() < 0.01


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
