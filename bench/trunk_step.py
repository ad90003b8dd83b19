"""Trunk training-step throughput vs keras.applications.ResNetV2 cut at the end of its block 3.

  python -m bench.trunk_step [--quick]

Same input, batch, dtype and optimizer step (RMSProp) for both, timed in interleaved rounds after
warm-up (tracing excluded). The reference's stride sits in conv4_block23, so its block-3 output is
at stride 32 (7x7 at 224 px); our trunk at output stride 16 runs the last unit at 14x14 and so does
a little more work. Both our output stride 16 (what the paper uses) and output stride 32 (the same
computation as the reference) are reported; the goal (ratio >= 1.0) is judged on the like-for-like
output stride 32 row. Full: ResNet-101 (reference ResNet101V2 to conv4_block23_out), 224 px, batch 8.
Quick: ResNet-50 (ResNet50V2 to conv4_block6_out, the same blocks at a third of the tracing time),
64 px, batch 4.

XLA rows (`xla_rows`): our trunk (output stride 16) in float32 and in mixed_bfloat16, each step plain
and compiled whole with XLA (`tf.function(jit_compile=True)`: forward, backward and the RMSProp
update), the four timed side by side: XLA / plain per dtype, bf16 / fp32 without XLA, and bf16 + XLA
against the plain fp32 step. On a GPU the XLA rows have the goal >= 1.0 (what `--jit_compile=auto`
turns on there); on a CPU they have none (auto leaves XLA off there, where it measured slower).

`train_step` and `random_images` are also used by bench.mixed_precision.
"""

from bench.common import Row, module_main, time_interleaved

SETTINGS = {True: dict(depth=50, image=64, batch=4, warmup=2, repeats=1, rounds=8),
            False: dict(depth=101, image=224, batch=8, warmup=2, repeats=1, rounds=5)}
# keras.applications ResNetV2 model and the name of its last block-3 layer, per depth.
REFERENCES = {50: ("ResNet50V2", "conv4_block6_out"), 101: ("ResNet101V2", "conv4_block23_out"),
              152: ("ResNet152V2", "conv4_block36_out")}


def train_step(model, output_fn, images, jit_compile: bool = False):
  """A compiled RMSProp step of `model` on fixed `images` (loss: mean square of `output_fn(out)`);
  jit_compile: the whole step (forward, backward, update) compiled with XLA."""
  import keras
  import tensorflow as tf
  optimizer = keras.optimizers.RMSprop(1e-4, rho=0.9, momentum=0.9, epsilon=1.0)
  optimizer.build(model.trainable_variables)

  @tf.function(jit_compile=jit_compile)
  def step():
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(tf.square(tf.cast(output_fn(model(images, training=True)), tf.float32)))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss

  return step


def random_images(s):
  import tensorflow as tf
  return tf.random.uniform([s["batch"], s["image"], s["image"], 3], -120, 130, seed=0)


def reference_model(depth: int, image: int):
  """keras.applications.ResNet{depth}V2 (random weights) up to the end of its block 3."""
  import keras
  name, last = REFERENCES[depth]
  ref = getattr(keras.applications, name)(weights=None, include_top=False, input_shape=(image, image, 3))
  return keras.Model(ref.input, ref.get_layer(last).output)


def reference_rows(quick: bool = False):
  """Our trunk's step at output strides 32 and 16 against keras.applications ResNetV2's."""
  from tf_mtssl.model import trunk as trunk_lib
  s = SETTINGS[bool(quick)]
  images = random_images(s)
  steps = {"reference": train_step(reference_model(s["depth"], s["image"]), lambda out: out, images)}
  for os_ in (32, 16):
    steps[f"os{os_}"] = train_step(trunk_lib.build_trunk(s["depth"], output_stride=os_), lambda out: out["block3"],
                                   images)
  seconds = time_interleaved(steps, s["warmup"], s["repeats"], s["rounds"])
  ref_rate = s["batch"] / seconds["reference"]
  rows = []
  for os_ in (32, 16):
    rate = s["batch"] / seconds[f"os{os_}"]
    like_for_like = os_ == 32
    rows.append(Row(name=f"trunk R{s['depth']} train step OS{os_} ({s['image']}px b{s['batch']})", figure=rate,
                    unit="img/s", reference=ref_rate, ratio=rate / ref_rate,
                    goal=">= 1.0" if like_for_like else "",
                    note="ref: keras {} to {}".format(*REFERENCES[s["depth"]]) + ("" if like_for_like else
                                                                                    "; OS16 does more work")))
  return rows


def _on_gpu() -> bool:
  import tensorflow as tf
  return bool(tf.config.list_physical_devices("GPU"))


def xla_rows(quick: bool = False):
  """fp32 and bf16, each with and without XLA: one trunk per dtype, its plain and its XLA step."""
  import keras
  from bench.mixed_precision import _cpu_note  # here: bench.mixed_precision imports this module
  from tf_mtssl.model import trunk as trunk_lib
  s = SETTINGS[bool(quick)]
  gpu = _on_gpu()
  images = random_images(s)
  block3 = lambda out: out["block3"]  # noqa: E731
  steps = {}
  for dtype in ("float32", "mixed_bfloat16"):
    keras.mixed_precision.set_global_policy(dtype)
    try:
      trunk = trunk_lib.build_trunk(s["depth"], output_stride=16)
    finally:
      keras.mixed_precision.set_global_policy("float32")
    for jit in (False, True):
      steps[dtype, jit] = train_step(trunk, block3, images, jit_compile=jit)
  # A GPU step at these shapes takes milliseconds: more calls per round than on a CPU.
  repeats = s["repeats"] * (10 if gpu else 1)
  seconds = time_interleaved(steps, s["warmup"], repeats, s["rounds"])
  rate = {key: s["batch"] / t for key, t in seconds.items()}
  label = f"R{s['depth']} OS16 step"
  shape = f"({s['image']}px b{s['batch']})"
  xla_goal = ">= 1.0" if gpu else ""
  device = "GPU" if gpu else "CPU: --jit_compile=auto leaves XLA off"
  rows = []
  for (name, dtype, key, ref_key, goal, note) in (
      ("fp32 XLA / plain", "float32", ("float32", True), ("float32", False), xla_goal,
       f"ref: the same fp32 step without XLA; {device}"),
      ("bf16 / fp32 no XLA", "mixed_bfloat16", ("mixed_bfloat16", False), ("float32", False), "",
       "ref: the fp32 step; both without XLA (bench.mixed_precision has the goal)"),
      ("bf16 XLA / plain", "mixed_bfloat16", ("mixed_bfloat16", True), ("mixed_bfloat16", False), xla_goal,
       f"ref: the same bf16 step without XLA; {device}"),
      ("bf16+XLA / fp32", "mixed_bfloat16", ("mixed_bfloat16", True), ("float32", False), "",
       "ref: the fp32 step without XLA")):
    rows.append(Row(name=f"{label} {name} {shape}", figure=rate[key], unit="img/s", reference=rate[ref_key],
                    ratio=rate[key] / rate[ref_key], goal=goal, dtype=dtype,
                    note=note + (_cpu_note() if dtype != "float32" else "")))
  return rows


def run(quick: bool = False):
  return reference_rows(quick) + xla_rows(quick)


if __name__ == "__main__":
  module_main(run, __doc__)
