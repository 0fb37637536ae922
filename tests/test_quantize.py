"""Quantization kernels (``qlora.kernels.quantize``) against the oracle (``qlora.reference.quantize``), byte for
byte: packed codes, 8-bit codes, absmax, qabsmax, absmax2, the offset, and every dequantized value (float32 bit
patterns; fp16/bf16 outputs are the oracle's float32 values rounded by torch). Inputs are drawn by Hypothesis:
shapes (n = 1, odd n, partial blocks, 1-3 dims), non-contiguous layouts, blocksizes, dtypes, per-block value
kinds (Gaussian over 1e-30..1e30, mixed magnitudes, constant, all-zero, subnormal, near the dtype's maximum,
exact midpoint ties), and program sizes (one block per program up to one program for everything). Also the
device helpers the fused matmul imports, 64-bit address arithmetic, empty inputs and every rejected argument."""

from __future__ import annotations

import qlora  # noqa: F401, I001  (first: it decides whether triton, imported below, runs the interpreter)
import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from hyp import examples
from hypothesis import given
from hypothesis import strategies as st

from qlora.kernels import _tl as TL
from qlora.kernels import quantize as K
from qlora.reference import codebook as RC
from qlora.reference import quantize as R

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NF4 = torch.from_numpy(RC.normal_float_codebook())
NF3_SYM = RC.normal_float_codebook(3, use_extra_value=False)
SIGNED = torch.from_numpy(RC.dynamic_map(signed=True))
UNSIGNED = torch.from_numpy(RC.dynamic_map(signed=False))
KINDS = ("gauss", "wide", "constant", "zero", "subnormal", "huge", "ties")
REPO = Path(__file__).resolve().parents[1]

# The interpreter runs kernels on NumPy, which warns where float32 arithmetic overflows as IEEE says it should:
# 1/absmax of a subnormal block (SPEC: that block takes the code of 0.0) and huge values cast to fp16 (inf, as
# torch's cast gives; compared bit for bit).
pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered in divide:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),
]


# ------------------------------------------------------------------------------------------------------
# Drawn inputs
# ------------------------------------------------------------------------------------------------------


def _block_values(rng: np.random.Generator, kind: str, size: int, dtype: torch.dtype, code: np.ndarray):
    """float64 values of one block, finite in `dtype` after rounding."""
    lo, hi = (-4, 4) if dtype == torch.float16 else (-30, 30)
    sign = rng.choice([-1.0, 1.0], size)
    if kind == "gauss":
        return rng.standard_normal(size) * 10.0 ** rng.uniform(lo, hi)
    if kind == "wide":  # magnitudes spread over the whole range in one block
        return sign * 10.0 ** rng.uniform(lo, hi, size)
    if kind == "constant":
        return np.full(size, rng.choice([-1.0, 1.0]) * 10.0 ** rng.uniform(lo, hi))
    if kind == "zero":
        return sign * 0.0
    if kind == "subnormal":  # float32 (or fp16) subnormals: 1/absmax overflows below 2**-128
        if dtype == torch.float16:
            return sign * rng.integers(0, 2**10, size).astype(np.uint16).view(np.float16).astype(np.float64)
        limit = rng.choice([2**8, 2**21, 2**23])
        return sign * rng.integers(0, limit, size).astype(np.uint32).view(np.float32).astype(np.float64)
    if kind == "huge":  # the dtype's top binade (fp16) or 1e38, with headroom so decoded scales stay finite
        top = 65504.0 if dtype == torch.float16 else 1e38
        return sign * top * rng.uniform(0.5, 1.0, size)
    # "ties": absmax a power of two, so 1/absmax and s = x * (1/absmax) are exact, and the other elements are
    # table midpoints times absmax (exact float32 ties, the LOWER code must win) and their float32 neighbours.
    scale = 2.0 ** (rng.integers(-14, 15) if dtype == torch.float16 else rng.integers(-100, 100))
    midpoints = ((code[:-1] + code[1:]) / np.float32(2)).astype(np.float32)
    picks = rng.choice(midpoints, size)
    nudge = rng.choice([-np.inf, 0.0, 0.0, np.inf], size).astype(np.float32)
    values = np.nextafter(picks, nudge).astype(np.float64) * scale
    values[rng.integers(size)] = rng.choice([-1.0, 1.0]) * scale
    return values


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same logical tensor (same values in row-major order) in a contiguous or non-contiguous layout."""
    if layout == "contiguous" or x.dim() == 0:
        return x
    if layout == "transposed":  # storage in reversed dimension order
        base = torch.empty(tuple(reversed(x.shape)), dtype=x.dtype)
        view = base.permute(*reversed(range(x.dim())))
    else:  # "strided": every other element of a wider last dimension
        base = torch.empty((*x.shape[:-1], 2 * x.shape[-1]), dtype=x.dtype)
        view = base[..., ::2]
    view.copy_(x)
    return view


@st.composite
def blockwise_inputs(draw, code: np.ndarray, max_blocks: int = 3, max_n: int = 3000):
    """(x torch tensor of a drawn dtype/shape/layout, its exact float32 values as numpy, blocksize)."""
    blocksize = draw(st.sampled_from(BLOCKSIZES))
    n = draw(st.one_of(st.integers(1, min(max_n, max_blocks * blocksize)), st.sampled_from([1, 2, 3, blocksize + 1])))
    dtype = draw(st.sampled_from(DTYPES))
    nblocks = -(-n // blocksize)
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=nblocks, max_size=nblocks))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = np.concatenate([_block_values(rng, kind, blocksize, dtype, code) for kind in kinds])[:n]
    if dtype == torch.float16:  # a Gaussian tail could pass 65504
        values = np.clip(values, -65504.0, 65504.0)
    rows = draw(st.sampled_from([r for r in (1, 2, 3, 5) if n % r == 0]))
    cols = draw(st.sampled_from([c for c in (1, 2, 3) if (n // rows) % c == 0]))
    shape = (n,) if rows == 1 else ((rows, n // rows) if cols == 1 else (rows, n // rows // cols, cols))
    x = torch.from_numpy(values).to(torch.float32).to(dtype).reshape(shape)
    assert torch.isfinite(x).all()
    x32 = x.to(torch.float32).numpy()  # fp16/bf16 -> float32 is exact: the oracle sees the kernel's values
    return _layout(x, draw(st.sampled_from(["contiguous", "transposed", "strided"]))), x32, blocksize


@contextlib.contextmanager
def _program_elems(elems: int):
    """Run the launchers with at most `elems` elements per program under the interpreter (multi-program grids,
    one block per program when elems <= blocksize), restoring the default afterwards."""
    saved = K._INTERPRETER_ELEMS
    K._INTERPRETER_ELEMS = elems
    try:
        yield
    finally:
        K._INTERPRETER_ELEMS = saved


PROGRAM_ELEMS = st.sampled_from([32, 512, 2048, K._INTERPRETER_ELEMS])


def _bits(a) -> np.ndarray:
    """Bit patterns of a float array (separates -0.0 from 0.0)."""
    a = a.cpu().numpy() if isinstance(a, torch.Tensor) else a
    return a.view({4: np.uint32, 2: np.uint16}[a.dtype.itemsize])


def _assert_same_floats(got: torch.Tensor, expected32: np.ndarray, dtype: torch.dtype):
    """got (dtype) equals the oracle's float32 result rounded to dtype by torch, bit for bit."""
    assert got.dtype == dtype and tuple(got.shape) == expected32.shape
    want = torch.from_numpy(np.ascontiguousarray(expected32)).to(dtype)
    np.testing.assert_array_equal(got.view(torch.int32 if dtype == torch.float32 else torch.int16).numpy(),
                                  want.view(torch.int32 if dtype == torch.float32 else torch.int16).numpy())


