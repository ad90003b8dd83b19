"""Every binary silences TensorFlow's start-up noise before TensorFlow is imported (tf_mtssl.core.quiet)."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

from tests import helpers

NOISE = ("cuInit", "cudart_stub", "absl::InitializeLog", "cpu_feature_guard", "oneDNN")
QUIET_IMPORT = "tf_mtssl.core.quiet"
# Binaries that need no first import: prepare_embedded imports TensorFlow only inside the steps that
# use it (after tf_mtssl.core.quiet, see Step.resolve); colorization_prior's package imports TF first.
NOT_FIRST = {"tf_mtssl/data/prepare.py", "tf_mtssl/tasks/colorization/prior.py"}


def _binaries():
  root = helpers.REPO_ROOT
  for path in sorted([*root.glob("tf_mtssl/**/*.py"), *root.glob("export/*.py"), *root.glob("bench/*.py")]):
    rel = path.relative_to(root).as_posix()
    if 'if __name__ == "__main__"' in path.read_text() and rel not in NOT_FIRST:
      yield rel


def _first_project_import(path: pathlib.Path) -> str:
  """The first top-level import of a module that is not of the standard library (e.g. TF, absl)."""
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names = [f"{node.module}.{a.name}" for a in node.names]
    else:
      continue
    project = [n for n in names if n.split(".")[0] not in sys.stdlib_module_names]
    if project:
      return project[0]
  return ""


@pytest.mark.parametrize("rel", list(_binaries()))
def test_every_binary_imports_the_quiet_helper_before_tensorflow(rel):
  first = _first_project_import(helpers.REPO_ROOT / rel)
  if rel.startswith("bench/") and first.startswith("bench.common"):
    first = _first_project_import(helpers.REPO_ROOT / "bench/common.py")  # benchmarks: via bench.common
  assert first == QUIET_IMPORT, f"{rel}: the first non-stdlib import is {first}"


def _run_binary(env):
  return subprocess.run([sys.executable, "-m", "tf_mtssl.import_checkpoint", "--slim_checkpoint=/nonexistent/x",
                         "--model_dir=/nonexistent/run"], cwd=helpers.REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_a_binary_prints_only_its_own_error_line_unless_the_user_sets_the_log_level():
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  quiet = _run_binary(env)
  assert quiet.returncode == 2
  assert quiet.stderr.strip().splitlines() == [
      "Error: --slim_checkpoint=/nonexistent/x: no TF checkpoint there (expected PREFIX.index and "
      "PREFIX.data-*, a V1 checkpoint file, or a directory with a `checkpoint` file)"], quiet.stderr
  loud = _run_binary({**env, "TF_CPP_MIN_LOG_LEVEL": "0"})   # the user's choice is kept
  assert loud.returncode == 2 and any(n in loud.stderr for n in NOISE), loud.stderr
