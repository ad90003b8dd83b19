"""Tests of the probe sets (tf_mtssl.data.probe_sets), the pretraining sources they must stay out of,
and the probes with their standard errors (tf_mtssl.evaluation.probes)."""

import hashlib
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from tests import helpers
from tf_mtssl import tasks
from tf_mtssl.data import classification_set, embedded, prepare_embedded, probe_sets, sources
from tf_mtssl.evaluation import probes


def _rows(images):
  return {hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest() for x in images}


def _thumb(image_bgr):
  """A coarse, resolution-independent fingerprint: 8x8 gray, quantised (same photo at any size)."""
  gray = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2GRAY)
  return tuple((cv2.resize(gray, (8, 8), interpolation=cv2.INTER_AREA) // 32).reshape(-1))


def _manifest():
  return json.loads(embedded.require(embedded.manifest_path()).read_text())


def test_fashion_mnist_splits_are_fixed_balanced_and_disjoint():
  counts = {}
  for split in probe_sets.SPLITS:
    images, labels, groups = probe_sets.load_split("fashion_mnist", split)
    assert images.dtype == np.uint8 and images.shape[1:] == (28, 28, 3) and len(groups) == len(labels)
    counts[split] = np.bincount(labels, minlength=10).tolist()
  assert counts["train"] == [500] * 10 and counts["val"] == [200] * 10 and sum(counts["test"]) == 10000
  with np.load(probe_sets.probes_dir() / "fashion_mnist.npz") as npz:
    assert not set(npz["train_source_index"]) & set(npz["val_source_index"])
  assert probe_sets.class_names("fashion_mnist")[9] == "Ankle boot"
  with pytest.raises(ValueError, match="splits"):
    probe_sets.load_split("fashion_mnist", "validation")


def test_objects_are_split_by_photo_into_at_least_8_categories():
  index = json.loads((probe_sets.probes_dir() / "objects.json").read_text())
  assert len(index["classes"]) >= 8
  split_of = {}
  for split in probe_sets.SPLITS:
    images, labels, groups = probe_sets.load_split("objects", split)
    assert images.shape[1:] == (probe_sets.OBJECT_SIZE,) * 2 + (3,)
    assert set(np.unique(labels)) == set(range(len(index["classes"])))  # every class in every split
    for g, label in zip(groups, labels):
      photo = index["photos"][g]
      assert photo["split"] == split and index["classes"][label] == photo["category"]
      split_of.setdefault(g, set()).add(split)
  assert all(len(s) == 1 for s in split_of.values())  # never one photo in two splits
  assert all(p["flat_fraction"] < probe_sets.MAX_FLAT_FRACTION for p in index["photos"])
  assert not any("cartoon" in p["path"] or p["path"].startswith("symbols/") for p in index["photos"])
  # backgrounds: split by photo too
  names = [n for s in probe_sets.SPLITS for n in index["backgrounds"][s]]
  assert len(names) == len(set(names)) >= 3


def test_no_probe_image_or_background_is_in_any_pretraining_source():
  # Fashion-MNIST: no probe image (any split) among the pretraining images, by exact pixels.
  pretrain = _rows(probe_sets.load_fashion_pretrain())
  assert len(pretrain) > 50_000
  for split in probe_sets.SPLITS:
    images, _, _ = probe_sets.load_split("fashion_mnist", split)
    assert not _rows(images[..., 0]) & pretrain, split
  # Natural photos: every file of the 'photos' pretraining source (images/ + photos/) against every
  # file of the objects probe (stamps, backgrounds), by bytes and by a coarse pixel fingerprint that
  # survives resizing and re-encoding.
  pretrain_files = (sources.list_image_files(str(embedded.images_dir())) +
                    sources.list_image_files(str(embedded.photos_dir())))
  probe_files = sources.list_image_files(str(probe_sets.probes_dir()))
  assert len(pretrain_files) >= 70 and len(probe_files) >= 150
  sha = lambda f: hashlib.sha256(open(f, "rb").read()).hexdigest()  # noqa: E731
  assert not {sha(f) for f in pretrain_files} & {sha(f) for f in probe_files}
  thumbs = {_thumb(cv2.imread(f, cv2.IMREAD_COLOR)) for f in pretrain_files}
  backgrounds = [f for f in probe_files if "/backgrounds/" in f]
  assert len(backgrounds) >= 3 and not {_thumb(cv2.imread(f, cv2.IMREAD_COLOR)) for f in backgrounds} & thumbs
  # ... and by provenance: no package file feeds both.
  files = _manifest()["files"]
  origin = lambda f: (f["package"], f["source_path"])  # noqa: E731
  pre = {origin(f) for f in files if f["path"].startswith(("images/", "photos/"))}
  probe = {origin(f) for f in files if f["path"].startswith("probes/") and f["path"].endswith((".png", ".jpg"))}
  assert pre and probe and not pre & probe


def test_every_new_file_has_provenance_and_a_licence():
  files = [f for f in _manifest()["files"] if f["step"] in ("photo_packages", "fashion_mnist", "objects")]
  assert len(files) >= 250
  for f in files:
    assert f["package"] and f["package_version"] and f["source_path"] and f["licence"] and f["sha256"], f
  lomiri = {f["source_path"].rsplit("/", 1)[-1]: f["licence"] for f in files if f["package"].startswith("lomiri")}
  assert lomiri["seeding_by_Clements_Engelhardt.jpg"].startswith("CC0-1.0")
  assert lomiri["Bridge_by_Sander_Klootwijk.jpg"].startswith("CC-BY-SA-4.0")


def test_dep5_licence_lookup_is_per_file():
  text = ("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
          "Files: *\nCopyright: x\nLicense: GPL-2+\n\n"
          "Files: 16.04/a_by_b.jpg\n       16.04/c.jpg\nCopyright: y\nLicense: CC-BY-4.0\n\n"
          "Files: debian/*\nCopyright: z\nLicense: Expat\n\nLicense: GPL-2+\n text\n")
  assert prepare_embedded.deb_file_licence(text, "usr/share/backgrounds/a_by_b.jpg") == "CC-BY-4.0"
  assert prepare_embedded.deb_file_licence(text, "usr/share/backgrounds/c.jpg") == "CC-BY-4.0"
  assert prepare_embedded.deb_file_licence(text, "usr/share/backgrounds/other.jpg") == "GPL-2+"
  assert prepare_embedded.deb_file_licence("This package was debianized by...", "x.jpg") is None


def test_gray_still_images_are_refused_by_col_and_ms():
  for name, why in (("col", "colour"), ("ms", "video")):
    task = helpers.tiny_task(name)
    with pytest.raises(ValueError, match=f"{name} cannot train on --data=fashion_mnist: .*{why}"):
      task.build_dataset("fashion_mnist", 2)
  image = next(iter(sources.image_dataset("fashion_mnist")))["image"].numpy()
  assert image.shape == (28, 28, 3) and np.array_equal(image[..., 0], image[..., 2])  # gray as RGB
  batch = next(iter(tasks.make_task("ex", image_size=32, options=helpers.tiny_task("ex").options)
                    .build_dataset("fashion_mnist", 2)))
  assert batch["views"].shape[:2] == (2, 4)


def test_standard_errors():
  correct = np.array([1, 0, 1, 1, 0, 1, 1, 1])
  p, se = probes.accuracy_and_se(correct)
  np.testing.assert_allclose([p, se], [0.75, np.sqrt(0.75 * 0.25 / 7)], rtol=1e-12)
  # every example its own group: the clustered error is the binomial one up to n/(n-1) vs 1/(n-1)
  _, se_groups = probes.accuracy_and_se(correct, groups=np.arange(8))
  np.testing.assert_allclose(se_groups, np.sqrt(np.sum((correct - p) ** 2) * 8 / 7) / 8, rtol=1e-12)
  # duplicated outcomes of one photo carry no new information: the clustered error stays the same
  _, se_dup = probes.accuracy_and_se(np.repeat(correct, 4), groups=np.repeat(np.arange(8), 4))
  np.testing.assert_allclose(se_dup, se_groups, rtol=1e-12)
  assert probes.proportion_se(0.75, 8) == pytest.approx(se, rel=1e-12)


def test_knn_predictions():
  bank = probes.knn_features(np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 1.0], [0.2, 0.9]]))
  labels = np.array([0, 0, 1, 1, 1])
  queries = probes.knn_features(np.array([[1.0, 0.05], [0.05, 1.0], [0.6, 0.4]]))
  preds = probes.knn_predict(bank, labels, queries, ks=[1, 3, 50], num_classes=2)
  assert preds[1].tolist() == [0, 1, 0]
  # k = 50 > 5 rows: all vote, weighted by exp(cos / 0.07): the query at 0.6/0.4 is nearer class 0
  assert preds[50].tolist() == [0, 1, 0] and preds[3].tolist() == [0, 1, 0]
  np.testing.assert_allclose(np.linalg.norm(bank, axis=1), 1.0, rtol=1e-6)


