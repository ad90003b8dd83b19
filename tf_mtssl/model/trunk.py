"""Pre-activation ResNet-v2 trunk up to the end of block 3 (paper_spec 2.1).

Layout follows tf-slim `resnet_v2` (the authors' implementation, paper_spec S1/C4):
  root: 7x7/2 conv (bias, no BN) -> 3x3/2 max-pool (SAME);
  bottleneck units: preact = ReLU(BN(x)); shortcut = identity / 1x1-stride max-pool, or a 1x1 conv
  (bias) of preact when the depth changes; residual = 1x1 (BN, ReLU) -> 3x3 (stride, rate; BN, ReLU)
  -> 1x1 (bias); output = shortcut + residual, with no BN/ReLU after the add;
  the stride sits in the LAST unit of blocks 1-3; BN epsilon 1e-5 with scale, decay 0.997
  (`resnet_arg_scope`); strided convs use slim's `conv2d_same` explicit padding.

`output_stride` follows slim's `stack_blocks_dense`: once the running stride reaches the target,
later units run at stride 1 and the atrous rate grows by the stride they skip. At output stride 16
the skipped stride is the one in block 3's last unit, so every block-3 unit (and hence every unit
output the lasso combines, paper_spec 5) shares one spatial shape; at output stride 8 all of block 3
runs with rate 2.

The model returns a dict: `block3` (the block-3 end point, the representation all naive heads read)
and `units`, the list of every block-3 unit output (the last one is `block3`).
"""

import dataclasses
import os
from typing import Dict, Optional, Sequence, Tuple

import keras
import tensorflow as tf
from keras import layers

from tf_mtssl.core import configs

# Units per block (blocks 1-3) for the standard depths; depth counts block 4 too, as in the paper's
# names (ResNet-101 = 3 * (3 + 4 + 23 + 3) + 2). 14 and 26 are small trunks for tests.
UNITS_PER_BLOCK: Dict[int, Tuple[int, int, int]] = {
    14: (1, 1, 1),
    26: (2, 2, 2),
    50: (3, 4, 6),
    101: (3, 4, 23),
    152: (3, 8, 36),
    200: (3, 24, 36),
}
VALID_OUTPUT_STRIDES = (8, 16, 32)
BN_EPSILON = 1e-5      # paper_spec 2.1: resnet_arg_scope(batch_norm_epsilon=1e-5, scale=True)
BN_MOMENTUM = 0.997    # tf-slim resnet_arg_scope batch_norm_decay


BATCH_NORMS = ("fused", "keras")


@keras.saving.register_keras_serializable(package="tf_mtssl")
class FusedBatchNormalization(layers.BatchNormalization):
  """`keras.layers.BatchNormalization` (the same variables, batch statistics and moving-average rule)
  that, under a 16-bit mixed-precision policy, runs TF's fused kernel (FusedBatchNormV3 and its
  gradient) on 4-D channels-last inputs.

  Keras 3 normalizes with separate ops and, for bfloat16 / float16 activations, casts each one to
  float32 and back around them: in the trunk's bfloat16 train step those BN passes and casts (245
  activation-sized casts in a ResNet-50 step, bench.mixed_precision) stay in float32 while the
  convolutions run in bfloat16. The fused op takes 16-bit activations with float32 statistics, so one
  kernel replaces them forward and backward (cuDNN on a GPU, oneDNN on a CPU). float32 activations
  keep Keras' computation (results unchanged; on this project's CPUs the fused op was not reliably
  faster in float32: -18 % to +5 % for a whole ResNet-50 step), as do masks, other ranks or axes,
  renorm, synchronized statistics, and bfloat16 on a CPU-only process without oneDNN
  (TF_ENABLE_ONEDNN_OPTS=0, which has no such kernel).
  """

  def _fused(self, inputs, mask) -> bool:
    if inputs.dtype not in (tf.bfloat16, tf.float16) or mask is not None or len(inputs.shape) != 4:
      return False
    if self.axis not in (-1, 3) or self.renorm or self.synchronized or not (self.scale and self.center):
      return False
    return not (inputs.dtype == tf.bfloat16 and os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") == "0"
                and not tf.config.list_logical_devices("GPU"))

  def call(self, inputs, training=None, mask=None):
    inputs = tf.cast(inputs, self.compute_dtype)
    if not self._fused(inputs, mask):
      return super().call(inputs, training=training, mask=mask)
    gamma, beta = tf.convert_to_tensor(self.gamma.value), tf.convert_to_tensor(self.beta.value)
    if not (training and self.trainable):
      outputs, *_ = tf.raw_ops.FusedBatchNormV3(
          x=inputs, scale=gamma, offset=beta, mean=tf.convert_to_tensor(self.moving_mean.value),
          variance=tf.convert_to_tensor(self.moving_variance.value), epsilon=self.epsilon, data_format="NHWC",
          is_training=False)
      return outputs
    empty = tf.constant([], tf.float32)
    outputs, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
        x=inputs, scale=gamma, offset=beta, mean=empty, variance=empty, epsilon=self.epsilon,
        exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
    # The op returns the unbiased (n / (n - 1)) variance for the moving average; Keras averages the
    # biased one (what it normalizes with): undo the correction to keep Keras' statistics.
    n = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), tf.float32)
    variance = variance * ((n - 1.0) / tf.maximum(n, 1.0))
    self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
    self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
    return outputs