# ------------------------------------------------------------------------------------------------------
# 4-bit
# ------------------------------------------------------------------------------------------------------


@examples(100)
@given(data=blockwise_inputs(NF4.numpy()), out_dtype=st.sampled_from(DTYPES), program_elems=PROGRAM_ELEMS)
def test_quantize_4bit_matches_oracle(data, out_dtype, program_elems):
    x, x32, blocksize = data
    with _program_elems(program_elems):
        packed, absmax = K.quantize_4bit(x, NF4, blocksize)
        want_packed, want_absmax = R.quantize_4bit(x32, NF4.numpy(), blocksize)
        assert packed.dtype == torch.uint8 and absmax.dtype == torch.float32
        np.testing.assert_array_equal(packed.numpy(), want_packed)
        np.testing.assert_array_equal(_bits(absmax), _bits(want_absmax))

        out = K.dequantize_4bit(packed, absmax, NF4, x.shape, blocksize, out_dtype)
    _assert_same_floats(out, R.dequantize_4bit(want_packed, want_absmax, NF4.numpy(), x32.shape, blocksize), out_dtype)


@examples(15)
@given(data=blockwise_inputs(NF3_SYM, max_blocks=2))
def test_quantize_4bit_other_sorted_table_matches_oracle(data):
    """A 16-entry table other than NF4: symmetric NF3 padded with zeros (both ends of a run of equal midpoints)."""
    x, x32, blocksize = data
    code = np.concatenate([NF3_SYM, np.zeros(8, np.float32)])
    code.sort()
    packed, absmax = K.quantize_4bit(x, torch.from_numpy(code), blocksize)
    want_packed, want_absmax = R.quantize_4bit(x32, code, blocksize)
    np.testing.assert_array_equal(packed.numpy(), want_packed)
    np.testing.assert_array_equal(_bits(absmax), _bits(want_absmax))


