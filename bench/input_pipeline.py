"""Every task's input pipeline vs the rate its training step consumes source images (goal >= 3x).

  python -m bench.input_pipeline [--quick]

For each task (rp, col, ex, ms), on real data (the embedded set, else scikit-image photos):
  pipeline  `task.build_dataset` alone, timed over whole batches after a warm-up (tracing, file
            listing, shuffle buffer, autotuning): source images per second (an rp image gives 9
            patches, an ex image its 8 views, a col or ms image one crop);
  model     the task's training step (`tf_mtssl.pretraining.trainer.Trainer`: trunk + head + loss + RMSProp) on one
            fixed batch of that pipeline, after tracing: source images consumed per second.
Each is timed alone, best of a few rounds alternating the two; in training they share the cores, so
the pipeline must deliver several times what the step consumes. The goal (>= 3x) is judged at the
paper's shapes (full mode); the quick mode's tiny trunk eats 64-px inputs faster than photos decode,
so there the ratio is shown without a goal.
"""

import time

from bench import common
from bench.common import Row

SETTINGS = {True: dict(pipeline_batches=12, step_repeats=3, rounds=2),
            False: dict(pipeline_batches=8, step_repeats=2, rounds=2)}
GOAL = ">= 3"


def pipeline_seconds_per_batch(task, data: str, batch_size: int, batches: int, seed: int = 0) -> float:
  """Seconds per batch of a fresh pipeline, after 2 warm-up batches."""
  iterator = iter(task.build_dataset(data, batch_size, seed=seed))
  for _ in range(2):
    common.fetch(next(iterator))
  start = time.perf_counter()
  for _ in range(batches):
    common.fetch(next(iterator))
  return (time.perf_counter() - start) / batches


def measure(name: str, quick: bool) -> Row:
  import keras
  s = SETTINGS[bool(quick)]
  keras.utils.clear_session()
  trainer = common.make_trainer((name,), quick)
  task, data, batch = trainer.tasks[name], trainer.data[name], trainer.config.batch_size_for(name)
  step = common.fixed_step(trainer, common.first_batches(trainer, seed=1))
  for _ in range(2):  # tracing and first-run allocations
    common.fetch(step())
  pipeline_s = step_s = float("inf")
  for r in range(s["rounds"]):
    pipeline_s = min(pipeline_s, pipeline_seconds_per_batch(task, data, batch, s["pipeline_batches"], seed=r))
    step_s = min(step_s, common.time_calls(step, 0, s["step_repeats"]))
  pipeline_rate, model_rate = batch / pipeline_s, batch / step_s
  per_image = {"rp": "9 patches", "ex": f"{getattr(task.options, 'views', 0)} views"}.get(name, "1 crop")
  return Row(name=f"{name} pipeline / {common.trunk_name(trainer.model.trunk_config)} step "
                  f"({task.image_size}px b{batch})",
             figure=pipeline_rate, unit="source img/s", reference=model_rate, ratio=pipeline_rate / model_rate,
             goal="" if quick else GOAL,
             note=f"ref: the {name} train step's consumption; {per_image} per image; data {data}")


def run(quick: bool = False):
  return [measure(name, quick) for name in common.TASKS]


if __name__ == "__main__":
  common.module_main(run, __doc__)
