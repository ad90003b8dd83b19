"""The protocol-independent core of the model server: the served SavedModel versions (newest first, new
ones picked up by polling), their signatures and input checks, the request limits and the optional
dynamic batcher (see tf_mtssl.serving for the design)."""

import collections
import concurrent.futures
import json
import logging
import os
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import get_model_metadata_pb2

from tf_mtssl.core import devices
from tf_mtssl.serving import image_headers
from tf_mtssl.serving import export as export_lib
from tf_mtssl.runs import exports
from tf_mtssl.serving import errors

log = logging.getLogger(__name__)


DEFAULT_HOST = "127.0.0.1"  # this machine only; 0.0.0.0 (every interface) is an explicit choice


DEFAULT_MAX_INSTANCES = 64  # 4x tf_mtssl.client's batch of 16; 4,096 took 35 s and a 280 MB reply


DEFAULT_MAX_IMAGE_PIXELS = 25_000_000  # a 6000x4000 camera photo (72 MB decoded) fits; 8000x8000 not


DEFAULT_MAX_BODY_MB = 64.0  # 64 images of about 750 KB (base64 adds a third)


SIGNATURE_DEF_FIELD = "signature_def"  # the one metadata field TF Serving's GetModelMetadata knows


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
      raise errors.ServingError(errors.INVALID_ARGUMENT, f"{' and '.join(parts)}: signature '{self.name}' takes "
                         f"{self.describe_inputs()}")
    out = {}
    for key, spec in self.inputs.items():
      value = inputs[key]
      if spec.dtype == tf.string:
        if value.dtype.kind not in ("O", "S", "U"):
          raise errors.ServingError(errors.INVALID_ARGUMENT, f"input '{key}' of signature '{self.name}' must be "
                             f"DT_STRING (encoded images), got {_dtype_name(value.dtype)}")
        value = np.vectorize(_to_bytes, otypes=[object])(value) if value.size else value.astype(object)
      else:
        if value.dtype.kind not in ("f", "i", "u", "b"):
          raise errors.ServingError(errors.INVALID_ARGUMENT, f"input '{key}' of signature '{self.name}' must be "
                             f"{_dtype_name(spec.dtype.as_numpy_dtype)}, got {_dtype_name(value.dtype)}")
        value = value.astype(spec.dtype.as_numpy_dtype, copy=False)
      if not spec.shape.is_compatible_with(value.shape):
        raise errors.ServingError(errors.INVALID_ARGUMENT, f"input '{key}' of signature '{self.name}' has shape "
                           f"{list(value.shape)}, expected {_shape_text(spec.shape)}")
      out[key] = value
    sizes = {v.shape[0] for v in out.values() if v.ndim}
    if len(sizes) > 1:
      raise errors.ServingError(errors.INVALID_ARGUMENT, f"inputs of signature '{self.name}' disagree on the batch "
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
      raise errors.ServingError(errors.INVALID_ARGUMENT, f"unknown output(s) {unknown} in output_filter; signature "
                         f"'{self.name}' outputs {sorted(self.outputs)}")
    return list(dict.fromkeys(output_filter))

  def batchable(self, inputs: Dict[str, np.ndarray]) -> bool:
    return all(spec.shape.rank and spec.shape[0] is None for spec in self.inputs.values()) and \
        all(v.ndim >= 1 for v in inputs.values())

  def run(self, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    try:
      result = self.fn(**{k: tf.constant(v, dtype=self.inputs[k].dtype) for k, v in inputs.items()})
    except tf.errors.InvalidArgumentError as e:
      raise errors.ServingError(errors.INVALID_ARGUMENT, self._explain(inputs, e)) from None
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
                f"{errors.tf_error_message(error)}")
    return f"signature '{self.name}' rejected the input: {errors.tf_error_message(error)}"


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
    metadata = os.path.join(path, exports.EXTRA_DIR, exports.METADATA_FILE)
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
      raise errors.ServingError(errors.INVALID_ARGUMENT, f"Serving signature '{name}' not found; model '{self.name}' "
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
        raise errors.ServingError(errors.UNAVAILABLE, "server is shutting down")
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
    except errors.ServingError:  # bad input in one request: rerun each so only that one fails
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


BATCHING_MODES = devices.AUTO_MODES


def resolve_batching(mode: str) -> bool:
  """'on' / 'off', or 'auto': on when TF sees a GPU (see the module docstring)."""
  return devices.on_when_gpu(mode, "batching")


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
    version, path = exports.latest_version(export_dir)
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
        version, path = exports.latest_version(self.export_dir)
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
      raise errors.ServingError(errors.NOT_FOUND, f"Model '{name}' not found; this server serves '{self.model_name}'")
    if version is not None and version != model.version:
      raise errors.ServingError(errors.NOT_FOUND, f"Version {version} of model '{name}' is not served; the served "
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
    """A request holds 1 to max_instances examples (errors.INVALID_ARGUMENT otherwise)."""
    if examples == 0:
      raise errors.ServingError(errors.INVALID_ARGUMENT, "the request has no examples (a batch of 0): send at least one")
    if examples > self.max_instances:
      raise errors.ServingError(errors.INVALID_ARGUMENT, f"the request has {examples} examples; this server takes at "
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
            raise errors.ServingError(errors.INVALID_ARGUMENT, f"input '{key}' element {index} {e}") from None
          if size is not None and size.pixels > self.max_image_pixels:
            self._refuse_pixels(key, index, size.description, size.pixels)
      elif value.ndim == 4 and value.shape[1] * value.shape[2] > self.max_image_pixels:
        self._refuse_pixels(key, None, f"{value.shape[1]}x{value.shape[2]} tensor",
                            value.shape[1] * value.shape[2])

  def _refuse_pixels(self, key: str, index: Optional[int], description: str, pixels: int):
    where = f"input '{key}'" + ("" if index is None else f" element {index}")
    raise errors.ServingError(errors.INVALID_ARGUMENT, f"{where} is a {description} image of {pixels} pixels, over "
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
