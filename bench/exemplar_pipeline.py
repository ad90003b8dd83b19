"""Exemplar input pipeline throughput vs the model's consumption rate (paper_spec 3.3).

  python -m bench.exemplar_pipeline            # full: 224-px views, depth-101 trunk
  python -m bench.exemplar_pipeline --quick    # quick: 64-px views, tiny trunk

Pipeline: `ExemplarTask.build_dataset` on real photos (the embedded data, else scikit-image photos
written to a temporary folder), timed over whole batches after a warm-up: source images/s and views/s.
Model: one train step (trunk + exemplar head + triplet loss + RMSProp, under `tf.function`) at the same
view size, timed after tracing: steps/s, and views/s = steps/s x views per step.
Both are measured alone on this machine (in training they share its cores). The pipeline should
deliver at least 3x what the model consumes. `run` returns a dict; `rows` gives the `python -m bench`
table rows.
"""

import argparse
import json
import os
import tempfile
import time
from typing import Dict

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_mtssl import model as model_lib  # noqa: E402
from tf_mtssl.data import embedded  # noqa: E402
from tf_mtssl.tasks.exemplar import ExemplarOptions, ExemplarTask  # noqa: E402

SETTINGS = {
    # image_size, source images per pipeline batch, pipeline batches timed, source images per model
    # step, model steps timed, trunk.
    True: dict(image_size=64, pipeline_batch=8, pipeline_batches=16, model_images=4, model_steps=5,
               trunk=dict(depth=14, output_stride=16, base_width=8)),
    False: dict(image_size=224, pipeline_batch=8, pipeline_batches=12, model_images=2, model_steps=3,
                trunk=dict(depth=101, output_stride=16, base_width=64)),
}


def _data_spec() -> str:
  """The embedded photos if prepared, else a few scikit-image photos at their original sizes."""
  if embedded.images_dir().is_dir():
    return "embedded"
  import skimage.data
  from PIL import Image
  folder = tempfile.mkdtemp(prefix="ex_bench_")
  for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry"):
    Image.fromarray(getattr(skimage.data, name)()).save(os.path.join(folder, f"{name}.png"))
  return folder


def pipeline_rate(task: ExemplarTask, data: str, batch_size: int, batches: int) -> Dict[str, float]:
  iterator = iter(task.build_dataset(data, batch_size, seed=0))
  for _ in range(2):  # warm-up: tracing, file listing, shuffle buffer, autotune
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)["views"].numpy()
  seconds = time.perf_counter() - start
  images = batches * batch_size
  return {"pipeline_images_per_s": images / seconds,
          "pipeline_views_per_s": images * task.options.views / seconds}


def model_rate(task: ExemplarTask, data: str, images: int, steps: int, trunk: dict) -> Dict[str, float]:
  batch = next(iter(task.build_dataset(data, images, seed=1)))
  model = model_lib.MultiTaskModel({task.name: task}, trunk)
  variables = model.trainable_variables(task.name)
  optimizer = keras.optimizers.RMSprop(1e-3, rho=0.9, momentum=0.9, epsilon=1.0)

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      loss, _ = task.loss_and_metrics(batch, model.predictions(task.name, batch, training=True))
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return loss

  start = time.perf_counter()
  step().numpy()
  trace_seconds = time.perf_counter() - start
  step().numpy()  # one more: first-run allocations
  start = time.perf_counter()
  for _ in range(steps):
    step().numpy()
  steps_per_s = steps / (time.perf_counter() - start)
  return {"model_steps_per_s": steps_per_s,
          "model_views_per_s": steps_per_s * images * task.options.views,
          "model_images_per_s": steps_per_s * images,
          "model_first_step_s": trace_seconds}


def run(quick: bool) -> dict:
  """Measures both rates; returns them with the settings and their ratio (pipeline / model views)."""
  s = SETTINGS[bool(quick)]
  task = ExemplarTask(ExemplarOptions(), image_size=s["image_size"])
  data = _data_spec()
  result = {"benchmark": "exemplar_pipeline", "quick": bool(quick), "image_size": s["image_size"],
            "views_per_image": task.options.views, "pipeline_batch_images": s["pipeline_batch"],
            "model_batch_images": s["model_images"], "trunk": s["trunk"], "data": data,
            "device": "GPU" if tf.config.list_physical_devices("GPU") else "CPU",
            "cpu_count": os.cpu_count()}
  result.update(pipeline_rate(task, data, s["pipeline_batch"], s["pipeline_batches"]))
  keras.utils.clear_session()
  result.update(model_rate(task, data, s["model_images"], s["model_steps"], s["trunk"]))
  result["pipeline_to_model_ratio"] = result["pipeline_views_per_s"] / result["model_views_per_s"]
  result["pipeline_fast_enough"] = bool(result["pipeline_to_model_ratio"] >= 3.0)
  return result


def rows(quick: bool) -> list:
  """`run` as rows of the `python -m bench` table (bench.common.Row)."""
  from bench.common import Row
  r = run(quick)
  trunk = f"R{r['trunk']['depth']}/w{r['trunk']['base_width']}"
  return [Row(name=f"ex pipeline vs {trunk} step ({r['image_size']}px)", figure=r["pipeline_views_per_s"],
              unit="views/s", reference=r["model_views_per_s"], ratio=r["pipeline_to_model_ratio"],
              # The 3x goal is about real training (the depth-101 trunk); the quick mode's tiny trunk
              # eats 64-px views faster than the embedded photos decode, so there it is smoke only.
              goal="" if quick else ">= 3",
              note=f"{r['pipeline_images_per_s']:.1f} source img/s, {r['views_per_image']} views each")]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="64-px views and a tiny trunk (seconds).")
  args = parser.parse_args()
  result = run(args.quick)
  print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}, indent=1))
  print(f"pipeline {result['pipeline_images_per_s']:.1f} images/s = {result['pipeline_views_per_s']:.1f} "
        f"views/s; model consumes {result['model_views_per_s']:.1f} views/s "
        f"({result['model_steps_per_s']:.3f} steps/s x {result['model_batch_images']} x "
        f"{result['views_per_image']} views); ratio {result['pipeline_to_model_ratio']:.1f}x")


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  main()
