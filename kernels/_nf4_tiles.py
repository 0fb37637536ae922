"""Device helpers that decode tiles of an NF4 weight for the matmul kernels of :mod:`.linear` (the decode GEMV and
the fused tiled kernel): the value of a code (a select tree, a warp shuffle from a lane-held table, or the
interpreter's gather), the scales of a tile's blocks, and whole W tiles a packed byte at a time
(:func:`_nf4_pair_tile`), a 32-bit word at a time (:func:`_nf4_word_pairs_tile`, the NVIDIA GPUs' decode; in W's
column order or in an MMA's fragment order, :func:`_fragment_rows`), a 64-bit word at a time into a byte-major tile
(:func:`_nf4_word_tile`, the interpreter's), or code by code (:func:`_dequant_tile`). Every decoded value is
``code[q] * scale`` in float32, rounded to the compute dtype where the tile is, as ``dequantize_4bit`` computes it.
Which decode a kernel takes, and what it costs, is documented where the kernel chooses (kernels/linear.py) and in
perf/README.md.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._tl import INTERPRETER, block_scale, interpreted_directly, load_2d, round_to, udiv
from .quantize import unpack_4bit

@triton.jit
def _code_value(code_ptr, q):
    """code[q] for a tensor of 4-bit codes, by a select tree over the 16 table entries (no per-element gather,
    which the software pipeliner of the tiled kernel would stage through shared memory)."""
    b0 = (q & 1) != 0
    b1 = (q & 2) != 0
    b2 = (q & 4) != 0
    b3 = (q & 8) != 0
    l0 = tl.where(b0, tl.load(code_ptr + 1), tl.load(code_ptr + 0))
    l1 = tl.where(b0, tl.load(code_ptr + 3), tl.load(code_ptr + 2))
    l2 = tl.where(b0, tl.load(code_ptr + 5), tl.load(code_ptr + 4))
    l3 = tl.where(b0, tl.load(code_ptr + 7), tl.load(code_ptr + 6))
    l4 = tl.where(b0, tl.load(code_ptr + 9), tl.load(code_ptr + 8))
    l5 = tl.where(b0, tl.load(code_ptr + 11), tl.load(code_ptr + 10))
    l6 = tl.where(b0, tl.load(code_ptr + 13), tl.load(code_ptr + 12))
    l7 = tl.where(b0, tl.load(code_ptr + 15), tl.load(code_ptr + 14))
    m0 = tl.where(b1, l1, l0)
    m1 = tl.where(b1, l3, l2)
    m2 = tl.where(b1, l5, l4)
    m3 = tl.where(b1, l7, l6)
    return tl.where(b3, tl.where(b2, m3, m2), tl.where(b2, m1, m0))


@triton.jit
def _dequant_tile(packed_ptr, absmax_ptr, absmax2_ptr, nested_code_ptr, code_ptr, offset,
                  rows, cols, col0, row_len, mask_rows, mask_cols,
                  BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                  ROW_SCALE: tl.constexpr, TRANSPOSED: tl.constexpr, INDEX_64: tl.constexpr):
    """float32 ``code[q] * scale`` of W (?, row_len) at ``rows`` x ``cols`` (cols in [col0, col0 + tile)):
    shape (len(cols), len(rows)) if TRANSPOSED (a W^T tile) else (len(rows), len(cols)).

    ROW_SCALE: row_len is a multiple of BLOCKSIZE and the column tile divides BLOCKSIZE, so each tile row lies in
    one 4-bit block whose scale is loaded once per row; otherwise scales are gathered per element. INDEX_64: the
    flat index may pass 2**31. Masked-off elements come back finite; callers zero the other operand there.
    """
    if INDEX_64:
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
    else:
        rows = rows.to(tl.int32)
        cols = cols.to(tl.int32)
    if TRANSPOSED:
        idx = rows[None, :] * row_len + cols[:, None]
        mask = mask_cols[:, None] & mask_rows[None, :]
    else:
        idx = rows[:, None] * row_len + cols[None, :]
        mask = mask_rows[:, None] & mask_cols[None, :]
    values = _code_value(code_ptr, unpack_4bit(packed_ptr, idx, mask))
    if ROW_SCALE:
        scale = block_scale(absmax_ptr, absmax2_ptr, nested_code_ptr, offset, (rows * row_len + col0) // BLOCKSIZE,
                            mask_rows, DOUBLE_QUANT, NESTED_BLOCKSIZE)
        if TRANSPOSED:
            return values * scale[None, :]
        else:
            return values * scale[:, None]
    else:
        return values * block_scale(absmax_ptr, absmax2_ptr, nested_code_ptr, offset, idx // BLOCKSIZE, mask,
                                    DOUBLE_QUANT, NESTED_BLOCKSIZE)



@tl.core.builtin
def _nvidia_target(_semantic=None):
    """constexpr True when the kernel is being compiled for an NVIDIA GPU (the compile options' backend), False
    for AMD; the interpreter never reaches it (callers test ``INTERPRETER`` first)."""
    return tl.constexpr(getattr(_semantic.builder.options, "backend_name", "") == "cuda")


@tl.core.builtin
def _wgmma_target(_semantic=None):
    """constexpr True when compiling for an NVIDIA GPU of compute capability 9.0 or above (warpgroup MMA, whose B
    operand is read from shared memory), False for earlier NVIDIA GPUs and AMD."""
    options = _semantic.builder.options
    if getattr(options, "backend_name", "") != "cuda":
        return tl.constexpr(False)
    digits = "".join(ch for ch in str(getattr(options, "arch", "") or "") if ch.isdigit())
    return tl.constexpr(bool(digits) and int(digits) >= 90)


@tl.core.builtin
def _specialized_to_one(value, _semantic=None):
    """constexpr True when ``value`` is the constant 1, as Triton makes an int argument equal to 1 at a launch."""
    return tl.constexpr(isinstance(value, tl.constexpr) and value.value == 1)


@triton.jit
def _lane_code_table(code_ptr):
    """The scalar ``code[L % 16]`` (float32) in the thread of warp lane L: the 16-entry table spread over the lanes
    of each warp, twice, for :func:`_lane_lookup`. A scalar on purpose: it is broadcast into each thread's own
    registers (a splat), never moved between threads, whatever layout the lookup's index has."""
    return tl.inline_asm_elementwise(
        """{
        .reg .u32 l, t;
        .reg .pred q0, q1, q2, q3;
        .reg .b32 a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, c0, c1;
        mov.u32 l, %laneid;
        and.b32 t, l, 1; setp.ne.u32 q0, t, 0;
        and.b32 t, l, 2; setp.ne.u32 q1, t, 0;
        and.b32 t, l, 4; setp.ne.u32 q2, t, 0;
        and.b32 t, l, 8; setp.ne.u32 q3, t, 0;
        selp.b32 a0, $2, $1, q0; selp.b32 a1, $4, $3, q0; selp.b32 a2, $6, $5, q0; selp.b32 a3, $8, $7, q0;
        selp.b32 a4, $10, $9, q0; selp.b32 a5, $12, $11, q0; selp.b32 a6, $14, $13, q0; selp.b32 a7, $16, $15, q0;
        selp.b32 b0, a1, a0, q1; selp.b32 b1, a3, a2, q1; selp.b32 b2, a5, a4, q1; selp.b32 b3, a7, a6, q1;
        selp.b32 c0, b1, b0, q2; selp.b32 c1, b3, b2, q2;
        selp.b32 $0, c1, c0, q3;
        }""",
        "=r" + ",r" * 16,
        [tl.load(code_ptr + 0), tl.load(code_ptr + 1), tl.load(code_ptr + 2), tl.load(code_ptr + 3),
         tl.load(code_ptr + 4), tl.load(code_ptr + 5), tl.load(code_ptr + 6), tl.load(code_ptr + 7),
         tl.load(code_ptr + 8), tl.load(code_ptr + 9), tl.load(code_ptr + 10), tl.load(code_ptr + 11),
         tl.load(code_ptr + 12), tl.load(code_ptr + 13), tl.load(code_ptr + 14), tl.load(code_ptr + 15)],
        dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _lane_lookup(table, index):
    """``code[index % 16]`` (float32) for an int32 tensor ``index``, ``table`` from :func:`_lane_code_table`:
    one warp shuffle per element, reading the table entry held by lane ``index % 32``
    (``shfl.sync.idx`` uses the low 5 bits of the lane index; the table repeats every 16 lanes, so bits 4 and up
    of ``index`` do not matter). Every lane of the warp must execute it (no divergent branch around it)."""
    return tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x1f, 0xffffffff;", "=r,r,r", [table, index],
                                     dtype=tl.float32, is_pure=True, pack=1)


def _word_decode_asm(cvt: str) -> str:
    """PTX of :func:`_word_tile`'s decode, one call per word (pack=2 over the word's two copies): output $k
    (k = 0..3) holds columns 2k (low half: from $4, the word, and $6, its scale) and 2k + 1 (high half: from their
    copies $5 and $7) rounded by ``cvt`` (``d = {hi: a, lo: b}``); $8 (and its copy $9) is the lane table. Column
    e is byte e // 2's high nibble for even e, its low one for odd e: shifts 8k + 4 and 8k. tests/test_linear.py
    executes it on a CPU (``test_word_decode_assembly_computes_the_column_pairs``)."""
    lines = ["{ .reg .b32 i0, i1; .reg .f32 v0, v1;"]
    for k in range(4):
        lines.append(f"shr.b32 i0, $4, {8 * k + 4};")
        lines.append(f"shr.b32 i1, $5, {8 * k};" if k else "mov.b32 i1, $5;")
        lines.append("shfl.sync.idx.b32 v0, $8, i0, 0x1f, 0xffffffff; shfl.sync.idx.b32 v1, $8, i1, 0x1f, 0xffffffff;")
        lines.append(f"mul.rn.f32 v0, v0, $6; mul.rn.f32 v1, v1, $7; {cvt} ${k}, v1, v0;")
    lines.append("}")
    return " ".join(lines)


_WORD_DECODE_BF16 = tl.constexpr(_word_decode_asm("cvt.rn.bf16x2.f32"))
_WORD_DECODE_F16 = tl.constexpr(_word_decode_asm("cvt.rn.f16x2.f32"))


@triton.jit
def _column_pair(words, scale, table, shift_first: tl.constexpr, dtype: tl.constexpr):
    """(R, C, 2) ``dtype``: the values of two adjacent columns of each word (nibbles at ``shift_first`` and
    ``shift_first - 4``), as :func:`_word_tile`'s assembly call returns them, by Triton operations."""
    R: tl.constexpr = words.shape[0]
    C: tl.constexpr = words.shape[1]
    nibbles = tl.join(words >> shift_first, words >> (shift_first - 4)) & 15
    values = tl.reshape(tl.gather(table, tl.reshape(nibbles.to(tl.int32), (R * C * 2,)), 0), (R, C, 2))
    return round_to(values * scale[:, :, None], dtype)


# The orders a decoded W tile can take (:func:`_column_tile`): W's own, or the fragment order of one of the MMAs.
FRAGMENT_NONE = tl.constexpr(0)
FRAGMENT_MMA = tl.constexpr(1)
FRAGMENT_WGMMA = tl.constexpr(2)


@triton.jit
def _word_tile(words, scale, table, dtype: tl.constexpr, FRAGMENT: tl.constexpr = 0):
    """(R, 8 C) ``dtype``: ``round(code[q] * scale)`` of the eight 4-bit codes q of each uint32 word of ``words``
    (R, C), in W's column order (column 8 c + e holds code e of word c: byte e // 2, high nibble first);
    ``scale`` (R, C) float32, one per word. ``FRAGMENT``: the tile in fragment order instead (:func:`_column_tile`).

    On NVIDIA GPUs with a 16-bit ``dtype`` one inline-assembly block per word (``_WORD_DECODE_*``): per column one
    shift, one shuffle from the lane table (:func:`_lane_code_table`) and one multiply, one round per two columns;
    no nibble masks (the shuffle reads the low 5 bits of its index and the table repeats every 16 lanes). Elsewhere
    ``table`` is the float32 (16,) code table and :func:`_column_pair` computes the same four column pairs; both
    are assembled into the tile by the same joins."""
    R: tl.constexpr = words.shape[0]
    C: tl.constexpr = words.shape[1]
    if not INTERPRETER and _nvidia_target() and dtype != tl.float32:
        # The word twice along a new last axis: pack=2 hands one asm call both copies, and each output register
        # holds two adjacent columns (no repacking of 16-bit halves afterwards).
        w2 = tl.join(words, words)
        s2 = tl.join(scale, scale)
        if dtype == tl.bfloat16:
            c0, c1, c2, c3 = tl.inline_asm_elementwise(
                _WORD_DECODE_BF16, "=r,=r,=r,=r,r,r,r,r,r,r", [w2, s2, table],
                dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)
        else:
            c0, c1, c2, c3 = tl.inline_asm_elementwise(
                _WORD_DECODE_F16, "=r,=r,=r,=r,r,r,r,r,r,r", [w2, s2, table],
                dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=2)
    else:
        c0 = _column_pair(words, scale, table, 4, dtype)
        c1 = _column_pair(words, scale, table, 12, dtype)
        c2 = _column_pair(words, scale, table, 20, dtype)
        c3 = _column_pair(words, scale, table, 28, dtype)
    return _column_tile(c0, c1, c2, c3, FRAGMENT)


@triton.jit
def _column_tile(c0, c1, c2, c3, FRAGMENT: tl.constexpr):
    """(R, 8 C): the tile whose row i, column 8 c + 2 k + pair is ``c_k[i, c, pair]`` (c_k (R, C, 2): columns 2k
    and 2k + 1 of each word), or that tile in fragment order (``FRAGMENT`` ``FRAGMENT_MMA`` / ``FRAGMENT_WGMMA``, R
    64 or 128 and C = 16: the comment above :func:`_fragment_rows`). Only joins, permutes and reshapes: on a GPU
    no value moves between threads."""
    R: tl.constexpr = c0.shape[0]
    C: tl.constexpr = c0.shape[1]
    # Joined to (R, C, pair, k0, k1), permuted to (R, C, k1, k0, pair): column 8 c + 4 k1 + 2 k0 + pair.
    joined = tl.join(tl.join(c0, c1), tl.join(c2, c3))
    # Row i = 64 r1 + 32 r0 + 16 w1 + 8 w0 + g (r1 = 0 for 64 rows) and word c = 8 c1 + 4 c0 + 2 i1 + i0 as bits,
    # permuted to row (r1, w1, w0, r0, g) and column (i1, i0, c1, c0, k1, k0, pair) (mma) or (i1, i0, k1, k0, c1,
    # c0, pair) (wgmma). One return after the branches: Triton would compile code after a returning branch too.
    if FRAGMENT == FRAGMENT_MMA:
        bits = tl.reshape(joined, (R // 64, 2, 2, 2, 8, 2, 2, 2, 2, 2, 2, 2))
        tile = tl.reshape(tl.permute(bits, (0, 2, 3, 1, 4, 7, 8, 5, 6, 11, 10, 9)), (R, C * 8))
    elif FRAGMENT == FRAGMENT_WGMMA:
        bits = tl.reshape(joined, (R // 64, 2, 2, 2, 8, 2, 2, 2, 2, 2, 2, 2))
        tile = tl.reshape(tl.permute(bits, (0, 2, 3, 1, 4, 7, 8, 11, 10, 5, 6, 9)), (R, C * 8))
    else:
        tile = tl.reshape(tl.permute(joined, (0, 1, 4, 3, 2)), (R, C * 8))
    return tile


# Fragment order: the GEMV's W tile (64 or 128 rows x 128 columns, 4 warps) decoded straight into the MMA's first
# operand as the MMA reads it from registers. The words come in the load's own layout: thread t of warp v holds words
# 4 c .. 4 c + 3 (c = t % 4; 16 bytes, columns 32 c .. 32 c + 31) of rows g + 8 v + 32 r (g = t // 4). Both MMAs want
# rows g + 8 a + 16 v + 64 b in that thread; for the columns:
# - FRAGMENT_WGMMA (sm_90's warpgroup MMA, A from registers): columns 2 c + h + 8 e + 16 j (wgmma's A fragment);
# - FRAGMENT_MMA (mma.sync, sm_80): columns 8 c + e + 32 j (Triton's operand layout with 8 consecutive values along K
#   per thread, kWidth 8).
# No value has to move between threads: relabelling the tile's rows and columns (bit permutations of their indices)
# makes the decoded tile the operand itself, where W's column order takes a pass through shared memory per K step
# (sm_90: 16 STS.128, 16 LDSM and a barrier per thread; sm_80: 16 STS.128 and 16 LDS.128). The columns'
# relabelling is applied to x too (:func:`_fragment_columns`), so the dot sums the same products in another order;
# the rows' (:func:`_fragment_rows`) is undone by the rows W is loaded from. (FRAGMENT_* are defined above
# :func:`_word_tile`.)


@triton.jit
def _fragment_rows(BLOCK_N: tl.constexpr):
    """int32 (BLOCK_N,) (64 or 128): the row of W's tile (past its first) to load at position i = 64 r1 + 32 r0 +
    16 w1 + 8 w0 + g of the words, so that row L = 64 r1 + 32 w1 + 16 w0 + 8 r0 + g of the fragment-ordered tile
    (:func:`_column_tile`) is the tile's row L."""
    i = tl.arange(0, BLOCK_N)
    return (i & 7) | (((i >> 5) & 1) << 3) | (((i >> 3) & 3) << 4) | ((i >> 6) << 6)


@triton.jit
def _fragment_columns(x, FRAGMENT: tl.constexpr):
    """(R, 128): ``x`` (R, 128) with its columns in the fragment order of the W tile it meets (:func:`_column_tile`):
    column k = 64 i1 + 32 i0 + 16 c1 + 8 c0 + e (FRAGMENT_MMA) or 64 i1 + 32 i0 + 16 k1 + 8 k0 + 4 c1 + 2 c0 + h
    (FRAGMENT_WGMMA, e = 2 k + h) holds x's column 64 c1 + 32 c0 + 16 i1 + 8 i0 + e."""
    R: tl.constexpr = x.shape[0]
    if FRAGMENT == FRAGMENT_MMA:  # runs of 8 columns stay together (16-byte loads of x)
        x = tl.reshape(tl.permute(tl.reshape(x, (R, 2, 2, 2, 2, 8)), (0, 3, 4, 1, 2, 5)), (R, 128))
    else:
        x = tl.reshape(tl.permute(tl.reshape(x, (R, 2, 2, 2, 2, 2, 2, 2)), (0, 3, 4, 5, 6, 1, 2, 7)), (R, 128))
    return x


@triton.jit
def _pair_tables(code_ptr):
    """What :func:`_nf4_pair_tile` looks codes up in, built once per program: under the interpreter the float32
    (256,) tables ``code[b >> 4]`` and ``code[b & 15]`` over byte values b (one gather per packed byte and
    nibble); on NVIDIA GPUs the lane-held table of :func:`_lane_code_table` (twice); on AMD nothing (select tree)."""
    if INTERPRETER:
        table = tl.load(code_ptr + tl.arange(0, 16))
        byte = tl.arange(0, 256)
        return tl.gather(table, byte >> 4, 0), tl.gather(table, byte & 15, 0)
    elif _nvidia_target():
        lanes = _lane_code_table(code_ptr)
        return lanes, lanes
    else:
        return 0.0, 0.0


@triton.jit
def _nf4_pair_tile(packed_ptr, absmax_ptr, absmax2_ptr, nested_code_ptr, code_ptr, offset, table_hi, table_lo,
                   rows, mask_rows, col0, row_len,
                   BLOCK_C: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                   NESTED_BLOCKSIZE: tl.constexpr, INDEX_64: tl.constexpr, COLS_IN_BOUNDS: tl.constexpr):
    """(w_even, w_odd) float32 (len(rows), BLOCK_C // 2): ``code[q] * scale`` of W (?, row_len) at rows ``rows``
    and columns ``col0 + 2j`` (even) and ``col0 + 2j + 1`` (odd); finite outside W (callers zero the other
    operand there). ``table_hi`` / ``table_lo`` from :func:`_pair_tables`.

    Each packed byte is loaded once (a row's bytes are contiguous: wide loads) and its two codes looked up by two
    gathers (interpreter), two lane shuffles (NVIDIA) or two select trees (AMD). Needs row_len a multiple of
    BLOCKSIZE and col0 a multiple of min(BLOCK_C, BLOCKSIZE): a row of the tile lies in one scale block, or
    holds whole blocks whose scales are broadcast over their bytes. COLS_IN_BOUNDS: the caller knows col0 + BLOCK_C
    <= row_len (no column mask: the forward's K step when K is a multiple of the step)."""
    if INDEX_64:
        rows = rows.to(tl.int64)
    # A row's bytes: row_len / 2, row_len a multiple of the blocksize (>= 32). Written so, the compiler sees rows
    # that start 16-byte aligned and a column bound constant over 16-byte vectors: 16-byte loads.
    row_bytes = (row_len // 32) * 16
    offs_b = col0 // 2 + tl.arange(0, BLOCK_C // 2)
    if COLS_IN_BOUNDS:
        mask = tl.broadcast_to(mask_rows[:, None], (rows.shape[0], BLOCK_C // 2))
    else:
        mask = mask_rows[:, None] & (offs_b < row_bytes)[None, :]
    byte = tl.load(packed_ptr + rows[:, None] * row_bytes + offs_b[None, :], mask=mask, other=0).to(tl.int32)
    if INTERPRETER:
        flat = tl.reshape(byte, (byte.shape[0] * (BLOCK_C // 2),))
        v_even = tl.reshape(tl.gather(table_hi, flat, 0), byte.shape)
        v_odd = tl.reshape(tl.gather(table_lo, flat, 0), byte.shape)
    elif _nvidia_target():
        v_even = _lane_lookup(table_hi, byte >> 4)
        v_odd = _lane_lookup(table_lo, byte)  # the low nibble; bit 4 picks the table's second copy
    else:
        v_even = _code_value(code_ptr, byte >> 4)
        v_odd = _code_value(code_ptr, byte & 15)
    if BLOCK_C <= BLOCKSIZE:
        scale = block_scale(absmax_ptr, absmax2_ptr, nested_code_ptr, offset, (rows * row_len + col0) // BLOCKSIZE,
                            mask_rows, DOUBLE_QUANT, NESTED_BLOCKSIZE)[:, None]
        return v_even * scale, v_odd * scale
    else:
        sub_start = col0 + tl.arange(0, BLOCK_C // BLOCKSIZE) * BLOCKSIZE
        blocks = (rows[:, None] * row_len + sub_start[None, :]) // BLOCKSIZE
        scale = block_scale(absmax_ptr, absmax2_ptr, nested_code_ptr, offset, blocks,
                            mask_rows[:, None] & (sub_start < row_len)[None, :], DOUBLE_QUANT,
                            NESTED_BLOCKSIZE)[:, :, None]
        shape3: tl.constexpr = (byte.shape[0], BLOCK_C // BLOCKSIZE, BLOCKSIZE // 2)
        return (tl.reshape(tl.reshape(v_even, shape3) * scale, byte.shape),
                tl.reshape(tl.reshape(v_odd, shape3) * scale, byte.shape))


@triton.jit
def _packed_words(packed_ptr, rows, mask_rows, col0, row_len, BLOCK_C: tl.constexpr, COLS_IN_BOUNDS: tl.constexpr,
                  WORD_BYTES: tl.constexpr = 4):
    """(len(rows), BLOCK_C // (2 * WORD_BYTES)) uint32 (WORD_BYTES 4) or uint64 (8, the interpreter's tile): the
    words of 4-bit codes holding W (?, row_len) at rows ``rows`` and columns ``col0 .. col0 + BLOCK_C``, 0 outside
    W. row_len a multiple of the blocksize (>= 32), col0 of 2 * WORD_BYTES; COLS_IN_BOUNDS: the caller knows
    col0 + BLOCK_C <= row_len (no column mask)."""
    CODES: tl.constexpr = 2 * WORD_BYTES
    WORDS: tl.constexpr = BLOCK_C // CODES
    # Written so, the compiler sees rows that start 16-byte aligned and a column bound constant over 16 bytes.
    row_words = (row_len // 32) * (16 // WORD_BYTES)
    offs_w = udiv(col0, CODES) + tl.arange(0, WORDS)
    if COLS_IN_BOUNDS:
        mask = tl.broadcast_to(mask_rows[:, None], (rows.shape[0], WORDS))
    else:
        mask = mask_rows[:, None] & (offs_w < row_words)[None, :]
    words_ptr = packed_ptr.to(tl.pointer_type(tl.uint32 if WORD_BYTES == 4 else tl.uint64))
    if INTERPRETER:
        return load_2d(words_ptr, rows * row_words, offs_w, mask, 0)
    else:
        return tl.load(words_ptr + rows[:, None] * row_words + offs_w[None, :], mask=mask, other=0)


@triton.jit
def _sub_block_scales(absmax_ptr, absmax2_ptr, nested_code_ptr, offset, rows, mask_rows, col0, row_len,
                      BLOCK_C: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                      NESTED_BLOCKSIZE: tl.constexpr, COLS_IN_BOUNDS: tl.constexpr):
    """float32 (len(rows), BLOCK_C // SUB), SUB = min(BLOCK_C, BLOCKSIZE): the scale of each SUB columns of the tile
    of W (?, row_len) at rows ``rows`` from column col0 (a multiple of SUB); sub-blocks past the row masked."""
    SUB: tl.constexpr = BLOCK_C if BLOCK_C < BLOCKSIZE else BLOCKSIZE
    sub_start = col0 + tl.arange(0, BLOCK_C // SUB) * SUB
    if COLS_IN_BOUNDS:
        mask = tl.broadcast_to(mask_rows[:, None], (rows.shape[0], BLOCK_C // SUB))
    else:
        mask = mask_rows[:, None] & (sub_start < row_len)[None, :]
    # row_len is a multiple of BLOCKSIZE: the row's part of the block index is loop-invariant, split off so.
    return block_scale(absmax_ptr, absmax2_ptr, nested_code_ptr, offset,
                       rows[:, None] * (row_len // BLOCKSIZE) + udiv(sub_start, BLOCKSIZE)[None, :], mask,
                       DOUBLE_QUANT, NESTED_BLOCKSIZE)


@triton.jit
def _nf4_word_pairs_tile(packed_ptr, absmax_ptr, absmax2_ptr, nested_code_ptr, table, offset, rows, mask_rows, col0,
                         row_len, BLOCK_C: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                         NESTED_BLOCKSIZE: tl.constexpr, INDEX_64: tl.constexpr, COLS_IN_BOUNDS: tl.constexpr,
                         dtype: tl.constexpr, FRAGMENT: tl.constexpr = 0):
    """(len(rows), BLOCK_C) ``dtype``: W (?, row_len) at rows ``rows`` and columns ``col0 + j``, each value
    ``round(code[q] * scale)`` (``dequantize_4bit``'s in ``dtype``), in W's column order; finite outside W (callers
    zero the other operand there). ``table``: :func:`_lane_code_table` on NVIDIA GPUs, else the float32 (16,)
    code table (:func:`_word_tile`). ``FRAGMENT``: the tile in fragment order (:func:`_column_tile`).

    The GPUs' decode of the fused kernel and the GEMV: W read as 32-bit words of eight codes (16-byte loads along
    the row) and decoded a word at a time by :func:`_word_tile`. Needs row_len a multiple of BLOCKSIZE (>= 32) and
    col0 a multiple of min(BLOCK_C, BLOCKSIZE); COLS_IN_BOUNDS as :func:`_nf4_pair_tile`."""
    WORDS: tl.constexpr = BLOCK_C // 8
    SUB: tl.constexpr = BLOCK_C if BLOCK_C < BLOCKSIZE else BLOCKSIZE
    if INDEX_64:
        rows = rows.to(tl.int64)
    words = _packed_words(packed_ptr, rows, mask_rows, col0, row_len, BLOCK_C, COLS_IN_BOUNDS)
    if BLOCK_C <= BLOCKSIZE:  # one scale per row, broadcast over its words
        scale = block_scale(absmax_ptr, absmax2_ptr, nested_code_ptr, offset,
                            rows * (row_len // BLOCKSIZE) + udiv(col0, BLOCKSIZE), mask_rows, DOUBLE_QUANT,
                            NESTED_BLOCKSIZE)
        scale = tl.broadcast_to(scale[:, None], (rows.shape[0], WORDS))
    else:
        scale = _sub_block_scales(absmax_ptr, absmax2_ptr, nested_code_ptr, offset, rows, mask_rows, col0, row_len,
                                  BLOCK_C, BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE, COLS_IN_BOUNDS)
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (rows.shape[0], BLOCK_C // SUB, SUB // 8)),
                           (rows.shape[0], WORDS))
    return _word_tile(words, scale, table, dtype, FRAGMENT)


@triton.jit
def _tile_columns(BLOCK_C: tl.constexpr, BYTE_MAJOR: tl.constexpr):
    """int32 (BLOCK_C,): the column (past the tile's first) that each position of a decoded W tile holds, ``0 ..
    BLOCK_C - 1`` in W's own order, or with BYTE_MAJOR (interpreter only) :func:`_nf4_word_tile`'s order: position
    ``(j * BLOCK_C // 16 + w) * 2 + h`` holds column ``16 w + 2 j + h`` (byte j of 64-bit word w, h = 0 the high
    nibble). Callers index the operand W meets in the dot (x's K columns in the forward and the GEMV, dx's columns)
    by these columns, so the tile is never permuted back."""
    if not BYTE_MAJOR:
        return tl.arange(0, BLOCK_C)
    # W's column order is (word, byte, nibble); transposed to (byte, word, nibble): four tile operations, where the
    # arithmetic on a position takes a dozen (~20 us of Python each).
    return tl.reshape(tl.permute(tl.reshape(tl.arange(0, BLOCK_C), (BLOCK_C // 16, 8, 2)), (1, 0, 2)), (BLOCK_C,))


@triton.jit
def _nf4_word_tile(packed_ptr, absmax_ptr, absmax2_ptr, nested_code_ptr, code_ptr, offset, rows, mask_rows, col0,
                   row_len, BLOCK_C: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                   NESTED_BLOCKSIZE: tl.constexpr, INDEX_64: tl.constexpr, COLS_IN_BOUNDS: tl.constexpr):
    """Interpreter only: float32 (len(rows), BLOCK_C) ``code[q] * scale`` of W (?, row_len) at rows ``rows`` and
    columns ``col0 + _tile_columns(BLOCK_C, True)`` (byte-major order, below); finite outside W (callers zero the
    other operand there).

    An interpreted load costs per element loaded (~7 ns, plus the pointer and mask arithmetic) and every tile
    operation its NumPy work plus a fixed ~13-35 us of Python: W is read as 64-bit words of sixteen codes (an
    eighth of the byte loads), split into its bytes by one shift and a uint8 cast, and each byte's two values
    (high nibble first: the even column) looked up at once in a (256, 2) table, a gather of 8-byte rows. The tile
    is left byte-major, (row, byte j, word w, nibble h): the shift then runs along whole rows of words, where W's
    own column order (word, byte, nibble) would put an 8-long axis innermost, and NumPy's broadcast loops cost per
    innermost run (perf/README.md, "Interpreter speed of the layer", has the figures). Needs row_len a multiple
    of BLOCKSIZE (>= 32: rows of whole words) and col0 a multiple of min(BLOCK_C, BLOCKSIZE), as
    :func:`_nf4_pair_tile`."""
    SUB: tl.constexpr = BLOCK_C if BLOCK_C < BLOCKSIZE else BLOCKSIZE
    if INDEX_64:  # W's element indices (the scale blocks' below) reach 2^31
        rows = rows.to(tl.int64)
    word = _packed_words(packed_ptr, rows, mask_rows, col0, row_len, BLOCK_C, COLS_IN_BOUNDS, 8)
    # Little-endian words: byte j is bits 8j .. 8j + 7, its high nibble the even column.
    byte = (word[:, None, :] >> (tl.arange(0, 8) * 8).to(tl.uint64)[None, :, None]).to(tl.uint8)
    code = tl.load(code_ptr + tl.arange(0, 16))
    byte_value = tl.arange(0, 256)
    pairs = tl.join(tl.gather(code, byte_value >> 4, 0), tl.gather(code, byte_value & 15, 0))  # (256, 2)
    index = tl.broadcast_to(tl.reshape(byte, (rows.shape[0] * BLOCK_C // 2, 1)), (rows.shape[0] * BLOCK_C // 2, 2))
    values = tl.reshape(tl.gather(pairs, index, 0), (rows.shape[0], 8, BLOCK_C // SUB, SUB // 8))
    scale = _sub_block_scales(absmax_ptr, absmax2_ptr, nested_code_ptr, offset, rows, mask_rows, col0, row_len,
                              BLOCK_C, BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE, COLS_IN_BOUNDS)
    # Sub-block s: words s * SUB / 16 .. (s + 1) * SUB / 16 of every byte slab j, its columns' scale.
    return tl.reshape(values * scale[:, None, :, None], (rows.shape[0], BLOCK_C))


# Called by the kernels of linear.py without the interpreter's per-call re-patching of triton.language (_tl.py).
(_code_value, _dequant_tile, _pair_tables, _nf4_pair_tile, _packed_words, _sub_block_scales, _tile_columns,
 _nf4_word_tile, _nf4_word_pairs_tile, _word_tile, _column_pair, _column_tile, _fragment_rows, _fragment_columns) = (
    interpreted_directly(f) for f in (_code_value, _dequant_tile, _pair_tables, _nf4_pair_tile, _packed_words,
                                      _sub_block_scales, _tile_columns, _nf4_word_tile, _nf4_word_pairs_tile,
                                      _word_tile, _column_pair, _column_tile, _fragment_rows, _fragment_columns))
