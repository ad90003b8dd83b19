"""Reference outputs of the ORIGINAL tf-slim ResNet-v2 code, for the checkpoint-import tests.

Run in a subprocess (TF1 graph mode; test-only dependencies, requirements-test.txt):
  python -m tests.slim_reference --out=DIR [--tiny_depth=26 | --real_depth=101] [--names_depths=50,101]
writes
  DIR/model.ckpt, DIR/reference.npz: a slim `resnet_v2.resnet_v2(...)` with `resnet_v2_block`s of
      ResNet-`tiny_depth`'s units (plus a small block 4 and 10-class logits, which the import must
      ignore), random weights with random batch-norm moving statistics, gammas, betas and biases,
      saved as a TF1 checkpoint; reference.npz holds the input images (already preprocessed), slim's
      `block3` end point at output stride 16 and 32 and the block-3 unit end points at output stride
      16 (inference-mode batch norm);
      With --real_depth, the network is slim's own `resnet_v2_<depth>` builder (1001 classes): the
      import tests' comparison at full depth, too slow for the suite (minutes on 2 cores);
  DIR/names_<depth>.json: {variable: shape} of slim's own `resnet_v2_<depth>` (1001 classes).

tf-slim 1.1.0 imports `tf_keras.legacy_tf_layers.*`, which tf-keras 2.21 keeps under
`tf_keras.src.legacy_tf_layers`; the aliases below make it importable under TF 2.21 (machine notes).
"""

import argparse
import importlib
import json
import os
import sys


def _alias_tf_keras_legacy_layers():
  package = importlib.import_module("tf_keras.src.legacy_tf_layers")
  sys.modules["tf_keras.legacy_tf_layers"] = package
  for sub in ("base", "convolutional", "core", "normalization", "pooling", "variable_scope_shim",
              "migration_utils"):
    sys.modules[f"tf_keras.legacy_tf_layers.{sub}"] = importlib.import_module(
        f"tf_keras.src.legacy_tf_layers.{sub}")


_alias_tf_keras_legacy_layers()

import numpy as np  # noqa: E402
import tensorflow.compat.v1 as tf1  # noqa: E402
import tf_slim as slim  # noqa: E402
from tf_slim.nets import resnet_utils, resnet_v2  # noqa: E402

UNITS = {14: (1, 1, 1), 26: (2, 2, 2), 50: (3, 4, 6), 101: (3, 4, 23)}
BUILDERS = {50: resnet_v2.resnet_v2_50, 101: resnet_v2.resnet_v2_101}


def _arg_scope():
  # The multiself README's arg scope (paper_spec 2.1, S1).
  return slim.arg_scope(resnet_utils.resnet_arg_scope(batch_norm_epsilon=1e-5, batch_norm_scale=True))


def _randomise(sess, rng):
  """Non-trivial values everywhere: BN moving statistics, gammas, betas and biases too."""
  for v in tf1.global_variables():
    name, shape = v.op.name, v.shape.as_list()
    if name.endswith("moving_mean"):
      value = rng.normal(0.0, 0.5, shape)
    elif name.endswith("moving_variance"):
      value = rng.uniform(0.5, 2.0, shape)
    elif name.endswith("gamma"):
      value = rng.uniform(0.5, 1.5, shape)
    elif name.endswith(("beta", "biases")):
      value = rng.normal(0.0, 0.1, shape)
    else:
      continue
    v.load(value.astype(np.float32), sess)  # noqa (TF1 API: this is the original code's world)


def reference(out: str, depth: int, size: int, batch: int, seed: int, real_builder: bool = False) -> None:
  """Checkpoint + reference outputs of ResNet-`depth` (see the module docstring); `real_builder`: slim's
  own `resnet_v2_<depth>` (1001 classes, full block 4) instead of `resnet_v2` with a small block 4."""
  rng = np.random.default_rng(seed)
  units = UNITS[depth]
  scope = f"resnet_v2_{depth}"
  blocks = [resnet_v2.resnet_v2_block(f"block{i + 1}", base_depth=64 * 2 ** i, num_units=n, stride=2)
            for i, n in enumerate(units)]
  blocks.append(resnet_v2.resnet_v2_block("block4", base_depth=16, num_units=1, stride=1))

  def build(x, output_stride, reuse):
    if real_builder:
      return BUILDERS[depth](x, 1001, is_training=False, output_stride=output_stride, reuse=reuse, scope=scope)
    return resnet_v2.resnet_v2(x, blocks, num_classes=10, is_training=False, output_stride=output_stride,
                               reuse=reuse, scope=scope)

  # VGG-preprocessed RGB (paper_spec 2.2): the import compares trunks on identical float inputs.
  images = (rng.uniform(0, 255, (batch, size, size, 3)) - [123.68, 116.779, 103.939]).astype(np.float32)
  graph = tf1.Graph()
  with graph.as_default():
    tf1.set_random_seed(seed)  # the conv kernels' initialisers: one reference per seed
    x = tf1.placeholder(tf1.float32, [None, size, size, 3])
    with _arg_scope():
      _, os16 = build(x, 16, None)
      _, os32 = build(x, None, True)
    tf1.train.get_or_create_global_step()
    unit_names = [f"{scope}/block3/unit_{u}/bottleneck_v2" for u in range(1, units[2] + 1)]
    with tf1.Session(graph=graph) as sess:
      sess.run(tf1.global_variables_initializer())
      _randomise(sess, rng)
      fetch = {"block3_os16": os16[f"{scope}/block3"], "block3_os32": os32[f"{scope}/block3"],
               **{f"unit_{i + 1}_os16": os16[n] for i, n in enumerate(unit_names)}}
      values = sess.run(fetch, {x: images})
      tf1.train.Saver().save(sess, os.path.join(out, "model.ckpt"))
  np.savez(os.path.join(out, "reference.npz"), images=images, **values)


def names(out: str, depth: int) -> None:
  graph = tf1.Graph()
  with graph.as_default():
    x = tf1.placeholder(tf1.float32, [None, 224, 224, 3])
    with _arg_scope():
      BUILDERS[depth](x, 1001, is_training=False, scope=f"resnet_v2_{depth}")
    shapes = {v.op.name: v.shape.as_list() for v in tf1.global_variables()}
  with open(os.path.join(out, f"names_{depth}.json"), "w") as f:
    json.dump(shapes, f)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--tiny_depth", type=int, default=26, choices=[14, 26])
  parser.add_argument("--real_depth", type=int, default=0, choices=[0, *sorted(BUILDERS)],
                      help="instead of --tiny_depth: slim's own resnet_v2_<depth> builder (minutes, ~170 MB)")
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--batch", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--names_depths", default="101", help="comma-separated; empty: none")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  if args.real_depth:
    reference(args.out, args.real_depth, args.size, args.batch, args.seed, real_builder=True)
  else:
    reference(args.out, args.tiny_depth, args.size, args.batch, args.seed)
  for depth in filter(None, args.names_depths.split(",")):
    names(args.out, int(depth))


if __name__ == "__main__":
  main()
