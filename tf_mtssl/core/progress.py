"""The progress bars every training and evaluation loop shows (tqdm: count, rate, ETA, loss).

One look for every binary: `bar(total)` per loop; the loop calls `update(1)` per step and sets the
loss as the postfix when it has it on the host (at its log steps), so the bar never forces a device
sync of its own.
"""

from typing import Optional

from tqdm import tqdm


def bar(total: Optional[int] = None, initial: int = 0, enabled: bool = True, unit: str = "step",
        desc: Optional[str] = None, leave: bool = True) -> tqdm:
  """A tqdm bar on stderr; `enabled=False` gives a silent one (same methods)."""
  return tqdm(total=total, initial=initial, disable=not enabled, unit=unit, desc=desc, leave=leave,
              dynamic_ncols=True)
