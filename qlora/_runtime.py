"""Choose how the Triton kernels run, once, before any of them is decorated, whatever was imported before.

``QLORA_INTERPRET=1`` forces the Triton interpreter, ``QLORA_INTERPRET=0`` forbids it; otherwise an explicit
``TRITON_INTERPRET`` is respected, and with neither the interpreter runs exactly when torch sees no CUDA device.
The choice is set through ``triton.knobs.runtime.interpret`` before ``qlora.kernels`` is imported, and
:func:`_retarget_triton_library` re-decorates Triton's own ``@jit`` library functions (``tl.max``, ``tl.rand``,
...) when ``triton`` was imported first under the other setting (by torch._inductor, bitsandbytes, PEFT, ...).
``interpreter_active()`` returns the decision; nothing re-reads the environment afterwards. Why and how:
docs/DESIGN.md, "Interpreter or GPU".
"""

from __future__ import annotations

import os
import sys

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


def _jit_kwargs(function) -> dict:
    """The keyword arguments ``function`` (a JITFunction or InterpretedFunction) was decorated with."""
    kwargs = getattr(function, "kwargs", None)  # InterpretedFunction keeps the decorator's keywords as they were
    if isinstance(kwargs, dict):
        return dict(kwargs)
    # A JITFunction stores them as attributes; only the interpreter receives these, and it ignores their values.
    names = ("version", "do_not_specialize", "do_not_specialize_on_alignment", "debug", "noinline", "repr",
             "launch_metadata")
    return {name: getattr(function, name) for name in names if hasattr(function, name)}


def _cell_is_set(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty closure cell
        return False
    return True


def _forwarder(function):
    """A plain function calling ``function``: what ``tl.tensor`` holds as the method of an InterpretedFunction."""

    def method(*args, **kwargs):
        return function(*args, **kwargs)

    method.__name__ = getattr(function, "__name__", "method")
    method.__doc__ = f"Forwards to :py:func:`{method.__name__}` free function"
    return method


def _retarget_triton_library(interpret: bool) -> int:
    """Re-decorate Triton's own ``@jit`` library functions that were decorated under the other interpreter setting
    (see the module docstring); returns how many functions were replaced (0 when Triton was imported after the
    switch was set, the usual case)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITCallable, JITFunction, jit

    wrong = JITFunction if interpret else InterpretedFunction
    modules = [m for name, m in list(sys.modules.items())
               if m is not None and (name == "triton.language" or name.startswith("triton.language."))]
    import triton.language as tl

    holders = [vars(m) for m in modules]
    replaced: dict[int, object] = {}
    for namespace in holders:
        for value in list(namespace.values()):
            if type(value) is wrong and id(value) not in replaced:
                module = getattr(value.fn, "__module__", "") or ""
                if module == "triton" or module.startswith("triton."):  # never a user's kernel
                    replaced[id(value)] = jit(value.fn, **_jit_kwargs(value))
    if not replaced:
        return 0
    for namespace in holders:
        for key, value in list(namespace.items()):
            if id(value) in replaced:
                namespace[key] = replaced[id(value)]
    # ``@core._tensor_member_fn`` makes a library function a method of ``tl.tensor`` (``x.sum()``): the JITFunction
    # itself, or for an InterpretedFunction (not a descriptor) a plain function that forwards to it. Do as it does.
    for key, value in list(vars(tl.core.tensor).items()):
        cells = getattr(value, "__closure__", None) or ()
        held = [value] + [c.cell_contents for c in cells if _cell_is_set(c)]
        old = next((h for h in held if id(h) in replaced), None)
        if old is not None:
            new = replaced[id(old)]
            setattr(tl.core.tensor, key, new if isinstance(new, JITCallable) else _forwarder(new))
    return len(replaced)


def _apply(interpret: bool) -> None:
    """Make Triton run (and decorate) under ``interpret`` from now on, in this process."""
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    # Triton 3.9 warns that its default for contracting a*b+c into an FMA will flip. Keep fusion on by default
    # (matmul epilogues want it) and state it; kernels whose results SPEC defines by separate roundings (the
    # double-quantized scale, the optimizer steps) are launched with enable_fp_fusion=False explicitly.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton import knobs

    # Through Triton's API: a value set there in Python (by a framework imported earlier) outranks the environment.
    knobs.runtime.interpret = interpret
    _retarget_triton_library(interpret)
    del triton


INTERPRET: bool = _decide()
_apply(INTERPRET)


def interpreter_active() -> bool:
    """True when the kernels run under the Triton interpreter (CPU tensors); decided once, at import."""
    return INTERPRET


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_")


def keep_freed_memory_for_the_interpreter() -> bool:
    """Under the interpreter on Linux with glibc: have ``malloc`` keep freed memory in the process (mmap threshold
    32 MiB, trim threshold 256 MiB, top pad 64 MiB) instead of returning it to the kernel after every large free.
    True if applied.

    The interpreter evaluates each tile operation with NumPy, whose megabyte-sized temporaries glibc otherwise
    unmaps or trims on free and page-faults in again on the next operation: an interpreted ``QLoRALinear``
    forward + backward at the demo's shapes took ~5400 page faults and ~9 ms of system time out of ~50 ms
    (perf/README.md, "Interpreter speed of the layer"). This is a process setting, so the library never applies it
    on import: the ``qlora`` command calls it for its own process, and a user's script may. Not applied when any
    ``MALLOC_*`` variable above is set (the user's choice stands) or on a GPU."""
    if not interpreter_active() or not sys.platform.startswith("linux") or any(v in os.environ for v in _MALLOC_ENV):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 256 << 20), (_M_TOP_PAD, 64 << 20)))