def batch_normalization(name: str, batch_norm: str = "fused", **kwargs) -> layers.BatchNormalization:
  """The trunk's batch norm (paper_spec 2.1 constants): `FusedBatchNormalization`, or with
  batch_norm="keras" Keras' own layer (same variables and results, for comparisons)."""
  if batch_norm not in BATCH_NORMS:
    raise ValueError(f"batch_norm must be one of {BATCH_NORMS}, got {batch_norm!r}")
  cls = FusedBatchNormalization if batch_norm == "fused" else layers.BatchNormalization
  return cls(**{"epsilon": BN_EPSILON, "momentum": BN_MOMENTUM, "scale": True, "center": True, **kwargs}, name=name)


def conv2d_same(x, filters, kernel_size, stride, rate=1, use_bias=False, name=None):
  """tf-slim `conv2d_same`: stride 1 -> SAME; stride > 1 -> explicit symmetric-ish pad + VALID.

  Keeps outputs independent of the input's parity, so a checkpoint of the slim model reproduces it.
  """
  if stride == 1:
    return layers.Conv2D(filters, kernel_size, strides=1, dilation_rate=rate, padding="same",
                         use_bias=use_bias, name=name)(x)
  effective = kernel_size + (kernel_size - 1) * (rate - 1)
  pad_total = effective - 1
  pad_beg, pad_end = pad_total // 2, pad_total - pad_total // 2
  x = layers.ZeroPadding2D(((pad_beg, pad_end), (pad_beg, pad_end)), name=f"{name}_pad")(x)
  return layers.Conv2D(filters, kernel_size, strides=stride, dilation_rate=rate, padding="valid",
                       use_bias=use_bias, name=name)(x)


def bottleneck_unit(x, depth, depth_bottleneck, stride, rate, name, batch_norm="fused"):
  """One pre-activation bottleneck unit (slim `resnet_v2.bottleneck`)."""
  depth_in = x.shape[-1]
  _bn = lambda n: batch_normalization(n, batch_norm)  # noqa: E731
  preact = layers.ReLU(name=f"{name}_preact_relu")(_bn(f"{name}_preact_bn")(x))
  if depth == depth_in:
    shortcut = x if stride == 1 else layers.MaxPooling2D(1, strides=stride, name=f"{name}_shortcut")(x)
  else:
    shortcut = layers.Conv2D(depth, 1, strides=stride, use_bias=True, name=f"{name}_shortcut")(preact)
  r = layers.Conv2D(depth_bottleneck, 1, use_bias=False, name=f"{name}_conv1")(preact)
  r = layers.ReLU(name=f"{name}_conv1_relu")(_bn(f"{name}_conv1_bn")(r))
  r = conv2d_same(r, depth_bottleneck, 3, stride, rate=rate, name=f"{name}_conv2")
  r = layers.ReLU(name=f"{name}_conv2_relu")(_bn(f"{name}_conv2_bn")(r))
  r = layers.Conv2D(depth, 1, use_bias=True, name=f"{name}_conv3")(r)
  return layers.Add(name=f"{name}_out")([shortcut, r])


