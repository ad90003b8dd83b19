"""TF Serving's REST API (predict, model status, metadata) over a `model_server.ModelServer`, with body-size limits and
chunked bodies."""

import base64
import json
import logging
import threading
import time
from http import server as http_server
from typing import Optional, Tuple

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format

from tf_mtssl.serving import errors
from tf_mtssl.serving import model_server
from tf_mtssl.serving import grpc_server

log = logging.getLogger(__name__)


REST_SOCKET_TIMEOUT_S = 60.0  # a REST client silent this long (mid-request or idle) frees its thread


REST_DRAIN_S = 5.0  # after refusing an unread body: how long to read and drop it, so the client
#                     reads the refusal instead of a reset connection


def _decode_json_value(value):
  """{"b64": "..."} -> bytes, recursively (TF Serving's REST encoding of binary values)."""
  if isinstance(value, dict):
    if set(value) == {"b64"}:
      try:
        return base64.b64decode(value["b64"], validate=True)
      except (ValueError, TypeError) as e:
        raise errors.ServingError(errors.INVALID_ARGUMENT, f"invalid base64 in a {{\"b64\": ...}} value: {e}") from None
    raise errors.ServingError(errors.INVALID_ARGUMENT, f"unexpected object {sorted(value)} in a tensor value "
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
    raise errors.ServingError(errors.INVALID_ARGUMENT, f"input '{key}' must hold {want} in a regular (non-ragged) "
                       f"nested list ({e})") from None


def _to_json(value: np.ndarray):
  if value.dtype == object:
    return [_to_json(v) for v in value] if value.ndim else {"b64": base64.b64encode(value.item()).decode()}
  return value.tolist()


def rest_predict(core: model_server.ModelServer, name: str, version: Optional[int], body: dict) -> dict:
  """TF Serving's REST predict: row ("instances") or columnar ("inputs") format."""
  if not isinstance(body, dict):
    raise errors.ServingError(errors.INVALID_ARGUMENT, "the request body must be a JSON object")
  signature = core.resolve(name, version).signature(body.get("signature_name", ""))
  if ("instances" in body) == ("inputs" in body):
    raise errors.ServingError(errors.INVALID_ARGUMENT, "the request needs exactly one of 'instances' (row format) "
                       "or 'inputs' (columnar format)")
  names = sorted(signature.inputs)
  if "instances" in body:
    instances = body["instances"]
    if not isinstance(instances, list) or not instances:
      raise errors.ServingError(errors.INVALID_ARGUMENT, "'instances' must be a non-empty list")
    core.check_batch_size(len(instances))  # before converting them
    named = all(isinstance(i, dict) and set(i) != {"b64"} for i in instances)
    if not named and len(names) != 1:
      raise errors.ServingError(errors.INVALID_ARGUMENT, f"signature '{signature.name}' has inputs {names}: each "
                         "instance must be an object keyed by input name")
    columns = {k: [i.get(k) if isinstance(i, dict) else None for i in instances] for k in names} \
        if named else {names[0]: instances}
    for key, column in columns.items():
      if any(v is None for v in column):
        raise errors.ServingError(errors.INVALID_ARGUMENT, f"missing input '{key}' in some instances: signature "
                           f"'{signature.name}' takes {signature.describe_inputs()}")
    if named:
      extra = sorted({k for i in instances for k in i} - set(names))
      if extra:
        raise errors.ServingError(errors.INVALID_ARGUMENT, f"unexpected input(s) {extra}: signature "
                           f"'{signature.name}' takes {signature.describe_inputs()}")
  else:
    given = body["inputs"]
    columns = given if isinstance(given, dict) and set(given) != {"b64"} else (
        {names[0]: given} if len(names) == 1 else None)
    if columns is None:
      raise errors.ServingError(errors.INVALID_ARGUMENT, f"'inputs' must be an object keyed by {names}")
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
      raise errors.ServingError(errors.INVALID_ARGUMENT, f"version must be an integer, got {tail[1]!r}") from None
    tail = tail[2:]
  if tail == ["metadata"] and verb is None:
    verb = "metadata"
  elif tail:
    return None
  return name, version, verb


class _UnreadBody(errors.ServingError):
  """A refused request whose body was not (fully) read: the connection closes after the answer."""

  def __init__(self, code: grpc.StatusCode, message: str, remaining: Optional[int] = None):
    super().__init__(code, message)
    self.remaining = remaining  # bytes still to come, when known (Content-Length)


_MAX_CHUNK_LINE = 1024  # a chunk-size line: hex digits and optional extensions


def body_limit_bytes(max_body_mb: float) -> int:
  if not max_body_mb > 0:
    raise ValueError(f"max_body_mb must be > 0, got {max_body_mb}")
  return int(max_body_mb * 1024 * 1024)


def make_rest_handler(core: model_server.ModelServer, max_body_mb: float = model_server.DEFAULT_MAX_BODY_MB):
  max_body = body_limit_bytes(max_body_mb)

  def too_large(size_text: str, remaining: Optional[int] = None) -> _UnreadBody:
    return _UnreadBody(errors.RESOURCE_EXHAUSTED, f"the request body ({size_text}) is over this server's limit "
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
          raise _UnreadBody(errors.INVALID_ARGUMENT, f"Transfer-Encoding {encoding!r} is not supported (only "
                            "chunked, or a Content-Length)")
        return None
      text = self.headers.get("Content-Length") or "0"
      if not text.strip().isdigit():
        raise _UnreadBody(errors.INVALID_ARGUMENT, f"Content-Length {text!r} is not a byte count")
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
          raise _UnreadBody(errors.INVALID_ARGUMENT, f"malformed chunk size line {line[:40]!r} in a chunked "
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
          raise _UnreadBody(errors.INVALID_ARGUMENT, "the chunked body ended early or is malformed")
        parts.append(data)

    def _read_body(self) -> bytes:
      length = self._content_length()
      if length is None:
        return self._read_chunked()
      data = self.rfile.read(length)
      if len(data) < length:
        raise _UnreadBody(errors.INVALID_ARGUMENT, f"the body ended after {len(data)} of its {length} bytes")
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
          raise errors.ServingError(errors.NOT_FOUND, f"no such endpoint: {method} {self.path} (try POST "
                             f"/v1/models/{core.model_name}:predict or GET /v1/models/{core.model_name})")
        name, version, verb = parsed
        if method == "GET" and verb is None:
          return self._send(200, core.status(name, version))
        if method == "GET" and verb == "metadata":
          model = core.resolve(name, version)
          return self._send(200, {"model_spec": {"name": model.name, "signature_name": "",
                                                 "version": str(model.version)},
                                  "metadata": {model_server.SIGNATURE_DEF_FIELD: json_format.MessageToDict(
                                      model.signature_defs)}})
        if method == "POST" and verb == "predict":
          try:
            body = json.loads(data or b"null")
          except ValueError as e:
            raise errors.ServingError(errors.INVALID_ARGUMENT, f"the request body is not valid JSON: {e}") from None
          return self._send(200, rest_predict(core, name, version, body))
        raise errors.ServingError(errors.NOT_FOUND, f"no such endpoint: {method} {self.path}")
      except _UnreadBody as e:
        self._send(e.http_status, {"error": e.message}, close=True)
        self._drain(e.remaining)
      except errors.ServingError as e:
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


def bind_rest(host: str = model_server.DEFAULT_HOST, port: int = 8501) -> Tuple[http_server.ThreadingHTTPServer, int]:
  """A REST server bound to host:port (0: any free port), not yet serving; returns it and the port."""
  try:
    httpd = http_server.ThreadingHTTPServer((host, port), None)  # the handler comes with the model
  except OSError as e:
    raise grpc_server.bind_failure("REST", host, port, e.strerror or str(e)) from None
  httpd.daemon_threads = True
  return httpd, httpd.server_address[1]


def serve_rest(httpd: http_server.ThreadingHTTPServer, core: model_server.ModelServer,
               max_body_mb: float = model_server.DEFAULT_MAX_BODY_MB) -> None:
  """Serves a bound REST server on `core` from a thread."""
  httpd.RequestHandlerClass = make_rest_handler(core, max_body_mb)
  threading.Thread(target=httpd.serve_forever, name="rest", daemon=True).start()