def test_quantize_4bit_spec_cases():
    """SPEC 2 by hand: packing order, odd-n padding with code 7, all-zero and subnormal blocks, midpoint ties."""
    mid = float((NF4[8] + NF4[9]) / 2)  # float32 midpoint between codes 8 and 9
    x = torch.tensor([1.0, -1.0, 0.0, mid, np.nextafter(np.float32(mid), np.float32(1)), -0.5] + [0.0] * 26
                     + [0.0] * 32 + [1e-39] * 31, dtype=torch.float32)
    packed, absmax = K.quantize_4bit(x, NF4, 32)
    np.testing.assert_array_equal(absmax.numpy(), np.array([1.0, 0.0, 1e-39], np.float32))
    q = np.column_stack([packed.numpy() >> 4, packed.numpy() & 15]).reshape(-1)
    # 1.0 -> 15, -1.0 -> 0, 0 -> 7, a tie -> the lower code 8, just above it -> 9, -0.5 -> nearest -0.525 (code 2)
    np.testing.assert_array_equal(q[:6], [15, 0, 7, 8, 9, 2])
    assert (q[32:] == 7).all()  # all-zero block, 1/1e-39 overflows, and the padding nibble of odd n = 95
    assert packed.numel() == 48


def test_dequantize_rounds_to_bfloat16_and_float16_nearest_even():
    """The top element of a block decodes to absmax exactly (code 1.0), so block maxima whose float32 bits end in
    exactly half a bfloat16 ulp (0x8000), or just either side, are ties and near-ties of the final cast; FLT_MAX
    rounds up to inf in bfloat16. Expected: torch's casts of the same float32 values."""
    high = np.array([0x3F80, 0x3F81, 0x4049, 0x404A, 0x0001, 0x8002, 0x7F7F, 0xFF7F], dtype=np.uint32) << 16
    low = np.array([0x8000, 0x7FFF, 0x8001], dtype=np.uint32)
    maxima = (high[:, None] | low[None, :]).reshape(-1).view(np.float32)
    x = np.zeros((maxima.size, 32), np.float32)
    x[:, 0] = maxima
    x[:, 1] = maxima / 3  # and a value that is not a table value times absmax
    x = torch.from_numpy(x)
    packed, absmax = K.quantize_4bit(x, NF4, 32)
    codes, absmax8 = K.quantize_8bit(x, SIGNED, 32)
    for dtype in (torch.bfloat16, torch.float16):
        want4 = K.dequantize_4bit(packed, absmax, NF4, x.shape, 32).to(dtype)
        want8 = K.dequantize_8bit(codes, absmax8, SIGNED, x.shape, 32).to(dtype)
        got4 = K.dequantize_4bit(packed, absmax, NF4, x.shape, 32, dtype)
        got8 = K.dequantize_8bit(codes, absmax8, SIGNED, x.shape, 32, dtype)
        assert torch.equal(got4.view(torch.int16), want4.view(torch.int16))
        assert torch.equal(got8.view(torch.int16), want8.view(torch.int16))
        if dtype == torch.bfloat16:  # 0x7F7F8000 is a tie to even 0x7F80 (inf); 0x7F7F7FFF stays finite
            top = got4[-6:, 0].to(torch.float32).abs().numpy()
            np.testing.assert_array_equal(np.isinf(top), [True, False, True] * 2)


def test_launchers_accept_any_layout_of_their_tensors():
    """bitsandbytes stores packed as (ceil(n/2), 1); strided views of tables, codes and scales give the same
    results as contiguous copies."""
    x = torch.randn(4, 33)
    packed, absmax = K.quantize_4bit(x, NF4, 64)
    flat = K.dequantize_4bit(packed, absmax, NF4, (4, 33))
    assert torch.equal(K.dequantize_4bit(packed.reshape(-1, 1), absmax, NF4, torch.Size([4, 33])), flat)

    def strided(t):
        return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]  # same values, stride 2

    assert torch.equal(K.quantize_4bit(x, strided(NF4), 64)[0], packed)
    assert torch.equal(K.dequantize_4bit(strided(packed), strided(absmax), strided(NF4), (4, 33)), flat)
    qabsmax, absmax2, offset = K.double_quantize(strided(absmax), strided(SIGNED), 32)
    nested = K.dequantize_4bit(packed, qabsmax, NF4, (4, 33), absmax2=absmax2, offset=offset, nested_code=SIGNED,
                               nested_blocksize=32)
    assert torch.equal(K.dequantize_4bit(packed, strided(qabsmax), NF4, (4, 33), absmax2=strided(absmax2),
                                         offset=offset, nested_code=strided(SIGNED), nested_blocksize=32), nested)
    codes, absmax8 = K.quantize_8bit(x, SIGNED, 32)
    assert torch.equal(K.quantize_8bit(x, strided(SIGNED), 32)[0], codes)
    assert torch.equal(K.dequantize_8bit(strided(codes), strided(absmax8), strided(SIGNED), (4, 33), 32),
                       K.dequantize_8bit(codes, absmax8, SIGNED, (4, 33), 32))
    assert torch.equal(K.double_dequantize(strided(qabsmax), strided(absmax2), offset, strided(SIGNED), 32),
                       K.double_dequantize(qabsmax, absmax2, offset, SIGNED, 32))


