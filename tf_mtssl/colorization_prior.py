"""Precomputes the colorization rebalancing prior of a source (paper_spec 3.2; `tf_mtssl.tasks.colorization.prior`).

  python -m tf_mtssl.colorization_prior --data=embedded
  python -m tf_mtssl.colorization_prior --data=tfds:imagenet2012 --tfds_data_dir=... \
      --num_images=10000 --output=/data/imagenet_colorization_prior.npy

Pass the file to pretraining with --col_prior_path (it is found without the flag beside an image folder or
the embedded data).
"""

from tf_mtssl.core import quiet  # noqa: F401  (first: silences TensorFlow's start-up noise)

from absl import app

from tf_mtssl import cli
from tf_mtssl.tasks.colorization import prior as prior_lib

cli.define_flags(prior_lib.PriorConfig)


def main(argv):
  del argv
  config = cli.config_from_flags(prior_lib.PriorConfig)
  output = config.output or prior_lib.default_prior_path(config.data)
  if output is None:
    raise ValueError(f"--output is required for source {config.data!r} (no default place beside the data)")
  prior, stats = prior_lib.compute_prior(config.data, num_images=config.num_images, max_side=config.max_side,
                                         seed=config.seed, tfds_data_dir=config.tfds_data_dir or None,
                                         gray_threshold=config.gray_threshold, sigma=config.sigma)
  path = prior_lib.save_prior(output, prior)
  print(f"Wrote {path}: {stats['images']} colour images ({stats['gray_images']} gray skipped), "
        f"{stats['pixels']} pixels; max bin probability {prior.max():.4f}")


if __name__ == "__main__":
  app.run(cli.run_main(main))
