"""Per-task RMSProp on a shared trunk (paper_spec 4: "separate RMSProp optimizers").

Every task t keeps its own RMSProp state for each variable it trains (the shared trunk, its head, its
lasso row): a second-moment estimate v_t and a momentum buffer m_t. One step, with g_t the gradient of
task t's loss and k_t the number of updates task t has made:

    v_t <- rho * v_t + (1 - rho) * g_t^2
    m_t <- mu * m_t + lr * g_t / (sqrt(v_t / (1 - rho^k_t)) + epsilon)
    w   <- w - combine_t(m_t) - lr * weight_decay * w          (decay: kernels only, once per step)

so each task's update is normalised element by element by that task's own gradient RMS: its size is
about lr whatever the scale of the task's loss, which is what makes the combination insensitive to the
relative scale of the task losses (paper_spec 4). The momentum buffer m_t is the update task t applies
(as in TF's and Keras' RMSprop, lr is inside it). `apply` returns, per task, its L2 norm over the
shared variables (`trunk_update_norm`) beside the L2 norm of the task's own trunk gradient
(`trunk_gradient_norm`): the first is what the normalisation evens out, the second what it evens out
from (at initialisation the tasks' trunk gradients differ ~60x in norm; their updates ~1.1x).

Choices, and why [I: the paper's settings were not recovered]:
- epsilon sits outside the square root (as in Adam and PyTorch's RMSprop), so it is compared with the
  gradient RMS |g| rather than with g^2. Trunk gradients are 1e-3..1e-2 per element (median, measured
  on all four tasks), so epsilon = 1e-6 leaves the normalisation intact, while the float rounding noise
  (1e-10..1e-8) in the gradients of parameters whose true gradient is 0 (biases feeding batch norm, e.g.
  conv1/bias) moves them by at most ~1 % of a step instead of a full random step (at 1e-8 they random-walk,
  and two reduction orders end in different weights). Keras' and TF1's RMSprop add epsilon under the
  root; TF-slim's ImageNet setting epsilon = 1.0 there swamps g^2 ~ 1e-8..1e-4 and turns every task's
  optimizer into momentum SGD at its raw gradient scale (measured: per-task trunk update norms 28x apart;
  paper_spec 4, corrected).
- The second moment is bias-corrected (Adam's 1 / (1 - rho^k)). Keras starts v at 0 without correction,
  so its first updates are sqrt(10) ~ 3.2x the steady size; TF1 started v at 1, which suppresses updates
  for the ~10 / (1 - rho) steps that v needs to forget the 1. With the correction a step has its
  normalised size from the first update; the learning-rate warm-up does the rest.
- The trunk receives the SUM of the task updates by default, as when every task's optimizer applies its
  own update to the shared weights (the paper's per-task workers, paper_spec 4). Consequence: a T-task
  trunk moves up to T times as far per step as a single-task trunk at the same learning rate (sqrt(T)
  for uncorrelated task directions), while every head moves exactly as in a single-task run.
  `combine="mean"` divides the trunk update by T instead, so the trunk step size matches a single-task
  run and each task's influence is 1/T.
- Decoupled weight decay (lr * weight_decay * w, on kernels only) is applied once per step to every
  variable, shared or not, so a multi-task trunk decays exactly as fast as a single-task one.

Distribution: `apply` runs in a replica context (inside `strategy.run`). Gradients of all tasks are
summed over replicas by one batched all-reduce (losses divided by the number of replicas beforehand give
the global-batch mean); then every replica updates its own copy of each variable and slot with the same
reduced gradients (`strategy.extended.update`, as Keras optimizers do), so weights and states stay
identical on every replica without further communication.

float16: `loss_scale="dynamic"` keeps one dynamic loss scale per task (each task's loss has its own
scale): `scale_loss` multiplies the loss, `apply` divides the gradients, and a task whose gradients are
not finite skips its update for that step and halves its scale; after `growth_interval` good steps the
scale doubles (the rule of Keras' LossScaleOptimizer).
"""

