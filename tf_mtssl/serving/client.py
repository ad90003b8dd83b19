"""A client of the server (or of a real TF Serving): Predict requests for image files, with bad images
skipped, and the features saved without mixing with an earlier output."""

import dataclasses
import collections
import logging
import os
from typing import Dict, List, NamedTuple, Sequence, Tuple

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tf_mtssl.core import configs
from tf_mtssl.serving import export as export_lib
from tf_mtssl.serving import errors

log = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class ClientConfig:
  """`python -m tf_mtssl.client`: which server, which outputs, written where."""
  server: str = configs.field("localhost:8500", "HOST:PORT of the gRPC server (tf_mtssl.serve or TF Serving).")
  model_name: str = configs.field("tf_mtssl", "Model name (the server's --model_name).")
  signature_name: str = configs.field("serving_default", "Signature taking encoded images.")
  outputs: Tuple[str, ...] = configs.field((), "Outputs to request (e.g. features,grid); empty: all of them.")
  output_dir: str = configs.field("features", "Where the <output>.npy files and images.txt are written.")
  overwrite: bool = configs.field(False, "Replace an earlier output in --output_dir (its images.txt and .npy files) "
                                  "instead of refusing to write there.")
  batch_size: int = configs.field(16, "Images per request.")
  timeout: float = configs.field(120.0, "Seconds per request before giving up.")
  max_message_mb: int = configs.field(256, "Largest response accepted (block-3 maps are large).")

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")

def make_stub(server: str, max_message_mb: int = 256):
  """A standard PredictionServiceStub on an insecure channel to HOST:PORT."""
  limit = max_message_mb * 1024 * 1024
  channel = grpc.insecure_channel(server, options=[("grpc.max_send_message_length", limit),
                                                   ("grpc.max_receive_message_length", limit)])
  return prediction_service_pb2_grpc.PredictionServiceStub(channel)


def predict_request(images: Sequence[bytes], model_name: str = "tf_mtssl",
                    signature_name: str = export_lib.SERVING_DEFAULT,
                    outputs: Sequence[str] = ()) -> predict_pb2.PredictRequest:
  """A Predict request of encoded images for the `serving_default` signature."""
  request = predict_pb2.PredictRequest()
  request.model_spec.name = model_name
  request.model_spec.signature_name = signature_name
  request.inputs[export_lib.BYTES_INPUT].CopyFrom(
      tf.make_tensor_proto(list(images), dtype=tf.string, shape=[len(images)]))
  request.output_filter.extend(outputs)
  return request


# A request refused for what it holds (a bad or oversized image): the client skips that image.


_IMAGE_ERRORS = (errors.INVALID_ARGUMENT, errors.RESOURCE_EXHAUSTED)


class FileFeatures(NamedTuple):
  outputs: Dict[str, np.ndarray]  # each output stacked in `paths` order
  paths: List[str]  # the images the rows belong to
  skipped: List[Tuple[str, str]]  # (image, why) of the images that were not processed


def features_of_files(server: str, paths: Sequence[str], model_name: str = "tf_mtssl",
                      signature_name: str = export_lib.SERVING_DEFAULT, outputs: Sequence[str] = (),
                      batch_size: int = 16, timeout: float = 120.0,
                      max_message_mb: int = 256) -> FileFeatures:
  """Sends image files in requests of batch_size. A file that cannot be read, or an image the
  server refuses (its batch is then sent again image by image), is skipped with the reason; any
  other server error (unreachable, unknown model) raises grpc.RpcError."""
  stub = make_stub(server, max_message_mb)
  parts: Dict[str, List[np.ndarray]] = collections.defaultdict(list)
  kept, skipped = [], []

  def send(batch: List[Tuple[str, bytes]]):
    response = stub.Predict(predict_request([data for _, data in batch], model_name, signature_name,
                                            outputs), timeout=timeout)
    for key, proto in response.outputs.items():
      parts[key].append(tf.make_ndarray(proto))
    kept.extend(path for path, _ in batch)

  for start in range(0, len(paths), batch_size):
    batch = []
    for path in paths[start:start + batch_size]:
      try:
        with open(path, "rb") as f:
          batch.append((path, f.read()))
      except OSError as e:
        skipped.append((path, e.strerror or str(e)))
    if not batch:
      continue
    try:
      send(batch)
    except grpc.RpcError as error:
      if error.code() not in _IMAGE_ERRORS:
        raise
      if len(batch) == 1:
        skipped.append((batch[0][0], error.details()))
        continue
      for item in batch:  # find the refused image(s)
        try:
          send([item])
        except grpc.RpcError as e:
          if e.code() not in _IMAGE_ERRORS:
            raise
          skipped.append((item[0], e.details()))
  order = {path: i for i, path in reversed(list(enumerate(paths)))}
  skipped.sort(key=lambda item: order[item[0]])  # unreadable files were noted before refused images
  return FileFeatures({k: np.concatenate(v) for k, v in parts.items()}, kept, skipped)


IMAGES_FILE = "images.txt"


def earlier_outputs(output_dir: str, overwrite: bool = False) -> List[str]:
  """The files of an earlier save_outputs in output_dir (images.txt and *.npy), sorted; without
  `overwrite`, any such file is a ValueError (so no earlier output sits beside new rows)."""
  earlier = sorted(n for n in os.listdir(output_dir) if n == IMAGES_FILE or n.endswith(".npy")) \
      if os.path.isdir(output_dir) else []
  if earlier and not overwrite:
    raise ValueError(f"--output_dir={output_dir} already holds an earlier output ({', '.join(earlier)}): "
                     "choose another folder, or pass --overwrite to replace it")
  return earlier


def save_outputs(outputs: Dict[str, np.ndarray], paths: Sequence[str], output_dir: str,
                 overwrite: bool = False) -> Dict[str, str]:
  """Writes <output>.npy per output and images.txt (the row order); returns their paths.

  An earlier save in output_dir is refused (ValueError), or with `overwrite` removed first.
  """
  for name in earlier_outputs(output_dir, overwrite):
    os.remove(os.path.join(output_dir, name))
  os.makedirs(output_dir, exist_ok=True)
  files = {}
  for key, value in outputs.items():
    files[key] = os.path.join(output_dir, f"{key}.npy")
    np.save(files[key], value)
  files["images"] = os.path.join(output_dir, IMAGES_FILE)
  with open(files["images"], "w") as f:
    f.write("".join(f"{os.path.abspath(p)}\n" for p in paths))
  return files
