"""Backend facts the launchers need: interpreter or GPU, and the device kernels expect."""

from __future__ import annotations

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