# ------------------------------------------------------------------------------------------------------
# 8-bit
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [SIGNED, UNSIGNED, NF4], ids=["signed", "unsigned", "nf4"])
def test_every_midpoint_tie_takes_the_lower_code(code):
    """absmax = 2**-3 makes s = x * 8 exact: each float32 midpoint itself gets the lower code, its upper float32
    neighbour the upper code; 0.0 gets the code of 0.0 (127 signed, 0 unsigned, 7 for NF4)."""
    midpoints = ((code[:-1] + code[1:]) / 2).numpy()
    above = np.nextafter(midpoints, np.float32(2))
    x = torch.from_numpy(np.concatenate([[1.0], midpoints, above, [0.0]]).astype(np.float32) / 8)
    lower = np.arange(code.numel() - 1)
    zero_code = int(np.searchsorted(midpoints, 0.0))  # midpoints strictly below 0
    expected = np.concatenate([[code.numel() - 1], lower, lower + 1, [zero_code]])
    if code.numel() == 16:
        packed, absmax = K.quantize_4bit(x, code, 4096)
        got = np.column_stack([packed.numpy() >> 4, packed.numpy() & 15]).reshape(-1)[: x.numel()]
    else:
        got, absmax = K.quantize_8bit(x, code, 4096)
        got = got.numpy()
    assert absmax.item() == 0.125
    np.testing.assert_array_equal(got, expected)
    assert zero_code == {256: 127 if code[0] < 0 else 0, 16: 7}[code.numel()]


@examples(60)
@given(data=blockwise_inputs(SIGNED.numpy()), signed=st.booleans(), out_dtype=st.sampled_from(DTYPES),
       program_elems=PROGRAM_ELEMS)
def test_quantize_8bit_matches_oracle(data, signed, out_dtype, program_elems):
    x, x32, blocksize = data
    code = SIGNED if signed else UNSIGNED  # unsigned map: negative s goes to code 0 (DESIGN.md)
    with _program_elems(program_elems):
        codes, absmax = K.quantize_8bit(x, code, blocksize)
        want_codes, want_absmax = R.quantize_8bit(x32, code.numpy(), blocksize)
        assert codes.dtype == torch.uint8 and codes.shape == (x.numel(),)
        np.testing.assert_array_equal(codes.numpy(), want_codes)
        np.testing.assert_array_equal(_bits(absmax), _bits(want_absmax))
        out = K.dequantize_8bit(codes, absmax, code, x.shape, blocksize, out_dtype)
    _assert_same_floats(out, R.dequantize_8bit(want_codes, want_absmax, code.numpy(), x32.shape, blocksize), out_dtype)


# ------------------------------------------------------------------------------------------------------
# Double quantization
# ------------------------------------------------------------------------------------------------------


