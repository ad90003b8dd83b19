"""A TF Serving compatible model server for an export directory (gRPC and REST), in Python.

No TF Serving binary exists for this machine (shared/machine_notes.md), so this speaks its protocols:
  gRPC: tensorflow.serving.PredictionService Predict and GetModelMetadata (the tensorflow-serving-api
    protos; Classify/Regress/MultiInference answer UNIMPLEMENTED);
  REST: POST /v1/models/NAME[/versions/V]:predict (row "instances" or columnar "inputs", binary values
    as {"b64": ...}), GET /v1/models/NAME[/versions/V] (status), GET .../metadata.
It serves the newest integer version under the export directory and picks up newer ones as they
appear (polling, like TF Serving's file-system source). A real TF Serving binary serves the same
directory unchanged.

Errors: an unknown model or version is NOT_FOUND (REST 404); an unknown signature, missing or extra
input keys, a wrong dtype or shape, an unknown output filter, or bytes that are not an image are
INVALID_ARGUMENT (REST 400); the server keeps serving.

Limits (each a flag of tf_mtssl.serve): a request holds 1 to `max_instances` examples and every image
decodes to at most `max_image_pixels` pixels, both INVALID_ARGUMENT (REST 400), the pixels read from
the image header before any decoding (tf_mtssl/serving/image_headers.py); a REST body over `max_body_mb` is
413 (gRPC: its own RESOURCE_EXHAUSTED over `max_message_mb`). REST bodies come with Content-Length or
Transfer-Encoding: chunked. Ports are never shared: a port in use fails the start (gRPC's default
SO_REUSEPORT is turned off), and both ports are bound before the model loads, so that a clash fails
at once.

Batching: requests run on a thread pool. With batching on, compatible requests (same signature and
per-example shapes) that arrive while the model is busy are merged into one call of up to
`max_batch_size` examples; an idle server runs a request at once (`batch_timeout_ms` = 0 adds no
waiting). If a merged call fails on bad input, its requests are rerun one by one so that only the bad
request fails. `batching="auto"` (the default) turns it on only when a GPU is visible: on this
project's 2-core CPU one image already keeps every core busy through TF's intra-op threads, and
bench/serving_latency.py measured no throughput gain from larger batches (ResNet-101 at 224 px: about
4 images/s at batch 1, 2-3 at batch 8-16) while merged requests wait for each other; per-request calls
in parallel were as fast or faster.
"""

import base64
import collections
import concurrent.futures
import errno
import json
import logging
import os
import socket
import threading
import time
from http import server as http_server
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tf_mtssl.serving import image_headers
from tf_mtssl.serving import export as export_lib

log = logging.getLogger(__name__)

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
INTERNAL = grpc.StatusCode.INTERNAL
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
_HTTP_STATUS = {INVALID_ARGUMENT: 400, NOT_FOUND: 404, RESOURCE_EXHAUSTED: 413, UNAVAILABLE: 503,
                INTERNAL: 500}

# Defaults of tf_mtssl.serve's flags. [I] all four: none comes from the paper or TF Serving.
DEFAULT_HOST = "127.0.0.1"  # this machine only; 0.0.0.0 (every interface) is an explicit choice
DEFAULT_MAX_INSTANCES = 64  # 4x tf_mtssl.client's batch of 16; 4,096 took 35 s and a 280 MB reply
DEFAULT_MAX_IMAGE_PIXELS = 25_000_000  # a 6000x4000 camera photo (72 MB decoded) fits; 8000x8000 not
DEFAULT_MAX_BODY_MB = 64.0  # 64 images of about 750 KB (base64 adds a third)
REST_SOCKET_TIMEOUT_S = 60.0  # a REST client silent this long (mid-request or idle) frees its thread
REST_DRAIN_S = 5.0  # after refusing an unread body: how long to read and drop it, so the client
#                     reads the refusal instead of a reset connection
SIGNATURE_DEF_FIELD = "signature_def"  # the one metadata field TF Serving's GetModelMetadata knows


class ServingError(Exception):
  """A request error with its gRPC status code (mapped to an HTTP status for REST)."""

  def __init__(self, code: grpc.StatusCode, message: str):
    super().__init__(message)
    self.code, self.message = code, message

  @property
  def http_status(self) -> int:
    return _HTTP_STATUS.get(self.code, 500)


def _tf_error_message(error: tf.errors.OpError) -> str:
  """The cause line of a TF runtime error, without the "Graph execution error" preamble, the
  "Detected at node" trace and the graph node / op suffixes."""
  lines = [line for line in (error.message or str(error)).splitlines()
           if line.strip() and not line[0].isspace() and
           not line.startswith(("Graph execution error", "Detected at node", "<stack traces"))]
  text = lines[-1] if lines else str(error)
  for marker in (" [[", " [Op:"):
    text = text.split(marker)[0]
  return text.strip()


