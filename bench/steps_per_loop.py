"""Per-step host overhead: one training step per tf.function call with a host sync after each (the
loop before `--steps_per_loop`) vs several steps per call and one sync per call (SimCLR's
train_multiple_steps; tf_mtssl.pretraining.trainer.Trainer.run_steps).

  python -m bench.steps_per_loop [--quick]

Both sides run the same four-task `Trainer` step on the same fixed batches (no input pipeline), so
the difference is the per-call cost: Python dispatch of the tf.function, argument handling, and the
wait for the device's result before the next step can be issued. The overhead dominates at tiny
shapes (quick mode, the smoke trunk at 64 px), which is where it is measured; at paper shapes it is a
small fraction of a step on this CPU, but on a GPU the device waits on the host for it every step.
Figure: ms per step with `steps_per_loop` steps per call; reference: ms per step at 1 step per call.
"""

from bench import common
from bench.common import Row

SETTINGS = {True: dict(steps_per_loop=10, calls=3, rounds=3), False: dict(steps_per_loop=10, calls=1, rounds=2)}


def per_call(trainer, iterators, num_steps: int):
  """One call of `num_steps` steps, then the host waits for it (as the training loop does)."""
  return lambda: int(trainer.run_steps(iterators, num_steps=num_steps).first_bad_step)


def run(quick: bool = False):
  import tensorflow as tf
  s = SETTINGS[bool(quick)]
  trainer = common.make_trainer(common.TASKS, quick)
  batches = common.first_batches(trainer)
  iterators = {n: iter(trainer.strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensors(batches[n]).repeat())) for n in trainer.tasks}
  k = s["steps_per_loop"]
  one, many = per_call(trainer, iterators, 1), per_call(trainer, iterators, k)

  def k_single_calls():
    for _ in range(k):
      one()

  times = common.time_interleaved({"single": k_single_calls, "loop": many}, 2, s["calls"], s["rounds"])
  single_ms, loop_ms = 1e3 * times["single"] / k, 1e3 * times["loop"] / k
  size = trainer.tasks["col"].image_size
  return [Row(name=f"4-task step, {k} steps per call / 1 per call ({size}px)", figure=loop_ms, unit="ms/step",
              reference=single_ms, ratio=loop_ms / single_ms, goal="<= 1.0" if quick else "",
              note=f"{common.trunk_name(trainer.model.trunk_config)}; fixed batches; saved "
                   f"{single_ms - loop_ms:.2f} ms of host overhead per step")]


if __name__ == "__main__":
  common.module_main(run, __doc__)
