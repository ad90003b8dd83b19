"""Configuration dataclasses: each field carries its default and its help once (`field`), and the one
flag generator (`tf_mtssl.cli`) turns them into absl flags. `from_dict` builds a configuration from
{field: value} with the same conversions as the flags (strings to the field's type), for flagfiles read
by tests, benchmarks and the study.

Field types understood: bool, int, float, str (with optional `choices`), Optional[X] of those, tuples
and lists of int/float/str (comma-separated on the command line), and Dict[str, X] (repeatable
KEY=VALUE flags, e.g. --task_batch_size=rp=56).
"""

import dataclasses
import textwrap
import typing
from typing import Any, Dict, Optional, Sequence, Tuple

_MISSING = dataclasses.MISSING
SCALARS = (bool, int, float, str)


def field(default: Any, help: str, *, choices: Optional[Sequence] = None, flag: Optional[str] = None,
          **metadata) -> Any:  # noqa: A002 - `help` is what argparse and absl call it
  """A dataclass field with its help text (and, optionally, allowed values and a flag name other than
  the field's). Mutable defaults (lists, dicts) are copied per instance."""
  meta = {"help": help, **metadata}
  if choices is not None:
    meta["choices"] = tuple(choices)
  if flag is not None:
    meta["flag"] = flag
  if isinstance(default, (list, dict, set)):
    return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
  return dataclasses.field(default=default, metadata=meta)


def help_of(f: dataclasses.Field) -> str:
  return f.metadata.get("help", f.name.replace("_", " "))


def default_of(f: dataclasses.Field) -> Any:
  if f.default is not _MISSING:
    return f.default
  if f.default_factory is not _MISSING:  # type: ignore[misc]
    return f.default_factory()  # type: ignore[misc]
  return None


def flag_name(f: dataclasses.Field, prefix: str = "") -> str:
  return prefix + f.metadata.get("flag", f.name)


class FieldType(typing.NamedTuple):
  """What a field holds: kind is "scalar", "sequence" or "mapping"; `item` the scalar type."""
  kind: str
  item: type
  optional: bool
  container: type = tuple


def field_type(cls, f: dataclasses.Field) -> FieldType:
  tp = typing.get_type_hints(cls)[f.name]
  optional = False
  if typing.get_origin(tp) is typing.Union:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional, tp = len(args) < len(typing.get_args(tp)), args[0]
  origin = typing.get_origin(tp)
  if origin in (tuple, list):
    args = [a for a in typing.get_args(tp) if a is not Ellipsis]
    item = args[0] if args else str
    return FieldType("sequence", item, optional, tuple if origin is tuple else list)
  if origin is dict:
    return FieldType("mapping", typing.get_args(tp)[1], optional, dict)
  if tp in SCALARS:
    return FieldType("scalar", tp, optional)
  raise TypeError(f"{cls.__name__}.{f.name}: unsupported configuration type {tp}")


def convert_scalar(value: Any, item: type, what: str) -> Any:
  """`value` (a string from a flag or flagfile, or already typed) as `item`; ValueError naming `what`."""
  if isinstance(value, item) and not (item is int and isinstance(value, bool)):
    return value
  if item is bool:
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "t", "y"):
      return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "f", "n"):
      return False
    raise ValueError(f"{what}: expected true or false, got {value!r}")
  try:
    if item is int and isinstance(value, float) and not value.is_integer():
      raise ValueError
    return item(value)
  except (TypeError, ValueError):
    raise ValueError(f"{what}: expected {'an integer' if item is int else 'a number' if item is float else item.__name__}"
                     f", got {value!r}") from None


def convert(cls, f: dataclasses.Field, value: Any, what: Optional[str] = None) -> Any:
  """A value for field `f` of `cls` from a typed value or its command-line text."""
  what = what or f"{cls.__name__}.{f.name}"
  ft = field_type(cls, f)
  if value is None or (ft.optional and value == ""):
    if ft.optional or ft.kind != "scalar":
      return None if ft.optional else ft.container()
    raise ValueError(f"{what}: a value is required")
  if ft.kind == "scalar":
    out = convert_scalar(value, ft.item, what)
    choices = f.metadata.get("choices")
    if choices is not None and out not in choices:
      raise ValueError(f"{what} must be one of {', '.join(map(str, choices))}; got {out!r}")
    return out
  if ft.kind == "sequence":
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [v.strip() if isinstance(v, str) else v for v in items]
    return ft.container(convert_scalar(v, ft.item, what) for v in items if v != "")
  # mapping: {key: value}, or ["KEY=VALUE", ...] from repeatable flags
  if isinstance(value, dict):
    return {k: convert_scalar(v, ft.item, f"{what}[{k}]") for k, v in value.items()}
  out = {}
  for entry in ([value] if isinstance(value, str) else value):
    key, sep, text = entry.partition("=")
    if not sep or not key:
      raise ValueError(f"{what} entries look like KEY=VALUE, got {entry!r}")
    out[key.strip()] = convert_scalar(text.strip(), ft.item, f"{what}={entry}")
  return out


def from_dict(cls, values: Dict[str, Any], **fixed) -> Any:
  """`cls(**values)` with every value converted to its field's type (strings as on the command line);
  unknown keys raise ValueError naming them and the known ones. `fixed` are passed as they are."""
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(f"Unknown setting(s) {unknown} for {cls.__name__}; known: {sorted(fields)}")
  return cls(**{k: convert(cls, fields[k], v) for k, v in values.items()}, **fixed)


def short(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return ",".join(map(str, value)) or "-"
  if isinstance(value, float):
    return f"{value:g}"
  return str(value)


def describe(config, always: Sequence[str] = ()) -> str:
  """'field=value ...' of a configuration: the fields named in `always`, then those that differ from the
  class defaults; 'defaults' when nothing else differs. For start-up lines a person reads (every value
  is in the run's result file)."""
  shown = []
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    if f.name in always or value != default_of(f):
      shown.append(f"{f.name}={short(value)}")
  if len(shown) < len(dataclasses.fields(config)):
    shown.append("(other fields: defaults)" if shown else "defaults")
  return " ".join(shown)


def format_lines(title: str, sections: Sequence[Tuple[str, str]], width: int = 100) -> str:
  """A title line and one wrapped, aligned line per (name, text) section."""
  pad = max(len(name) for name, _ in sections) + 4
  lines = [title]
  for name, text in sections:
    lines += textwrap.wrap(text, width=width, initial_indent=f"  {name + ':':<{pad - 2}}",
                           subsequent_indent=" " * pad, break_on_hyphens=False) or [f"  {name}:"]
  return "\n".join(lines)
