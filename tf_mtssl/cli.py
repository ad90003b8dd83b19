"""absl flags shared by the binaries, and the per-task flags generated from each task's Options.

Every field of a registered task's `Options` dataclass becomes `--<task>_<field>` with the field's
default and help, so a new task gets its flags from its own module.
"""

import dataclasses
import typing
from typing import Dict, Optional, Sequence, Tuple

from absl import flags

from tf_mtssl import tasks as task_registry
from tf_mtssl.model import trunk as trunk_lib

LASSO_MODES = ("none", "pretrain", "eval", "both")


def define_trunk_flags():
  if "depth" in flags.FLAGS:  # idempotent: several binaries' modules may be imported in one process
    return
  flags.DEFINE_enum("depth", "101", [str(d) for d in sorted(trunk_lib.UNITS_PER_BLOCK)],
                    "ResNet-v2 depth (units of blocks 1-3 as in the full net; paper_spec 2.1: 101).")
  flags.DEFINE_enum("output_stride", "16", [str(s) for s in trunk_lib.VALID_OUTPUT_STRIDES],
                    "Output stride of block 3 (paper_spec 2.1: 16, by dilation).")
  flags.DEFINE_integer("base_width", 64, "Root/block-1 bottleneck width; 64 is the standard ResNet "
                       "(block 3 has 16x as many channels). Smaller values make tiny test trunks.")


def trunk_config_from_flags() -> dict:
  f = flags.FLAGS
  return trunk_lib.trunk_config(int(f.depth), int(f.output_stride), f.base_width)


def define_progress_flag():
  if "progress_bar" in flags.FLAGS:
    return
  flags.DEFINE_boolean("progress_bar", True, "Show progress bars (step, loss, rate, ETA) on stderr.")


def define_lasso_flags():
  if "lasso" in flags.FLAGS:
    return
  flags.DEFINE_enum("lasso", "none", list(LASSO_MODES),
                    "paper_spec 5 / table 4: none = No Lasso; pretrain = Pre-train Only; eval = Eval "
                    "Only; both = Lasso. Each binary applies the part that concerns it.")
  flags.DEFINE_float("lasso_l1", 1e-3, "L1 weight of the lasso alphas (paper_spec 5: value not recovered).")


def lasso_applies(mode: str, stage: str) -> bool:
  """Whether `--lasso=mode` asks for the lasso at `stage` ('pretrain' or 'eval')."""
  if mode not in LASSO_MODES:
    raise ValueError(f"--lasso must be one of {LASSO_MODES}, got {mode!r}")
  return mode == "both" or mode == stage


def _flag_type(field, hints):
  tp = hints[field.name]
  if typing.get_origin(tp) is typing.Union:  # Optional[X]
    tp = next(a for a in typing.get_args(tp) if a is not type(None))
  return tp


def define_task_option_flags():
  """Defines --<task>_<field> for every registered task (idempotent)."""
  for name in task_registry.registered_tasks():
    options_cls = task_registry.task_class(name).Options
    hints = typing.get_type_hints(options_cls)
    for field in dataclasses.fields(options_cls):
      flag_name = f"{name}_{field.name}"
      if flag_name in flags.FLAGS:
        continue
      default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
      help_text = f"[{name}] " + field.metadata.get("help", field.name)
      tp = _flag_type(field, hints)
      if tp is bool:
        flags.DEFINE_boolean(flag_name, default, help_text)
      elif tp is int:
        flags.DEFINE_integer(flag_name, default, help_text)
      elif tp is float:
        flags.DEFINE_float(flag_name, default, help_text)
      elif tp is str:
        flags.DEFINE_string(flag_name, default, help_text)
      else:
        raise TypeError(f"Task option {options_cls.__name__}.{field.name} has unsupported type {tp}")


def task_options_from_flags(name: str):
  options_cls = task_registry.task_class(name).Options
  values = {f.name: getattr(flags.FLAGS, f"{name}_{f.name}") for f in dataclasses.fields(options_cls)}
  return options_cls(**values)


def parse_task_assignments(entries, flag_name: str, value_type=str) -> Dict[str, object]:
  """['ms=/path/*.tfrecord'] -> {'ms': '/path/*.tfrecord'}; task names validated, values converted."""
  out = {}
  for entry in entries or []:
    if "=" not in entry:
      raise ValueError(f"--{flag_name} entries look like TASK=VALUE, got {entry!r}")
    name, value = entry.split("=", 1)
    task_registry.task_class(name)
    try:
      out[name] = value_type(value)
    except ValueError as e:
      raise ValueError(f"--{flag_name}={entry}: bad value {value!r} ({e})") from e
  return out


def data_for_tasks(names, default: str, overrides: Optional[Dict[str, str]] = None) -> Dict[str, str]:
  overrides = overrides or {}
  return {n: overrides.get(n, default) for n in names}


def run_main(main):
  """`app.run(run_main(main))`: bad input (ValueError, FileNotFoundError, FloatingPointError) ends
  the binary with its one-line message and exit code 2 instead of a traceback."""
  import sys

  def wrapped(argv):
    try:
      return main(argv)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
      print(f"Error: {e}", file=sys.stderr)
      sys.exit(2)

  return wrapped


def task_options_from_dict(name: str, values: Dict[str, object]):
  """Options of task `name` from {field: value} (strings converted by the field's type)."""
  options_cls = task_registry.task_class(name).Options
  hints = typing.get_type_hints(options_cls)
  fields = {f.name: f for f in dataclasses.fields(options_cls)}
  unknown = set(values) - set(fields)
  if unknown:
    raise ValueError(f"Unknown option(s) {sorted(unknown)} for task {name!r}; known: {sorted(fields)}")
  converted = {}
  for key, value in values.items():
    tp = _flag_type(fields[key], hints)
    if isinstance(value, str) and tp is not str:
      value = value.lower() in ("1", "true", "yes") if tp is bool else tp(value)
    converted[key] = value
  return options_cls(**converted)


def _short(value) -> str:
  if isinstance(value, (tuple, list)):
    return ",".join(_short(v) for v in value) or "()"
  if isinstance(value, float):
    return f"{value:g}"
  return str(value)


def describe_config(config, always: Sequence[str] = ()) -> str:
  """'field=value ...' of a config dataclass: the fields named in `always`, then those that differ
  from the class defaults; 'defaults' when nothing else differs. For start-up lines a person reads
  (every value is in the run's result file)."""
  shown = []
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    default = field.default if field.default is not dataclasses.MISSING else (
        field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
    if field.name in always or value != default:
      shown.append(f"{field.name}={_short(value)}")
  hidden = len(dataclasses.fields(config)) - len(shown)
  if hidden:
    shown.append("(other fields: defaults)" if shown else "defaults")
  return " ".join(shown)


def format_lines(title: str, sections: Sequence[Tuple[str, str]], width: int = 100) -> str:
  """A title line and one wrapped, aligned line per (name, text) section."""
  import textwrap
  pad = max(len(name) for name, _ in sections) + 4
  lines = [title]
  for name, text in sections:
    lines += textwrap.wrap(text, width=width, initial_indent=f"  {name + ':':<{pad - 2}}",
                           subsequent_indent=" " * pad, break_on_hyphens=False) or [f"  {name}:"]
  return "\n".join(lines)


def parse_step_range(values, flag_name: str):
  """['A', 'B'] -> (A, B); [] -> None."""
  if not values:
    return None
  try:
    first, last = (int(v) for v in values)
  except ValueError as e:
    raise ValueError(f"--{flag_name} takes FIRST,LAST step numbers, got {','.join(values)!r}") from e
  return first, last
