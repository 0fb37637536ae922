#!/usr/bin/env bash
# Set up the venv (.venv, or $QLORA_VENV; see scripts/setup.sh) and run the test suite. Extra arguments go to pytest.
# QLORA_HYPOTHESIS_PROFILE=thorough draws ten times as many Hypothesis examples.
# Against Triton 3.6: QLORA_VENV=.venv36 QLORA_TRITON=triton==3.6.0 bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${QLORA_VENV:-.venv}/bin/python" -m pytest "$@"
