"""Shared benchmark helpers: timing of compiled steps and the result-row format of `python -m bench`."""

import dataclasses
import os
import time
from typing import Callable, List, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@dataclasses.dataclass
class Row:
  """One line of the bench table: this project's figure against a reference, with a goal."""
  name: str
  figure: float
  unit: str
  reference: Optional[float] = None      # the reference's figure (same unit), if any
  ratio: Optional[float] = None          # figure / reference (or the defined ratio)
  goal: str = ""                         # e.g. ">= 1.0" on the ratio
  note: str = ""

  @property
  def met(self) -> Optional[bool]:
    if not self.goal or self.ratio is None:
      return None
    op, value = self.goal.split()
    value = float(value)
    return {">=": self.ratio >= value, "<=": self.ratio <= value, "<": self.ratio < value,
            ">": self.ratio > value}[op]

  def as_dict(self):
    return {**dataclasses.asdict(self), "met": self.met}


def time_calls(fn: Callable[[], object], warmup: int, repeats: int) -> float:
  """Seconds per call of `fn` (its result fetched to host), warm-up calls excluded."""
  for _ in range(warmup):
    _fetch(fn())
  start = time.perf_counter()
  for _ in range(repeats):
    _fetch(fn())
  return (time.perf_counter() - start) / repeats


def _fetch(result):
  import tensorflow as tf
  for t in tf.nest.flatten(result):
    if hasattr(t, "numpy"):
      t.numpy()


def format_table(rows: List[Row]) -> str:
  header = f"{'benchmark':44s} {'figure':>12s} {'reference':>12s} {'ratio':>7s} {'goal':>8s}  result"
  lines = [header, "-" * len(header)]
  for r in rows:
    ref = f"{r.reference:12.4g}" if r.reference is not None else f"{'-':>12s}"
    ratio = f"{r.ratio:7.3f}" if r.ratio is not None else f"{'-':>7s}"
    verdict = {True: "pass", False: "MISS", None: "-"}[r.met]
    lines.append(f"{r.name[:44]:44s} {r.figure:12.4g} {ref} {ratio} {r.goal:>8s}  {verdict}  [{r.unit}]"
                 + (f"  {r.note}" if r.note else ""))
  return "\n".join(lines)
