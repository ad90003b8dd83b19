"""The model server (tf_mtssl.serve) as a subprocess, driven by standard TF Serving clients; the batcher."""

import base64
import concurrent.futures
import http.client
import io
import ipaddress
import json
import os
import queue
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib

import grpc
import numpy as np
import psutil
import pytest
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2

from tf_mtssl.serving import image_headers
from tf_mtssl.serving import client as serving_client
from tf_mtssl.serving import errors as serving_errors
from tf_mtssl.serving import model_server
from tests import helpers
from tf_mtssl.serving import export as export_lib
from tf_mtssl.model import trunk as trunk_lib

IMAGE_SIZE = 64
START_TIMEOUT_S = 240
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
# The module's server runs with small limits so that tests can cross them cheaply.
# The module's server and export are made once (session-scoped fixtures; all its tests on one xdist worker:
# conftest.ONE_WORKER_MODULES).

SERVER_LIMITS = dict(max_body_mb=1, max_instances=8, max_image_pixels=250_000)
README_IMAGE = "data/embedded/images/opencv_baboon.jpg"  # the README's example image (180 KB)


_jpeg = helpers.jpeg_bytes


class _Server:
  """`python -m tf_mtssl.serve` in a subprocess; its stdout lines are collected by a thread."""

  def __init__(self, export_dir: str):
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "tf_mtssl.serve", f"--export_dir={export_dir}", "--port=0", "--rest_port=0",
         "--poll_seconds=1", *(f"--{k}={v}" for k, v in SERVER_LIMITS.items()),  # --host: its default
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


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
  """A tiny random trunk exported as version 1 (serving needs an export, not a trained one)."""
  path = str(tmp_path_factory.mktemp("exports"))
  export_lib.export_trunk(trunk_lib.build_trunk(**helpers.TINY_TRUNK), path, image_size=IMAGE_SIZE)
  return path


@pytest.fixture(scope="session")
def server(export_dir):
  srv = _Server(export_dir)
  try:
    srv.grpc_port = int(srv.wait_for(r"gRPC PredictionService listening on \S+ port (\d+)").group(1))
    srv.rest_port = int(srv.wait_for(r"REST API listening on \S+ port (\d+)").group(1))
    yield srv
  finally:
    srv.stop()


@pytest.fixture(scope="session")
def huge_png():
  return _black_png(8000, 8000)


@pytest.fixture(scope="session")
def reference(export_dir):
  """Outputs of version 1 computed in this process."""
  return tf.saved_model.load(os.path.join(export_dir, "1")).signatures["serving_default"]


@pytest.fixture(scope="session")
def stub(server):
  return serving_client.make_stub(f"127.0.0.1:{server.grpc_port}")


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
  response = stub.Predict(serving_client.predict_request(images), timeout=60)
  assert response.model_spec.name == "tf_mtssl" and response.model_spec.version.value == 1
  assert response.model_spec.signature_name == "serving_default"
  expected = reference(image_bytes=tf.constant(images))
  assert set(response.outputs) == {"features", "block3", "grid"}
  for key, proto in response.outputs.items():
    helpers.assert_close(tf.make_ndarray(proto), expected[key].numpy())
  assert tf.make_ndarray(response.outputs["features"]).shape == (2, 16 * helpers.TINY_TRUNK["base_width"])
  filtered = stub.Predict(serving_client.predict_request(images[:1], outputs=["grid"]), timeout=60)
  assert list(filtered.outputs) == ["grid"] and tf.make_ndarray(filtered.outputs["grid"]).shape[:3] == (1, 3, 3)


