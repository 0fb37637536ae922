"""Triton kernels of the QLoRA suite, installed as ``qlora.kernels``.

Each module holds one op family, its ``@triton.jit`` kernels next to the launchers that check inputs and
choose launch configs per backend (few, huge programs under the interpreter; tuned tiles on a GPU).
Import through ``qlora`` (``import qlora.kernels``) so the interpreter switch in ``qlora/_runtime.py``
runs before any kernel is decorated.
"""

from ._compat import install_interpreter_fixes
from ._runtime import interpreter_active, kernel_device

install_interpreter_fixes()

__all__ = ["interpreter_active", "kernel_device"]
