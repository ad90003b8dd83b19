"""Makes motion-mask TFRecords from videos (paper_spec 3.4): `python -m tf_mtssl.make_motion_masks`.

  python -m tf_mtssl.make_motion_masks --videos='clips/*.mp4' --output_dir=masks --debug_dir=masks_debug

The method and the record format are described in `tf_mtssl.data.motion_masks`. Every field of
`motion_masks.MaskOptions` is a flag of the same name with the same default. Unusable videos are
reported and skipped; the exit status is non-zero only when nothing at all could be produced.
"""

from tf_mtssl.core import quiet  # noqa: F401  (first: silences TensorFlow's start-up noise)

import dataclasses
import sys
import typing

from absl import app
from absl import flags

from tf_mtssl.data import motion_masks

flags.DEFINE_string("videos", "data/embedded/videos", "A video file, a folder (searched recursively) or a "
                    "glob of video files.")
flags.DEFINE_string("output_dir", "data/motion_masks", "Folder for the TFRecord shards and done.json.")
flags.DEFINE_bool("resume", False, "Skip videos already finished in --output_dir (listed in done.json).")
flags.DEFINE_string("debug_dir", "", "If set, overlays (mask in red | residual motion) are written here.")
flags.DEFINE_integer("debug_every", 25, "Write a debug overlay every this many target frames per video.")
flags.DEFINE_bool("progress", True, "Show a progress bar per video.")

_FLAG_DEFINERS = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
                  str: flags.DEFINE_string}
for _field in dataclasses.fields(motion_masks.MaskOptions):
  _FLAG_DEFINERS[typing.get_type_hints(motion_masks.MaskOptions)[_field.name]](
      _field.name, _field.default, _field.metadata["help"])

FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  opts = motion_masks.MaskOptions(**{f.name: getattr(FLAGS, f.name)
                                     for f in dataclasses.fields(motion_masks.MaskOptions)})
  summary = motion_masks.generate(FLAGS.videos, FLAGS.output_dir, opts, resume=FLAGS.resume,
                                  debug_dir=FLAGS.debug_dir or None, debug_every=FLAGS.debug_every,
                                  progress=FLAGS.progress)
  print(summary.text())
  if summary.kept == 0 and summary.resumed == 0:
    print(f"Error: no motion mask could be produced from {FLAGS.videos} (see the reasons above).",
          file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
