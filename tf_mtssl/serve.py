"""Serves an export directory over TF Serving's gRPC PredictionService and REST API.

  python -m tf_mtssl.serve --export_dir=exports/smoke --port=8500 --rest_port=8501

Serves the newest integer version under --export_dir as --model_name (and switches to newer versions
as they are exported). Prints the bound ports once ready (port 0 picks a free one); stops cleanly on
SIGTERM or Ctrl-C. Listens on 127.0.0.1 (this machine) unless --host says otherwise (0.0.0.0: every
interface). Limits (--max_instances, --max_image_pixels, --max_body_mb), protocol details and error
codes: tf_mtssl/serving/. A real TF Serving binary serves the same directory unchanged:
  tensorflow_model_server --port=8500 --rest_api_port=8501 --model_name=tf_mtssl \
      --model_base_path=$(pwd)/exports/smoke
"""

from tf_mtssl.core import quiet  # noqa: F401  (first: silences TensorFlow's start-up noise)

import logging
import signal
import threading

from absl import app

from tf_mtssl import cli
from tf_mtssl.serving import server as serving

cli.define_flags(serving.ServeConfig)


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"Unexpected arguments {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  config = cli.config_from_flags(serving.ServeConfig)
  stop = threading.Event()
  # Installed before loading, so a SIGTERM during start-up still ends the process cleanly.
  signal.signal(signal.SIGTERM, lambda *_: stop.set())
  signal.signal(signal.SIGINT, lambda *_: stop.set())
  servers = serving.start_from_config(config)
  model = servers.core.model
  print(f"Serving model '{config.model_name}' version {model.version} from {model.path} "
        f"(signatures: {', '.join(sorted(model.signatures))})", flush=True)
  batcher = servers.core.batcher
  print("Dynamic batching: " + (f"on (max batch {batcher.max_batch_size})" if batcher else "off"), flush=True)
  print(f"gRPC PredictionService listening on {config.host} port {servers.grpc_port}", flush=True)
  if servers.rest_port is not None:
    print(f"REST API listening on {config.host} port {servers.rest_port} "
          f"(POST /v1/models/{config.model_name}:predict)", flush=True)
  while not stop.wait(0.5):
    pass
  print("Stopping (signal received)...", flush=True)
  servers.stop()
  print("Stopped.", flush=True)


if __name__ == "__main__":
  app.run(cli.run_main(main))
