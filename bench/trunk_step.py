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

`train_step` and `images_per_second` are also used by bench.mixed_precision.
"""

from bench.common import Row, module_main, time_interleaved

SETTINGS = {True: dict(depth=50, image=64, batch=4, warmup=2, repeats=1, rounds=8),
            False: dict(depth=101, image=224, batch=8, warmup=2, repeats=1, rounds=5)}
# keras.applications ResNetV2 model and the name of its last block-3 layer, per depth.
REFERENCES = {50: ("ResNet50V2", "conv4_block6_out"), 101: ("ResNet101V2", "conv4_block23_out"),
              152: ("ResNet152V2", "conv4_block36_out")}


def train_step(model, output_fn, images):
  """A compiled RMSProp step of `model` on fixed `images` (loss: mean square of `output_fn(out)`)."""
  import keras
  import tensorflow as tf
  optimizer = keras.optimizers.RMSprop(1e-4, rho=0.9, momentum=0.9, epsilon=1.0)
  optimizer.build(model.trainable_variables)

  @tf.function
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


def run(quick: bool = False):
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


if __name__ == "__main__":
  module_main(run, __doc__)
