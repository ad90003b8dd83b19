"""Serving latency and throughput of tf_mtssl.serve (gRPC Predict of 224-px JPEGs), per trunk.

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
  direct: the same signature called in-process (`Signature.run`, no gRPC, no server), the reference
    of the batch-1 and batch-16 rows: their ratio is what serving adds to the model.
p99 of a few dozen requests is close to the maximum; read the figures as orders of magnitude on a
shared machine. No goals: the table reports the figures.
"""

import concurrent.futures
import shutil
import tempfile
import time
from typing import Dict, List

from tf_mtssl.core import quiet  # noqa: F401,E402  (before TensorFlow: silences its start-up noise)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench import common  # noqa: E402
from bench.common import Row  # noqa: E402
from tf_mtssl.serving import client as serving_client  # noqa: E402
from tf_mtssl.serving import model_server
from tf_mtssl.serving import server as serving
from tf_mtssl.serving import export as export_lib  # noqa: E402
from tf_mtssl.model import trunk as trunk_lib  # noqa: E402

IMAGE_SIZE = 224
TINY, PAPER = common.QUICK_TRUNK, common.PAPER_TRUNK
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
  request = serving_client.predict_request(images[:batch], outputs=["features"])
  stub.Predict(request, timeout=600)  # warm-up of this batch shape
  latencies = []
  start = time.perf_counter()
  for _ in range(requests):
    t = time.perf_counter()
    stub.Predict(request, timeout=600)
    latencies.append(time.perf_counter() - t)
  return _summary(latencies, batch * requests, time.perf_counter() - start)


def _direct(signature: model_server.Signature, images: List[bytes], batch: int, requests: int) -> Dict[str, float]:
  """The signature called in-process: the model's own latency (decoding + trunk + pooling)."""
  inputs = {export_lib.BYTES_INPUT: np.array(images[:batch], dtype=object)}
  signature.run(inputs)  # warm-up of this batch shape
  latencies = []
  start = time.perf_counter()
  for _ in range(requests):
    t = time.perf_counter()
    signature.run(inputs)
    latencies.append(time.perf_counter() - t)
  return _summary(latencies, batch * requests, time.perf_counter() - start)


def _concurrent(stub, images: List[bytes], clients: int, per_client: int) -> Dict[str, float]:
  def client(index):
    out = []
    for r in range(per_client):
      request = serving_client.predict_request([images[(index * per_client + r) % len(images)]],
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
      servers = serving.start(workdir, port=0, host="127.0.0.1", batching=batching, poll_seconds=0)
      try:
        stub = serving_client.make_stub(f"127.0.0.1:{servers.grpc_port}")
        if batching:  # sequential figures do not depend on batching (one request in flight)
          signature = servers.core.model.signature(export_lib.SERVING_DEFAULT)
          for batch in (1, 16):
            requests = _pick(settings[f"batch{batch}"], name)
            result[f"batch{batch}"] = _sequential(stub, images, batch, requests)
            result[f"direct{batch}"] = _direct(signature, images, batch, requests)
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


def run(quick: bool = False) -> List[Row]:
  """Measures every trunk of the mode; returns the rows of the `python -m bench` table."""
  settings = SETTINGS[bool(quick)]
  rows = []
  for name, config in settings["trunks"].items():
    r = bench_trunk(name, config, settings)
    trunk = common.trunk_name(config)
    for batch in (1, 16):
      grpc, direct = r[f"batch{batch}"], r[f"direct{batch}"]
      rows.append(Row(name=f"serving {trunk} batch {batch} p50 ({IMAGE_SIZE}px JPEG)", figure=grpc["p50_ms"],
                      unit="ms/request", reference=direct["p50_ms"], ratio=grpc["p50_ms"] / direct["p50_ms"],
                      note=f"ref: in-process signature call; p99 {grpc['p99_ms']:.1f} ms, "
                           f"{grpc['images_per_s']:.1f} img/s, {grpc['requests']} requests (gRPC, 127.0.0.1)"))
    on, off = r["concurrent_batching"], r["concurrent_no_batching"]
    rows.append(Row(name=f"serving {trunk} {settings['clients']} clients, batching on/off",
                    figure=on["images_per_s"], unit="img/s", reference=off["images_per_s"],
                    ratio=on["images_per_s"] / off["images_per_s"],
                    note=f"ref: batching off; p50 {on['p50_ms']:.0f} vs {off['p50_ms']:.0f} ms, "
                         f"{on['mean_requests_per_call']:.1f} requests per model call"))
  return rows


if __name__ == "__main__":
  common.module_main(run, __doc__)
