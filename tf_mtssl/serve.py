"""Serves an export directory over TF Serving's gRPC PredictionService and REST API.

  python -m tf_mtssl.serve --export_dir=exports/smoke --port=8500 --rest_port=8501

Serves the newest integer version under --export_dir as --model_name (and switches to newer versions
as they are exported). Prints the bound ports once ready (port 0 picks a free one); stops cleanly on
SIGTERM or Ctrl-C. Listens on 127.0.0.1 (this machine) unless --host says otherwise (0.0.0.0: every
interface). Limits (--max_instances, --max_image_pixels, --max_body_mb), protocol details and error
codes: tf_mtssl/serving/server_lib.py. A real TF Serving binary
serves the same directory unchanged:
  tensorflow_model_server --port=8500 --rest_api_port=8501 --model_name=tf_mtssl \
      --model_base_path=$(pwd)/exports/smoke
"""

from tf_mtssl.core import quiet  # noqa: F401  (first: silences TensorFlow's start-up noise)

import logging
import signal
import threading

from absl import app, flags

from tf_mtssl.serving import server_lib
from tf_mtssl import cli as flag_utils

FLAGS = flags.FLAGS

flags.DEFINE_string("export_dir", "exports/tf_mtssl", "Export base directory (integer version "
                    "subdirectories, as written by tf_mtssl.export_saved_model).")
flags.DEFINE_integer("port", 8500, "gRPC port (0: any free port; the bound one is printed).")
flags.DEFINE_integer("rest_port", None, "REST API port (0: any free port); unset: no REST server.")
flags.DEFINE_string("host", server_lib.DEFAULT_HOST, "Address to bind. The default serves this machine "
                    "only; 0.0.0.0 exposes the server on every network interface (no authentication: "
                    "only on a trusted network).")
flags.DEFINE_string("model_name", "tf_mtssl", "Model name clients put in model_spec.name / the URL.")
flags.DEFINE_integer("num_threads", 8, "gRPC worker threads (concurrent requests in flight).")
flags.DEFINE_enum("batching", "auto", ["auto", "on", "off"], "Merge compatible requests that arrive "
                  "while the model is busy into one call (no added latency when idle). auto: on with a "
                  "GPU, off on CPU, where larger batches measured no faster (bench/serving_latency.py).")
flags.DEFINE_integer("max_batch_size", 16, "Most examples in one merged call.")
flags.DEFINE_float("batch_timeout_ms", 0.0, "How long a batch waits for more requests before running; "
                   "0: never wait (best on CPU, see bench/serving_latency.py).")
flags.DEFINE_integer("num_batch_threads", 1, "Model calls run in parallel by the batcher (each call "
                     "already uses every core through TF's intra-op threads).")
flags.DEFINE_float("poll_seconds", 2.0, "Seconds between checks for a newer version (0: never).")
flags.DEFINE_integer("max_message_mb", 256, "Largest gRPC request/response (block-3 maps are large).")
flags.DEFINE_float("max_body_mb", server_lib.DEFAULT_MAX_BODY_MB, "Largest REST request body; larger "
                   "ones get 413.")
flags.DEFINE_integer("max_instances", server_lib.DEFAULT_MAX_INSTANCES, "Most examples in one request "
                     "(REST instances, gRPC batch size); more: INVALID_ARGUMENT / 400.")
flags.DEFINE_integer("max_image_pixels", server_lib.DEFAULT_MAX_IMAGE_PIXELS, "Most pixels one image may "
                     "decode to (height x width, all frames of an animation), read from its header before "
                     "decoding; more: INVALID_ARGUMENT / 400.")


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"Unexpected arguments {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  stop = threading.Event()
  # Installed before loading, so a SIGTERM during start-up still ends the process cleanly.
  signal.signal(signal.SIGTERM, lambda *_: stop.set())
  signal.signal(signal.SIGINT, lambda *_: stop.set())
  servers = server_lib.start(
      FLAGS.export_dir, port=FLAGS.port, rest_port=FLAGS.rest_port, host=FLAGS.host,
      model_name=FLAGS.model_name, num_threads=FLAGS.num_threads, max_message_mb=FLAGS.max_message_mb,
      max_body_mb=FLAGS.max_body_mb, max_instances=FLAGS.max_instances,
      max_image_pixels=FLAGS.max_image_pixels,
      batching=server_lib.resolve_batching(FLAGS.batching), max_batch_size=FLAGS.max_batch_size,
      batch_timeout_ms=FLAGS.batch_timeout_ms, num_batch_threads=FLAGS.num_batch_threads,
      poll_seconds=FLAGS.poll_seconds)
  model = servers.core.model
  print(f"Serving model '{FLAGS.model_name}' version {model.version} from {model.path} "
        f"(signatures: {', '.join(sorted(model.signatures))})", flush=True)
  batcher = servers.core.batcher
  print("Dynamic batching: " + (f"on (max batch {batcher.max_batch_size})" if batcher else "off"), flush=True)
  print(f"gRPC PredictionService listening on {FLAGS.host} port {servers.grpc_port}", flush=True)
  if servers.rest_port is not None:
    print(f"REST API listening on {FLAGS.host} port {servers.rest_port} "
          f"(POST /v1/models/{FLAGS.model_name}:predict)", flush=True)
  while not stop.wait(0.5):
    pass
  print("Stopping (signal received)...", flush=True)
  servers.stop()
  print("Stopped.", flush=True)


if __name__ == "__main__":
  app.run(flag_utils.run_main(main))
