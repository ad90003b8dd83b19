"""The lasso combination of block-3 unit outputs (paper_spec 5).

Each row j (one per head: a pretraining task, or an evaluation head with `--lasso=eval|both`) reads
input_j = sum_n alpha_j[n] * U_n over the N block-3 unit outputs, with an L1 penalty
lambda * ||alpha_j||_1 that makes it sparse. Rows start at the last unit (alpha = e_N), so a lasso model
starts equal to the naive one.

Degeneracy guard: with a plain L1 penalty, alpha can shrink while the head's first layer grows, driving
the penalty to 0 without any selection. We parametrise alpha_j = v_j / ||v_j||_2 (a fixed-norm
constraint), so the output scale cannot move into the head and the penalty ||alpha_j||_1 =
||v_j||_1 / ||v_j||_2 is invariant to rescaling v_j and bounded below by 1, reached only by one-hot
rows: minimising it selects few units [I; the paper's mechanism was not recovered, paper_spec 5]. The
alternative, normalisation without scale at the head input, would make the output invariant to alpha's
scale and let the L1 term push every alpha towards 0 uniformly, which selects nothing.
"""

import dataclasses
from typing import List, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from tf_mtssl.core import configs


# paper_spec 5 / table 4: where the lasso applies. none = No Lasso; pretrain = Pre-train Only Lasso;
# eval = Eval Only Lasso; both = Lasso. Pretraining and every evaluation read the part that concerns them.
LASSO_MODES = ("none", "pretrain", "eval", "both")
STAGES = ("pretrain", "eval")


@dataclasses.dataclass(frozen=True)
class LassoConfig:
  """--lasso and --lasso_l1, shared by pretraining and every evaluation (each applies its part)."""
  mode: str = configs.field("none", "paper_spec 5 / table 4: none = No Lasso; pretrain = Pre-train Only; eval = "
                            "Eval Only; both = Lasso. Each binary applies the part that concerns it.",
                            choices=LASSO_MODES, flag="lasso")
  l1: float = configs.field(1e-3, "L1 weight of the lasso alphas (paper_spec 5: value not recovered [I]).",
                            flag="lasso_l1")

  def __post_init__(self):
    if self.l1 < 0:
      raise ValueError(f"--lasso_l1 must be >= 0, got {self.l1}")

  def l1_at(self, stage: str) -> Optional[float]:
    """The L1 weight at `stage` ('pretrain' or 'eval'), or None where the lasso does not apply there."""
    return l1_at(self.mode, stage, self.l1)


def lasso_applies(mode: str, stage: str) -> bool:
  """Whether lasso `mode` asks for the lasso at `stage` ('pretrain' or 'eval')."""
  if mode not in LASSO_MODES:
    raise ValueError(f"--lasso must be one of {LASSO_MODES}, got {mode!r}")
  if stage not in STAGES:
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
  return mode == "both" or mode == stage


def l1_at(mode: str, stage: str, l1: float) -> Optional[float]:
  """The lasso's L1 weight at `stage` under `mode`, or None where the lasso does not apply there."""
  return float(l1) if lasso_applies(mode, stage) else None


@keras.saving.register_keras_serializable(package="tf_mtssl")
class LassoCombination(keras.layers.Layer):
  """One alpha row per head over `num_units` block-3 unit outputs.

  Call as `layer(units, row="col")` with `units` the list of unit outputs [B, h, w, C] (the trunk's
  `units` output); returns the row's combination, same shape as one unit.
  """

  def __init__(self, rows: Sequence[str], num_units: int, l1: float = 1e-3, **kwargs):
    super().__init__(**kwargs)
    rows = list(rows)
    if not rows or len(set(rows)) != len(rows):
      raise ValueError(f"LassoCombination needs distinct row names, got {rows}")
    if num_units < 1:
      raise ValueError(f"num_units must be >= 1, got {num_units}")
    if l1 < 0:
      raise ValueError(f"lasso l1 weight must be >= 0, got {l1}")
    self.rows, self.num_units, self.l1 = rows, int(num_units), float(l1)
    initial = np.zeros([self.num_units], np.float32)
    initial[-1] = 1.0  # starts as the naive model: the last unit = the block-3 output
    self._v = [self.add_weight(name=f"alpha_{row}", shape=(self.num_units,),
                               initializer=keras.initializers.Constant(initial), trainable=True)
               for row in rows]

  def build(self, input_shape):
    self.built = True

  def _index(self, row: str) -> int:
    if row not in self.rows:
      raise ValueError(f"No lasso row {row!r}; rows: {self.rows}")
    return self.rows.index(row)

  def alpha_variable(self, row: str):
    return self._v[self._index(row)]

  def alpha(self, row: str) -> tf.Tensor:
    """The row's effective (unit-L2-norm) weights, float32 [num_units]."""
    v = tf.cast(self.alpha_variable(row), tf.float32)
    return v / tf.maximum(tf.norm(v), 1e-12)

  def alphas(self) -> tf.Tensor:
    return tf.stack([self.alpha(r) for r in self.rows])

  def l1_penalty(self, row: str) -> tf.Tensor:
    return self.l1 * tf.reduce_sum(tf.abs(self.alpha(row)))

  def call(self, units: List[tf.Tensor], row: str):
    if len(units) != self.num_units:
      raise ValueError(f"LassoCombination expects {self.num_units} unit outputs, got {len(units)}")
    alpha = tf.cast(self.alpha(row), units[0].dtype)
    # add_n of scaled units: no [.., N] stacked copy of all unit outputs.
    return tf.add_n([alpha[n] * u for n, u in enumerate(units)])

  def compute_output_shape(self, input_shape):
    return input_shape[0]

  def alpha_image(self, cell: int = 8) -> tf.Tensor:
    """|alpha| as a heatmap [rows * cell, units * cell, 3] in [0, 1] (rows = heads, cols = units)."""
    a = tf.abs(self.alphas())
    a = a / tf.maximum(tf.reduce_max(a), 1e-12)
    a = tf.repeat(tf.repeat(a, cell, axis=0), cell, axis=1)
    # white -> dark red colour map so zeros read as blank
    return tf.stack([1.0 - 0.3 * a, 1.0 - a, 1.0 - a], axis=-1)

  def get_config(self):
    return {**super().get_config(), "rows": self.rows, "num_units": self.num_units, "l1": self.l1}
