"""The package's layers point one way (BUILD.md): a module imports only from lower layers or its own.

  core < data < model < {tasks, runs} < {pretraining, evaluation} < serving < studies < binaries

Layers of equal rank (tasks and runs; pretraining and evaluation) do not import each other. The
binaries are the modules at the package root (and `cli`, their shared flag generator); nothing below
them imports them. Read from the source (ast), so lazy imports inside functions count too.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "tf_mtssl"
RANKS = {"core": 0, "data": 1, "model": 2, "tasks": 3, "runs": 3, "pretraining": 4, "evaluation": 4,
         "serving": 5, "studies": 6}
BINARIES = 7


def layer_of(module: str) -> str:
  """'tf_mtssl.model.trunk' -> 'model'; a module at the package root -> 'binaries'."""
  parts = module.split(".")
  return parts[1] if len(parts) > 2 or parts[1] in RANKS else "binaries"


def rank(layer: str) -> int:
  return RANKS.get(layer, BINARIES)


def module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(PACKAGE.parent).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def imported_modules(path: pathlib.Path):
  tree = ast.parse(path.read_text(), str(path))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("tf_mtssl."):
          yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tf_mtssl"):
      if node.module == "tf_mtssl":  # from tf_mtssl import X: X is a layer package or a binary
        for alias in node.names:
          if not alias.name.startswith("__"):  # __version__ and the like: the package itself
            yield node.lineno, f"tf_mtssl.{alias.name}"
      else:
        yield node.lineno, node.module


SOURCES = sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_module_belongs_to_a_known_layer():
  unknown = {module_name(p) for p in SOURCES if p.parent != PACKAGE and p.relative_to(PACKAGE).parts[0] not in RANKS}
  assert not unknown, f"modules outside the layers {sorted(RANKS)}: {sorted(unknown)}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_point_down(path):
  own = layer_of(module_name(path)) if path.parent != PACKAGE else "binaries"
  bad = []
  for line, target in imported_modules(path):
    if target == "tf_mtssl":
      continue
    theirs = layer_of(target)
    if theirs == own:
      continue
    if rank(theirs) >= rank(own):
      bad.append(f"line {line}: {target} ({theirs}, rank {rank(theirs)}) from {own} (rank {rank(own)})")
  assert not bad, "\n".join(bad)
