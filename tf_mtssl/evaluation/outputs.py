"""An evaluation's output folder belongs to one trunk source.

`claim_output_dir` records the trunk's provenance (`tf_mtssl.runs.trunk_source`) in `trunk_source.json`
before anything else is written there and refuses a folder made from another source (or holding files of
an unrecorded one), naming both, rather than resuming its checkpoints or mixing its summaries; another
--output_dir is the user's explicit choice, never a silent one. Every evaluation writes its results to
`results.json` (`write_results`) with that provenance, so a result is never credited to a trunk it was
not trained from.
"""

import os
from typing import Dict

from tf_mtssl.core import files
from tf_mtssl.runs.trunk_source import describe_source

RESULTS_FILE = "results.json"
SOURCE_FILE = "trunk_source.json"
# Provenance entries that describe a source without telling two trunks apart.
_DESCRIPTIVE_KEYS = ("architecture_of", "exported_from")


def _identity(provenance: Dict) -> Dict:
  return {k: v for k, v in provenance.items() if k not in _DESCRIPTIVE_KEYS}


def claim_output_dir(output_dir: str, evaluation: str, provenance: Dict) -> bool:
  """Makes `output_dir` the folder of `evaluation` of this trunk; returns True if it already was.

  Writes `trunk_source.json` there first (a new or empty folder). A folder recorded for another
  evaluation or another trunk source, or holding files but no record, is refused (ValueError naming
  both sources) and left untouched.
  """
  path = os.path.join(output_dir, SOURCE_FILE)
  claim = {"evaluation": evaluation, "trunk": provenance}
  if os.path.isfile(path):
    existing = files.read_json(path)
    old_trunk = existing.get("trunk", {})
    if existing.get("evaluation") == evaluation and _identity(old_trunk) == _identity(provenance):
      return True
    raise ValueError(
        f"--output_dir {output_dir} holds the {existing.get('evaluation')} evaluation of "
        f"{describe_source(old_trunk)}; this {evaluation} evaluation is of "
        f"{describe_source(provenance)}. Use another --output_dir (or delete that one); nothing in "
        "it was changed.")
  if os.path.isdir(output_dir) and os.listdir(output_dir):
    raise ValueError(
        f"--output_dir {output_dir} already holds files ({', '.join(sorted(os.listdir(output_dir))[:5])}"
        f"{', ...' if len(os.listdir(output_dir)) > 5 else ''}) but no {SOURCE_FILE} saying which trunk "
        f"they come from; this {evaluation} evaluation is of {describe_source(provenance)}. Use another "
        "--output_dir (or delete that one); nothing in it was changed.")
  files.write_json(path, claim)
  return False


def write_results(output_dir: str, evaluation: str, provenance: Dict, result: Dict) -> str:
  """Writes `results.json` ({"evaluation", "trunk": provenance, **result}); returns its path."""
  path = os.path.join(output_dir, RESULTS_FILE)
  files.write_json(path, {**result, "evaluation": evaluation, "trunk": provenance})
  return path
