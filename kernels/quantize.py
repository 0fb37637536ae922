"""Blockwise 4-bit / 8-bit quantization and double quantization of the scales (docs/SPEC.md sections 2-4).

Bit for bit the oracle (``qlora.reference.quantize``) on every backend: the reciprocal is an IEEE division
(``div_rn``), every kernel is compiled with ``enable_fp_fusion=False`` (SPEC counts each float32 rounding), bf16
tensors reach the kernels as their int16 bits, and the double-quantization offset is order-independent (the
reasons: docs/DESIGN.md, "Rounding where SPEC counts it").

Launch configurations: under the interpreter a few large programs (the 4-bit dequantize kernel splits the tensor
into evenly filled programs of whole blocks, ``_dequant_4bit_config``); on a GPU about 2048 elements per quantize
program and 8192 per 4-bit dequantize program (two 128-bit packed loads per thread). The ``@triton.jit`` helper
``unpack_4bit`` is the device-side decoding the fused matmul reuses (its scale decoding is ``_tl.block_scale``).
"""

from __future__ import annotations

import math
import numbers

import torch
import triton
import triton.language as tl

from ._host import cdiv, next_pow2
from ._checks import BLOCKSIZES, FLOAT_DTYPES, check_blocksize, check_finite, check_same_device, check_tensor
from ._runtime import interpreter_active, lean_under_interpreter
from ._static import KernelSpec
from ._tl import INTERPRETER, round_to


