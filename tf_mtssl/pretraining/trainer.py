"""Multi-task pretraining loop (paper_spec 4): one batch per task per step, one tape and one
RMSProp state per task, the per-task updates applied to the shared trunk and each head.

The loop is a custom `strategy.run` loop (Keras 3 `model.fit` fails under
MultiWorkerMirroredStrategy, keras#20585). Within one step every task's gradients are computed at
the same weights first; then `tf_mtssl.pretraining.optimizer.PerTaskRMSProp` normalises each task's gradient by
that task's own RMSProp state and applies the sum (or mean) of the task updates to the trunk, each
task's update to its own head, and weight decay once (paper_spec 4: "separate RMSProp optimizers").
`<task>/trunk_update_norm` logs the size of each task's trunk update and `<task>/trunk_gradient_norm`
the size of the gradient it came from (the normalisation evens out the first, not the second).

Distribution. Runs in `tf.distribute.get_strategy()` or the strategy passed in
(`tf_mtssl.pretraining.distribution.make_strategy`). Each task's dataset is built once per input pipeline with
`distribute_datasets_from_function`: the source is sharded per worker (`InputContext`) and batched
at the per-replica batch (global batch / replicas, which must divide). Each replica's loss is its
batch mean divided by the number of replicas, so the SUM all-reduce that every task's optimizer does
gives the gradient of the global-batch mean; every replica then applies the same reduced gradient
with the same optimizer state, so weights and per-task RMSProp states stay identical on all
replicas (`weights_fingerprint` shows it). Reported metrics are means over replicas. Only the chief
writes summaries and checkpoints to `model_dir`; other workers write to a temporary directory
that is removed at the end (as TF documents for MultiWorkerMirroredStrategy).

Start-up. First every task's source is read (one batch each, `check_inputs`): a bad path or a
source with nothing readable fails before anything is written to `model_dir`. Then the chief takes
the run directory's lock (`tf_mtssl.runs.lock`: a second process on it fails at once, naming the
holder), restores, and records this start in run_config_history.jsonl and run_config.json
(`checkpoints.record_start`: what changed since the previous start, at which step).

Restart and preemption. The newest readable checkpoint in `model_dir` is restored (weights,
per-task optimizer states, step; a damaged newer one is named and skipped) and training ends at
exactly `train_steps`; under several workers, they first check that all of them resumed from the
same step. The input pipeline is not checkpointed: it restarts at a new random position derived
from (seed, restored step), so a resumed run sees a different but reproducible stream. SIGTERM or
SIGINT stops the run after a checkpoint (`Trainer.preempted`; the binary exits with
preemption.PREEMPTED_EXIT_CODE). If no step can finish because the input pipeline is starved, the process
exits with that code anyway, without saving, `stop_grace_s` after the signal (at once during the
input check, or on a second signal); see `preemption.StopRequest`. Each process's signal flag enters
the next `run_steps` call and is summed over workers by one all-reduce inside it, so every worker
learns of a signal to any of them after the same call, saves there and stops: none is left waiting
in a collective.

Host syncs. `run_steps` runs up to `steps_per_loop` steps in one tf.function call (a `tf.range`
loop, as SimCLR's train_multiple_steps), with the non-finite-loss guard inside the graph; the host
reads one scalar per call and the metrics only at log steps. Calls end where the host has work (log,
checkpoint, image summary, cosines, profiler), by the same rule on every worker. `--jit_compile`
compiles each replica's forward and backward pass with XLA (the optimizer's update stays outside:
it communicates with the other replicas).

This does what tf.distribute.experimental.PreemptionCheckpointHandler does for
MultiWorkerMirroredStrategy, without its costs (TF 2.21): on every start it probes the Google Cloud
metadata server (7 s here, offline; measured); and, as its source reads, on GCE CPU VMs it ignores
signals altogether, on GCE GPU VMs it trains on for a one-hour grace period after the signal
(grace_period=0 is read as "unset"), and its step counter must be restored from the same checkpoint
on every worker. A non-finite loss stops the run with FloatingPointError (naming its step) before anything is
saved, so the newest checkpoint is the last good one.
"""

