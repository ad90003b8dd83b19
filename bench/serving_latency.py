"""Serving latency and throughput of export.serve (gRPC Predict of 224-px JPEGs), per trunk.

  python -m bench.serving_latency            # full: tiny trunk and the default depth-101 trunk
  python -m bench.serving_latency --quick    # quick: tiny trunk only, few requests

For each trunk (random weights) the bench exports a SavedModel (image_size 224), starts the server in
this process on 127.0.0.1 (ephemeral port) and sends `serving_default` requests of encoded 224x224
JPEGs through a standard PredictionServiceStub, asking for the `features` output only (so the figures
measure the model, not the transfer of block-3 maps):
  batch1 / batch16: one client, requests of 1 / 16 images one after another: p50 and p99 latency per
    request (ms) and images/s;
  concurrent_batching / concurrent_no_batching: `clients` threads sending 1-image requests at once,
    with the server's dynamic batcher on (default) and off (one model call per request, run in
    parallel by the gRPC thread pool): the question is whether merging helps on this machine.
p99 of a few dozen requests is close to the maximum; read the figures as orders of magnitude on a
shared machine.
"""

import argparse
import concurrent.futures
import json
import os
import shutil
import tempfile
import time
from typing import Dict, List

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from export import server_lib  # noqa: E402
from tf_mtssl import export_lib  # noqa: E402
from tf_mtssl import trunk as trunk_lib  # noqa: E402

IMAGE_SIZE = 224
TINY = dict(depth=14, output_stride=16, base_width=8)
PAPER = dict(depth=101, output_stride=16, base_width=64)
SETTINGS = {
    # requests of batch 1, requests of batch 16, concurrent clients and requests per client
    True: dict(trunks={"tiny": TINY}, batch1=10, batch16=3, clients=4, per_client=3),
    False: dict(trunks={"tiny": TINY, "resnet101": PAPER},
                batch1={"tiny": 60, "resnet101": 20}, batch16={"tiny": 10, "resnet101": 4},
                clients=8, per_client={"tiny": 10, "resnet101": 3}),
}


def _jpegs(count: int) -> List[bytes]:
  """Distinct smooth 224x224 JPEGs (a photo-like size: JPEG decoding cost is realistic)."""
  rng = np.random.default_rng(0)
  out = []
  for _ in range(count):
    small = rng.uniform(0, 255, size=(8, 8, 3)).astype(np.float32)
    image = tf.cast(tf.image.resize(small, [IMAGE_SIZE, IMAGE_SIZE], method="bicubic"), tf.uint8)
    out.append(tf.io.encode_jpeg(tf.clip_by_value(image, 0, 255), quality=90).numpy())
  return out


def _summary(latencies_s: List[float], images: int, wall_s: float) -> Dict[str, float]:
  ms = np.array(latencies_s) * 1000.0
  return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
          "images_per_s": images / wall_s, "requests": len(latencies_s)}


def _sequential(stub, images: List[bytes], batch: int, requests: int) -> Dict[str, float]:
  request = server_lib.predict_request(images[:batch], outputs=["features"])
  stub.Predict(request, timeout=600)  # warm-up of this batch shape
  latencies = []
  start = time.perf_counter()
  for _ in range(requests):
    t = time.perf_counter()
    stub.Predict(request, timeout=600)
    latencies.append(time.perf_counter() - t)
  return _summary(latencies, batch * requests, time.perf_counter() - start)


def _concurrent(stub, images: List[bytes], clients: int, per_client: int) -> Dict[str, float]:
  def client(index):
    out = []
    for r in range(per_client):
      request = server_lib.predict_request([images[(index * per_client + r) % len(images)]],
                                           outputs=["features"])
      t = time.perf_counter()
      stub.Predict(request, timeout=600)
      out.append(time.perf_counter() - t)
    return out

  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    latencies = [l for part in pool.map(client, range(clients)) for l in part]
  return _summary(latencies, clients * per_client, time.perf_counter() - start)


def _pick(value, name):
  return value[name] if isinstance(value, dict) else value


def bench_trunk(name: str, trunk_config: dict, settings: dict) -> Dict[str, dict]:
  keras.utils.clear_session()
  workdir = tempfile.mkdtemp(prefix="serving_bench_")
  try:
    start = time.perf_counter()
    export_lib.export_trunk(trunk_lib.build_trunk(**trunk_config), workdir, image_size=IMAGE_SIZE)
    result = {"trunk": trunk_config, "export_s": time.perf_counter() - start}
    images = _jpegs(16)
    for batching in (True, False):
      servers = server_lib.start(workdir, port=0, host="127.0.0.1", batching=batching, poll_seconds=0)
      try:
        stub = server_lib.make_stub(f"127.0.0.1:{servers.grpc_port}")
        if batching:  # sequential figures do not depend on batching (one request in flight)
          result["batch1"] = _sequential(stub, images, 1, _pick(settings["batch1"], name))
          result["batch16"] = _sequential(stub, images, 16, _pick(settings["batch16"], name))
        key = "concurrent_batching" if batching else "concurrent_no_batching"
        result[key] = _concurrent(stub, images, settings["clients"], _pick(settings["per_client"], name))
        if batching:
          batcher = servers.core.batcher
          result[key]["model_calls"] = batcher.batches_run
          result[key]["mean_requests_per_call"] = batcher.requests_run / max(1, batcher.batches_run)
      finally:
        servers.stop(grace_s=0)
    return result
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


def run(quick: bool) -> dict:
  """Measures every trunk of the mode; returns the figures with the settings."""
  settings = SETTINGS[bool(quick)]
  result = {"benchmark": "serving_latency", "quick": bool(quick), "image_size": IMAGE_SIZE,
            "transport": "gRPC on 127.0.0.1, server in the same process", "outputs": ["features"],
            "clients": settings["clients"],
            "device": "GPU" if tf.config.list_physical_devices("GPU") else "CPU",
            "cpu_count": os.cpu_count(), "trunks": {}}
  for name, config in settings["trunks"].items():
    result["trunks"][name] = bench_trunk(name, config, settings)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="Tiny trunk only, few requests (seconds).")
  args = parser.parse_args()
  result = run(args.quick)

  def rounded(value):
    if isinstance(value, dict):
      return {k: rounded(v) for k, v in value.items()}
    return round(value, 2) if isinstance(value, float) else value

  print(json.dumps(rounded(result), indent=1))
  print(f"{'trunk':10} {'mode':24} {'p50 ms':>9} {'p99 ms':>9} {'images/s':>9}")
  for name, figures in result["trunks"].items():
    for mode in ("batch1", "batch16", "concurrent_batching", "concurrent_no_batching"):
      f = figures[mode]
      print(f"{name:10} {mode:24} {f['p50_ms']:9.1f} {f['p99_ms']:9.1f} {f['images_per_s']:9.1f}")


if __name__ == "__main__":
  main()
