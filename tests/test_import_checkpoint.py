"""Import of tf-slim ResNet-v2 checkpoints, checked against the ORIGINAL slim architecture code.

`tests/slim_reference.py` builds slim's `resnet_v2` (tf-slim 1.1.0, TF1 graph mode, in a subprocess),
writes a TF1 checkpoint with random weights and batch-norm statistics and slim's own block-3 outputs;
the import must reproduce them, refuse what does not fit, and give a run directory that evaluation,
export and the server take unchanged.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests import helpers

# Fixtures train or convert a model (tens of seconds): slow, and made once: the module's tests stay on one
# xdist worker (conftest.ONE_WORKER_MODULES) and its fixtures are session-scoped (a module-scoped one is
# rebuilt whenever the worker runs another module's test in between).
pytestmark = pytest.mark.slow
from tf_mtssl.runs import checkpoints
from tf_mtssl.model import preprocessing
from tf_mtssl.runs import slim_import as slim_checkpoint
from tf_mtssl.model import trunk as trunk_lib

TINY_DEPTH = 26          # 2 units per block: projection, identity and strided-subsample shortcuts
SCOPE = f"resnet_v2_{TINY_DEPTH}"
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="session")
def slim_ref(tmp_path_factory):
  out = tmp_path_factory.mktemp("slim_ref")
  proc = subprocess.run([sys.executable, "-m", "tests.slim_reference", f"--out={out}",
                         f"--tiny_depth={TINY_DEPTH}", "--names_depths=101"],
                        cwd=helpers.REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out


def _reference(slim_ref):
  return dict(np.load(slim_ref / "reference.npz"))


def _close(ours, theirs):
  """Relative to the values' scale (oneDNN kernels differ between CPUs): 1e-4 of the largest value."""
  helpers.assert_close(ours, theirs, rtol=1e-4)


def _rewrite(src_prefix, dst_prefix, drop=(), replace=None):
  """A copy of a name-based (TF1) checkpoint without `drop` and with `replace` {name: array}."""
  reader = tf.train.load_checkpoint(src_prefix)
  values = {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map() if n not in drop}
  values.update(replace or {})
  names = sorted(values)
  tf.raw_ops.SaveV2(prefix=str(dst_prefix), tensor_names=names, shape_and_slices=[""] * len(names),
                    tensors=[tf.constant(values[n]) for n in names])
  return str(dst_prefix)


@pytest.mark.parametrize("output_stride", [16, 32])
def test_block3_and_its_units_reproduce_slim(slim_ref, output_stride):
  ref = _reference(slim_ref)
  trunk, report = slim_checkpoint.load_slim_trunk(str(slim_ref), depth=TINY_DEPTH, output_stride=output_stride)
  assert report["scope"] == SCOPE
  assert report["trunk"] == {"depth": TINY_DEPTH, "output_stride": output_stride, "base_width": 64}
  out = trunk(ref["images"], training=False)
  _close(out["block3"], ref[f"block3_os{output_stride}"])
  if output_stride == 16:
    assert len(out["units"]) == 2
    for i, unit in enumerate(out["units"], start=1):
      _close(unit, ref[f"unit_{i}_os16"])
  # Block 4, postnorm, logits and global_step were in the checkpoint and are ignored, listed.
  assert report["ignored_summary"] == {"block4": 18, "global_step": 1, "logits": 2, "postnorm": 4}
  assert f"{SCOPE}/logits/weights" in report["ignored"]
  assert report["num_imported"] == len(trunk.weights)


@pytest.mark.parametrize("depth", [101])
def test_every_trunk_weight_has_its_slim_resnet_v2_variable(slim_ref, depth):
  with open(slim_ref / f"names_{depth}.json") as f:
    slim_shapes = json.load(f)
  trunk = trunk_lib.build_trunk(depth)
  mapping = slim_checkpoint.trunk_variable_map(trunk, f"resnet_v2_{depth}")
  assert len(mapping) == len(trunk.weights)
  for variable, name, layer in mapping:
    assert slim_shapes.get(name) == list(variable.shape), (name, layer)
  rest = sorted(set(slim_shapes) - {n for _, n, _ in mapping})
  assert set(slim_checkpoint.ignored_summary(rest, f"resnet_v2_{depth}")) == {"block4", "postnorm", "logits"}