import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import shutil
import time
from typing import Dict, List, Optional, Tuple

import keras
import tensorflow as tf

from tf_mtssl.core import schedules
from tf_mtssl.runs import checkpoints
from tf_mtssl.pretraining import distribution as distribute
from tf_mtssl.model import preprocessing
from tf_mtssl.core import progress
from tf_mtssl.runs import lock as run_lock
from tf_mtssl.pretraining import optimizer as optimizer_lib
from tf_mtssl.pretraining import preemption
from tf_mtssl.pretraining.config import MIXED_PRECISION_POLICIES, PretrainConfig, TrainConfig, resolve_jit_compile
from tf_mtssl.data import sources
from tf_mtssl.pretraining.multitask_model import MultiTaskModel
from tf_mtssl.data.sources import NUM_CORRUPT_KEY
from tf_mtssl import tasks as task_registry
from tf_mtssl.model import lasso as lasso_lib
from tf_mtssl.model import trunk as trunk_lib
from tf_mtssl.tasks.base import Task

log = logging.getLogger(__name__)

@dataclasses.dataclass
class LoopResult:
  """What one call of `Trainer.run_steps` returns (tensors; nothing is fetched to the host).

  metrics: task -> {name: scalar} of the call's last step (means over replicas).
  cosines: pairwise task-gradient cosines of the last step ({} unless asked for).
  steps_run: steps run in the call.
  first_bad_step: 1-based index within the call of the first step with a non-finite loss, 0 if none.
  stop_votes: number of workers that had a stop signal when the call started (> 0: stop).
  """
  metrics: Dict[str, Dict[str, tf.Tensor]]
  cosines: Dict[str, tf.Tensor]
  steps_run: tf.Tensor
  first_bad_step: tf.Tensor
  stop_votes: tf.Tensor


@contextlib.contextmanager
def _dtype_policy(policy: str):
  """Builds layers under `policy`, then restores the previous global policy (layers keep theirs)."""
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy(policy)
  try:
    yield
  finally:
    keras.mixed_precision.set_global_policy(previous)


def make_optimizer(config: TrainConfig, model: MultiTaskModel) -> optimizer_lib.PerTaskRMSProp:
  """One RMSProp state per task over the shared trunk and the task's own head (and lasso row)."""
  return optimizer_lib.PerTaskRMSProp(
      model.trunk.trainable_variables, {n: model.own_variables(n) for n in model.task_names},
      learning_rate=schedules.WarmupPiecewise(config.learning_rate, config.warmup_steps), rho=config.rmsprop_rho,
      momentum=config.rmsprop_momentum, epsilon=config.rmsprop_epsilon, weight_decay=config.weight_decay,
      combine=config.trunk_update, loss_scale="dynamic" if config.mixed_precision == "float16" else None)


def _all_finite(results: Dict[str, Dict[str, tf.Tensor]]) -> tf.Tensor:
  """Whether every task's total loss is finite."""
  return tf.reduce_all(tf.stack([tf.math.is_finite(r["total_loss"]) for r in results.values()]))


def _flat_cosines(grads: Dict[str, List[tf.Tensor]]) -> Dict[str, tf.Tensor]:
  """Cosine similarity between every pair of tasks' trunk gradients."""
  out = {}
  for a, b in itertools.combinations(sorted(grads), 2):
    dot = tf.add_n([tf.reduce_sum(tf.cast(x, tf.float32) * tf.cast(y, tf.float32))
                    for x, y in zip(grads[a], grads[b])])
    na = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(tf.cast(x, tf.float32))) for x in grads[a]]))
    nb = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(tf.cast(y, tf.float32))) for y in grads[b]]))
    out[f"{a}_vs_{b}"] = dot / tf.maximum(na * nb, 1e-12)
  return out


