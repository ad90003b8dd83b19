"""tf.distribute strategy construction for the training binaries.

  default       one device (`tf.distribute.get_strategy()`);
  mirrored      `MirroredStrategy` over all local GPUs, or the CPU when there is none;
  multi_worker  `MultiWorkerMirroredStrategy` configured from the TF_CONFIG environment variable
                (`{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": i}}`,
                optionally with a "chief" job).

Start-up of a multi-worker cluster is bounded: every worker waits at most `cluster_timeout_s` for all
peers to register with the coordination service (hosted by the chief, else worker 0), then fails with
`ClusterError` naming the addresses that did not answer. TF's own default is to wait forever on the
coordination leader (measured with TF 2.21: a worker 0 whose peer never starts blocks in
`ensure_initialized` and ignores SIGTERM), so the service is configured here, before the strategy,
with a registration barrier and that timeout. Once running, a dead peer is detected by the
coordination service's heartbeats, which abort the collectives of the others.
"""

import dataclasses
import json
import os
import re
import socket
from typing import Dict, List, Optional

import tensorflow as tf
# TF internals (TF 2.21): the public MultiWorkerMirroredStrategy has no start-up timeout, so the
# coordination service is configured directly, the way the strategy itself would, plus the timeout.
from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
from tensorflow.python.distribute import multi_worker_util
from tensorflow.python.eager import context

DISTRIBUTIONS = ("default", "mirrored", "multi_worker")
DEFAULT_CLUSTER_TIMEOUT_S = 300.0
# Jobs that take part in synchronous training (an "evaluator" would not; MWMS coordinates the same).
_TRAINING_JOBS = ("chief", "worker")


class ClusterError(RuntimeError):
  """A worker could not join its cluster; the message names the addresses concerned."""


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
  """The parsed TF_CONFIG: the cluster (job -> addresses) and this process's task."""
  cluster: Dict[str, List[str]]
  task_type: str
  task_index: int

  @property
  def address(self) -> str:
    return self.cluster[self.task_type][self.task_index]

  @property
  def name(self) -> str:
    return f"{self.task_type} {self.task_index}"

  def peers(self) -> Dict[str, str]:
    """'job index' -> address of every other training task."""
    return {f"{job} {i}": address for job in _TRAINING_JOBS for i, address in enumerate(self.cluster.get(job, []))
            if (job, i) != (self.task_type, self.task_index)}


def free_local_ports(n: int) -> List[int]:
  """n distinct TCP ports free on 127.0.0.1 now (held open together so that they differ): the addresses
  of a cluster of local workers (tests, benchmarks)."""
  sockets = [socket.socket() for _ in range(n)]
  try:
    for s in sockets:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def parse_tf_config(raw: Optional[str]) -> ClusterConfig:
  """Validates TF_CONFIG; raises ValueError naming what is wrong."""
  if not raw:
    raise ValueError("--distribution=multi_worker needs the TF_CONFIG environment variable (cluster + "
                     "task), e.g. TF_CONFIG='{\"cluster\": {\"worker\": [\"host1:12345\", \"host2:12345\"]}, "
                     "\"task\": {\"type\": \"worker\", \"index\": 0}}'")
  try:
    config = json.loads(raw)
    cluster, task = config["cluster"], config["task"]
    task_type, task_index = task["type"], int(task["index"])
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"Malformed TF_CONFIG ({type(e).__name__}: {e}); expected "
                     f"{{\"cluster\": {{...}}, \"task\": {{\"type\": ..., \"index\": ...}}}}: {raw}") from e
  if not isinstance(cluster, dict) or not any(cluster.get(job) for job in _TRAINING_JOBS):
    raise ValueError(f"TF_CONFIG cluster needs a 'worker' (or 'chief') job with addresses: {raw}")
  for job, addresses in cluster.items():
    if not isinstance(addresses, list) or not all(isinstance(a, str) and ":" in a for a in addresses):
      raise ValueError(f"TF_CONFIG cluster job {job!r} must be a list of 'host:port' strings, got {addresses!r}")
  if task_type not in _TRAINING_JOBS:
    raise ValueError(f"TF_CONFIG task type must be one of {_TRAINING_JOBS} for training, got {task_type!r}")
  if not 0 <= task_index < len(cluster.get(task_type, [])):
    raise ValueError(f"TF_CONFIG task index {task_index} is not in the cluster's {task_type!r} job "
                     f"{cluster.get(task_type, [])}")
  return ClusterConfig({job: list(a) for job, a in cluster.items()}, task_type, task_index)


def unreachable(addresses: Dict[str, str], timeout_s: float = 2.0) -> Dict[str, str]:
  """The entries of name -> 'host:port' where nothing accepts a TCP connection."""
  out = {}
  for name, address in addresses.items():
    host, _, port = address.rpartition(":")
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
        pass
    except (OSError, ValueError):
      out[name] = address
  return out


