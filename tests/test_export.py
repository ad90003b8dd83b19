"""Export of a pretraining run: layout, versions, reloading (SavedModel, TFSMLayer, Keras), outputs."""

import io
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests import helpers

# Fixtures train or convert a model (tens of seconds): slow, and made once: the module's tests stay on one
# xdist worker (conftest.ONE_WORKER_MODULES) and its fixtures are session-scoped (a module-scoped one is
# rebuilt whenever the worker runs another module's test in between).
pytestmark = pytest.mark.slow
from tf_mtssl.runs import checkpoints
from tf_mtssl.serving import export as export_lib
from tf_mtssl.runs import exports
from tf_mtssl.model import pooling
from tf_mtssl.model import preprocessing

IMAGE_SIZE = 64


@pytest.fixture(scope="session")
def run_dir(tiny_run):
  """The session's tiny pretraining run (conftest.tiny_run: ckpt-1 and ckpt-2)."""
  return tiny_run


def _export_binary(log_dir, *args):
  """Starts the export binary; its output goes to files (a pipe nobody reads could fill and block)."""
  with open(os.path.join(log_dir, "stdout"), "w") as out, open(os.path.join(log_dir, "stderr"), "w") as err:
    proc = subprocess.Popen([sys.executable, "-m", "tf_mtssl.export_saved_model", *args],
                            cwd=helpers.REPO_ROOT, stdout=out, stderr=err,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""})
  proc.log_dir = log_dir
  return proc


@pytest.fixture(scope="session")
def exported(run_dir, tmp_path_factory):
  """Version 1 exported in-process; then the binary exports ckpt-1 as version 2 in the background
  (it runs while the other tests do; `test_binary_exports_a_named_checkpoint_as_version_2` waits)."""
  export_dir = str(tmp_path_factory.mktemp("exports"))
  version, path = export_lib.export_run(run_dir, export_dir, image_size=IMAGE_SIZE, export_units=True)
  binary = _export_binary(str(tmp_path_factory.mktemp("binary")), f"--model_dir={run_dir}", f"--export_dir={export_dir}", "--checkpoint=ckpt-1",
                          f"--image_size={IMAGE_SIZE}")
  try:
    yield export_dir, version, path, binary
  finally:
    if binary.poll() is None:
      binary.kill()
      binary.wait()


@pytest.fixture(scope="session")
def loaded(exported):
  return tf.saved_model.load(exported[2])


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def _photo(h, w, seed=0) -> np.ndarray:
  """A smooth random uint8 RGB image (not noise: resizing must have something to average)."""
  rng = np.random.default_rng(seed)
  small = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.float32)
  return tf.cast(tf.image.resize(small, [h, w], method="bilinear"), tf.uint8).numpy()


def test_layout_metadata_and_version_1(run_dir, exported):
  export_dir, version, path, _ = exported
  assert version == 1 and path == os.path.join(export_dir, "1")
  assert os.path.isfile(os.path.join(path, "saved_model.pb"))
  assert os.path.isfile(os.path.join(path, "assets.extra", "trunk.keras"))
  meta = exports.read_metadata(path)
  assert meta["version"] == 1
  assert meta["checkpoint"] == os.path.abspath(tf.train.latest_checkpoint(run_dir))
  assert meta["step"] == 2
  assert meta["run_config"] == checkpoints.load_run_config(run_dir)
  assert meta["trunk"] == helpers.TINY_TRUNK
  assert meta["image_size"] == IMAGE_SIZE and meta["feature_channels"] == 16 * helpers.TINY_TRUNK["base_width"]
  assert set(meta["signatures"]) == {"serving_default", "image_tensor"}
  assert meta["signatures"]["serving_default"]["inputs"] == {
      "image_bytes": {"dtype": "string", "shape": [None]}}
  assert set(meta["signatures"]["image_tensor"]["outputs"]) == {"features", "block3", "grid", "unit_01"}


def test_exported_outputs_equal_the_in_process_trunk(run_dir, loaded):
  trunk = checkpoints.restore_trunk(run_dir)
  images = tf.constant(np.stack([_photo(IMAGE_SIZE, IMAGE_SIZE, s) for s in range(2)]), tf.float32)
  expected = trunk(preprocessing.rgb_to_trunk_input(images), training=False)
  for out in (loaded.signatures["image_tensor"](images=images), loaded.image_tensor(images)):
    # Block-3 values reach about 37 here: tolerances relative to that scale (another CPU's kernels
    # differed by 1.5e-5 from the in-process trunk).
    helpers.assert_close(out["block3"], expected["block3"])
    helpers.assert_close(out["unit_01"], expected["units"][0])
    helpers.assert_close(out["features"], tf.reduce_mean(expected["block3"], axis=[1, 2]))
    helpers.assert_close(out["grid"], pooling.pool_to_grid(expected["block3"]))
    assert out["grid"].shape == (2, 3, 3, 128) and out["features"].shape == (2, 128)
  # Encoded bytes: a lossless PNG already at image_size decodes to the same pixels, so the
  # serving_default outputs equal the trunk's on those pixels.
  from_bytes = loaded.signatures["serving_default"](
      image_bytes=tf.constant([_png(im) for im in images.numpy().astype(np.uint8)]))
  for key in ("features", "block3", "grid"):
    helpers.assert_close(from_bytes[key], expected[key] if key == "block3" else loaded.image_tensor(images)[key])


