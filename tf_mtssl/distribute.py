"""tf.distribute strategy construction for the training binaries."""

import json
import os

import tensorflow as tf

DISTRIBUTIONS = ("default", "mirrored", "multi_worker")


def make_strategy(kind: str = "default", collective_timeout_s: float = 120.0) -> tf.distribute.Strategy:
  """default: one device; mirrored: all local GPUs (or the CPU); multi_worker: from TF_CONFIG."""
  if kind == "default":
    return tf.distribute.get_strategy()
  if kind == "mirrored":
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy([d.name for d in gpus] or None)
  if kind == "multi_worker":
    raw = os.environ.get("TF_CONFIG")
    if not raw:
      raise ValueError("--distribution=multi_worker needs the TF_CONFIG environment variable "
                       "(cluster + task); see README 'Several workers'.")
    try:
      tf_config = json.loads(raw)
      workers = tf_config["cluster"]["worker"]
      task = tf_config["task"]
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"Malformed TF_CONFIG ({e}): {raw}") from e
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=collective_timeout_s)
    try:
      return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except Exception as e:  # noqa: BLE001 - re-raised with the addresses named
      raise RuntimeError(f"Worker {task} could not join the cluster {workers}: {e}") from e
  raise ValueError(f"--distribution must be one of {DISTRIBUTIONS}, got {kind!r}")
