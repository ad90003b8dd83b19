"""Colorization target encoding (soft encoding + rebalancing weights) vs a colorization train step.

  python -m bench.colorization_encoding            # full: 224 px, ResNet-101 trunk, batch 8
  python -m bench.colorization_encoding --quick    # quick: 64 px, the smoke trunk, batch 4

On one real batch of `ColorizationTask.build_dataset` (the embedded photos, else scikit-image photos):
the target encoding of the batch (`TargetEncoder` on the stride-8 ab, under `tf.function`; the
pipeline runs it once per batch) and one training step of a colorization `Trainer` (trunk + head +
rebalanced soft cross-entropy + RMSProp), timed in interleaved rounds after warm-up. Goal: encoding
< 5 % of the step. The Lab conversion of the full-resolution crops (the trunk input's L, which
`ColorizationTask.trunk_inputs` computes in the step, on the accelerator) is reported beside it for
information.
"""

from bench import common
from bench.common import Row

SETTINGS = {True: dict(encode_repeats=20, step_repeats=3, rounds=3),
            False: dict(encode_repeats=20, step_repeats=2, rounds=3)}
GOAL = "< 0.05"


def run(quick: bool = False):
  import tensorflow as tf
  from tf_mtssl.model import color
  s = SETTINGS[bool(quick)]
  trainer = common.make_trainer(("col",), quick)
  task, data = trainer.tasks["col"], trainer.data["col"]
  batch = common.first_batches(trainer)["col"]
  encoder = task.target_encoder(task.prior(data))
  encode = tf.function(lambda: encoder(batch["target_ab"], batch["is_gray"]))
  lab = tf.function(lambda: color.rgb_to_lab(tf.cast(batch["image"], tf.float32) / 255.0))
  step = common.fixed_step(trainer, {"col": batch})
  # Encodings are short: several per timed call so each call is well above the timer's resolution.
  repeated = lambda fn: (lambda: [fn() for _ in range(s["encode_repeats"])])  # noqa: E731
  seconds = common.time_interleaved({"encode": repeated(encode), "lab": repeated(lab), "step": step},
                                    warmup=2, repeats=s["step_repeats"], rounds=s["rounds"])
  encode_s = seconds["encode"] / s["encode_repeats"]
  lab_s = seconds["lab"] / s["encode_repeats"]
  b = trainer.config.batch_size_for("col")
  return [Row(name=f"col target encoding / train step ({task.image_size}px b{b})", figure=1e3 * encode_s,
              unit="ms/batch", reference=1e3 * seconds["step"], ratio=encode_s / seconds["step"], goal=GOAL,
              note=f"ref: the col train step ({common.trunk_name(trainer.model.trunk_config)}); "
                   f"full-res rgb->Lab {1e3 * lab_s:.1f} ms/batch")]


if __name__ == "__main__":
  common.module_main(run, __doc__)
