"""Registry of self-supervised tasks: name -> "module:Class" (imported on first use)."""

import importlib
from typing import Any, Dict, List, Mapping

from tf_mtssl.core import configs
from tf_mtssl.tasks.base import Task

# One line per task. Adding a task: write its module and add its line here.
_REGISTRY: Dict[str, str] = {
    "rp": "tf_mtssl.tasks.relative_position:RelativePositionTask",
    "ex": "tf_mtssl.tasks.exemplar.task:ExemplarTask",
    "col": "tf_mtssl.tasks.colorization.task:ColorizationTask",
    "ms": "tf_mtssl.tasks.motion_segmentation:MotionSegmentationTask",
}


def registered_tasks() -> List[str]:
  return list(_REGISTRY)


def task_class(name: str) -> type:
  """Returns the Task subclass registered as `name`, or raises listing the registered names."""
  if name not in _REGISTRY:
    raise ValueError(f"Unknown task {name!r}; registered tasks: {', '.join(registered_tasks())}")
  module_name, class_name = _REGISTRY[name].split(":")
  cls = getattr(importlib.import_module(module_name), class_name)
  assert issubclass(cls, Task) and cls.name == name, _REGISTRY[name]
  return cls


def parse_task_list(spec: str) -> List[str]:
  """'rp,col' -> ['rp', 'col'], validated (no duplicates, all registered, at least one); 'all' -> every
  registered task."""
  if spec.strip() == "all":
    return registered_tasks()
  names = [n.strip() for n in spec.split(",") if n.strip()]
  if not names:
    raise ValueError(f"No task given; registered tasks: {', '.join(registered_tasks())}")
  for n in names:
    task_class(n)
  if len(set(names)) != len(names):
    raise ValueError(f"Duplicate task in {spec!r}")
  return names


def make_task(name: str, **kwargs) -> Task:
  return task_class(name)(**kwargs)


def options_from_settings(name: str, settings: Mapping[str, Any]):
  """The `Options` of task `name` from flag-style settings (a flagfile's {flag: value}: the keys
  `<name>_<option>` are read, converted as on the command line; every other key is ignored)."""
  prefix = f"{name}_"
  cls = task_class(name).Options
  return configs.from_dict(cls, {k[len(prefix):]: v for k, v in settings.items() if k.startswith(prefix)})
