"""Multi-task step vs the sum of single-task steps on the same batches (paper_spec 4; goal <= 1.05),
and the multi-task step fed by its live input pipelines vs fixed batches.

  python -m bench.multitask_step [--quick]

A four-task `Trainer` step (one tape and one RMSProp per task, shared trunk) is timed on fixed batches,
and one single-task `Trainer` per task on the very same batches; the ratio exposes extra passes or
copies in the multi-task step. Each single-task step is timed in rounds alternating with the
multi-task step (only one single-task trainer is alive at a time, so the full mode fits in memory);
every figure is its best round, warm-up (tracing) excluded. The multi-task figure is the best of all
its rounds (4x as many as each single-task step's), which favours it slightly.

The second row times the multi-task step as training runs it, pulling every task's batch from its
`tf.data` pipeline (which shares the CPU with the step), against the same step on fixed batches, in
alternating rounds: a ratio above 1 is what the input pipelines cost the training loop. No goal (it
is the combined effect of bench.input_pipeline's ratios).

The third row (`jit_rows`) times the four-task step with `--jit_compile=on` against `off` on the same
fixed batches: one trainer after the other (two paper-shape trainers at once need ~20 GB of host
memory), best of a few calls after warm-up. Goal (ms on / ms off) <= 1.0 on a GPU (where `auto` turns XLA on); none on
a CPU (where `auto` leaves it off).
"""

from bench import common
from bench.common import Row

SETTINGS = {True: dict(warmup=2, repeats=2, rounds=3, jit_calls=4),
            False: dict(warmup=1, repeats=1, rounds=2, jit_calls=3)}


def live_step(trainer):
  """The training loop's step: each call pulls the next batch of every task's pipeline."""
  iterators = trainer.make_iterators(0)
  return lambda: trainer.run_steps(iterators).metrics


def step_rows(quick: bool = False):
  """The four-task step vs the sum of single-task steps, and fed by live pipelines vs fixed batches."""
  import gc
  s = SETTINGS[bool(quick)]
  multi = common.make_trainer(common.TASKS, quick)
  batches = common.first_batches(multi)
  fixed, fed = common.fixed_step(multi, batches), live_step(multi)
  for _ in range(s["warmup"]):
    common.fetch(fixed())
    common.fetch(fed())
  multi_s, single = float("inf"), {}
  for name in common.TASKS:
    trainer = common.make_trainer((name,), quick)
    step = common.fixed_step(trainer, {name: batches[name]})
    for _ in range(s["warmup"]):
      common.fetch(step())
    times = common.time_interleaved({"multi": fixed, name: step}, 0, s["repeats"], s["rounds"])
    multi_s, single[name] = min(multi_s, times["multi"]), times[name]
    del trainer, step  # only one single-task trainer alive at a time
    gc.collect()
  total = sum(single.values())
  size = multi.tasks["col"].image_size
  batch_text = " ".join(f"{n}{multi.config.batch_size_for(n)}" for n in common.TASKS)
  rows = [Row(name=f"4-task step / sum of 1-task steps ({size}px)", figure=1e3 * multi_s, unit="ms/step",
              reference=1e3 * total, ratio=multi_s / total, goal="<= 1.05",
              note=f"{common.trunk_name(multi.model.trunk_config)}, batches {batch_text}; 1-task: "
                   + ", ".join(f"{n} {1e3 * t:.0f}" for n, t in single.items()) + " ms")]
  times = common.time_interleaved({"fixed": fixed, "live": fed}, 0, s["repeats"], s["rounds"] + 1)
  rows.append(Row(name=f"4-task step, live pipelines / fixed ({size}px)", figure=1e3 * times["live"],
                  unit="ms/step", reference=1e3 * times["fixed"], ratio=times["live"] / times["fixed"],
                  note="ref: the same step on fixed batches, interleaved; >1 = what the pipelines cost"))
  return rows


def jit_rows(quick: bool = False):
  """The four-task step with XLA (`TrainConfig.jit_compile` "on") vs without ("off")."""
  import gc
  import tensorflow as tf
  s = SETTINGS[bool(quick)]
  gpu = bool(tf.config.list_physical_devices("GPU"))
  calls = s["jit_calls"] * (5 if gpu else 1)  # a GPU step takes milliseconds
  seconds, batches = {}, None
  for mode in ("off", "on"):
    trainer = common.make_trainer(common.TASKS, quick, jit_compile=mode)
    batches = batches or common.first_batches(trainer)
    step = common.fixed_step(trainer, batches)
    for _ in range(s["warmup"] + 1):  # tracing (and XLA compilation), first-run allocations
      common.fetch(step())
    seconds[mode] = min(common.time_calls(step, 0, 1) for _ in range(calls))
    trunk, size = common.trunk_name(trainer.model.trunk_config), trainer.tasks["col"].image_size
    del trainer, step
    gc.collect()
  return [Row(name=f"4-task step, --jit_compile on / off ({size}px)", figure=1e3 * seconds["on"], unit="ms/step",
              reference=1e3 * seconds["off"], ratio=seconds["on"] / seconds["off"],
              goal="<= 1.0" if gpu else "",
              note=f"ref: the same step without XLA; {trunk}, bench batches; one trainer after the other; "
                   + ("GPU" if gpu else "CPU: auto leaves XLA off"))]


def run(quick: bool = False):
  return step_rows(quick) + jit_rows(quick)


if __name__ == "__main__":
  common.module_main(run, __doc__)
