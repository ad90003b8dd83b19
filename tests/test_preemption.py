"""Preemption and restart: SIGTERM (checkpoint, stop, resume to the exact step), SIGKILL (nothing
saved before the kill is lost), and SIGTERM to one of two workers (both stop at the same step).

The non-finite-loss stop (last good checkpoint kept, nothing bad written) is tested in test_train.py.
"""

import logging
import os
import re
import signal
import threading
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from tests.test_distributed import (PRETRAIN, START_TIMEOUT_S, fingerprint, free_ports, processes,
                                    smoke_config)
from tf_mtssl.runs import checkpoints
from tf_mtssl.pretraining import preemption
from tf_mtssl.pretraining import trainer as train


def wait_for(predicate, timeout_s: float, procs=()):
  """Polls until predicate() is true; fails early if one of `procs` has exited."""
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    if predicate():
      return
    dead = [p for p in procs if p.poll() is not None]
    assert not dead, f"process {dead[0].args[:4]} exited with {dead[0].returncode} before the condition"
    time.sleep(0.1)
  raise AssertionError(f"condition not met within {timeout_s} s")


def checkpoint_steps(run) -> list:
  state = tf.train.get_checkpoint_state(str(run))
  return [int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths] if state else []


def assert_readable(run, steps):
  for step in steps:
    trunk = checkpoints.restore_trunk(str(run), f"ckpt-{step}")
    assert all(np.isfinite(w.numpy()).all() for w in trunk.weights), step


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  return helpers.write_photos(tmp_path_factory.mktemp("photos"), size=48)


@pytest.mark.slow
def test_sigterm_saves_stops_and_the_run_resumes_to_the_exact_step(tmp_path, photos):
  run = str(tmp_path / "run")
  config = dict(batch_size=2, checkpoint_every=2, keep_checkpoints=100)
  trainer = train.Trainer(run, {"rp": helpers.tiny_task("rp")}, helpers.TINY_TRUNK,
                          smoke_config(train_steps=100_000, **config), {"rp": photos})

  def terminate_after_first_checkpoint():
    deadline = time.time() + 300
    while time.time() < deadline and not os.path.exists(os.path.join(run, "checkpoint")):
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

  # Outside train() a stray SIGTERM must not end pytest: park it on a handler for the test.
  previous = signal.signal(signal.SIGTERM, lambda *_: None)
  try:
    sender = threading.Thread(target=terminate_after_first_checkpoint, daemon=True)
    sender.start()
    trainer.train()
    sender.join(timeout=30)
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert trainer.preempted
  stopped = int(trainer.step.numpy())
  assert 2 <= stopped < 100_000
  assert tf.train.latest_checkpoint(run).endswith(f"ckpt-{stopped}")  # saved at the stop, not before
  state_at_stop = trainer.weights_fingerprint()

  keras.utils.clear_session()
  resumed = train.Trainer(run, {"rp": helpers.tiny_task("rp")}, helpers.TINY_TRUNK,
                          smoke_config(train_steps=stopped + 2, **config), {"rp": photos})
  assert resumed.restore_latest() == stopped
  assert resumed.weights_fingerprint() == state_at_stop  # weights, BN statistics, RMSProp states
  resumed.train()
  assert not resumed.preempted and int(resumed.step.numpy()) == stopped + 2
  assert stopped in checkpoint_steps(run) and checkpoint_steps(run)[-1] == stopped + 2


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_loses_nothing_and_the_restart_ends_at_the_requested_step(tmp_path, photos, caplog):
  run = str(tmp_path / "run")
  settings = dict(batch_size=2, checkpoint_every=2, keep_checkpoints=1000)  # the binary's, then the restart's
  flags = [f"--data={photos}", f"--model_dir={run}", *(f"--{k}={v}" for k, v in settings.items())]
  with processes(tmp_path / "logs") as procs:
    first = procs.start(PRETRAIN + flags + ["--train_steps=100000"], "first")
    wait_for(lambda: len(checkpoint_steps(run)) >= 2, START_TIMEOUT_S, [first])
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait(timeout=30) == -signal.SIGKILL
  saved = checkpoint_steps(run)
  assert_readable(run, saved)
  last = saved[-1]

  # The restart, in this process (the restore is the Trainer's; the binary adds only flag parsing, tested
  # by the first process): it resumes from the newest checkpoint the killed one left.
  with caplog.at_level(logging.INFO):
    restarted = train.Trainer(run, {"rp": helpers.tiny_task("rp")}, helpers.TINY_TRUNK,
                              smoke_config(train_steps=last + 3, **settings), {"rp": photos})
    restarted.train()
  assert f"Restored {run}/ckpt-{last} (step {last})" in caplog.text, caplog.text[-3000:]
  assert int(restarted.step.numpy()) == last + 3
  assert checkpoint_steps(run)[:len(saved)] == saved and checkpoint_steps(run)[-1] == last + 3
  assert_readable(run, saved + [last + 3])


@pytest.mark.slow
def test_sigterm_to_one_of_two_workers_stops_both_at_one_step_with_its_checkpoint(tmp_path, photos):
  """Neither worker waits on the other: both save at the same step and exit with the restart code.
  (Two workers resuming a checkpoint: test_distributed.py.)"""
  run = str(tmp_path / "run")
  flags = [f"--data={photos}", f"--model_dir={run}", "--batch_size=4", "--checkpoint_every=2",
           "--keep_checkpoints=1000", "--cluster_timeout_s=120", "--train_steps=100000"]
  with processes(tmp_path / "logs") as procs:
    workers = procs.start_workers(free_ports(2), flags)
    wait_for(lambda: checkpoint_steps(run), 2 * START_TIMEOUT_S, workers)
    os.kill(workers[1].pid, signal.SIGTERM)  # the non-chief: the chief must learn of it and save
    rcs = procs.wait(workers, 120)
    logs = [procs.log(w) for w in workers]
  assert rcs == [preemption.PREEMPTED_EXIT_CODE] * 2, "\n".join(log[-3000:] for log in logs)
  stops = {int(m) for log in logs for m in re.findall(r"Stopped at step (\d+) by a signal", log)}
  assert len(stops) == 1, stops  # one agreed step
  stopped = stops.pop()
  assert checkpoint_steps(run)[-1] == stopped
  assert not os.path.exists(os.path.join(run, ".worker_tmp"))
  assert fingerprint(logs[0]) == fingerprint(logs[1])
  restored = train.Trainer(run, {"rp": helpers.tiny_task("rp")}, helpers.TINY_TRUNK, smoke_config(),
                           {"rp": photos})
  assert restored.restore_latest() == stopped
  assert restored.weights_fingerprint() == fingerprint(logs[0])  # the state both workers stopped in