@st.composite
def scales(draw):
    """float32 absmax vectors: from quantizing drawn weights, or drawn directly (wide magnitudes, repeats)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    m = draw(st.one_of(st.integers(1, 700), st.sampled_from([1, 255, 256, 257])))
    kind = draw(st.sampled_from(["uniform", "wide", "repeats", "zeros"]))
    if kind == "uniform":
        values = rng.uniform(0, 1, m) * 10.0 ** rng.uniform(-30, 30)
    elif kind == "wide":
        values = 10.0 ** rng.uniform(-45, 38, m)
    elif kind == "repeats":  # two adjacent float32 values: the mean sits on a float32 midpoint
        a = np.float32(rng.uniform(0.5, 2))
        values = rng.choice([a, np.nextafter(a, np.float32(3))], m).astype(np.float64)
        values[rng.integers(m)] = rng.choice([0.0, 1e-30, float(a)])
    else:
        values = np.zeros(m)
    return values.astype(np.float32)


@examples(40)
@given(absmax=scales(), program_elems=PROGRAM_ELEMS)
def test_double_quantize_matches_oracle(absmax, program_elems):
    with _program_elems(program_elems):
        qabsmax, absmax2, offset = K.double_quantize(torch.from_numpy(absmax), SIGNED, 256)
        want_q, want_a2, want_offset = R.double_quantize(absmax, 256)
        assert isinstance(offset, float) and offset == float(want_offset)
        np.testing.assert_array_equal(qabsmax.numpy(), want_q)
        np.testing.assert_array_equal(_bits(absmax2), _bits(want_a2))
        decoded = K.double_dequantize(qabsmax, absmax2, want_offset, SIGNED, 256)  # np.float32 offset accepted
    np.testing.assert_array_equal(_bits(decoded), _bits(R.double_dequantize(want_q, want_a2, want_offset, 256)))


@examples(30)
@given(data=blockwise_inputs(NF4.numpy(), max_blocks=6), out_dtype=st.sampled_from(DTYPES),
       nested_blocksize=st.sampled_from([32, 256]), program_elems=PROGRAM_ELEMS)
def test_dequantize_4bit_double_quantized_matches_oracle(data, out_dtype, nested_blocksize, program_elems):
    """One fused kernel decodes nested_code[q] * absmax2 + offset (two roundings) and the 4-bit codes."""
    x, x32, blocksize = data
    with _program_elems(program_elems):
        packed, absmax = K.quantize_4bit(x, NF4, blocksize)
        qabsmax, absmax2, offset = K.double_quantize(absmax, SIGNED, nested_blocksize)
        out = K.dequantize_4bit(packed, qabsmax, NF4, x.shape, blocksize, out_dtype, absmax2=absmax2, offset=offset,
                                nested_code=SIGNED, nested_blocksize=nested_blocksize)
    want_q, want_a2, want_offset = R.double_quantize(absmax.numpy(), nested_blocksize)
    scales32 = R.double_dequantize(want_q, want_a2, want_offset, nested_blocksize)
    # The decoded scales of a weight may be negative or zero; the 4-bit oracle wants non-negative scales, and
    # code[q] * scale is all it computes, so the expectation is formed here, in float32, from oracle parts.
    q = np.column_stack([packed.numpy() >> 4, packed.numpy() & 15]).reshape(-1)[: x.numel()]
    expected = NF4.numpy()[q] * np.repeat(scales32, blocksize)[: x.numel()]
    _assert_same_floats(out, expected.reshape(x32.shape), out_dtype)


@pytest.mark.parametrize("n, blocksize, nested_blocksize", [
    (64 * 1024, 64, 256),  # 1024 blocks per program: absmax2 per block, no masks (EVEN)
    (64 * 1000 + 5, 64, 256),  # partial last block and odd n: masked
    (32 * 8192, 32, 32),  # many programs, absmax2 per block
    (4096 * 3, 4096, 256),  # blocks of a program share one absmax2 value
])
def test_dequantize_4bit_launches_of_many_blocks_match_oracle(n, blocksize, nested_blocksize):
    """Programs of hundreds of blocks (the interpreter's launch config for real weights): the per-block absmax2
    load and the unmasked (EVEN) kernel, which the drawn inputs above (at most 6 blocks) do not reach."""
    blocks_per_program = K._dequant_4bit_config(n, blocksize)
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3.0
    packed, absmax = K.quantize_4bit(x, NF4, blocksize)
    qabsmax, absmax2, offset = K.double_quantize(absmax, SIGNED, nested_blocksize)
    scales32 = R.double_dequantize(qabsmax.numpy(), absmax2.numpy(), offset, nested_blocksize)
    q = np.column_stack([packed.numpy() >> 4, packed.numpy() & 15]).reshape(-1)[:n]
    expected = NF4.numpy()[q] * np.repeat(scales32, blocksize)[:n]
    for dtype in DTYPES:
        out = K.dequantize_4bit(packed, qabsmax, NF4, (n,), blocksize, dtype, absmax2=absmax2, offset=offset,
                                nested_code=SIGNED, nested_blocksize=nested_blocksize)
        _assert_same_floats(out, expected, dtype)
    if n == 64 * 1024 and qlora.interpreter_active():
        assert blocks_per_program > nested_blocksize and n % (blocks_per_program * blocksize) == 0


@pytest.mark.skipif(not qlora.interpreter_active(), reason="the interpreter's launch config")
def test_dequantize_4bit_interpreter_config_fills_its_programs():
    """The demo's 1536 x 384 weight at blocksize 64 (9216 blocks) runs 9 unmasked programs of 1024 blocks, not 3 of
    4096 (a third masked off); every config covers the tensor within the per-program cap (one block at least)."""
    assert K._dequant_4bit_config(1536 * 384, 64) == 1024
    for n, blocksize in [(1, 32), (100, 64), (13_000, 64), (1536 * 384, 4096), (5 * 2**20 + 3, 32), (2**22, 128)]:
        blocks = K._dequant_4bit_config(n, blocksize)
        assert blocks & (blocks - 1) == 0 and blocks >= 1
        assert blocks * blocksize <= max(K._INTERPRETER_ELEMS, blocksize)
        programs = -(-n // (blocks * blocksize))
        # No more than a quarter of the lanes masked off, unless the whole tensor fits in one program.
        assert programs == 1 or programs * blocks * blocksize - n <= n // 4, (n, blocksize, blocks)


# ------------------------------------------------------------------------------------------------------
# Device helpers imported by the fused matmul (kernels/linear.py)
# ------------------------------------------------------------------------------------------------------


@triton.jit
def _helpers_probe(packed_ptr, absmax_ptr, absmax2_ptr, nested_code_ptr, offset, code_ptr, out_ptr, n,
                   BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    q = K.unpack_4bit(packed_ptr, idx, mask)
    scale = TL.block_scale(absmax_ptr, absmax2_ptr, nested_code_ptr, offset, idx // BLOCKSIZE, mask,
                           DOUBLE_QUANT, 256)
    tl.store(out_ptr + idx, tl.load(code_ptr + q, mask=mask, other=0.0) * scale, mask=mask)


@examples(15)
@given(data=blockwise_inputs(NF4.numpy(), max_blocks=5), double_quant=st.booleans())
def test_device_helpers_decode_like_the_oracle(data, double_quant):
    x, x32, blocksize = data
    packed, absmax = K.quantize_4bit(x, NF4, blocksize)
    want_packed, want_absmax = R.quantize_4bit(x32, NF4.numpy(), blocksize)
    out = torch.empty(x.numel())
    if double_quant:
        qabsmax, absmax2, offset = K.double_quantize(absmax, SIGNED)
        args = (qabsmax, absmax2, SIGNED, offset)
        scales32 = R.double_dequantize(*R.double_quantize(want_absmax))
    else:
        args = (absmax, absmax, absmax, 0.0)
        scales32 = want_absmax
    _helpers_probe[(triton.cdiv(x.numel(), 256),)](packed, *args, NF4, out, x.numel(), BLOCKSIZE=blocksize,
                                                   BLOCK=256, DOUBLE_QUANT=double_quant)
    q = np.column_stack([want_packed >> 4, want_packed & 15]).reshape(-1)[: x.numel()]
    np.testing.assert_array_equal(_bits(out), _bits(NF4.numpy()[q] * np.repeat(scales32, blocksize)[: x.numel()]))


# ------------------------------------------------------------------------------------------------------
# Empty inputs (DESIGN.md)
# ------------------------------------------------------------------------------------------------------


def test_empty_inputs():
    packed, absmax = K.quantize_4bit(torch.empty(0, 3), NF4)
    assert packed.shape == (0,) and absmax.shape == (0,)
    assert K.dequantize_4bit(packed, absmax, NF4, (0, 3), dtype=torch.bfloat16).shape == (0, 3)
    codes, absmax8 = K.quantize_8bit(torch.empty(0), SIGNED, 256)
    assert codes.shape == (0,) and absmax8.shape == (0,)
    assert K.dequantize_8bit(codes, absmax8, SIGNED, (0,), 256).shape == (0,)
    qabsmax, absmax2, offset = K.double_quantize(torch.empty(0), SIGNED)
    assert qabsmax.shape == (0,) and absmax2.shape == (0,) and offset == 0.0
    assert K.double_dequantize(qabsmax, absmax2, offset, SIGNED).shape == (0,)


# ------------------------------------------------------------------------------------------------------
# 64-bit address arithmetic
# ------------------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["QLORA_INTERPRET"] = "0"
    import qlora  # noqa: F401  (interpreter off before the kernels are decorated)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from qlora.kernels import quantize

    wanted = set(sys.argv[1:])
    report = {}
    for spec in quantize.compile_specs():
        if spec.name in wanted:
            src = ASTSource(fn=spec.fn, signature=dict(spec.signature), constexprs=dict(spec.constexprs))
            asm = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(spec.options)).asm
            report[spec.name] = {"ttir": asm["ttir"], "ptx": asm["ptx"]}
    print(json.dumps(report))
""")