def test_serving_default_centre_crops_keeping_the_aspect_ratio(loaded):
  wide = _photo(IMAGE_SIZE, IMAGE_SIZE + 32, seed=3)   # 64 x 96: the central 64 x 64 is kept
  tall = np.ascontiguousarray(np.transpose(wide, (1, 0, 2)))
  out = loaded.signatures["serving_default"](image_bytes=tf.constant([_png(wide), _png(tall)]))
  crops = np.stack([wide[:, 16:80], tall[16:80]]).astype(np.float32)
  helpers.assert_close(out["block3"], loaded.image_tensor(crops)["block3"])
  # A larger image is resized to image_size: same output shape.
  big = loaded.signatures["serving_default"](image_bytes=tf.constant([_png(_photo(150, 200))]))
  assert big["block3"].shape[1:] == out["block3"].shape[1:]


@pytest.mark.slow
def test_tfsm_layer_reloads_and_gradients_flow(exported, loaded):
  layer = keras.layers.TFSMLayer(exported[2], call_endpoint="image_tensor")
  trunk = exports.load_keras_trunk(exported[2])
  assert len(layer.trainable_weights) == len(trunk.trainable_weights)
  images = tf.Variable(np.stack([_photo(48, 48, s) for s in range(2)]).astype(np.float32))
  with tf.GradientTape() as tape:
    outputs = layer(images)
    loss = tf.reduce_sum(outputs["features"] ** 2)
  grads = tape.gradient(loss, [images] + layer.trainable_weights)
  assert all(g is not None for g in grads)
  assert all(np.isfinite(g.numpy()).all() for g in grads)
  assert float(tf.reduce_sum(tf.abs(grads[0]))) > 0
  assert sum(float(tf.reduce_sum(tf.abs(g))) > 0 for g in grads[1:]) >= len(grads[1:]) // 2
  helpers.assert_close(outputs["block3"], loaded.image_tensor(images)["block3"])


