"""The model server (export.serve) as a subprocess, driven by standard TF Serving clients; the batcher."""

import base64
import concurrent.futures
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2

from export import server_lib
from tests import helpers
from tf_mtssl import export_lib
from tf_mtssl import trunk as trunk_lib

IMAGE_SIZE = 64
START_TIMEOUT_S = 240
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}


def _jpeg(seed: int, h: int = 80, w: int = 72) -> bytes:
  rng = np.random.default_rng(seed)
  small = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.float32)
  image = tf.cast(tf.image.resize(small, [h, w]), tf.uint8)
  return tf.io.encode_jpeg(image).numpy()


class _Server:
  """`python -m export.serve` in a subprocess; its stdout lines are collected by a thread."""

  def __init__(self, export_dir: str):
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "export.serve", f"--export_dir={export_dir}", "--port=0", "--rest_port=0",
         "--host=127.0.0.1", "--poll_seconds=1",
         "--batching=on"],  # the merging path with the real model (auto turns it off on a CPU)
        cwd=helpers.REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.lines: "queue.Queue[str]" = queue.Queue()
    self.output = []
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.proc.stdout:
      self.output.append(line)
      self.lines.put(line)

  def wait_for(self, pattern: str, timeout: float = START_TIMEOUT_S) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      try:
        line = self.lines.get(timeout=0.5)
      except queue.Empty:
        if self.proc.poll() is not None:
          break
        continue
      match = re.search(pattern, line)
      if match:
        return match
    raise AssertionError(f"server never printed {pattern!r}; output:\n{''.join(self.output)[-4000:]}")

  def stop(self):
    """By PID: SIGTERM, then SIGKILL if it does not stop within 30 s."""
    if self.proc.poll() is None:
      os.kill(self.proc.pid, signal.SIGTERM)
      try:
        self.proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
  """A tiny random trunk exported as version 1 (serving needs an export, not a trained one)."""
  path = str(tmp_path_factory.mktemp("exports"))
  export_lib.export_trunk(trunk_lib.build_trunk(**helpers.TINY_TRUNK), path, image_size=IMAGE_SIZE)
  return path


@pytest.fixture(scope="module")
def server(export_dir):
  srv = _Server(export_dir)
  try:
    srv.grpc_port = int(srv.wait_for(r"gRPC PredictionService listening on \S+ port (\d+)").group(1))
    srv.rest_port = int(srv.wait_for(r"REST API listening on \S+ port (\d+)").group(1))
    yield srv
  finally:
    srv.stop()


@pytest.fixture(scope="module")
def reference(export_dir):
  """Outputs of version 1 computed in this process."""
  return tf.saved_model.load(os.path.join(export_dir, "1")).signatures["serving_default"]


@pytest.fixture(scope="module")
def stub(server):
  return server_lib.make_stub(f"127.0.0.1:{server.grpc_port}")


def _rest(server, path, body=None):
  request = urllib.request.Request(f"http://127.0.0.1:{server.rest_port}{path}",
                                   data=None if body is None else json.dumps(body).encode(),
                                   method="GET" if body is None else "POST")
  try:
    with urllib.request.urlopen(request, timeout=60) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def _rpc_error(call, *args, **kwargs) -> grpc.RpcError:
  with pytest.raises(grpc.RpcError) as info:
    call(*args, timeout=60, **kwargs)
  return info.value


def test_grpc_predict_returns_the_features_of_jpeg_bytes(stub, reference):
  images = [_jpeg(0), _jpeg(1, 50, 120)]
  response = stub.Predict(server_lib.predict_request(images), timeout=60)
  assert response.model_spec.name == "tf_mtssl" and response.model_spec.version.value == 1
  assert response.model_spec.signature_name == "serving_default"
  expected = reference(image_bytes=tf.constant(images))
  assert set(response.outputs) == {"features", "block3", "grid"}
  for key, proto in response.outputs.items():
    np.testing.assert_allclose(tf.make_ndarray(proto), expected[key].numpy(), atol=1e-4)
  assert tf.make_ndarray(response.outputs["features"]).shape == (2, 16 * helpers.TINY_TRUNK["base_width"])
  filtered = stub.Predict(server_lib.predict_request(images[:1], outputs=["grid"]), timeout=60)
  assert list(filtered.outputs) == ["grid"] and tf.make_ndarray(filtered.outputs["grid"]).shape[:3] == (1, 3, 3)


