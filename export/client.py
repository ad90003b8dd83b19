"""Gets trunk features of image files from a running server (gRPC PredictionService).

  python -m export.client --server=localhost:8500 image1.jpg image2.png ...

Sends the encoded files to the `serving_default` signature in requests of --batch_size images, prints
each output's shape and writes every output, stacked in argument order, to
--output_dir/<output>.npy (features [N, C], grid [N, 3, 3, C], block3 [N, h, w, C]) plus images.txt
listing the files row by row.
"""

import os

from absl import app, flags

from tf_mtssl import flag_utils

FLAGS = flags.FLAGS

flags.DEFINE_string("server", "localhost:8500", "HOST:PORT of the gRPC server (export.serve or TF Serving).")
flags.DEFINE_string("model_name", "tf_mtssl", "Model name (the server's --model_name).")
flags.DEFINE_string("signature_name", "serving_default", "Signature taking encoded images.")
flags.DEFINE_list("outputs", [], "Outputs to request (e.g. features,grid); empty: all of them.")
flags.DEFINE_string("output_dir", "features", "Where the <output>.npy files and images.txt are written.")
flags.DEFINE_integer("batch_size", 16, "Images per request.")
flags.DEFINE_float("timeout", 120.0, "Seconds per request before giving up.")
flags.DEFINE_integer("max_message_mb", 256, "Largest response accepted (block-3 maps are large).")


def main(argv):
  paths = argv[1:]
  if not paths:
    raise ValueError("Give image files: python -m export.client --server=HOST:PORT image1.jpg ...")
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f"No such image file(s): {missing}")
  if FLAGS.batch_size < 1:
    raise ValueError(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
  from export import server_lib  # after flag parsing: importing TF takes seconds
  import grpc
  try:
    outputs = server_lib.features_of_files(FLAGS.server, paths, model_name=FLAGS.model_name,
                                           signature_name=FLAGS.signature_name, outputs=FLAGS.outputs,
                                           batch_size=FLAGS.batch_size, timeout=FLAGS.timeout,
                                           max_message_mb=FLAGS.max_message_mb)
  except grpc.RpcError as e:
    raise ValueError(f"{FLAGS.server} answered {e.code().name}: {e.details()}") from None
  files = server_lib.save_outputs(outputs, paths, FLAGS.output_dir)
  for key, value in sorted(outputs.items()):
    print(f"{key}: shape {list(value.shape)} {value.dtype} -> {files[key]}")
  print(f"rows follow {files['images']}")


if __name__ == "__main__":
  app.run(flag_utils.run_main(main))
