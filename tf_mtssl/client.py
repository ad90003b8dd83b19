"""Gets trunk features of image files from a running server (gRPC PredictionService).

  python -m tf_mtssl.client --server=localhost:8500 --output_dir=features image1.jpg image2.png ...

Sends the encoded files to the `serving_default` signature in requests of --batch_size images, prints
each output's shape and writes every output, stacked in argument order, to
--output_dir/<output>.npy (features [N, C], grid [N, 3, 3, C], block3 [N, h, w, C]) plus images.txt
listing the files row by row. A file that cannot be read, or an image the server refuses (not an
image, too large), is skipped with a message on stderr and has no row; images.txt lists the rows
that were written. An --output_dir holding an earlier output is refused unless --overwrite.
"""

from tf_mtssl.core import quiet  # noqa: F401  (first: silences TensorFlow's start-up noise)

import sys

from absl import app, flags

from tf_mtssl import cli as flag_utils

FLAGS = flags.FLAGS

flags.DEFINE_string("server", "localhost:8500", "HOST:PORT of the gRPC server (tf_mtssl.serve or TF Serving).")
flags.DEFINE_string("model_name", "tf_mtssl", "Model name (the server's --model_name).")
flags.DEFINE_string("signature_name", "serving_default", "Signature taking encoded images.")
flags.DEFINE_list("outputs", [], "Outputs to request (e.g. features,grid); empty: all of them.")
flags.DEFINE_string("output_dir", "features", "Where the <output>.npy files and images.txt are written.")
flags.DEFINE_boolean("overwrite", False, "Replace an earlier output in --output_dir (its images.txt "
                     "and .npy files) instead of refusing to write there.")
flags.DEFINE_integer("batch_size", 16, "Images per request.")
flags.DEFINE_float("timeout", 120.0, "Seconds per request before giving up.")
flags.DEFINE_integer("max_message_mb", 256, "Largest response accepted (block-3 maps are large).")


def main(argv):
  paths = argv[1:]
  if not paths:
    raise ValueError("Give image files: python -m tf_mtssl.client --server=HOST:PORT image1.jpg ...")
  if FLAGS.batch_size < 1:
    raise ValueError(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
  from tf_mtssl.serving import server_lib  # after flag parsing: importing TF takes seconds
  import grpc
  server_lib.earlier_outputs(FLAGS.output_dir, FLAGS.overwrite)  # refused before any request
  try:
    result = server_lib.features_of_files(FLAGS.server, paths, model_name=FLAGS.model_name,
                                          signature_name=FLAGS.signature_name, outputs=FLAGS.outputs,
                                          batch_size=FLAGS.batch_size, timeout=FLAGS.timeout,
                                          max_message_mb=FLAGS.max_message_mb)
  except grpc.RpcError as e:
    raise ValueError(f"{FLAGS.server} answered {e.code().name}: {e.details()}") from None
  for path, why in result.skipped:
    print(f"skipped {path}: {why}", file=sys.stderr)
  if not result.paths:
    raise ValueError(f"none of the {len(paths)} image(s) was processed (each skipped above); nothing "
                     f"written to {FLAGS.output_dir}")
  files = server_lib.save_outputs(result.outputs, result.paths, FLAGS.output_dir, overwrite=FLAGS.overwrite)
  for key, value in sorted(result.outputs.items()):
    print(f"{key}: shape {list(value.shape)} {value.dtype} -> {files[key]}")
  print(f"rows follow {files['images']}" + (f"; {len(result.skipped)} of {len(paths)} image(s) skipped"
                                            if result.skipped else ""))


if __name__ == "__main__":
  app.run(flag_utils.run_main(main))
