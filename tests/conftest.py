"""Test-wide settings: quiet TF, CPU only, small thread pools (the CI machine has 2 cores)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402


# Modules whose fixtures build a model, convert a checkpoint or start a server (tens of seconds): all their
# tests run on one xdist worker, so each such fixture (session-scoped) is made once. (pytest-xdist's own
# `xdist_group` mark does nothing under pytest 9: xdist 3.6-3.8 renames Item._nodeid, which pytest 9 no
# longer reads. This uses xdist's public scheduler hook instead.)
ONE_WORKER_MODULES = ("test_combination.py", "test_export.py", "test_import_checkpoint.py",
                      "test_mixed_precision.py", "test_serving.py")


@pytest.hookimpl(optionalhook=True)  # xdist's hook: pytest without xdist must not reject it
def pytest_xdist_make_scheduler(config, log):
  """`--dist loadscope`: every test is its own work unit, except those of ONE_WORKER_MODULES (one unit
  per module). Units of several tests go first (xdist orders units by size), then the rest in collection
  order, which puts the slow tests first (below): the long ones start early, the short ones fill the end."""
  if config.getoption("dist") != "loadscope":
    return None
  from xdist.scheduler import LoadScopeScheduling

  class OneWorkerModules(LoadScopeScheduling):
    def _split_scope(self, nodeid: str) -> str:
      module = nodeid.split("::", 1)[0]
      return module if os.path.basename(module) in ONE_WORKER_MODULES else nodeid

  return OneWorkerModules(config, log)


def pytest_collection_modifyitems(config, items):
  """Slow tests first, for the scheduler above (a stable sort: otherwise in file order). The tests of
  ONE_WORKER_MODULES keep their file order: they share fixtures, and a later test may build on an
  earlier one's state (test_serving exports a newer version last)."""
  def later(item):
    return item.path.name not in ONE_WORKER_MODULES and item.get_closest_marker("slow") is None
  items.sort(key=later)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: 3 s or more (trains, spawns processes or builds large models); "
                          "`-m 'not slow'` is the inner loop")


@pytest.fixture(autouse=True)
def _clear_keras_session():
  """Every test starts from Keras' blank global state (layer names, the TF default graph, kernel caches).
  Without the full garbage collection clear_session does by default: that costs ~1 s a test once a worker
  holds many objects (a sixth of the suite's time); Python's own collector still runs."""
  import keras
  keras.utils.clear_session(free_memory=False)
  yield


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """One tiny rp pretraining run (the smoke trunk, 2 steps on real photos, checkpoints ckpt-1 and ckpt-2),
  trained once per session for the tests that only read a run. Do not write into it."""
  from tests import helpers
  from tf_mtssl.pretraining import trainer
  photos = helpers.write_photos(tmp_path_factory.mktemp("tiny_run_photos"), size=96)
  run = str(tmp_path_factory.mktemp("tiny_run"))
  config = trainer.TrainConfig(train_steps=2, batch_size=2, learning_rate=1e-2, warmup_steps=1, log_every=1,
                               checkpoint_every=1, image_summary_every=0, grad_cosine_every=0, progress_bar=False)
  trainer.Trainer(run, {"rp": helpers.tiny_task("rp")}, helpers.TINY_TRUNK, config, {"rp": photos}).train()
  return run
