"""A TF Serving compatible model server for an export directory (gRPC and REST), in Python.

No TF Serving binary exists for this machine (shared/machine_notes.md), so this speaks its protocols:
  gRPC: tensorflow.serving.PredictionService Predict and GetModelMetadata (the tensorflow-serving-api
    protos; Classify/Regress/MultiInference answer UNIMPLEMENTED);
  REST: POST /v1/models/NAME[/versions/V]:predict (row "instances" or columnar "inputs", binary values
    as {"b64": ...}), GET /v1/models/NAME[/versions/V] (status), GET .../metadata.
It serves the newest integer version under the export directory and picks up newer ones as they
appear (polling, like TF Serving's file-system source). A real TF Serving binary serves the same
directory unchanged.

Errors: an unknown model or version is NOT_FOUND (REST 404); an unknown signature, missing or extra
input keys, a wrong dtype or shape, an unknown output filter, or bytes that are not an image are
INVALID_ARGUMENT (REST 400); the server keeps serving.

Limits (each a flag of tf_mtssl.serve): a request holds 1 to `max_instances` examples and every image
decodes to at most `max_image_pixels` pixels, both INVALID_ARGUMENT (REST 400), the pixels read from
the image header before any decoding (tf_mtssl/serving/image_headers.py); a REST body over `max_body_mb` is
413 (gRPC: its own RESOURCE_EXHAUSTED over `max_message_mb`). REST bodies come with Content-Length or
Transfer-Encoding: chunked. Ports are never shared: a port in use fails the start (gRPC's default
SO_REUSEPORT is turned off), and both ports are bound before the model loads, so that a clash fails
at once.

Batching: requests run on a thread pool. With batching on, compatible requests (same signature and
per-example shapes) that arrive while the model is busy are merged into one call of up to
`max_batch_size` examples; an idle server runs a request at once (`batch_timeout_ms` = 0 adds no
waiting). If a merged call fails on bad input, its requests are rerun one by one so that only the bad
request fails. `batching="auto"` (the default) turns it on only when a GPU is visible: on this
project's 2-core CPU one image already keeps every core busy through TF's intra-op threads, and
bench/serving_latency.py measured no throughput gain from larger batches (ResNet-101 at 224 px: about
4 images/s at batch 1, 2-3 at batch 8-16) while merged requests wait for each other; per-request calls
in parallel were as fast or faster.
"""
