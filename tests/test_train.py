import os

import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from tf_mtssl import tasks as task_registry
from tf_mtssl.runs import checkpoints
from tf_mtssl.pretraining import trainer as train

TINY_TRUNK = helpers.TINY_TRUNK
MULTI_TASKS = task_registry.registered_tasks()


def make_trainer(model_dir, data, tasks=("rp",), **overrides):
  """A tiny Trainer. No image summaries unless asked for: they are a forward pass of every task after
  training (a third of a short run's time), and the four-task run of test_combination checks them."""
  config = train.TrainConfig(**{**dict(train_steps=4, batch_size=2, learning_rate=1e-3, warmup_steps=1,
                                       log_every=2, checkpoint_every=2,
                                       image_summary_every=0, grad_cosine_every=2, progress_bar=False),
                                **overrides})
  task_objs = {n: helpers.tiny_task(n) for n in tasks}
  sources = {n: "embedded" if n == "ms" else data for n in tasks}  # ms reads motion-mask records
  return train.Trainer(str(model_dir), task_objs, TINY_TRUNK, config, sources)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  return helpers.write_photos_with_prior(tmp_path_factory.mktemp("photos"), size=96)


def fixed_iterators(trainer, seed=0):
  """One fixed batch per task, repeated forever (for overfitting)."""
  out = {}
  for name, task in trainer.tasks.items():
    batch = next(iter(task.build_dataset(trainer.data[name], trainer.config.batch_size, seed=seed)))
    out[name] = iter(trainer.strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors(batch).repeat()))
  return out


@pytest.mark.slow
def test_multi_task_loss_falls_when_overfitting_one_batch(tmp_path, photos):
  trainer = make_trainer(tmp_path / "run", photos, tasks=MULTI_TASKS, learning_rate=1e-3)
  iterators = fixed_iterators(trainer)
  losses = [{n: float(r["loss"]) for n, r in trainer.run_steps(iterators).metrics.items()} for _ in range(30)]
  for name in MULTI_TASKS:
    curve = np.array([l[name] for l in losses])
    assert np.isfinite(curve).all()
    assert curve[-3:].mean() < 0.7 * curve[:3].mean(), (name, curve)


def test_one_rmsprop_state_per_task_and_heads_only_updated_by_their_task(tmp_path, photos):
  trainer = make_trainer(tmp_path / "run", photos, tasks=("rp", "col"))
  opt = trainer.optimizer
  assert opt.task_names == ["rp", "col"]
  trunk = {id(v.value) for v in trainer.model.trunk.trainable_variables}
  for name in ("rp", "col"):
    trained = {id(v) for v in opt.variables_of(name)}
    assert trunk <= trained
    assert {id(v.value) for v in trainer.model.heads[name].trainable_variables} <= trained
    other = "col" if name == "rp" else "rp"
    assert not {id(v.value) for v in trainer.model.heads[other].trainable_variables} & trained
    # One second-moment slot per variable the task trains, distinct from the other task's.
    assert len(opt.velocity[name]) == len(opt.variables_of(name))
  assert not {id(v) for v in opt.velocity["rp"]} & {id(v) for v in opt.velocity["col"]}


@pytest.mark.slow
def test_resume_from_checkpoint_to_the_same_step(tmp_path, photos):
  run = tmp_path / "run"
  first = make_trainer(run, photos, train_steps=4)
  first.train()
  assert tf.train.latest_checkpoint(str(run)).endswith("ckpt-4")
  saved = [v.numpy().copy() for v in first.model.trunk.weights]
  saved_opt = [v.numpy().copy() for v in first.optimizer.variables]
  second = make_trainer(run, photos, train_steps=6)
  assert second.restore_latest() == 4
  for a, b in zip(saved, second.model.trunk.weights):
    np.testing.assert_array_equal(a, b.numpy())
  for a, b in zip(saved_opt, second.optimizer.variables):
    np.testing.assert_array_equal(a, b.numpy())
  second.train()
  assert int(second.step.numpy()) == 6
  assert tf.train.latest_checkpoint(str(run)).endswith("ckpt-6")
  assert checkpoints.load_run_config(str(run))["trunk"] == TINY_TRUNK


@pytest.mark.slow
def test_checkpoint_of_another_architecture_is_refused_and_left_untouched(tmp_path, photos):
  run = tmp_path / "run"
  make_trainer(run, photos, train_steps=2).train()
  before = {f: os.path.getmtime(run / f) for f in os.listdir(run) if f.startswith("ckpt")}
  with pytest.raises(ValueError, match="another architecture"):
    config = train.TrainConfig(train_steps=4, batch_size=2, progress_bar=False)
    train.Trainer(str(run), {"rp": helpers.tiny_task("rp")}, dict(TINY_TRUNK, depth=26), config,
                  {"rp": photos})
  assert before == {f: os.path.getmtime(run / f) for f in os.listdir(run) if f.startswith("ckpt")}


