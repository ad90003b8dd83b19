"""The exemplar task (`ex`): augmentations, batch layout, head invariants, metric, overfitting."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tf_mtssl.tasks.exemplar import augment
from tf_mtssl.model import preprocessing
from tf_mtssl import tasks as task_registry
from tf_mtssl.data.sources import NUM_CORRUPT_KEY
from tf_mtssl.tasks.exemplar.task import ExemplarOptions, ExemplarTask, retrieval_accuracy
from tests import helpers

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory):
  """A few real photos (scikit-image), shrunk to a ~96-px shorter side, as PNG files."""
  import skimage.data
  folder = tmp_path_factory.mktemp("ex_photos")
  for name in PHOTOS:
    image = Image.fromarray(getattr(skimage.data, name)())
    scale = 96 / min(image.size)
    image.resize((round(image.size[0] * scale), round(image.size[1] * scale)), Image.BILINEAR).save(
        folder / f"{name}.png")
  return str(folder)


@pytest.fixture(scope="module")
def photo():
  import skimage.data
  return tf.constant(np.asarray(Image.fromarray(skimage.data.chelsea()).resize((150, 100))))


# ---- augmentations ----------------------------------------------------------------------------------
def test_views_keep_shape_dtype_and_value_range(photo):
  views = augment.exemplar_views(photo, tf.constant([3, 4]), num_views=8, size=48).numpy()
  assert views.shape == (8, 48, 48, 3) and views.dtype == np.uint8
  # Full dynamic range is kept (no collapse to a constant, no wholesale clipping to 0 or 255).
  for v in views:
    assert v.std() > 5.0, v.std()
    assert np.mean((v == 0) | (v == 255)) < 0.5
  # The views of one image differ from each other.
  assert all(np.abs(views[i].astype(int) - views[j]).mean() > 2.0 for i in range(8) for j in range(i))


def test_views_reproducible_with_seed_and_differ_across_seeds(photo):
  f = tf.function(lambda s: augment.exemplar_views(photo, s, num_views=4, size=40))
  a, b = f(tf.constant([1, 2])).numpy(), f(tf.constant([1, 2])).numpy()
  c = augment.exemplar_views(photo, tf.constant([1, 3]), num_views=4, size=40).numpy()
  np.testing.assert_array_equal(a, b)
  assert np.abs(a.astype(int) - c).mean() > 2.0


def test_affine_views_translation_and_mirror_are_exact():
  canvas = tf.random.stateless_uniform([50, 60, 3], [0, 1])
  size, x0, y0 = 32, 7, 5
  transforms = tf.constant([[1, 0, x0, 0, 1, y0, 0, 0],
                            [-1, 0, x0 + size - 1, 0, 1, y0, 0, 0]], tf.float32)
  out = augment.affine_views(canvas, transforms, size).numpy()
  crop = canvas.numpy()[y0:y0 + size, x0:x0 + size]
  helpers.assert_close(out[0], crop, rtol=1e-6)
  helpers.assert_close(out[1], crop[:, ::-1], rtol=1e-6)


def test_view_transforms_follow_the_ranges():
  params = augment.ExemplarAugmentation(seed_crop_fraction=0.5)
  t = augment.view_transforms(tf.constant([0, 7]), 256, tf.constant([200, 300]), 40, params).numpy()
  a = t[:, [0, 1, 3, 4]].reshape(-1, 2, 2)
  det = np.linalg.det(a)
  step = np.sqrt(np.abs(det))                    # canvas px per output px = seed_side / (size * scale)
  scale = (0.5 * 200) / (40 * step)
  assert scale.min() >= 0.7 - 1e-5 and scale.max() <= 1.4 + 1e-5 and scale.max() / scale.min() > 1.6
  angle = np.degrees(np.arctan2(a[:, 1, 0], a[:, 1, 1]))
  assert np.abs(angle).max() <= 20 + 1e-3 and np.abs(angle).max() > 15
  assert np.sum(det < 0) > 64 and np.sum(det > 0) > 64  # mirrored and not mirrored
  centre = np.einsum("vij,j->vi", a, [19.5, 19.5]) + t[:, [2, 5]]  # canvas (x, y) of the view centre
  spread = centre.max(0) - centre.min(0)
  assert np.all(spread <= 2 * 0.2 * 100 + 1e-3) and np.all(spread > 0.3 * 100)
  np.testing.assert_array_equal(t[:, 6:], 0.0)


def test_pca_contrast_scales_variance_along_principal_components(photo):
  image = tf.cast(photo, tf.float32) / 255.0
  mean, components = augment.principal_colour_components(image)
  helpers.assert_close(components.numpy().T @ components.numpy(), np.eye(3))
  views = tf.stack([image, image])
  out = augment.pca_contrast(views, mean, components, tf.constant([[1.0, 1.0, 1.0], [0.5, 1.0, 2.0]]))
  helpers.assert_close(out[0], image)
  proj_in = np.reshape(image - mean, [-1, 3]) @ components.numpy()
  proj_out = np.reshape(out[1] - mean, [-1, 3]) @ components.numpy()
  helpers.assert_close(proj_out, proj_in * [0.5, 1.0, 2.0])


def test_hsv_jitter_identity_and_hue_rotation():
  views = tf.random.stateless_uniform([2, 8, 8, 3], [0, 2])
  ones, zeros = tf.ones([2, 2]), tf.zeros([2, 2])
  helpers.assert_close(augment.hsv_jitter(views, ones, ones, zeros, tf.zeros([2])), views)
  red = tf.constant([[[[1.0, 0.0, 0.0]]]])
  green = augment.hsv_jitter(red, ones[:1], ones[:1], zeros[:1], tf.constant([1 / 3]))
  helpers.assert_close(green.numpy().ravel(), [0.0, 1.0, 0.0])
  # Saturation to the power 4 (then x1, +0) pales a half-saturated colour: S 0.5 -> 0.0625.
  pink = tf.constant([[[[1.0, 0.5, 0.5]]]])
  out = augment.hsv_jitter(pink, tf.constant([[4.0, 1.0]]), ones[:1], zeros[:1], tf.zeros([1]))
  helpers.assert_close(out.numpy().ravel(), [1.0, 0.9375, 0.9375])


def test_bad_augmentation_ranges_raise():
  with pytest.raises(ValueError, match="seed_crop_fraction"):
    augment.ExemplarAugmentation(seed_crop_fraction=1.5)
  with pytest.raises(ValueError, match="scale_range"):
    augment.ExemplarAugmentation(scale_range=(1.4, 0.7))


# ---- task: data -------------------------------------------------------------------------------------
def test_registered():
  assert task_registry.task_class("ex") is ExemplarTask
  assert "ex" in task_registry.registered_tasks()


def test_bad_options_raise():
  with pytest.raises(ValueError, match="views must be >= 2"):
    ExemplarTask(ExemplarOptions(views=1))
  with pytest.raises(ValueError, match="distance"):
    ExemplarTask(ExemplarOptions(distance="l1"))
  with pytest.raises(ValueError, match="seed_crop_fraction"):
    ExemplarTask(ExemplarOptions(seed_crop_fraction=0.0))


def test_every_option_has_default_and_help():
  for field in dataclasses.fields(ExemplarOptions):
    assert field.default is not dataclasses.MISSING and field.metadata.get("help"), field.name


def test_batch_layout_and_determinism(photos_dir):
  task = ExemplarTask(ExemplarOptions(views=4), image_size=40)
  batch = helpers.first_batch(task, photos_dir, batch_size=3, seed=5)
  assert batch["views"].shape == (3, 4, 40, 40, 3) and batch["views"].dtype == tf.uint8
  np.testing.assert_array_equal(batch["labels"], np.repeat(np.arange(3), 4).reshape(3, 4))
  assert batch[NUM_CORRUPT_KEY].shape == (3,)
  inputs = task.trunk_inputs(batch)
  assert inputs.shape == (12, 40, 40, 3) and inputs.dtype == tf.float32
  # Image-major order: row b * V + v is view v of image b.
  np.testing.assert_allclose(inputs[1 * 4 + 2], preprocessing.rgb_to_trunk_input(task.coloured_views(batch)[1, 2]))
  again = helpers.first_batch(task, photos_dir, batch_size=3, seed=5)
  np.testing.assert_array_equal(batch["views"], again["views"])
  other = helpers.first_batch(task, photos_dir, batch_size=3, seed=6)
  assert not np.array_equal(batch["views"], other["views"])
  with pytest.raises(ValueError, match="batch_size=1"):
    task.build_dataset(photos_dir, 1)


def test_summary_images(photos_dir):
  task = ExemplarTask(ExemplarOptions(views=3), image_size=32)
  images = task.summary_images(helpers.first_batch(task, photos_dir, batch_size=2), None)["views"]
  assert images.shape == (1, 32, 96, 3)
  assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 1.0


# ---- task: head, loss, metric ----------------------------------------------------------------------
def test_head_output_has_unit_norm_per_example():
  task = ExemplarTask(ExemplarOptions(embedding_dim=7), image_size=32)
  head = task.build_head((3, 3, 16))
  features = tf.random.stateless_normal([5, 3, 3, 16], [0, 3]) * 10.0
  out = head(features).numpy()
  assert out.shape == (5, 7) and out.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
  # ... and not along the batch axis (the bug of a public exemplar implementation, design_notes).
  assert np.abs(np.linalg.norm(out, axis=0) - 1.0).max() > 0.1


def test_head_output_float32_and_unit_norm_under_mixed_precision():
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    head = ExemplarTask(ExemplarOptions(embedding_dim=6), image_size=32).build_head((2, 2, 8))
    out = head(tf.random.stateless_normal([4, 2, 2, 8], [0, 4], dtype=tf.bfloat16))
  finally:
    keras.mixed_precision.set_global_policy("float32")
  assert out.dtype == tf.float32
  np.testing.assert_allclose(np.linalg.norm(out.numpy(), axis=1), 1.0, rtol=1e-5)


def test_retrieval_accuracy():
  labels = tf.constant([0, 0, 1, 1])
  emb = tf.math.l2_normalize(tf.constant([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.8, 0.2]]), axis=1)
  d = 1.0 - tf.matmul(emb, emb, transpose_b=True)
  # Rows 0, 1 and 2 find a same-image view nearest; row 3 (label 1) is nearest to row 1 (label 0).
  assert float(retrieval_accuracy(labels, d)) == pytest.approx(0.75)


def test_loss_and_metrics_on_separated_and_collapsed_embeddings():
  task = ExemplarTask(ExemplarOptions(views=3, embedding_dim=4), image_size=32)
  batch = {"labels": tf.constant([[0, 0, 0], [1, 1, 1]])}
  separated = tf.constant(np.repeat(np.eye(4, dtype=np.float32)[:2], 3, axis=0))
  loss, metrics = task.loss_and_metrics(batch, separated)
  assert float(loss) == 0.0 and float(metrics["retrieval_accuracy"]) == 1.0
  assert float(metrics["positive_distance"]) == 0.0 and float(metrics["negative_distance"]) == pytest.approx(1.0)
  loss, metrics = task.loss_and_metrics(batch, tf.ones([6, 4]) / 2.0)
  assert float(loss) == pytest.approx(0.5)  # every distance 0: the margin
  assert np.isfinite(float(metrics["retrieval_accuracy"]))


@pytest.mark.slow
def test_loss_falls_when_overfitting_one_batch(photos_dir):
  task = ExemplarTask(ExemplarOptions(views=8, embedding_dim=64), image_size=48)
  batch = helpers.first_batch(task, photos_dir, batch_size=3, seed=0)
  losses = helpers.overfit_single_batch(task, batch, steps=25, learning_rate=1e-3)
  assert np.all(np.isfinite(losses))
  assert losses[-5:].mean() < 0.5 * losses[:3].mean(), losses


def test_paper_flagfile_builds_the_paper_task():
  cfg = helpers.read_flagfile(helpers.REPO_ROOT / "flags" / "ex.cfg")
  assert cfg["tasks"] == "ex" and cfg["depth"] == "101" and cfg["output_stride"] == "16"
  assert cfg["data"] == "tfds:imagenet2012"
  options = task_registry.options_from_settings("ex", cfg)
  task = task_registry.make_task("ex", options=options, image_size=int(cfg["image_size"]))
  assert (task.options.views, task.options.embedding_dim, task.options.margin, task.options.distance) == (
      8, 1000, 0.5, "cosine")


def _log_uniform(shape, seed, lo, hi):
  return tf.exp(tf.random.stateless_uniform(shape, seed, np.log(lo), np.log(hi)))


def test_views_equal_the_reference_composition(photo):
  """`exemplar_views` (geometry in the pipeline, colours in the model) gives what one pass of the
  documented steps gives: one warp per view of the image, contrast 1, contrast 2 and hue, rounding."""
  params = augment.ExemplarAugmentation()
  size = 64  # the 100-px photo's seed patch (60 px) is not shrunk first at this size
  warp_any_count = tf.function(lambda canvas, t: augment.affine_views(canvas, t, size), input_signature=[
      tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([None, 8], tf.float32)])  # a tiled canvas
  for i in range(3):
    seed = tf.constant([i, 2])
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 7)
    transforms = augment.view_transforms(seeds[0], 4, tf.shape(photo)[:2], size, params)
    views = tf.cast(warp_any_count(photo, transforms), tf.float32) / 255.0
    mean, components = augment.principal_colour_components(photo)
    views = augment.pca_contrast(views, mean, components, _log_uniform([4, 3], seeds[1], 0.5, 2.0))
    views = augment.hsv_jitter(views, _log_uniform([4, 2], seeds[2], 0.25, 4.0), _log_uniform([4, 2], seeds[3], 0.7, 1.4),
                               tf.random.stateless_uniform([4, 2], seeds[4], -0.1, 0.1),
                               tf.random.stateless_uniform([4], seeds[5], -0.1, 0.1))
    expected = np.round(np.clip(views.numpy(), 0, 1) * 255).astype(np.uint8)
    out = augment.exemplar_views(photo, seed, num_views=4, size=size).numpy()
    assert np.abs(out.astype(int) - expected).max() <= 1  # rounding of float-equal values
    assert np.mean(out != expected) < 1e-3


def test_one_warp_per_view_equals_the_warp_of_a_tiled_canvas(photo):
  transforms = augment.view_transforms(tf.constant([4, 1]), 5, tf.shape(photo)[:2], 40, augment.ExemplarAugmentation())
  dynamic = tf.function(lambda canvas, t: augment.affine_views(canvas, t, 40), input_signature=[
      tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([None, 8], tf.float32)])  # view count unknown
  np.testing.assert_array_equal(augment.affine_views(photo, transforms, 40), dynamic(photo, transforms))


def test_trunk_inputs_colour_each_view_with_its_own_draws(photo):
  task = ExemplarTask(ExemplarOptions(views=3), image_size=40)
  images = [photo, tf.image.flip_up_down(photo)]
  seeds = [tf.constant([1, 1]), tf.constant([2, 1])]
  examples = [task.views_from_image(image, seed) for image, seed in zip(images, seeds)]
  batch = {"views": tf.stack([views for views, _ in examples])}
  batch.update({k: tf.stack([colour[k] for _, colour in examples]) for k in augment.COLOUR_KEYS})
  assert batch["views"].shape == (2, 3, 40, 40, 3) and batch["colour_mixing"].shape == (2, 3, 3, 3)
  inputs = task.trunk_inputs(batch).numpy()
  for b, (image, seed) in enumerate(zip(images, seeds)):
    expected = preprocessing.rgb_to_trunk_input(augment.exemplar_views(image, seed, 3, 40)).numpy()
    np.testing.assert_array_equal(inputs[3 * b:3 * b + 3], expected)


def test_trunk_inputs_are_the_same_under_xla(photo):
  """The colour step runs in the train step, which --jit_compile compiles: at most a rounding step of
  the uint8 views may differ."""
  task = ExemplarTask(ExemplarOptions(views=3), image_size=40)
  views, colour = task.views_from_image(photo, tf.constant([3, 3]))
  batch = {"views": views[None], **{k: v[None] for k, v in colour.items()}}
  plain = tf.function(task.trunk_inputs)(batch).numpy()
  compiled = tf.function(task.trunk_inputs, jit_compile=True)(batch).numpy()
  assert np.abs(compiled - plain).max() <= 1.0 and np.mean(compiled != plain) < 0.01
