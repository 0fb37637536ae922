"""Backend facts the launchers need: interpreter or GPU, and the device kernels expect."""

from __future__ import annotations

import contextlib
import dataclasses

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


def _interpreter_builder():
    """Triton's interpreter builder when it carries the options :func:`lean_under_interpreter` relies on (a
    dataclass with ``debug`` and ``sanitize_overflow``, as in Triton 3.6 to 3.9), else None."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - every supported Triton has it
        return None
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if not dataclasses.is_dataclass(options) or not all(
            hasattr(options, name) for name in ("debug", "sanitize_overflow")):
        return None
    return builder


def _fast_numpy_paths(builder) -> dict:
    """The interpreter builder's NumPy operations that :func:`lean_under_interpreter` replaces for a launch, as
    ``{method name: replacement}``; each computes exactly what the builder's own method computes (the element
    values, dtype and shape of its result), faster, and calls the builder's own method outside its fast case.

    - ``create_gather`` on a 1-D source: ``np.take`` instead of ``np.take_along_axis`` (the same elements; a 2^20
      uint8 index into a 256-entry table 2.1 -> 1.0 ms); along axis 0 of a 2-D source with an index broadcast
      along axis 1 (each index row one value, the NF4 word decode's byte pairs): ``np.take`` of whole rows
      (2^19 bytes into a (256, 2) table 7.7 -> 0.5 ms);
    - ``create_and`` of two booleans (masks): ``np.bitwise_and`` of the booleans. Triton 3.9's binary operation
      computes boolean operands in int8 and truncates to one bit (right for ``+`` and ``-``, which wrap; ``&`` of
      bits is the same either way), five full-size passes where one suffices: 0.3-0.7 ms for a (128, 2048) mask;
    - ``create_masked_load`` / ``create_masked_store``: the builder's C++ loop spends about 8 ns an element (0.5 ms
      for a (128, 512) float32 tile); here the unmasked pointers' span is viewed as one NumPy array and read with
      ``np.take`` / written by index (0.1-0.2 ms), when every unmasked pointer lies a whole number of elements from
      the lowest (else, and for boolean elements or an all-masked tile, the builder's own loop). Only unmasked
      addresses are read or written, as the loop does: a masked pointer's element index is replaced by 0, the
      lowest unmasked address;
    - ``create_dot``: the accumulator added into the product's own buffer (``np.add(..., out=)``) instead of into a
      third array: the same sums, one full-size allocation less (8-bit float operands, or an accumulator not of the
      product's shape: the builder's own method).

    Empty where the builder lacks one of these methods or the handle type (a Triton whose interpreter differs)."""
    try:
        import numpy as np
        from triton.runtime.interpreter import TensorHandle
        from triton.runtime.interpreter import _get_np_dtype as _np_dtype
    except ImportError:  # pragma: no cover - every supported Triton has them
        return {}
    import ctypes

    own_gather = getattr(builder, "create_gather", None)
    own_and = getattr(builder, "create_and", None)
    own_load = getattr(builder, "create_masked_load", None)
    own_store = getattr(builder, "create_masked_store", None)
    own_dot = getattr(builder, "create_dot", None)
    if None in (own_gather, own_and, own_load, own_store, own_dot):
        return {}
    no_address = np.iinfo(np.int64).max

    def span(ptrs, mask, dtype):
        """``(NumPy array over the unmasked pointers' span, element index of each pointer in it)`` for a
        ``dtype`` access through ``ptrs`` (uint64 addresses) where ``mask``, or None where this path does not
        apply. A masked pointer's index is 0."""
        if (ptrs.dtype != np.uint64 or mask.dtype != np.bool_ or dtype == np.bool_ or ptrs.shape != mask.shape
                or dtype.itemsize & (dtype.itemsize - 1)):
            return None
        addresses = ptrs.view(np.int64)  # user-space addresses are below 2^63
        # (np.min's where= argument is 3x slower than this where-then-min.)
        lowest = int(np.where(mask, addresses, no_address).min())
        if lowest == no_address:  # nothing unmasked: the builder's loop returns ``other`` as it is
            return None
        offsets = np.where(mask, addresses, lowest)
        offsets -= lowest
        highest = lowest + int(offsets.max())
        if int(np.bitwise_or.reduce(offsets, axis=None)) & (dtype.itemsize - 1):
            return None  # an address between two elements of the span: the builder's loop reads it as it lies
        memory = (ctypes.c_char * (highest - lowest + dtype.itemsize)).from_address(lowest)
        return np.frombuffer(memory, dtype=dtype), offsets >> (dtype.itemsize.bit_length() - 1)

    def create_masked_load(ptrs, mask, other, *options):
        dtype = np.dtype(_np_dtype(ptrs.get_element_ty()))  # as the builder's own method types the result
        found = None if other is not None and other.data.dtype != dtype else span(ptrs.data, mask.data, dtype)
        if found is None:
            return own_load(ptrs, mask, other, *options)
        memory, index = found
        values = np.take(memory, index)
        return TensorHandle(np.where(mask.data, values, dtype.type(0) if other is None else other.data),
                            ptrs.get_element_ty())

    def create_masked_store(ptrs, value, mask, *options):
        found = None if value.data.shape != mask.data.shape else span(ptrs.data, mask.data, value.data.dtype)
        if found is None:
            return own_store(ptrs, value, mask, *options)
        memory, index = found
        memory[index[mask.data]] = value.data[mask.data]

    def create_dot(a, b, d, *options):
        if (any(x.dtype.primitive_bitwidth == 8 and x.dtype.is_floating() for x in (a, b))
                or d.data.shape != a.data.shape[:-1] + b.data.shape[-1:]):
            return own_dot(a, b, d, *options)
        product = np.matmul(a.data, b.data, dtype=d.data.dtype)
        np.add(product, d.data, out=product)
        return TensorHandle(product, d.dtype.scalar)

    def create_gather(src, indices, axis):
        if src.data.ndim == 1:
            return TensorHandle(np.take(src.data, indices.data), src.dtype.scalar)
        index = indices.data
        row_bytes = src.data.shape[-1] * src.data.itemsize
        if (src.data.ndim == 2 and axis == 0 and index.shape[1] == src.data.shape[1] and index.strides[1] == 0
                and src.data.flags.c_contiguous and row_bytes in (1, 2, 4, 8)):
            # Every row of the index repeats one value (a broadcast view): whole rows of the source, each taken as
            # one unsigned integer (NumPy's take of rows along axis 0 is 3x slower on a uint8 index).
            rows = np.take(src.data.view(f"u{row_bytes}").reshape(-1), index[:, 0])
            return TensorHandle(rows.view(src.data.dtype).reshape(index.shape), src.dtype.scalar)
        return own_gather(src, indices, axis)

    def create_and(lhs, rhs):
        if lhs.data.dtype == np.bool_ and rhs.data.dtype == np.bool_:
            return TensorHandle(np.bitwise_and(lhs.data, rhs.data), lhs.dtype.scalar)
        return own_and(lhs, rhs)

    return {"create_gather": create_gather, "create_and": create_and, "create_masked_load": create_masked_load,
            "create_masked_store": create_masked_store, "create_dot": create_dot}


def lean_under_interpreter(kernel):
    """``kernel`` (a ``@triton.jit`` function), launched under the interpreter without Triton's int32 overflow
    sanitizer when the interpreter's ``options.debug`` is off, and with the NumPy fast paths of
    :func:`_fast_numpy_paths`. Results are those of the plain launch, bit for bit.

    The interpreter's semantic layer follows every int32 (or narrower) add, sub and mul with an int64
    recomputation, two range comparisons and a ``device_assert`` of the result, and that assert is dropped unless
    ``options.debug`` is set (it is not by default, and nothing in Triton sets it): the check is computed and
    thrown away. It was 28% of the interpreter builder calls of a ``QLoRALinear`` forward and backward (1466 ->
    1004) and 1.4 / 2.4 ms of their 6.8 / 9.3 ms at a tiny shape (perf/README.md, "Interpreter speed of the
    layer"). The options and the builder's methods are swapped for the launch only and restored after it, so
    other kernels and a user who turns ``debug`` on keep the check, and a method someone else already replaced on
    the builder is left alone; not thread-safe, as the interpreter itself (one global builder). On a GPU, and for
    a Triton whose interpreter lacks these options, ``kernel`` is returned unchanged."""
    builder = _interpreter_builder() if _INTERPRET else None
    if builder is None:
        return kernel
    unchecked = {}  # the options object in use -> its copy without the sanitizer
    fast_paths = _fast_numpy_paths(builder)

    def run(*args, **kwargs):
        # Looked up on the class at each launch, so tools that wrap InterpretedFunction.run still see the launch.
        return type(kernel).run(kernel, *args, **kwargs)

    def run_lean(*args, **kwargs):
        options = builder.options
        if not options.debug and options.sanitize_overflow:
            key = id(options)
            if key not in unchecked:
                unchecked.clear()
                unchecked[key] = (options, dataclasses.replace(options, sanitize_overflow=False))
            builder.options = unchecked[key][1]
        installed = [name for name in fast_paths if name not in vars(builder)]
        for name in installed:
            setattr(builder, name, fast_paths[name])
        try:
            return run(*args, **kwargs)
        finally:
            builder.options = options
            for name in installed:
                delattr(builder, name)

    kernel.run = run_lean
    return kernel
