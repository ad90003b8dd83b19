"""Distributed pretraining: MirroredStrategy over 2 logical CPUs, 2 worker processes under
MultiWorkerMirroredStrategy on 127.0.0.1, and a worker whose peer never starts.

Every worker process is started with a timeout and killed by PID (SIGKILL: during start-up TF's own
SIGTERM notifier swallows SIGTERM) in a finally block. The processes share the machine's 2 cores, so
the trunk is tiny (flags/smoke.cfg: depth 14, base width 8, rp with 32-px patches, 48-px photos) and
runs 2-3 steps. Tests that start processes are marked slow (still run by default).
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from typing import Dict, List, Optional, Sequence

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from tf_mtssl.runs import checkpoints
from tf_mtssl.pretraining import distribution as distribute
from tf_mtssl.pretraining import trainer as train

PRETRAIN = [sys.executable, "-m", "tf_mtssl.pretrain", f"--flagfile={helpers.SMOKE_CFG}",
            "--image_summary_every=0", "--grad_cosine_every=0", "--progress_bar=false", "--log_every=1"]
START_TIMEOUT_S = 240  # one process: imports + tracing on a loaded 2-core machine, with margin


# ---- shared by the multi-process tests (also used by test_preemption.py) -------------------------
free_ports = distribute.free_local_ports


def tf_config(ports: Sequence[int], index: int) -> str:
  return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                     "task": {"type": "worker", "index": index}})


class Processes:
  """Started processes with their logs; any still alive on exit is SIGKILLed by PID."""

  def __init__(self, log_dir):
    self.log_dir, self.procs, self.logs = str(log_dir), [], []

  def start(self, args: List[str], name: str, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    os.makedirs(self.log_dir, exist_ok=True)
    log_path = os.path.join(self.log_dir, f"{name}.log")
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    with open(log_path, "w") as log:
      proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=helpers.REPO_ROOT)
    self.procs.append(proc)
    self.logs.append(log_path)
    return proc

  def start_workers(self, ports: Sequence[int], flags: List[str], tag: str = "worker") -> List[subprocess.Popen]:
    return [self.start(PRETRAIN + ["--distribution=multi_worker", *flags], f"{tag}{i}",
                       env={"TF_CONFIG": tf_config(ports, i)}) for i in range(len(ports))]

  def log(self, proc: subprocess.Popen) -> str:
    with open(self.logs[self.procs.index(proc)]) as f:
      return f.read()

  def wait(self, procs: Sequence[subprocess.Popen], timeout_s: float) -> List[int]:
    """Return codes; fails with the logs' tails if any process is still running at the deadline."""
    deadline = time.time() + timeout_s
    for proc in procs:
      try:
        proc.wait(timeout=max(deadline - time.time(), 0.1))
      except subprocess.TimeoutExpired:
        tails = "\n".join(f"--- {self.logs[self.procs.index(p)]}\n{self.log(p)[-3000:]}" for p in procs)
        raise AssertionError(f"process still running after {timeout_s:.0f} s:\n{tails}") from None
    return [p.returncode for p in procs]

  def kill_all(self):
    for proc in self.procs:
      if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@contextlib.contextmanager
def processes(log_dir):
  procs = Processes(log_dir)
  try:
    yield procs
  finally:
    procs.kill_all()


def fingerprint(log: str) -> str:
  found = re.findall(r"Weights fingerprint \([\w]+\): ([0-9a-f]{64})", log)
  assert len(found) == 1, log[-3000:]
  return found[0]


