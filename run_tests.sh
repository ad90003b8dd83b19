#!/usr/bin/env bash
# README's second command: set up (venv, pinned requirements, embedded data), the test-only
# requirements, then the whole test suite on both cores (pytest-xdist; three workers on the two cores, as
# many tests wait on the processes they start). Tests are dealt out one by one as workers free up, slow
# ones first, except that the modules whose fixtures build a model keep their tests on one worker
# (tests/conftest.py: ONE_WORKER_MODULES).
# Inner loop: `bash run_tests.sh -m "not slow"`.
source "$(dirname "$0")/scripts/setup.sh"
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-test.txt
exec .venv/bin/python -m pytest -q -n 3 --dist loadscope tests "$@"