@triton.jit
def unpack_4bit(packed_ptr, idx, mask):
    """4-bit codes (int32) of flat element indices `idx` (int64 tensor): byte idx // 2, HIGH nibble for even idx."""
    byte = tl.load(packed_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
    shift = (1 - (idx & 1)).to(tl.int32) * 4
    return (byte >> shift) & 0xF


# --------------------------------------------------------------------------------------------------------------
# Kernels. Every kernel here is launched with enable_fp_fusion=False: SPEC counts each float32 rounding, and a
# contracted multiply-add would move results by an ulp. Division is IEEE round-to-nearest (div_rn).
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_float32(ptr, idx, mask):
    """Load fp32/fp16 elements, or bfloat16 ones passed as int16 bits (see ``_kernel_view``), as float32 (exact)."""
    if ptr.dtype.element_ty == tl.int16:
        bits = tl.load(ptr + idx, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
        return (bits << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + idx, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_float32(ptr, idx, value, mask):
    """Store float32 `value` rounded to nearest-even into fp32/fp16 elements, or into bfloat16 ones passed as int16
    bits: rounding by hand (add 0x7FFF plus the lowest kept bit, keep the top half; right for every finite value,
    overflow included) because the interpreter's float32 -> bfloat16 cast truncates."""
    if ptr.dtype.element_ty == tl.int16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        tl.store(ptr + idx, (bits >> 16).to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + idx, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _nearest_code_4bit(s, code_ptr):
    """Code (int32) of each s: the number of the 15 float32 midpoints (code[k] + code[k+1]) / 2 strictly below s,
    i.e. the nearest value of the sorted 16-entry table, ties to the lower code."""
    q = tl.zeros(s.shape, dtype=tl.int32)
    for k in tl.static_range(15):
        # (a + b) * 0.5 equals (a + b) / 2 bit for bit: halving is one correctly rounded step either way.
        midpoint = (tl.load(code_ptr + k) + tl.load(code_ptr + k + 1)) * 0.5
        q += (s > midpoint).to(tl.int32)
    return q


@triton.jit
def _nearest_code_8bit(s, code_ptr):
    """Code (int32) of each s: the number of the 255 float32 midpoints (code[k] + code[k+1]) / 2 strictly below s,
    by a branch-free binary search of 8 steps (the midpoints are non-decreasing because the code is sorted; the
    largest index probed is 254, so the table needs no sentinel)."""
    q = tl.zeros(s.shape, dtype=tl.int32)
    for level in tl.static_range(7, -1, -1):
        probe = q + ((1 << level) - 1)
        midpoint = (tl.load(code_ptr + probe) + tl.load(code_ptr + probe + 1)) * 0.5
        q = tl.where(midpoint < s, q + (1 << level), q)
    return q


@triton.jit
def _block_scaled(x_ptr, n, offset, first_block, BLOCKSIZE: tl.constexpr, BLOCKS: tl.constexpr):
    """Load BLOCKS quantization blocks from block `first_block` (int64) as a float32 (BLOCKS, BLOCKSIZE) tile, minus
    `offset`. Returns (element index, in-range mask, block index, absmax per block, s = x * (1/absmax)).

    Lanes past n hold 0, so they cannot raise a partial block's absmax and they take the code of 0.0 (the padding
    nibble of an odd n). A block whose float32 reciprocal is not finite (absmax zero, or a subnormal <= 2**-128)
    gets s = 0 throughout: the code of 0.0. No clamp to [-1, 1]: |s| <= 1 up to an ulp, and counting midpoints
    sends anything beyond the table's range to its end, as the oracle does for any sorted table."""
    blocks = first_block + tl.arange(0, BLOCKS)
    idx = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    in_range = idx < n
    x = tl.where(in_range, _load_float32(x_ptr, idx, in_range) - offset, 0.0)
    absmax = tl.max(tl.abs(x), axis=1)
    # Division by 1 where absmax = 0 keeps the interpreter's numpy from warning; that block's reciprocal is +inf.
    nonzero = absmax > 0.0
    reciprocal = tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.where(nonzero, absmax, 1.0))
    reciprocal = tl.where(nonzero & (reciprocal < float("inf")), reciprocal, 0.0)
    return idx, in_range, blocks, absmax, x * reciprocal[:, None]


@lean_under_interpreter
@triton.jit
def _quantize_4bit_kernel(x_ptr, code_ptr, packed_ptr, absmax_ptr, n, nbytes,
                          BLOCKSIZE: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr):
    """x (n,) fp32/fp16/bf16-bits -> packed (nbytes = ceil(n/2),) uint8, absmax (ceil(n/BLOCKSIZE),) float32.
    Each program quantizes BLOCKS_PER_PROGRAM whole blocks; element 2i goes to the high nibble of byte i."""
    first_block = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM
    idx, in_range, blocks, absmax, s = _block_scaled(x_ptr, n, 0.0, first_block, BLOCKSIZE, BLOCKS_PER_PROGRAM)
    tl.store(absmax_ptr + blocks, absmax, mask=blocks * BLOCKSIZE < n)
    q = _nearest_code_4bit(s, code_ptr)
    high, low = tl.split(tl.reshape(q, (BLOCKS_PER_PROGRAM, BLOCKSIZE // 2, 2)))
    byte_idx = blocks[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    tl.store(packed_ptr + byte_idx, ((high << 4) | low).to(tl.uint8), mask=byte_idx < nbytes)


@lean_under_interpreter
@triton.jit
def _dequantize_4bit_kernel(packed_ptr, absmax_ptr, absmax2_ptr, nested_code_ptr, offset, code_ptr, out_ptr, n,
                            nbytes, nblocks, BLOCKSIZE: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr,
                            DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, EVEN: tl.constexpr):
    """packed (nbytes = ceil(n/2),) uint8 -> out (n,) fp32/fp16/bf16-bits: code[q] * scale in float32, then cast.

    Each program decodes BLOCKS_PER_PROGRAM whole quantization blocks laid out as a (blocks, BLOCKSIZE / 2) tile
    of bytes: a block's scale is decoded once and broadcast along its row (DOUBLE_QUANT: absmax_ptr holds uint8
    codes and the scale is nested_code[q] * absmax2[block // NESTED_BLOCKSIZE] + offset, two float32 roundings),
    each thread loads its bytes 16 at a time, and codes are looked up in the 16-entry table (L1-resident on a
    GPU). EVEN: every program's tile lies inside the tensor (n a multiple of BLOCKSIZE * BLOCKS_PER_PROGRAM), so
    nothing is masked. The one helper called is ``_tl.round_to``, which the interpreter runs as plain Python
    (``_tl.interpreted_directly``), without re-patching triton.language per call.
    """
    HALF: tl.constexpr = BLOCKSIZE // 2
    first_block = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM
    blocks = first_block + tl.arange(0, BLOCKS_PER_PROGRAM)

    # Scales, one per block.
    if EVEN:
        stored = tl.load(absmax_ptr + blocks)
    else:
        stored = tl.load(absmax_ptr + blocks, mask=blocks < nblocks, other=0)
    if DOUBLE_QUANT:
        # Every uint8 code indexes the 256-entry table: no mask needed.
        nested = tl.load(nested_code_ptr + stored.to(tl.int32))
        if NESTED_BLOCKSIZE % BLOCKS_PER_PROGRAM == 0:
            # first_block is a multiple of BLOCKS_PER_PROGRAM: the program's blocks share one absmax2 value.
            scale2 = tl.load(absmax2_ptr + first_block // NESTED_BLOCKSIZE)
        elif EVEN:
            scale2 = tl.load(absmax2_ptr + blocks // NESTED_BLOCKSIZE)
        else:
            scale2 = tl.load(absmax2_ptr + blocks // NESTED_BLOCKSIZE, mask=blocks < nblocks, other=0.0)
        scale = nested * scale2 + offset
    else:
        scale = stored

    # Codes: element 2i is the high nibble of byte i. Widened before the split (split as uint8, the compiler
    # repacks bytes between the steps).
    byte_idx = blocks[:, None] * HALF + tl.arange(0, HALF)[None, :]
    if EVEN:
        byte = tl.load(packed_ptr + byte_idx).to(tl.int32)
    else:
        byte = tl.load(packed_ptr + byte_idx, mask=byte_idx < nbytes, other=0).to(tl.int32)
    q = tl.reshape(tl.join(byte >> 4, byte & 0xF), (BLOCKS_PER_PROGRAM, BLOCKSIZE))
    if INTERPRETER:
        # The same values gathered from the loaded table: an interpreted load costs a pointer per element.
        table = tl.broadcast_to(tl.load(code_ptr + tl.arange(0, 16))[None, :], (BLOCKS_PER_PROGRAM, 16))
        value = tl.gather(table, q, 1) * scale[:, None]
    else:
        value = tl.load(code_ptr + q) * scale[:, None]

    # Store, rounded to nearest-even. bfloat16 arrives as int16 bits (_kernel_view); round_to rounds it on the bits
    # under the interpreter (whose cast truncates) and with cvt.rn on a GPU.
    if out_ptr.dtype.element_ty == tl.int16:
        out = round_to(value, tl.bfloat16).to(tl.int16, bitcast=True)
    else:
        out = value.to(out_ptr.dtype.element_ty)
    out_idx = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    if EVEN:
        tl.store(out_ptr + out_idx, out)
    else:
        tl.store(out_ptr + out_idx, out, mask=out_idx < n)


@lean_under_interpreter
@triton.jit
def _quantize_8bit_kernel(x_ptr, code_ptr, codes_ptr, absmax_ptr, n, offset,
                          BLOCKSIZE: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr):
    """x (n,) fp32/fp16/bf16, shifted by -offset in float32 -> codes (n,) uint8, absmax (ceil(n/BLOCKSIZE),)
    float32, with the sorted 256-entry code table."""
    first_block = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM
    idx, in_range, blocks, absmax, s = _block_scaled(x_ptr, n, offset, first_block, BLOCKSIZE, BLOCKS_PER_PROGRAM)
    tl.store(absmax_ptr + blocks, absmax, mask=blocks * BLOCKSIZE < n)
    tl.store(codes_ptr + idx, _nearest_code_8bit(s, code_ptr).to(tl.uint8), mask=in_range)


@lean_under_interpreter
@triton.jit
def _dequantize_8bit_kernel(codes_ptr, absmax_ptr, code_ptr, out_ptr, n, block_shift, offset,
                            ELEMS_PER_PROGRAM: tl.constexpr, ADD_OFFSET: tl.constexpr):
    """codes (n,) uint8 -> out (n,): code[q] * absmax[i >> block_shift] in float32 (then + offset, a second
    rounding, when ADD_OFFSET), cast to out_ptr's dtype."""
    idx = tl.program_id(0).to(tl.int64) * ELEMS_PER_PROGRAM + tl.arange(0, ELEMS_PER_PROGRAM)
    in_range = idx < n
    q = tl.load(codes_ptr + idx, mask=in_range, other=0).to(tl.int32)
    value = tl.load(code_ptr + q, mask=in_range, other=0.0) * tl.load(absmax_ptr + (idx >> block_shift),
                                                                        mask=in_range, other=0.0)
    if ADD_OFFSET:
        value = value + offset
    _store_float32(out_ptr, idx, value, in_range)


# --------------------------------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------------------------------

# Under the interpreter each program instance costs a fixed overhead, so a launch uses a few programs of up to
# 2**18 elements (shrunk to the input for small tensors). On a GPU: about 2048 elements per program.
_INTERPRETER_ELEMS = 2**18
_GPU_QUANT_ELEMS = 2048
# 4-bit dequantize on a GPU: 8192 elements (4096 packed bytes) per program of 4 warps: each thread loads 32
# contiguous bytes (two 128-bit loads) and stores 64 outputs in 16-byte vectors, and the per-block scale decode and
# index setup are spread over twice the elements of a 4096-element program (`perf static`: 8.5-10.2 instructions
# per element instead of 9.6-13.8 across triton 3.6 and 3.9; 42-144 registers, no spill).
_GPU_DEQUANT_ELEMS = 8192
# Under the interpreter a 4-bit dequantize program costs about this many elements' worth of work beyond its tile
# (the Python dispatch of its ~30 tile ops; measured on the demo's weight: ~1.2 ms per program against ~35 ns per
# float32 element), and a masked launch (not EVEN) a quarter more per lane (the masks, the compare that makes them).
_INTERPRETER_PROGRAM_COST_ELEMS = 32768
_INTERPRETER_MASKED_LANE_COST = 1.25
_GPU_DEQUANT_8BIT_ELEMS = 2048
_NUM_WARPS = 4
# Every kernel of this module is compiled without multiply-add contraction: SPEC counts each float32 rounding.
_FP_OPTIONS = {"enable_fp_fusion": False}


def _gpu_quant_config(blocksize: int) -> tuple[int, int]:
    """(blocks per program, num_warps) of the quantize kernels on a GPU (the launchers and ``compile_specs``)."""
    # More warps for the largest blocks: with 4 (8 at 4096) the fp32 8-bit build keeps an 8-byte stack frame on
    # sm_90 under triton 3.9.
    return max(1, _GPU_QUANT_ELEMS // blocksize), (16 if blocksize >= 4096 else 8 if blocksize >= 2048 else _NUM_WARPS)


def _quant_config(n: int, blocksize: int) -> tuple[int, int]:
    """(blocks per program, num_warps) for the quantize kernels."""
    if interpreter_active():
        return min(max(1, _INTERPRETER_ELEMS // blocksize), max(1, next_pow2(cdiv(n, blocksize)))), 1
    return _gpu_quant_config(blocksize)


def _dequant_4bit_config(n: int, blocksize: int) -> int:
    """Quantization blocks per program (a power of two) of the 4-bit dequantize kernel over n elements.

    GPU: ``_GPU_DEQUANT_ELEMS`` elements (one block when the blocksize is larger). Interpreter: at most
    ``_INTERPRETER_ELEMS`` elements (one block at least) per program, as many blocks as minimize the launch's
    modelled cost: a fixed cost per program plus the lanes of all programs, those past the end included, dearer
    when the launch needs masks. The demo's 1536 x 384 weight at blocksize 64 (9216 blocks) runs 9 full programs
    of 1024 blocks (no masks) rather than 3 of 4096 blocks, a third of whose lanes would be masked off."""
    if not interpreter_active():
        return max(1, _GPU_DEQUANT_ELEMS // blocksize)
    nblocks = cdiv(n, blocksize)
    most = min(max(1, _INTERPRETER_ELEMS // blocksize), next_pow2(nblocks))
    best, best_cost = 1, None
    blocks = 1
    while blocks <= most:
        programs = cdiv(nblocks, blocks)
        lane_cost = 1.0 if n % (blocks * blocksize) == 0 else _INTERPRETER_MASKED_LANE_COST
        cost = programs * _INTERPRETER_PROGRAM_COST_ELEMS + programs * blocks * blocksize * lane_cost
        if best_cost is None or cost <= best_cost:
            best, best_cost = blocks, cost
        blocks *= 2
    return best


def launch_dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None,
                           nested_code: torch.Tensor | None, offset: float, code: torch.Tensor, out: torch.Tensor,
                           blocksize: int, nested_blocksize: int) -> None:
    """The 4-bit dequantize launch, arguments checked by the caller (:func:`dequantize_4bit`, or the fused layer,
    whose weight was validated when built): packed (ceil(n/2),) uint8 contiguous, absmax (ceil(n/blocksize),)
    float32, or uint8 with absmax2 / nested_code / offset (double quantization, else None / None / any), code
    (16,) float32, all contiguous; out (n elements, contiguous, fp32/fp16/bf16) is written, n >= 1."""
    n = out.numel()
    nbytes = cdiv(n, 2)
    nblocks = cdiv(n, blocksize)
    blocks_per_program = _dequant_4bit_config(n, blocksize)
    double_quant = absmax2 is not None
    # EVEN: every program's tile lies inside the tensor, so the kernel needs no masks.
    even = n % (blocksize * blocks_per_program) == 0
    # Without double quantization the nested pointers are never read; absmax and code stand in for them.
    _dequantize_4bit_kernel[(cdiv(nblocks, blocks_per_program),)](
        packed, absmax, absmax2 if double_quant else absmax, nested_code if double_quant else code,
        float(offset) if double_quant else 0.0, code, _kernel_view(out), n, nbytes, nblocks, BLOCKSIZE=blocksize,
        BLOCKS_PER_PROGRAM=blocks_per_program, DOUBLE_QUANT=double_quant, NESTED_BLOCKSIZE=nested_blocksize,
        EVEN=even, num_warps=_NUM_WARPS, **_FP_OPTIONS)


def _stream_config(count: int, gpu_tile: int) -> int:
    """Tile (a power of two) of the dequantize kernels over `count` bytes or elements."""
    if interpreter_active():
        return min(_INTERPRETER_ELEMS, max(1, next_pow2(count)))
    return gpu_tile


# --------------------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------------------


def _check_code(code, size: int, x: torch.Tensor, x_name: str, sorted_needed: bool, name: str = "code") -> None:
    check_tensor(name, code, (torch.float32,), ndim=1)
    if code.numel() != size:
        raise ValueError(f"{name} must have {size} entries, got {code.numel()}")
    check_same_device(**{x_name: x, name: code})
    if sorted_needed:
        check_finite(name, code)
        if not bool((code[1:] >= code[:-1]).all()):
            raise ValueError(f"{name} must be sorted ascending (the nearest-value search relies on it)")


def _check_input(x, name: str = "x") -> None:
    check_tensor(name, x, FLOAT_DTYPES)


def _check_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (tuple, list, torch.Size)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ValueError(f"shape must be a sequence of non-negative ints, got {shape!r}")
    return tuple(shape)


def _check_out_dtype(dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of float32, float16, bfloat16, got {dtype}")


def _check_length(name: str, t: torch.Tensor, expected: int, what: str) -> None:
    if t.numel() != expected:
        raise ValueError(f"{name} has {t.numel()} elements, expected {expected} ({what})")


def _flat(x: torch.Tensor) -> torch.Tensor:
    """Row-major flat and contiguous (kernels index flat memory): a view when x is contiguous, else a copy.
    (reshape alone may return a strided view, e.g. of x[::2].)"""
    return x.reshape(-1).contiguous()


def _kernel_view(t: torch.Tensor) -> torch.Tensor:
    """What a kernel receives for a float tensor: bfloat16 goes in as its int16 bits, converted exactly inside
    (``_load_float32`` / ``_store_float32``); the interpreter's own bfloat16 conversions are inexact. The same code
    runs on the GPU, where the conversion costs a shift or an add and a shift."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


# --------------------------------------------------------------------------------------------------------------
# Public launchers
# --------------------------------------------------------------------------------------------------------------


def quantize_4bit(x: torch.Tensor, code: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit quantization (SPEC 2) of ``x`` (any shape, fp32/fp16/bf16, flattened row-major; n elements).

    ``code``: float32 ``(16,)`` sorted table (e.g. NF4). Returns ``packed`` uint8 ``(ceil(n/2),)`` (element 2i
    in the high nibble of byte i, an odd n padded with the code of 0.0, 7 for NF4) and ``absmax`` float32
    ``(ceil(n/blocksize),)``.
    """
    _check_input(x)
    _check_code(code, 16, x, "x", sorted_needed=True)
    check_blocksize(blocksize)
    check_finite("x", x)
    return _quantize_4bit(x, code, blocksize)


def _quantize_4bit(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_4bit` without its checks (and their host syncs), for a caller whose arguments are valid by
    construction: ``qlora.nf4.quantize_nf4`` checks the weight itself and passes the NF4 table it just built."""
    flat = _flat(x)
    n = flat.numel()
    packed = torch.empty(cdiv(n, 2), dtype=torch.uint8, device=x.device)
    absmax = torch.empty(cdiv(n, blocksize), dtype=torch.float32, device=x.device)
    if n == 0:
        return packed, absmax
    blocks_per_program, num_warps = _quant_config(n, blocksize)
    grid = (cdiv(absmax.numel(), blocks_per_program),)
    _quantize_4bit_kernel[grid](_kernel_view(flat), code.contiguous(), packed, absmax, n, packed.numel(),
                                BLOCKSIZE=blocksize, BLOCKS_PER_PROGRAM=blocks_per_program, num_warps=num_warps,
                                **_FP_OPTIONS)
    return packed, absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape, blocksize: int = 64,
                    dtype: torch.dtype = torch.float32, *, absmax2: torch.Tensor | None = None,
                    offset: float | None = None, nested_code: torch.Tensor | None = None,
                    nested_blocksize: int = 256) -> torch.Tensor:
    """Inverse of :func:`quantize_4bit`: ``code[q] * scale`` in float32, cast to ``dtype``, shaped ``shape``.

    ``packed``: uint8 with ceil(n/2) elements (any shape, e.g. bitsandbytes' ``(ceil(n/2), 1)``), n = prod(shape).
    ``absmax``: float32 ``(ceil(n/blocksize),)`` scales, or uint8 double-quantized scales; then ``absmax2``
    (float32 ``(ceil(nblocks/nested_blocksize),)``), ``offset`` (float) and ``nested_code`` (float32 ``(256,)``)
    are required and the kernel decodes each scale as ``nested_code[q] * absmax2[j // nested_blocksize] + offset``
    (two float32 roundings) in the same pass.
    """
    check_tensor("packed", packed, (torch.uint8,))
    check_tensor("absmax", absmax, (torch.float32, torch.uint8), ndim=1)
    _check_code(code, 16, packed, "packed", sorted_needed=False)
    shape = _check_shape(shape)
    check_blocksize(blocksize)
    _check_out_dtype(dtype)
    n = math.prod(shape)
    _check_length("packed", packed, cdiv(n, 2), f"ceil(n/2) for shape {shape}")
    nblocks = cdiv(n, blocksize)
    _check_length("absmax", absmax, nblocks, f"ceil(n/blocksize) for shape {shape} and blocksize {blocksize}")
    check_same_device(packed=packed, absmax=absmax)
    double_quant = absmax.dtype == torch.uint8
    nested = {"absmax2": absmax2, "offset": offset, "nested_code": nested_code}
    if double_quant:
        missing = [name for name, value in nested.items() if value is None]
        if missing:
            raise ValueError(f"absmax is uint8 (double-quantized), so {', '.join(missing)} must be given")
        check_blocksize(nested_blocksize, "nested_blocksize")
        check_tensor("absmax2", absmax2, (torch.float32,), ndim=1)
        _check_length("absmax2", absmax2, cdiv(nblocks, nested_blocksize),
                      f"ceil(nblocks/nested_blocksize) for {nblocks} blocks")
        _check_code(nested_code, 256, packed, "packed", sorted_needed=False, name="nested_code")
        check_same_device(packed=packed, absmax2=absmax2)
        offset = _check_offset(offset)
    else:
        given = [name for name, value in nested.items() if value is not None]
        if given:
            raise ValueError(f"absmax is float32 (not double-quantized), so {', '.join(given)} must not be given")
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    if n == 0:
        return out
    launch_dequantize_4bit(_flat(packed), absmax.contiguous(), absmax2.contiguous() if double_quant else None,
                           nested_code.contiguous() if double_quant else None, offset if double_quant else 0.0,
                           code.contiguous(), out, blocksize, nested_blocksize)
    return out


def _quantize_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int, offset: float):
    flat = _flat(x)
    n = flat.numel()
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(cdiv(n, blocksize), dtype=torch.float32, device=x.device)
    if n == 0:
        return codes, absmax
    blocks_per_program, num_warps = _quant_config(n, blocksize)
    grid = (cdiv(absmax.numel(), blocks_per_program),)
    _quantize_8bit_kernel[grid](_kernel_view(flat), code.contiguous(), codes, absmax, n, offset, BLOCKSIZE=blocksize,
                                BLOCKS_PER_PROGRAM=blocks_per_program, num_warps=num_warps, **_FP_OPTIONS)
    return codes, absmax


def _dequantize_8bit(codes, absmax, code, shape, blocksize, dtype, offset):
    out = torch.empty(shape, dtype=dtype, device=codes.device)
    n = out.numel()
    if n == 0:
        return out
    elems_per_program = _stream_config(n, _GPU_DEQUANT_8BIT_ELEMS)
    grid = (cdiv(n, elems_per_program),)
    _dequantize_8bit_kernel[grid](_flat(codes), absmax.contiguous(), code.contiguous(), _kernel_view(out), n,
                                  blocksize.bit_length() - 1, 0.0 if offset is None else offset,
                                  ELEMS_PER_PROGRAM=elems_per_program, ADD_OFFSET=offset is not None,
                                  num_warps=_NUM_WARPS, **_FP_OPTIONS)
    return out


def quantize_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization of ``x`` (any shape, fp32/fp16/bf16; n elements) with a sorted float32
    ``(256,)`` ``code`` (e.g. the dynamic map): ``codes`` uint8 ``(n,)`` (nearest value, ties to the lower code)
    and ``absmax`` float32 ``(ceil(n/blocksize),)``."""
    _check_input(x)
    _check_code(code, 256, x, "x", sorted_needed=True)
    check_blocksize(blocksize)
    check_finite("x", x)
    return _quantize_8bit(x, code, blocksize, 0.0)


def dequantize_8bit(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape, blocksize: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_8bit`: ``code[q] * absmax[block]`` in float32, cast to ``dtype``, shaped
    ``shape``; ``codes`` uint8 with prod(shape) elements, ``absmax`` float32 ``(ceil(n/blocksize),)``."""
    check_tensor("codes", codes, (torch.uint8,))
    check_tensor("absmax", absmax, (torch.float32,), ndim=1)
    _check_code(code, 256, codes, "codes", sorted_needed=False)
    shape = _check_shape(shape)
    check_blocksize(blocksize)
    _check_out_dtype(dtype)
    n = math.prod(shape)
    _check_length("codes", codes, n, f"prod(shape) for shape {shape}")
    _check_length("absmax", absmax, cdiv(n, blocksize),
                  f"ceil(n/blocksize) for shape {shape} and blocksize {blocksize}")
    check_same_device(codes=codes, absmax=absmax)
    return _dequantize_8bit(codes, absmax, code, shape, blocksize, dtype, None)


def _float32_mean(values: torch.Tensor) -> float:
    """float32(correctly rounded float64 sum of `values` / n) as a Python float, independent of summation order.

    The float32 values (finite, non-negative) are added exactly as integers: value = mantissa * 2**(shift - 149)
    with shift in [0, 253], so each lands in 32-bit limbs `shift // 32` and the next of an int64 accumulator
    (a limb receives less than 2**32 per value, so fewer than 2**31 values cannot overflow it). One small copy
    to the host then rounds the exact sum once to float64 (as math.fsum does), divides in float64 and rounds
    to float32 (DESIGN.md).
    """
    bits = values.view(torch.int32).to(torch.int64)
    exponent = (bits >> 23) & 0xFF
    mantissa = torch.where(exponent > 0, (bits & 0x7FFFFF) | 0x800000, bits & 0x7FFFFF)
    shift = torch.clamp(exponent - 1, min=0)
    wide = mantissa << (shift % 32)
    limb = shift // 32
    limbs = torch.zeros(10, dtype=torch.int64, device=values.device)
    limbs.index_add_(0, limb, wide & 0xFFFFFFFF)
    limbs.index_add_(0, limb + 1, wide >> 32)
    total = sum(int(v) << (32 * k) for k, v in enumerate(limbs.tolist()))
    sum64 = total / 2**149  # int / int: correctly rounded to float64
    return float(torch.tensor(sum64 / values.numel(), dtype=torch.float64).to(torch.float32))


def _check_offset(offset) -> float:
    if isinstance(offset, bool) or not isinstance(offset, numbers.Real) or not math.isfinite(offset):
        raise ValueError(f"offset must be a finite float, got {offset!r}")
    if float(torch.tensor(float(offset), dtype=torch.float32)) != float(offset):
        raise ValueError(f"offset must be exactly representable in float32 (the kernels add it in float32), "
                         f"got {offset!r}")
    return float(offset)


def double_quantize(absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 256):
    """Double quantization (SPEC 3) of float32 scales ``absmax`` ``(nblocks,)`` (finite, non-negative) with the
    signed dynamic map ``code``: ``offset = float32(sum(float64(absmax)) / nblocks)``, the sum exact (DESIGN.md),
    then ``absmax - offset`` (float32) quantized 8-bit in blocks of ``blocksize``. Returns ``(qabsmax uint8
    (nblocks,), absmax2 float32 (ceil(nblocks/blocksize),), offset)``, offset a Python float holding the exact
    float32 value."""
    check_tensor("absmax", absmax, (torch.float32,), ndim=1)
    _check_code(code, 256, absmax, "absmax", sorted_needed=True)
    check_blocksize(blocksize)
    check_finite("absmax", absmax)
    if absmax.numel() and not bool((absmax >= 0).all()):
        raise ValueError("absmax must be non-negative (scales are maxima of absolute values)")
    return _double_quantize(absmax, code, blocksize)


def _double_quantize(absmax: torch.Tensor, code: torch.Tensor, blocksize: int):
    """:func:`double_quantize` without its checks (and their host syncs), for a caller whose scales come from
    :func:`_quantize_4bit` of a finite input (finite, non-negative) and whose code is ``dynamic_map(signed=True)``."""
    offset = _float32_mean(absmax) if absmax.numel() else 0.0
    qabsmax, absmax2 = _quantize_8bit(absmax, code, blocksize, offset)
    return qabsmax, absmax2, offset


def double_dequantize(qabsmax: torch.Tensor, absmax2: torch.Tensor, offset: float, code: torch.Tensor,
                      blocksize: int = 256) -> torch.Tensor:
    """Inverse of :func:`double_quantize`: float32 ``(nblocks,)`` scales ``code[q] * absmax2[j // blocksize]``,
    rounded, then ``+ offset``, rounded again (no fused multiply-add). ``offset`` must be a float32 value."""
    check_tensor("qabsmax", qabsmax, (torch.uint8,), ndim=1)
    check_tensor("absmax2", absmax2, (torch.float32,), ndim=1)
    _check_code(code, 256, qabsmax, "qabsmax", sorted_needed=False)
    check_blocksize(blocksize)
    offset = _check_offset(offset)
    n = qabsmax.numel()
    _check_length("absmax2", absmax2, cdiv(n, blocksize), f"ceil(len(qabsmax)/blocksize) for {n} scales")
    check_same_device(qabsmax=qabsmax, absmax2=absmax2)
    return _dequantize_8bit(qabsmax, absmax2, code, (n,), blocksize, torch.float32, offset)


# --------------------------------------------------------------------------------------------------------------
# Static compile specs (python -m perf static): one entry per GPU launch config the launchers above can use.
# --------------------------------------------------------------------------------------------------------------

# bfloat16 tensors reach the kernels as int16 bits (_kernel_view).
_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "i16"}
_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# The launch the specs stand for: a 4096 x 4096 weight (the roofline's and the benchmark's shape) at the default
# blocksize 64, whose 262144 scales double quantization quantizes (8-bit, blocksize 256) and dequantizes.
_SPEC_NUMEL = 4096 * 4096
_SPEC_SCALES = _SPEC_NUMEL // 64
_SPEC_OFFSET = 0.5


def compile_specs() -> list[KernelSpec]:
    """Quantize kernels: every blocksize (the tile shape depends on it), bf16 input (the usual weight dtype) and
    fp32/fp16 at the default blocksize; 8-bit quantize with fp32 input (optimizer states, double quantization).
    Dequantize kernels take the blocksize at run time: each output dtype with float32 scales and with
    double-quantized ones; 8-bit dequantize with and without the offset add. Per-element figure: the elements one
    program handles (the kernels have no loop, so their whole instruction stream is counted over those)."""
    options = {"num_warps": _NUM_WARPS, **_FP_OPTIONS}
    specs = []
    q4_cases = [(torch.bfloat16, b) for b in BLOCKSIZES] + [(torch.float32, 64), (torch.float16, 64)]
    for dtype, blocksize in q4_cases:
        blocks_per_program, num_warps = _gpu_quant_config(blocksize)
        specs.append(KernelSpec(
            name=f"q4_{_NAMES[dtype]}_b{blocksize}", fn=_quantize_4bit_kernel,
            signature={"x_ptr": f"*{_TRITON_TYPES[dtype]}", "code_ptr": "*fp32", "packed_ptr": "*u8",
                       "absmax_ptr": "*fp32", "n": "i32", "nbytes": "i32", "BLOCKSIZE": "constexpr",
                       "BLOCKS_PER_PROGRAM": "constexpr"},
            constexprs={"BLOCKSIZE": blocksize, "BLOCKS_PER_PROGRAM": blocks_per_program},
            options={**options, "num_warps": num_warps},
            launch_args={"n": _SPEC_NUMEL, "nbytes": cdiv(_SPEC_NUMEL, 2)},
            regime=f"{_NAMES[dtype]} input, blocksize {blocksize}",
            weight_elements_per_iteration=blocksize * blocks_per_program,
        ))
    # 4-bit dequantize: every output dtype with float32 and with double-quantized scales at the default blocksize
    # (what the layer launches for a QLoRA weight), and the bf16 double-quantized build at every other blocksize.
    dq4_cases = [(dtype, dq, 64) for dtype in FLOAT_DTYPES for dq in (False, True)]
    dq4_cases += [(torch.bfloat16, True, b) for b in BLOCKSIZES if b != 64]
    for dtype, double_quant, blocksize in dq4_cases:
        blocks_per_program = max(1, _GPU_DEQUANT_ELEMS // blocksize)
        specs.append(KernelSpec(
            name=f"dq4_{_NAMES[dtype]}{'_nested' if double_quant else ''}{'' if blocksize == 64 else f'_b{blocksize}'}",
            fn=_dequantize_4bit_kernel,
            signature={"packed_ptr": "*u8", "absmax_ptr": "*u8" if double_quant else "*fp32",
                       "absmax2_ptr": "*fp32", "nested_code_ptr": "*fp32", "offset": "fp32",
                       "code_ptr": "*fp32", "out_ptr": f"*{_TRITON_TYPES[dtype]}", "n": "i32",
                       "nbytes": "i32", "nblocks": "i32", "BLOCKSIZE": "constexpr",
                       "BLOCKS_PER_PROGRAM": "constexpr", "DOUBLE_QUANT": "constexpr",
                       "NESTED_BLOCKSIZE": "constexpr", "EVEN": "constexpr"},
            constexprs={"BLOCKSIZE": blocksize, "BLOCKS_PER_PROGRAM": blocks_per_program,
                        "DOUBLE_QUANT": double_quant, "NESTED_BLOCKSIZE": 256,
                        "EVEN": _SPEC_NUMEL % (blocksize * blocks_per_program) == 0},
            options=options,
            launch_args={"offset": _SPEC_OFFSET, "n": _SPEC_NUMEL, "nbytes": cdiv(_SPEC_NUMEL, 2),
                         "nblocks": cdiv(_SPEC_NUMEL, blocksize)},
            regime=f"{_NAMES[dtype]} output, {'double-quantized' if double_quant else 'float32'} scales, "
                   f"blocksize {blocksize}",
            weight_elements_per_iteration=blocksize * blocks_per_program,
        ))
    for blocksize in BLOCKSIZES:
        blocks_per_program, num_warps = _gpu_quant_config(blocksize)
        specs.append(KernelSpec(
            name=f"q8_fp32_b{blocksize}", fn=_quantize_8bit_kernel,
            signature={"x_ptr": "*fp32", "code_ptr": "*fp32", "codes_ptr": "*u8", "absmax_ptr": "*fp32",
                       "n": "i32", "offset": "fp32", "BLOCKSIZE": "constexpr", "BLOCKS_PER_PROGRAM": "constexpr"},
            constexprs={"BLOCKSIZE": blocksize, "BLOCKS_PER_PROGRAM": blocks_per_program},
            options={**options, "num_warps": num_warps},
            launch_args={"n": _SPEC_SCALES, "offset": _SPEC_OFFSET},
            regime=f"fp32 input, blocksize {blocksize}",
            weight_elements_per_iteration=blocksize * blocks_per_program,
        ))
    for add_offset in (False, True):
        specs.append(KernelSpec(
            name=f"dq8_fp32{'_offset' if add_offset else ''}", fn=_dequantize_8bit_kernel,
            signature={"codes_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32", "out_ptr": "*fp32",
                       "n": "i32", "block_shift": "i32", "offset": "fp32", "ELEMS_PER_PROGRAM": "constexpr",
                       "ADD_OFFSET": "constexpr"},
            constexprs={"ELEMS_PER_PROGRAM": _GPU_DEQUANT_8BIT_ELEMS, "ADD_OFFSET": add_offset},
            options=options,
            # block_shift = log2(256): double dequantization's blocksize (any blocksize compiles the same).
            launch_args={"n": _SPEC_SCALES, "block_shift": 8, "offset": _SPEC_OFFSET},
            regime=f"fp32 output, {'offset added' if add_offset else 'no offset'}, any blocksize",
            weight_elements_per_iteration=_GPU_DEQUANT_8BIT_ELEMS,
        ))
    return specs


__all__ = [
    "unpack_4bit", "quantize_4bit", "dequantize_4bit", "quantize_8bit", "dequantize_8bit",
    "double_quantize", "double_dequantize", "compile_specs",
]