def test_corrupt_bytes_are_invalid_argument_and_the_server_keeps_serving(stub):
  error = _rpc_error(stub.Predict, serving_client.predict_request([_jpeg(2), b"not an image at all"]))
  assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert "element(s) [1]" in error.details() and "could not be decoded" in error.details()
  good = stub.Predict(serving_client.predict_request([_jpeg(3)]), timeout=60)
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

  error = _rpc_error(stub.Predict, serving_client.predict_request([_jpeg(0)], model_name="resnet"))
  assert error.code() == grpc.StatusCode.NOT_FOUND and "'resnet' not found" in error.details()

  error = _rpc_error(stub.Predict, serving_client.predict_request([_jpeg(0)], signature_name="classify"))
  assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "signature 'classify' not found" in error.details()

  error = _rpc_error(stub.Predict, serving_client.predict_request([_jpeg(0)], outputs=["logits"]))
  assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown output(s) ['logits']" in error.details()

  wrong_version = serving_client.predict_request([_jpeg(0)])
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
        lambda im: stub.Predict(serving_client.predict_request([im], outputs=["features"]), timeout=120), images))
  expected = reference(image_bytes=tf.constant(images))["features"].numpy()
  got = np.concatenate([tf.make_ndarray(r.outputs["features"]) for r in responses])
  helpers.assert_close(got, expected)


def test_rest_predict_status_and_errors(server, reference):
  image = _jpeg(4)
  status, body = _rest(server, "/v1/models/tf_mtssl:predict",
                       {"instances": [{"b64": base64.b64encode(image).decode()}]})
  assert status == 200, body
  expected = reference(image_bytes=tf.constant([image]))
  helpers.assert_close(body["predictions"][0]["features"], expected["features"][0])
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


@pytest.mark.slow
def test_client_binary_writes_npy_features(server, tmp_path):
  paths = []
  for i in range(3):
    paths.append(str(tmp_path / f"im{i}.jpg"))
    with open(paths[-1], "wb") as f:
      f.write(_jpeg(20 + i))
  proc = subprocess.run([sys.executable, "-m", "tf_mtssl.client", f"--server=127.0.0.1:{server.grpc_port}",
                         f"--output_dir={tmp_path / 'out'}", "--batch_size=2", "--outputs=features,grid",
                         *paths], cwd=helpers.REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "features: shape [3, 128]" in proc.stdout
  assert np.load(tmp_path / "out" / "features.npy").shape == (3, 128)
  assert np.load(tmp_path / "out" / "grid.npy").shape == (3, 3, 3, 128)
  assert open(tmp_path / "out" / "images.txt").read().split() == paths


# ---- limits, ports and the documented commands (issue 15, items 8-11) ------------------------------
def _png_claiming(height: int, width: int, idat: bytes) -> bytes:
  """A PNG whose IHDR states height x width (RGB, 8 bit) around the given IDAT payload."""
  def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) +
          chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _black_png(height: int, width: int) -> bytes:
  """A real, valid PNG of height x width black pixels, compressed row by row (8000x8000: ~190 KB)."""
  compressor = zlib.compressobj(9)
  row = b"\x00" * (1 + 3 * width)  # filter byte + RGB
  idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
  return _png_claiming(height, width, idat)


def _jpeg_claiming(height: int, width: int) -> bytes:
  """A small real JPEG whose baseline frame header (SOF0) is rewritten to state height x width."""
  data = bytearray(_jpeg(6))
  sof = data.index(b"\xff\xc0")
  data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
  return bytes(data)


def _peak_rss_mb(pid: int) -> float:
  """The process's peak resident memory (Linux VmHWM), in MiB."""
  return float(re.search(r"VmHWM:\s+(\d+) kB", open(f"/proc/{pid}/status").read()).group(1)) / 1024


def _b64_instances(images):
  return {"instances": [{"b64": base64.b64encode(im).decode()} for im in images]}


def test_the_server_listens_on_loopback_only_by_default(server):
  listening = [c for c in psutil.Process(server.proc.pid).net_connections(kind="inet")
               if c.status == psutil.CONN_LISTEN]
  ports = {c.laddr.port for c in listening}
  assert {server.grpc_port, server.rest_port} <= ports, listening
  for c in listening:
    address = ipaddress.ip_address(c.laddr.ip.split("%")[0])
    address = getattr(address, "ipv4_mapped", None) or address
    assert address.is_loopback, f"listening on {c.laddr.ip}:{c.laddr.port} without --host"
  assert "listening on 127.0.0.1 port" in "".join(server.output)


