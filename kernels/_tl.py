"""Device helpers shared by the matmul-shaped kernels (``linear.py``, ``lora.py``).

``INTERPRETER`` is a module-level ``tl.constexpr``: True when kernels run under the Triton interpreter (decided
once, when this module is imported; ``qlora`` sets ``TRITON_INTERPRET`` before importing the kernels). Kernels
read it instead of threading an ``UPCAST`` parameter through every signature. Under the interpreter ``tl.dot``
on bf16 is wrong and the float32 -> bf16 cast truncates, so :func:`dot` widens its (exactly representable)
operands to float32 first and :func:`round_to` rounds bf16 on the bits: the products are exact and the sums are
float32, which is what the GPU's tensor cores compute.

Dropout keep masks are bit-packed: int32 word ``w`` of row ``m`` holds the keep bits of columns ``32 w .. 32 w +
31`` (bit j = column 32 w + j). See :mod:`.lora` for how they are generated.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._runtime import interpreter_active

INTERPRETER = tl.constexpr(interpreter_active())


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """float32 ``x`` rounded to ``dtype`` (nearest-even, NaN stays NaN). Under the interpreter bf16 is rounded on
    the bits (its own cast truncates); a GPU's ``cvt.rn`` is used otherwise."""
    if INTERPRETER and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        # A NaN must not carry into the exponent (or truncate to inf): force its quiet bit and cut.
        bits = tl.where(x != x, bits | 0x400000, rounded)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def dot(a, b, acc):
    """``acc + a @ b`` with float32 accumulation; float32 operands multiply in IEEE float32 (no TF32)."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    elif INTERPRETER:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def load_2d(ptr, row_offs, col_offs, mask, other):
    """Interpreter only: ``tl.load(ptr + row_offs[:, None] + col_offs[None, :], mask=mask, other=other)``, the
    (len(row_offs), len(col_offs)) tile whose elements lie ``row_offs[i] + col_offs[j]`` elements past ``ptr``.

    The load runs on a 1-D view: the interpreter's load and store walk a 1-D array 35-45% faster per element than a
    2-D one. The pointers are formed as ``(ptr + col_offs)[None, :] + row_offs[:, None]``: the one full-size
    pointer add then widens the broadcast row offsets into a row-major array, whose 1-D view is free (``(ptr +
    row_offs)[:, None] + ...`` comes out of NumPy column-major, which the view would copy; summing the offsets
    first costs a full-size integer add and a full-size splat of ``ptr``): a (128, 2048) float32 load at 4.0 ms
    against 8.1 ms with int32 offsets, 4.9 against 6.1 with int64 (perf/README.md, "Interpreter speed of the
    layer"). GPU builds keep their own expressions (callers branch on ``INTERPRETER``): the form of a pointer
    expression moves the SASS."""
    ptrs = (ptr + col_offs)[None, :] + row_offs[:, None]
    return tl.reshape(tl.load(tl.reshape(ptrs, (ptrs.numel,)), mask=tl.reshape(mask, (ptrs.numel,)), other=other),
                      ptrs.shape)


@triton.jit
def store_2d(ptr, row_offs, col_offs, value, mask):
    """Interpreter only: ``tl.store(ptr + row_offs[:, None] + col_offs[None, :], value, mask=mask)`` on 1-D views,
    as :func:`load_2d`."""
    ptrs = (ptr + col_offs)[None, :] + row_offs[:, None]
    tl.store(tl.reshape(ptrs, (ptrs.numel,)), tl.reshape(value, (ptrs.numel,)), mask=tl.reshape(mask, (ptrs.numel,)))


@triton.jit
def load_tile(ptr, rows, cols, stride_r, stride_c, mask_r, mask_c, L2_ONLY: tl.constexpr = False):
    """The (len(rows), len(cols)) tile at ``ptr + rows * stride_r + cols * stride_c``, zero where masked off.
    ``L2_ONLY``: on a GPU loaded through L2 only (``.cg``), for values other programs of the same launch wrote:
    never a stale L1 line."""
    if INTERPRETER:
        return load_2d(ptr, rows * stride_r, cols * stride_c, mask_r[:, None] & mask_c[None, :], 0.0)
    elif L2_ONLY:
        return tl.load(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c,
                       mask=mask_r[:, None] & mask_c[None, :], other=0.0, cache_modifier=".cg")
    else:
        return tl.load(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c,
                       mask=mask_r[:, None] & mask_c[None, :], other=0.0)


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_cols, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid`` in grouped order: GROUP_M row tiles sweep all column tiles
    together, so the tiles they share stay in L2 (the Triton matmul tutorial's ordering)."""
    group_size = GROUP_M * num_pid_cols
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % group_size) % rows_in_group, (pid % group_size) // rows_in_group


@triton.jit
def keep_tile(bits_ptr, rows, cols, words_per_row, mask_r, mask_c):
    """Dropout keep mask (bool) of elements (rows[:, None], cols[None, :]) from the bit-packed mask."""
    word = tl.load(bits_ptr + rows[:, None] * words_per_row + (cols >> 5)[None, :],
                   mask=mask_r[:, None] & mask_c[None, :], other=0)
    return ((word >> (cols & 31)[None, :]) & 1) != 0


@triton.jit
def udiv(x, d: tl.constexpr):
    """``x // d`` for integer ``x >= 0`` (an index): divided as unsigned on a GPU, where that is one shift for a
    power-of-two ``d`` and a signed division needs sign fix-ups (two more instructions per use). Same type as x."""
    if INTERPRETER:
        return x // d
    elif x.dtype == tl.int64:
        return (x.to(tl.uint64) // d).to(tl.int64)
    else:
        return (x.to(tl.uint32) // d).to(tl.int32)


@triton.jit
def block_scale(absmax_ptr, absmax2_ptr, nested_code_ptr, offset, block, mask,
                DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """float32 scale of 4-bit block indices ``block``: ``nested_code[q] * absmax2[block // NESTED_BLOCKSIZE] +
    offset`` (two float32 roundings: launch with ``enable_fp_fusion=False``) when double-quantized, else the
    float32 absmax."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_code_ptr + q, mask=mask, other=0.0)
        scale2 = tl.load(absmax2_ptr + udiv(block, NESTED_BLOCKSIZE), mask=mask, other=0.0)
        return nested * scale2 + offset
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


def interpreted_directly(fn):
    """Under the interpreter: the plain Python function that the interpreter runs for the ``@triton.jit`` helper
    ``fn`` (its AST rewritten exactly as the interpreter does and cached by it), so that a call from a kernel skips
    the interpreter's per-call re-patching of ``triton.language`` (about 0.25 ms per call on a 2-core CPU; the
    launch has patched it already, and ``triton.language`` is one module, so the patch is the same). On a GPU, and
    for an object without the interpreter's ``rewrite``, ``fn`` itself."""
    rewrite = getattr(fn, "rewrite", None)
    if not INTERPRETER or rewrite is None:
        return fn
    return rewrite()


round_to, dot, load_2d, store_2d, load_tile, grouped_tile, keep_tile, udiv, block_scale = (
    interpreted_directly(f) for f in (round_to, dot, load_2d, store_2d, load_tile, grouped_tile, keep_tile, udiv,
                                      block_scale))
