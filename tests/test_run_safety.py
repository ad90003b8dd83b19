"""Pretraining runs that never lie and never hang (issue 15): one process per run directory, a
history of every start's settings, nothing written before the inputs are checked, bounded failure on
unreadable data, signals that work while the input pipeline is starved, damaged checkpoints skipped.

Processes are started with timeouts and killed by PID; the trunk is tiny (flags/smoke.cfg).
"""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from tests.test_distributed import PRETRAIN, START_TIMEOUT_S, processes
from tests.test_preemption import checkpoint_steps, wait_for
from tests.test_train import make_trainer
from tf_mtssl.runs import checkpoints
from tf_mtssl.runs import lock as run_lock
from tf_mtssl.pretraining import preemption
from tf_mtssl.data import sources


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  return helpers.write_photos(tmp_path_factory.mktemp("photos"), size=48)


@pytest.fixture(scope="module")
def corrupt_folder(tmp_path_factory):
  """Three truncated PNGs and nothing else."""
  folder = tmp_path_factory.mktemp("corrupt")
  good = helpers.write_photos(tmp_path_factory.mktemp("good"), size=48, names=("coffee",))
  data = open(os.path.join(good, "coffee.png"), "rb").read()
  for i in range(3):
    open(folder / f"truncated_{i}.png", "wb").write(data[: len(data) // 3])
  return str(folder)


def dead_pid() -> int:
  proc = subprocess.Popen(["true"])
  proc.wait()
  return proc.pid


def write_lock(model_dir, **holder):
  os.makedirs(model_dir, exist_ok=True)
  path = os.path.join(model_dir, run_lock.LOCK_FILE)
  with open(path, "w") as f:
    json.dump({"started": "2020-01-01T00:00:00+00:00", "command": "pretrain", **holder}, f)
  return path


# ---- 2: one process per --model_dir --------------------------------------------------------------
@pytest.mark.slow
def test_a_second_process_on_a_held_model_dir_fails_at_once_naming_the_holder(tmp_path):
  run = str(tmp_path / "run")
  with run_lock.RunLock(run):
    start = time.time()
    proc = subprocess.run(PRETRAIN + [f"--model_dir={run}", "--train_steps=2"], capture_output=True,
                          text=True, timeout=START_TIMEOUT_S, cwd=helpers.REPO_ROOT,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    took = time.time() - start
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert f"--model_dir {run} is in use by PID {os.getpid()} on host {socket.gethostname()}" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert sorted(os.listdir(run)) == []  # nothing written; the holder's lock is gone with it
  # "At once": before the model is built or any data is read (imports dominate what is left).
  assert "Reading one batch" not in proc.stderr, took


def test_a_lock_of_a_dead_process_is_taken_over_with_a_notice(tmp_path):
  run = str(tmp_path / "run")
  write_lock(run, host=socket.gethostname(), pid=dead_pid())
  lock = run_lock.RunLock(run)
  notice = lock.acquire()
  try:
    assert notice and "is no longer running" in notice and "Took over" in notice
    holder = json.load(open(lock.path))
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(run_lock.RunLockedError, match=f"in use by PID {os.getpid()}"):
      run_lock.RunLock(run).acquire()   # a second holder in this very process is refused too
    with pytest.raises(run_lock.RunLockedError, match="stop that process first"):
      run_lock.RunLock(run).check_free()
  finally:
    lock.release()
  assert not os.path.exists(lock.path)
  run_lock.RunLock(run).check_free()


def test_a_lock_of_another_host_holds_until_its_heartbeat_is_stale(tmp_path):
  run = str(tmp_path / "run")
  path = write_lock(run, host="elsewhere-host", pid=1)
  with pytest.raises(run_lock.RunLockedError, match=r"PID 1 on host elsewhere-host.*heartbeat.*in \d+ s"):
    run_lock.RunLock(run, heartbeat_s=1, stale_after_s=60).acquire()
  old = time.time() - 61
  os.utime(path, (old, old))
  lock = run_lock.RunLock(run, heartbeat_s=0.2, stale_after_s=60)
  notice = lock.acquire()
  try:
    assert "heartbeat stopped" in notice and "elsewhere-host" in notice
    before = os.path.getmtime(path)
    wait_for(lambda: os.path.getmtime(path) > before, 10)  # the holder's own heartbeat
  finally:
    lock.release()


def test_the_trainer_refuses_a_held_model_dir_before_building_anything(tmp_path, photos):
  run = str(tmp_path / "run")
  with run_lock.RunLock(run):
    with pytest.raises(run_lock.RunLockedError, match="is in use by PID"):
      make_trainer(run, photos)
  assert os.listdir(run) == []


# ---- 3: every start's settings are kept ------------------------------------------------------------
@pytest.mark.slow
def test_resuming_with_other_settings_keeps_every_start_in_the_history(tmp_path, photos, caplog):
  # One run, three starts (each start of a run is a separate trainer: the history is what links them).
  run = str(tmp_path / "run")
  make_trainer(run, photos, train_steps=2, learning_rate=1e-3).train()
  with caplog.at_level(logging.WARNING):
    make_trainer(run, photos, train_steps=4, learning_rate=2e-3).train()
  history = checkpoints.read_config_history(run)
  assert [h["step"] for h in history] == [0, 2] and history[0]["changed"] is None
  assert history[0]["config"]["train"]["learning_rate"] == 1e-3  # the first segment's settings
  assert history[1]["changed"]["train.learning_rate"] == [1e-3, 2e-3]
  assert history[1]["changed"]["train.train_steps"] == [2, 4]
  assert history[1]["pid"] == os.getpid() and history[1]["host"] == socket.gethostname()
  assert checkpoints.load_run_config(run)["train"]["learning_rate"] == 2e-3
  assert "train.learning_rate: 0.001 -> 0.002" in caplog.text

  # A run config from before the history (a run made by an older version) is kept as its first entry.
  os.remove(os.path.join(run, checkpoints.RUN_CONFIG_HISTORY))
  old = checkpoints.load_run_config(run)
  make_trainer(run, photos, train_steps=5, learning_rate=2e-3, warmup_steps=2).train()
  history = checkpoints.read_config_history(run)
  assert len(history) == 2 and history[0]["config"] == old and history[0]["step"] is None
  assert history[1]["step"] == 4
  assert history[1]["changed"] == {"train.train_steps": [4, 5], "train.warmup_steps": [1, 2]}


# ---- 5, 6: inputs are checked before anything is written; unreadable data fails in bounded time -----
@pytest.mark.slow
def test_a_bad_data_path_writes_nothing_and_a_leftover_config_guards_nothing(tmp_path, photos):
  run = tmp_path / "run"
  with pytest.raises(FileNotFoundError, match="Data path not found: /no/such/folder"):
    make_trainer(run, "/no/such/folder").train()
  assert not run.exists()
  # A run_config.json without checkpoint (left by an older version's failed start) describes no
  # weights: a start with other tasks and trunk is not refused as "another architecture".
  checkpoints.save_run_config(str(run), {"trunk": dict(helpers.TINY_TRUNK, depth=26), "tasks": ["col"]})
  trainer = make_trainer(run, photos, tasks=("rp",), train_steps=1)
  trainer.train()
  assert checkpoints.load_run_config(str(run))["tasks"] == ["rp"]


@pytest.mark.slow
def test_a_source_of_corrupt_images_only_fails_after_one_pass_naming_folder_and_count(corrupt_folder):
  # In a subprocess: before the fix this loops forever inside TF, where no timeout can stop it.
  code = textwrap.dedent(f"""
      from tf_mtssl.data import sources
      ds = sources.image_dataset({corrupt_folder!r}, cache_decoded=False)
      try:
        next(iter(ds))
      except Exception as e:
        print("MESSAGE", sources.unreadable_source_message(e))
      """)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                        cwd=helpers.REPO_ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert (f"MESSAGE No readable element in image folder {corrupt_folder}: all 3 files are corrupt, "
          "truncated or unreadable") in proc.stdout, proc.stderr[-3000:]
  # The cached (embedded-style) path fails the same way, and a readable source is unaffected.
  with pytest.raises(tf.errors.InvalidArgumentError, match="all 3 files are corrupt"):
    next(iter(sources.image_dataset(corrupt_folder, cache_decoded=True)))


@pytest.mark.slow
def test_pretraining_on_corrupt_images_only_exits_2_naming_the_folder(tmp_path, corrupt_folder):
  run = tmp_path / "run"
  proc = subprocess.run(PRETRAIN + [f"--model_dir={run}", f"--data={corrupt_folder}"], capture_output=True,
                        text=True, timeout=START_TIMEOUT_S, cwd=helpers.REPO_ROOT,
                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert (f"Error: Task rp cannot read its data ({corrupt_folder}): No readable element in image folder "
          f"{corrupt_folder}: all 3 files are corrupt, truncated or unreadable") in proc.stderr
  assert "Traceback" not in proc.stderr and len(proc.stderr) < 20_000  # no log flood
  assert not run.exists()


@pytest.mark.slow
def test_sigterm_works_while_the_input_check_is_starved(tmp_path, photos):
  """A FIFO nobody writes to: reading it blocks forever inside TF's input pipeline."""
  data = tmp_path / "data"
  data.mkdir()
  os.mkfifo(data / "stuck.jpg")
  run = tmp_path / "run"
  with processes(tmp_path / "logs") as procs:
    proc = procs.start(PRETRAIN + [f"--model_dir={run}", f"--data={data}"], "starved")
    wait_for(lambda: "Reading one batch" in procs.log(proc), START_TIMEOUT_S, [proc])
    time.sleep(2)  # inside the blocked read
    sent = time.time()
    os.kill(proc.pid, signal.SIGTERM)
    (rc,) = procs.wait([proc], 30)
    log = procs.log(proc)
  assert rc == preemption.PREEMPTED_EXIT_CODE, log[-3000:]
  assert time.time() - sent < 30
  assert "while reading the first examples: nothing was written" in log
  assert not run.exists()


STARVING_RUN = """
import sys, time
import tensorflow as tf
from tests import helpers
from tf_mtssl.pretraining import preemption
from tf_mtssl.pretraining import trainer as train

Rp = type(helpers.tiny_task("rp"))

class Starving(Rp):
  # The input check gets the real pipeline; training gets 3 batches, then one that never comes.
  built = 0

  def build_dataset(self, data, batch_size, **kwargs):
    ds = super().build_dataset(data, batch_size, **kwargs)
    Starving.built += 1
    if Starving.built == 1:
      return ds
    never = ds.filter(lambda batch: tf.ensure_shape(
        tf.py_function(lambda: time.sleep(3600) or False, [], tf.bool), []))
    return ds.take(3).concatenate(never)

base = helpers.tiny_task("rp")
config = train.TrainConfig(train_steps=1000, batch_size=2, checkpoint_every=2, log_every=1,
                           image_summary_every=0, grad_cosine_every=0, progress_bar=False, stop_grace_s=3)
trainer = train.Trainer(sys.argv[1], {"rp": Starving(options=base.options, image_size=base.image_size)},
                        helpers.TINY_TRUNK, config, {"rp": sys.argv[2]})
trainer.train()
print("RETURNED")
"""


@pytest.mark.slow
def test_sigterm_works_while_a_training_step_is_starved(tmp_path, photos):
  run = str(tmp_path / "run")
  script = tmp_path / "starving.py"
  script.write_text(STARVING_RUN)
  with processes(tmp_path / "logs") as procs:
    proc = procs.start([sys.executable, str(script), run, photos], "starving",
                       env={"PYTHONPATH": str(helpers.REPO_ROOT)})
    wait_for(lambda: checkpoint_steps(run) == [2], START_TIMEOUT_S, [proc])
    time.sleep(2)  # the 4th step now waits for a batch that never comes
    os.kill(proc.pid, signal.SIGTERM)
    (rc,) = procs.wait([proc], 60)
    log = procs.log(proc)
  assert rc == preemption.PREEMPTED_EXIT_CODE, log[-3000:]
  assert re.search(r"no step finished within \d+ s", log) and f"resumes from {run}/ckpt-2" in log, log[-3000:]
  assert "RETURNED" not in log
  assert checkpoint_steps(run) == [2] and not os.path.exists(os.path.join(run, run_lock.LOCK_FILE))


# ---- 7: a damaged newest checkpoint ------------------------------------------------------------------
def truncate_data(prefix: str) -> str:
  (data,) = tf.io.gfile.glob(prefix + ".data-*")
  with open(data, "r+b") as f:
    f.truncate(os.path.getsize(data) // 2)
  return data


@pytest.mark.slow
def test_resume_falls_back_past_a_truncated_newest_checkpoint(tmp_path, photos, caplog):
  run = str(tmp_path / "run")
  first = make_trainer(run, photos, train_steps=4, checkpoint_every=2, keep_checkpoints=5)
  first.train()
  bad = truncate_data(os.path.join(run, "ckpt-4"))
  resumed = make_trainer(run, photos, train_steps=5, checkpoint_every=2, keep_checkpoints=5)
  with caplog.at_level(logging.WARNING):
    assert resumed.restore_latest() == 2
  assert f"Checkpoint {run}/ckpt-4 is unreadable ({bad}: Read less bytes than requested)" in caplog.text
  assert f"Using {run}/ckpt-2, the newest readable checkpoint" in caplog.text
  expected = checkpoints.restore_trunk(run, "ckpt-2")
  for a, b in zip(expected.weights, resumed.model.trunk.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  # A named damaged checkpoint is refused, naming its file (no silent substitute).
  with pytest.raises(checkpoints.UnreadableCheckpointError, match=f"Checkpoint {run}/ckpt-4 is unreadable"):
    checkpoints.restore_trunk(run, "ckpt-4")
  resumed.train()
  assert int(resumed.step.numpy()) == 5 and tf.train.latest_checkpoint(run).endswith("ckpt-5")
  # When every checkpoint is damaged, the error names each file.
  for step in checkpoint_steps(run):
    truncate_data(os.path.join(run, f"ckpt-{step}"))
  with pytest.raises(checkpoints.UnreadableCheckpointError,
                     match=f"No readable checkpoint in {run}: {run}/ckpt-5.data-00000-of-00001: Read less"):
    checkpoints.restore_trunk(run)


# ---- 12: clear errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("task,field,value,message", [
    ("rp", "patch_size", 8, "--rp_patch_size must be >= 16 (one block-3 cell at output stride 16), got 8"),
    ("rp", "pixelation_prob", 1.5, "--rp_pixelation_prob must be in [0, 1], got 1.5"),
    ("rp", "max_pixels", 10, "--rp_max_pixels must be >= --rp_min_pixels (150000), got 10"),
    ("col", "num_neighbors", 0, "--col_num_neighbors must be in [1, 313] (the ab bins), got 0"),
    ("col", "temperature", 0.0, "--col_temperature must be > 0, got 0.0"),
    ("ex", "views", 1, "--ex_views must be >= 2 (a view needs a positive), got 1"),
    ("ex", "seed_crop_fraction", 0.0, "--ex_seed_crop_fraction must be in (0, 1], got 0.0"),
    ("ms", "predict_stride", 4, "--ms_predict_stride must be 8 or 16, got 4"),
])
def test_bad_task_options_name_the_field_and_its_limit(task, field, value, message):
  import dataclasses
  from tf_mtssl import tasks
  options = dataclasses.replace(tasks.task_class(task).Options(), **{field: value})
  with pytest.raises(ValueError) as error:
    tasks.make_task(task, options=options)
  assert str(error.value) == message  # the one field, not the whole options object


@pytest.mark.slow
def test_ms_on_an_image_dataset_says_how_to_make_motion_masks(tmp_path):
  proc = subprocess.run(PRETRAIN + ["--tasks=ms", "--data=tfds:imagenet2012", f"--model_dir={tmp_path / 'run'}"],
                        capture_output=True, text=True, timeout=START_TIMEOUT_S, cwd=helpers.REPO_ROOT,
                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert ("Error: ms reads motion-mask TFRecords made from videos by `python -m tf_mtssl.make_motion_masks "
          "--videos=VIDEOS --output_dir=MASKS`") in proc.stderr
  assert "got the image dataset 'tfds:imagenet2012'" in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "run").exists()
  from tf_mtssl.tasks import motion_segmentation
  with pytest.raises(FileNotFoundError, match="No TFRecord files match: /no/masks-\\*. ms reads motion-mask"):
    motion_segmentation.mask_shards("/no/masks-*")
