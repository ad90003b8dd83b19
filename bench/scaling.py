"""Data-parallel scaling of the pretraining step: 1 vs 2 replicas, 1 vs 2 workers.

  python -m bench.scaling            # full: ResNet-101 trunk, rp with 96-px patches, 1 image/replica
  python -m bench.scaling --quick    # quick: the smoke trunk (depth 14, base width 8), 32-px patches

Each configuration runs in its own fresh process, alone, on the real training step
(`tf_mtssl.pretraining.trainer.Trainer`: rp batches from `distribute_datasets_from_function`, per-task RMSProp,
gradient all-reduce), timed after warm-up (tracing excluded), with the loss fetched every step as the
training loop does:
  1 replica    the default strategy, one process (the baseline of both ratios);
  2 replicas   MirroredStrategy over 2 logical CPU devices of one process;
  2 workers    MultiWorkerMirroredStrategy, 2 processes on 127.0.0.1 (the chief's timing).
Weak scaling: the per-replica batch is fixed, so the global batch doubles with 2 replicas/workers.
Ratios: steps/s and examples/s of 2 over 1 (ideal 1.0 and 2.0).

With GPUs (`tf.config.list_physical_devices("GPU")` in the parent) the configurations are:
  1 replica    the default strategy on the first GPU;
  mirrored     MirroredStrategy over all visible GPUs (N replicas; with one GPU, its overhead alone);
  2 workers    only with >= 2 GPUs: MultiWorkerMirroredStrategy, one GPU per process.
Every child then lets TensorFlow allocate GPU memory as needed (TF_FORCE_GPU_ALLOW_GROWTH).

On a machine with 2 CPU cores and no accelerator, the 2 replicas or 2 workers share the same 2 cores
that the single replica already uses (TF's thread pools span all cores), so the ratios measure the
overhead of splitting the step and all-reducing the gradients, not a speed-up. A speed-up needs one
device (GPU) per replica, or one machine per worker.
"""

import argparse
import json
import os
import tempfile
import time
from typing import Dict, List

from bench import common
from tf_mtssl.core import configs
from tf_mtssl.pretraining import distribution as distribute
from bench.common import Row

SETTINGS = {
    True: dict(trunk=common.QUICK_TRUNK, rp=common.QUICK_OPTIONS["rp"], per_replica_batch=4, warmup=3, steps=30),
    False: dict(trunk=common.PAPER_TRUNK, rp=dict(patch_size=96, gap=48, jitter=7, hidden=4096, reduce_channels=256),
                per_replica_batch=1, warmup=2, steps=4),
}
CONFIGS = ("1_replica", "2_replicas", "2_workers")  # without a GPU
GPU_CONFIGS = ("1_replica", "mirrored", "2_workers")  # 2_workers only with >= 2 GPUs


def configs_for(gpus: int):
  """The configurations measured on a machine with `gpus` GPUs."""
  if not gpus:
    return CONFIGS
  return GPU_CONFIGS if gpus >= 2 else GPU_CONFIGS[:2]


def _gpu_count() -> int:
  import tensorflow as tf
  return len(tf.config.list_physical_devices("GPU"))


def _measure(config: str, quick: bool, data: str) -> Dict[str, float]:
  """In a fresh process: builds the strategy of `config`, times the training step."""
  import tensorflow as tf
  from tf_mtssl.pretraining import trainer as train
  from tf_mtssl.tasks.relative_position import RelativePositionOptions, RelativePositionTask
  if config == "2_replicas":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  elif config == "mirrored":
    strategy = tf.distribute.MirroredStrategy()  # every visible GPU
  elif config == "2_workers":
    strategy = distribute.make_multi_worker_strategy(cluster_timeout_s=300)
  else:
    strategy = tf.distribute.get_strategy()
  s = SETTINGS[quick]
  batch = s["per_replica_batch"] * strategy.num_replicas_in_sync
  trainer = train.Trainer(
      tempfile.mkdtemp(prefix="scaling_"), {"rp": RelativePositionTask(configs.from_dict(RelativePositionOptions, s["rp"]))},
      s["trunk"], train.TrainConfig(train_steps=1, batch_size=batch, learning_rate=1e-3, warmup_steps=1,
                                    progress_bar=False), {"rp": data}, strategy=strategy)
  iterators = trainer.make_iterators(0)

  def step(iterators):
    return (trainer.run_steps(iterators).metrics,)

  start = time.perf_counter()
  float(step(iterators)[0]["rp"]["loss"])
  first_step_s = time.perf_counter() - start
  for _ in range(s["warmup"] - 1):
    float(step(iterators)[0]["rp"]["loss"])
  start = time.perf_counter()
  for _ in range(s["steps"]):
    float(step(iterators)[0]["rp"]["loss"])
  steps_per_s = s["steps"] / (time.perf_counter() - start)
  return {"replicas": strategy.num_replicas_in_sync, "global_batch": batch, "steps_per_s": steps_per_s,
          "examples_per_s": steps_per_s * batch, "first_step_s": first_step_s,
          "device": "GPU" if tf.config.list_physical_devices("GPU") else "CPU"}