def scalars(run_dir: str, tag: str) -> Dict[int, float]:
  """step -> value of a TensorBoard scalar the chief wrote under run_dir/train."""
  out = {}
  for path in tf.io.gfile.glob(os.path.join(run_dir, "train", "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          out[event.step] = float(tf.make_ndarray(value.tensor))
  return out


def smoke_config(**overrides) -> train.TrainConfig:
  """The TrainConfig the binary builds from flags/smoke.cfg plus PRETRAIN's overrides."""
  cfg = helpers.read_flagfile(helpers.SMOKE_CFG)
  return train.TrainConfig(**{**dict(
      batch_size=int(cfg["batch_size"]), learning_rate=float(cfg["learning_rate"]),
      warmup_steps=int(cfg["warmup_steps"]), rmsprop_epsilon=float(cfg["rmsprop_epsilon"]),
      checkpoint_every=int(cfg["checkpoint_every"]), log_every=1, image_summary_every=0,
      grad_cosine_every=0, progress_bar=False), **overrides})


def identical_photos(folder, corrupt_name: Optional[str] = None, names=("a", "c", "d")) -> str:
  """One photo saved under several names (+ an undecodable file): every worker's shard and the
  single-process stream then hold the same image, whatever the sharding and shuffling."""
  src = helpers.write_photos(os.path.join(str(folder), "src"), size=48, names=("astronaut",))
  os.makedirs(folder, exist_ok=True)
  for name in names:
    shutil.copy(os.path.join(src, "astronaut.png"), os.path.join(str(folder), f"{name}.png"))
  if corrupt_name:
    with open(os.path.join(str(folder), corrupt_name), "wb") as f:
      f.write(b"\x89PNG\r\n\x1a\n truncated: not an image")
  shutil.rmtree(src)
  return str(folder)


# ---- tests ----------------------------------------------------------------------------------------
def test_tf_config_errors_name_the_problem():
  with pytest.raises(ValueError, match="needs the TF_CONFIG"):
    distribute.parse_tf_config("")
  with pytest.raises(ValueError, match="Malformed TF_CONFIG"):
    distribute.parse_tf_config("{not json")
  with pytest.raises(ValueError, match="task index 2 is not in"):
    distribute.parse_tf_config(tf_config([1, 2], 2))
  with pytest.raises(ValueError, match="host:port"):
    distribute.parse_tf_config(json.dumps({"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}}))
  parsed = distribute.parse_tf_config(
      json.dumps({"cluster": {"chief": ["h0:1"], "worker": ["h1:2", "h2:3"]}, "task": {"type": "worker", "index": 1}}))
  assert parsed.address == "h2:3"
  assert parsed.peers() == {"chief 0": "h0:1", "worker 0": "h1:2"}
  with pytest.raises(ValueError, match="--distribution must be one of"):
    distribute.make_strategy("tpu")


def test_peer_failure_message_names_the_lost_worker_and_its_address():
  # The shape of TF 2.21's error on the surviving worker after its peer was SIGKILLed mid-run.
  error = tf.errors.UnavailableError(None, None, textwrap.dedent("""\
      Graph execution error:

      Detected at node CollectiveReduceV2 defined at (most recent call last):
        File "/work/main/tf_mtssl/train.py", line 299, in sync
      Collective ops is aborted by: Error reported from /job:worker/task:1: The following tasks are unhealthy (stopped sending heartbeats):
      /job:worker/replica:0/task:1
      The tasks have crashed. Check the task logs for an earlier error."""))
  text = distribute.describe_peer_failure(error, {"worker": ["127.0.0.1:1111", "127.0.0.1:2222"]})
  assert text.startswith("UnavailableError: Collective ops is aborted by:"), text
  assert "unhealthy (stopped sending heartbeats): /job:worker/replica:0/task:1" in text, text
  assert text.endswith("[worker 1 at 127.0.0.1:2222]"), text


def test_indivisible_global_batch_is_refused(tmp_path):
  class TwoReplicas:  # only what the check reads
    num_replicas_in_sync = 2
  with pytest.raises(ValueError, match=r"not divisible by the 2 replicas"):
    train.Trainer(str(tmp_path), {"rp": helpers.tiny_task("rp")}, helpers.TINY_TRUNK,
                  smoke_config(batch_size=3), {"rp": "embedded"}, strategy=TwoReplicas())


def mirrored_two_cpus_check(model_dir: str, data: str) -> None:
  """Runs in a fresh process (logical devices must be set before TF starts): MirroredStrategy over 2
  logical CPUs; replicas get different batches, yet all weights, BN statistics (after the pre-save
  sync) and per-task RMSProp states end identical on both."""
  cpu = tf.config.list_physical_devices("CPU")[0]
  tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
  strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  assert strategy.num_replicas_in_sync == 2
  trainer = train.Trainer(model_dir, {"rp": helpers.tiny_task("rp")}, helpers.TINY_TRUNK,
                          smoke_config(train_steps=2, batch_size=4, checkpoint_every=2), {"rp": data},
                          strategy=strategy)

  def copies(variable):  # each replica's copy of a Keras or tf variable
    variable = variable.value if isinstance(variable, keras.Variable) else variable
    return [np.asarray(v) for v in strategy.experimental_local_results(variable)]

  model_vars = trainer.model.trunk.weights + trainer.model.heads["rp"].weights
  before = [copies(v)[0].copy() for v in trainer.model.trunk.trainable_weights]
  metrics = trainer.run_steps(trainer.make_iterators(seed=0)).metrics
  assert np.isfinite(metrics["rp"]["loss"].numpy())
  moving = [v for v in model_vars if "moving_mean" in v.path]
  assert any(not np.array_equal(*copies(v)) for v in moving), "replicas saw the same batch: test is void"
  trainer.step.assign(1)
  trainer.save()  # ckpt-1, after syncing the moving statistics
  trainer.train()  # restores ckpt-1, trains step 2, saves ckpt-2
  assert int(trainer.step.numpy()) == 2 and tf.train.latest_checkpoint(model_dir).endswith("ckpt-2")
  for variable in model_vars + list(trainer.optimizer.variables):
    a, b = copies(variable)
    np.testing.assert_array_equal(a, b, err_msg=getattr(variable, "path", variable.name))
  after = [copies(v)[0] for v in trainer.model.trunk.trainable_weights]
  assert any(not np.array_equal(a, b) for a, b in zip(before, after)), "no update applied"
  print("MIRRORED_OK", trainer.weights_fingerprint())


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus_keeps_replicas_identical(tmp_path):
  data = helpers.write_photos(tmp_path / "photos", size=48)
  code = textwrap.dedent(f"""
      from tests import test_distributed
      test_distributed.mirrored_two_cpus_check({str(tmp_path / 'run')!r}, {data!r})
  """)
  with processes(tmp_path / "logs") as procs:
    proc = procs.start([sys.executable, "-c", code], "mirrored")
    (rc,) = procs.wait([proc], START_TIMEOUT_S)
    assert rc == 0 and "MIRRORED_OK" in procs.log(proc), procs.log(proc)[-4000:]


def doubled_batches(trainer: train.Trainer, data: str, per_worker: int, seed: int):
  """Iterator of [X_t; X_t], X_t the t-th batch of one worker's pipeline (see the test below)."""
  ds = trainer.tasks["rp"].build_dataset(data, per_worker, seed=seed).map(
      lambda b: tf.nest.map_structure(lambda x: tf.concat([x, x], 0), b))
  return {"rp": iter(trainer.strategy.experimental_distribute_dataset(ds))}


@pytest.mark.slow
def test_two_workers_resume_keep_identical_weights_and_match_one_process_on_the_same_global_batch(tmp_path):
  """Two workers resume a run from its step-1 checkpoint and train to step 3.

  What is provably comparable: all images are one photo, and the rp examples' random geometry is
  drawn from per-element seeds that restart in every pipeline. Each worker's shard (and the
  one-process stream) then yields the same sequence of examples X_1, X_2, ..., so with a per-worker
  batch of 2 both workers train on X_t at step t: the global batch is [X_t; X_t]. One process fed
  [X_t; X_t] has exactly the same mean loss, gradient and batch-norm statistics (duplicating a batch
  changes none of them), so losses and weights must agree up to float rounding. The undecodable file
  lands in worker 1's shard only: the chief's num_corrupt scalar counts it only if the trainer sums
  the workers' counts.
  """
  data = identical_photos(tmp_path / "data", corrupt_name="b_corrupt.png")  # shards: {a, c}, {b_corrupt, d}
  run, steps = str(tmp_path / "run"), 3
  task = {"rp": helpers.tiny_task("rp")}
  # ckpt-1, written by one process. `first` is also the one-process reference below: its global batch
  # is the workers' (flags/smoke.cfg: 4), so the step it traced here is the one reused there.
  first = train.Trainer(run, task, helpers.TINY_TRUNK, smoke_config(train_steps=1), {"rp": data})
  assert first.config.batch_size == 4
  first.train()

  with processes(tmp_path / "logs") as procs:
    workers = procs.start_workers(free_ports(2), [f"--data={data}", f"--model_dir={run}", f"--train_steps={steps}",
                                                  "--batch_size=4", "--checkpoint_every=2", "--cluster_timeout_s=120"])
    rcs = procs.wait(workers, 2 * START_TIMEOUT_S)
    logs = [procs.log(w) for w in workers]
  assert rcs == [0, 0], "\n".join(log[-3000:] for log in logs)
  for log in logs:
    assert f"Restored {run}/ckpt-1 (step 1)" in log, log[-3000:]
  assert fingerprint(logs[0]) == fingerprint(logs[1])  # weights, BN statistics, RMSProp states
  assert not os.path.exists(os.path.join(run, ".worker_tmp"))  # the worker's temporary dir is removed
  assert tf.train.latest_checkpoint(run).endswith(f"ckpt-{steps}")

  # The chief's checkpoint is the worker's final state, bit for bit.
  restored = train.Trainer(run, task, helpers.TINY_TRUNK, smoke_config(), {"rp": data})
  assert restored.restore_latest() == steps
  assert restored.weights_fingerprint() == fingerprint(logs[1])
  noise_only = zero_gradient_variables(restored)  # (its training-mode pass moves restored's BN statistics)

  # One process from the same step-1 checkpoint, global batch [X_t; X_t] from the resumed stream.
  reference = first
  reference.checkpoint.read(os.path.join(run, "ckpt-1")).assert_existing_objects_matched().expect_partial()
  assert int(reference.step.numpy()) == 1
  iterators = doubled_batches(reference, data, 2, seed=reference.data_seed(1))
  expected = [float(reference.run_steps(iterators).metrics["rp"]["loss"]) for _ in range(1, steps)]
  logged = scalars(run, "rp/loss")
  np.testing.assert_allclose([logged[s] for s in range(2, steps + 1)], expected, rtol=1e-4)
  # Weights agree up to rounding, except those whose true gradient is 0: the biases that reach the loss
  # only through training-mode batch norm (the next unit's pre-activation, or the rp head's first batch
  # norm, cancels a per-channel shift). Their gradients are float noise, which a normalised optimizer
  # turns into small random steps that depend on the reduction order (tf_mtssl/pretraining/optimizer.py, epsilon).
  assert noise_only and all(re.fullmatch(r"(conv1|block\d_unit\d+_(conv3|shortcut))/bias", p) for p in noise_only)
  trunk = checkpoints.restore_trunk(run)
  compared = 0
  # Relative to the weights' scale (summation orders differ between 2 replicas and 1).
  scale = max(float(np.abs(w.numpy()).max()) for w in reference.model.trunk.weights)
  for ours, ref in zip(trunk.weights, reference.model.trunk.weights):
    if ref.path not in noise_only:
      np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-4, atol=1e-4 * scale, err_msg=ours.path)
      compared += 1
  assert compared > 0.8 * len(trunk.weights)
  assert scalars(run, "rp/num_corrupt")[steps] >= 1


def zero_gradient_variables(trainer: train.Trainer, relative: float = 1e-4):
  """Paths of the trunk variables whose rp gradient is below `relative` x the median gradient element."""
  batch = next(iter(trainer.tasks["rp"].build_dataset(trainer.data["rp"], 4, seed=0)))
  variables = trainer.model.trunk.trainable_variables
  with tf.GradientTape() as tape:
    loss, _ = trainer.tasks["rp"].loss_and_metrics(batch, trainer.model.predictions("rp", batch, training=True))
  grads = [np.abs(g.numpy()) for g in tape.gradient(loss, variables)]
  median = np.median(np.concatenate([g.ravel() for g in grads]))
  return {v.path for v, g in zip(variables, grads) if g.max() < relative * median}


@pytest.mark.slow
def test_worker_whose_peer_never_starts_fails_naming_the_address(tmp_path):
  """Both roles: worker 0 hosts the coordination service and waits for worker 1; worker 1 looks for
  worker 0. Neither peer is ever started."""
  data = identical_photos(tmp_path / "data")
  with processes(tmp_path / "logs") as procs:
    alone = []
    for index in (0, 1):
      ports = free_ports(2)
      flags = [f"--data={data}", f"--model_dir={tmp_path / f'run{index}'}", "--cluster_timeout_s=5"]
      proc = procs.start(PRETRAIN + ["--distribution=multi_worker", *flags], f"alone{index}",
                         env={"TF_CONFIG": tf_config(ports, index)})
      alone.append((proc, f"127.0.0.1:{ports[1 - index]}"))
    rcs = procs.wait([p for p, _ in alone], START_TIMEOUT_S)
    for index, ((proc, peer), rc) in enumerate(zip(alone, rcs)):
      log = procs.log(proc)
      assert rc == 2, log[-3000:]
      assert "could not form the cluster within --cluster_timeout_s=5" in log, log[-3000:]
      assert f"no answer from worker {1 - index} at {peer}" in log, log[-3000:]
  assert not os.path.exists(tmp_path / "run0") and not os.path.exists(tmp_path / "run1")
