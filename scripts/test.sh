#!/usr/bin/env bash
# README command 2 (and .ci/run): set up with the test extras, then run the test suite on CPU
# with 8 fake devices (tests/conftest.py sets XLA_FLAGS before jax is imported).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev,parity,sd
.venv/bin/python -m pytest -q "$@"