# Pointers that address one entry per element or per block of a tensor that may exceed 2**31 entries. The code
# tables (16 or 256 entries) may be indexed with 32-bit offsets.
_STREAMED = {"x_ptr", "packed_ptr", "absmax_ptr", "out_ptr", "codes_ptr", "absmax2_ptr"}


def _offset_types_by_pointer(ttir: str) -> dict[str, set[str]]:
    """For each pointer argument, the integer types of the offsets added to pointers derived from it in the TTIR
    (following tt.splat / tt.broadcast / tt.addptr / tt.expand_dims / tt.reshape chains)."""
    args = re.search(r"tt\.func public @\w+\((.*?)\)\s*attributes", ttir, re.S).group(1)
    root = {name: name for name in re.findall(r"%(\w+): !tt\.ptr", args)}
    offsets: dict[str, set[str]] = {}
    for line in ttir.splitlines():
        m = re.match(r"\s*%(\S+) = tt\.(splat|broadcast|addptr|expand_dims|reshape) %(\S+?)[, ]", line)
        if not m or m.group(3) not in root:
            continue
        result, op, source = m.groups()
        root[result] = root[source]
        if op == "addptr":  # "... : <pointer type>, <offset type>": the offset's element type is the last iN
            offset_type = re.findall(r"(?:x|, )(i\d+)\b", line.split(" : ", 1)[1])[-1]
            offsets.setdefault(root[source], set()).add(offset_type)
    return offsets


@pytest.fixture(scope="module")
def compiled_for_gpu():
    """TTIR and PTX (sm_90) of one spec per quantize kernel, compiled in a subprocess with the interpreter off
    (no GPU needed)."""
    names = ["q4_bf16_b64", "q4_fp16_b64", "q4_bf16_b4096", "dq4_bf16", "dq4_bf16_nested", "q8_fp32_b256",
             "dq8_fp32_offset"]
    env = {**os.environ, "QLORA_INTERPRET": "0", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, *names], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(report) == sorted(names)
    return report


