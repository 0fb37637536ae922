"""Backend facts the launchers need: interpreter or GPU, and the device kernels expect."""

from __future__ import annotations

import contextlib
import os

import torch


def interpreter_active() -> bool:
    """True when ``@triton.jit`` functions run under the Triton interpreter (on CPU tensors).

    ``qlora`` sets ``TRITON_INTERPRET`` before this package is imported (see ``qlora/_runtime.py``).
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in {"1", "true", "yes", "on"}


def kernel_device() -> torch.device:
    """The device kernel inputs must live on: CPU under the interpreter, else the current CUDA device."""
    return torch.device("cpu") if interpreter_active() else torch.device("cuda", torch.cuda.current_device())


def ieee_semantics():
    """Context for a kernel launch whose IEEE special values are intended (``1/0 -> inf``, ``inf*0 -> NaN``).

    The interpreter evaluates kernels with NumPy, which warns on such operations, e.g. in masked-off lanes
    or in blocks whose scale is zero; a GPU computes the same values silently. The warnings are noise, so
    they are switched off around interpreted launches and nothing changes on a GPU.
    """
    if interpreter_active():
        import numpy as np

        return np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore")
    return contextlib.nullcontext()
