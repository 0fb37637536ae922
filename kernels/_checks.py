"""Argument checks shared by the launchers. Each error names the argument it is about."""

from __future__ import annotations

from typing import Iterable

import torch

from ._runtime import interpreter_active

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Decided once: Triton read TRITON_INTERPRET when the kernels were decorated (qlora/_runtime.py sets it before
# this package is imported), so the backend cannot change afterwards; these checks run on every launch.
_INTERPRET = interpreter_active()
_BACKEND_DEVICE_TYPE = "cpu" if _INTERPRET else "cuda"
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def check_tensor(name: str, t, dtypes: Iterable[torch.dtype] | None = None, ndim: int | None = None) -> None:
    """Reject a non-tensor, a wrong dtype, a wrong rank, or a device the active backend cannot run on."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        if not isinstance(dtypes, tuple):
            dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {tuple(t.shape)}")
    check_backend_device(name, t)


def check_backend_device(name: str, t: torch.Tensor) -> None:
    if t.device.type == _BACKEND_DEVICE_TYPE:
        return
    if _INTERPRET:
        if t.device.type != "cpu":
            raise ValueError(
                f"{name} is on {t.device}, but the kernels run under the Triton interpreter, which needs CPU "
                "tensors (set QLORA_INTERPRET=0 before importing qlora to compile for the GPU)"
            )
    elif t.device.type != "cuda":
        raise ValueError(
            f"{name} is on {t.device}, but the kernels are compiled for CUDA; move it to a CUDA device "
            "(or set QLORA_INTERPRET=1 before importing qlora to run on CPU tensors)"
        )


def check_same_device(**tensors: torch.Tensor) -> None:
    """All named tensors on one device; the message lists each one's device."""
    first = None
    for t in tensors.values():
        if t is None:
            continue
        if first is None:
            first = t.device
        elif t.device != first:
            break
    else:
        return
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"tensors must be on one device, got {listing}")


def check_blocksize(blocksize, name: str = "blocksize", allowed: Iterable[int] = BLOCKSIZES) -> int:
    allowed = tuple(allowed)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {blocksize!r}")
    return blocksize


def check_finite(name: str, t: torch.Tensor) -> None:
    """Reject NaN/Inf before any kernel runs (one reduction, one host sync: inputs, not a hot loop)."""
    if t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or Inf); quantization needs finite input")
