"""bfloat16 mixed precision vs float32: the trunk's training step, and the Trainer's step when
`tf_mtssl.pretraining.trainer.TrainConfig` has a `mixed_precision` field (goal >= 1.4x on a CPU with AVX512-BF16).

  python -m bench.mixed_precision [--quick]

Trunk: the same trunk (output stride 16) built twice, once under the float32 policy and once with
`keras.mixed_precision.set_global_policy("mixed_bfloat16")` around the build (the global policy is
reset to float32 right after); same images, same RMSProp step (`bench.trunk_step.train_step`),
interleaved rounds after warm-up. Trainer: a four-task `Trainer` (`TrainConfig.mixed_precision`
"bfloat16" vs "none") on the same fixed batches, one trainer after the other (memory), best of a few
steps after warm-up. Ratio: bf16 throughput / fp32 throughput.
Full: ResNet-101 at 224 px, batch 8 (Trainer: the bench's paper-shape batches). Quick: ResNet-50
trunk at 64 px, batch 4 (Trainer: the smoke trunk and heads).
"""

import dataclasses

from bench import common
from bench.common import Row
from bench.trunk_step import random_images, train_step

SETTINGS = {True: dict(depth=50, image=64, batch=4, warmup=2, repeats=1, rounds=6, trainer_rounds=4),
            False: dict(depth=101, image=224, batch=8, warmup=2, repeats=1, rounds=3, trainer_rounds=1)}
GOAL = ">= 1.4"


def _cpu_note() -> str:
  """Why bf16 may lose on this machine: without AVX512-BF16/AMX the bf16 kernels are emulated."""
  import tensorflow as tf
  if tf.config.list_physical_devices("GPU") or common.cpu_has_bf16():
    return ""
  return f"; CPU lacks avx512_bf16/amx_bf16 ({common.cpu_flags()}): bf16 emulated"


def _under_policy(policy: str, build):
  """`build()` with the Keras global dtype policy set to `policy`, reset to float32 afterwards."""
  import keras
  keras.mixed_precision.set_global_policy(policy)
  try:
    return build()
  finally:
    keras.mixed_precision.set_global_policy("float32")


def trainer_has_mixed_precision() -> bool:
  from tf_mtssl.pretraining import trainer as train
  return "mixed_precision" in {f.name for f in dataclasses.fields(train.TrainConfig)}


def trunk_rows(quick: bool):
  from tf_mtssl.model import trunk as trunk_lib
  s = SETTINGS[bool(quick)]
  images = random_images(s)
  steps = {policy: _under_policy(policy, lambda: train_step(trunk_lib.build_trunk(s["depth"], output_stride=16),
                                                            lambda out: out["block3"], images))
           for policy in ("float32", "mixed_bfloat16")}
  seconds = common.time_interleaved(steps, s["warmup"], s["repeats"], s["rounds"])
  fp32, bf16 = s["batch"] / seconds["float32"], s["batch"] / seconds["mixed_bfloat16"]
  return [Row(name=f"trunk R{s['depth']} train step bf16 / fp32 ({s['image']}px b{s['batch']})", figure=bf16,
              unit="img/s", reference=fp32, ratio=bf16 / fp32, goal=GOAL, dtype="mixed_bfloat16",
              note="ref: the same trunk and step in float32" + _cpu_note())]


def trainer_rows(quick: bool):
  import gc
  s = SETTINGS[bool(quick)]
  seconds, batches = {}, None
  for mode in ("none", "bfloat16"):  # one after the other: two paper-shape trainers need ~20 GB
    trainer = common.make_trainer(common.TASKS, quick, mixed_precision=mode)
    batches = batches or common.first_batches(trainer)
    step = common.fixed_step(trainer, batches)
    common.fetch(step())  # tracing
    seconds[mode] = min(common.time_calls(step, 1 if r == 0 else 0, 1) for r in range(s["trainer_rounds"]))
    trunk, size = common.trunk_name(trainer.model.trunk_config), trainer.tasks["col"].image_size
    del trainer, step
    gc.collect()
  fp32, bf16 = 1.0 / seconds["none"], 1.0 / seconds["bfloat16"]
  return [Row(name=f"4-task Trainer step bf16 / fp32 ({size}px)", figure=bf16, unit="steps/s", reference=fp32,
              ratio=bf16 / fp32, goal=GOAL, dtype="mixed_bfloat16",
              note=f"TrainConfig.mixed_precision, {trunk}, bench batches; measured one after the other"
                   + _cpu_note())]


def run(quick: bool = False):
  rows = trunk_rows(quick)
  if trainer_has_mixed_precision():
    rows += trainer_rows(quick)
  return rows


if __name__ == "__main__":
  common.module_main(run, __doc__)
