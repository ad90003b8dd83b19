"""The multi-task model: one shared trunk, one head per task (paper_spec 4).

Each task's forward pass runs the trunk on that task's batch alone, so batch-norm statistics are
computed per task batch and never mixed across tasks (paper_spec 2.3 [I]). With the lasso
(paper_spec 5), each head reads its own alpha-weighted combination of the block-3 unit outputs
instead of the block-3 output.
"""

from typing import Dict, List, Optional

import keras
import tensorflow as tf

from tf_mtssl.model import trunk as trunk_lib
from tf_mtssl.tasks.base import Task


def head_feature_shape(trunk: keras.Model, task: Task):
  """(h, w, C) of the block-3 features for one of `task`'s trunk inputs."""
  spec = trunk.compute_output_spec(keras.KerasTensor((1,) + tuple(task.trunk_input_shape())))
  return tuple(spec["block3"].shape[1:])


class MultiTaskModel:
  """Trunk + per-task heads (+ optional lasso combination).

  Attributes:
    trunk: the block-3 ResNet-v2 (`tf_mtssl.model.trunk.build_trunk`).
    heads: task name -> head model.
    lasso: a `tf_mtssl.model.lasso.LassoCombination` with one alpha row per task, or None (naive model).
  """

  def __init__(self, tasks: Dict[str, Task], trunk_config: dict, lasso_l1: Optional[float] = None):
    self.tasks = dict(tasks)
    self.trunk_config = trunk_lib.trunk_config(**trunk_config)
    self.trunk = trunk_lib.build_trunk(**self.trunk_config)
    self.heads = {name: task.build_head(head_feature_shape(self.trunk, task))
                  for name, task in self.tasks.items()}
    self.lasso = None
    if lasso_l1 is not None:
      from tf_mtssl.model import lasso as lasso_lib
      self.lasso = lasso_lib.LassoCombination(
          rows=list(self.tasks), num_units=trunk_lib.num_block3_units(self.trunk_config["depth"]),
          l1=lasso_l1, name="lasso")

  @property
  def task_names(self) -> List[str]:
    return list(self.tasks)

  def head_input(self, name: str, features: dict) -> tf.Tensor:
    if self.lasso is None:
      return features["block3"]
    return self.lasso(features["units"], row=name)

  def predictions(self, name: str, batch, training: bool):
    features = self.trunk(self.tasks[name].trunk_inputs(batch), training=training)
    return self.heads[name](self.head_input(name, features), training=training)

  def regularization_loss(self, name: str) -> tf.Tensor:
    """Extra loss terms of task `name` (the L1 penalty of its lasso row)."""
    if self.lasso is None:
      return tf.constant(0.0)
    return self.lasso.l1_penalty(name)

  def own_variables(self, name: str) -> list:
    """What only task `name` trains: its head (and its lasso row)."""
    variables = list(self.heads[name].trainable_variables)
    if self.lasso is not None:
      variables.append(self.lasso.alpha_variable(name))
    return variables

  def trainable_variables(self, name: str) -> list:
    """What task `name`'s loss trains: the shared trunk, then its own variables."""
    return list(self.trunk.trainable_variables) + self.own_variables(name)
