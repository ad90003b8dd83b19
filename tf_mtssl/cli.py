"""What the binaries share: their flags, generated from configuration dataclasses by one generator
(`define_flags` / `config_from_flags`; every field's default and help live once, in its dataclass), the
per-task option flags (`--<task>_<option>`, from each task's `Options`), and clean one-line errors
(`run_main`). Only the binaries (the modules at the package root) import this module.
"""

import dataclasses
import sys
from typing import Any, Dict, Iterable, Optional

from absl import flags

from tf_mtssl import tasks as task_registry
from tf_mtssl.core import configs

FLAGS = flags.FLAGS


def define_flags(cls, *, prefix: str = "", exclude: Iterable[str] = (), defaults: Optional[Dict[str, Any]] = None):
  """Defines one absl flag per field of dataclass `cls` (name: `prefix` + the field's flag name), with the
  field's default (or `defaults[field]`) and help. Idempotent: a flag already defined is kept, so several
  binaries' modules can be imported in one process (tests)."""
  exclude, defaults = set(exclude), dict(defaults or {})
  for f in dataclasses.fields(cls):
    name = configs.flag_name(f, prefix)
    if f.name in exclude or name in FLAGS:
      continue
    ft = configs.field_type(cls, f)
    default = defaults.get(f.name, configs.default_of(f))
    help_text = configs.help_of(f)
    choices = f.metadata.get("choices")
    if ft.kind == "mapping":
      flags.DEFINE_multi_string(name, [f"{k}={v}" for k, v in (default or {}).items()],
                                f"{help_text} (repeatable KEY=VALUE)")
    elif ft.kind == "sequence":
      flags.DEFINE_list(name, None if default is None else [str(v) for v in default], help_text)
    elif ft.item is bool:
      flags.DEFINE_boolean(name, default, help_text)
    elif choices is not None and ft.item is str:
      flags.DEFINE_enum(name, default, list(choices), help_text)
    elif ft.item is int:
      flags.DEFINE_integer(name, default, help_text + (f" One of {', '.join(map(str, choices))}." if choices else ""))
    elif ft.item is float:
      flags.DEFINE_float(name, default, help_text)
    else:
      flags.DEFINE_string(name, default, help_text)


def config_from_flags(cls, *, prefix: str = "", exclude: Iterable[str] = (), **fixed):
  """An instance of `cls` from the flags `define_flags` made (converted, validated by the dataclass);
  `fixed` fields are given, not read; fields without a flag (excluded when the flags were defined) keep
  their defaults. A bad value raises ValueError naming its flag."""
  exclude = set(exclude) | set(fixed)
  values = {}
  for f in dataclasses.fields(cls):
    name = configs.flag_name(f, prefix)
    if f.name in exclude or name not in FLAGS:
      continue
    values[f.name] = configs.convert(cls, f, FLAGS[name].value, what=f"--{name}")
  return cls(**values, **fixed)


def define_task_flags():
  """--<task>_<option> for every option of every registered task."""
  for name in task_registry.registered_tasks():
    define_flags(task_registry.task_class(name).Options, prefix=f"{name}_")


def task_options_from_flags(name: str):
  return config_from_flags(task_registry.task_class(name).Options, prefix=f"{name}_")


def read_flagfile(path) -> Dict[str, Any]:
  """{flag: value} of an absl flagfile (comments and blank lines skipped; later lines win; repeated
  KEY=VALUE flags such as --task_data=ms=X collected into a list)."""
  out: Dict[str, Any] = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      if not line.startswith("--"):
        raise ValueError(f"{path}: a flagfile line starts with --, got {line!r}")
      key, _, value = line[2:].partition("=")
      if key in out and "=" in value:
        out[key] = (out[key] if isinstance(out[key], list) else [out[key]]) + [value]
      else:
        out[key] = value
  return out


def run_main(main):
  """`app.run(run_main(main))`: bad input (ValueError, FileNotFoundError, FloatingPointError) ends
  the binary with its one-line message and exit code 2 instead of a traceback."""

  def wrapped(argv):
    try:
      return main(argv)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
      print(f"Error: {e}", file=sys.stderr)
      sys.exit(2)

  return wrapped