class Signature:
  """One serving signature of a loaded version: validation and execution."""

  def __init__(self, name: str, fn):
    self.name, self.fn = name, fn
    self.inputs: Dict[str, tf.TensorSpec] = dict(fn.structured_input_signature[1])
    self.outputs: Dict[str, tf.TensorSpec] = dict(fn.structured_outputs)

  def validate(self, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Checks keys, dtypes and shapes; returns arrays in the signature's dtypes."""
    missing = sorted(set(self.inputs) - set(inputs))
    extra = sorted(set(inputs) - set(self.inputs))
    if missing or extra:
      parts = ([f"missing input(s) {missing}"] if missing else []) + \
              ([f"unexpected input(s) {extra}"] if extra else [])
      raise ServingError(INVALID_ARGUMENT, f"{' and '.join(parts)}: signature '{self.name}' takes "
                         f"{self.describe_inputs()}")
    out = {}
    for key, spec in self.inputs.items():
      value = inputs[key]
      if spec.dtype == tf.string:
        if value.dtype.kind not in ("O", "S", "U"):
          raise ServingError(INVALID_ARGUMENT, f"input '{key}' of signature '{self.name}' must be "
                             f"DT_STRING (encoded images), got {_dtype_name(value.dtype)}")
        value = np.vectorize(_to_bytes, otypes=[object])(value) if value.size else value.astype(object)
      else:
        if value.dtype.kind not in ("f", "i", "u", "b"):
          raise ServingError(INVALID_ARGUMENT, f"input '{key}' of signature '{self.name}' must be "
                             f"{_dtype_name(spec.dtype.as_numpy_dtype)}, got {_dtype_name(value.dtype)}")
        value = value.astype(spec.dtype.as_numpy_dtype, copy=False)
      if not spec.shape.is_compatible_with(value.shape):
        raise ServingError(INVALID_ARGUMENT, f"input '{key}' of signature '{self.name}' has shape "
                           f"{list(value.shape)}, expected {_shape_text(spec.shape)}")
      out[key] = value
    sizes = {v.shape[0] for v in out.values() if v.ndim}
    if len(sizes) > 1:
      raise ServingError(INVALID_ARGUMENT, f"inputs of signature '{self.name}' disagree on the batch "
                         f"size: {sorted(sizes)}")
    return out

  def describe_inputs(self) -> str:
    return ", ".join(f"'{k}' ({_dtype_name(s.dtype.as_numpy_dtype if s.dtype != tf.string else object)} "
                     f"{_shape_text(s.shape)})" for k, s in sorted(self.inputs.items()))

  def select_outputs(self, output_filter: Sequence[str]) -> List[str]:
    if not output_filter:
      return sorted(self.outputs)
    unknown = sorted(set(output_filter) - set(self.outputs))
    if unknown:
      raise ServingError(INVALID_ARGUMENT, f"unknown output(s) {unknown} in output_filter; signature "
                         f"'{self.name}' outputs {sorted(self.outputs)}")
    return list(dict.fromkeys(output_filter))

  def batchable(self, inputs: Dict[str, np.ndarray]) -> bool:
    return all(spec.shape.rank and spec.shape[0] is None for spec in self.inputs.values()) and \
        all(v.ndim >= 1 for v in inputs.values())

  def run(self, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    try:
      result = self.fn(**{k: tf.constant(v, dtype=self.inputs[k].dtype) for k, v in inputs.items()})
    except tf.errors.InvalidArgumentError as e:
      raise ServingError(INVALID_ARGUMENT, self._explain(inputs, e)) from None
    return {k: v.numpy() for k, v in result.items()}

  def _explain(self, inputs: Dict[str, np.ndarray], error: tf.errors.OpError) -> str:
    """Names the undecodable images of string inputs, else passes TF's message on."""
    for key, value in inputs.items():
      if self.inputs[key].dtype != tf.string:
        continue
      bad = []
      for index, item in enumerate(value.reshape(-1)):
        try:
          tf.io.decode_image(item, channels=3, expand_animations=False)
        except tf.errors.InvalidArgumentError:
          bad.append(index)
      if bad:
        return (f"input '{key}' element(s) {bad} of {value.size} could not be decoded as an image: "
                f"{_tf_error_message(error)}")
    return f"signature '{self.name}' rejected the input: {_tf_error_message(error)}"


def _to_bytes(value) -> bytes:
  return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def _dtype_name(dtype) -> str:
  if np.dtype(dtype).kind in ("O", "S", "U"):
    return "DT_STRING"
  return types_pb2.DataType.Name(tf.as_dtype(np.dtype(dtype)).as_datatype_enum)


def _shape_text(shape: tf.TensorShape) -> str:
  return "[" + ", ".join("batch" if i == 0 and d is None else ("?" if d is None else str(d))
                         for i, d in enumerate(shape.as_list())) + "]"


class ServedModel:
  """One loaded version of an export directory."""

  def __init__(self, name: str, version: int, path: str):
    self.name, self.version, self.path = name, int(version), path
    self.loaded = tf.saved_model.load(path)
    self.signatures = {k: Signature(k, fn) for k, fn in self.loaded.signatures.items()}
    if not self.signatures:
      raise ValueError(f"SavedModel {path} has no serving signatures")
    self.signature_defs = self._read_signature_defs(path)
    metadata = os.path.join(path, export_lib.EXTRA_DIR, export_lib.METADATA_FILE)
    self.metadata = json.load(open(metadata)) if os.path.isfile(metadata) else {}

  @staticmethod
  def _read_signature_defs(path: str) -> get_model_metadata_pb2.SignatureDefMap:
    """The SignatureDefs as saved_model.pb states them (what TF Serving's metadata returns)."""
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
      proto.ParseFromString(f.read())
    out = get_model_metadata_pb2.SignatureDefMap()
    for key, sig in proto.meta_graphs[0].signature_def.items():
      if not key.startswith("__"):  # internal entries such as __saved_model_init_op
        out.signature_def[key].CopyFrom(sig)
    return out

  def signature(self, name: str) -> Signature:
    name = name or export_lib.SERVING_DEFAULT
    if name not in self.signatures:
      raise ServingError(INVALID_ARGUMENT, f"Serving signature '{name}' not found; model '{self.name}' "
                         f"has {sorted(self.signatures)}")
    return self.signatures[name]

  def warm_up(self) -> None:
    """Runs every signature once (the first call of a loaded function is slow)."""
    size = int(self.metadata.get("image_size", export_lib.DEFAULT_IMAGE_SIZE))
    jpeg = tf.io.encode_jpeg(tf.fill([size, size, 3], tf.constant(128, tf.uint8))).numpy()
    for sig in self.signatures.values():
      dummy = {}
      for key, spec in sig.inputs.items():
        if spec.dtype == tf.string and spec.shape.rank == 1:
          dummy[key] = np.array([jpeg], dtype=object)
        elif spec.dtype.is_floating and spec.shape.rank == 4:
          dummy[key] = np.full([1, size, size, spec.shape[3] or 3], 128, spec.dtype.as_numpy_dtype)
      if len(dummy) == len(sig.inputs):
        sig.run(dummy)


class _Item:
  __slots__ = ("inputs", "size", "future", "enqueued")

  def __init__(self, inputs, size):
    self.inputs, self.size = inputs, size
    self.future = concurrent.futures.Future()
    self.enqueued = time.monotonic()


class DynamicBatcher:
  """Merges compatible concurrent requests into one model call.

  Worker threads take the oldest waiting request together with every compatible request waiting
  behind it (same signature and per-example shapes), up to `max_batch_size` examples. With
  `timeout_s` = 0 a worker never waits for more: requests batch only when they arrive while the
  model is busy, so batching adds no latency to an idle server.
  """

  def __init__(self, max_batch_size: int = 16, timeout_s: float = 0.0, num_threads: int = 1):
    if max_batch_size < 1:
      raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if timeout_s < 0:
      raise ValueError(f"batch timeout must be >= 0, got {timeout_s}")
    if num_threads < 1:
      raise ValueError(f"num_batch_threads must be >= 1, got {num_threads}")
    self.max_batch_size, self.timeout_s = int(max_batch_size), float(timeout_s)
    self._cond = threading.Condition()
    self._queues: "collections.OrderedDict[tuple, collections.deque]" = collections.OrderedDict()
    self._stopping = False
    self.batches_run = 0   # model calls, and the requests they served (statistics)
    self.requests_run = 0
    self._threads = [threading.Thread(target=self._work, name=f"batcher-{i}", daemon=True)
                     for i in range(num_threads)]
    for t in self._threads:
      t.start()

  def run(self, signature: Signature, inputs: Dict[str, np.ndarray], key_prefix=()) -> Dict[str, np.ndarray]:
    size = next(iter(inputs.values())).shape[0]
    if size >= self.max_batch_size:  # already a full batch
      return signature.run(inputs)
    key = (id(signature), *key_prefix,
           tuple((k, v.dtype.str, v.shape[1:]) for k, v in sorted(inputs.items())))
    item = _Item(inputs, size)
    with self._cond:
      if self._stopping:
        raise ServingError(UNAVAILABLE, "server is shutting down")
      self._queues.setdefault(key, (signature, collections.deque()))[1].append(item)
      self._cond.notify()
    return item.future.result()

  def _take(self):
    """Under the lock: (signature, items) of the oldest queue's next batch, or None if stopping."""
    while True:
      queues = [(k, q) for k, q in self._queues.items() if q[1]]
      if not queues:
        if self._stopping:
          return None
        self._cond.wait()
        continue
      key, (signature, queue) = min(queues, key=lambda kq: kq[1][1][0].enqueued)
      deadline = queue[0].enqueued + self.timeout_s
      while (sum(i.size for i in queue) < self.max_batch_size and not self._stopping and
             time.monotonic() < deadline):
        self._cond.wait(deadline - time.monotonic())
      if not queue:  # another worker took them meanwhile
        continue
      items, total = [queue.popleft()], 0
      total = items[0].size
      while queue and total + queue[0].size <= self.max_batch_size:
        total += queue[0].size
        items.append(queue.popleft())
      if not queue:
        del self._queues[key]
      return signature, items

  def _work(self):
    while True:
      with self._cond:
        taken = self._take()
      if taken is None:
        return
      signature, items = taken
      self._execute(signature, items)

  def _execute(self, signature: Signature, items: List[_Item]):
    self.batches_run += 1
    self.requests_run += len(items)
    if len(items) == 1:
      self._settle(items[0], lambda: signature.run(items[0].inputs))
      return
    merged = {k: np.concatenate([i.inputs[k] for i in items]) for k in items[0].inputs}
    try:
      outputs = signature.run(merged)
    except ServingError:  # bad input in one request: rerun each so only that one fails
      for item in items:
        self._settle(item, lambda item=item: signature.run(item.inputs))
      return
    except Exception as e:  # noqa: BLE001 - delivered to every waiting request
      for item in items:
        item.future.set_exception(e)
      return
    start = 0
    for item in items:
      item.future.set_result({k: v[start:start + item.size] for k, v in outputs.items()})
      start += item.size

  @staticmethod
  def _settle(item: _Item, fn: Callable):
    try:
      item.future.set_result(fn())
    except Exception as e:  # noqa: BLE001 - re-raised in the request's thread
      item.future.set_exception(e)

  def stop(self):
    with self._cond:
      self._stopping = True
      self._cond.notify_all()
    for t in self._threads:
      t.join(timeout=10)


BATCHING_MODES = ("auto", "on", "off")


def resolve_batching(mode: str) -> bool:
  """'on' / 'off', or 'auto': on when TF sees a GPU (see the module docstring)."""
  if mode not in BATCHING_MODES:
    raise ValueError(f"batching must be one of {BATCHING_MODES}, got {mode!r}")
  if mode == "auto":
    return bool(tf.config.list_physical_devices("GPU"))
  return mode == "on"


class ModelServer:
  """Protocol-independent core: the served model, version polling, predict and metadata."""

  def __init__(self, export_dir: str, model_name: str = "tf_mtssl", batching: bool = True,
               max_batch_size: int = 16, batch_timeout_ms: float = 0.0, num_batch_threads: int = 1,
               poll_seconds: float = 2.0, warm_up: bool = True,
               max_instances: int = DEFAULT_MAX_INSTANCES, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    if not model_name:
      raise ValueError("model_name must not be empty")
    for name, value in (("max_instances", max_instances), ("max_image_pixels", max_image_pixels)):
      if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    self.export_dir, self.model_name, self._warm = export_dir, model_name, warm_up
    self.max_instances, self.max_image_pixels = int(max_instances), int(max_image_pixels)
    version, path = export_lib.latest_version(export_dir)
    self._model = self._load(version, path)
    self._lock = threading.Lock()
    self.batcher = DynamicBatcher(max_batch_size, batch_timeout_ms / 1000.0,
                                  num_batch_threads) if batching else None
    self._stop = threading.Event()
    self._poller = None
    if poll_seconds > 0:
      self._poller = threading.Thread(target=self._poll, args=(poll_seconds,), name="version-poller",
                                      daemon=True)
      self._poller.start()

  def _load(self, version: int, path: str) -> ServedModel:
    model = ServedModel(self.model_name, version, path)
    if self._warm:
      model.warm_up()
    log.info("Loaded %s version %d from %s", self.model_name, version, path)
    return model

  def _poll(self, seconds: float):
    """Serves a newer version once it is complete (TF Serving's newest-version policy)."""
    while not self._stop.wait(seconds):
      try:
        version, path = export_lib.latest_version(self.export_dir)
        if version > self.model.version:
          model = self._load(version, path)
          with self._lock:
            self._model = model
          print(f"Now serving {self.model_name} version {version} from {path}", flush=True)
      except Exception as e:  # noqa: BLE001 - a broken new version must not stop the server
        log.error("Could not load a new version from %s: %s", self.export_dir, e)

  @property
  def model(self) -> ServedModel:
    return self._model

  def resolve(self, name: str, version: Optional[int] = None) -> ServedModel:
    model = self.model
    if name != self.model_name:
      raise ServingError(NOT_FOUND, f"Model '{name}' not found; this server serves '{self.model_name}'")
    if version is not None and version != model.version:
      raise ServingError(NOT_FOUND, f"Version {version} of model '{name}' is not served; the served "
                         f"version is {model.version}")
    return model

  def predict(self, name: str, version: Optional[int], signature_name: str,
              inputs: Dict[str, np.ndarray], output_filter: Sequence[str] = ()
              ) -> Tuple[ServedModel, Signature, Dict[str, np.ndarray]]:
    model = self.resolve(name, version)
    signature = model.signature(signature_name)
    arrays = signature.validate(inputs)
    keys = signature.select_outputs(output_filter)
    self.check_limits(signature, arrays)
    if self.batcher is not None and signature.batchable(arrays):
      outputs = self.batcher.run(signature, arrays, key_prefix=(model.version,))
    else:
      outputs = signature.run(arrays)
    return model, signature, {k: outputs[k] for k in keys}

  def check_batch_size(self, examples: int) -> None:
    """A request holds 1 to max_instances examples (INVALID_ARGUMENT otherwise)."""
    if examples == 0:
      raise ServingError(INVALID_ARGUMENT, "the request has no examples (a batch of 0): send at least one")
    if examples > self.max_instances:
      raise ServingError(INVALID_ARGUMENT, f"the request has {examples} examples; this server takes at "
                         f"most {self.max_instances} per request (its --max_instances): split it")

  def check_limits(self, signature: Signature, inputs: Dict[str, np.ndarray]) -> None:
    """Batch size and pixels per image of validated inputs, before anything is decoded or run.

    DT_STRING inputs are encoded images (the sizes come from their headers); rank-4 inputs are
    [batch, height, width, channels] image tensors.
    """
    batched = [v for k, v in inputs.items() if v.ndim and signature.inputs[k].shape[0] is None]
    if batched:
      self.check_batch_size(batched[0].shape[0])
    for key, value in inputs.items():
      if signature.inputs[key].dtype == tf.string:
        for index, item in enumerate(value.reshape(-1)):
          try:
            size = image_headers.decoded_size(item)
          except ValueError as e:
            raise ServingError(INVALID_ARGUMENT, f"input '{key}' element {index} {e}") from None
          if size is not None and size.pixels > self.max_image_pixels:
            self._refuse_pixels(key, index, size.description, size.pixels)
      elif value.ndim == 4 and value.shape[1] * value.shape[2] > self.max_image_pixels:
        self._refuse_pixels(key, None, f"{value.shape[1]}x{value.shape[2]} tensor",
                            value.shape[1] * value.shape[2])

  def _refuse_pixels(self, key: str, index: Optional[int], description: str, pixels: int):
    where = f"input '{key}'" + ("" if index is None else f" element {index}")
    raise ServingError(INVALID_ARGUMENT, f"{where} is a {description} image of {pixels} pixels, over "
                       f"this server's limit of {self.max_image_pixels} pixels per image (its "
                       "--max_image_pixels)")

  def status(self, name: str, version: Optional[int] = None) -> dict:
    """TF Serving's GetModelStatus answer, as its REST API writes it."""
    model = self.resolve(name, version)
    return {"model_version_status": [{"version": str(model.version), "state": "AVAILABLE",
                                      "status": {"error_code": "OK", "error_message": ""}}]}

  def close(self):
    self._stop.set()
    if self.batcher is not None:
      self.batcher.stop()


# ---- gRPC -----------------------------------------------------------------------------------------
class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
  """tensorflow.serving.PredictionService over a ModelServer."""

  def __init__(self, core: ModelServer):
    self.core = core

  @staticmethod
  def _version(spec) -> Optional[int]:
    return spec.version.value if spec.HasField("version") else None

  def _abort(self, context, error: Exception):
    if isinstance(error, ServingError):
      context.abort(error.code, error.message)
    log.exception("Internal error")
    context.abort(INTERNAL, f"internal error: {type(error).__name__}: {error}")

  def Predict(self, request, context):  # noqa: N802 - gRPC method name
    try:
      inputs = {}
      for key, proto in request.inputs.items():
        try:
          inputs[key] = tf.make_ndarray(proto)
        except Exception as e:  # noqa: BLE001 - malformed TensorProto
          raise ServingError(INVALID_ARGUMENT, f"input '{key}' is not a valid TensorProto: {e}") from None
      model, signature, outputs = self.core.predict(
          request.model_spec.name, self._version(request.model_spec), request.model_spec.signature_name,
          inputs, list(request.output_filter))
    except Exception as e:  # noqa: BLE001
      self._abort(context, e)
    response = predict_pb2.PredictResponse()
    response.model_spec.name = model.name
    response.model_spec.version.value = model.version
    response.model_spec.signature_name = signature.name
    for key, value in outputs.items():
      response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
    return response

  def GetModelMetadata(self, request, context):  # noqa: N802 - gRPC method name
    try:
      fields = list(request.metadata_field)
      if not fields:
        raise ServingError(INVALID_ARGUMENT, "GetModelMetadataRequest must name at least one "
                           f"metadata_field ('{SIGNATURE_DEF_FIELD}')")
      unknown = [f for f in fields if f != SIGNATURE_DEF_FIELD]
      if unknown:
        raise ServingError(INVALID_ARGUMENT, f"metadata field(s) {unknown} not supported; only "
                           f"'{SIGNATURE_DEF_FIELD}'")
      model = self.core.resolve(request.model_spec.name, self._version(request.model_spec))
    except Exception as e:  # noqa: BLE001
      self._abort(context, e)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = model.name
    response.model_spec.version.value = model.version
    response.metadata[SIGNATURE_DEF_FIELD].Pack(model.signature_defs)
    return response


def _bind_failure(kind: str, host: str, port: int, reason: str) -> ValueError:
  return ValueError(f"Could not bind the {kind} port {host}:{port}: {reason} (another server on it? "
                    "choose another port, or 0 for any free one)")


def _os_bind_error(host: str, port: int) -> Optional[str]:
  """Why the OS refuses a listening socket on host:port (None: it accepts), for a clear message
  before gRPC tries (its own failure is a bare RuntimeError plus a C-core log line)."""
  try:
    addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
  except socket.gaierror as e:
    return f"unknown host ({e.strerror})"
  errors = []
  for family, kind, proto, _, address in addresses:
    with socket.socket(family, kind, proto) as probe:
      probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: TIME_WAIT does not count
      try:
        probe.bind(address)
      except OSError as e:
        if e.errno == errno.EADDRINUSE:
          return e.strerror
        errors.append(e.strerror or str(e))
  # gRPC binds what it can of a name such as localhost (e.g. IPv4 only): fail only if nothing binds.
  return errors[0] if len(errors) == len(addresses) else None


def bind_grpc(host: str = DEFAULT_HOST, port: int = 8500, num_threads: int = 8,
              max_message_mb: int = 256) -> Tuple[grpc.Server, int]:
  """A gRPC server bound to host:port (0: any free port), not started; returns it and the port.

  A port in use is a ValueError: gRPC sets SO_REUSEPORT by default, which lets a second server
  bind the same port and take a share of the new connections.
  """
  reason = _os_bind_error(host, port) if port else None
  if reason:
    raise _bind_failure("gRPC", host, port, reason)
  limit = max_message_mb * 1024 * 1024
  server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="grpc"),
                       options=[("grpc.max_send_message_length", limit),
                                ("grpc.max_receive_message_length", limit),
                                ("grpc.so_reuseport", 0)])
  try:
    bound = server.add_insecure_port(f"{host}:{port}")
  except RuntimeError as e:  # taken between the probe and this bind, or refused by gRPC itself
    raise _bind_failure("gRPC", host, port, str(e).split(";")[0]) from None
  if bound == 0:  # older grpcio reports a failed bind this way
    raise _bind_failure("gRPC", host, port, "gRPC bound no address")
  return server, bound


def serve_grpc(server: grpc.Server, core: ModelServer) -> None:
  """Starts a bound gRPC server on `core`."""
  prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionServicer(core), server)
  server.start()