def test_missing_variable_is_refused_by_name(slim_ref, tmp_path):
  name = f"{SCOPE}/block3/unit_2/bottleneck_v2/preact/gamma"
  prefix = _rewrite(slim_ref / "model.ckpt", tmp_path / "missing.ckpt", drop=[name])
  with pytest.raises(ValueError, match=f"variable {name} is missing"):
    slim_checkpoint.load_slim_trunk(prefix, depth=TINY_DEPTH)


def test_misshaped_and_non_finite_variables_are_refused_by_name(slim_ref, tmp_path):
  name = f"{SCOPE}/block2/unit_1/bottleneck_v2/conv2/weights"
  prefix = _rewrite(slim_ref / "model.ckpt", tmp_path / "shape.ckpt",
                    replace={name: np.zeros([3, 3, 128, 64], np.float32)})
  with pytest.raises(ValueError, match=rf"variable {name} has shape \[3, 3, 128, 64\].*block2_unit1_conv2 "
                                       r"expects \[3, 3, 128, 128\]"):
    slim_checkpoint.load_slim_trunk(prefix, depth=TINY_DEPTH)
  bad = np.full([128], np.nan, np.float32)
  name = f"{SCOPE}/block2/unit_1/bottleneck_v2/conv1/BatchNorm/moving_variance"
  prefix = _rewrite(slim_ref / "model.ckpt", tmp_path / "nan.ckpt", replace={name: bad})
  with pytest.raises(ValueError, match=f"variable {name} holds non-finite values"):
    slim_checkpoint.load_slim_trunk(prefix, depth=TINY_DEPTH)


def test_depth_that_does_not_fit_is_refused_with_the_one_that_does(slim_ref):
  with pytest.raises(ValueError, match=r"--depth=101 does not fit .*\(3, 4, 23\) units.*"
                                       rf"{SCOPE} has \(2, 2, 2\).*it fits --depth=26"):
    slim_checkpoint.load_slim_trunk(str(slim_ref), depth=101)


def test_not_a_checkpoint_and_unknown_scope_are_clear_errors(slim_ref, tmp_path):
  with pytest.raises(FileNotFoundError, match="no TF checkpoint there"):
    slim_checkpoint.load_slim_trunk(str(tmp_path / "nothing.ckpt"))
  with pytest.raises(ValueError, match=rf"--scope=resnet_v2_50.*scopes found: \['{SCOPE}'\]"):
    slim_checkpoint.load_slim_trunk(str(slim_ref), depth=TINY_DEPTH, scope="resnet_v2_50")


def test_run_directory_records_the_convention_and_restores(slim_ref, tmp_path):
  ref = _reference(slim_ref)
  model_dir = tmp_path / "run"
  report = slim_checkpoint.import_slim_checkpoint(str(slim_ref / "model.ckpt"), str(model_dir),
                                                  depth=TINY_DEPTH, convention=preprocessing.INCEPTION)
  config = checkpoints.load_run_config(str(model_dir))
  assert checkpoints.input_convention(config) == preprocessing.INCEPTION
  assert config["imported_from"]["scope"] == SCOPE and config["imported_from"]["ignored"] == report["ignored"]
  trunk = checkpoints.restore_trunk(str(model_dir))
  _close(trunk(ref["images"], training=False)["block3"], ref["block3_os16"])
  assert sorted(os.listdir(tmp_path)) == ["run"]  # no temporary directory left behind
  # A second import into the same (now non-empty) directory is refused and changes nothing.
  before = {p: os.path.getmtime(model_dir / p) for p in os.listdir(model_dir)}
  with pytest.raises(ValueError, match="is not empty"):
    slim_checkpoint.import_slim_checkpoint(str(slim_ref), str(model_dir), depth=TINY_DEPTH)
  assert {p: os.path.getmtime(model_dir / p) for p in os.listdir(model_dir)} == before