from typing import Callable, Dict, List, Optional, Sequence, Union

import tensorflow as tf

COMBINE_MODES = ("sum", "mean")

LearningRate = Union[float, Callable[[tf.Tensor], tf.Tensor]]


def is_decayed(variable) -> bool:
  """Weight decay applies to conv and dense kernels only (paper_spec 4 [I]): not to batch-norm
  gamma/beta, biases or lasso alphas."""
  return variable.name.split(":")[0].rsplit("/", 1)[-1] == "kernel"


def _tf_variable(variable):
  """The tf.Variable behind a Keras variable (tf.distribute works on tf.Variables)."""
  return getattr(variable, "value", variable) if not isinstance(variable, tf.Variable) else variable


def _global_norm(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
  """L2 norm of all `tensors` together, in float32 (0 for none)."""
  squares = [tf.reduce_sum(tf.square(tf.cast(t, tf.float32))) for t in tensors]
  return tf.sqrt(tf.add_n(squares)) if squares else tf.constant(0.0)


class _Targets:
  """The variables an optimizer updates (a plain object: tf.Module does not track it)."""

  def __init__(self, shared, own):
    self.shared, self.own = shared, own


class PerTaskRMSProp(tf.Module):
  """One RMSProp state per task over `shared_variables` + that task's own variables.

  Args:
    shared_variables: variables every task trains (the trunk).
    task_variables: task name -> variables only that task trains (its head, its lasso row).
    learning_rate: a float or a schedule `step -> lr` (called with the number of steps applied).
    rho, momentum, epsilon: RMSProp settings (see the module doc for epsilon).
    weight_decay: decoupled decay rate on kernels (`is_decayed`), applied once per step.
    combine: "sum" or "mean" of the task updates on the shared variables.
    loss_scale: None, or "dynamic" (float16 training).
  """

  def __init__(self, shared_variables: Sequence, task_variables: Dict[str, Sequence], *,
               learning_rate: LearningRate, rho: float = 0.9, momentum: float = 0.9, epsilon: float = 1e-6,
               weight_decay: float = 0.0, combine: str = "sum", loss_scale: Optional[str] = None,
               initial_loss_scale: float = 2.0 ** 15, growth_interval: int = 2000, name: str = "per_task_rmsprop"):
    super().__init__(name=name)
    if not task_variables:
      raise ValueError("PerTaskRMSProp needs at least one task")
    if not 0 <= rho < 1 or not 0 <= momentum < 1 or not epsilon > 0 or weight_decay < 0:
      raise ValueError(f"Bad RMSProp settings: rho={rho} (needs 0 <= rho < 1), momentum={momentum} "
                       f"(0 <= momentum < 1), epsilon={epsilon} (> 0), weight_decay={weight_decay} (>= 0)")
    if combine not in COMBINE_MODES:
      raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
    if loss_scale not in (None, "dynamic"):
      raise ValueError(f"loss_scale must be None or 'dynamic', got {loss_scale!r}")
    self.task_names = list(task_variables)
    self.learning_rate = learning_rate
    self.rho, self.momentum, self.epsilon = float(rho), float(momentum), float(epsilon)
    self.weight_decay, self.combine, self.growth_interval = float(weight_decay), combine, int(growth_interval)
    # The trained variables belong to the model: kept out of this module's checkpoint dependencies.
    self._targets = _Targets([_tf_variable(v) for v in shared_variables],
                             {t: [_tf_variable(v) for v in vs] for t, vs in task_variables.items()})
    shared_ids = {id(v) for v in self.shared}
    for t, vs in self.own.items():
      if any(id(v) in shared_ids for v in vs):
        raise ValueError(f"Task {t!r} lists a shared variable among its own variables")
    strategy = tf.distribute.get_strategy()
    with tf.name_scope(name):
      self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations")
      self.task_steps = {t: tf.Variable(0, dtype=tf.int64, trainable=False, name=f"{t}_steps")
                         for t in self.task_names}
      self.velocity, self.updates = {}, {}
      for t in self.task_names:
        self.velocity[t] = [self._slot(strategy, v, f"{t}_velocity") for v in self.variables_of(t)]
        self.updates[t] = [self._slot(strategy, v, f"{t}_update") for v in self.variables_of(t)]
      self.loss_scales, self.good_steps = {}, {}
      if loss_scale == "dynamic":
        for t in self.task_names:
          self.loss_scales[t] = tf.Variable(float(initial_loss_scale), trainable=False, name=f"{t}_loss_scale")
          self.good_steps[t] = tf.Variable(0, dtype=tf.int64, trainable=False, name=f"{t}_good_steps")

  @staticmethod
  def _slot(strategy, variable, name):
    with strategy.extended.colocate_vars_with(variable):
      return tf.Variable(tf.zeros(variable.shape, variable.dtype), trainable=False,
                         name=f"{name}_{variable.name.split(':')[0].replace('/', '_')}")

  @property
  def shared(self) -> List[tf.Variable]:
    return self._targets.shared

  @property
  def own(self) -> Dict[str, List[tf.Variable]]:
    return self._targets.own

  def variables_of(self, task: str) -> List[tf.Variable]:
    """What `task`'s gradients must be taken with respect to, in this order: shared, then own."""
    return self.shared + self.own[task]

  def current_learning_rate(self) -> tf.Tensor:
    if callable(self.learning_rate):
      return tf.cast(self.learning_rate(self.iterations), tf.float32)
    return tf.constant(self.learning_rate, tf.float32)

  # ---- loss scaling ----------------------------------------------------------------------------
  def scale_loss(self, task: str, loss: tf.Tensor) -> tf.Tensor:
    """The loss to differentiate: `loss` times the task's loss scale (unchanged without scaling)."""
    if task not in self.loss_scales:
      return loss
    return loss * tf.cast(self.loss_scales[task], loss.dtype)

  # ---- the update ------------------------------------------------------------------------------
  def apply(self, grads: Dict[str, Sequence[Optional[tf.Tensor]]]) -> Dict[str, Dict[str, tf.Tensor]]:
    """Applies one step from each task's (per-replica) gradients, in `variables_of(task)` order.

    Call in a replica context (inside `strategy.run`), or eagerly/in a tf.function without a strategy.
    Returns task -> {"trunk_update_norm": L2 norm of the update that task applied to the shared
    variables in this step (weight decay excluded; scaled by 1/T under combine="mean"),
    "trunk_gradient_norm": L2 norm of its gradient over the shared variables (summed over replicas,
    unscaled)}; both 0 for a task that skipped its step.
    """
    if set(grads) != set(self.task_names):
      raise ValueError(f"Gradients given for {sorted(grads)}, expected {sorted(self.task_names)}")
    flat, sizes = [], []
    for t in self.task_names:
      task_grads = list(grads[t])
      if len(task_grads) != len(self.variables_of(t)):
        raise ValueError(f"Task {t!r}: {len(task_grads)} gradients for {len(self.variables_of(t))} variables")
      flat += [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
               for g, v in zip(task_grads, self.variables_of(t))]
      sizes.append(len(task_grads))
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
      flat = context.all_reduce(tf.distribute.ReduceOp.SUM, flat)
    reduced, start = {}, 0
    for t, n in zip(self.task_names, sizes):
      reduced[t] = flat[start:start + n]
      start += n
    finite = {}
    for t in self.task_names:
      if t in self.loss_scales:
        inverse = 1.0 / self.loss_scales[t]
        reduced[t] = [g * tf.cast(inverse, g.dtype) for g in reduced[t]]
        finite[t] = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in reduced[t]])
      else:
        finite[t] = tf.constant(True)
    if context is None:  # cross-replica context: no strategy.run around us
      self._update_all(tf.distribute.get_strategy(), reduced, finite)
    else:
      context.merge_call(self._update_all, args=(reduced, finite))
    scale = 1.0 / len(self.task_names) if self.combine == "mean" else 1.0
    return {t: {"trunk_update_norm": tf.where(finite[t], scale * _global_norm(self.updates[t][:len(self.shared)]), 0.0),
                "trunk_gradient_norm": tf.where(finite[t], _global_norm(reduced[t][:len(self.shared)]), 0.0)}
            for t in self.task_names}

  def _update_all(self, strategy, grads, finite):
    """Cross-replica: updates every variable and slot on every replica's copy."""
    extended = strategy.extended
    lr = self.current_learning_rate()  # at the step count before this update
    shared_scale = 1.0 / len(self.task_names) if self.combine == "mean" else 1.0
    decay = lr * self.weight_decay

    def counter_step(var):
      return var.assign_add(1)

    # Bias correction of this step's second moment: k_t counts this update too.
    corrections = {t: 1.0 - tf.pow(self.rho, tf.cast(self.task_steps[t], tf.float32) + 1.0)
                   for t in self.task_names}
    extended.update(self.iterations, counter_step, group=False)
    for t in self.task_names:
      extended.update(self.task_steps[t], lambda var, ok: var.assign_add(tf.cast(ok, tf.int64)),
                      args=(finite[t],), group=False)
    # Shared variables: every task's state, then one combined update and one decay.
    for i, variable in enumerate(self.shared):
      slots = [(self.velocity[t][i], self.updates[t][i], grads[t][i], finite[t], corrections[t])
               for t in self.task_names]
      extended.update(variable, self._apply_variable, args=(slots, lr, decay if is_decayed(variable) else None,
                                                            shared_scale), group=False)
    offset = len(self.shared)
    for t in self.task_names:
      for j, variable in enumerate(self.own[t]):
        i = offset + j
        slots = [(self.velocity[t][i], self.updates[t][i], grads[t][i], finite[t], corrections[t])]
        extended.update(variable, self._apply_variable,
                        args=(slots, lr, decay if is_decayed(variable) else None, 1.0), group=False)
    for t in self.loss_scales:
      extended.update(self.good_steps[t], lambda var, ok: var.assign(
          tf.where(ok, (var + 1) % self.growth_interval, tf.zeros_like(var))), args=(finite[t],), group=False)
      extended.update(self.loss_scales[t], lambda var, ok, good: var.assign(
          tf.where(ok, tf.where(tf.equal(good, 0), var * 2.0, var), tf.maximum(var * 0.5, 1.0))),
          args=(finite[t], self.good_steps[t]), group=False)

  def _apply_variable(self, variable, slots, lr, decay, shared_scale):
    """One replica's copy: each listed task's RMSProp state, then w -= scale * sum of updates + decay."""
    total = None
    for velocity, update, grad, ok, correction in slots:
      grad = tf.cast(grad, variable.dtype)
      new_velocity = self.rho * velocity + (1.0 - self.rho) * tf.square(grad)
      step = lr * grad / (tf.sqrt(new_velocity / correction) + self.epsilon)
      new_update = self.momentum * update + step
      if self.loss_scales:  # a task with non-finite gradients keeps its state and applies nothing
        new_velocity = tf.where(ok, new_velocity, velocity)
        new_update = tf.where(ok, new_update, update)
        applied = tf.where(ok, new_update, tf.zeros_like(new_update))
      else:
        applied = new_update
      velocity.assign(new_velocity)
      update.assign(new_update)
      total = applied if total is None else total + applied
    delta = total * shared_scale if shared_scale != 1.0 else total
    if decay is not None:
      delta = delta + tf.cast(decay, variable.dtype) * variable
    return variable.assign_sub(delta)