def test_streamed_addresses_are_64_bit(compiled_for_gpu):
    """Instead of allocating 2**31 elements: every offset added to a pointer that streams elements or blocks is
    i64 in the compiled kernels' TTIR, so no index product wraps at 2**31."""
    for name, asm in compiled_for_gpu.items():
        streamed = {ptr: types for ptr, types in _offset_types_by_pointer(asm["ttir"]).items() if ptr in _STREAMED}
        assert len(streamed) >= 3, f"{name}: streamed pointers not found in the TTIR: {streamed}"
        for ptr, types in streamed.items():
            assert types == {"i64"}, f"{name}: {ptr} gets offsets of type {types}"


def test_gpu_arithmetic_is_ieee(compiled_for_gpu):
    """The roundings SPEC counts survive compilation: float32 divisions are div.rn (Triton's `/` would give
    div.approx), no multiply-add is contracted into an fma (two roundings of the nested scale), and no
    flush-to-zero drops subnormal inputs."""
    for name, asm in compiled_for_gpu.items():
        ptx = asm["ptx"]
        assert "div.approx" not in ptx and "div.full" not in ptx, name
        # A bare mul.f32/add.f32 pair may still be contracted by ptxas; enable_fp_fusion=False emits .rn forms.
        assert not re.search(r"\b(?:fma|mul|add|sub)\.f32\b|fma\.rn\.f32", ptx), name
        assert ".ftz" not in ptx, name
        if name.startswith("q"):
            assert "div.rn.f32" in ptx, name  # 1/absmax
        if name == "dq4_bf16_nested":
            # nested_code[q] * absmax2, then + offset: two roundings
            assert "mul.rn.f32" in ptx and "add.rn.f32" in ptx, name


# ------------------------------------------------------------------------------------------------------
# Rejected arguments: each names the argument
# ------------------------------------------------------------------------------------------------------

X = torch.randn(100)
P, A = K.quantize_4bit(X, NF4, 64)  # packed (50,), absmax (2,)
QA, A2, OFF = K.double_quantize(A, SIGNED)
C8, A8 = K.quantize_8bit(X, SIGNED, 64)
NESTED = {"absmax2": A2, "offset": OFF, "nested_code": SIGNED}
UNSORTED = NF4.flip(0).contiguous()
WITH_NAN = NF4.clone()
WITH_NAN[3] = float("nan")


