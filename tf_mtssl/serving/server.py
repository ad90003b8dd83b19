"""Both protocols started on one `model_server.ModelServer` (what `python -m tf_mtssl.serve` runs)."""

import dataclasses
from typing import Optional

from tf_mtssl.core import configs

from tf_mtssl.serving import grpc_server as grpc_lib
from tf_mtssl.serving import model_server
from tf_mtssl.serving import rest_server as rest_lib


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  """`python -m tf_mtssl.serve`: what is served, where, with which limits."""
  export_dir: str = configs.field("exports/tf_mtssl", "Export base directory (integer version subdirectories, as "
                                  "written by tf_mtssl.export_saved_model).")
  port: int = configs.field(8500, "gRPC port (0: any free port; the bound one is printed).")
  rest_port: Optional[int] = configs.field(None, "REST API port (0: any free port); unset: no REST server.")
  host: str = configs.field(model_server.DEFAULT_HOST, "Address to bind. The default serves this machine only; "
                            "0.0.0.0 exposes the server on every network interface (no authentication: only on a "
                            "trusted network).")
  model_name: str = configs.field("tf_mtssl", "Model name clients put in model_spec.name / the URL.")
  num_threads: int = configs.field(8, "gRPC worker threads (concurrent requests in flight).")
  batching: str = configs.field("auto", "Merge compatible requests that arrive while the model is busy into one "
                                "call (no added latency when idle). auto: on with a GPU, off on CPU, where larger "
                                "batches measured no faster (bench/serving_latency.py).",
                                choices=model_server.BATCHING_MODES)
  max_batch_size: int = configs.field(16, "Most examples in one merged call.")
  batch_timeout_ms: float = configs.field(0.0, "How long a batch waits for more requests before running; 0: never "
                                          "wait (best on CPU, see bench/serving_latency.py).")
  num_batch_threads: int = configs.field(1, "Model calls run in parallel by the batcher (each call already uses "
                                         "every core through TF's intra-op threads).")
  poll_seconds: float = configs.field(2.0, "Seconds between checks for a newer version (0: never).")
  max_message_mb: int = configs.field(256, "Largest gRPC request/response (block-3 maps are large).")
  max_body_mb: float = configs.field(model_server.DEFAULT_MAX_BODY_MB, "Largest REST request body; larger ones get 413.")
  max_instances: int = configs.field(model_server.DEFAULT_MAX_INSTANCES, "Most examples in one request (REST "
                                     "instances, gRPC batch size); more: INVALID_ARGUMENT / 400.")
  max_image_pixels: int = configs.field(model_server.DEFAULT_MAX_IMAGE_PIXELS, "Most pixels one image may decode "
                                        "to (height x width, all frames of an animation), read from its header "
                                        "before decoding; more: INVALID_ARGUMENT / 400.")


def start_from_config(config: ServeConfig) -> "Servers":
  """`start` with the settings of `config`."""
  return start(config.export_dir, port=config.port, rest_port=config.rest_port, host=config.host,
               model_name=config.model_name, num_threads=config.num_threads, max_message_mb=config.max_message_mb,
               max_body_mb=config.max_body_mb, max_instances=config.max_instances,
               max_image_pixels=config.max_image_pixels, batching=model_server.resolve_batching(config.batching),
               max_batch_size=config.max_batch_size, batch_timeout_ms=config.batch_timeout_ms,
               num_batch_threads=config.num_batch_threads, poll_seconds=config.poll_seconds)


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


def start(export_dir: str, port: int = 8500, rest_port: Optional[int] = None, host: str = model_server.DEFAULT_HOST,
          model_name: str = "tf_mtssl", num_threads: int = 8, max_message_mb: int = 256,
          max_body_mb: float = model_server.DEFAULT_MAX_BODY_MB, **core_kwargs) -> Servers:
  """Binds gRPC (and REST when rest_port is not None; 0 = any port), loads the newest version, then
  serves. Binding comes first so that a port in use fails before a slow model load."""
  rest_lib.body_limit_bytes(max_body_mb)  # bad flags fail before anything is bound or loaded
  grpc_server, grpc_port = grpc_lib.bind_grpc(host, port, num_threads, max_message_mb)
  rest_server = bound_rest = core = None
  try:
    if rest_port is not None:
      rest_server, bound_rest = rest_lib.bind_rest(host, rest_port)
    core = model_server.ModelServer(export_dir, model_name=model_name, **core_kwargs)
    grpc_lib.serve_grpc(grpc_server, core)
    if rest_server is not None:
      rest_lib.serve_rest(rest_server, core, max_body_mb)
  except BaseException:
    grpc_server.stop(0)
    if rest_server is not None:
      rest_server.server_close()
    if core is not None:
      core.close()
    raise
  return Servers(core, grpc_server, grpc_port, rest_server, bound_rest)

