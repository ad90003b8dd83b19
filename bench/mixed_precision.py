"""bfloat16 mixed precision vs float32: the trunk's training step, and the Trainer's step when
`tf_mtssl.pretraining.trainer.TrainConfig` has a `mixed_precision` field (goal >= 1.4x on a CPU with AVX512-BF16).

  python -m bench.mixed_precision [--quick]

Trunk: the same trunk (output stride 16) built under the float32 policy and under
`keras.mixed_precision.set_global_policy("mixed_bfloat16")` (reset to float32 right after); same
images, same RMSProp step (`bench.trunk_step.train_step`), interleaved rounds after warm-up. Three
trunks are timed side by side in both dtypes: this project's (`tf_mtssl.model.trunk.FusedBatchNormalization`:
one fused kernel per batch norm in bfloat16), the same trunk with Keras' own batch norm
(`build_trunk(batch_norm="keras")`: what it was before; Keras 3 casts every activation to float32
and back around separate batch-norm ops), and keras.applications ResNetV2 (its block 3, stride 32:
the reference ratio on this machine). A fourth row counts the activation casts of the bfloat16 step
(4-D Cast ops, not counting those of the conv kernels' float32 master weights and their gradients)
for our trunk vs the Keras-BN one. Without AVX512-BF16 / AMX (or a GPU) bfloat16 is emulated and
slower than float32: then the ratios cannot show the goal, and the cast counts are what shows the fix.
Trainer: a four-task `Trainer` (`TrainConfig.mixed_precision` "bfloat16" vs "none") on the same fixed
batches, one trainer after the other (memory), best of a few steps after warm-up. Ratio: bf16
throughput / fp32 throughput.
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


def activation_casts(step) -> int:
  """4-D Cast ops in the graph of the compiled step `step`, except those of conv kernels (float32
  master weights read as bfloat16, and their gradients cast back): the activations' casts."""
  graph = step.get_concrete_function().graph
  return sum(1 for op in graph.get_operations()
             if op.type == "Cast" and op.outputs[0].shape.rank == 4
             and op.inputs[0].op.type not in ("ReadVariableOp", "Conv2DBackpropFilter"))


def trunk_rows(quick: bool):
  from tf_mtssl.model import trunk as trunk_lib
  from bench.trunk_step import REFERENCES, reference_model
  s = SETTINGS[bool(quick)]
  images = random_images(s)
  block3 = lambda out: out["block3"]  # noqa: E731
  builders = {"ours": (lambda: trunk_lib.build_trunk(s["depth"], output_stride=16), block3),
              "keras_bn": (lambda: trunk_lib.build_trunk(s["depth"], output_stride=16, batch_norm="keras"), block3),
              "reference": (lambda: reference_model(s["depth"], s["image"]), lambda out: out)}
  steps = {}
  for name, (build, output_fn) in builders.items():
    for policy in ("float32", "mixed_bfloat16"):
      steps[f"{name} {policy}"] = _under_policy(policy, lambda: train_step(build(), output_fn, images))
  casts = {name: activation_casts(steps[f"{name} mixed_bfloat16"]) for name in ("ours", "keras_bn")}
  seconds = common.time_interleaved(steps, s["warmup"], s["repeats"], s["rounds"])
  rate = {key: s["batch"] / t for key, t in seconds.items()}
  shape = f"({s['image']}px b{s['batch']})"
  ref_model, ref_layer = REFERENCES[s["depth"]]
  rows = []
  for name, label, note in (("ours", f"trunk R{s['depth']}", "fused batch norm"),
                            ("keras_bn", f"trunk R{s['depth']} Keras BN (before)", "Keras' batch norm"),
                            ("reference", f"keras {ref_model}", f"keras.applications {ref_model} to {ref_layer}")):
    bf16, fp32 = rate[f"{name} mixed_bfloat16"], rate[f"{name} float32"]
    rows.append(Row(name=f"{label} train step bf16 / fp32 {shape}", figure=bf16, unit="img/s", reference=fp32,
                    ratio=bf16 / fp32, goal=GOAL if name == "ours" else "", dtype="mixed_bfloat16",
                    note=f"ref: the same step in float32; {note}" + _cpu_note()))
  rows.append(Row(name=f"trunk R{s['depth']} bf16 step activation casts {shape}", figure=casts["ours"],
                  unit="Cast ops", reference=casts["keras_bn"], ratio=casts["ours"] / casts["keras_bn"],
                  dtype="mixed_bfloat16",
                  note="4-D casts but the conv kernels'; ref: the same trunk with Keras' batch norm"))
  return rows


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
