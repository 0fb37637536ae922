#!/usr/bin/env bash
# Set up .venv and run the test suite. Extra arguments go to pytest.
# QLORA_HYPOTHESIS_PROFILE=thorough draws ten times as many Hypothesis examples.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