def test_keras_trunk_file_has_full_keras_semantics(run_dir, exported):
  trunk = keras.models.load_model(os.path.join(exported[2], "assets.extra", "trunk.keras"))
  original = checkpoints.restore_trunk(run_dir)
  for a, b in zip(original.weights, trunk.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert trunk.trainable and len(trunk.trainable_weights) == len(original.trainable_weights)
  x = preprocessing.rgb_to_trunk_input(np.stack([_photo(48, 48, s) for s in range(2)]).astype(np.float32))
  inference = trunk(x, training=False)["block3"]
  helpers.assert_close(inference, original(x, training=False)["block3"])
  # Batch norm with batch statistics in training mode (not frozen as in the SavedModel).
  assert float(tf.reduce_max(tf.abs(trunk(x, training=True)["block3"] - inference))) > 1e-3
  assert len(trunk(x)["units"]) == 1


def test_pool_to_grid_is_adaptive_average_pooling():
  rng = np.random.default_rng(0)
  for h, w in [(14, 14), (7, 9), (2, 2), (3, 3), (1, 5)]:
    x = rng.normal(size=(2, h, w, 4)).astype(np.float32)
    expected = np.zeros((2, 3, 3, 4), np.float32)
    for i in range(3):
      for j in range(3):  # torch AdaptiveAvgPool2d bins
        r0, r1 = (i * h) // 3, -(-(i + 1) * h // 3)
        c0, c1 = (j * w) // 3, -(-(j + 1) * w // 3)
        expected[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
    np.testing.assert_allclose(pooling.pool_to_grid(x), expected, rtol=1e-5, atol=1e-6)
    dynamic = tf.function(pooling.pool_to_grid,
                          input_signature=[tf.TensorSpec([None, None, None, 4], tf.float32)])
    np.testing.assert_allclose(dynamic(x), expected, rtol=1e-5, atol=1e-6)
  # 14x14 (224 px at output stride 16): rows/columns [0, 5), [4, 10), [9, 14).
  x = np.arange(14, dtype=np.float32).reshape(1, 14, 1, 1) * np.ones((1, 1, 14, 1), np.float32)
  np.testing.assert_allclose(pooling.pool_to_grid(x)[0, :, 0, 0], [2.0, 6.5, 11.0])
  with pytest.raises(ValueError, match="grid must be a positive integer"):
    pooling.pool_to_grid(x, grid=0)
  inputs = keras.Input((None, None, 8))
  model = keras.Model(inputs, pooling.GridAveragePooling()(inputs))
  restored = keras.Model.from_config(model.get_config())
  np.testing.assert_allclose(restored(np.ones((1, 5, 6, 8), np.float32)), np.ones((1, 3, 3, 8)))


def test_crash_during_export_leaves_no_version(tmp_path, monkeypatch):
  export_dir = str(tmp_path / "exports")
  os.makedirs(os.path.join(export_dir, "1"))

  def crashing_save(obj, path, signatures=None):
    os.makedirs(os.path.join(path, "variables"))
    open(os.path.join(path, "saved_model.pb"), "wb").write(b"partial")
    raise RuntimeError("simulated crash")

  monkeypatch.setattr(export_lib.tf.saved_model, "save", crashing_save)
  from tf_mtssl.model import trunk as trunk_lib
  with pytest.raises(RuntimeError, match="simulated crash"):
    export_lib.export_trunk(trunk_lib.build_trunk(**helpers.TINY_TRUNK), export_dir)
  assert sorted(os.listdir(export_dir)) == ["1"]  # no version 2, no temporary directory left


def test_bad_run_directories_raise_clear_errors(tmp_path, run_dir):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    export_lib.export_run(str(tmp_path / "nothing"), str(tmp_path / "out"))
  with pytest.raises(FileNotFoundError, match="not a tf_mtssl pretraining run"):
    export_lib.export_run(str(tmp_path), str(tmp_path / "out"))
  with pytest.raises(FileNotFoundError, match="ckpt-7"):
    export_lib.export_run(run_dir, str(tmp_path / "out"), checkpoint="ckpt-7")
  with pytest.raises(FileNotFoundError, match="No exported version"):
    exports.latest_version(str(tmp_path))


def test_binary_exports_a_named_checkpoint_as_version_2(run_dir, exported):
  export_dir, binary = exported[0], exported[3]
  binary.wait(timeout=300)
  stdout, stderr = (open(os.path.join(binary.log_dir, n)).read() for n in ("stdout", "stderr"))
  assert binary.returncode == 0, stderr[-3000:]
  assert not [n for n in os.listdir(export_dir) if n not in ("1", "2")]  # no temporary directory left
  assert "as version 2" in stdout
  assert exports.list_versions(export_dir) == [1, 2]
  assert exports.latest_version(export_dir)[0] == 2
  meta = exports.read_metadata(export_dir)
  assert meta["version"] == 2 and meta["checkpoint"].endswith("ckpt-1") and meta["step"] == 1
  with open(os.path.join(export_dir, "1", "assets.extra", "export_metadata.json")) as f:
    assert json.load(f)["version"] == 1
  # Different checkpoints, different weights.
  first = exports.load_keras_trunk(os.path.join(export_dir, "1"))
  second = exports.load_keras_trunk(export_dir)
  assert any(not np.array_equal(a.numpy(), b.numpy()) for a, b in zip(first.weights, second.weights))


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_is_named_and_skipped_by_export_and_evaluation(tmp_path, run_dir):
  import shutil
  from tf_mtssl.runs import trunk_source
  run = str(tmp_path / "run")
  shutil.copytree(run_dir, run)
  (data,) = tf.io.gfile.glob(os.path.join(run, "ckpt-2.data-*"))
  with open(data, "r+b") as f:
    f.truncate(os.path.getsize(data) // 2)
  log_dir = tmp_path / "log"
  log_dir.mkdir()
  binary = _export_binary(str(log_dir), f"--model_dir={run}", f"--export_dir={tmp_path / 'exports'}",
                          f"--image_size={IMAGE_SIZE}")
  binary.wait(timeout=300)
  stdout, stderr = (open(os.path.join(log_dir, n)).read() for n in ("stdout", "stderr"))
  assert binary.returncode == 0, stderr[-3000:]
  assert "Traceback" not in stderr
  assert f"Checkpoint {run}/ckpt-2 is unreadable ({data}: Read less bytes than requested)" in stderr
  assert f"Using {run}/ckpt-1, the newest readable checkpoint" in stderr
  assert f"Exported {run}/ckpt-1 as version 1" in stdout
  assert exports.read_metadata(str(tmp_path / "exports"))["step"] == 1
  # The evaluations' trunk source does the same, and records the checkpoint it really read.
  _, provenance = trunk_source.load_trunk("pretrained", model_dir=run)
  assert provenance["checkpoint"] == os.path.join(run, "ckpt-1") and provenance["step"] == 1