@pytest.mark.parametrize("call, error, pattern", [
    (lambda: K.quantize_4bit(X.int(), NF4), TypeError, r"x must have dtype in \(float32, float16, bfloat16\)"),
    (lambda: K.quantize_4bit(X > 0, NF4), TypeError, r"x must have dtype in .* got bool"),
    (lambda: K.quantize_4bit(X.double(), NF4), TypeError, r"x must have dtype in .* got float64"),
    (lambda: K.quantize_4bit(X.tolist(), NF4), TypeError, r"x must be a torch.Tensor"),
    (lambda: K.quantize_4bit(torch.tensor([1.0, float("nan")]), NF4), ValueError, r"x contains 1 non-finite"),
    (lambda: K.quantize_4bit(torch.tensor([float("inf"), -float("inf")]), NF4), ValueError, r"x contains 2 non-finite"),
    (lambda: K.quantize_4bit(X, NF4, 48), ValueError, r"blocksize must be one of \(32, 64"),
    (lambda: K.quantize_4bit(X, NF4, 8192), ValueError, r"blocksize must be one of"),
    (lambda: K.quantize_4bit(X, NF4, True), ValueError, r"blocksize must be one of"),
    (lambda: K.quantize_4bit(X, NF4.double()), TypeError, r"code must have dtype in \(float32\)"),
    (lambda: K.quantize_4bit(X, NF4[:15]), ValueError, r"code must have 16 entries, got 15"),
    (lambda: K.quantize_4bit(X, SIGNED), ValueError, r"code must have 16 entries, got 256"),
    (lambda: K.quantize_4bit(X, NF4.reshape(4, 4)), ValueError, r"code must be 1-dimensional"),
    (lambda: K.quantize_4bit(X, UNSORTED), ValueError, r"code must be sorted ascending"),
    (lambda: K.quantize_4bit(X, WITH_NAN), ValueError, r"code contains 1 non-finite"),
    (lambda: K.quantize_4bit(X.to("meta"), NF4), ValueError, r"x is on meta, but the kernels run under the Triton"),
    (lambda: K.quantize_4bit(X, NF4.to("meta")), ValueError, r"code is on meta"),
    (lambda: K.dequantize_4bit(P.to(torch.int8), A, NF4, (100,)), TypeError, r"packed must have dtype in \(uint8\)"),
    (lambda: K.dequantize_4bit(P[:-1], A, NF4, (100,)), ValueError, r"packed has 49 elements, expected 50"),
    (lambda: K.dequantize_4bit(P, A, NF4, (10, 11)), ValueError, r"packed has 50 elements, expected 55"),
    (lambda: K.dequantize_4bit(P, A[:1], NF4, (100,)), ValueError, r"absmax has 1 elements, expected 2"),
    (lambda: K.dequantize_4bit(P, A, NF4, (100,), 32), ValueError, r"absmax has 2 elements, expected 4"),
    (lambda: K.dequantize_4bit(P, A.half(), NF4, (100,)), TypeError, r"absmax must have dtype in \(float32, uint8\)"),
    (lambda: K.dequantize_4bit(P, A, NF4, (-100,)), ValueError, r"shape must be a sequence of non-negative ints"),
    (lambda: K.dequantize_4bit(P, A, NF4, (100.0,)), ValueError, r"shape must be a sequence"),
    (lambda: K.dequantize_4bit(P, A, NF4, (100,), 64, torch.int32), TypeError, r"dtype must be one of float32"),
    (lambda: K.dequantize_4bit(P, A, NF4[:8], (100,)), ValueError, r"code must have 16 entries"),
    (lambda: K.dequantize_4bit(P, A, NF4, (100,), 60), ValueError, r"blocksize must be one of"),
    (lambda: K.dequantize_4bit(P, QA, NF4, (100,)), ValueError,
     r"absmax is uint8 \(double-quantized\), so absmax2, offset, nested_code must be given"),
    (lambda: K.dequantize_4bit(P, QA, NF4, (100,), absmax2=A2, nested_code=SIGNED), ValueError,
     r"so offset must be given"),
    (lambda: K.dequantize_4bit(P, A, NF4, (100,), absmax2=A2), ValueError,
     r"absmax is float32 \(not double-quantized\), so absmax2 must not be given"),
    (lambda: K.dequantize_4bit(P, QA, NF4, (100,), **{**NESTED, "absmax2": torch.ones(2)}), ValueError,
     r"absmax2 has 2 elements, expected 1"),
    (lambda: K.dequantize_4bit(P, QA, NF4, (100,), **{**NESTED, "absmax2": A2.double()}), TypeError,
     r"absmax2 must have dtype in \(float32\)"),
    (lambda: K.dequantize_4bit(P, QA, NF4, (100,), **{**NESTED, "nested_code": NF4}), ValueError,
     r"nested_code must have 256 entries"),
    (lambda: K.dequantize_4bit(P, QA, NF4, (100,), **{**NESTED, "offset": float("nan")}), ValueError,
     r"offset must be a finite float"),
    (lambda: K.dequantize_4bit(P, QA, NF4, (100,), **{**NESTED, "offset": 0.1}), ValueError,
     r"offset must be exactly representable in float32"),
    (lambda: K.dequantize_4bit(P, QA, NF4, (100,), **NESTED, nested_blocksize=100), ValueError,
     r"nested_blocksize must be one of"),
    (lambda: K.quantize_8bit(X, NF4, 64), ValueError, r"code must have 256 entries, got 16"),
    (lambda: K.quantize_8bit(X.to(torch.int64), SIGNED, 64), TypeError, r"x must have dtype in"),
    (lambda: K.quantize_8bit(X, SIGNED, 100), ValueError, r"blocksize must be one of"),
    (lambda: K.quantize_8bit(X, SIGNED.flip(0).contiguous(), 64), ValueError, r"code must be sorted ascending"),
    (lambda: K.quantize_8bit(torch.tensor([float("nan")]), SIGNED, 64), ValueError, r"x contains 1 non-finite"),
    (lambda: K.dequantize_8bit(C8[:-1], A8, SIGNED, (100,), 64), ValueError, r"codes has 99 elements, expected 100"),
    (lambda: K.dequantize_8bit(C8, A8[:1], SIGNED, (100,), 64), ValueError, r"absmax has 1 elements, expected 2"),
    (lambda: K.dequantize_8bit(C8.to(torch.int16), A8, SIGNED, (100,), 64), TypeError, r"codes must have dtype"),
    (lambda: K.dequantize_8bit(C8, A8, SIGNED, (100,), 64, torch.float64), TypeError, r"dtype must be one of"),
    (lambda: K.double_quantize(A.half(), SIGNED), TypeError, r"absmax must have dtype in \(float32\)"),
    (lambda: K.double_quantize(A.reshape(1, 2), SIGNED), ValueError, r"absmax must be 1-dimensional"),
    (lambda: K.double_quantize(-A, SIGNED), ValueError, r"absmax must be non-negative"),
    (lambda: K.double_quantize(torch.tensor([1.0, float("inf")]), SIGNED), ValueError, r"absmax contains 1 non-fin"),
    (lambda: K.double_quantize(A, SIGNED, 300), ValueError, r"blocksize must be one of"),
    (lambda: K.double_dequantize(QA, A2, OFF, SIGNED, 100), ValueError, r"blocksize must be one of"),
    (lambda: K.double_dequantize(QA, torch.ones(2), OFF, SIGNED), ValueError, r"absmax2 has 2 elements, expected 1"),
    (lambda: K.double_dequantize(QA.float(), A2, OFF, SIGNED), TypeError, r"qabsmax must have dtype in \(uint8\)"),
    (lambda: K.double_dequantize(QA, A2, float("inf"), SIGNED), ValueError, r"offset must be a finite float"),
    (lambda: K.double_dequantize(QA, A2, "0.5", SIGNED), ValueError, r"offset must be a finite float"),
])  # fmt: skip
def test_rejects_bad_arguments(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()