@pytest.mark.slow
def test_a_second_server_on_the_same_grpc_port_fails_with_one_line(server, export_dir, stub):
  proc = subprocess.run([sys.executable, "-m", "tf_mtssl.serve", f"--export_dir={export_dir}",
                         f"--port={server.grpc_port}", "--poll_seconds=0"],
                        cwd=helpers.REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"Error: Could not bind the gRPC port 127.0.0.1:{server.grpc_port}"), proc.stderr
  assert "in use" in last and "listening" not in proc.stdout
  for _ in range(4):  # fresh channels still reach the one server
    fresh = serving_client.make_stub(f"127.0.0.1:{server.grpc_port}")
    assert fresh.Predict(serving_client.predict_request([_jpeg(7)]), timeout=60).model_spec.version.value == 1


def test_rest_body_over_the_limit_is_413_and_the_server_keeps_serving(server, reference):
  too_big = {"instances": [{"b64": base64.b64encode(b"\x00" * (SERVER_LIMITS["max_body_mb"] << 20)).decode()}]}
  status, body = _rest(server, "/v1/models/tf_mtssl:predict", too_big)
  assert status == 413 and "max_body_mb" in body["error"], body
  connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=60)
  payload = json.dumps(too_big).encode()
  connection.request("POST", "/v1/models/tf_mtssl:predict",
                     body=(payload[i:i + 65536] for i in range(0, len(payload), 65536)),
                     headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
  response = connection.getresponse()
  assert response.status == 413 and "max_body_mb" in json.loads(response.read())["error"]
  connection.close()
  image = _jpeg(8)
  status, body = _rest(server, "/v1/models/tf_mtssl:predict", _b64_instances([image]))
  assert status == 200
  helpers.assert_close(body["predictions"][0]["features"],
                       reference(image_bytes=tf.constant([image]))["features"][0], rtol=1e-4)


def test_a_chunked_rest_body_is_accepted(server, reference):
  images = [_jpeg(9), _jpeg(10)]
  payload = json.dumps(_b64_instances(images)).encode()
  connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=60)
  for _ in range(2):  # the same connection serves a second request after a chunked one
    connection.request("POST", "/v1/models/tf_mtssl:predict",
                       body=(payload[i:i + 1000] for i in range(0, len(payload), 1000)),
                       headers={"Content-Type": "application/json"}, encode_chunked=True)
    response = connection.getresponse()
    body = json.loads(response.read())
    assert response.status == 200, body
    helpers.assert_close([p["features"] for p in body["predictions"]],
                         reference(image_bytes=tf.constant(images))["features"], rtol=1e-4)
  connection.close()


def test_a_batch_over_the_limit_is_refused_on_both_protocols(server, stub):
  images = [_jpeg(30 + i) for i in range(SERVER_LIMITS["max_instances"] + 1)]
  status, body = _rest(server, "/v1/models/tf_mtssl:predict", _b64_instances(images))
  assert status == 400 and f"{len(images)} examples" in body["error"] and "max_instances" in body["error"]
  error = _rpc_error(stub.Predict, serving_client.predict_request(images))
  assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_instances" in error.details()
  full = stub.Predict(serving_client.predict_request(images[:-1], outputs=["features"]), timeout=60)
  assert tf.make_ndarray(full.outputs["features"]).shape[0] == SERVER_LIMITS["max_instances"]


def test_an_empty_grpc_batch_is_a_clear_invalid_argument(stub):
  error = _rpc_error(stub.Predict, serving_client.predict_request([]))
  assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert "no examples" in error.details() and "Incompatible shapes" not in error.details()