# ---- REST -----------------------------------------------------------------------------------------
def _decode_json_value(value):
  """{"b64": "..."} -> bytes, recursively (TF Serving's REST encoding of binary values)."""
  if isinstance(value, dict):
    if set(value) == {"b64"}:
      try:
        return base64.b64decode(value["b64"], validate=True)
      except (ValueError, TypeError) as e:
        raise ServingError(INVALID_ARGUMENT, f"invalid base64 in a {{\"b64\": ...}} value: {e}") from None
    raise ServingError(INVALID_ARGUMENT, f"unexpected object {sorted(value)} in a tensor value "
                       "(only {\"b64\": ...} is allowed)")
  if isinstance(value, list):
    return [_decode_json_value(v) for v in value]
  return value


def _json_to_array(key: str, value, spec: tf.TensorSpec) -> np.ndarray:
  value = _decode_json_value(value)
  try:
    if spec.dtype == tf.string:
      array = np.array(value, dtype=object)
      if array.size and not all(isinstance(v, (bytes, str)) for v in array.reshape(-1)):
        raise ValueError("non-string values")
      return array
    array = np.array(value)
    if array.dtype.kind not in ("f", "i", "u", "b"):
      raise ValueError(f"values of kind {array.dtype.kind!r}")
    return array.astype(spec.dtype.as_numpy_dtype)
  except ValueError as e:
    want = "strings or {\"b64\": ...} objects" if spec.dtype == tf.string else f"{spec.dtype.name} numbers"
    raise ServingError(INVALID_ARGUMENT, f"input '{key}' must hold {want} in a regular (non-ragged) "
                       f"nested list ({e})") from None