def describe_peer_failure(error: Exception, cluster: Dict[str, List[str]]) -> str:
  """The informative line of a collective/coordination error, with the tasks it names resolved to
  their addresses (TF's message carries its own Python traceback and generic headers)."""
  message = getattr(error, "message", None) or str(error)
  lines = [l.strip() for l in message.splitlines() if l.strip()] or [""]
  keys = ("unhealthy", "aborted by", "reset by peer", "Connection", "Deadline", "/job:")
  picked = next((i for i, l in enumerate(lines) if any(k in l for k in keys)), len(lines) - 1)
  # "... the following tasks are unhealthy:" is followed by the task names on the next line.
  text = " ".join(lines[picked:picked + (2 if lines[picked].endswith(":") else 1)])
  tasks = sorted(set(re.findall(r"/job:(\w+)/(?:replica:\d+/)?task:(\d+)", message)))
  named = [f"{job} {i} at {cluster[job][int(i)]}" for job, i in tasks
           if job in cluster and int(i) < len(cluster[job])]
  return f"{type(error).__name__}: {text}" + (f" [{'; '.join(named)}]" if named else "")


def _configure_coordination_service(cluster: ClusterConfig, timeout_s: float) -> None:
  """What MultiWorkerMirroredStrategy configures (standalone service on the leader, chief + worker
  jobs), plus a registration barrier bounded by `timeout_s` (the strategy then keeps this config)."""
  ctx = context.context()
  jobs = [coordination_config_pb2.CoordinatedJob(name=job, num_tasks=len(cluster.cluster[job]))
          for job in _TRAINING_JOBS if cluster.cluster.get(job)]
  ctx.configure_coordination_service(
      service_type="standalone", service_leader=multi_worker_util.coordination_leader(cluster.cluster),
      coordinated_jobs=jobs, cluster_register_timeout_in_ms=int(timeout_s * 1000))
  # Without the barrier the leader does not apply the timeout to itself: it waits for absent peers
  # forever (measured, TF 2.21). With it, every task's registration returns or fails together.
  ctx.coordination_service.cluster_register_with_barrier = True


def make_multi_worker_strategy(cluster_timeout_s: float = DEFAULT_CLUSTER_TIMEOUT_S,
                               collective_timeout_s: Optional[float] = None,
                               tf_config: Optional[str] = None) -> tf.distribute.MultiWorkerMirroredStrategy:
  """MultiWorkerMirroredStrategy from TF_CONFIG, failing within `cluster_timeout_s` if a peer is absent.

  Args:
    cluster_timeout_s: longest wait for every worker of the cluster to start and register.
    collective_timeout_s: per-collective timeout (None: none; a dead peer is caught by heartbeats
      instead, and a fixed timeout would also fire while the chief alone writes a large checkpoint).
    tf_config: the TF_CONFIG JSON (default: the environment variable).
  Raises:
    ValueError: bad TF_CONFIG or timeout. ClusterError: the cluster could not be formed in time.
  """
  if cluster_timeout_s <= 0:
    raise ValueError(f"cluster_timeout_s must be > 0, got {cluster_timeout_s}")
  cluster = parse_tf_config(tf_config if tf_config is not None else os.environ.get("TF_CONFIG"))
  if context.context().coordination_service is None:
    _configure_coordination_service(cluster, cluster_timeout_s)
  options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=collective_timeout_s)
  try:
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
  except (tf.errors.OpError, RuntimeError) as e:
    missing = unreachable(cluster.peers())
    who = (f"no answer from {', '.join(f'{n} at {a}' for n, a in missing.items())}" if missing else
           f"every peer ({', '.join(f'{n} at {a}' for n, a in cluster.peers().items())}) accepts "
           "connections but did not join in time")
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ClusterError(
        f"{cluster.name} ({cluster.address}) could not form the cluster within --cluster_timeout_s="
        f"{cluster_timeout_s:g}: {who}. Start every worker with the same TF_CONFIG cluster (its own "
        f"task index each) and check that the addresses are reachable. TF: {first_line}") from e


def make_strategy(kind: str = "default", cluster_timeout_s: float = DEFAULT_CLUSTER_TIMEOUT_S,
                  collective_timeout_s: Optional[float] = None) -> tf.distribute.Strategy:
  """default: one device; mirrored: all local GPUs (or the CPU); multi_worker: from TF_CONFIG."""
  if kind == "default":
    return tf.distribute.get_strategy()
  if kind == "mirrored":
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy([d.name for d in gpus] or None)
  if kind == "multi_worker":
    return make_multi_worker_strategy(cluster_timeout_s, collective_timeout_s)
  raise ValueError(f"--distribution must be one of {DISTRIBUTIONS}, got {kind!r}")


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
  """Whether `strategy` spans several processes (a cluster from TF_CONFIG)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  return bool(resolver is not None and resolver.cluster_spec().as_dict())


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.cluster_spec().as_dict():
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  if task_type in (None, "chief"):
    return True
  return task_type == "worker" and task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()


def worker_name(strategy) -> str:
  """'worker_1', 'chief_0', ... under several workers, else 'local'."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or resolver.task_type is None:
    return "local"
  return f"{resolver.task_type}_{resolver.task_id}"