def _run_config(config: str, quick: bool, data: str, gpus: int = 0) -> Dict[str, float]:
  """Runs `config` in fresh process(es); returns the (chief's) measurement."""
  envs = [{}]
  if config == "2_workers":
    ports = distribute.free_local_ports(2)
    envs = [{"TF_CONFIG": json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                      "task": {"type": "worker", "index": i}})} for i in range(2)]
    if gpus:
      envs = [{**env, "CUDA_VISIBLE_DEVICES": str(i)} for i, env in enumerate(envs)]
  if gpus:
    envs = [{**env, "TF_FORCE_GPU_ALLOW_GROWTH": "true"} for env in envs]
  args = [f"--child={config}", f"--data={data}"] + (["--quick"] if quick else [])
  return common.spawn_children("bench.scaling", args, envs)[0]


def measure_all(quick: bool) -> dict:
  """Measures the three configurations; returns them and the 2-over-1 ratios."""
  data = common.data_spec("rp")
  s = SETTINGS[bool(quick)]
  gpus = _gpu_count()
  configs = configs_for(gpus)
  result = {"benchmark": "scaling", "quick": bool(quick), "trunk": s["trunk"], "rp": s["rp"],
            "per_replica_batch": s["per_replica_batch"], "timed_steps": s["steps"], "data": data,
            "cpu_count": os.cpu_count(), "gpus": gpus, "configs": list(configs)}
  for config in configs:
    result[config] = _run_config(config, bool(quick), data, gpus)
  result["device"] = result["1_replica"]["device"]
  base = result["1_replica"]
  for config in configs[1:]:
    result[f"{config}_steps_ratio"] = result[config]["steps_per_s"] / base["steps_per_s"]
    result[f"{config}_examples_ratio"] = result[config]["examples_per_s"] / base["examples_per_s"]
  return result


def run(quick: bool = False) -> List[Row]:
  """The rows of the `python -m bench` table: examples/s of 2 replicas/workers over 1 replica."""
  r = measure_all(quick)
  rows = []
  for c in r["configs"][1:]:
    replicas = r[c]["replicas"]
    if r["device"] == "CPU":
      note = (f"ref: 1 replica; weak scaling (ideal {replicas:.1f}); {r['cpu_count']} CPU cores, no accelerator: "
              "overhead, not speed-up")
    else:
      note = f"ref: 1 replica on 1 GPU; weak scaling (ideal {replicas:.1f}); {r['gpus']} GPU(s)"
    label = f"mirrored {replicas} GPU" if c == "mirrored" else c.replace("_", " ")
    rows.append(Row(name=f"scaling {label} vs 1 ({common.trunk_name(r['trunk'])} rp)",
                    figure=r[c]["examples_per_s"], unit="examples/s", reference=r["1_replica"]["examples_per_s"],
                    ratio=r[f"{c}_examples_ratio"], note=note))
  return rows


def _format(r: dict) -> str:
  lines = [f"{'configuration':12s} {'replicas':>8s} {'global batch':>12s} {'steps/s':>9s} {'examples/s':>11s} "
           f"{'first step s':>12s}"]
  for c in r["configs"]:
    m = r[c]
    lines.append(f"{c:12s} {m['replicas']:8d} {m['global_batch']:12d} {m['steps_per_s']:9.3f} "
                 f"{m['examples_per_s']:11.2f} {m['first_step_s']:12.1f}")
  for c in r["configs"][1:]:
    lines.append(f"{c} / 1_replica: steps/s x{r[f'{c}_steps_ratio']:.2f} (ideal 1.0), examples/s "
                 f"x{r[f'{c}_examples_ratio']:.2f} (ideal {r[c]['replicas']:.1f})")
  if r["device"] == "CPU":
    lines.append(f"CPU only ({r['cpu_count']} cores): replicas and workers share the same cores, so these "
                 "ratios show the overhead of data parallelism here, not a speed-up.")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="the smoke trunk and 32-px patches (a few minutes).")
  parser.add_argument("--child", choices=sorted(set(CONFIGS + GPU_CONFIGS)), help=argparse.SUPPRESS)  # internal: one measurement
  parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    common.emit_result(_measure(args.child, args.quick, args.data))
    return
  result = measure_all(args.quick)
  print(json.dumps(result, indent=1))
  print(_format(result))


if __name__ == "__main__":
  main()
