"""Tests of the linear evaluation (paper_spec 7.1) and its labelled sources."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
import skimage.io
import tensorflow as tf

from tests import helpers
from tf_mtssl.runs import checkpoints
from tf_mtssl.model import trunk as trunk_lib
from tf_mtssl.data import classification as classification_set
from tf_mtssl.evaluation import common, linear, outputs
from tf_mtssl.runs import trunk_source

SIZE = 48


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory):
  return _toy_folder(tmp_path_factory.mktemp("toy"))


def _toy_folder(root, per_class=6):
  """ImageFolder root/{train,val}/<photo>/*.png: tiles of 3 real photos, train/val from disjoint halves."""
  for name in ("astronaut", "coffee", "chelsea"):
    photo = getattr(skimage.data, name)()
    h, w = photo.shape[:2]
    for split, (x0, x1) in (("train", (0, w // 2)), ("val", (w // 2, w))):
      os.makedirs(root / split / name, exist_ok=True)
      rng = np.random.default_rng(len(name) + len(split))
      for k in range(per_class if split == "train" else 3):
        y, x = rng.integers(0, h - 96), rng.integers(x0, x1 - 96)
        skimage.io.imsave(root / split / name / f"{k}.png", photo[y:y + 96, x:x + 96], check_contrast=False)
  return str(root)


def _config(**kw):
  base = dict(train_steps=10, batch_size=8, eval_batch_size=9, lr_boundaries=(), image_size=SIZE,
              log_every=10, learning_rate=0.05)
  return linear.ProbeConfig(**{**base, **kw})


def _weights(model):
  return [np.array(v.numpy()) for v in model.variables]


@pytest.mark.slow
@pytest.mark.parametrize("augment", [False, True])
def test_frozen_probe_leaves_trunk_weights_bit_identical(toy_folder, augment):
  source = classification_set.ClassificationSource(toy_folder, image_size=SIZE)
  assert source.num_classes == 3 and source.class_names == ["astronaut", "chelsea", "coffee"]
  trunk = trunk_lib.build_trunk(**helpers.TINY_TRUNK)
  before = _weights(trunk)
  trainer = linear.ProbeTrainer(trunk, source.num_classes, _config(augment=augment))
  kernel = trainer.probe.classifier.kernel.numpy().copy()
  result = trainer.fit(source, "train", "val")
  assert result["cached_features"] is (not augment)
  after = _weights(trunk)
  assert len(before) == len(after) and all(np.array_equal(a, b) for a, b in zip(before, after))
  assert not np.allclose(trainer.probe.classifier.kernel.numpy(), kernel)  # the classifier did train


@pytest.mark.slow
def test_probe_beats_chance_on_the_embedded_set():
  source = classification_set.ClassificationSource("embedded", image_size=64)
  assert source.num_classes == 28  # 31 photos, 3 scenes with two photos each
  tf.random.set_seed(0)
  trunk = trunk_lib.build_trunk(**helpers.TINY_TRUNK)
  config = _config(image_size=64, train_steps=100, batch_size=64, eval_batch_size=224,
                   learning_rate=0.1, lr_boundaries=(70,))
  result = linear.ProbeTrainer(trunk, source.num_classes, config).fit(source, "train", "val")
  assert result["num_train"] == 28 * 24 and result["num_eval"] == 28 * 8
  chance = 1.0 / 28
  assert result["top1"] > 3 * chance, result
  assert result["top5"] > 3 * 5 * chance, result


def test_embedded_train_and_val_crops_are_deterministic_and_distinct():
  source = classification_set.ClassificationSource("embedded", image_size=32)
  a = [e["image"] for e in source.dataset("val").take(4).as_numpy_iterator()]
  b = [e["image"] for e in source.dataset("val").take(4).as_numpy_iterator()]
  t = [e["image"] for e in source.dataset("train").take(4).as_numpy_iterator()]
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not any(np.array_equal(x, y) for x, y in zip(a, t))
  with pytest.raises(ValueError, match="splits"):
    source.dataset("test")


def test_eval_lasso_row_exists_is_trained_and_penalised(toy_folder):
  source = classification_set.ClassificationSource(toy_folder, image_size=SIZE)
  trunk = trunk_lib.build_trunk(depth=26, output_stride=16, base_width=8)  # 2 block-3 units
  l1 = 0.05
  trainer = linear.ProbeTrainer(trunk, source.num_classes, _config(lasso_l1=l1))
  probe = trainer.probe
  assert probe.lasso is not None and probe.lasso.rows == [common.EVAL_LASSO_ROW]
  alpha_var = probe.lasso.alpha_variable(common.EVAL_LASSO_ROW)
  assert any(v is alpha_var for v in probe.trainable_variables)
  before = alpha_var.numpy().copy()
  images, labels, _ = next(iter(linear.image_batches(source, "train", trainer.config, False, 8)))
  pooled = linear.pooled_features(trunk, images, 3, per_unit=True)
  assert pooled.shape[1] == 2  # one pooled map per unit
  out = trainer.train_step_pooled(pooled, labels)
  alpha = before / np.linalg.norm(before)
  np.testing.assert_allclose(float(out["lasso_l1"]), l1 * np.abs(alpha).sum(), rtol=1e-6)
  np.testing.assert_allclose(float(out["loss"]), float(out["cross_entropy"]) + l1 * np.abs(alpha).sum(),
                             rtol=1e-5)
  for _ in range(5):
    trainer.train_step_pooled(pooled, labels)
  assert not np.allclose(alpha_var.numpy(), before)  # the row is trained
  assert len(probe.alpha()) == 2


def test_cached_per_unit_features_give_the_same_logits_as_combining_first():
  """Pooling and the alpha combination commute, so the cached path is exact."""
  trunk = trunk_lib.build_trunk(depth=26, output_stride=16, base_width=8)
  probe = linear.LinearProbe(4, 2, 128, feature_norm="none", lasso_l1=0.01)
  probe.lasso.alpha_variable(common.EVAL_LASSO_ROW).assign([0.3, -0.8])
  images = tf.random.uniform([2, 64, 64, 3], 0, 255, seed=1)
  cached = probe.logits(linear.pooled_features(trunk, images, 3, per_unit=True), training=False)
  from tf_mtssl.model import preprocessing
  from tf_mtssl.model.pooling import pool_to_grid
  units = trunk(preprocessing.rgb_to_trunk_input(images), training=False)["units"]
  combined = pool_to_grid(probe.lasso(units, row=common.EVAL_LASSO_ROW), 3)
  direct = probe.classifier(tf.reshape(combined, [2, -1]))
  helpers.assert_close(cached.numpy(), direct.numpy(), rtol=1e-4)


def test_the_splits_of_one_trunk_share_one_traced_feature_function():
  import gc
  import weakref
  trunk = trunk_lib.build_trunk(**helpers.TINY_TRUNK)
  fn = linear.feature_function(trunk, 2, per_unit=False)
  assert linear.feature_function(trunk, 2, per_unit=False) is fn
  assert linear.feature_function(trunk, 1, per_unit=False) is not fn
  rng = np.random.default_rng(0)
  split = lambda n: [(tf.constant(rng.uniform(0, 255, (b, 32, 32, 3)), tf.float32), tf.zeros([b], tf.int64),
                      tf.zeros([b], tf.int64)) for b in n]
  train_feats, _, _ = linear.extract_features(trunk, split([4, 4, 3]), 2, per_unit=False)
  test_feats, labels, _ = linear.extract_features(trunk, split([4, 2]), 2, per_unit=False)
  assert train_feats.shape == (11, 2, 2, trunk.output["block3"].shape[-1]) and len(labels) == test_feats.shape[0] == 6
  # Two traces for five batches of three sizes in two splits: the first shape, then the relaxed one.
  assert fn.experimental_get_tracing_count() == 2
  images = split([2])[0][0]
  helpers.assert_close(fn(images).numpy(), linear.pooled_features(trunk, images, 2, per_unit=False).numpy(),
                       rtol=1e-5)
  other = trunk_lib.build_trunk(**helpers.TINY_TRUNK)
  assert linear.feature_function(other, 2, per_unit=False) is not fn
  cached = weakref.ref(fn)
  del trunk, fn
  gc.collect()
  assert cached() is None  # the cache holds no trunk alive: a function goes with its trunk


def test_run_directory_without_checkpoint_is_a_clear_error(tmp_path):
  checkpoints.save_run_config(str(tmp_path), {"trunk": helpers.TINY_TRUNK})
  with pytest.raises(FileNotFoundError, match="No checkpoint in"):
    trunk_source.load_trunk("pretrained", model_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="run_config.json is missing"):
    trunk_source.load_trunk("pretrained", model_dir=str(tmp_path / "nothing"))
  with pytest.raises(ValueError, match="exactly one"):
    trunk_source.load_trunk("pretrained")
  # The random baseline takes the run's architecture (no checkpoint needed).
  trunk, info = trunk_source.load_trunk("random", model_dir=str(tmp_path))
  assert info["trunk"] == helpers.TINY_TRUNK and common.feature_channels(trunk) == 128


def test_folder_with_unknown_val_label_and_tfrecords(tmp_path):
  root = _toy_folder(tmp_path / "folder", per_class=1)
  os.makedirs(os.path.join(root, "val", "zebra"))
  source = classification_set.ClassificationSource(root, image_size=SIZE)
  with pytest.raises(ValueError, match="zebra"):
    source.dataset("val")
  # TFRecords (slim convention, labels 1-based): {split} pattern, label_offset, label scan.
  encoded = tf.io.encode_png(skimage.data.astronaut()[:64, :64]).numpy()
  for split, labels in (("train", [1, 2, 3, 2]), ("validation", [3, 1])):
    with tf.io.TFRecordWriter(str(tmp_path / f"{split}-00000-of-00001")) as w:
      for label in labels:
        ex = tf.train.Example(features=tf.train.Features(feature={
            "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
            "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))}))
        w.write(ex.SerializeToString())
  source = classification_set.ClassificationSource(str(tmp_path / "{split}-*"), label_offset=1)
  assert source.num_classes == 3 and source.default_eval_split() == "validation"
  assert [int(e["label"]) for e in source.dataset("validation").as_numpy_iterator()] == [2, 0]
  with pytest.raises(ValueError, match="split"):
    classification_set.ClassificationSource(str(tmp_path / "train-*"))


def _run_binary(*args):
  """The binary in its own process (binaries define absl flags at import, as pretrain does)."""
  return subprocess.run([sys.executable, "-m", "tf_mtssl.evaluate_linear", *args], capture_output=True,
                        text=True, timeout=300, cwd=helpers.REPO_ROOT,
                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


@pytest.mark.slow
def test_binary_writes_results_json_of_what_was_used_and_keeps_its_folder_to_one_trunk(tmp_path, toy_folder):
  args = ["--init=random", "--depth=14", "--base_width=8", f"--data={toy_folder}", f"--image_size={SIZE}",
          "--train_steps=5", "--lr_boundaries=", "--batch_size=8", f"--output_dir={tmp_path / 'out'}"]
  run = _run_binary(*args)
  assert run.returncode == 0, run.stderr[-3000:]
  text = (tmp_path / "out" / outputs.RESULTS_FILE).read_text()
  result = json.loads(text)
  assert 0.0 <= result["top1"] <= result["top5"] <= 1.0 and result["evaluation"] == "linear"
  assert result["trunk"] == {"init": "random", "source": "random", "seed": 0,
                             "trunk": trunk_lib.trunk_config(**helpers.TINY_TRUNK)}
  assert result["eval_split"] == "val" and result["num_classes"] == 3
  assert "flags" not in result and '"depth": 101' not in text and '"base_width": 64' not in text
  assert "top1=" in run.stdout and "chance top1=0.3333" in run.stdout
  helpers.assert_progress_bar(run.stderr, 5)
  # Another trunk (seed 1) into the same folder: refused, naming both; the results stay the first's.
  again = _run_binary(*args, "--seed=1")
  assert again.returncode == 2 and "Traceback" not in again.stderr
  assert (f"--output_dir {tmp_path / 'out'} holds the linear evaluation of random init (seed 0, depth 14, "
          "base_width 8, output_stride 16); this linear evaluation is of random init (seed 1") in again.stderr
  assert (tmp_path / "out" / outputs.RESULTS_FILE).read_text() == text


def test_block3_smaller_than_the_grid_is_refused_naming_the_smallest_size():
  trunk = trunk_lib.build_trunk(**helpers.TINY_TRUNK)  # output stride 16
  with pytest.raises(ValueError, match=r"--image_size=8 gives a 1x1 block 3, smaller than the 3x3 grid.*"
                                       r"--image_size >= 33"):
    linear.ProbeTrainer(trunk, 3, _config(image_size=8))
  linear.ProbeTrainer(trunk, 3, _config(image_size=33))  # 3x3: fits


def test_lr_boundaries_beyond_train_steps_warn(caplog):
  trunk = trunk_lib.build_trunk(**helpers.TINY_TRUNK)
  with caplog.at_level(logging.WARNING):
    linear.ProbeTrainer(trunk, 3, _config(train_steps=10, lr_boundaries=(6, 1200, 1600)))
  assert "--lr_boundaries 1200,1600 lie at or beyond --train_steps=10" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    linear.ProbeTrainer(trunk, 3, _config(train_steps=10, lr_boundaries=(6, 8)))
  assert "lr_boundaries" not in caplog.text


@pytest.mark.slow
def test_binary_on_a_run_without_checkpoint_fails_with_one_clear_line(tmp_path):
  checkpoints.save_run_config(str(tmp_path), {"trunk": helpers.TINY_TRUNK})
  run = _run_binary(f"--model_dir={tmp_path}", f"--output_dir={tmp_path / 'out'}")
  assert run.returncode == 2 and f"Error: No checkpoint in {tmp_path}" in run.stderr
  assert "Traceback" not in run.stderr


def test_tfds_source_reads_a_prepared_dataset_offline(tmp_path):
  """tfds:imagenet2012 via tfds' offline mock (random images): features, labels, class names."""
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=3, data_dir=str(tmp_path)):
    os.makedirs(tfds.builder("imagenet2012", data_dir=str(tmp_path)).data_dir)  # "prepared"
    source = classification_set.ClassificationSource("tfds:imagenet2012", tfds_data_dir=str(tmp_path))
    assert source.num_classes == 1000 and source.class_names[0] == "n01440764"
    assert source.default_eval_split() == "validation"
    examples = list(source.dataset("validation").as_numpy_iterator())
  assert len(examples) == 3 and all(0 <= e["label"] < 1000 and e["image"].ndim == 3 for e in examples)
  with pytest.raises(FileNotFoundError, match="never downloads"):
    classification_set.ClassificationSource("tfds:imagenet2012", tfds_data_dir=str(tmp_path / "none"))


def test_exported_trunk_keras_file_is_a_trunk_source(tmp_path):
  trunk = trunk_lib.build_trunk(**helpers.TINY_TRUNK)
  trunk.save(str(tmp_path / "trunk.keras"))
  loaded, info = trunk_source.load_trunk("pretrained", trunk_keras=str(tmp_path / "trunk.keras"))
  assert info["source"] == "keras_file" and info["keras_file"].endswith("trunk.keras")
  assert common.num_units(loaded) == 1
  assert all(np.array_equal(a, b) for a, b in zip(_weights(trunk), _weights(loaded)))
  with pytest.raises(FileNotFoundError, match="not found"):
    trunk_source.load_trunk("pretrained", trunk_keras=str(tmp_path / "missing.keras"))
  with pytest.raises(ValueError, match="not from --trunk_keras"):
    trunk_source.load_trunk("random", trunk_keras=str(tmp_path / "trunk.keras"))


def test_feature_norm_is_affine_free_and_the_plain_probe_one_option_away():
  """batchnorm (default [I]): no trainable scale/offset, at evaluation a fixed standardisation, so the
  classifier stays linear; none: logits are exactly x W + b (paper_spec 7.1's plain probe)."""
  rng = np.random.default_rng(0)
  pooled = tf.constant(rng.normal(3.0, 50.0, (6, 3, 3, 8)), tf.float32)
  x = pooled.numpy().reshape(6, -1)
  plain = linear.LinearProbe(4, 1, 8, feature_norm="none")
  assert plain.norm is None
  w, b = plain.classifier.kernel.numpy(), plain.classifier.bias.numpy()
  helpers.assert_close(plain.logits(pooled, training=False), x @ w + b, rtol=1e-5)
  normed = linear.LinearProbe(4, 1, 8, feature_norm="batchnorm")
  assert normed.norm.trainable_weights == [] and len(normed.trainable_variables) == 2   # kernel, bias
  normed.norm.moving_mean.assign(x.mean(0))
  normed.norm.moving_variance.assign(x.var(0))
  w, b = normed.classifier.kernel.numpy(), normed.classifier.bias.numpy()
  standardised = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
  helpers.assert_close(normed.logits(pooled, training=False), standardised @ w + b, rtol=1e-4)
  assert linear.ProbeConfig().feature_norm == "batchnorm"


def test_a_refused_evaluation_leaves_its_output_folder_unclaimed(tmp_path, toy_folder):
  """Bad input is refused before the folder is claimed, so a retry there with another trunk is not
  refused for a source that never ran there (issue 15, case 12)."""
  source = trunk_source.load_trunk("random", trunk_config=dict(helpers.TINY_TRUNK), seed=0)
  out = tmp_path / "out"
  with pytest.raises(ValueError, match="1x1 block 3"):
    linear.evaluate(source, linear.LinearEvalConfig(data=toy_folder, output_dir=str(out)),
                    linear.ProbeConfig(image_size=8))
  assert not out.exists() or not list(out.iterdir())
