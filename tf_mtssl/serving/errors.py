"""Serving errors: gRPC status codes, their REST equivalents, and the one exception type every part raises."""

import logging

import grpc
import tensorflow as tf

log = logging.getLogger(__name__)


INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT


NOT_FOUND = grpc.StatusCode.NOT_FOUND


INTERNAL = grpc.StatusCode.INTERNAL


UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


_HTTP_STATUS = {INVALID_ARGUMENT: 400, NOT_FOUND: 404, RESOURCE_EXHAUSTED: 413, UNAVAILABLE: 503,
                INTERNAL: 500}

# Defaults of tf_mtssl.serve's flags. [I] all four: none comes from the paper or TF Serving.


class ServingError(Exception):
  """A request error with its gRPC status code (mapped to an HTTP status for REST)."""

  def __init__(self, code: grpc.StatusCode, message: str):
    super().__init__(message)
    self.code, self.message = code, message

  @property
  def http_status(self) -> int:
    return _HTTP_STATUS.get(self.code, 500)


def tf_error_message(error: tf.errors.OpError) -> str:
  """The cause line of a TF runtime error, without the "Graph execution error" preamble, the
  "Detected at node" trace and the graph node / op suffixes."""
  lines = [line for line in (error.message or str(error)).splitlines()
           if line.strip() and not line[0].isspace() and
           not line.startswith(("Graph execution error", "Detected at node", "<stack traces"))]
  text = lines[-1] if lines else str(error)
  for marker in (" [[", " [Op:"):
    text = text.split(marker)[0]
  return text.strip()