def test_image_pixels_are_checked_from_the_header_before_decoding(server, stub, huge_png):
  side = int(SERVER_LIMITS["max_image_pixels"] ** 0.5) + 1
  before = _peak_rss_mb(server.proc.pid)
  for image in (huge_png, _black_png(side, side)):
    status, body = _rest(server, "/v1/models/tf_mtssl:predict", _b64_instances([_jpeg(11), image]))
    assert status == 400 and "element 1" in body["error"] and "max_image_pixels" in body["error"], body
  # Headers that claim a huge image over unreadable data: refused for the size, not for the data,
  # so nothing was decoded.
  for image, dims in ((_jpeg_claiming(8000, 8000), "8000x8000"), (_png_claiming(8000, 8000, b"junk"), "8000x8000")):
    error = _rpc_error(stub.Predict, serving_client.predict_request([image]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and dims in error.details(), error.details()
    assert "could not be decoded" not in error.details()
  assert _peak_rss_mb(server.proc.pid) - before < 100  # decoding 8000x8000 RGB alone takes 183 MB
  tensor = predict_pb2.PredictRequest()
  tensor.model_spec.name, tensor.model_spec.signature_name = "tf_mtssl", "image_tensor"
  tensor.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros([1, side, side, 3], np.float32)))
  error = _rpc_error(stub.Predict, tensor)
  assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_image_pixels" in error.details()
  ok = stub.Predict(serving_client.predict_request([_jpeg(12)]), timeout=60)
  assert tf.make_ndarray(ok.outputs["features"]).shape[0] == 1


def test_default_limits_refuse_a_small_png_that_decodes_to_8000x8000(export_dir, huge_png):
  assert len(huge_png) < 200_000
  core = model_server.ModelServer(export_dir, poll_seconds=0, warm_up=False)
  try:
    with pytest.raises(serving_errors.ServingError, match="8000x8000") as info:
      core.predict("tf_mtssl", None, "", {"image_bytes": np.array([huge_png], dtype=object)})
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
  finally:
    core.close()


def test_image_header_sizes_match_what_decoding_gives():
  from PIL import Image
  rng = np.random.default_rng(14)
  frames = [Image.fromarray(rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)) for _ in range(3)]
  encoded = {}
  for name, fmt, options in (("JPEG", "JPEG", {}), ("progressive JPEG", "JPEG", {"progressive": True}),
                             ("PNG", "PNG", {}), ("GIF", "GIF", {}), ("BMP", "BMP", {}),
                             ("lossy WebP", "WEBP", {"lossless": False}), ("lossless WebP", "WEBP", {"lossless": True}),
                             ("extended WebP", "WEBP", {"exif": b"Exif\x00\x00tag"})):
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, **options)
    encoded[name] = buffer.getvalue()
  for name, data in encoded.items():
    decoded = tf.io.decode_image(data, channels=3, expand_animations=False).shape
    size = image_headers.decoded_size(data)
    assert size.pixels == decoded[0] * decoded[1] == 37 * 53 and "53x37" in size.description, name
  for fmt in ("GIF", "WEBP"):  # animations: every frame is decoded, so every frame counts
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    size = image_headers.decoded_size(buffer.getvalue())
    assert size.pixels == 3 * 37 * 53 and "(3 frames)" in size.description, fmt
  for data in (b"not an image", b"\x89PNG\r\n\x1a\n", encoded["PNG"][:20], encoded["JPEG"][:30]):
    assert image_headers.decoded_size(data) is None  # decoding then fails, allocating nothing
  with pytest.raises(ValueError, match="JPEG XL"):
    image_headers.decoded_size(b"\xff\x0a" + b"\x00" * 16)