def _to_json(value: np.ndarray):
  if value.dtype == object:
    return [_to_json(v) for v in value] if value.ndim else {"b64": base64.b64encode(value.item()).decode()}
  return value.tolist()


def rest_predict(core: ModelServer, name: str, version: Optional[int], body: dict) -> dict:
  """TF Serving's REST predict: row ("instances") or columnar ("inputs") format."""
  if not isinstance(body, dict):
    raise ServingError(INVALID_ARGUMENT, "the request body must be a JSON object")
  signature = core.resolve(name, version).signature(body.get("signature_name", ""))
  if ("instances" in body) == ("inputs" in body):
    raise ServingError(INVALID_ARGUMENT, "the request needs exactly one of 'instances' (row format) "
                       "or 'inputs' (columnar format)")
  names = sorted(signature.inputs)
  if "instances" in body:
    instances = body["instances"]
    if not isinstance(instances, list) or not instances:
      raise ServingError(INVALID_ARGUMENT, "'instances' must be a non-empty list")
    core.check_batch_size(len(instances))  # before converting them
    named = all(isinstance(i, dict) and set(i) != {"b64"} for i in instances)
    if not named and len(names) != 1:
      raise ServingError(INVALID_ARGUMENT, f"signature '{signature.name}' has inputs {names}: each "
                         "instance must be an object keyed by input name")
    columns = {k: [i.get(k) if isinstance(i, dict) else None for i in instances] for k in names} \
        if named else {names[0]: instances}
    for key, column in columns.items():
      if any(v is None for v in column):
        raise ServingError(INVALID_ARGUMENT, f"missing input '{key}' in some instances: signature "
                           f"'{signature.name}' takes {signature.describe_inputs()}")
    if named:
      extra = sorted({k for i in instances for k in i} - set(names))
      if extra:
        raise ServingError(INVALID_ARGUMENT, f"unexpected input(s) {extra}: signature "
                           f"'{signature.name}' takes {signature.describe_inputs()}")
  else:
    given = body["inputs"]
    columns = given if isinstance(given, dict) and set(given) != {"b64"} else (
        {names[0]: given} if len(names) == 1 else None)
    if columns is None:
      raise ServingError(INVALID_ARGUMENT, f"'inputs' must be an object keyed by {names}")
  # Unknown keys get a placeholder: `validate` then names them with the inputs the signature takes.
  arrays = {k: _json_to_array(k, v, signature.inputs[k]) if k in signature.inputs else np.asarray(0)
            for k, v in columns.items()}
  model, signature, outputs = core.predict(name, version, signature.name, arrays)
  if "instances" in body:
    n = len(body["instances"])
    if len(outputs) == 1:
      return {"predictions": _to_json(next(iter(outputs.values())))}
    per_key = {k: _to_json(v) for k, v in outputs.items()}
    return {"predictions": [{k: per_key[k][i] for k in outputs} for i in range(n)]}
  if len(outputs) == 1:
    return {"outputs": _to_json(next(iter(outputs.values())))}
  return {"outputs": {k: _to_json(v) for k, v in outputs.items()}}