def test_corrupt_bytes_are_invalid_argument_and_the_server_keeps_serving(stub):
  error = _rpc_error(stub.Predict, server_lib.predict_request([_jpeg(2), b"not an image at all"]))
  assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert "element(s) [1]" in error.details() and "could not be decoded" in error.details()
  good = stub.Predict(server_lib.predict_request([_jpeg(3)]), timeout=60)
  assert tf.make_ndarray(good.outputs["features"]).shape[0] == 1


def test_bad_requests_get_clear_status_codes(stub):
  missing = predict_pb2.PredictRequest()
  missing.model_spec.name = "tf_mtssl"
  missing.inputs["pictures"].CopyFrom(tf.make_tensor_proto([_jpeg(0)]))
  error = _rpc_error(stub.Predict, missing)
  assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "missing input(s) ['image_bytes']" in error.details()

  wrong_dtype = predict_pb2.PredictRequest()
  wrong_dtype.model_spec.name = "tf_mtssl"
  wrong_dtype.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(np.zeros([2], np.float32)))
  error = _rpc_error(stub.Predict, wrong_dtype)
  assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "must be DT_STRING (encoded images), got DT_FLOAT" in error.details()

  error = _rpc_error(stub.Predict, server_lib.predict_request([_jpeg(0)], model_name="resnet"))
  assert error.code() == grpc.StatusCode.NOT_FOUND and "'resnet' not found" in error.details()

  error = _rpc_error(stub.Predict, server_lib.predict_request([_jpeg(0)], signature_name="classify"))
  assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "signature 'classify' not found" in error.details()

  error = _rpc_error(stub.Predict, server_lib.predict_request([_jpeg(0)], outputs=["logits"]))
  assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown output(s) ['logits']" in error.details()

  wrong_version = server_lib.predict_request([_jpeg(0)])
  wrong_version.model_spec.version.value = 7
  error = _rpc_error(stub.Predict, wrong_version)
  assert error.code() == grpc.StatusCode.NOT_FOUND and "Version 7" in error.details()

  images = predict_pb2.PredictRequest()
  images.model_spec.name, images.model_spec.signature_name = "tf_mtssl", "image_tensor"
  images.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros([1, 32, 32, 4], np.float32)))
  error = _rpc_error(stub.Predict, images)
  assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "expected [batch, ?, ?, 3]" in error.details()
  images.inputs["images"].CopyFrom(tf.make_tensor_proto(np.full([1, 32, 32, 3], 128, np.float32)))
  assert tf.make_ndarray(stub.Predict(images, timeout=60).outputs["block3"]).shape == (1, 2, 2, 128)


def test_get_model_metadata_lists_the_signatures(stub):
  request = get_model_metadata_pb2.GetModelMetadataRequest()
  request.model_spec.name = "tf_mtssl"
  request.metadata_field.append("signature_def")
  response = stub.GetModelMetadata(request, timeout=60)
  assert response.model_spec.version.value == 1
  defs = get_model_metadata_pb2.SignatureDefMap()
  response.metadata["signature_def"].Unpack(defs)
  assert set(defs.signature_def) == {"serving_default", "image_tensor"}
  serving = defs.signature_def["serving_default"]
  assert serving.inputs["image_bytes"].dtype == tf.string.as_datatype_enum
  assert set(serving.outputs) == {"features", "block3", "grid"}
  request.metadata_field[:] = ["labels"]
  assert _rpc_error(stub.GetModelMetadata, request).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_concurrent_requests_are_all_answered_correctly(stub, reference):
  images = [_jpeg(10 + i) for i in range(6)]
  with concurrent.futures.ThreadPoolExecutor(6) as pool:
    responses = list(pool.map(
        lambda im: stub.Predict(server_lib.predict_request([im], outputs=["features"]), timeout=120), images))
  expected = reference(image_bytes=tf.constant(images))["features"].numpy()
  got = np.concatenate([tf.make_ndarray(r.outputs["features"]) for r in responses])
  np.testing.assert_allclose(got, expected, atol=1e-4)


