"""What the evaluation heads share: the evaluation's own lasso row, and the trunk's output sizes."""

from typing import Dict, Optional

import keras

from tf_mtssl.model import lasso as lasso_lib
from tf_mtssl.runs import checkpoints

EVAL_LASSO_ROW = "eval"  # the evaluation head's own alpha row (paper_spec 5, "Eval Only Lasso")


def num_units(trunk: keras.Model) -> int:
  return len(trunk.output["units"])


def feature_channels(trunk: keras.Model) -> int:
  return int(trunk.output["block3"].shape[-1])


def eval_lasso(num_block3_units: int, l1: Optional[float]) -> Optional[lasso_lib.LassoCombination]:
  """The evaluation head's own alpha row over the block-3 units (paper_spec 5 [R]: the evaluation task
  gets its own row, "Eval Only Lasso" and "Lasso"), penalised by `l1`; None without the lasso."""
  if l1 is None:
    return None
  layer = lasso_lib.LassoCombination(rows=[EVAL_LASSO_ROW], num_units=num_block3_units, l1=l1,
                                     name="eval_lasso")
  layer.build(None)
  return layer


def check_pretraining_lasso(mode: str, provenance: Dict) -> None:
  """Refuses a lasso mode whose pretraining half contradicts the run the trunk comes from (table 4:
  'both' and 'pretrain' read a lasso run, 'none' and 'eval' a naive one); other sources are not checked."""
  run = provenance.get("model_dir") if provenance.get("source") == "run" else None
  if not run:
    return
  pretrained_with_lasso = checkpoints.load_run_config(run).get("lasso") is not None
  expects_lasso = lasso_lib.lasso_applies(mode, "pretrain")
  if pretrained_with_lasso != expects_lasso:
    with_ = lambda b: "with" if b else "without"  # noqa: E731
    raise ValueError(
        f"--lasso={mode} expects a trunk pretrained {with_(expects_lasso)} the lasso, but run {run} was "
        f"pretrained {with_(pretrained_with_lasso)} it; use --lasso=both or pretrain for a lasso run, none "
        "or eval for a naive one")
