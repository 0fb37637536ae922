"""Choose how the Triton kernels run, before any of them is decorated.

Triton reads ``TRITON_INTERPRET`` when a function is decorated with ``@triton.jit``, so the choice must
be made before ``qlora.kernels`` is imported. ``qlora/__init__.py`` imports this module first, and every
``qlora.*`` import goes through that file, so the rule below holds however the kernels are reached.

Rule:
- ``QLORA_INTERPRET=1`` forces the Triton interpreter (kernels run on CPU tensors, slowly);
- ``QLORA_INTERPRET=0`` forbids it (kernels compile for the GPU; CPU tensors are then rejected);
- otherwise an explicit ``TRITON_INTERPRET`` is respected, and if neither is set the interpreter is used
  exactly when torch sees no CUDA device.
"""

from __future__ import annotations

import os

import torch


def _truthy(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _decide() -> bool:
    forced = os.environ.get("QLORA_INTERPRET")
    if forced is not None and forced.strip() != "":
        return _truthy(forced)
    explicit = os.environ.get("TRITON_INTERPRET")
    if explicit is not None and explicit.strip() != "":
        return _truthy(explicit)
    return not torch.cuda.is_available()


INTERPRET: bool = _decide()
os.environ["TRITON_INTERPRET"] = "1" if INTERPRET else "0"
# Triton 3.9 warns that its default for contracting a*b+c into an FMA will flip. Keep fusion on by default
# (matmul epilogues want it) and state it; kernels whose results SPEC defines by separate roundings (the
# double-quantized scale, the optimizer steps) are launched with enable_fp_fusion=False explicitly.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def interpreter_active() -> bool:
    """True when the kernels run under the Triton interpreter (CPU tensors)."""
    return INTERPRET
