"""Shared test utilities."""

import keras
import numpy as np
import tensorflow as tf

from tf_mtssl import cli
from tf_mtssl.model import trunk as trunk_lib

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
SMOKE_CFG = REPO_ROOT / "flags" / "smoke.cfg"
# The README's smoke run (flags/smoke.cfg) is the tests' tiny configuration: one place for its numbers.
SMOKE = cli.read_flagfile(SMOKE_CFG)
TINY_TRUNK = {k: int(SMOKE[k]) for k in ("depth", "output_stride", "base_width")}
read_flagfile = cli.read_flagfile


def first_batch(task, data="embedded", batch_size=4, seed=0):
  """The first batch of `task`'s pipeline, the same whatever ran before in this process (the global
  random seeds are set first: a test's data must not depend on the tests its xdist worker ran)."""
  keras.utils.set_random_seed(seed)
  return next(iter(task.build_dataset(data, batch_size, seed=seed)))


def overfit_single_batch(task, batch, steps=30, learning_rate=1e-3, trunk_kwargs=None, seed=0):
  """Trains trunk + the task's head on one batch from a seeded initialisation (so the curve is the same
  run to run); returns the loss per step (numpy)."""
  keras.utils.set_random_seed(seed)
  trunk = trunk_lib.build_trunk(**(trunk_kwargs or TINY_TRUNK))
  feats = trunk.compute_output_spec(keras.KerasTensor((1,) + tuple(task.trunk_input_shape())))
  head = task.build_head(tuple(feats["block3"].shape[1:]))
  variables = trunk.trainable_variables + head.trainable_variables
  opt = keras.optimizers.Adam(learning_rate)

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      preds = head(trunk(task.trunk_inputs(batch), training=True)["block3"], training=True)
      loss, _ = task.loss_and_metrics(batch, preds)
    opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return loss

  return np.array([float(step()) for _ in range(steps)])


def tiny_task(name, image_size=None, harmonize=False):
  """Task `name` with the tiny settings of flags/smoke.cfg (the README's smoke run)."""
  from tf_mtssl import tasks
  options = tasks.options_from_settings(name, SMOKE)
  return tasks.make_task(name, options=options, image_size=image_size or int(SMOKE["image_size"]),
                         harmonize=harmonize)


def write_photos(folder, size=160, names=("astronaut", "coffee", "chelsea", "rocket")):
  """A few real photos (scikit-image) resized small, as PNG files; returns the folder."""
  import os
  import skimage.data
  import skimage.io
  import skimage.transform
  os.makedirs(folder, exist_ok=True)
  for n in names:
    img = skimage.transform.resize(getattr(skimage.data, n)(), (size, size * 4 // 3), anti_aliasing=True)
    skimage.io.imsave(os.path.join(folder, f"{n}.png"), (img * 255).astype(np.uint8), check_contrast=False)
  return str(folder)


def write_photos_with_prior(folder, size=160):
  """write_photos, with the photos' colorization prior beside them: col trainers then load it instead of
  each computing it at start-up (that path is tested in test_colorization)."""
  from tf_mtssl.tasks.colorization import prior as col_prior
  folder = write_photos(folder, size=size)
  col_prior.save_prior(col_prior.default_prior_path(folder), col_prior.compute_prior(folder, num_images=0)[0])
  return folder


def assert_close(actual, desired, rtol: float = 1e-5, err_msg: str = ""):
  """`np.testing.assert_allclose` with a tolerance relative to the values' scale:
  |actual - desired| <= rtol * (|desired| + max |desired|), so entries near zero are compared at the
  array's scale, not exactly. Float results differ in their last digits between machines of one
  kind (AVX2-only vs AVX-512 CPUs: oneDNN picks other kernels), so no comparison of computed floats
  uses a fixed absolute tolerance."""
  desired = np.asarray(desired)
  scale = float(np.max(np.abs(desired))) if desired.size else 0.0
  np.testing.assert_allclose(np.asarray(actual), desired, rtol=rtol, atol=rtol * scale, err_msg=err_msg)


def assert_progress_bar(stderr: str, steps: int):
  """A finished tqdm bar (`tf_mtssl.core.progress`) of `steps` steps with elapsed<ETA, rate and loss."""
  import re
  pattern = rf"{steps}/{steps} \[[\d:]+<[\d:]+, +[\d.]+ ?(s/step|step/s), loss=-?[\d.]+\]"
  assert re.search(pattern, stderr), f"no finished progress bar ({pattern}) in:\n{stderr[-2000:]}"


def jpeg_bytes(seed: int, h: int = 80, w: int = 72) -> bytes:
  """A smooth random h x w colour JPEG (a 4x4 noise image upsampled)."""
  rng = np.random.default_rng(seed)
  small = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.float32)
  image = tf.cast(tf.image.resize(small, [h, w]), tf.uint8)
  return tf.io.encode_jpeg(image).numpy()