def test_pretraining_runs_record_vgg_and_old_runs_default_to_it():
  assert checkpoints.input_convention({}) == preprocessing.VGG
  with pytest.raises(ValueError, match="Unknown input convention"):
    checkpoints.input_convention({"preprocessing": "caffe"})


def test_input_conventions_and_their_inverses():
  rgb = np.array([[0.0, 127.5, 255.0]], np.float32)
  np.testing.assert_allclose(preprocessing.rgb_to_trunk_input(rgb, "inception"), [[-1.0, 0.0, 1.0]], atol=1e-6)
  np.testing.assert_allclose(preprocessing.rgb_to_trunk_input(rgb, "vgg"),
                             rgb - np.array(preprocessing.VGG_RGB_MEAN), rtol=1e-6)
  for convention in preprocessing.INPUT_CONVENTIONS:
    back = preprocessing.trunk_input_to_rgb(preprocessing.rgb_to_trunk_input(rgb, convention), convention)
    np.testing.assert_allclose(back, rgb / 255.0, rtol=1e-5, atol=1e-6)


def _labelled_folder(root):
  """root/{train,val}/{a,b}/*.png: two classes of real photos (scikit-image), 64 px."""
  for split in ("train", "val"):
    for label, names in (("a", ("astronaut", "coffee")), ("b", ("chelsea", "rocket"))):
      helpers.write_photos(root / split / label, size=64, names=names)
  return root


@pytest.mark.slow
def test_import_evaluate_export_serve_end_to_end(slim_ref, tmp_path):
  """The binaries in their own processes: import (inception convention) -> evaluate_linear -> export ->
  serve. The served features are the imported trunk's on [-1, 1] inputs, not on VGG ones."""
  from tf_mtssl.serving import client as serving_client
  from tests import test_serving
  from tf_mtssl.serving import export as export_lib
  from tf_mtssl.runs import exports
  from tf_mtssl.evaluation import outputs

  def run(*args):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=helpers.REPO_ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc

  model_dir, export_dir = tmp_path / "run", tmp_path / "exports"
  out = run("tf_mtssl.import_checkpoint", f"--slim_checkpoint={slim_ref / 'model.ckpt'}", f"--model_dir={model_dir}",
            f"--depth={TINY_DEPTH}", "--preprocessing=inception").stdout
  assert "Ignored:     25 variables: block4 (18), global_step (1), logits (2), postnorm (4)" in out, out
  assert "Input:       inception" in out

  data = _labelled_folder(tmp_path / "photos")
  run("tf_mtssl.evaluate_linear", f"--model_dir={model_dir}", f"--data={data}", "--image_size=64",
      "--train_steps=3", "--batch_size=4", "--lr_boundaries=", f"--output_dir={tmp_path / 'linear'}")
  result = json.loads((tmp_path / "linear" / outputs.RESULTS_FILE).read_text())
  assert result["config"]["preprocessing"] == "inception" and result["trunk"]["source"] == "run"
  assert result["num_eval"] == 4 and 0.0 <= result["top1"] <= 1.0

  run("tf_mtssl.export_saved_model", f"--model_dir={model_dir}", f"--export_dir={export_dir}", "--image_size=64")
  assert exports.input_convention(str(export_dir)) == "inception"

  image = helpers.jpeg_bytes(5, 90, 70)
  trunk = checkpoints.restore_trunk(str(model_dir))
  rgb = export_lib.decode_and_resize(tf.constant(image), 64)[None]
  want = {c: tf.reduce_mean(trunk(preprocessing.rgb_to_trunk_input(rgb, c), training=False)["block3"],
                            axis=[1, 2]).numpy() for c in ("inception", "vgg")}
  server = test_serving._Server(str(export_dir))
  try:
    port = int(server.wait_for(r"gRPC PredictionService listening on \S+ port (\d+)").group(1))
    response = serving_client.make_stub(f"127.0.0.1:{port}").Predict(serving_client.predict_request([image]), timeout=60)
  finally:
    server.stop()
  served = tf.make_ndarray(response.outputs["features"])
  _close(served, want["inception"])
  assert np.abs(served - want["vgg"]).max() > 0.1 * np.abs(want["inception"]).max()
