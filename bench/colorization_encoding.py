"""Colorization target encoding (soft encoding + rebalancing weights) vs a colorization train step.

  python -m bench.colorization_encoding            # full: 224 px, ResNet-101 trunk, batch 8
  python -m bench.colorization_encoding --quick    # quick: 96 px, depth-26 trunk (base width 16)

On one real batch of `ColorizationTask.build_dataset` (the embedded photos, else scikit-image photos
written to a temporary folder): the target encoding of the batch (`TargetEncoder` on the stride-8 ab,
under `tf.function`) and one train step (trunk + colorization head + rebalanced soft cross-entropy +
RMSProp, under `tf.function`), both timed after warm-up. Goal: encoding < 5 % of the step. The Lab
conversion of the full-resolution crops (which the pipeline also does, for the input L and the gray
rule) is reported beside it for information.
"""

import argparse
import json
import os
import tempfile
from typing import List

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.common import Row, format_table, time_calls  # noqa: E402

SETTINGS = {
    True: dict(image_size=96, batch=8, trunk=dict(depth=26, output_stride=16, base_width=16),
               encode_repeats=30, step_repeats=3),
    False: dict(image_size=224, batch=8, trunk=dict(depth=101, output_stride=16, base_width=64),
                encode_repeats=30, step_repeats=3),
}
GOAL_RATIO = 0.05


def _data_spec() -> str:
  """The embedded photos if prepared, else a few scikit-image photos at their original sizes."""
  from tf_mtssl.data import embedded
  if embedded.images_dir().is_dir():
    return "embedded"
  import skimage.data
  from PIL import Image
  folder = tempfile.mkdtemp(prefix="col_bench_")
  for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry"):
    Image.fromarray(getattr(skimage.data, name)()).save(os.path.join(folder, f"{name}.png"))
  return folder


def run(quick: bool) -> dict:
  """Measures encoding and train-step time on the same batch; returns the figures and their ratio."""
  import keras
  import tensorflow as tf
  from tf_mtssl import color
  from tf_mtssl import model as model_lib
  from tf_mtssl.tasks.colorization import ColorizationTask

  s = SETTINGS[bool(quick)]
  data = _data_spec()
  task = ColorizationTask(image_size=s["image_size"])
  batch = next(iter(task.build_dataset(data, s["batch"], seed=0)))
  encoder = task.target_encoder(task.prior(data))

  encode = tf.function(encoder)
  encode_s = time_calls(lambda: encode(batch["target_ab"], batch["is_gray"]), 3, s["encode_repeats"])
  lab = tf.function(lambda image: color.rgb_to_lab(tf.cast(image, tf.float32) / 255.0))
  lab_s = time_calls(lambda: lab(batch["image"]), 3, s["encode_repeats"])

  model = model_lib.MultiTaskModel({task.name: task}, s["trunk"])
  variables = model.trainable_variables(task.name)
  optimizer = keras.optimizers.RMSprop(1e-3, rho=0.9, momentum=0.9, epsilon=1.0)

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      loss, _ = task.loss_and_metrics(batch, model.predictions(task.name, batch, training=True))
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return loss

  step_s = time_calls(step, 2, s["step_repeats"])
  keras.utils.clear_session()
  ratio = encode_s / step_s
  return {"benchmark": "colorization_encoding", "quick": bool(quick), "image_size": s["image_size"],
          "batch": s["batch"], "trunk": s["trunk"], "data": data,
          "device": "GPU" if tf.config.list_physical_devices("GPU") else "CPU", "cpu_count": os.cpu_count(),
          "encoding_ms_per_batch": 1e3 * encode_s, "lab_ms_per_batch": 1e3 * lab_s,
          "step_ms_per_batch": 1e3 * step_s, "encoding_to_step_ratio": ratio,
          "goal_ratio_below": GOAL_RATIO, "met": bool(ratio < GOAL_RATIO)}


def rows(result: dict) -> List[Row]:
  """The result of `run` as a row of the `python -m bench` table."""
  return [Row(name=f"col target encoding / train step ({result['image_size']}px b{result['batch']})",
              figure=result["encoding_ms_per_batch"], unit="ms/batch", reference=result["step_ms_per_batch"],
              ratio=result["encoding_to_step_ratio"], goal=f"< {GOAL_RATIO}",
              note=f"trunk depth {result['trunk']['depth']}; full-res Lab {result['lab_ms_per_batch']:.1f} ms")]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="96-px crops and a small trunk (seconds).")
  args = parser.parse_args()
  result = run(args.quick)
  print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}, indent=1))
  print(format_table(rows(result)))


if __name__ == "__main__":
  main()
