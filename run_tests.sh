#!/usr/bin/env bash
# README's second command: set up (venv, pinned requirements, embedded data), the test-only
# requirements, then the whole test suite on both cores (pytest-xdist; tests are dealt to the two
# workers as they free up, so no long file leaves one core idle at the end).
# Inner loop: `bash run_tests.sh -m "not slow"`.
source "$(dirname "$0")/scripts/setup.sh"
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-test.txt
exec .venv/bin/python -m pytest -q -n 2 tests "$@"
