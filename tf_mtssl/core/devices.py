"""Settings that default to what the machine has: `auto` = on when TensorFlow sees a GPU."""

AUTO_MODES = ("auto", "on", "off")


def on_when_gpu(mode: str, flag: str) -> bool:
  """'on' -> True, 'off' -> False, 'auto' -> whether a GPU is visible; else ValueError naming `--flag`."""
  if mode not in AUTO_MODES:
    raise ValueError(f"--{flag} must be one of {', '.join(AUTO_MODES)}, got {mode!r}")
  if mode == "auto":
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (this module is imported before TF is needed)
    return bool(tf.config.list_logical_devices("GPU"))
  return mode == "on"
