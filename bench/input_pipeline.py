"""Every task's input pipeline: its CPU cost per trunk image against the standard supervised pipeline
(goal <= 2x), and its throughput against the rate its training step consumes source images (goal >= 3x).

  python -m bench.input_pipeline [--quick]

Data: real photos as 500x375 JPEG files (`bench.common.jpeg_photo_folder`: ImageNet's most common
size), read and decoded anew every epoch as from a large dataset; ms reads its mask TFRecords.

CPU cost (rows `<task> pipeline CPU / standard`). The standard is what supervised ImageNet training
runs: decode, random-resized square crop + flip (`tf_mtssl.model.preprocessing.random_crop_resize`, crops
of [0.35, 1] of the shorter side) to the image size, batched, from the same files. Every pipeline is
built once and timed in interleaved rounds (`bench.common.time_interleaved`) in this process's CPU
seconds (`time.process_time`: all its threads, not inflated by other processes): each timed call
takes one batch and then waits until the pipeline's background threads have refilled their buffers
(`bench.common.wait_until_idle`), so it counts exactly the work of one batch. Figure: examples per
second per core (1 / CPU seconds per example). Ratio: CPU seconds per trunk image over the standard's
per image, where an example gives `trunk images` of the standard's size: rp 9 patches of P px =
9 P^2 / S^2 (1.65 at the paper's 96 of 224 px), ex its views, col and ms one crop.

Throughput (rows `<task> pipeline / <trunk> step`): `task.build_dataset` alone on all cores (wall
clock), against the task's training step (`tf_mtssl.pretraining.trainer.Trainer`: trunk + head + loss + RMSProp) on
one fixed batch of that pipeline; best of a few rounds alternating the two. In training they share
the cores, so the pipeline must deliver several times what the step consumes. The goals are judged
at the paper's shapes (full mode); the quick mode's tiny trunk eats 64-px inputs faster than photos
decode, so there the throughput ratio is shown without a goal.
"""

import os
import time

from bench import common
from bench.common import Row

SETTINGS = {True: dict(pipeline_batches=12, step_repeats=3, rounds=2, cpu_batches=3, cpu_rounds=2, cpu_batch=8),
            False: dict(pipeline_batches=8, step_repeats=2, rounds=2, cpu_batches=4, cpu_rounds=3, cpu_batch=16)}
GOAL = ">= 3"
CPU_GOAL = "<= 2"
STANDARD_MIN_SCALE = 0.35  # random-resized crops of [0.35, 1] of the shorter side (~[0.12, 1] of the area)


def standard_dataset(data: str, batch_size: int, image_size: int, seed: int = 0):
  """The standard supervised pipeline: decode, random-resized crop + flip, batch (as the tasks' are)."""
  import tensorflow as tf
  from tf_mtssl.model import preprocessing
  from tf_mtssl.data import sources
  ds = sources.image_dataset(data, seed=seed)

  def make(element, element_seed):
    return {"image": preprocessing.random_crop_resize(element["image"], image_size, element_seed,
                                                      min_scale=STANDARD_MIN_SCALE)}

  ds = sources.with_element_seeds(ds, seed).map(make, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def trunk_images_per_example(task, image_size: int) -> float:
  """Trunk inputs one example of `task` gives, in images of `image_size` px (by pixel count)."""
  if task.name == "rp":
    return 9 * (task.options.patch_size / image_size) ** 2
  if task.name == "ex":
    return float(task.options.views)
  return 1.0


def one_batch_and_refill(dataset):
  """A timed call for `time_interleaved`: the next batch, then the wait until the pipeline is idle."""
  iterator = iter(dataset)

  def call():
    batch = next(iterator)
    common.fetch(batch)
    common.wait_until_idle()
    return batch

  return call


def cpu_rows(quick: bool):
  s = SETTINGS[bool(quick)]
  size, batch, data = common.image_size(quick), s["cpu_batch"], common.jpeg_photo_folder()
  tasks = {name: common.make_task(name, quick) for name in common.TASKS}
  datasets = {"standard": standard_dataset(data, batch, size)}
  for name, task in tasks.items():
    datasets[name] = task.build_dataset(common.data_spec("ms") if name == "ms" else data, batch)
  calls = {name: one_batch_and_refill(ds) for name, ds in datasets.items()}
  cpu_s = common.time_interleaved(calls, warmup=2, repeats=s["cpu_batches"], rounds=s["cpu_rounds"],
                                  clock=time.process_time)
  per_example = {name: seconds / batch for name, seconds in cpu_s.items()}
  standard = per_example["standard"]
  rows = [Row(name=f"standard pipeline CPU ({size}px b{batch})", figure=1.0 / standard,
              unit="examples/s per core",
              note=f"decode + random-resized crop [{STANDARD_MIN_SCALE}, 1] + flip from JPEG files; "
                   f"{1e3 * standard:.2f} ms CPU per image; flags {common.cpu_flags()}")]
  for name, task in tasks.items():
    images = trunk_images_per_example(task, size)
    ratio = per_example[name] / images / standard
    source = "mask TFRecords" if name == "ms" else "JPEG files"
    rows.append(Row(name=f"{name} pipeline CPU / standard, per trunk image ({size}px b{batch})",
                    figure=1.0 / per_example[name], unit="examples/s per core", reference=1.0 / standard,
                    ratio=ratio, goal=CPU_GOAL,
                    note=f"{1e3 * per_example[name]:.2f} ms CPU per example = {images:.3g} trunk images; "
                         f"from {source}"))
  return rows


def pipeline_seconds_per_batch(task, data: str, batch_size: int, batches: int, seed: int = 0) -> float:
  """Wall seconds per batch of a fresh pipeline, after 2 warm-up batches."""
  iterator = iter(task.build_dataset(data, batch_size, seed=seed))
  for _ in range(2):
    common.fetch(next(iterator))
  start = time.perf_counter()
  for _ in range(batches):
    common.fetch(next(iterator))
  return (time.perf_counter() - start) / batches


def throughput_row(name: str, quick: bool) -> Row:
  import keras
  s = SETTINGS[bool(quick)]
  keras.utils.clear_session()
  data = common.data_spec("ms") if name == "ms" else common.jpeg_photo_folder()
  trainer = common.make_trainer((name,), quick, data={name: data})
  task, batch = trainer.tasks[name], trainer.config.batch_size_for(name)
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
             note=f"ref: the {name} train step's consumption; {per_image} per image; all {os.cpu_count()} "
                  f"cores; data {'mask TFRecords' if name == 'ms' else 'JPEG files'}")


def run(quick: bool = False):
  return cpu_rows(quick) + [throughput_row(name, quick) for name in common.TASKS]


if __name__ == "__main__":
  common.module_main(run, __doc__)