def test_the_readme_request_file_command_serves_an_image_over_96_kb(server, tmp_path, reference):
  """The README's curl lines, run as written, for an image whose base64 would not fit in argv."""
  rng = np.random.default_rng(13)
  image = tf.io.encode_jpeg(rng.integers(0, 256, size=(320, 320, 3), dtype=np.uint8), quality=98).numpy()
  assert len(image) > 130 * 1024  # base64 over 128 KiB: the old `curl -d "...$(base64 img)..."` fails
  (tmp_path / "big.jpg").write_bytes(image)
  blocks = re.findall(r"^```bash\n(.*?)^```", (helpers.REPO_ROOT / "README.md").read_text(), re.M | re.S)
  lines = [line for block in blocks for line in block.splitlines() if "request.json" in line]
  assert len(lines) == 2, lines  # builds request.json, then POSTs it
  script = "\n".join(lines).replace(README_IMAGE, "big.jpg").replace("localhost:8501", f"127.0.0.1:{server.rest_port}")
  proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  body = json.loads(proc.stdout)
  helpers.assert_close(body["predictions"][0]["features"],
                       reference(image_bytes=tf.constant([image]))["features"][0], rtol=1e-4)


@pytest.mark.slow
def test_client_skips_a_bad_image_and_never_mixes_with_an_earlier_output(server, tmp_path):
  paths = [str(tmp_path / name) for name in ("a.jpg", "broken.jpg", "b.jpg", "missing.jpg")]
  for path, data in zip(paths[:3], (_jpeg(40), b"truncated \xff\xd8 nonsense", _jpeg(41))):
    with open(path, "wb") as f:
      f.write(data)
  out = tmp_path / "out"
  out.mkdir()
  (out / "block3.npy").write_bytes(b"an earlier run's output")
  (out / "images.txt").write_text("earlier.jpg\n")
  command = [sys.executable, "-m", "tf_mtssl.client", f"--server=127.0.0.1:{server.grpc_port}",
             f"--output_dir={out}", "--batch_size=4", "--outputs=features", *paths]
  refused = subprocess.run(command, cwd=helpers.REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  assert refused.returncode == 2 and "--overwrite" in refused.stderr.strip().splitlines()[-1], refused.stderr
  assert (out / "block3.npy").read_bytes() == b"an earlier run's output"
  proc = subprocess.run(command + ["--overwrite"], cwd=helpers.REPO_ROOT, env=ENV, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert re.search(r"skipped .*broken\.jpg: .*could not be decoded", proc.stderr), proc.stderr
  assert re.search(r"skipped .*missing\.jpg: ", proc.stderr), proc.stderr
  assert "features: shape [2, 128]" in proc.stdout
  assert open(out / "images.txt").read().split() == [paths[0], paths[2]]
  assert np.load(out / "features.npy").shape == (2, 128)
  assert not (out / "block3.npy").exists()  # the earlier run's output does not sit beside the new rows


@pytest.mark.slow
def test_a_newer_version_is_served_once_exported(server, export_dir, stub):
  export_lib.export_trunk(trunk_lib.build_trunk(**helpers.TINY_TRUNK), export_dir, image_size=IMAGE_SIZE)
  server.wait_for(r"Now serving tf_mtssl version 2", timeout=120)
  response = stub.Predict(serving_client.predict_request([_jpeg(5)]), timeout=60)
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
      raise serving_errors.ServingError(grpc.StatusCode.INVALID_ARGUMENT, "negative input")
    return {"y": inputs["x"] * 2}


def test_batcher_merges_requests_that_arrive_while_busy_and_isolates_bad_ones():
  batcher = model_server.DynamicBatcher(max_batch_size=8, timeout_s=0.0, num_threads=1)
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
      with pytest.raises(serving_errors.ServingError, match="negative"):
        rest[-1].result()
    # One call alone, one merged call of the 5 queued requests (it failed on the bad one), then
    # each of those 5 rerun alone so that only the bad request fails.
    assert signature.calls[:2] == [1, 5] and signature.calls[2:] == [1] * 5
  finally:
    batcher.stop()
  assert model_server.resolve_batching("on") and not model_server.resolve_batching("off")
  with pytest.raises(ValueError, match="batching must be one of"):
    model_server.resolve_batching("sometimes")