def test_run_probes_chooses_on_validation_and_reports_errors():
  from tf_mtssl import trunk as trunk_lib
  from tf_mtssl.evaluation import linear
  source = classification_set.ClassificationSource("objects")
  trunk = trunk_lib.build_trunk(**helpers.TINY_TRUNK)
  config = linear.ProbeConfig(train_steps=30, batch_size=64, lr_boundaries=(), image_size=32,
                              crop_fraction=1.0, eval_batch_size=256)
  result = probes.run_probes(trunk, source, config, probes.ProbeProtocol(weight_decays=(0.0, 0.1), knn_ks=(1, 20)))
  lin, knn = result["linear"], result["knn"]
  assert lin["val_top1"] == max(lin["val_top1_by_weight_decay"].values())
  assert knn["val_top1"] == max(knn["val_top1_by_k"].values()) and knn["k"] in (1, 20)
  for r in (lin, knn):
    assert 0 <= r["top1"] <= 1 and 0 < r["se"] < 0.2
  # clustered by photo: wider than if the test composites were independent
  assert lin["se"] > probes.proportion_se(lin["top1"], result["num_test"]) * 0.99
  with pytest.raises(ValueError, match="probes must be"):
    probes.ProbeProtocol(probes=("svm",))


def test_binary_runs_both_probes_on_a_probe_set(tmp_path):
  run = subprocess.run(
      [sys.executable, "-m", "tf_mtssl.evaluate_linear", "--init=random", "--depth=14", "--base_width=8",
       "--data=objects", "--probes=linear,knn", "--weight_decays=0,0.1", "--knn_ks=5,20",
       "--image_size=32", "--crop_fraction=1", "--train_steps=20", "--lr_boundaries=",
       f"--output_dir={tmp_path}"], capture_output=True, text=True, timeout=300, cwd=helpers.REPO_ROOT,
      env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads((tmp_path / "result.json").read_text())
  assert result["splits"]["test"] == "test" and result["num_test"] > 200
  assert "linear: top1=" in run.stdout and "(standard error)" in run.stdout and "knn: top1=" in run.stdout


def test_batchnorm_reestimation_sets_the_moving_statistics_to_the_probe_images():
  import keras
  import tensorflow as tf
  from tf_mtssl import preprocessing
  from tf_mtssl import trunk as trunk_lib
  trunk = trunk_lib.build_trunk(**helpers.TINY_TRUNK)
  images, _, _ = probe_sets.load_split("objects", "train")
  batches = [tf.constant(images[i:i + 64], tf.float32) for i in range(0, 256, 64)]
  assert probes.reestimate_batchnorm(trunk, batches) == 256
  first = next(l for l in trunk.layers if isinstance(l, keras.layers.BatchNormalization))
  x = preprocessing.rgb_to_trunk_input(tf.concat(batches, 0))
  # The first BN layer reads the root convolution's output: its moving mean is now that output's mean
  # over the 256 images (the batches' means, averaged with equal weights).
  conv_in = keras.Model(trunk.input, first.input)(x, training=True)
  np.testing.assert_allclose(first.moving_mean.numpy(), tf.reduce_mean(conv_in, axis=[0, 1, 2]).numpy(),
                             rtol=1e-3, atol=1e-3 * float(tf.reduce_max(tf.abs(conv_in))))
  assert first.momentum == trunk_lib.BN_MOMENTUM  # restored
