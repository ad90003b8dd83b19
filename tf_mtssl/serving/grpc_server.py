"""TF Serving's gRPC PredictionService (Predict, GetModelMetadata) over a `model_server.ModelServer`."""

import concurrent.futures
import errno
import logging
import socket
from typing import Optional, Tuple

import grpc
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tf_mtssl.serving import errors
from tf_mtssl.serving import model_server

log = logging.getLogger(__name__)


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
  """tensorflow.serving.PredictionService over a model_server.ModelServer."""

  def __init__(self, core: model_server.ModelServer):
    self.core = core

  @staticmethod
  def _version(spec) -> Optional[int]:
    return spec.version.value if spec.HasField("version") else None

  def _abort(self, context, error: Exception):
    if isinstance(error, errors.ServingError):
      context.abort(error.code, error.message)
    log.exception("Internal error")
    context.abort(errors.INTERNAL, f"internal error: {type(error).__name__}: {error}")

  def Predict(self, request, context):  # noqa: N802 - gRPC method name
    try:
      inputs = {}
      for key, proto in request.inputs.items():
        try:
          inputs[key] = tf.make_ndarray(proto)
        except Exception as e:  # noqa: BLE001 - malformed TensorProto
          raise errors.ServingError(errors.INVALID_ARGUMENT, f"input '{key}' is not a valid TensorProto: {e}") from None
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
        raise errors.ServingError(errors.INVALID_ARGUMENT, "GetModelMetadataRequest must name at least one "
                           f"metadata_field ('{model_server.SIGNATURE_DEF_FIELD}')")
      unknown = [f for f in fields if f != model_server.SIGNATURE_DEF_FIELD]
      if unknown:
        raise errors.ServingError(errors.INVALID_ARGUMENT, f"metadata field(s) {unknown} not supported; only "
                           f"'{model_server.SIGNATURE_DEF_FIELD}'")
      model = self.core.resolve(request.model_spec.name, self._version(request.model_spec))
    except Exception as e:  # noqa: BLE001
      self._abort(context, e)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = model.name
    response.model_spec.version.value = model.version
    response.metadata[model_server.SIGNATURE_DEF_FIELD].Pack(model.signature_defs)
    return response


def bind_failure(kind: str, host: str, port: int, reason: str) -> ValueError:
  return ValueError(f"Could not bind the {kind} port {host}:{port}: {reason} (another server on it? "
                    "choose another port, or 0 for any free one)")


def _os_bind_error(host: str, port: int) -> Optional[str]:
  """Why the OS refuses a listening socket on host:port (None: it accepts), for a clear message
  before gRPC tries (its own failure is a bare RuntimeError plus a C-core log line)."""
  try:
    addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
  except socket.gaierror as e:
    return f"unknown host ({e.strerror})"
  failures = []
  for family, kind, proto, _, address in addresses:
    with socket.socket(family, kind, proto) as probe:
      probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: TIME_WAIT does not count
      try:
        probe.bind(address)
      except OSError as e:
        if e.errno == errno.EADDRINUSE:
          return e.strerror
        failures.append(e.strerror or str(e))
  # gRPC binds what it can of a name such as localhost (e.g. IPv4 only): fail only if nothing binds.
  return failures[0] if len(failures) == len(addresses) else None


def bind_grpc(host: str = model_server.DEFAULT_HOST, port: int = 8500, num_threads: int = 8,
              max_message_mb: int = 256) -> Tuple[grpc.Server, int]:
  """A gRPC server bound to host:port (0: any free port), not started; returns it and the port.

  A port in use is a ValueError: gRPC sets SO_REUSEPORT by default, which lets a second server
  bind the same port and take a share of the new connections.
  """
  reason = _os_bind_error(host, port) if port else None
  if reason:
    raise bind_failure("gRPC", host, port, reason)
  limit = max_message_mb * 1024 * 1024
  server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="grpc"),
                       options=[("grpc.max_send_message_length", limit),
                                ("grpc.max_receive_message_length", limit),
                                ("grpc.so_reuseport", 0)])
  try:
    bound = server.add_insecure_port(f"{host}:{port}")
  except RuntimeError as e:  # taken between the probe and this bind, or refused by gRPC itself
    raise bind_failure("gRPC", host, port, str(e).split(";")[0]) from None
  if bound == 0:  # older grpcio reports a failed bind this way
    raise bind_failure("gRPC", host, port, "gRPC bound no address")
  return server, bound


def serve_grpc(server: grpc.Server, core: model_server.ModelServer) -> None:
  """Starts a bound gRPC server on `core`."""
  prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionServicer(core), server)
  server.start()


# ---- REST -----------------------------------------------------------------------------------------
