"""Silences TensorFlow's start-up noise; every binary imports this module first, before TensorFlow.

Importing TensorFlow prints lines that look like errors but are not: `cudart_stub ... Could not find
cuda drivers` and `All log messages before absl::InitializeLog() ...` (written before TF's log level
applies), oneDNN and CPU-feature notices, and on a machine without a GPU driver `E0000 ...
cuda_platform.cc ... failed call to cuInit`. Unless the user set `TF_CPP_MIN_LOG_LEVEL` (then nothing
is changed: `TF_CPP_MIN_LOG_LEVEL=0` shows everything), this sets it to 2 (warnings and info hidden,
errors shown) and imports TensorFlow and initialises its devices with the process's stderr (file
descriptor 2) pointed at /dev/null, restoring it right after (Python exceptions raised meanwhile
still reach the user: they propagate after the restore), and drops the INFO lines TensorFlow's own
Python code logs.
"""

import logging
import os
import sys

LOG_LEVEL_VAR = "TF_CPP_MIN_LOG_LEVEL"
QUIET_LEVEL = "2"


def silence_tf_startup() -> bool:
  """Imports TensorFlow quietly (see the module docstring); returns whether it silenced anything."""
  if LOG_LEVEL_VAR in os.environ or "tensorflow" in sys.modules:
    return False  # the user's choice, or too late: TensorFlow has printed its start-up lines already
  os.environ[LOG_LEVEL_VAR] = QUIET_LEVEL
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    import tensorflow as tf
    tf.config.list_physical_devices()  # the cuInit attempt happens here, not at import
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)
  # TF's own Python INFO lines (checkpoint sharding timings, ...), logged through absl's and TF's
  # loggers whose levels absl resets when it parses --verbosity: a filter stays.
  for name in ("absl", "tensorflow"):
    logging.getLogger(name).addFilter(_drop_tensorflow_info)
  return True


def _drop_tensorflow_info(record: logging.LogRecord) -> bool:
  return record.levelno >= logging.WARNING or f"{os.sep}tensorflow{os.sep}" not in record.pathname


silence_tf_startup()
