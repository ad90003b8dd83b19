"""Precomputes the colorization rebalancing prior of a source (paper_spec 3.2; `tf_mtssl.tasks.colorization.prior`).

  python -m tf_mtssl.colorization_prior --data=embedded
  python -m tf_mtssl.colorization_prior --data=tfds:imagenet2012 --tfds_data_dir=... \
      --num_images=10000 --output=/data/imagenet_colorization_prior.npy

Pass the file to pretraining with --col_prior_path (it is found without the flag beside an image folder or
the embedded data).
"""

from tf_mtssl.core import quiet  # noqa: F401  (first: silences TensorFlow's start-up noise)

from absl import app, flags

from tf_mtssl import cli
from tf_mtssl.tasks.colorization import prior as prior_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("data", "embedded", "Image source: 'embedded', 'tfds:NAME[:SPLIT]', a folder or a "
                    "TFRecord glob (see tf_mtssl.data.sources).")
flags.DEFINE_string("output", "", "Output .npy; empty = colorization_prior.npy beside the data "
                    "(embedded root or the image folder).")
flags.DEFINE_integer("num_images", 10000, "Images to read (<= 0: the whole source).")
flags.DEFINE_integer("max_side", 256, "Images are shrunk to this longer side first.")
flags.DEFINE_integer("seed", 0, "Shuffling seed of the source.")
flags.DEFINE_string("tfds_data_dir", "", "tensorflow-datasets data_dir (empty: the tfds default).")
flags.DEFINE_float("gray_threshold", 5.0, "Images with |a|,|b| <= this everywhere are skipped "
                   "(paper_spec 3.2: 5).")
flags.DEFINE_float("sigma", prior_lib.PRIOR_SIGMA, "Gaussian smoothing of the prior, ab units (paper_spec 3.2: 5).")


def main(argv):
  del argv
  output = FLAGS.output or prior_lib.default_prior_path(FLAGS.data)
  if output is None:
    raise ValueError(f"--output is required for source {FLAGS.data!r} (no default place beside the data)")
  prior, stats = prior_lib.compute_prior(FLAGS.data, num_images=FLAGS.num_images, max_side=FLAGS.max_side,
                                         seed=FLAGS.seed, tfds_data_dir=FLAGS.tfds_data_dir or None,
                                         gray_threshold=FLAGS.gray_threshold, sigma=FLAGS.sigma)
  path = prior_lib.save_prior(output, prior)
  print(f"Wrote {path}: {stats['images']} colour images ({stats['gray_images']} gray skipped), "
        f"{stats['pixels']} pixels; max bin probability {prior.max():.4f}")


if __name__ == "__main__":
  app.run(cli.run_main(main))
