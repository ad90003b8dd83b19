"""--mixed_precision (bfloat16 / float16 with loss scaling) and --profile_steps on the trainer."""

import glob
import os

import keras
import numpy as np
import pytest

from tests import helpers

# Fixtures train or convert a model (tens of seconds): slow, and made once: the module's tests stay on one
# xdist worker (conftest.ONE_WORKER_MODULES) and its fixtures are session-scoped (a module-scoped one is
# rebuilt whenever the worker runs another module's test in between).
pytestmark = pytest.mark.slow
from tf_mtssl.pretraining import trainer as train

TASKS = ("rp", "col")  # a dense and a pairwise head


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
  return helpers.write_photos_with_prior(tmp_path_factory.mktemp("photos"), size=96)


def losses_after(tmp_path, photos, precision, steps=2):
  config = train.TrainConfig(train_steps=steps, batch_size=2, learning_rate=1e-3, warmup_steps=1,
                             log_every=1, checkpoint_every=steps, image_summary_every=0,
                             grad_cosine_every=0, progress_bar=False, mixed_precision=precision)
  trainer = train.Trainer(str(tmp_path / precision), {n: helpers.tiny_task(n) for n in TASKS},
                          helpers.TINY_TRUNK, config, {n: photos for n in TASKS})
  batches = {n: next(iter(t.build_dataset(photos, 2, seed=0))) for n, t in trainer.tasks.items()}
  import tensorflow as tf
  iterators = {n: iter(tf.data.Dataset.from_tensors(b).repeat()) for n, b in batches.items()}
  return trainer, [{n: r["loss"] for n, r in trainer.run_steps(iterators).metrics.items()} for _ in range(steps)]


@pytest.fixture(scope="session")
def reference(tmp_path_factory, photos):
  return losses_after(tmp_path_factory.mktemp("fp32"), photos, "none")[1]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_mixed_precision_is_finite_and_matches_float32(tmp_path, photos, reference, precision):
  trainer, mixed = losses_after(tmp_path, photos, precision)
  assert trainer.model.trunk.get_layer("block1_unit1_conv1").compute_dtype == precision
  assert trainer.model.trunk.get_layer("block1_unit1_conv1").variable_dtype == "float32"
  assert keras.mixed_precision.global_policy().name == "float32"  # restored after building
  # float16 gets one dynamic loss scale per task; bfloat16 none.
  assert set(trainer.optimizer.loss_scales) == (set(TASKS) if precision == "float16" else set())
  # A float16 task whose first scaled gradients overflowed skipped that update (its loss scale halved:
  # dynamic loss scaling at work; the tiny trunk's largest scaled gradient is ~0.9-1.0x float16's
  # maximum at the initial scale 2^15, so rounding decides): only its first loss is comparable.
  skipped = {n for n, scale in trainer.optimizer.loss_scales.items() if float(scale.numpy()) < 2.0 ** 15}
  for step, (ref, got) in enumerate(zip(reference, mixed)):
    for name in TASKS:
      assert np.isfinite(float(got[name])) and got[name].dtype == "float32"
      # Same init (seeded) and batches: the first losses agree to low-precision rounding.
      if step == 0 or name not in skipped:
        np.testing.assert_allclose(float(got[name]), float(ref[name]), rtol=0.05)


def test_bad_mixed_precision_is_rejected():
  with pytest.raises(ValueError, match="mixed_precision"):
    train.TrainConfig(mixed_precision="int8")


@pytest.mark.slow
def test_profile_steps_write_a_tensorboard_profile(tmp_path, photos):
  config = train.TrainConfig(train_steps=3, batch_size=2, log_every=1, checkpoint_every=3, image_summary_every=0,
                             grad_cosine_every=0, progress_bar=False, profile_steps=(2, 3))
  trainer = train.Trainer(str(tmp_path / "run"), {"rp": helpers.tiny_task("rp")}, helpers.TINY_TRUNK, config,
                          {"rp": photos})
  trainer.train()
  assert glob.glob(os.path.join(tmp_path, "run", "train", "plugins", "profile", "*", "*.xplane.pb"))
