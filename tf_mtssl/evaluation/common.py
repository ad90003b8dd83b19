"""What the evaluation heads share: the evaluation's own lasso row, and the trunk's output sizes."""

import keras

EVAL_LASSO_ROW = "eval"  # the evaluation head's own alpha row (paper_spec 5, "Eval Only Lasso")


def num_units(trunk: keras.Model) -> int:
  return len(trunk.output["units"])


def feature_channels(trunk: keras.Model) -> int:
  return int(trunk.output["block3"].shape[-1])
