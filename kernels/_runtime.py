"""Backend facts the launchers need: interpreter or GPU, and the device kernels expect."""

from __future__ import annotations

import contextlib

import torch
from triton import knobs as _knobs

# Read once, when this package is imported: ``qlora/_runtime.py`` has set Triton's switch by then (and made Triton's
# own library functions agree with it), and every @triton.jit below was decorated under this value. The launchers ask
# on every call, so this must not parse the environment each time.
_INTERPRET: bool = bool(_knobs.runtime.interpret)


def interpreter_active() -> bool:
    """True when ``@triton.jit`` functions run under the Triton interpreter (on CPU tensors).

    The value of Triton's switch (``triton.knobs.runtime.interpret``) when this package was imported, which
    ``qlora`` sets before (see ``qlora/_runtime.py``).
    """
    return _INTERPRET


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