def _parse_model_path(path: str):
  """'/v1/models/NAME[/versions/V][/metadata][:predict]' -> (name, version, verb) or None."""
  if not path.startswith("/v1/models/"):
    return None
  rest = path[len("/v1/models/"):]
  verb = None
  if ":" in rest:
    rest, verb = rest.rsplit(":", 1)
  parts = rest.split("/")
  name, version, tail = parts[0], None, parts[1:]
  if len(tail) >= 2 and tail[0] == "versions":
    try:
      version = int(tail[1])
    except ValueError:
      raise ServingError(INVALID_ARGUMENT, f"version must be an integer, got {tail[1]!r}") from None
    tail = tail[2:]
  if tail == ["metadata"] and verb is None:
    verb = "metadata"
  elif tail:
    return None
  return name, version, verb


class _UnreadBody(ServingError):
  """A refused request whose body was not (fully) read: the connection closes after the answer."""

  def __init__(self, code: grpc.StatusCode, message: str, remaining: Optional[int] = None):
    super().__init__(code, message)
    self.remaining = remaining  # bytes still to come, when known (Content-Length)


_MAX_CHUNK_LINE = 1024  # a chunk-size line: hex digits and optional extensions


def _body_limit_bytes(max_body_mb: float) -> int:
  if not max_body_mb > 0:
    raise ValueError(f"max_body_mb must be > 0, got {max_body_mb}")
  return int(max_body_mb * 1024 * 1024)