@dataclasses.dataclass(frozen=True)
class TrunkConfig:
  """The trunk's architecture (what a run records and every consumer rebuilds from)."""
  depth: int = configs.field(101, "ResNet-v2 depth (units of blocks 1-3 as in the full net; paper_spec 2.1: 101).",
                             choices=sorted(UNITS_PER_BLOCK))
  output_stride: int = configs.field(16, "Output stride of block 3 (paper_spec 2.1: 16, by dilation).",
                                     choices=VALID_OUTPUT_STRIDES)
  base_width: int = configs.field(64, "Root/block-1 bottleneck width; 64 is the standard ResNet (block 3 has "
                                  "16x as many channels). Smaller values make tiny test trunks.")

  def __post_init__(self):
    trunk_config(self.depth, self.output_stride, self.base_width)

  def as_dict(self) -> dict:
    return trunk_config(self.depth, self.output_stride, self.base_width)


def trunk_config(depth: int = 101, output_stride: int = 16, base_width: int = 64) -> dict:
  """Validated architecture description (what a run records and export rebuilds from)."""
  if depth not in UNITS_PER_BLOCK:
    raise ValueError(f"Unsupported trunk depth {depth}; choose one of {sorted(UNITS_PER_BLOCK)}")
  if output_stride not in VALID_OUTPUT_STRIDES:
    raise ValueError(f"output_stride must be one of {VALID_OUTPUT_STRIDES}, got {output_stride}")
  if base_width < 4 or base_width % 4:
    raise ValueError(f"base_width must be a positive multiple of 4, got {base_width}")
  return {"depth": int(depth), "output_stride": int(output_stride), "base_width": int(base_width)}


def feature_channels(base_width: int = 64) -> int:
  """Channels of the block-3 output: 4 x (4 x base_width), i.e. 1024 for the standard width."""
  return 16 * base_width


def num_block3_units(depth: int) -> int:
  return UNITS_PER_BLOCK[depth][2]


def build_trunk(depth: int = 101, output_stride: int = 16, base_width: int = 64,
                input_shape: Sequence[Optional[int]] = (None, None, 3),
                name: Optional[str] = None, batch_norm: str = "fused") -> keras.Model:
  """Builds the block-3 ResNet-v2 trunk.

  Args:
    depth: one of UNITS_PER_BLOCK (101 by default, the paper's trunk).
    output_stride: 8, 16 (default, paper_spec 2.1 recommendation) or 32 (the released checkpoint).
    base_width: root/block-1 bottleneck width; 64 is the standard ResNet, smaller values make tiny
      trunks for tests (block-3 output has 16 * base_width channels).
    input_shape: (H, W, 3); spatial dims may be None. Inputs are preprocessed float images
      (`tf_mtssl.model.preprocessing`).
    batch_norm: "fused" (default, `FusedBatchNormalization`) or "keras" (Keras' own layer: the same
      model, weights and results; for benchmarks).
  Returns:
    A functional model: images -> {"block3": [B, h, w, C], "units": [U_1, ..., U_N]}.
  """
  cfg = trunk_config(depth, output_stride, base_width)
  units_per_block = UNITS_PER_BLOCK[depth]
  inputs = keras.Input(shape=tuple(input_shape), name="images")
  x = conv2d_same(inputs, base_width, 7, 2, use_bias=True, name="conv1")
  x = layers.MaxPooling2D(3, strides=2, padding="same", name="pool1")(x)
  current_stride, rate = 4, 1
  block3_units = []
  for block_index, num_units in enumerate(units_per_block, start=1):
    bottleneck = base_width * 2 ** (block_index - 1)
    for unit_index in range(1, num_units + 1):
      unit_stride = 2 if unit_index == num_units else 1
      if current_stride == cfg["output_stride"]:
        x = bottleneck_unit(x, 4 * bottleneck, bottleneck, 1, rate,
                            name=f"block{block_index}_unit{unit_index}", batch_norm=batch_norm)
        rate *= unit_stride
      else:
        x = bottleneck_unit(x, 4 * bottleneck, bottleneck, unit_stride, 1,
                            name=f"block{block_index}_unit{unit_index}", batch_norm=batch_norm)
        current_stride *= unit_stride
      if block_index == 3:
        block3_units.append(x)
  model_name = name or f"resnet_v2_{depth}_block3"
  return keras.Model(inputs, {"block3": block3_units[-1], "units": block3_units}, name=model_name)
