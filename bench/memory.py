"""Peak host memory of a four-task training step (rp, col, ex, ms), in a fresh process.

  python -m bench.memory [--quick]

A child process builds the four-task `Trainer` and runs a few steps fed by its live input pipelines
(as training does), then reports its peak resident set size (`ru_maxrss`: imports, model, four
RMSProp states, pipelines' buffers and the step's activations) and its RSS once the model was
built. Full: ResNet-101 at 224 px, batch 8 (rp: 8 images = 72 patches of 96 px; ex: 2 images =
16 views, see bench.common.BATCHES). Quick: the smoke trunk and heads at 64 px. No reference: the
figure is reported as is (GB = 1e9 bytes). When `TrainConfig` has `mixed_precision`, the bfloat16
step is measured too.
"""

import argparse

from bench import common
from bench.common import Row

# Steps after the build (the first one traces). Full-mode bfloat16 runs one: without native bf16
# (bench.mixed_precision) a paper-shape step takes minutes, and its memory is that of any step.
STEPS = {(True, ""): 3, (True, "bfloat16"): 3, (False, ""): 2, (False, "bfloat16"): 1}


def child(quick: bool, mixed_precision: str) -> dict:
  import resource
  import psutil
  from bench.multitask_step import live_step
  config = {"mixed_precision": mixed_precision} if mixed_precision else {}
  trainer = common.make_trainer(common.TASKS, quick, **config)
  built = psutil.Process().memory_info().rss
  step = live_step(trainer)
  steps = STEPS[quick, mixed_precision]
  for _ in range(steps):
    common.fetch(step())
  return {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "built_bytes": built,
          "steps": steps, "trunk": common.trunk_name(trainer.model.trunk_config),
          "image_size": trainer.tasks["col"].image_size,
          "batches": {n: trainer.config.batch_size_for(n) for n in common.TASKS}}


def run(quick: bool = False):
  from bench.mixed_precision import trainer_has_mixed_precision
  modes = [""] + (["bfloat16"] if trainer_has_mixed_precision() else [])
  rows = []
  for mode in modes:
    (r,) = common.spawn_children("bench.memory", ["--child"] + (["--quick"] if quick else []) +
                                 ([f"--mixed_precision={mode}"] if mode else []))
    batches = " ".join(f"{n}{b}" for n, b in r["batches"].items())
    rows.append(Row(name=f"peak RSS, 4-task step ({r['image_size']}px, {r['trunk']})", figure=r["peak_bytes"] / 1e9,
                    unit="GB", dtype="mixed_bfloat16" if mode else "float32",
                    note=f"batches {batches}; {r['built_bytes'] / 1e9:.2f} GB once built; live pipelines, "
                         f"{r['steps']} steps"))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="tiny shapes, few steps")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # internal: one measurement
  parser.add_argument("--mixed_precision", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    common.emit_result(child(args.quick, args.mixed_precision))
  else:
    print(common.format_table(run(args.quick)))


if __name__ == "__main__":
  main()