def make_rest_handler(core: ModelServer, max_body_mb: float = DEFAULT_MAX_BODY_MB):
  max_body = _body_limit_bytes(max_body_mb)

  def too_large(size_text: str, remaining: Optional[int] = None) -> _UnreadBody:
    return _UnreadBody(RESOURCE_EXHAUSTED, f"the request body ({size_text}) is over this server's limit "
                       f"of {max_body} bytes (its --max_body_mb={max_body_mb:g}): send fewer or smaller "
                       "images per request", remaining)

  class Handler(http_server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tf_mtssl-serving"
    timeout = REST_SOCKET_TIMEOUT_S

    def log_message(self, fmt, *args):  # route access logs to logging (quiet by default)
      log.debug("REST %s " + fmt, self.address_string(), *args)

    def _send(self, status: int, payload: dict, close: bool = False):
      data = json.dumps(payload).encode()
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      if close:
        self.send_header("Connection", "close")
        self.close_connection = True
      self.end_headers()
      self.wfile.write(data)

    def _content_length(self) -> Optional[int]:
      """The declared body length; None for a chunked body."""
      encoding = self.headers.get("Transfer-Encoding", "").strip().lower()
      if encoding:
        if encoding != "chunked":
          raise _UnreadBody(INVALID_ARGUMENT, f"Transfer-Encoding {encoding!r} is not supported (only "
                            "chunked, or a Content-Length)")
        return None
      text = self.headers.get("Content-Length") or "0"
      if not text.strip().isdigit():
        raise _UnreadBody(INVALID_ARGUMENT, f"Content-Length {text!r} is not a byte count")
      length = int(text)
      if length > max_body:
        raise too_large(f"{length} bytes", remaining=length)
      return length

    def _read_chunked(self) -> bytes:
      parts, total = [], 0
      while True:
        line = self.rfile.readline(_MAX_CHUNK_LINE)
        try:
          size = int(line.split(b";")[0].strip(), 16)
        except ValueError:
          raise _UnreadBody(INVALID_ARGUMENT, f"malformed chunk size line {line[:40]!r} in a chunked "
                            "body") from None
        if size == 0:
          while self.rfile.readline(_MAX_CHUNK_LINE) not in (b"\r\n", b"\n", b""):  # trailers
            pass
          return b"".join(parts)
        total += size
        if total > max_body:
          raise too_large("chunked")
        data = self.rfile.read(size)
        if len(data) < size or self.rfile.readline(_MAX_CHUNK_LINE) not in (b"\r\n", b"\n"):
          raise _UnreadBody(INVALID_ARGUMENT, "the chunked body ended early or is malformed")
        parts.append(data)

    def _read_body(self) -> bytes:
      length = self._content_length()
      if length is None:
        return self._read_chunked()
      data = self.rfile.read(length)
      if len(data) < length:
        raise _UnreadBody(INVALID_ARGUMENT, f"the body ended after {len(data)} of its {length} bytes")
      return data

    def _drain(self, remaining: Optional[int]):
      """Reads and drops what the client still sends (up to `remaining` bytes or REST_DRAIN_S), so
      that it reads the answer already sent rather than a reset connection."""
      deadline = time.monotonic() + REST_DRAIN_S
      try:
        self.connection.settimeout(REST_DRAIN_S)
        while (remaining is None or remaining > 0) and time.monotonic() < deadline:
          data = self.rfile.read1(65536 if remaining is None else min(65536, remaining))
          if not data:
            return
          if remaining is not None:
            remaining -= len(data)
      except OSError:  # timed out or reset: the connection closes either way
        pass

    def handle_expect_100(self):
      """`Expect: 100-continue` (curl, for large bodies): refuse an oversized body before it is sent."""
      try:
        self._content_length()
      except _UnreadBody as e:
        self._send(e.http_status, {"error": e.message}, close=True)
        return False
      return super().handle_expect_100()

    def _handle(self, method: str):
      try:
        data = self._read_body()  # first, whatever the answer: keeps the connection in step
        parsed = _parse_model_path(self.path.split("?")[0])
        if parsed is None:
          raise ServingError(NOT_FOUND, f"no such endpoint: {method} {self.path} (try POST "
                             f"/v1/models/{core.model_name}:predict or GET /v1/models/{core.model_name})")
        name, version, verb = parsed
        if method == "GET" and verb is None:
          return self._send(200, core.status(name, version))
        if method == "GET" and verb == "metadata":
          model = core.resolve(name, version)
          return self._send(200, {"model_spec": {"name": model.name, "signature_name": "",
                                                 "version": str(model.version)},
                                  "metadata": {SIGNATURE_DEF_FIELD: json_format.MessageToDict(
                                      model.signature_defs)}})
        if method == "POST" and verb == "predict":
          try:
            body = json.loads(data or b"null")
          except ValueError as e:
            raise ServingError(INVALID_ARGUMENT, f"the request body is not valid JSON: {e}") from None
          return self._send(200, rest_predict(core, name, version, body))
        raise ServingError(NOT_FOUND, f"no such endpoint: {method} {self.path}")
      except _UnreadBody as e:
        self._send(e.http_status, {"error": e.message}, close=True)
        self._drain(e.remaining)
      except ServingError as e:
        self._send(e.http_status, {"error": e.message})
      except TimeoutError:
        self.close_connection = True  # the client went silent mid-request; nothing to answer
      except Exception as e:  # noqa: BLE001 - the server keeps serving
        log.exception("Internal error")
        self._send(500, {"error": f"internal error: {type(e).__name__}: {e}"})

    def do_GET(self):  # noqa: N802 - http.server naming
      self._handle("GET")

    def do_POST(self):  # noqa: N802 - http.server naming
      self._handle("POST")

  return Handler


def bind_rest(host: str = DEFAULT_HOST, port: int = 8501) -> Tuple[http_server.ThreadingHTTPServer, int]:
  """A REST server bound to host:port (0: any free port), not yet serving; returns it and the port."""
  try:
    httpd = http_server.ThreadingHTTPServer((host, port), None)  # the handler comes with the model
  except OSError as e:
    raise _bind_failure("REST", host, port, e.strerror or str(e)) from None
  httpd.daemon_threads = True
  return httpd, httpd.server_address[1]


def serve_rest(httpd: http_server.ThreadingHTTPServer, core: ModelServer,
               max_body_mb: float = DEFAULT_MAX_BODY_MB) -> None:
  """Serves a bound REST server on `core` from a thread."""
  httpd.RequestHandlerClass = make_rest_handler(core, max_body_mb)
  threading.Thread(target=httpd.serve_forever, name="rest", daemon=True).start()


class Servers:
  """The running servers of `start`; `stop()` shuts them all down."""

  def __init__(self, core, grpc_server, grpc_port, rest_server=None, rest_port=None):
    self.core, self.grpc_server, self.grpc_port = core, grpc_server, grpc_port
    self.rest_server, self.rest_port = rest_server, rest_port

  def stop(self, grace_s: float = 2.0):
    if self.rest_server is not None:
      self.rest_server.shutdown()
      self.rest_server.server_close()
    self.grpc_server.stop(grace_s).wait()
    self.core.close()


def start(export_dir: str, port: int = 8500, rest_port: Optional[int] = None, host: str = DEFAULT_HOST,
          model_name: str = "tf_mtssl", num_threads: int = 8, max_message_mb: int = 256,
          max_body_mb: float = DEFAULT_MAX_BODY_MB, **core_kwargs) -> Servers:
  """Binds gRPC (and REST when rest_port is not None; 0 = any port), loads the newest version, then
  serves. Binding comes first so that a port in use fails before a slow model load."""
  _body_limit_bytes(max_body_mb)  # bad flags fail before anything is bound or loaded
  grpc_server, grpc_port = bind_grpc(host, port, num_threads, max_message_mb)
  rest_server = bound_rest = core = None
  try:
    if rest_port is not None:
      rest_server, bound_rest = bind_rest(host, rest_port)
    core = ModelServer(export_dir, model_name=model_name, **core_kwargs)
    serve_grpc(grpc_server, core)
    if rest_server is not None:
      serve_rest(rest_server, core, max_body_mb)
  except BaseException:
    grpc_server.stop(0)
    if rest_server is not None:
      rest_server.server_close()
    if core is not None:
      core.close()
    raise
  return Servers(core, grpc_server, grpc_port, rest_server, bound_rest)


# ---- client side (tf_mtssl.client, tests, bench) -----------------------------------------------------
def make_stub(server: str, max_message_mb: int = 256):
  """A standard PredictionServiceStub on an insecure channel to HOST:PORT."""
  limit = max_message_mb * 1024 * 1024
  channel = grpc.insecure_channel(server, options=[("grpc.max_send_message_length", limit),
                                                   ("grpc.max_receive_message_length", limit)])
  return prediction_service_pb2_grpc.PredictionServiceStub(channel)


def predict_request(images: Sequence[bytes], model_name: str = "tf_mtssl",
                    signature_name: str = export_lib.SERVING_DEFAULT,
                    outputs: Sequence[str] = ()) -> predict_pb2.PredictRequest:
  """A Predict request of encoded images for the `serving_default` signature."""
  request = predict_pb2.PredictRequest()
  request.model_spec.name = model_name
  request.model_spec.signature_name = signature_name
  request.inputs[export_lib.BYTES_INPUT].CopyFrom(
      tf.make_tensor_proto(list(images), dtype=tf.string, shape=[len(images)]))
  request.output_filter.extend(outputs)
  return request


# A request refused for what it holds (a bad or oversized image): the client skips that image.
_IMAGE_ERRORS = (INVALID_ARGUMENT, RESOURCE_EXHAUSTED)


class FileFeatures(NamedTuple):
  outputs: Dict[str, np.ndarray]  # each output stacked in `paths` order
  paths: List[str]  # the images the rows belong to
  skipped: List[Tuple[str, str]]  # (image, why) of the images that were not processed


def features_of_files(server: str, paths: Sequence[str], model_name: str = "tf_mtssl",
                      signature_name: str = export_lib.SERVING_DEFAULT, outputs: Sequence[str] = (),
                      batch_size: int = 16, timeout: float = 120.0,
                      max_message_mb: int = 256) -> FileFeatures:
  """Sends image files in requests of batch_size. A file that cannot be read, or an image the
  server refuses (its batch is then sent again image by image), is skipped with the reason; any
  other server error (unreachable, unknown model) raises grpc.RpcError."""
  stub = make_stub(server, max_message_mb)
  parts: Dict[str, List[np.ndarray]] = collections.defaultdict(list)
  kept, skipped = [], []

  def send(batch: List[Tuple[str, bytes]]):
    response = stub.Predict(predict_request([data for _, data in batch], model_name, signature_name,
                                            outputs), timeout=timeout)
    for key, proto in response.outputs.items():
      parts[key].append(tf.make_ndarray(proto))
    kept.extend(path for path, _ in batch)

  for start in range(0, len(paths), batch_size):
    batch = []
    for path in paths[start:start + batch_size]:
      try:
        with open(path, "rb") as f:
          batch.append((path, f.read()))
      except OSError as e:
        skipped.append((path, e.strerror or str(e)))
    if not batch:
      continue
    try:
      send(batch)
    except grpc.RpcError as error:
      if error.code() not in _IMAGE_ERRORS:
        raise
      if len(batch) == 1:
        skipped.append((batch[0][0], error.details()))
        continue
      for item in batch:  # find the refused image(s)
        try:
          send([item])
        except grpc.RpcError as e:
          if e.code() not in _IMAGE_ERRORS:
            raise
          skipped.append((item[0], e.details()))
  order = {path: i for i, path in reversed(list(enumerate(paths)))}
  skipped.sort(key=lambda item: order[item[0]])  # unreadable files were noted before refused images
  return FileFeatures({k: np.concatenate(v) for k, v in parts.items()}, kept, skipped)


IMAGES_FILE = "images.txt"


def earlier_outputs(output_dir: str, overwrite: bool = False) -> List[str]:
  """The files of an earlier save_outputs in output_dir (images.txt and *.npy), sorted; without
  `overwrite`, any such file is a ValueError (so no earlier output sits beside new rows)."""
  earlier = sorted(n for n in os.listdir(output_dir) if n == IMAGES_FILE or n.endswith(".npy")) \
      if os.path.isdir(output_dir) else []
  if earlier and not overwrite:
    raise ValueError(f"--output_dir={output_dir} already holds an earlier output ({', '.join(earlier)}): "
                     "choose another folder, or pass --overwrite to replace it")
  return earlier


def save_outputs(outputs: Dict[str, np.ndarray], paths: Sequence[str], output_dir: str,
                 overwrite: bool = False) -> Dict[str, str]:
  """Writes <output>.npy per output and images.txt (the row order); returns their paths.

  An earlier save in output_dir is refused (ValueError), or with `overwrite` removed first.
  """
  for name in earlier_outputs(output_dir, overwrite):
    os.remove(os.path.join(output_dir, name))
  os.makedirs(output_dir, exist_ok=True)
  files = {}
  for key, value in outputs.items():
    files[key] = os.path.join(output_dir, f"{key}.npy")
    np.save(files[key], value)
  files["images"] = os.path.join(output_dir, IMAGES_FILE)
  with open(files["images"], "w") as f:
    f.write("".join(f"{os.path.abspath(p)}\n" for p in paths))
  return files
