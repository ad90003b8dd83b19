"""Learning-rate schedules shared by pretraining and every evaluation."""

import logging
from typing import Optional, Sequence

import keras
import tensorflow as tf

log = logging.getLogger(__name__)


def unreached_boundaries(boundaries: Sequence[int], train_steps: int) -> list:
  """The learning-rate boundaries a run of `train_steps` steps never reaches."""
  return [int(b) for b in boundaries if int(b) >= train_steps]


def warn_unreached_boundaries(boundaries: Sequence[int], train_steps: int, flag: str = "lr_boundaries") -> Optional[str]:
  """Logs (and returns) a warning when some boundaries lie at or beyond `train_steps`: they are kept
  as given (an explicit schedule is not rescaled behind the user's back), so the rate never decays
  there."""
  late = unreached_boundaries(boundaries, train_steps)
  if not late:
    return None
  message = (f"--{flag} {','.join(map(str, late))} lie at or beyond --train_steps={train_steps}: the "
             "learning rate never decays there. Give boundaries below --train_steps (e.g. 60% and "
             f"80% of it: {int(0.6 * train_steps)},{int(0.8 * train_steps)}) if a decay is wanted.")
  log.warning(message)
  return message


@keras.saving.register_keras_serializable(package="tf_mtssl")
class WarmupPiecewise(keras.optimizers.schedules.LearningRateSchedule):
  """A linear warm-up to `peak`, then piecewise-constant decay: `peak * decay ** k` after the k-th of
  `boundaries`.

  The warm-up ramps from `warmup_start * peak` (at step 0) to `peak` over `warmup_steps` steps:
  pretraining ramps from 0 (paper_spec 4 [I]), detection from peak / 3 (Detectron's warm-up factor).
  """

  def __init__(self, peak: float, warmup_steps: int = 0, boundaries: Sequence[int] = (), decay: float = 0.1,
               warmup_start: float = 0.0):
    if peak <= 0:
      raise ValueError(f"learning_rate must be > 0, got {peak}")
    boundaries = [int(b) for b in boundaries]
    if any(b <= 0 for b in boundaries) or boundaries != sorted(set(boundaries)):
      raise ValueError(f"lr boundaries must be increasing positive steps, got {boundaries}")
    if warmup_steps < 0 or not 0 <= warmup_start <= 1 or decay <= 0:
      raise ValueError(f"Bad schedule: warmup_steps={warmup_steps} (>= 0), warmup_start={warmup_start} "
                       f"(in [0, 1]), decay={decay} (> 0)")
    self.peak, self.warmup_steps, self.boundaries = float(peak), int(warmup_steps), boundaries
    self.decay, self.warmup_start = float(decay), float(warmup_start)

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    passed = tf.add_n([tf.cast(step >= b, tf.float32) for b in self.boundaries] + [tf.constant(0.0)])
    lr = self.peak * tf.pow(self.decay, passed)
    if self.warmup_steps > 0:
      ramp = tf.minimum(1.0, (step + 1.0) / float(self.warmup_steps))
      lr *= self.warmup_start + (1.0 - self.warmup_start) * ramp
    return lr

  def get_config(self):
    return {"peak": self.peak, "warmup_steps": self.warmup_steps, "boundaries": self.boundaries,
            "decay": self.decay, "warmup_start": self.warmup_start}
