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

import grpc
from absl import app

from tf_mtssl import cli
from tf_mtssl.serving import client as serving_client

cli.define_flags(serving_client.ClientConfig)


def main(argv):
  paths = argv[1:]
  if not paths:
    raise ValueError("Give image files: python -m tf_mtssl.client --server=HOST:PORT image1.jpg ...")
  config = cli.config_from_flags(serving_client.ClientConfig)
  serving_client.earlier_outputs(config.output_dir, config.overwrite)  # refused before any request
  try:
    result = serving_client.features_of_files(config.server, paths, model_name=config.model_name,
                                          signature_name=config.signature_name, outputs=list(config.outputs),
                                          batch_size=config.batch_size, timeout=config.timeout,
                                          max_message_mb=config.max_message_mb)
  except grpc.RpcError as e:
    raise ValueError(f"{config.server} answered {e.code().name}: {e.details()}") from None
  for path, why in result.skipped:
    print(f"skipped {path}: {why}", file=sys.stderr)
  if not result.paths:
    raise ValueError(f"none of the {len(paths)} image(s) was processed (each skipped above); nothing "
                     f"written to {config.output_dir}")
  files = serving_client.save_outputs(result.outputs, result.paths, config.output_dir, overwrite=config.overwrite)
  for key, value in sorted(result.outputs.items()):
    print(f"{key}: shape {list(value.shape)} {value.dtype} -> {files[key]}")
  print(f"rows follow {files['images']}" + (f"; {len(result.skipped)} of {len(paths)} image(s) skipped"
                                            if result.skipped else ""))


if __name__ == "__main__":
  app.run(cli.run_main(main))
