# Sourced by main_job.sh and run_tests.sh: a Python 3.11 virtual environment with the pinned
# requirements in .venv, and the embedded default data prepared (idempotent; fast when done).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON_BIN="${PYTHON_BIN:-python3.11}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON_BIN" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/python -m tf_mtssl.prepare_embedded
