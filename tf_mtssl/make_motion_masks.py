"""Makes motion-mask TFRecords from videos (paper_spec 3.4): `python -m tf_mtssl.make_motion_masks`.

  python -m tf_mtssl.make_motion_masks --videos='clips/*.mp4' --output_dir=masks --debug_dir=masks_debug

The method and the record format are described in `tf_mtssl.data.motion_masks`. The flags are the fields of
`motion_masks.GenerationConfig` and `motion_masks.MaskOptions`, with their defaults. Unusable videos are
reported and skipped; the exit status is non-zero only when nothing at all could be produced.
"""

from tf_mtssl.core import quiet  # noqa: F401  (first: silences TensorFlow's start-up noise)

import sys

from absl import app

from tf_mtssl import cli
from tf_mtssl.data import motion_masks

cli.define_flags(motion_masks.GenerationConfig)
cli.define_flags(motion_masks.MaskOptions)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  run = cli.config_from_flags(motion_masks.GenerationConfig)
  summary = motion_masks.generate(run.videos, run.output_dir, cli.config_from_flags(motion_masks.MaskOptions),
                                  resume=run.resume, debug_dir=run.debug_dir or None, debug_every=run.debug_every,
                                  progress=run.progress)
  print(summary.text())
  if summary.kept == 0 and summary.resumed == 0:
    print(f"Error: no motion mask could be produced from {run.videos} (see the reasons above).", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(cli.run_main(main))