@pytest.mark.slow
def test_restore_trunk_by_name_from_a_run(tmp_path, photos):
  run = tmp_path / "run"
  trainer = make_trainer(run, photos, train_steps=2)
  trainer.train()
  trunk = checkpoints.restore_trunk(str(run))
  for a, b in zip(trainer.model.trunk.weights, trunk.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  # Relative run directories: latest_checkpoint's prefix ("run/ckpt-2") is used as given.
  cwd = os.getcwd()
  os.chdir(tmp_path)
  try:
    assert checkpoints.resolve_checkpoint("run", tf.train.latest_checkpoint("run")) == os.path.join("run", "ckpt-2")
    assert checkpoints.resolve_checkpoint("run", "ckpt-2") == os.path.join("run", "ckpt-2")
    checkpoints.restore_trunk("run")
  finally:
    os.chdir(cwd)
  os.makedirs(tmp_path / "empty")
  checkpoints.save_run_config(str(tmp_path / "empty"), checkpoints.load_run_config(str(run)))
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    checkpoints.restore_trunk(str(tmp_path / "empty"))


class _NaNAfter(type(helpers.tiny_task("rp"))):
  """rp whose loss becomes NaN from its `first_bad_call`-th computation on (4th by default)."""

  def __init__(self, *args, first_bad_call=4, **kwargs):
    super().__init__(*args, **kwargs)
    self.calls = tf.Variable(0, trainable=False)
    self.first_bad_call = first_bad_call

  def loss_and_metrics(self, batch, predictions):
    loss, metrics = super().loss_and_metrics(batch, predictions)
    self.calls.assign_add(1)
    return tf.where(self.calls >= self.first_bad_call, tf.constant(np.nan, tf.float32), loss), metrics


@pytest.mark.slow
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, photos):
  run = tmp_path / "run"
  config = train.TrainConfig(train_steps=10, batch_size=2, learning_rate=1e-3, log_every=1, checkpoint_every=2,
                             image_summary_every=0, progress_bar=False)
  base = helpers.tiny_task("rp")
  task = _NaNAfter(options=base.options, image_size=base.image_size)
  trainer = train.Trainer(str(run), {"rp": task}, TINY_TRUNK, config, {"rp": photos})
  with pytest.raises(FloatingPointError, match="Non-finite loss at step 4"):
    trainer.train()
  assert tf.train.latest_checkpoint(str(run)).endswith("ckpt-2")
  trunk = checkpoints.restore_trunk(str(run))
  assert all(np.isfinite(w.numpy()).all() for w in trunk.weights)


@pytest.mark.slow
def test_several_steps_in_one_call_equal_one_step_per_call(tmp_path, photos):
  # One trainer, so one traced loop (the step count is a tensor): 4 steps in one call from the initial
  # state, then the initial state restored (weights, RMSProp states, step) and 4 calls of one step.
  trainer = make_trainer(tmp_path / "run", photos)
  iterators = fixed_iterators(trainer)
  state = trainer.model.trunk.weights + list(trainer.optimizer.variables)
  initial = trainer.checkpoint.write(str(tmp_path / "initial" / "ckpt"))
  start = [v.numpy().copy() for v in state]
  runs = {}
  for name, calls in (("one_call", [4]), ("four_calls", [1, 1, 1, 1])):
    if name == "four_calls":
      trainer.checkpoint.read(initial).assert_existing_objects_matched()
      for a, b in zip(start, state):
        np.testing.assert_array_equal(a, b.numpy())  # the restore is complete: same starting point
    for n in calls:
      out = trainer.run_steps(iterators, num_steps=n)
      assert int(out.steps_run) == n and int(out.first_bad_step) == 0
    runs[name] = (float(out.metrics["rp"]["loss"]), [v.numpy() for v in trainer.model.trunk.weights],
                  int(trainer.step.numpy()))
  (loss_a, weights_a, step_a), (loss_b, weights_b, step_b) = runs["one_call"], runs["four_calls"]
  assert step_a == step_b == 4
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  for a, b in zip(weights_a, weights_b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())
  assert any(not np.array_equal(a, b) for a, b in zip(start[:len(weights_a)], weights_a))  # steps changed the trunk


def test_calls_end_where_the_host_has_work(tmp_path, photos):
  trainer = make_trainer(tmp_path / "run", photos, train_steps=32, log_every=10, checkpoint_every=25,
                         image_summary_every=0, grad_cosine_every=0, steps_per_loop=8)
  ends, step = [], 0
  while step < 32:
    step += trainer.steps_until_host_work(step)
    ends.append(step)
  assert ends == [8, 10, 18, 20, 25, 30, 32]


@pytest.mark.slow
def test_nan_loss_inside_a_multi_step_call_stops_at_that_step(tmp_path, photos):
  run = tmp_path / "run"
  config = train.TrainConfig(train_steps=10, batch_size=2, learning_rate=1e-3, log_every=10, checkpoint_every=5,
                             image_summary_every=0, grad_cosine_every=0, steps_per_loop=10, progress_bar=False)
  base = helpers.tiny_task("rp")
  task = _NaNAfter(options=base.options, image_size=base.image_size, first_bad_call=7)
  trainer = train.Trainer(str(run), {"rp": task}, TINY_TRUNK, config, {"rp": photos})
  with pytest.raises(FloatingPointError, match="Non-finite loss at step 7"):
    trainer.train()  # calls: steps 1-5, then 6-10 (the NaN is its 2nd step)
  assert tf.train.latest_checkpoint(str(run)).endswith("ckpt-5")


@pytest.mark.slow
def test_xla_compiled_steps_give_the_same_losses(tmp_path, photos):
  losses = {}
  for mode in ("off", "on"):
    trainer = make_trainer(tmp_path / mode, photos, tasks=("rp", "col"), jit_compile=mode)
    assert trainer.jit_compile == (mode == "on")
    iterators = fixed_iterators(trainer)
    losses[mode] = [{n: float(r["loss"]) for n, r in trainer.run_steps(iterators).metrics.items()}
                    for _ in range(3)]
  for off, on in zip(losses["off"], losses["on"]):
    for name in off:
      np.testing.assert_allclose(on[name], off[name], rtol=1e-3)


def test_jit_compile_auto_is_off_without_a_gpu():
  assert train.resolve_jit_compile("auto") == bool(tf.config.list_logical_devices("GPU"))
  with pytest.raises(ValueError, match="jit_compile"):
    train.TrainConfig(jit_compile="yes")