class Trainer:
  """Builds the multi-task model, its per-task optimizers, input pipelines and checkpoints."""

  def __init__(self, model_dir: str, tasks: Dict[str, Task], trunk_config: dict, config: TrainConfig,
               data: Dict[str, str], tfds_data_dir: Optional[str] = None,
               lasso_l1: Optional[float] = None, run_config_extra: Optional[dict] = None,
               strategy: Optional[tf.distribute.Strategy] = None):
    """Args:
      model_dir: run directory (checkpoints, run_config.json, TensorBoard logs).
      tasks: name -> Task, in the order the step processes them.
      trunk_config: kwargs of `tf_mtssl.model.trunk.build_trunk`.
      config: TrainConfig.
      data: task name -> source spec.
      lasso_l1: None for the naive model, else the L1 weight of the lasso alphas (paper_spec 5).
      run_config_extra: more entries recorded in run_config.json (e.g. the binary's flags).
      strategy: defaults to `tf.distribute.get_strategy()`.
    """
    if not tasks:
      raise ValueError("At least one task is needed")
    missing = [t for t in tasks if t not in data]
    if missing:
      raise ValueError(f"No data source given for tasks {missing}")
    extra = sorted(set(config.task_batch_sizes) - set(tasks))
    if extra:
      raise ValueError(f"Batch sizes given for tasks not trained: {extra} (training {list(tasks)})")
    self.model_dir, self.tasks, self.config, self.data = model_dir, dict(tasks), config, dict(data)
    self.tfds_data_dir = tfds_data_dir
    self.strategy = strategy or tf.distribute.get_strategy()
    replicas = self.strategy.num_replicas_in_sync
    indivisible = {n: config.batch_size_for(n) for n in tasks if config.batch_size_for(n) % replicas}
    if indivisible:
      raise ValueError(f"Global batch sizes {indivisible} are not divisible by the {replicas} replicas "
                       "in sync; use a multiple of the number of replicas.")
    self.multi_worker = distribute.is_multi_worker(self.strategy)
    self.chief = distribute.is_chief(self.strategy)
    if self.chief:  # fail at once, before the slow start-up, if another process holds model_dir
      run_lock.RunLock(model_dir).check_free()
    self.preempted = False  # set by train() when a signal stopped it after saving a checkpoint
    self.write_dir = model_dir if self.chief else os.path.join(
        model_dir, ".worker_tmp", distribute.worker_name(self.strategy))
    self.run_config = {
        "trunk": dict(trunk_config), "tasks": list(self.tasks),
        "task_options": {n: dataclasses.asdict(t.options) for n, t in self.tasks.items()},
        "image_size": next(iter(self.tasks.values())).image_size,
        "harmonize": next(iter(self.tasks.values())).harmonize,
        "lasso": lasso_l1, "data": self.data, "train": dataclasses.asdict(config),
        # The tasks feed the trunk VGG-normalised RGB (paper_spec 2.2); consumers read it from here.
        checkpoints.PREPROCESSING_KEY: preprocessing.DEFAULT_CONVENTION,
        **(run_config_extra or {}),
    }
    checkpoints.check_compatible(model_dir, self.run_config)

    keras.utils.set_random_seed(config.seed)
    with self.strategy.scope(), _dtype_policy(MIXED_PRECISION_POLICIES[config.mixed_precision]):
      self.model = MultiTaskModel(self.tasks, trunk_config, lasso_l1=lasso_l1)
      # float16 gets a dynamic loss scale per task; bfloat16 has float32's range and needs none.
      self.optimizer = make_optimizer(config, self.model)
      self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step",
                              aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    items = dict(step=self.step, trunk=self.model.trunk, heads=self.model.heads, optimizer=self.optimizer)
    if self.model.lasso is not None:
      items["lasso"] = self.model.lasso
    self.checkpoint = tf.train.Checkpoint(**items)
    self.manager = tf.train.CheckpointManager(self.checkpoint, self.write_dir,
                                              max_to_keep=config.keep_checkpoints)
    self.jit_compile = resolve_jit_compile(config.jit_compile)
    self._loop_fns, self._step_fns, self._gradient_fns = {}, {}, {}
    self._sync_fn = None

  # ---- checkpoints ---------------------------------------------------------------------------------
  def restore_latest(self) -> int:
    """Restores the newest readable checkpoint of model_dir, if any; returns the step to resume from.

    Damaged newer checkpoints (e.g. a truncated .data file) are named in a warning and skipped
    (`checkpoints.read_checkpoint`); they are left in place.
    """
    def read(prefix):
      try:
        self.checkpoint.read(prefix).assert_existing_objects_matched()
      except (AssertionError, ValueError, tf.errors.InvalidArgumentError) as e:
        raise ValueError(f"Checkpoint {prefix} does not fit the model being built ({e}); it was left "
                         "untouched. Use another --model_dir.") from e

    restored = checkpoints.read_checkpoint(read, self.model_dir)
    if restored is None:
      return 0
    log.info("Restored %s (step %d)", restored, int(self.step.numpy()))
    return int(self.step.numpy())

  def check_inputs(self) -> None:
    """Reads one batch of every task's source and writes nothing.

    Raises FileNotFoundError/ValueError with a one-line message naming the task and the problem: a
    missing path, data the task cannot read, or a source of which nothing is readable (found after
    one pass over it, `sources.shuffle_repeat_decode`).
    """
    replicas = self.strategy.num_replicas_in_sync
    log.info("Reading one batch of every task's data (%s) before anything is written to %s",
             ", ".join(f"{n}: {d}" for n, d in self.data.items()), self.model_dir)
    for name, task in self.tasks.items():
      spec = self.data[name]
      try:
        batch = task.build_dataset(spec, self.config.batch_size_for(name) // replicas, seed=self.config.seed,
                                   tfds_data_dir=self.tfds_data_dir)
        next(iter(batch))
      except tf.errors.OpError as e:
        message = sources.unreadable_source_message(e) or checkpoints.first_line(e)
        raise ValueError(f"Task {name} cannot read its data ({spec}): {message}") from None
      except StopIteration:
        raise ValueError(f"Task {name}: its data ({spec}) gives no batch of "
                         f"{self.config.batch_size_for(name) // replicas} examples") from None

  def save(self) -> Optional[str]:
    """Saves at the current step (every worker must call it; only the chief's lands in model_dir)."""
    self.sync_moving_statistics()
    path = self.manager.save(checkpoint_number=self.step)
    return path if self.chief else None

  def sync_moving_statistics(self) -> None:
    """Sets every replica's batch-norm moving statistics to their mean over replicas.

    Keras creates them with aggregation "none", so each replica updates its own copy from its own
    batches and the copies drift apart (trainable weights and optimizer states do not: they get the
    all-reduced gradient). The moving averages are linear in the batch statistics, so averaging the
    copies now equals averaging the batch statistics at every step; doing it before each checkpoint
    makes the checkpoint hold statistics of every worker's data and all replicas identical again.
    """
    if self.strategy.num_replicas_in_sync == 1:
      return
    if self._sync_fn is None:
      models = [self.model.trunk, *self.model.heads.values()] + (
          [self.model.lasso] if self.model.lasso is not None else [])
      variables = [v for m in models for v in m.non_trainable_variables if "float" in str(v.dtype)]

      @tf.function
      def sync():
        def replica_fn():
          means = tf.distribute.get_replica_context().all_reduce(
              tf.distribute.ReduceOp.MEAN, [tf.identity(v.value) for v in variables])
          for variable, mean in zip(variables, means):
            variable.assign(mean)  # aggregation "none": this replica's own copy
        self.strategy.run(replica_fn)

      self._sync_fn = sync
    self._sync_fn()

  def weights_fingerprint(self) -> str:
    """SHA-256 of trunk, heads, lasso and the per-task optimizer states (this process's first replica).

    Equal on every worker of a synchronous run; equal to the fingerprint of a Trainer that restored
    this run's final checkpoint.
    """
    variables = list(self.model.trunk.weights) + list(self.optimizer.variables)
    for name in sorted(self.tasks):
      variables += list(self.model.heads[name].weights)
    if self.model.lasso is not None:
      variables += list(self.model.lasso.weights)
    return checkpoints.fingerprint(variables)

  def _check_workers_agree(self, start: int) -> None:
    """Raises unless every worker restored the same step (one all-reduce of (step, step^2))."""
    if not self.multi_worker:
      return
    total, total_sq = self._sum_over_workers(tf.constant([start, start * start], tf.float64)).numpy()
    workers = self.strategy.num_replicas_in_sync // len(self.strategy.extended.worker_devices)
    if total * total != workers * total_sq:  # Cauchy-Schwarz: equal iff all equal; same verdict everywhere
      raise ValueError(
          f"Workers resumed from different steps (this one, {distribute.worker_name(self.strategy)}, from step {start}; "
          f"mean {total / workers:g}). Every worker must read the chief's --model_dir (this one reads "
          f"{self.model_dir}): on several machines put it on a shared file system.")

  # ---- input ---------------------------------------------------------------------------------------
  def data_seed(self, start: int) -> int:
    """Seed of the input pipelines of a run (re)started at step `start`: the input position is not
    checkpointed, so a resumed run reads a new, reproducible random stream."""
    return self.config.seed * 1_000_003 + start

  def make_iterators(self, seed: int) -> Dict[str, object]:
    """Task -> iterator over its distributed input pipeline (per-replica batches), seeded by `seed`."""
    return {name: iter(ds) for name, ds in self.distributed_datasets(seed).items()}

  def distributed_datasets(self, seed: int):
    """Task -> its input pipeline distributed over the strategy's replicas (sharded per worker)."""
    datasets = {}
    for name, task in self.tasks.items():
      def dataset_fn(ctx, task=task, name=name):
        per_replica = ctx.get_per_replica_batch_size(self.config.batch_size_for(name))
        return task.build_dataset(self.data[name], per_replica, seed=seed, tfds_data_dir=self.tfds_data_dir,
                                  input_context=ctx)
      datasets[name] = self.strategy.distribute_datasets_from_function(dataset_fn)
    return datasets

  # ---- the step ------------------------------------------------------------------------------------
  def _replica_gradients(self, batches, with_cosines: bool):
    """One replica's forward and backward pass of every task (all at the same weights, paper_spec 4):
    gradients, per-task results and (optionally) the task-gradient cosines. No communication, so XLA
    can compile it whole (--jit_compile)."""
    replicas = tf.distribute.get_replica_context().num_replicas_in_sync
    grads, results, trunk_grads = {}, {}, {}
    num_trunk = len(self.optimizer.shared)
    for name, task in self.tasks.items():
      batch = batches[name]
      with tf.GradientTape() as tape:
        predictions = self.model.predictions(name, batch, training=True)
        loss, metrics = task.loss_and_metrics(batch, predictions)
        total = tf.cast(loss, tf.float32) + self.model.regularization_loss(name)
        # Divided by the replicas: the all-reduced SUM of the gradients is the global-batch mean's.
        scaled = self.optimizer.scale_loss(name, total / replicas)  # unscaled again in apply
      grads[name] = tape.gradient(scaled, self.optimizer.variables_of(name))
      trunk_grads[name] = grads[name][:num_trunk]
      results[name] = {"loss": loss, **metrics, "total_loss": total,
                       NUM_CORRUPT_KEY: tf.reduce_max(batch[NUM_CORRUPT_KEY])}
    cosines = _flat_cosines(trunk_grads) if with_cosines and len(self.tasks) > 1 else {}
    return grads, results, cosines

  def _gradient_fn(self, with_cosines: bool):
    if with_cosines not in self._gradient_fns:
      fn = functools.partial(self._replica_gradients, with_cosines=with_cosines)
      self._gradient_fns[with_cosines] = tf.function(fn, jit_compile=True, autograph=False) if self.jit_compile else fn
    return self._gradient_fns[with_cosines]

  def _replica_step(self, batches, with_cosines: bool):
    grads, results, cosines = self._gradient_fn(with_cosines)(batches)
    for name, norms in self.optimizer.apply(grads).items():
      results[name].update(norms)
    return results, cosines

  def _distributed_step(self, iterators, with_cosines: bool):
    """One training step on every replica (inside a tf.function): reduced metrics and cosines."""
    batches = {name: next(it) for name, it in iterators.items()}
    results, cosines = self.strategy.run(self._replica_step, args=(batches, with_cosines))

    def reduce(key, value):
      if key == NUM_CORRUPT_KEY:
        # Cumulative count of each worker's pipeline: the latest (max) over this worker's replicas,
        # summed over the workers' disjoint shards.
        local = tf.reduce_max(tf.stack(self.strategy.experimental_local_results(value)))
        return self._sum_over_workers(tf.cast(local, tf.float64))
      return self.strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)

    reduced = {n: {k: reduce(k, v) for k, v in r.items()} for n, r in results.items()}
    cos = {k: self.strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None) for k, v in cosines.items()}
    self.step.assign_add(1)
    return reduced, cos

  def _step_fn(self, with_cosines: bool):
    """The distributed step as its own tf.function: traced once, called by every loop that runs it.
    Without AutoGraph: the step has no tensor-dependent Python control flow (one would fail loudly at
    trace time), and converting its call tree cost ~1.7 s of every process's first step."""
    if with_cosines not in self._step_fns:
      self._step_fns[with_cosines] = tf.function(functools.partial(self._distributed_step, with_cosines=with_cosines),
                                                  autograph=False)
    return self._step_fns[with_cosines]

  def run_steps(self, iterators, num_steps: int = 1, with_cosines: bool = False, stop: bool = False) -> LoopResult:
    """Runs `num_steps` training steps in one tf.function call (SimCLR's train_multiple_steps): the
    host does not wait on the device between them. Stops early after the first step whose loss is not
    finite (`first_bad_step`). Cosines, when asked for, are those of the last step.

    `stop` is this process's signal flag; `stop_votes` comes from one all-reduce per call, so every
    worker takes the same decision after the same call. Every worker must call with the same arguments.
    """
    if num_steps < 1:
      raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if with_cosines not in self._loop_fns:
      @tf.function
      def loop(iterators, num_steps, stop):
        first_bad = tf.constant(0, tf.int64)
        done = tf.constant(0, tf.int64)
        for _ in tf.range(num_steps - 1):
          results, _ = self._step_fn(False)(iterators)
          done += 1
          if not _all_finite(results):
            first_bad = done
            break
        # The last step (cosines are measured there) also runs after a bad step; nothing of it is kept.
        results, cosines = self._step_fn(with_cosines)(iterators)
        done += 1
        if tf.logical_and(tf.equal(first_bad, 0), tf.logical_not(_all_finite(results))):
          first_bad = done
        return results, cosines, done, first_bad, self._sum_over_workers(stop)
      self._loop_fns[with_cosines] = loop
    return LoopResult(*self._loop_fns[with_cosines](iterators, tf.constant(num_steps, tf.int64),
                                                    tf.constant(float(stop), tf.float32)))

  def _sum_over_workers(self, local: tf.Tensor) -> tf.Tensor:
    """Sum over the worker processes of a per-process value (each counted once): one all-reduce under
    several workers, the value itself otherwise; the same result on every worker."""
    if not self.multi_worker:
      return local
    per_worker = len(self.strategy.extended.worker_devices)
    values = self.strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.identity(local) if ctx.replica_id_in_sync_group % per_worker == 0 else tf.zeros_like(local))
    return self.strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None)

  def steps_until_host_work(self, step: int) -> int:
    """Steps the next `run_steps` call runs from `step`: up to steps_per_loop, ending at the first step
    after which the host logs, saves, writes images or cosines, or starts/stops the profiler."""
    cfg = self.config
    every = [n for n in (cfg.log_every, cfg.checkpoint_every, cfg.image_summary_every, cfg.grad_cosine_every) if n]
    marks = {cfg.train_steps}
    if cfg.profile_steps:
      marks |= {cfg.profile_steps[0] - 1, cfg.profile_steps[1]}
    for end in range(step + 1, step + cfg.steps_per_loop):
      if end in marks or any(end % n == 0 for n in every):
        return end - step
    return min(cfg.steps_per_loop, cfg.train_steps - step)

  # ---- summaries -----------------------------------------------------------------------------------
  def _write_images(self, image_iterators, step):
    for name, task in self.tasks.items():
      batch = next(image_iterators[name])
      images = task.summary_images(batch, self.model.predictions(name, batch, training=False))
      for key, value in images.items():
        tf.summary.image(f"{name}/{key}", value, step=step, max_outputs=4)
    if self.model.lasso is not None:
      tf.summary.image("lasso/alpha", self.model.lasso.alpha_image()[None], step=step)

  # ---- main loop -----------------------------------------------------------------------------------
  def train(self) -> Dict[str, Dict[str, float]]:
    """Trains to `train_steps` (resuming from the newest checkpoint); returns the last metrics.

    Returns early, with `self.preempted` set and a checkpoint saved, on SIGTERM/SIGINT.
    Raises FloatingPointError on a non-finite loss (nothing saved for that step).
    """
    try:
      return self._train()
    except (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
            tf.errors.DeadlineExceededError) as e:
      if not self.multi_worker:
        raise
      # A peer crashed or was killed: its connection drops, or the coordination service stops
      # receiving its heartbeats and aborts everyone's collectives (seconds, not a hang).
      what = distribute.describe_peer_failure(e, self.strategy.cluster_resolver.cluster_spec().as_dict())
      raise distribute.ClusterError(
          f"{distribute.worker_name(self.strategy)} lost contact with the other workers ({what}). "
          "Restart every worker with the same command: they resume from the newest checkpoint, "
          f"{tf.train.latest_checkpoint(self.model_dir)}.") from e
    finally:
      if not self.chief:  # the worker's checkpoints and summaries only existed for the collectives
        shutil.rmtree(self.write_dir, ignore_errors=True)
        try:
          os.rmdir(os.path.dirname(self.write_dir))  # .worker_tmp, once the last worker is done
        except OSError:
          pass

  def _train(self) -> Dict[str, Dict[str, float]]:
    # The signal handling covers the input check too: a starved source must not make it deaf.
    with preemption.StopRequest(self.config.stop_grace_s, self._describe_resume) as stop:
      self.check_inputs()  # before anything is written to model_dir
      stop.phase = "starting"
      with self._holding_model_dir(stop):
        return self._run(stop)

  def _describe_resume(self) -> str:
    latest = tf.train.latest_checkpoint(self.model_dir)
    return f" The restart resumes from {latest}." if latest else " No checkpoint was saved yet."

  @contextlib.contextmanager
  def _holding_model_dir(self, stop: "preemption.StopRequest"):
    """The chief holds model_dir's run lock (`tf_mtssl.runs.lock`); other workers share its directory."""
    if not self.chief:
      yield
      return
    lock = run_lock.RunLock(self.model_dir)
    lock.acquire()
    stop.add_cleanup(lock.release)
    try:
      yield
    finally:
      lock.release()

  def _record_start(self, start: int) -> None:
    changes = checkpoints.record_start(self.model_dir, self.run_config, start)
    if changes:
      log.warning("Starting at step %d with settings changed since the previous start (all starts: "
                  "%s): %s", start, os.path.join(self.model_dir, checkpoints.RUN_CONFIG_HISTORY),
                  "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))

  def _run(self, stop: "preemption.StopRequest") -> Dict[str, Dict[str, float]]:
    cfg = self.config
    start = self.restore_latest()
    self._check_workers_agree(start)
    if self.chief:
      self._record_start(start)
    if start >= cfg.train_steps:
      log.info("Run already at step %d >= train_steps %d; nothing to do.", start, cfg.train_steps)
      return {}
    data_seed = self.data_seed(start)
    iterators = self.make_iterators(data_seed)
    image_iterators = None
    writer = tf.summary.create_file_writer(os.path.join(self.write_dir, "train"))
    last: Dict[str, Dict[str, float]] = {}
    bar = progress.bar(total=cfg.train_steps, initial=start, enabled=cfg.progress_bar and self.chief)
    tick_time, tick_step = time.time(), start
    step = start
    stop.phase = "training"
    with writer.as_default():
      while step < cfg.train_steps:
        # One call runs up to steps_per_loop steps and ends where the host has work (log, checkpoint,
        # images, cosines, profile): the same schedule on every worker.
        num_steps = self.steps_until_host_work(step)
        end = step + num_steps
        with_cosines = bool(cfg.grad_cosine_every) and len(self.tasks) > 1 and end % cfg.grad_cosine_every == 0
        if cfg.profile_steps and self.chief and step + 1 == cfg.profile_steps[0]:
          tf.profiler.experimental.start(os.path.join(self.write_dir, "train"))
        call_start, traced = time.time(), with_cosines in self._loop_fns
        out = self.run_steps(iterators, num_steps, with_cosines, stop=stop.requested)
        first_bad = int(out.first_bad_step)  # the call's one host sync (the rest are log-step reads)
        if traced:  # a call that traced its function is no measure of how long steps take
          stop.step_done(time.time() - call_start)
        if first_bad:
          losses = {n: float(r["total_loss"]) for n, r in out.metrics.items()}
          raise FloatingPointError(
              f"Non-finite loss at step {step + first_bad}" + (f": {losses}" if first_bad == num_steps else "")
              + f". Stopping without saving; the last good checkpoint is kept: "
              f"{tf.train.latest_checkpoint(self.model_dir)}")
        if cfg.profile_steps and self.chief and end == cfg.profile_steps[1]:
          tf.profiler.experimental.stop()  # TensorBoard's Profile tab, beside the scalars
          log.info("Wrote a profile of steps %d-%d to %s", *cfg.profile_steps, os.path.join(self.write_dir, "train"))
        step = end
        bar.update(num_steps)
        if step % cfg.log_every == 0 or step == cfg.train_steps:
          elapsed = max(time.time() - tick_time, 1e-9)
          steps_per_s = (step - tick_step) / elapsed
          last = {n: {k: float(v) for k, v in r.items()} for n, r in out.metrics.items()}
          for n, r in last.items():
            for k, v in r.items():
              tf.summary.scalar(f"{n}/{k}", v, step=step)
            tf.summary.scalar(f"{n}/learning_rate", float(self.optimizer.current_learning_rate()), step=step)
            tf.summary.scalar(f"{n}/examples_per_second", steps_per_s * cfg.batch_size_for(n), step=step)
          tf.summary.scalar("steps_per_second", steps_per_s, step=step)
          bar.set_postfix({n: f"{r['loss']:.3f}" for n, r in last.items()}, refresh=False)
          tick_time, tick_step = time.time(), step
        for k, v in out.cosines.items():
          tf.summary.scalar(f"grad_cosine/{k}", float(v), step=step)
        if self.chief and cfg.image_summary_every and (step % cfg.image_summary_every == 0 or step == cfg.train_steps):
          if image_iterators is None:
            image_iterators = {n: iter(t.build_dataset(self.data[n], 2, seed=data_seed + 1,
                                                       tfds_data_dir=self.tfds_data_dir))
                               for n, t in self.tasks.items()}
          self._write_images(image_iterators, step)
        # Every worker got the same votes from the call's all-reduce: all save and stop together.
        stopping = float(out.stop_votes) > 0
        if step % cfg.checkpoint_every == 0 or step == cfg.train_steps or stopping:
          stop.phase = "saving"  # the signal watcher lets a checkpoint being written finish
          self.save()
          if not stopping:
            stop.phase = "training"
        if stopping:
          self.preempted = True
          log.warning("Stopped at step %d on a signal (checkpoint saved); resume by running the same "
                      "command.", step)
          break
    bar.close()
    writer.flush()
    return last


def pretrain(run: PretrainConfig, config: TrainConfig, trunk: trunk_lib.TrunkConfig, lasso: lasso_lib.LassoConfig,
             task_options: Dict[str, object]) -> Tuple[Trainer, Dict[str, Dict[str, float]]]:
  """Builds the run's strategy, tasks and Trainer and trains (resuming from `run.model_dir`).

  Returns (trainer, the last logged metrics). The strategy is made first: a multi-worker strategy
  must exist before the TensorFlow runtime starts.
  """
  strategy = distribute.make_strategy(run.distribution, cluster_timeout_s=run.cluster_timeout_s)
  names = task_registry.parse_task_list(run.tasks)
  tasks = {n: task_registry.make_task(n, options=task_options[n], image_size=run.image_size, harmonize=run.harmonize)
           for n in names}
  trainer = Trainer(run.model_dir, tasks, trunk.as_dict(), config, {n: run.data_of(n) for n in names},
                    tfds_data_dir=run.tfds_data_dir, lasso_l1=lasso.l1_at("pretrain"), strategy=strategy)
  return trainer, trainer.train()
