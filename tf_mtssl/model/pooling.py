"""Block 3 pooled to a grid x grid map: the representation the linear evaluation reads (paper_spec 7.1)
and the export's `grid` output."""

import keras
import tensorflow as tf

LINEAR_EVAL_GRID = 3       # paper_spec 7.1: a 3x3xC representation


def _bin_edges(size, grid: int, index: int):
  """[floor(i * size / g), ceil((i + 1) * size / g)): adaptive pooling bins (as torch's
  AdaptiveAvgPool2d); never empty, and they overlap by one row when size is not a multiple of g."""
  return (index * size) // grid, -((-(index + 1) * size) // grid)


def pool_to_grid(features: tf.Tensor, grid: int = LINEAR_EVAL_GRID) -> tf.Tensor:
  """Adaptive average pooling of [B, h, w, C] features to [B, grid, grid, C].

  paper_spec 7.1: the linear evaluation reads block 3 reduced to 3x3xC (9,216 values at C = 1024);
  how the paper reduced it is not recovered, adaptive average pooling is the inferred choice [I].
  At 224 px (14x14 block 3) the bins are rows/columns [0, 5), [4, 10), [9, 14). Works for static or
  dynamic h, w (any h, w >= 1) in eager and graph mode; inside a Keras functional model use
  `GridAveragePooling`.
  """
  if int(grid) != grid or grid < 1:
    raise ValueError(f"grid must be a positive integer, got {grid!r}")
  features = tf.convert_to_tensor(features)
  if features.shape.rank is not None and features.shape.rank != 4:
    raise ValueError(f"pool_to_grid expects [batch, h, w, channels] features, got shape {features.shape}")
  # Static sizes give Python-int slices (a simpler graph); unknown ones fall back to tf.shape.
  dynamic = tf.shape(features)
  h = features.shape[1] if features.shape[1] is not None else dynamic[1]
  w = features.shape[2] if features.shape[2] is not None else dynamic[2]
  rows = []
  for i in range(grid):
    h0, h1 = _bin_edges(h, grid, i)
    cells = []
    for j in range(grid):
      w0, w1 = _bin_edges(w, grid, j)
      cells.append(tf.reduce_mean(features[:, h0:h1, w0:w1, :], axis=[1, 2]))
    rows.append(tf.stack(cells, axis=1))
  return tf.stack(rows, axis=1)


@keras.saving.register_keras_serializable(package="tf_mtssl")
class GridAveragePooling(keras.layers.Layer):
  """`pool_to_grid` as a Keras layer: [B, h, w, C] -> [B, grid, grid, C]."""

  def __init__(self, grid: int = LINEAR_EVAL_GRID, **kwargs):
    super().__init__(**kwargs)
    if int(grid) != grid or grid < 1:
      raise ValueError(f"grid must be a positive integer, got {grid!r}")
    self.grid = int(grid)

  def call(self, features):
    return pool_to_grid(features, self.grid)

  def compute_output_shape(self, input_shape):
    return (input_shape[0], self.grid, self.grid, input_shape[-1])

  def get_config(self):
    return {**super().get_config(), "grid": self.grid}