def test_rest_predict_status_and_errors(server, reference):
  image = _jpeg(4)
  status, body = _rest(server, "/v1/models/tf_mtssl:predict",
                       {"instances": [{"b64": base64.b64encode(image).decode()}]})
  assert status == 200, body
  expected = reference(image_bytes=tf.constant([image]))
  np.testing.assert_allclose(body["predictions"][0]["features"], expected["features"][0], atol=1e-4)
  assert np.array(body["predictions"][0]["grid"]).shape == (3, 3, 128)
  status, body = _rest(server, "/v1/models/tf_mtssl")
  assert status == 200 and body["model_version_status"][0]["state"] == "AVAILABLE"
  status, body = _rest(server, "/v1/models/tf_mtssl:predict",
                       {"instances": [{"b64": base64.b64encode(b"garbage").decode()}]})
  assert status == 400 and "could not be decoded" in body["error"]
  status, body = _rest(server, "/v1/models/other:predict", {"instances": [1]})
  assert status == 404 and "'other' not found" in body["error"]
  status, body = _rest(server, "/v1/models/tf_mtssl:predict", {"signature_name": "image_tensor",
                                                               "instances": ["text"]})
  assert status == 400 and "float32" in body["error"]
  status, body = _rest(server, "/v1/models/tf_mtssl:predict", {"signature_name": "image_tensor",
                                                               "inputs": {"images": [[[[9.0] * 3] * 32] * 32]}})
  assert status == 200 and np.array(body["outputs"]["features"]).shape == (1, 128)


def test_client_binary_writes_npy_features(server, tmp_path):
  paths = []
  for i in range(3):
    paths.append(str(tmp_path / f"im{i}.jpg"))
    with open(paths[-1], "wb") as f:
      f.write(_jpeg(20 + i))
  proc = subprocess.run([sys.executable, "-m", "export.client", f"--server=127.0.0.1:{server.grpc_port}",
                         f"--output_dir={tmp_path / 'out'}", "--batch_size=2", "--outputs=features,grid",
                         *paths], cwd=helpers.REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "features: shape [3, 128]" in proc.stdout
  assert np.load(tmp_path / "out" / "features.npy").shape == (3, 128)
  assert np.load(tmp_path / "out" / "grid.npy").shape == (3, 3, 3, 128)
  assert open(tmp_path / "out" / "images.txt").read().split() == paths


def test_a_newer_version_is_served_once_exported(server, export_dir, stub):
  export_lib.export_trunk(trunk_lib.build_trunk(**helpers.TINY_TRUNK), export_dir, image_size=IMAGE_SIZE)
  server.wait_for(r"Now serving tf_mtssl version 2", timeout=120)
  response = stub.Predict(server_lib.predict_request([_jpeg(5)]), timeout=60)
  assert response.model_spec.version.value == 2
  assert _rest(server, "/v1/models/tf_mtssl")[1]["model_version_status"][0]["version"] == "2"


def test_server_stops_cleanly_on_sigterm(server):
  os.kill(server.proc.pid, signal.SIGTERM)
  assert server.proc.wait(timeout=60) == 0
  server.wait_for(r"^Stopped\.", timeout=10)


# ---- the batcher, in process ----------------------------------------------------------------------
class _SlowDouble:
  """A stand-in signature: 0.3 s per call, doubles x, rejects negative inputs."""
  name = "double"

  def __init__(self):
    self.calls = []

  def run(self, inputs):
    self.calls.append(len(inputs["x"]))
    time.sleep(0.3)
    if (inputs["x"] < 0).any():
      raise server_lib.ServingError(grpc.StatusCode.INVALID_ARGUMENT, "negative input")
    return {"y": inputs["x"] * 2}


def test_batcher_merges_requests_that_arrive_while_busy_and_isolates_bad_ones():
  batcher = server_lib.DynamicBatcher(max_batch_size=8, timeout_s=0.0, num_threads=1)
  signature = _SlowDouble()
  try:
    values = [np.array([float(i)], np.float32) for i in range(5)] + [np.array([-1.0], np.float32)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
      first = pool.submit(batcher.run, signature, {"x": values[0]})
      time.sleep(0.1)  # the first call is running; the others queue behind it
      rest = [pool.submit(batcher.run, signature, {"x": v}) for v in values[1:]]
      assert first.result()["y"].tolist() == [0.0]
      for i, future in enumerate(rest[:-1], start=1):
        assert future.result()["y"].tolist() == [2.0 * i]
      with pytest.raises(server_lib.ServingError, match="negative"):
        rest[-1].result()
    # One call alone, one merged call of the 5 queued requests (it failed on the bad one), then
    # each of those 5 rerun alone so that only the bad request fails.
    assert signature.calls[:2] == [1, 5] and signature.calls[2:] == [1] * 5
  finally:
    batcher.stop()
  assert server_lib.resolve_batching("on") and not server_lib.resolve_batching("off")
  with pytest.raises(ValueError, match="batching must be one of"):
    server_lib.resolve_batching("sometimes")
