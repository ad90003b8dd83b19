#!/usr/bin/env bash
# README's second command: set up (venv, pinned requirements, embedded data), then the whole test suite.
source "$(dirname "$0")/scripts/setup.sh"
exec .venv/bin/python -m pytest -q tests "$@"
