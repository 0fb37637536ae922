"""NF4 base-weight matmul + LoRA: forward and backward of the QLoRA linear layer (docs/SPEC.md section 6).

x (M, K), W (N, K) as NF4, lora_a (R, K), lora_b (N, R), bias (N,); compute dtype = x.dtype, float32 accumulation;
wherever W is dequantized it equals ``dequantize_4bit(..., dtype)`` bit for bit. Paths (``choose_path``; on a
GPU K must be a multiple of the blocksize for the first two):

- ``"gemv"`` (M <= ``SMALL_M``): ``_nf4_gemv_kernel``, K split over programs, the last program of each column
  tile summing the split's partials into y (forward only; a fill launch zeroes its arrival counts first;
  ``MatmulConfig.fold_epilogue`` False: ``_gemv_epilogue_kernel`` sums them in a launch of its own);
- ``"fused"`` (M <= ``FUSED_MAX_M`` of the GPU's architecture; dx also at M <= ``SMALL_M``; the interpreter's
  default at every M):
  ``_matmul_lora_kernel`` decoding W a packed byte at a time in its K loop (the interpreter: a 64-bit word at a time,
  and its dx launch also computes the LoRA and bias gradients when one row tile holds every row), the LoRA term and
  bias in its epilogue;
- ``"dequant"`` (otherwise): W dequantized into a buffer, then the same GEMM on the dense W.
LoRA helpers and the bit-packed dropout mask are in :mod:`.lora` (the backward's g = dy B with dB in one pass over
dy up to ``DOWN_GRAD_MAX_M`` rows: ``lora_down_grad``), the device helpers decoding W's tiles in
:mod:`._nf4_tiles`. Launch counts, the choice of paths and the dropout scheme: docs/DESIGN.md, "Fused linear layer";
static figures: perf/README.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ._host import cdiv
from ._checks import FLOAT_DTYPES, check_blocksize, check_same_device, check_tensor
from ._runtime import ieee_semantics, interpreter_active, lean_under_interpreter
from ._static import KernelSpec
from ._nf4_tiles import (FRAGMENT_MMA, FRAGMENT_NONE, FRAGMENT_WGMMA, _dequant_tile, _fragment_columns, _fragment_rows,
                         _lane_code_table, _lane_lookup, _nf4_pair_tile, _nf4_word_pairs_tile, _nf4_word_tile,
                         _nvidia_target, _pair_tables, _specialized_to_one, _sub_block_scales, _tile_columns,
                         _wgmma_target)
from ._tl import (INTERPRETER, block_scale, dot, grouped_tile, interpreted_directly, keep_tile, load_tile, round_to,
                  store_2d)
from .lora import (LORA_BLOCK_RS, SPLIT_CHOICES, check_scalar, lora_block_r, lora_down, lora_dropout_bits,
                   lora_dropout_mask, lora_grad, num_sms, pow2_clamp, seed_tensor, keep_bits, split_count,
                   launch_lora_down, launch_lora_grad, down_accumulate, down_grad_fits, launch_lora_down_grad)
from .quantize import launch_dequantize_4bit

NESTED_BLOCKSIZE = 256
# How the interpreter decodes W's tile in the fused kernel (PAIRS) and the decode GEMV: "words" (the default: both
# read W as 64-bit words and decode the whole tile by one gather into a byte-major tile, _nf4_word_tile), "word_pairs"
# (both as NVIDIA GPUs with a 16-bit compute dtype, _nf4_word_pairs_tile), "word_fragments_mma" / "word_fragments_wgmma"
# (as "word_pairs", the GEMV's 128 x 128 tiles in the fragment order of sm_80's / sm_90's MMA: _fragment_rows), "split"
# (a packed byte's even and odd values apart: AMD, float32, sm_80's other builds) or "interleave" (side by side: sm_90
# in float32). Tests set the others so that what GPUs run is checked against the oracle on a CPU too.
PAIR_LAYOUT_UNDER_INTERPRETER = tl.constexpr("words")
SMALL_M = 32  # at or below this many rows the forward takes the GEMV-shaped decode path (GEMV_BLOCK_MS rows)
# Up to this many rows (above SMALL_M) forward and dx take the fused tiled kernel, per GPU architecture (gpu_arch;
# None: at every M; choose_path says why).
FUSED_MAX_M: dict[int, int | None] = {8: None, 9: 256}


# --------------------------------------------------------------------------------------------------------------
# Decode path: GEMV-shaped kernel over packed bytes, and its split-K epilogue (W's tiles: kernels/_nf4_tiles.py)
# --------------------------------------------------------------------------------------------------------------


@lean_under_interpreter
@triton.jit
def _nf4_gemv_kernel(
    # pointers
    x_ptr, packed_ptr, absmax_ptr, absmax2_ptr, nested_code_ptr, code_ptr, a_ptr, bits_ptr, ws_ptr, u_ws_ptr,
    arrivals_ptr, b_ptr, bias_ptr, y_ptr, u_ptr,
    # sizes
    M, N, K, R, offset, k_per_split, words_per_row, scaling, u_scale,
    # strides
    stride_xm, stride_xk, stride_ar, stride_ak, stride_bn, stride_br,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, INDEX_64: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, FOLD: tl.constexpr, U_FIRST: tl.constexpr,
    HAS_BIAS: tl.constexpr, FRAGMENT_ORDER: tl.constexpr,
):
    """ws[s] (M, N) float32 = x[:, split s] @ W[:, split s]^T (M <= BLOCK_M; K a multiple of BLOCKSIZE), and for
    column tile 0 u_ws[s] (M, R) float32 = (x * keep)[:, split s] @ A[:, split s]^T. With FOLD the launch also
    does :func:`_gemv_epilogue_kernel`'s work (y, u; bit for bit the same): the last of a column tile's S + 1
    arrivals (its S splits and the event "u complete", counted in ``arrivals`` (tiles + 1,) int32, zeros at launch)
    writes the tile's y (:func:`_gemv_arrive`); U_FIRST: column tile 0 computes its u partial before its W work, so
    that u completes early and its last program seldom finishes other tiles.

    Program (n tile, s) reads rows of W (row n starts at byte n * K / 2; high nibbles are the even columns, low
    nibbles the odd ones). On NVIDIA GPUs with a 16-bit compute dtype (WORDS) as 32-bit words decoded by
    :func:`_nf4_word_pairs_tile` into W's column order, W the MMA's first operand and y^T the accumulator
    (perf/README.md, "Word decode": 6.05 -> 4.88 instructions per weight element on sm_90, 6.17 -> 5.78 on sm_80,
    triton 3.9). Otherwise (float32, AMD) as packed bytes: on sm_90 the two values of a byte are interleaved into
    W's column order, elsewhere x is split into its even and odd columns. The tile's K range holds BLOCK_K / SUB_K
    scale blocks per row, SUB_K = min(BLOCK_K, BLOCKSIZE). The byte decode is :func:`_nf4_pair_tile`'s written out
    for a split K range: calling that helper here measured 6.05 -> 6.19 instructions per weight element on sm_90
    (6.17 -> 6.41 on sm_80) and 86 -> 149 VGPRs on gfx942 (its select trees against the gather loads below).
    """
    SUB_K: tl.constexpr = BLOCK_K if BLOCK_K < BLOCKSIZE else BLOCKSIZE
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    compute_dtype = x_ptr.dtype.element_ty
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    # Split bounds are multiples of BLOCK_K (k_per_split) or K (a multiple of BLOCKSIZE >= 32): telling the
    # compiler so keeps the bounds masks constant over 16-byte vectors.
    k_start = tl.multiple_of(pid_s * k_per_split, BLOCK_K)
    k_end = min(K, k_start + k_per_split)
    if FOLD and U_FIRST:
        if pid_n == 0:
            _gemv_down_partial(x_ptr, a_ptr, bits_ptr, u_ws_ptr, pid_s, M, R, k_start, k_end, words_per_row,
                               stride_xm, stride_xk, stride_ak, stride_ar, HAS_DROPOUT, BLOCK_M, BLOCK_K, BLOCK_R)
            _gemv_u_arrive(ws_ptr, u_ws_ptr, arrivals_ptr, b_ptr, bias_ptr, y_ptr, u_ptr, M, N, R, scaling,
                           u_scale, stride_bn, stride_br, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_R)
    # On NVIDIA GPUs the 16-entry code table lives in the lanes of each warp and a code is looked up with one
    # shuffle (no address arithmetic, no load per element); elsewhere (interpreter, AMD) with a gather load.
    LANE_TABLE: tl.constexpr = not INTERPRETER and _nvidia_target()
    if LANE_TABLE:
        table = _lane_code_table(code_ptr)
    # INTERLEAVE (sm_90): a byte's two values side by side (W's own column order), W the MMA's first operand and
    # y^T the accumulator: one dot per step, no even/odd split of x (perf static, M = 1: 7.1 -> 6.1 instructions per
    # weight element under triton 3.9, 6.2 -> 5.0 under 3.6). Not on sm_80 (6.2 either way, 96 -> 128 registers)
    # nor AMD (twice the LDS).
    if INTERPRETER:
        INTERLEAVE: tl.constexpr = PAIR_LAYOUT_UNDER_INTERPRETER == "interleave"
    else:
        INTERLEAVE: tl.constexpr = _wgmma_target()
    # WORDS: W read as uint32 words of eight codes and decoded into W's column order (_word_tile): on NVIDIA GPUs
    # with a 16-bit compute dtype (float32 keeps the byte decode: the asm rounds pairs to 16 bits), and under the
    # interpreter unless a test asks for a byte layout. W is then the MMA's first operand on sm_80 too (5.8 against
    # 6.0 instructions per weight element with x first: Triton read both operands through LDS and register moves).
    if INTERPRETER:
        WORDS: tl.constexpr = (PAIR_LAYOUT_UNDER_INTERPRETER == "words" or PAIR_LAYOUT_UNDER_INTERPRETER == "word_pairs"
                               or PAIR_LAYOUT_UNDER_INTERPRETER == "word_fragments_mma"
                               or PAIR_LAYOUT_UNDER_INTERPRETER == "word_fragments_wgmma")
        # "words": the interpreter's own byte-major tile (_nf4_word_tile, as the fused kernel's), x's K columns
        # indexed in its order; "word_pairs" / "word_fragments_*": the GPUs' word decode, which tests run on a CPU so.
        BYTE_MAJOR: tl.constexpr = PAIR_LAYOUT_UNDER_INTERPRETER == "words"
        # "word_fragments_*": the word decode in an MMA's fragment order (below)
        FRAGMENT_KIND: tl.constexpr = (FRAGMENT_MMA if PAIR_LAYOUT_UNDER_INTERPRETER == "word_fragments_mma" else
                                       FRAGMENT_WGMMA if PAIR_LAYOUT_UNDER_INTERPRETER == "word_fragments_wgmma" else
                                       FRAGMENT_NONE)
    else:
        WORDS: tl.constexpr = _nvidia_target() and compute_dtype != tl.float32
        BYTE_MAJOR: tl.constexpr = False
        FRAGMENT_KIND: tl.constexpr = (FRAGMENT_NONE if not WORDS else FRAGMENT_WGMMA if _wgmma_target() else
                                       FRAGMENT_MMA)
    # FRAGMENT: W decoded straight into the MMA's first operand as it reads it from registers, x's columns relabelled
    # to match (the comment above _fragment_rows), for the 16-row tile (128 rows of W, K steps of 128). perf static,
    # main loop per K step at M = 1 / M = 16, triton 3.9: sm_90 542 / 543 -> 517 / 519, sm_80 705 / 727 -> 578 / 576
    # (3.6: sm_90 546 / 546 -> 519 / 530, sm_80 700 / 731 -> 581 / 579, and no more 8 bytes of spill at M = 16); 157-
    # 165 registers instead of 128 (3 CTAs per SM instead of 4; on sm_80 with GEMV_MMA_MAXNREG), 8 KB of shared
    # memory instead of 36. The 32-row tile (64 rows of W) keeps W's order: its x tile is half as large as W's, and
    # relabelling it cost more than W's pass through shared memory saves (sm_90 303 -> 319, sm_80 466 -> 490, 3.9).
    FRAGMENT: tl.constexpr = FRAGMENT_KIND if FRAGMENT_ORDER and BLOCK_N == 128 and BLOCK_K == 128 else FRAGMENT_NONE
    # offs_n: the tile's rows of W as y's columns; rows_w: the rows W's words are loaded from (relabelled in fragment
    # order, else the same).
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if FRAGMENT != FRAGMENT_NONE:
        rows_w = pid_n * BLOCK_N + _fragment_rows(BLOCK_N)
    else:
        rows_w = offs_n
    if EVEN_N:  # N a multiple of BLOCK_N: no row mask, so no predicated loads (and their zero fills) of W's rows
        mask_n = tl.full((BLOCK_N,), 1, tl.int1)
        mask_w = mask_n
    else:
        mask_n = offs_n < N
        mask_w = rows_w < N
    if INDEX_64:
        offs_n = offs_n.to(tl.int64)
        rows_w = rows_w.to(tl.int64)
    # K is a multiple of BLOCKSIZE >= 32: every row starts on a 16-byte boundary (128-bit loads).
    row_bytes = offs_n * tl.multiple_of(K // 2, 16)
    k_end_half = tl.multiple_of(k_end // 2, 16)
    # x's rows past M read row M - 1 (M >= 1: the launcher returns early for no rows) instead of being masked: no
    # predicated loads and zero fills per K step, and those rows only reach rows of the partial that are never stored
    # (perf static, sm_90 / sm_80 per K step, 3.9: M = 16 547 -> 543 / 733 -> 727, the 32-row tile 314 -> 303 /
    # 476 -> 466; 3.6: 551 -> 546 / 736 -> 731, 297 -> 287 / 475 -> 465). Where Triton made M = 1 a constant the
    # mask loads row 0 alone: clamped, that build took 156 registers instead of 128 on sm_90 under 3.6.
    if not INTERPRETER and _specialized_to_one(M):  # M = 1 made a constant: row 0 alone is loaded
        rows_x = offs_m
        x_rows = mask_m
    else:
        rows_x = tl.minimum(offs_m, M - 1)
        x_rows = tl.full((BLOCK_M,), 1, tl.int1)
    if INTERLEAVE or WORDS:
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if WORDS and INTERPRETER and not BYTE_MAJOR:
        table = tl.load(code_ptr + tl.arange(0, 16))
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + _tile_columns(BLOCK_K, BYTE_MAJOR)
        if EVEN_K:  # k_start and k_end are then multiples of BLOCK_K: every step lies inside the split
            mask_xk = tl.full((BLOCK_K,), 1, tl.int1)
        else:
            mask_xk = offs_k < k_end
        if WORDS:
            # A step reaches past k_end only in the last split (k_per_split is a multiple of BLOCK_K), so K bounds
            # W's columns (no bound at all with EVEN_K: K a multiple of BLOCK_K); x's mask bounds the split.
            if BYTE_MAJOR:
                w = round_to(_nf4_word_tile(packed_ptr, absmax_ptr, absmax2_ptr, nested_code_ptr, code_ptr, offset,
                                            offs_n, mask_n, k0, K, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE,
                                            INDEX_64, EVEN_K), compute_dtype)
            else:
                w = _nf4_word_pairs_tile(packed_ptr, absmax_ptr, absmax2_ptr, nested_code_ptr, table, offset, rows_w,
                                         mask_w, k0, K, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE, INDEX_64,
                                         EVEN_K, compute_dtype, FRAGMENT)
            x = load_tile(x_ptr, rows_x, offs_k, stride_xm, stride_xk, x_rows, mask_xk)
            if FRAGMENT != FRAGMENT_NONE:
                x = _fragment_columns(x, FRAGMENT)
            acc_t = dot(w, tl.trans(x), acc_t)
        else:
            offs_kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            mask_kb = offs_kb < k_end_half
            packed = tl.load(packed_ptr + row_bytes[:, None] + offs_kb[None, :],
                             mask=mask_n[:, None] & mask_kb[None, :], other=0)
            if LANE_TABLE:
                byte = packed.to(tl.int32)
                v_hi = _lane_lookup(table, byte >> 4)
                v_lo = _lane_lookup(table, byte)  # the low nibble; bit 4 picks the table's second copy
            else:
                v_hi = tl.load(code_ptr + (packed >> 4).to(tl.int32))
                v_lo = tl.load(code_ptr + (packed & 15).to(tl.int32))
            if SUB_K == BLOCK_K:
                scale = block_scale(absmax_ptr, absmax2_ptr, nested_code_ptr, offset, (offs_n * K + k0) // BLOCKSIZE,
                                    mask_n, DOUBLE_QUANT, NESTED_BLOCKSIZE)
                w_hi = round_to(v_hi * scale[:, None], compute_dtype)
                w_lo = round_to(v_lo * scale[:, None], compute_dtype)
            else:  # sub-blocks past K (a last step longer than K's rest) masked, as in the word decode
                scale = _sub_block_scales(absmax_ptr, absmax2_ptr, nested_code_ptr, offset, offs_n, mask_n, k0, K,
                                          BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE, EVEN_K)[:, :, None]
                w_hi = round_to(tl.reshape(tl.reshape(v_hi, (BLOCK_N, BLOCK_K // SUB_K, SUB_K // 2)) * scale,
                                           (BLOCK_N, BLOCK_K // 2)), compute_dtype)
                w_lo = round_to(tl.reshape(tl.reshape(v_lo, (BLOCK_N, BLOCK_K // SUB_K, SUB_K // 2)) * scale,
                                           (BLOCK_N, BLOCK_K // 2)), compute_dtype)
            x = load_tile(x_ptr, rows_x, offs_k, stride_xm, stride_xk, x_rows, mask_xk)
            if INTERLEAVE:
                acc_t = dot(tl.interleave(w_hi, w_lo), tl.trans(x), acc_t)
            else:
                x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
                acc = dot(x_even, tl.trans(w_hi), acc)
                acc = dot(x_odd, tl.trans(w_lo), acc)
    if INTERLEAVE or WORDS:
        acc = tl.trans(acc_t)
    ws = ws_ptr + pid_s.to(tl.int64) * M * N
    tl.store(ws + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])
    if FOLD:
        _gemv_arrive(ws_ptr, u_ws_ptr, arrivals_ptr, b_ptr, bias_ptr, y_ptr, u_ptr, pid_n, M, N, R, scaling,
                     u_scale, stride_bn, stride_br, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_R)
    if not (FOLD and U_FIRST):
        if pid_n == 0:
            _gemv_down_partial(x_ptr, a_ptr, bits_ptr, u_ws_ptr, pid_s, M, R, k_start, k_end, words_per_row,
                               stride_xm, stride_xk, stride_ak, stride_ar, HAS_DROPOUT, BLOCK_M, BLOCK_K, BLOCK_R)
            if FOLD:
                _gemv_u_arrive(ws_ptr, u_ws_ptr, arrivals_ptr, b_ptr, bias_ptr, y_ptr, u_ptr, M, N, R, scaling,
                               u_scale, stride_bn, stride_br, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_R)


@triton.jit
def _gemv_down_partial(x_ptr, a_ptr, bits_ptr, u_ws_ptr, pid_s, M, R, k_start, k_end, words_per_row, stride_xm,
                       stride_xk, stride_ak, stride_ar, HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """u_ws[s] (M, R) float32 = (x * keep)[:, k_start:k_end] @ A[:, k_start:k_end]^T: split s's part of u."""
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        # b = A^T: element (k, r) of lora_a (R, K) at k * stride_ak + r * stride_ar.
        u = down_accumulate(tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), x_ptr, a_ptr, bits_ptr, offs_m,
                            mask_m, offs_r, mask_r, k_start, k_end, words_per_row, stride_xm, stride_xk,
                            stride_ak, stride_ar, HAS_DROPOUT, BLOCK_K)
        u_ws = u_ws_ptr + pid_s.to(tl.int64) * M * R
        tl.store(u_ws + offs_m[:, None] * R + offs_r[None, :], u, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _summed_u(u_ws_ptr, offs_m, mask_m, offs_r, mask_r, M, R, num_splits, u_scale):
    """u (len(offs_m), len(offs_r)) float32 = u_scale * sum over splits s (in order) of u_ws[s]."""
    u = tl.zeros((offs_m.shape[0], offs_r.shape[0]), dtype=tl.float32)
    for s in range(0, num_splits):
        u += load_tile(u_ws_ptr + s * M * R, offs_m, offs_r, R, 1, mask_m, mask_r, True)
    return u * u_scale


@triton.jit
def _gemv_output_tile(ws_ptr, u_ws_ptr, b_ptr, bias_ptr, y_ptr, u_ptr, pid_n, M, N, R, num_splits, scaling,
                      u_scale, stride_bn, stride_br, store_u, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """y[:, tile pid_n] (M, BLOCK_N) = sum_s ws[s] + scaling * round(u) @ B^T + bias, summed in split order, with
    u (M, R) = u_scale * sum_s u_ws[s], also written to u_ptr where ``store_u``; M <= BLOCK_M."""
    compute_dtype = y_ptr.dtype.element_ty
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(0, num_splits):
        acc += load_tile(ws_ptr + s * M * N, offs_m, offs_n, N, 1, mask_m, mask_n, True)
    lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        u = _summed_u(u_ws_ptr, offs_m, mask_m, offs_r, mask_r, M, R, num_splits, u_scale)
        if store_u:
            tl.store(u_ptr + offs_m[:, None] * R + offs_r[None, :], u, mask=mask_m[:, None] & mask_r[None, :])
        b_t = load_tile(b_ptr, offs_r, offs_n, stride_br, stride_bn, mask_r, mask_n)
        lora = dot(round_to(u, compute_dtype), b_t, lora)
    acc += scaling * lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], round_to(acc, compute_dtype),
             mask=mask_m[:, None] & mask_n[None, :])


# The GEMV's folded epilogue (FOLD): each column tile counts S + 1 arrivals, its S splits' partials stored and the
# event "u complete" (all S partials of u stored), and whichever arrival is the last writes the tile's y; nobody
# waits on anybody, so no order of programs can stall the launch. An arrival is CUTLASS's semaphore pattern: a
# barrier (every thread's stores done), then one thread's acq_rel atomic at GPU scope (Triton gives a scalar atomic
# to thread 0 and broadcasts its result through shared memory behind a second barrier), and the partials read back
# with .cg loads (L2, never a stale L1 line). tests/test_perf_static.py checks that order in the SASS; under the
# interpreter tests/test_linear.py runs both branches of the protocol.


@triton.jit
def _gemv_arrive(ws_ptr, u_ws_ptr, arrivals_ptr, b_ptr, bias_ptr, y_ptr, u_ptr, pid_n, M, N, R, scaling, u_scale,
                 stride_bn, stride_br, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    """A split's arrival at column tile ``pid_n`` after storing its partial; the last of the S + 1 writes y."""
    num_splits = tl.num_programs(1)
    tl.debug_barrier()
    before = tl.atomic_add(arrivals_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    if before == num_splits:
        _gemv_output_tile(ws_ptr, u_ws_ptr, b_ptr, bias_ptr, y_ptr, u_ptr, pid_n, M, N, R, num_splits, scaling,
                          u_scale, stride_bn, stride_br, False, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_R)


@triton.jit
def _gemv_u_arrive(ws_ptr, u_ws_ptr, arrivals_ptr, b_ptr, bias_ptr, y_ptr, u_ptr, M, N, R, scaling, u_scale,
                   stride_bn, stride_br, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_R: tl.constexpr):
    """Column tile 0's arrival with its u partial stored (counted in ``arrivals[tiles]``). The last of the S writes
    u, then arrives at every column tile with the event "u complete" and writes y of the tiles whose splits had
    all arrived already."""
    num_splits = tl.num_programs(1)
    tiles = tl.num_programs(0)
    tl.debug_barrier()
    before = tl.atomic_add(arrivals_ptr + tiles, 1, sem="acq_rel", scope="gpu")
    if before == num_splits - 1:
        offs_m = tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            tl.store(u_ptr + offs_m[:, None] * R + offs_r[None, :],
                     _summed_u(u_ws_ptr, offs_m, mask_m, offs_r, mask_r, M, R, num_splits, u_scale),
                     mask=mask_m[:, None] & mask_r[None, :])
        ARRIVE_TILES: tl.constexpr = 128  # column tiles counted per vector atomic
        for t0 in range(0, tiles, ARRIVE_TILES):
            offs_t = t0 + tl.arange(0, ARRIVE_TILES)
            tl.debug_barrier()
            before_t = tl.atomic_add(arrivals_ptr + offs_t, 1, mask=offs_t < tiles, sem="acq_rel", scope="gpu")
            complete = (before_t == num_splits) & (offs_t < tiles)
            if tl.sum(complete.to(tl.int32)) > 0:
                for t in range(t0, min(t0 + ARRIVE_TILES, tiles)):
                    if tl.sum((complete & (offs_t == t)).to(tl.int32)) > 0:
                        _gemv_output_tile(ws_ptr, u_ws_ptr, b_ptr, bias_ptr, y_ptr, u_ptr, t, M, N, R,
                                          num_splits, scaling, u_scale, stride_bn, stride_br, False, HAS_BIAS,
                                          BLOCK_M, BLOCK_N, BLOCK_R)


(_gemv_down_partial, _summed_u, _gemv_output_tile, _gemv_arrive, _gemv_u_arrive) = (
    interpreted_directly(f) for f in (_gemv_down_partial, _summed_u, _gemv_output_tile, _gemv_arrive, _gemv_u_arrive))


@lean_under_interpreter
@triton.jit
def _gemv_epilogue_kernel(
    # pointers
    ws_ptr, u_ws_ptr, b_ptr, bias_ptr, y_ptr, u_ptr,
    # sizes
    M, N, R, num_splits, scaling, u_scale,
    # strides
    stride_bn, stride_br,
    # meta-parameters
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y (M, N) = sum_s ws[s] + scaling * round(u) @ B^T + bias with u (M, R) = u_scale * sum_s u_ws[s] (written
    by column tile 0); M <= BLOCK_M. The GEMV's epilogue as a launch of its own (``fold_epilogue`` False)."""
    pid_n = tl.program_id(0)
    _gemv_output_tile(ws_ptr, u_ws_ptr, b_ptr, bias_ptr, y_ptr, u_ptr, pid_n, M, N, R, num_splits, scaling, u_scale,
                      stride_bn, stride_br, pid_n == 0, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_R)


# --------------------------------------------------------------------------------------------------------------
# Tiled path: one GEMM kernel with the LoRA term in its epilogue, B dense or NF4 (dequantized in the K loop)
# --------------------------------------------------------------------------------------------------------------


@lean_under_interpreter
@triton.jit
def _matmul_lora_kernel(
    # pointers
    a_ptr, b_ptr, absmax_ptr, absmax2_ptr, nested_code_ptr, code_ptr, l_ptr, rm_ptr, bias_ptr, bits_ptr, c_ptr,
    down_ptr, x_ptr, u_ptr, grad_a_ptr, grad_b_ptr, grad_bias_ptr,
    # sizes
    M, N, K, R, offset, lora_scale, words_per_row, grad_b_scale,
    # strides
    stride_am, stride_ak, stride_bk, stride_bn, stride_rr, stride_rn, stride_dk, stride_dr, stride_xm, stride_xk,
    # meta-parameters
    B_NF4: tl.constexpr, B_TRANSPOSED: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr, ROW_SCALE: tl.constexpr, INDEX_64: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, ALIGNED: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    PAIRS: tl.constexpr,
    FOLD_DOWN: tl.constexpr, FOLD_GRADS: tl.constexpr, FOLD_BIAS_GRAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """c (M, N) = a (M, K) @ b (K, N) + lora_scale * (round(l) @ rm) [* keep] + bias, float32 accumulation.

    a in the compute dtype (x or dy); l (M, R) float32 contiguous (u or g), rm (R, N) (B^T or A); keep from the
    bit-packed mask of (M, N) (dx's dropout); bias (N,). b: dense (strides stride_bk, stride_bn) unless B_NF4:
    then the NF4 weight W, b = W^T (forward, W (N, K)) if B_TRANSPOSED else W (dx, W (K, N)), dequantized tile
    by tile and rounded to the compute dtype (bit-exact with dequantize_4bit). ALIGNED: N, K and the strides
    are multiples of 16 (what a launch on such shapes specializes on), so the bounds masks stay constant over
    16-byte vectors and the operand loads are 128-bit. EVEN_K: K is a multiple of BLOCK_K (no K-bound masks).
    PAIRS (with B_NF4; K a multiple of BLOCKSIZE): W decoded in the K loop. With a 16-bit compute dtype on sm_90
    and in sm_80's dx tiles with K steps of 64 or more, a 32-bit word at a time into W's column order
    (:func:`_nf4_word_pairs_tile`, the GEMV's decode); otherwise a packed byte at a time (:func:`_nf4_pair_tile`),
    a byte's two values interleaved into W's column order on sm_90 and in sm_80's 128-row dx tile, elsewhere its
    even and odd columns multiplied with the even and odd columns of a (forward) or into the even and odd columns
    of c (dx); under the interpreter a 64-bit word at a time by one gather into a byte-major tile
    (:func:`_nf4_word_tile`), a's columns (forward) or c's (dx) indexed in its order (:func:`_tile_columns`).
    FOLD_DOWN (R <= BLOCK_R): l is not read but computed in the K loop from the a tiles already loaded, l = a @ d with
    d (K, R) at ``k * stride_dk + r * stride_dr`` (u = x A^T in a forward without dropout, g = dy B in dx), and
    written (float32, contiguous) by the programs of column tile 0. FOLD_GRADS (dx with FOLD_DOWN, one row tile:
    M <= BLOCK_M): the LoRA gradients of the same pass, as :func:`lora_grad` computes them: grad_b (K, R) =
    grad_b_scale * (round(u)^T a)^T from u (M, R) float32 and the a (dy) tiles as they stream by, with grad_bias
    (K,) = the column sums of a if FOLD_BIAS_GRAD, by the programs of column tile 0; grad_a (R, N) = lora_scale *
    round(l)^T (x [* keep]) from x (M, N) after the loop. Outputs contiguous, in their own dtype.
    """
    if ALIGNED:
        # (v // 16) * 16 == v here; written so, the compiler's divisibility analysis sees it (tl.multiple_of on
        # a scalar argument is dropped).
        N = (N // 16) * 16
        K = (K // 16) * 16
        stride_am = (stride_am // 16) * 16
        if not B_NF4:
            # Dense W (N_w, K_w) row-major: b = W^T has unit stride along k, b = W along n.
            if B_TRANSPOSED:
                stride_bn = (stride_bn // 16) * 16
            else:
                stride_bk = (stride_bk // 16) * 16
    # (v + B - 1) // B and tl.full rather than tl.cdiv and tl.zeros (the same code on a GPU): those two are
    # @triton.jit library functions, and each call of one re-patches triton.language under the interpreter.
    if INTERPRETER and GROUP_M == 1:
        # A 2-D grid (row tiles, column tiles) from the launcher: an interpreted scalar operation costs ~35 us of
        # Python, and the grouped order below takes about a hundred of them.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
    else:
        pid_m, pid_n = grouped_tile(tl.program_id(0), (M + BLOCK_M - 1) // BLOCK_M, (N + BLOCK_N - 1) // BLOCK_N,
                                    GROUP_M)
    compute_dtype = a_ptr.dtype.element_ty
    # INTERLEAVE (PAIRS): a byte's two values side by side in W's own column order, one dot per K step; else the
    # even and odd columns apart (perf/README.md, "Fewer instructions per K step", has the figures behind the rule).
    # WORDS: the interpreter's own layout (:func:`_nf4_word_tile`). WORD_PAIRS: NVIDIA's word decode
    # (:func:`_nf4_word_pairs_tile`), the tile in W's column order rounded to the compute dtype.
    if INTERPRETER:
        WORDS: tl.constexpr = PAIR_LAYOUT_UNDER_INTERPRETER == "words"
        WORD_PAIRS: tl.constexpr = (PAIR_LAYOUT_UNDER_INTERPRETER == "word_pairs"
                                    or PAIR_LAYOUT_UNDER_INTERPRETER == "word_fragments_mma"
                                    or PAIR_LAYOUT_UNDER_INTERPRETER == "word_fragments_wgmma")
        INTERLEAVE: tl.constexpr = PAIR_LAYOUT_UNDER_INTERPRETER == "interleave"
    else:
        WORDS: tl.constexpr = False
        # The GEMV's word decode where perf static measured it cheaper than the byte pairs (perf/README.md, "Word
        # decode"): every sm_90 build, and sm_80's dx builds with K steps of 64 or more (15.44 -> 13.25 and
        # 13.19 -> 12.88 instructions per weight element; its forward builds and 64 x 64 x 32 dx measured worse).
        WORD_PAIRS: tl.constexpr = compute_dtype != tl.float32 and (
            _wgmma_target() or (_nvidia_target() and not B_TRANSPOSED and BLOCK_K >= 64))
        INTERLEAVE: tl.constexpr = _wgmma_target() or (_nvidia_target() and not B_TRANSPOSED and BLOCK_M >= 128)
    # The interpreter's word tile is byte-major (:func:`_tile_columns`): the operand it meets is indexed so.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + _tile_columns(BLOCK_N, PAIRS and WORDS and not B_TRANSPOSED)
    mask_m = offs_m < M
    if EVEN_N:  # N a multiple of BLOCK_N: no column mask (in the forward, none on W's rows)
        mask_n = tl.full((BLOCK_N,), 1, tl.int1)
    else:
        mask_n = offs_n < N

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    if PAIRS and WORD_PAIRS:
        if INTERPRETER:
            table_hi = tl.load(code_ptr + tl.arange(0, 16))
        else:
            table_hi = _lane_code_table(code_ptr)
    elif PAIRS and not WORDS:
        table_hi, table_lo = _pair_tables(code_ptr)
        if not INTERLEAVE and not B_TRANSPOSED:  # dx: the even and the odd output columns, interleaved after the loop
            acc = tl.full((BLOCK_M, BLOCK_N // 2), 0.0, tl.float32)
            acc_odd = tl.full((BLOCK_M, BLOCK_N // 2), 0.0, tl.float32)
    if FOLD_DOWN:
        offs_down = tl.arange(0, BLOCK_R)
        mask_down = offs_down < R
        down = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    if FOLD_GRADS:
        u_t = round_to(load_tile(u_ptr, offs_down, offs_m, 1, R, mask_down, mask_m), compute_dtype)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + _tile_columns(BLOCK_K, PAIRS and WORDS and B_TRANSPOSED)
        if EVEN_K:  # no K-bound mask: the loads' predicates stay loop-invariant
            mask_k = tl.full((BLOCK_K,), 1, tl.int1)
        else:
            mask_k = offs_k < K
        a = load_tile(a_ptr, offs_m, offs_k, stride_am, stride_ak, mask_m, mask_k)
        if FOLD_DOWN:
            down = dot(a, load_tile(down_ptr, offs_k, offs_down, stride_dk, stride_dr, mask_k, mask_down), down)
        if FOLD_GRADS:
            if pid_n == 0:
                grad_b = dot(u_t, a, tl.full((BLOCK_R, BLOCK_K), 0.0, tl.float32))
                tl.store(grad_b_ptr + offs_k[None, :] * R + offs_down[:, None],
                         round_to(grad_b * grad_b_scale, grad_b_ptr.dtype.element_ty),
                         mask=mask_down[:, None] & mask_k[None, :])
                if FOLD_BIAS_GRAD:
                    tl.store(grad_bias_ptr + offs_k,
                             round_to(tl.sum(a.to(tl.float32), axis=0), grad_bias_ptr.dtype.element_ty), mask=mask_k)
        if PAIRS and WORD_PAIRS:
            if B_TRANSPOSED:  # W (N, K): the tile's rows are offs_n, its columns the K step
                w = _nf4_word_pairs_tile(b_ptr, absmax_ptr, absmax2_ptr, nested_code_ptr, table_hi, offset, offs_n,
                                         mask_n, k0, K, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE, INDEX_64,
                                         EVEN_K, compute_dtype)
                acc = dot(a, tl.trans(w), acc)
            else:  # W (K, N) here: the tile's rows are the reduction step, its columns this program's outputs
                w = _nf4_word_pairs_tile(b_ptr, absmax_ptr, absmax2_ptr, nested_code_ptr, table_hi, offset, offs_k,
                                         mask_k, pid_n * BLOCK_N, N, BLOCK_N, BLOCKSIZE, DOUBLE_QUANT,
                                         NESTED_BLOCKSIZE, INDEX_64, False, compute_dtype)
                acc = dot(a, w, acc)
        elif PAIRS and WORDS:
            if B_TRANSPOSED:
                w = _nf4_word_tile(b_ptr, absmax_ptr, absmax2_ptr, nested_code_ptr, code_ptr, offset, offs_n, mask_n,
                                   k0, K, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE, INDEX_64, EVEN_K)
                acc = dot(a, tl.trans(round_to(w, compute_dtype)), acc)
            else:
                w = _nf4_word_tile(b_ptr, absmax_ptr, absmax2_ptr, nested_code_ptr, code_ptr, offset, offs_k, mask_k,
                                   pid_n * BLOCK_N, N, BLOCK_N, BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE, INDEX_64,
                                   False)
                acc = dot(a, round_to(w, compute_dtype), acc)
        elif PAIRS:
            if B_TRANSPOSED:  # W (N, K): the tile's rows are offs_n, its columns the K step
                w_even, w_odd = _nf4_pair_tile(b_ptr, absmax_ptr, absmax2_ptr, nested_code_ptr, code_ptr, offset,
                                               table_hi, table_lo, offs_n, mask_n, k0, K, BLOCK_K, BLOCKSIZE,
                                               DOUBLE_QUANT, NESTED_BLOCKSIZE, INDEX_64, EVEN_K)
                if not INTERLEAVE:
                    a_even, a_odd = tl.split(tl.reshape(a, (BLOCK_M, BLOCK_K // 2, 2)))
                    acc = dot(a_even, tl.trans(round_to(w_even, compute_dtype)), acc)
                    acc = dot(a_odd, tl.trans(round_to(w_odd, compute_dtype)), acc)
                else:
                    w = tl.interleave(round_to(w_even, compute_dtype), round_to(w_odd, compute_dtype))
                    acc = dot(a, tl.trans(w), acc)
            else:  # W (K, N) here: the tile's rows are the reduction step, its columns this program's outputs
                w_even, w_odd = _nf4_pair_tile(b_ptr, absmax_ptr, absmax2_ptr, nested_code_ptr, code_ptr, offset,
                                               table_hi, table_lo, offs_k, mask_k, pid_n * BLOCK_N, N, BLOCK_N,
                                               BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE, INDEX_64, False)
                if not INTERLEAVE:
                    acc = dot(a, round_to(w_even, compute_dtype), acc)
                    acc_odd = dot(a, round_to(w_odd, compute_dtype), acc_odd)
                else:
                    acc = dot(a, tl.interleave(round_to(w_even, compute_dtype), round_to(w_odd, compute_dtype)), acc)
        elif B_NF4:
            if B_TRANSPOSED:
                w = _dequant_tile(b_ptr, absmax_ptr, absmax2_ptr, nested_code_ptr, code_ptr, offset,
                                  offs_n, offs_k, k0, K, mask_n, mask_k, BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE,
                                  ROW_SCALE, True, INDEX_64)
            else:
                w = _dequant_tile(b_ptr, absmax_ptr, absmax2_ptr, nested_code_ptr, code_ptr, offset,
                                  offs_k, offs_n, pid_n * BLOCK_N, N, mask_k, mask_n, BLOCKSIZE, DOUBLE_QUANT,
                                  NESTED_BLOCKSIZE, ROW_SCALE, False, INDEX_64)
            b = round_to(w, compute_dtype)
        else:
            b = load_tile(b_ptr, offs_k, offs_n, stride_bk, stride_bn, mask_k, mask_n)
        if not PAIRS:
            acc = dot(a, b, acc)
    if PAIRS and not WORDS and not WORD_PAIRS and not INTERLEAVE and not B_TRANSPOSED:
        acc = tl.reshape(tl.join(acc, acc_odd), (BLOCK_M, BLOCK_N))

    lora = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    if FOLD_DOWN:
        if pid_n == 0:
            tl.store(l_ptr + offs_m[:, None] * R + offs_down[None, :], down, mask=mask_m[:, None] & mask_down[None, :])
        rm = load_tile(rm_ptr, offs_down, offs_n, stride_rr, stride_rn, mask_down, mask_n)
        lora = dot(round_to(down, compute_dtype), rm, lora)
    else:
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            # l is float32; rounded to the compute dtype as an unfused LoRA's intermediate activation would be.
            lt = round_to(load_tile(l_ptr, offs_m, offs_r, R, 1, mask_m, mask_r), compute_dtype)
            rm = load_tile(rm_ptr, offs_r, offs_n, stride_rr, stride_rn, mask_r, mask_n)
            lora = dot(lt, rm, lora)
    if HAS_DROPOUT:
        keep = keep_tile(bits_ptr, offs_m, offs_n, words_per_row, mask_m, mask_n)
        lora = tl.where(keep, lora, 0.0)
    if FOLD_GRADS:
        x = load_tile(x_ptr, offs_m, offs_n, stride_xm, stride_xk, mask_m, mask_n)
        if HAS_DROPOUT:
            x = tl.where(keep, x, 0.0)
        grad_a = dot(tl.trans(round_to(down, compute_dtype)), x, tl.full((BLOCK_R, BLOCK_N), 0.0, tl.float32))
        tl.store(grad_a_ptr + offs_down[:, None] * N + offs_n[None, :],
                 round_to(grad_a * lora_scale, grad_a_ptr.dtype.element_ty),
                 mask=mask_down[:, None] & mask_n[None, :])
    acc += lora_scale * lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = round_to(acc, c_ptr.dtype.element_ty)
    mask_out = mask_m[:, None] & mask_n[None, :]
    if INTERPRETER:
        store_2d(c_ptr, offs_m * N, offs_n, out, mask_out)
    else:
        tl.store(c_ptr + offs_m[:, None] * N + offs_n[None, :], out, mask=mask_out)


# --------------------------------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatmulConfig:
    """Tiles and launch options of one path. ``path``: ``"gemv"`` (decode kernel; block_n x block_k tiles of W,
    K split over ``split_k`` programs), ``"fused"`` (tiled kernel dequantizing W in its K loop) or ``"dequant"``
    (W dequantized to a buffer, then the tiled GEMM). For the tiled paths block_n is the output column tile and
    block_k the reduction step (in dx: columns are K, the reduction runs over N)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    path: str = "fused"
    # Path "gemv" only: the split's last program writes y (no epilogue launch; _gemv_arrive), or False: the
    # partials are summed by _gemv_epilogue_kernel, a second launch.
    fold_epilogue: bool = True
    # Path "gemv" only: W's tile decoded in the MMA's fragment order where the tile and GPU allow it (128 rows of W,
    # K steps of 128, an NVIDIA GPU, a 16-bit compute dtype: _fragment_rows), or False: in W's own column order
    # (a pass through shared memory per K step).
    fragment_order: bool = True

    def meta(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUP_M=self.group_m)

    @property
    def tag(self) -> str:
        return f"m{self.block_m}n{self.block_n}k{self.block_k}w{self.num_warps}s{self.num_stages}"


PATHS = ("gemv", "fused", "dequant")
# Tiles of the dense GEMM (the "dequant" path) per GPU architecture (compute capability major). Its epilogue
# holds a second (BLOCK_M, BLOCK_N) float32 tile (the LoRA term) beside the accumulator, so 128 x 256 tiles and
# 4-warp 128 x 128 tiles spill; 128 x 128 x 64 with 8 warps and 4 stages compiles with 0 spills for sm_80 and
# sm_90 under triton 3.6 and 3.9 (compile_specs, `python -m perf static`), with 128-bit cp.async loads and
# wgmma on sm_90.
GPU_CONFIGS: dict[int, tuple[MatmulConfig, ...]] = {
    8: (MatmulConfig(128, 128, 64, num_warps=8, num_stages=4, path="dequant"),),
    9: (MatmulConfig(128, 128, 64, num_warps=8, num_stages=4, path="dequant"),),
}
# The fused tiled kernel (path "fused") per GPU architecture: 64-row tiles for few rows, 128-row tiles with 8 warps
# where rows are many (W decoded once per 128 rows). Both decode a packed byte at a time when K is a multiple of
# the blocksize (PAIRS). On sm_90 the 128-row tile takes a 128-wide K step: the per-step cost of the pipelined
# loads and barriers is spread over twice the weight elements (perf static, triton 3.9, bf16, forward / dx, as
# measured when the step was chosen: 128 x 128 x 64 8.4 / 7.8 instructions per weight element, issue_to_mma
# 1.05 / 0.98; 128 x 128 x 128 6.8 / 6.6, 0.86 / 0.83; with 16-byte packed loads since, 6.5 / 6.3, 0.81 / 0.79;
# 0 spills, 148 KiB of shared memory). On sm_80 that tile spills (dx: 192 bytes at 255 registers), so it keeps the
# 64-wide step (14.2 / 13.2, 0.89 / 0.82), as do AMD GPUs (gpu_arch). 64 x 64 x 32: 10.8 / 9.7 on sm_90, 11.9 /
# 12.8 on sm_80.
# Up to this many rows the fused launch takes the 64-row tile, although it decodes W twice as often as the 128-row
# one: twice the programs (64 per row tile at N = 4096, against 108-132 SMs) and, on sm_90, 4 CTAs per SM that
# overlap each other's MMA waits where the 128-row tile's one CTA per SM waits on its wgmma (perf/README.md, "The
# dispatcher against the model": forward predicted 13 vs 33 us at 128 rows and 24 vs 33 at 256 on the H100, 21
# vs 47 and 43 vs 48 on the A100, triton 3.9; from 384 rows the 128-row tile wins on the A100).
FUSED_SMALL_TILE_MAX_M = 256
# Up to 64 rows (one row tile) the fused launch takes 32-column tiles: 128 programs at 4096 columns instead of 64,
# against 108-132 SMs, for more instructions per weight element (perf static, dx, sm_90 / sm_80: 11.3 / 15.4 under
# triton 3.9, 10.9 / 15.4 under 3.6, against 64 x 64 x 32's 9.7 / 12.8; 72-128 registers, 0 spills, gfx942 /
# gfx90a 125-132 VGPRs, 0 scratch). The roofline's grid term predicts the fused launch at M <= 64, N = K = 4096,
# about 40% faster that way. The forward takes a 128-wide K step there (FUSED_NARROW_CONFIG): issue_to_mma 3.23 ->
# 2.25 on sm_90 and 1.83 -> 1.46 on sm_80 under triton 3.9 (2.91 -> 2.06, 1.81 -> 1.45 under 3.6) against the
# 64-wide step, at 80 / 150 registers (from 79 / 96), 236-240 VGPRs on gfx942 / gfx90a (from 168-182), 0 spills
# and 0 scratch. dx keeps the 64-wide step (FUSED_NARROW_DX_CONFIG): its 128-wide build does not compile on sm_90
# (triton 3.9, TritonGPUOptimizeDotOperands) and gains little on sm_80 (1.93 -> 1.85).
FUSED_NARROW_CONFIG = MatmulConfig(64, 32, 128, num_warps=4)
FUSED_NARROW_DX_CONFIG = MatmulConfig(64, 32, 64, num_warps=4)
FUSED_CONFIGS: dict[int, tuple[MatmulConfig, MatmulConfig]] = {
    8: (MatmulConfig(64, 64, 32, num_warps=4), MatmulConfig(128, 128, 64, num_warps=8, num_stages=3)),
    9: (MatmulConfig(64, 64, 32, num_warps=4), MatmulConfig(128, 128, 128, num_warps=8, num_stages=3)),
}
# Decode: 16-row tile (tl.dot's minimum), 128 rows of W (GEMV_BLOCK_NS) x 128 of K (two 64-element scale blocks) per
# step. One stage: latency is left to occupancy (157-165 registers, 3 CTAs per SM); two stages load the next step's
# words and scale codes during this one's decode (load_chain 2 -> 1) for 517 -> 557 instructions per K step on sm_90
# and 578 -> 606 on sm_80 at M = 1 (3.9; 519 -> 553 and 581 -> 604 under 3.6, 0 spills; 541 -> 688 on sm_90 before W
# was decoded in fragment order, _fragment_rows), which the issue-bound H200 model pays for and only a GPU can weigh
# against the latency it hides (perf/profile_linear.py times both). While the step was 64 rows of W, the instructions
# per weight element as launched at M = 1 (perf static, sm_90 / sm_80), bf16, were: with the word decode 4.88 / 5.78
# under triton 3.9, 4.67 / 6.08 under 3.6; with a byte's codes looked up by warp shuffles before, 6.1 / 6.2 (3.9) and
# 5.0 / 6.2 (3.6; sm_90 with the interleaved layout, 7.1 and 6.2 without); at 64 x 64: 7.9 / 6.7 (3.9), 7.7 / 6.7
# (3.6, and 8 bytes of spill on sm_90); the gather-load lookup before that, 64 x 64: 11.2 / 10.1 (3.9), 13.9 / 11.8
# (3.6). Wider tiles gain little with the word decode (16 x 64 x 256: 4.65 on sm_90 under 3.9 at 149 registers) until
# the row mask goes (EVEN_N): then 128 rows of W, GEMV_BLOCK_NS.
SMALL_M_CONFIG = MatmulConfig(16, 128, 128, group_m=1, num_warps=4, num_stages=1, path="gemv")
# Row tiles of the GEMV: 16 (tl.dot's minimum) up to 16 rows, 32 up to SMALL_M. W is decoded once per program
# either way; at 32 rows the launch keeps its split over K (4x the programs of the fused kernel's 64-row tiles at
# N = 4096) and its decode cost (perf static at M = 32, sm_90 / sm_80, word decode with EVEN_N: 5.0 / 7.5
# instructions per weight element under triton 3.9, 4.8 / 7.5 under 3.6, against the fused narrow forward tile's
# 8.5 / 11.7 and 7.9 / 11.6; the roofline predicts the GEMV faster at every M up to 32 on the H100, H200 and A100
# once its split over K is capped by the size of its partials, _gemv_split_k). A 64-row GEMV tile was measured at
# 16.9 on sm_90 under 3.6 (possibly the static model's old misreading of the u loop as the main loop,
# perf/README.md), so the fused kernel keeps M > 32.
GEMV_BLOCK_MS = (16, 32)
# Rows of W per GEMV program, per row tile. With N a multiple of the tile (EVEN_N: no row masks) perf static measured
# the 16-row tile at 4.29 instructions per weight element with 128 rows against 4.67 with 64 on sm_90 (5.5 / 5.67 on
# sm_80; triton 3.9; 4.34 / 5.5 under 3.6; 4.23 / 5.45 since udiv, perf/README.md "Decode GEMV"). The 32-row tile
# keeps 64 rows (5.0 against 4.82 with 128 on sm_90, 7.5 against 6.7 at 254 registers on sm_80): its partials allow
# 2 K splits at 4096 x 4096 (_gemv_split_k), so 128-row tiles would launch 64 programs for 132 SMs, 64-row ones 128.
GEMV_BLOCK_NS = {16: 128, 32: 64}
# Registers per thread at most for the 16-row GEMV tile on NVIDIA GPUs before sm_90 (W decoded in mma.sync's fragment
# order, FRAGMENT_MMA; _gemv_options): left to itself ptxas fits the M = 1 build into 128 registers and spills 24
# bytes under triton 3.9, and both builds 16-24 bytes under 3.6 (perf static, sm_80; 3.9's M = 16 build took 157
# and spilled nothing); bounded, every one takes 157-162 and spills nothing (3 CTAs per SM).
GEMV_MMA_MAXNREG = 168
INTERPRETER_MAX_TILE = 1 << 20  # elements of one tile: the interpreter refuses more
INTERPRETER_MAX_BLOCK_M = 2048
EPILOGUE_BLOCK_N = 128
# The folded GEMV epilogue's order of work in column tile 0: u's partial before W's (True), so that "u complete"
# arrives early and the program that completes u seldom has other tiles' y to write. Both orders give the same bits;
# tests run both (under the interpreter, where programs run one after another, only False makes the u program write
# a tile's y).
GEMV_U_FIRST = True
SPLIT_K_CHOICES = SPLIT_CHOICES


def gemv_config(m: int) -> MatmulConfig:
    """The GEMV's tiles on a GPU for M <= SMALL_M rows: ``SMALL_M_CONFIG`` with the smallest row tile >= M and that
    tile's column tile (``GEMV_BLOCK_NS``)."""
    block_m = next(b for b in GEMV_BLOCK_MS if m <= b)
    if block_m == SMALL_M_CONFIG.block_m:
        return SMALL_M_CONFIG
    return replace(SMALL_M_CONFIG, block_m=block_m, block_n=GEMV_BLOCK_NS[block_m])


def _interpreter_config(rows: int, cols: int, inner: int, path: str) -> MatmulConfig:
    # Few, huge programs: interpreter cost grows with the number of program instances and loop trips, and every
    # row tile decodes W again. Rows first (up to 2048), then columns and the reduction step, each tile (x, W and
    # the accumulator) within the interpreter's 2^20 elements (perf/README.md, "Interpreter speed of the layer").
    if path == "gemv":
        block_n = pow2_clamp(cols, 16, 2048)
        return MatmulConfig(16 if rows <= 16 else 32, block_n,
                            pow2_clamp(inner, 32, min(1024, INTERPRETER_MAX_TILE // block_n)), group_m=1, path=path)
    block_m = pow2_clamp(rows, 16, INTERPRETER_MAX_BLOCK_M)
    block_n = pow2_clamp(cols, 16, min(2048, INTERPRETER_MAX_TILE // block_m))
    block_k = pow2_clamp(inner, 16, min(2048, INTERPRETER_MAX_TILE // block_n, INTERPRETER_MAX_TILE // block_m))
    return MatmulConfig(block_m, block_n, block_k, group_m=1, path=path)


def _autotuned(configs: tuple[MatmulConfig, ...]):
    # EVEN_K and EVEN_N follow the config's BLOCK_K and BLOCK_N, which only the autotuner knows: heuristics inside it.
    return triton.autotune(
        configs=[triton.Config(c.meta(), num_warps=c.num_warps, num_stages=c.num_stages) for c in configs],
        key=["M", "N", "K"],
    )(triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0,
                         "EVEN_N": lambda args: _even_n(args["N"], args["BLOCK_N"])})(_matmul_lora_kernel))


_TUNED: dict[int, object] = {}


_GPU_ARCH: list[int] = []


def gpu_arch() -> int:
    """The current GPU's key in ``GPU_CONFIGS`` / ``FUSED_CONFIGS`` (asked of the driver once): 9 for NVIDIA GPUs
    from compute capability 9.0 on, else 8. AMD GPUs (ROCm reports a capability 9.x) take 8: there the fused
    kernel's 128-wide K step spills (perf static, gfx942 / gfx90a: 132 / 144 bytes of scratch)."""
    if not _GPU_ARCH:
        major = torch.cuda.get_device_capability()[0]
        _GPU_ARCH.append(9 if major >= 9 and torch.version.hip is None else 8)
    return _GPU_ARCH[0]


def _tuned_matmul():
    """The autotuned dense GEMM for the current GPU's architecture (built on first use)."""
    arch = gpu_arch()
    if arch not in _TUNED:
        _TUNED[arch] = _autotuned(GPU_CONFIGS[arch])
    return _TUNED[arch]


def choose_path(m: int, k: int, blocksize: int, config: MatmulConfig | None = None, arch: int | None = None) -> str:
    """The forward path for M rows and K columns (a GPU's default dispatch) on GPU architecture ``arch`` (a
    ``FUSED_MAX_M`` key; default this GPU's, :func:`gpu_arch`): where W's rows are whole scale blocks (K a
    multiple of the blocksize), the GEMV kernel at M <= SMALL_M and the fused tiled kernel at M <=
    ``FUSED_MAX_M[arch]`` (None: any M); the dequantize-then-GEMM path otherwise.

    Why, by the static cost model (``python -m perf roofline``, perf/README.md): at M <= 32 the work is reading W,
    and the GEMV reads its packed bytes once (0.5 B per element, split over K to fill the SMs). Above, the fused
    kernel decodes each packed byte once per row tile in its K loop (6.0-14.2 instructions per weight element,
    issue_to_mma 0.75-0.89 with 128-row tiles) instead of writing W in bf16 and reading it back (4.5 B per
    element). On sm_90 the 128-row tile's loop waits for its warpgroup MMAs before decoding the next tile (one CTA
    per SM), so decode and MMA time add up; the 64-row tile (4 CTAs per SM) is kept up to 256 rows
    (``FUSED_SMALL_TILE_MAX_M``), and above, the dense GEMM after one dequantize launch (issue_to_mma 0.29-0.37,
    pipelined) is predicted faster on the H100 and H200 (from 320 rows with 64-row tiles), hence 256. On sm_80 the
    MMAs overlap the decode: the fused kernel is predicted faster at every M (15% at 1024 rows, 4% at 4096 on the
    A100). The model counts SMs left idle by small grids (128 programs per 64-row tile at N = 4096 with the narrow
    tile, 64 with the next, 32 per 128-row tile, against 108-132 SMs). AMD GPUs (not modelled) follow
    architecture 8. Where K is not a multiple of the blocksize the fused kernel decodes code by code (43-72
    instructions per element) and the dequantize path wins at every M."""
    path = _arch_free_path(m, k, blocksize, config)
    if path is not None:
        return path
    limit = FUSED_MAX_M[gpu_arch() if arch is None else arch]
    return "fused" if limit is None or m <= limit else "dequant"


def _arch_free_path(m: int, k: int, blocksize: int, config: MatmulConfig | None) -> str | None:
    """:func:`choose_path`'s rules that need no GPU architecture (the forward asks them without querying the
    device, which under the interpreter has none): the config's path, "dequant" where K is not a multiple of the
    blocksize, "gemv" up to SMALL_M rows; None where the architecture decides."""
    if config is not None:
        return config.path
    if k % blocksize != 0:
        return "dequant"
    return "gemv" if m <= SMALL_M else None


def choose_dx_path(m: int, k: int, blocksize: int, arch: int | None = None) -> str:
    """The backward's dx path (no config): the forward's, with the fused kernel where the forward takes the GEMV
    (which is forward-only)."""
    path = choose_path(m, k, blocksize, arch=arch)
    return "fused" if path == "gemv" else path


def fused_config(m: int, arch: int | None = None, dx: bool = False) -> MatmulConfig:
    """The fused kernel's tiles for M rows on GPU architecture ``arch`` (a ``FUSED_CONFIGS`` key; default this
    GPU's), forward or ``dx``: ``FUSED_NARROW_CONFIG`` (``FUSED_NARROW_DX_CONFIG`` for dx) for one 64-row tile,
    64-row tiles up to ``FUSED_SMALL_TILE_MAX_M`` rows, the 128-row tile above."""
    if m <= FUSED_NARROW_CONFIG.block_m:
        return FUSED_NARROW_DX_CONFIG if dx else FUSED_NARROW_CONFIG
    small, large = FUSED_CONFIGS[gpu_arch() if arch is None else arch]
    return small if m <= FUSED_SMALL_TILE_MAX_M else large


# --------------------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------------------


def _check_nf4(packed, absmax, code, shape, blocksize, absmax2, offset, nested_code, nested_blocksize):
    """Validate the NF4 base weight's tensors; returns (N, K, double_quant)."""
    check_tensor("packed", packed, (torch.uint8,), ndim=1)
    check_tensor("code", code, (torch.float32,), ndim=1)
    if code.numel() != 16:
        raise ValueError(f"code must hold the 16 NF4 values, got shape {tuple(code.shape)}")
    check_blocksize(blocksize)
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise ValueError(f"shape must be the base weight's (out_features, in_features), both >= 1, got {shape!r}")
    n, k = int(shape[0]), int(shape[1])
    if packed.numel() != (n * k + 1) // 2:
        raise ValueError(f"packed must hold {(n * k + 1) // 2} bytes for shape {(n, k)}, got {packed.numel()}")
    nblocks = cdiv(n * k, blocksize)
    double_quant = absmax2 is not None
    if double_quant != (nested_code is not None) or double_quant != (offset is not None):
        raise ValueError("absmax2, offset and nested_code must be given together (double quantization) or not at all")
    check_tensor("absmax", absmax, (torch.uint8,) if double_quant else (torch.float32,), ndim=1)
    if absmax.numel() != nblocks:
        raise ValueError(f"absmax must hold {nblocks} scales for shape {(n, k)} at blocksize {blocksize}, "
                         f"got {absmax.numel()}")
    if double_quant:
        if nested_blocksize != NESTED_BLOCKSIZE:
            raise ValueError(f"nested_blocksize must be {NESTED_BLOCKSIZE}, got {nested_blocksize!r}")
        check_tensor("absmax2", absmax2, (torch.float32,), ndim=1)
        check_tensor("nested_code", nested_code, (torch.float32,), ndim=1)
        if absmax2.numel() != cdiv(nblocks, NESTED_BLOCKSIZE):
            raise ValueError(f"absmax2 must hold {cdiv(nblocks, NESTED_BLOCKSIZE)} scales, "
                             f"got {absmax2.numel()}")
        if nested_code.numel() != 256:
            raise ValueError(f"nested_code must hold 256 values, got {nested_code.numel()}")
        if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
            raise ValueError(f"offset must be a finite float, got {offset!r}")
    for name, t in (("packed", packed), ("absmax", absmax), ("code", code), ("absmax2", absmax2),
                    ("nested_code", nested_code)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    return n, k, double_quant


def _check_lora(lora_a, lora_b, n, k, dtype):
    check_tensor("lora_a", lora_a, (dtype,), ndim=2)
    check_tensor("lora_b", lora_b, (dtype,), ndim=2)
    r = lora_a.shape[0]
    if r < 1 or lora_a.shape[1] != k:
        raise ValueError(f"lora_a must have shape (r, {k}) with r >= 1, got {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (n, r):
        raise ValueError(f"lora_b must have shape ({n}, {r}) to match lora_a's rank {r}, got {tuple(lora_b.shape)}")
    return r


def _check_config(config, m: int):
    if config is None:
        return
    if not isinstance(config, MatmulConfig):
        raise TypeError(f"config must be a MatmulConfig or None, got {type(config).__name__}")
    if config.path not in PATHS:
        raise ValueError(f"config.path must be one of {PATHS}, got {config.path!r}")
    if config.split_k not in SPLIT_K_CHOICES or (config.split_k > 1 and config.path != "gemv"):
        raise ValueError(f"config.split_k must be one of {SPLIT_K_CHOICES} (> 1 only with path 'gemv'), "
                         f"got {config.split_k!r}")
    for flag in ("fold_epilogue", "fragment_order"):
        if not isinstance(getattr(config, flag), bool):
            raise TypeError(f"config.{flag} must be a bool, got {type(getattr(config, flag)).__name__}")
    if config.path == "gemv" and (m > config.block_m or config.block_m not in GEMV_BLOCK_MS or config.block_k < 32):
        raise ValueError(f"a 'gemv' config needs block_m in {GEMV_BLOCK_MS}, >= M ({m}), and block_k >= 32, "
                         f"got {config}")


def word_aligned(packed: torch.Tensor) -> torch.Tensor:
    """``packed`` itself, or a copy of its bytes that starts on an aligned address where the compiled kernels would
    read it as 32-bit words from an address that is not a multiple of 4: a view into a larger uint8 buffer can start
    at any byte, and a GPU faults on a misaligned word load (the GEMV and the fused kernel's word decode read W so).
    Under the interpreter words are read at any address, and ``packed`` is returned as it is."""
    if interpreter_active() or packed.data_ptr() % 4 == 0:
        return packed
    return packed.clone()


class _Weight:
    """The NF4 weight's kernel arguments; unused double-quant pointers alias absmax. ``packed`` word-aligned
    (:func:`word_aligned`)."""

    def __init__(self, packed, absmax, code, shape, blocksize, absmax2, offset, nested_code, double_quant):
        packed = word_aligned(packed)
        self.packed, self.absmax, self.code, self.blocksize = packed, absmax, code, blocksize
        self.absmax2, self.offset_arg, self.nested_code = absmax2, offset, nested_code
        self.double_quant = double_quant
        self.n, self.k = int(shape[0]), int(shape[1])
        self.ptrs = (packed, absmax, absmax2 if double_quant else absmax, nested_code if double_quant else absmax,
                     code)
        self.offset = float(offset) if double_quant else 0.0
        self.index_64 = self.n * self.k >= 2**31 - 1

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """W (N, K) in ``dtype``, contiguous: the dequantize_4bit kernel's output (so the GEMM sees exactly its
        values), launched directly since the launcher has checked the weight already."""
        out = torch.empty((self.n, self.k), dtype=dtype, device=self.packed.device)
        launch_dequantize_4bit(self.packed, self.absmax, self.absmax2 if self.double_quant else None,
                               self.nested_code if self.double_quant else None, self.offset, self.code, out,
                               self.blocksize, NESTED_BLOCKSIZE)
        return out

    def consts(self, row_len: int, col_tile: int) -> dict:
        return dict(BLOCKSIZE=self.blocksize, DOUBLE_QUANT=self.double_quant, NESTED_BLOCKSIZE=NESTED_BLOCKSIZE,
                    ROW_SCALE=row_len % self.blocksize == 0 and self.blocksize % col_tile == 0,
                    INDEX_64=self.index_64)


# --------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------


def _matmul_plan(m: int, cols: int, inner: int, weight: _Weight, config: MatmulConfig | None, dx: bool):
    """``(path, config)`` of a ``_matmul_lora_kernel`` launch (the forward, or ``dx``) with output (m, cols) reduced
    over ``inner``; config None on the "dequant" path means the autotuned GPU GEMM."""
    if config is not None:
        return config.path, config
    if interpreter_active():
        # The interpreter decodes W in the K loop at every M where K is a multiple of the blocksize: there no
        # buffer of W is written and read back, and interpreted loads and tile operations cost, not issue slots.
        path = "fused" if weight.k % weight.blocksize == 0 else "dequant"
        return path, _interpreter_config(m, cols, inner, path)
    path = choose_dx_path(m, weight.k, weight.blocksize)  # forward launches come here only off the GEMV path
    return path, (fused_config(m, dx=dx) if path == "fused" else None)


def _folds_down(path: str, r: int, dropout: bool) -> bool:
    """Whether the launch computes the LoRA down-projection (u or g) in its own K loop instead of reading it from a
    ``lora_down`` launch: under the interpreter on the fused path, when the rank fits one rank tile and the operand
    needs no dropout mask (x and dy then pass through the interpreter once per GEMM instead of twice). Not on a
    GPU: there the rank-r product adds 1.5-2.9 instructions per weight element to the issue-bound fused kernel
    (``perf static``: 64 x 64 x 32 forward 11.5 -> 14.4 on sm_90, dx 10.8 -> 13.1), which the static model
    charges more than the ``lora_down`` launch it saves."""
    return interpreter_active() and path == "fused" and r <= lora_block_r(r) and not dropout


def _launch_matmul(a, weight: _Weight, transposed: bool, l, rm, stride_rr, stride_rn, bias, keep, out, lora_scale,
                   plan, down=None, grads=None):
    """out (M, cols) = a @ (W^T if transposed else W) + lora_scale * (round(l) @ rm) [* keep] + bias, ``plan`` from
    :func:`_matmul_plan`. ``down`` = (d, stride_dk, stride_dr): l (float32 (M, R)) is written by the kernel as
    ``a @ d`` instead of read. ``keep`` masks the LoRA term (dx). ``grads`` = (x, u, d_a, d_b, d_bias or None,
    scaling), dx with ``down`` and one row tile only: the kernel also writes the LoRA gradients (FOLD_GRADS)."""
    m, inner = a.shape
    cols = out.shape[1]
    r = l.shape[1]
    interp = interpreter_active()
    path, config = plan
    # The fused kernel decodes a packed byte at a time (PAIRS) where W's rows are whole scale blocks and, on a GPU,
    # the halved tile keeps tl.dot's 16-element minimum; else code by code (_dequant_tile).
    pairs = path == "fused" and weight.k % weight.blocksize == 0 and (
        interp or (config.block_k if transposed else config.block_n) >= 32)
    if path == "fused":
        b = weight.packed
        stride_bk = stride_bn = 0
        consts = weight.consts(weight.k, config.block_k if transposed else config.block_n)
    else:
        b = weight.dense(a.dtype)  # (N, K)
        stride_bk, stride_bn = (1, weight.k) if transposed else (weight.k, 1)
        consts = weight.consts(weight.k, 1)
    d, stride_dk, stride_dr = down if down is not None else (rm, 0, 0)
    x, u, d_a, d_b, d_bias, grad_b_scale = grads if grads is not None else (a, l, out, out, None, 0.0)
    args = (a, b, *weight.ptrs[1:], l, rm, out if bias is None else bias, out if keep is None else keep, out, d,
            x, u, d_a, d_b, out if d_bias is None else d_bias,
            m, cols, inner, r, weight.offset, float(lora_scale), cdiv(weight.k, 32), float(grad_b_scale),
            a.stride(0), a.stride(1), stride_bk, stride_bn, stride_rr, stride_rn, stride_dk, stride_dr,
            x.stride(0), x.stride(1))
    # Unit strides stay 1 (Triton specializes them); the others, N and K must be multiples of 16.
    aligned = (not interp and a.stride(1) == 1 and min(stride_bk, stride_bn) <= 1
               and all(v % 16 == 0 for v in (cols, inner, a.stride(0), max(stride_bk, stride_bn))))
    consts.update(B_NF4=path == "fused", B_TRANSPOSED=transposed, HAS_BIAS=bias is not None,
                  HAS_DROPOUT=keep is not None, ALIGNED=aligned, PAIRS=pairs, FOLD_DOWN=down is not None,
                  FOLD_GRADS=grads is not None, FOLD_BIAS_GRAD=grads is not None and d_bias is not None,
                  BLOCK_R=lora_block_r(r))
    if config is None:
        def grid(meta):
            return (cdiv(m, meta["BLOCK_M"]) * cdiv(cols, meta["BLOCK_N"]),)

        _tuned_matmul()[grid](*args, enable_fp_fusion=False, **consts)
        return
    grid = (cdiv(m, config.block_m), cdiv(cols, config.block_n))  # the kernel's 2-D grid
    if not (interp and config.group_m == 1):
        grid = (grid[0] * grid[1],)
    # EVEN_K drops the K-bound masks; not for the code-by-code decode, whose build then spills on sm_80 (3.6).
    even_k = inner % config.block_k == 0 and (pairs or path != "fused")
    _matmul_lora_kernel[grid](*args, **consts, **config.meta(), EVEN_K=even_k, EVEN_N=_even_n(cols, config.block_n),
                              num_warps=config.num_warps,
                              num_stages=config.num_stages, enable_fp_fusion=False)


def _even_n(cols: int, block_n: int) -> bool:
    """EVEN_N of a ``_matmul_lora_kernel`` launch: its column tiles fill ``cols`` (no column masks), for tiles of 64
    columns or more. perf static with the masks dropped, triton 3.9, instructions per weight element sm_90 / sm_80:
    forward 128 x 128 x 128 6.14 -> 6.02, 64 x 64 x 32 10.44 -> 9.81 / 11.88 -> 10.88, the dense GEMM's issue_to_mma
    0.348 -> 0.309 / 0.346 -> 0.326; the 32-column narrow forward went the other way (8.47 -> 8.69 / 11.69 ->
    11.81), so it keeps its masks."""
    return cols % block_n == 0 and block_n >= 64


def _gemv_split_k(n: int, k: int, cfg: MatmulConfig, sms: int | None = None, m: int = 1) -> int:
    """K splits of an ``m``-row GEMV so that about two programs per SM run (``sms``: this GPU's SMs unless given),
    each keeping at least two K steps, and the float32 partials of y stay within a quarter of W's packed bytes: a
    split writes 4 m n bytes that the epilogue reads back, against n k / 2 bytes of W, so at most k / (64 m)
    splits (at 4096 x 4096: 16 splits at M = 1, 4 at M = 16, 2 at M = 32)."""
    split = split_count(cdiv(n, cfg.block_n), k, cfg.block_k, num_sms() if sms is None else sms)
    while split > 1 and 64 * m * split > k:
        split //= 2
    return split


def fragment_tile(config: MatmulConfig) -> bool:
    """Whether a GEMV launch with ``config``'s tile decodes W in the MMA's fragment order on an NVIDIA GPU with a
    16-bit compute dtype (``_nf4_gemv_kernel``'s FRAGMENT, which tests the same constexprs): 128 rows of W and K
    steps of 128, ``fragment_order`` on."""
    return config.fragment_order and config.block_n == 128 and config.block_k == 128


def _gemv_options(config: MatmulConfig, dtype: torch.dtype, mma_sync: bool) -> dict:
    """Compile options of a GEMV launch on a GPU beyond the config's: ``maxnreg`` (``GEMV_MMA_MAXNREG``) where the
    tile decodes W in mma.sync's fragment order (:func:`fragment_tile`; ``mma_sync``: an NVIDIA GPU before sm_90;
    a 16-bit compute dtype)."""
    if mma_sync and fragment_tile(config) and dtype != torch.float32:
        return {"maxnreg": GEMV_MMA_MAXNREG}
    return {}


def _zeroed_arrivals(tiles: int, device) -> torch.Tensor:
    """(tiles + 1,) int32 zeros: the folded GEMV epilogue's arrival counts (column tiles, then u), new for every
    launch, so that no launch can see another's counts whatever streams or graphs they run in. On a GPU a fill
    launch of its own (perf/launches.py records it as ``zero_fill``)."""
    return torch.zeros(tiles + 1, dtype=torch.int32, device=device)


def _launch_gemv(x, weight: _Weight, lora_a, lora_b, bias, keep, scaling, p, config: MatmulConfig | None):
    m, k = x.shape
    n, r = weight.n, lora_a.shape[0]
    interp = interpreter_active()
    if config is None:
        config = _interpreter_config(m, n, k, "gemv") if interp else gemv_config(m)
        split = 1 if interp else _gemv_split_k(n, k, config, m=m)
    else:
        split = config.split_k
    block_k = config.block_k
    k_per_split = cdiv(cdiv(k, split), block_k) * block_k
    split = cdiv(k, k_per_split)
    block_r = lora_block_r(r)
    tiles = cdiv(n, config.block_n)
    ws = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    u_ws = torch.empty((split, m, r), dtype=torch.float32, device=x.device)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    u = torch.empty((m, r), dtype=torch.float32, device=x.device)
    fold = config.fold_epilogue
    arrivals = _zeroed_arrivals(tiles, x.device) if fold else ws
    # Under the interpreter, masked-off lanes of a partial N tile compute on values that are never stored (a
    # NumPy overflow warning once seen in a full run); on a GPU ieee_semantics() is a no-op.
    with ieee_semantics():
        _nf4_gemv_kernel[(tiles, split)](
            x, *weight.ptrs, lora_a, x if keep is None else keep, ws, u_ws,
            arrivals, lora_b, y if bias is None else bias, y, u,
            m, n, k, r, weight.offset, k_per_split, cdiv(k, 32), float(scaling), 1.0 / (1.0 - p),
            x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1),
            BLOCKSIZE=weight.blocksize, DOUBLE_QUANT=weight.double_quant, NESTED_BLOCKSIZE=NESTED_BLOCKSIZE,
            INDEX_64=weight.index_64, HAS_DROPOUT=keep is not None, EVEN_K=k % block_k == 0,
            EVEN_N=n % config.block_n == 0, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=block_k,
            BLOCK_R=block_r, FOLD=fold, U_FIRST=fold and GEMV_U_FIRST, HAS_BIAS=bias is not None,
            FRAGMENT_ORDER=config.fragment_order, num_warps=config.num_warps, num_stages=config.num_stages,
            enable_fp_fusion=False,
            **({} if interp else _gemv_options(config, x.dtype, torch.version.hip is None and gpu_arch() == 8)))
    if fold:
        return y, u
    block_n = pow2_clamp(n, 16, 2048) if interp else EPILOGUE_BLOCK_N
    _gemv_epilogue_kernel[(cdiv(n, block_n),)](
        ws, u_ws, lora_b, y if bias is None else bias, y, u, m, n, r, split, float(scaling), 1.0 / (1.0 - p),
        lora_b.stride(0), lora_b.stride(1), HAS_BIAS=bias is not None, BLOCK_M=config.block_m, BLOCK_N=block_n,
        BLOCK_R=block_r, enable_fp_fusion=False)
    return y, u


def nf4_lora_forward(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape, blocksize: int,
    lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, bias: torch.Tensor | None = None, *,
    absmax2: torch.Tensor | None = None, offset: float | None = None, nested_code: torch.Tensor | None = None,
    nested_blocksize: int = NESTED_BLOCKSIZE, dropout_p: float = 0.0, seed=0, keep: torch.Tensor | None = None,
    config: MatmulConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = x @ W^T + scaling * (dropout(x) @ A^T) @ B^T + bias``; returns ``(y, u)``.

    x (M, K) fp32/fp16/bf16, any strides; W (N, K) given as NF4 tensors (``shape = (N, K)``, the arguments of
    ``dequantize_4bit``), used in x's dtype; lora_a (R, K), lora_b (N, R), bias (N,) in x's dtype. y (M, N) in
    x's dtype, contiguous; u (M, R) float32 = ``dropout(x) @ A^T`` for the backward. Dropout: ``keep`` (the
    bit-packed mask, :func:`lora_dropout_bits`) or else ``seed`` (int, or one-element int64 tensor on the
    kernels' device, read by the kernel). ``config`` forces a path and its tiles (module docstring).
    """
    n, k, double_quant = _check_nf4(packed, absmax, code, shape, blocksize, absmax2, offset, nested_code,
                                    nested_blocksize)
    check_tensor("x", x, FLOAT_DTYPES, ndim=2)
    if x.shape[1] != k:
        raise ValueError(f"x must have {k} columns (in_features of the weight), got shape {tuple(x.shape)}")
    r = _check_lora(lora_a, lora_b, n, k, x.dtype)
    if bias is not None:
        check_tensor("bias", bias, (x.dtype,), ndim=1)
        if bias.numel() != n or not bias.is_contiguous():
            raise ValueError(f"bias must be contiguous of shape ({n},), got {tuple(bias.shape)}")
    check_same_device(x=x, packed=packed, absmax=absmax, code=code, absmax2=absmax2, nested_code=nested_code,
                      lora_a=lora_a, lora_b=lora_b, bias=bias)
    scaling = check_scalar("scaling", scaling)
    p = check_scalar("dropout_p", dropout_p, 0.0, 1.0)
    m = x.shape[0]
    _check_config(config, m)
    keep = keep_bits(keep, seed, m, k, p, x.device)
    if config is not None and config.path == "gemv" and k % blocksize != 0:
        raise ValueError(f"the 'gemv' path needs K ({k}) to be a multiple of the blocksize ({blocksize})")
    weight = _Weight(packed, absmax, code, (n, k), blocksize, absmax2, offset, nested_code, double_quant)
    return _forward(x, weight, lora_a, lora_b, bias, scaling, p, keep, config)


def _forward(x, weight: _Weight, lora_a, lora_b, bias, scaling: float, p: float, keep, config):
    """The forward's launches, arguments checked (by :func:`nf4_lora_forward` or by the layer)."""
    m, n, r = x.shape[0], weight.n, lora_a.shape[0]
    if m == 0:
        return torch.empty((0, n), dtype=x.dtype, device=x.device), torch.empty((0, r), device=x.device)
    if _arch_free_path(m, weight.k, weight.blocksize, config) == "gemv":
        return _launch_gemv(x, weight, lora_a, lora_b, bias, keep, scaling, p, config)
    plan = _matmul_plan(m, n, weight.k, weight, config, dx=False)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if _folds_down(plan[0], r, keep is not None):
        # u = x A^T in the GEMM's K loop: d = A^T, element (k, r) of lora_a (R, K) at r * stride(0) + k * stride(1).
        u = torch.empty((m, r), dtype=torch.float32, device=x.device)
        down = (lora_a, lora_a.stride(1), lora_a.stride(0))
    else:
        u, down = launch_lora_down(x, lora_a.t(), p, keep), None
    # rm = B^T: element (r, n) of lora_b (N, R) at n * stride(0) + r * stride(1).
    _launch_matmul(x, weight, True, u, lora_b, lora_b.stride(1), lora_b.stride(0), bias, None, y, scaling, plan, down)
    return y, u


def prechecked_weight(packed, absmax, code, shape, blocksize: int, absmax2, offset, nested_code) -> _Weight:
    """The kernel arguments of an NF4 weight that was validated when it was built (``qlora.NF4Weight``)."""
    return _Weight(packed, absmax, code, shape, blocksize, absmax2, offset, nested_code, absmax2 is not None)


def nf4_lora_forward_prechecked(x, weight: _Weight, lora_a, lora_b, bias, scaling: float, dropout_p: float, seed):
    """:func:`nf4_lora_forward` for callers that have checked every argument already (``qlora.functional``
    checks what a call can change; the weight is immutable and was validated when built): x (M, K) 2-D, lora and
    bias shapes, dtypes and devices agree, scaling a float, ``seed`` an int or a one-element int64 device tensor.

    Returns ``(y, u, keep)``: ``keep`` is the bit-packed dropout mask (int32 (M, ceil(K / 32))) the forward
    generated from ``seed`` (one ``_dropout_bits_kernel`` launch), None without dropout; the backward takes it
    instead of regenerating it."""
    keep = lora_dropout_bits(seed, (x.shape[0], weight.k), dropout_p) if dropout_p > 0 else None
    y, u = _forward(x, weight, lora_a, lora_b, bias, scaling, dropout_p, keep, None)
    return y, u, keep


def nf4_lora_backward_prechecked(dy, x, u, weight: _Weight, lora_a, lora_b, scaling: float, dropout_p: float, keep,
                                 need_dx: bool, need_lora: bool, need_bias: bool):
    """:func:`nf4_lora_backward` for callers that have checked every argument already (see
    :func:`nf4_lora_forward_prechecked`); dy (M, N) in x's dtype; ``keep`` the forward's bit-packed mask (None
    without dropout): the backward reads it and launches no mask kernel of its own."""
    if dropout_p > 0 and keep is None:
        raise ValueError("keep (the forward's bit-packed dropout mask) is required when dropout_p > 0")
    return _backward(dy, x, u, weight, lora_a, lora_b, scaling, dropout_p, keep, need_dx, need_lora, need_bias,
                     None)


def nf4_lora_backward(
    dy: torch.Tensor, x: torch.Tensor, u: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
    code: torch.Tensor, shape, blocksize: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, *,
    absmax2: torch.Tensor | None = None, offset: float | None = None, nested_code: torch.Tensor | None = None,
    nested_blocksize: int = NESTED_BLOCKSIZE, dropout_p: float = 0.0, seed=0, keep: torch.Tensor | None = None,
    need_dx: bool = True, need_lora: bool = True, need_bias: bool = False, config: MatmulConfig | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`nf4_lora_forward`: ``(dx, dA, dB, dbias)``, each None unless asked for.

    dy (M, N) and x (M, K) in one float dtype, any strides; u (M, R) float32 from the forward (same dropout mask:
    pass the forward's ``keep``, or the same ``dropout_p`` and ``seed``). ``dx = dy @ W + scaling * ((dy @ B) @ A)
    * mask`` with W in its stored layout, ``dA = scaling * (dy @ B)^T @ dropout(x)``, ``dB = scaling * dy^T @ u``,
    ``dbias = dy.sum(0)``; all in x's dtype with float32 accumulation, contiguous. A ``config`` with path "fused"
    dequantizes W tile by tile in the dx kernel, "dequant" into a buffer first; without a config
    :func:`choose_dx_path` decides.
    """
    n, k, double_quant = _check_nf4(packed, absmax, code, shape, blocksize, absmax2, offset, nested_code,
                                    nested_blocksize)
    check_tensor("x", x, FLOAT_DTYPES, ndim=2)
    check_tensor("dy", dy, (x.dtype,), ndim=2)
    if x.shape[1] != k or tuple(dy.shape) != (x.shape[0], n):
        raise ValueError(f"dy {tuple(dy.shape)} and x {tuple(x.shape)} must be (M, {n}) and (M, {k})")
    r = _check_lora(lora_a, lora_b, n, k, x.dtype)
    check_tensor("u", u, (torch.float32,), ndim=2)
    if tuple(u.shape) != (x.shape[0], r) or not u.is_contiguous():
        raise ValueError(f"u must be contiguous float32 of shape {(x.shape[0], r)}, got {tuple(u.shape)}")
    check_same_device(dy=dy, x=x, u=u, packed=packed, absmax=absmax, code=code, absmax2=absmax2,
                      nested_code=nested_code, lora_a=lora_a, lora_b=lora_b)
    scaling = check_scalar("scaling", scaling)
    p = check_scalar("dropout_p", dropout_p, 0.0, 1.0)
    m = x.shape[0]
    _check_config(config, m)
    keep = keep_bits(keep, seed, m, k, p, x.device) if (need_dx or need_lora) else None
    weight = _Weight(packed, absmax, code, (n, k), blocksize, absmax2, offset, nested_code, double_quant)
    return _backward(dy, x, u, weight, lora_a, lora_b, scaling, p, keep, need_dx, need_lora, need_bias, config)


def _backward(dy, x, u, weight: _Weight, lora_a, lora_b, scaling: float, p: float, keep, need_dx: bool,
              need_lora: bool, need_bias: bool, config):
    """The backward's launches, arguments checked (by :func:`nf4_lora_backward` or by the layer)."""
    m, n, k, r = x.shape[0], weight.n, weight.k, lora_a.shape[0]
    dx = d_a = d_b = d_bias = None
    if config is not None and config.path == "gemv":
        config = None  # the decode path is forward-only; dx takes the default
    plan = _matmul_plan(m, k, n, weight, config, dx=True) if need_dx and m else None
    fold = plan is not None and _folds_down(plan[0], r, False)
    lora_scale = scaling / (1.0 - p)
    if need_lora:
        d_a = torch.empty((r, k), dtype=x.dtype, device=x.device)
    if need_lora or need_bias:
        d_b = torch.empty((n, r), dtype=x.dtype, device=x.device)
        d_bias = torch.empty((n,), dtype=x.dtype, device=x.device) if need_bias else None
    # Under the interpreter the dx launch that folds g also computes dA, dB and the bias gradient when one row tile
    # holds all M rows (its programs then see every row of dy and x): dy and x pass through the interpreter once.
    fold_grads = fold and need_lora and m <= plan[1].block_m
    # Else, up to DOWN_GRAD_MAX_M rows and one rank tile, g and dB (with the bias gradient) share one pass over dy.
    down_grad = not fold and need_lora and down_grad_fits(m, r)
    if fold:  # g = dy @ B computed by the dx launch, in its K loop over N
        g = torch.empty((m, r), dtype=torch.float32, device=x.device)
    elif down_grad:
        g = launch_lora_down_grad(dy, lora_b, u, d_b.t(), scaling, d_bias)
    else:
        g = launch_lora_down(dy, lora_b, 0.0, None) if (need_dx or need_lora) else None  # float32 (M, R)
    if need_dx:
        dx = torch.empty((m, k), dtype=x.dtype, device=x.device)
        if m:
            # d = B: element (n, r) of lora_b (N, R) at n * stride(0) + r * stride(1).
            _launch_matmul(dy, weight, False, g, lora_a, lora_a.stride(0), lora_a.stride(1), None, keep, dx,
                           lora_scale, plan, (lora_b, lora_b.stride(0), lora_b.stride(1)) if fold else None,
                           (x, u, d_a, d_b, d_bias, scaling) if fold_grads else None)
    if need_lora and not fold_grads:
        launch_lora_grad(g, x, d_a, lora_scale, None, p, keep)
    if (need_lora or need_bias) and not fold_grads and not down_grad:
        launch_lora_grad(u, dy, d_b.t(), scaling, d_bias, 0.0, None)
    if not need_lora:
        d_b = None
    return dx, d_a, d_b, d_bias


# --------------------------------------------------------------------------------------------------------------
# Static compile specifications: derived from the configs the launchers above use
# --------------------------------------------------------------------------------------------------------------

_WEIGHT_TYPES = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "absmax2_ptr": "*fp32", "nested_code_ptr": "*fp32",
                 "code_ptr": "*fp32", "offset": "fp32"}


def _signature(fn, types: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Every argument of ``fn`` typed: constexprs by name, pointers and scalars from ``types``, other ints i32."""
    return {name: ("constexpr" if name in constexprs else types.get(name, "i32")) for name in fn.arg_names}


def _weight_consts(row_scale: bool) -> dict:
    # bf16, double-quantized, blocksize 64 (the QLoRA default); K a multiple of 64.
    return dict(BLOCKSIZE=64, DOUBLE_QUANT=True, NESTED_BLOCKSIZE=NESTED_BLOCKSIZE, ROW_SCALE=row_scale,
                INDEX_64=False)


def compile_specs() -> list[KernelSpec]:
    """Every kernel of this module in every config a GPU launch can pick (bf16, double-quantized, blocksize 64,
    rank tile 16, dropout on where a kernel applies it): the dense GEMM's autotune lists of both architectures,
    forward and dx; the fused tiled kernel's configs; the decode kernel and its epilogue."""
    dt = "bf16"
    specs: list[KernelSpec] = []
    types = {**_WEIGHT_TYPES, "a_ptr": f"*{dt}", "l_ptr": "*fp32", "rm_ptr": f"*{dt}", "bias_ptr": f"*{dt}",
             "bits_ptr": "*i32", "c_ptr": f"*{dt}", "down_ptr": f"*{dt}", "lora_scale": "fp32", "x_ptr": f"*{dt}",
             "u_ptr": "*fp32", "grad_a_ptr": f"*{dt}", "grad_b_ptr": f"*{dt}", "grad_bias_ptr": f"*{dt}",
             "grad_b_scale": "fp32"}
    # (config, kind): "dense" (after the dequantize launch), "fused" (K a multiple of the blocksize: PAIRS) and
    # "fused_percode" (the first fused config where K is not: codes decoded one by one, scales per element). No
    # FOLD_DOWN build: only the interpreter folds (_folds_down).
    both = (True, False)  # forward (b = W^T, bias) and dx (b = W, dropout)
    tiled = [(cfg, "dense", both) for arch in sorted(GPU_CONFIGS) for cfg in GPU_CONFIGS[arch]]
    tiled += [(cfg, "fused", both) for arch in sorted(FUSED_CONFIGS) for cfg in FUSED_CONFIGS[arch]]
    tiled += [(FUSED_NARROW_CONFIG, "fused", (True,)), (FUSED_NARROW_DX_CONFIG, "fused", (False,))]
    tiled += [(FUSED_CONFIGS[arch][0], "fused_percode", both) for arch in sorted(FUSED_CONFIGS)]
    # A fused config is built for the targets whose architecture picks it (gpu_arch: AMD GPUs take 8's).
    arch_targets = {8: ("sm_80", "gfx942", "gfx90a"), 9: ("sm_90",)}
    fused_targets: dict[MatmulConfig, tuple[str, ...]] = {}
    for arch in sorted(FUSED_CONFIGS):
        for cfg in FUSED_CONFIGS[arch]:
            fused_targets[cfg] = fused_targets.get(cfg, ()) + arch_targets[arch]
    for cfg in (FUSED_NARROW_CONFIG, FUSED_NARROW_DX_CONFIG):
        fused_targets[cfg] = arch_targets[8] + arch_targets[9]
    seen = set()
    for cfg, kind, directions in tiled:
        fused = kind != "dense"
        for transposed in directions:
            name = f"{kind}_{'fwd' if transposed else 'dx'}_{cfg.tag}"
            if name in seen:
                continue
            seen.add(name)
            col_tile = cfg.block_k if transposed else cfg.block_n
            # Unit strides are compile-time constants at a real launch (Triton specializes ints equal to 1):
            # x / dy contiguous; dense W^T (forward) or W (dx) along its rows; rm = B^T (forward) or A (dx).
            unit = dict(stride_ak=1, **({"stride_bk": 1, "stride_rr": 1} if transposed else
                                        {"stride_bn": 1, "stride_rn": 1}))
            if fused:
                unit.pop("stride_bk", None)
                unit.pop("stride_bn", None)
            consts = dict(_weight_consts(64 % col_tile == 0 and kind == "fused"), B_NF4=fused,
                          B_TRANSPOSED=transposed, HAS_BIAS=transposed, HAS_DROPOUT=not transposed, ALIGNED=True,
                          EVEN_K=kind != "fused_percode", EVEN_N=_even_n(4096, cfg.block_n), PAIRS=kind == "fused",
                          FOLD_DOWN=False, FOLD_GRADS=False,
                          FOLD_BIAS_GRAD=False, BLOCK_R=16,
                          **cfg.meta(), **unit)
            sig = _signature(_matmul_lora_kernel, {**types, "b_ptr": "*u8" if fused else f"*{dt}"}, consts)
            # The fused build dequantizes a (BLOCK_N x BLOCK_K) tile of the packed W per K step: its per-element
            # figure and packed-load width are what `perf check` gates.
            nf4 = dict(weight_elements_per_iteration=cfg.block_n * cfg.block_k, weight_arg="b_ptr") if fused else {}
            targets = None if not fused or len(fused_targets[cfg]) == 4 else fused_targets[cfg]
            specs.append(KernelSpec(name, _matmul_lora_kernel, sig, consts,
                                    dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False),
                                    regime={"dense": 'path "dequant"', "fused": 'path "fused"',
                                            "fused_percode": 'path "fused", K % blocksize != 0'}[kind],
                                    targets=targets, **nf4))
    # The GEMV's launches: its 16-row tile at M = 1 (Triton makes an int equal to 1 a constant: x's row mask and
    # loads then differ, "_one_row") and at M = 16, its 32-row tile at M = SMALL_M (32).
    for m in (1, 16, SMALL_M):
        cfg = gemv_config(m)
        block_m = cfg.block_m
        consts = dict(BLOCKSIZE=64, DOUBLE_QUANT=True, NESTED_BLOCKSIZE=NESTED_BLOCKSIZE, INDEX_64=False,
                      HAS_DROPOUT=True, EVEN_K=True, EVEN_N=True, BLOCK_M=block_m, BLOCK_N=cfg.block_n,
                      BLOCK_K=cfg.block_k, BLOCK_R=16, FOLD=cfg.fold_epilogue, U_FIRST=GEMV_U_FIRST, HAS_BIAS=True,
                      FRAGMENT_ORDER=cfg.fragment_order,
                      stride_xk=1, stride_ak=1, stride_br=1)
        sig = _signature(_nf4_gemv_kernel, {**_WEIGHT_TYPES, "x_ptr": f"*{dt}", "a_ptr": f"*{dt}",
                                            "bits_ptr": "*i32", "ws_ptr": "*fp32", "u_ws_ptr": "*fp32",
                                            "arrivals_ptr": "*i32", "b_ptr": f"*{dt}", "bias_ptr": f"*{dt}",
                                            "y_ptr": f"*{dt}", "u_ptr": "*fp32", "scaling": "fp32",
                                            "u_scale": "fp32"}, consts)
        # The launch it stands for, as _launch_gemv makes it: M rows of a contiguous x (M = 1 specializes to a
        # constant, as at a real launch), K = N = 4096, r = 16, split over K for an H100/H200's 132 SMs; x and A
        # rows K elements apart (the naming convention would take stride_xm / stride_ar for unit strides here,
        # the unit ones being constexprs above).
        n = k = 4096
        split = _gemv_split_k(n, k, cfg, sms=132, m=m)
        launch = dict(M=m, N=n, K=k, R=16, offset=0.5,
                      k_per_split=cdiv(cdiv(k, split), cfg.block_k) * cfg.block_k, words_per_row=cdiv(k, 32),
                      scaling=2.0, u_scale=1.25, stride_xm=k, stride_ar=k, stride_bn=16)
        rows = "M=1" if m == 1 else (f"1<M<={block_m}" if block_m == 16 else f"16<M<={block_m}")
        specs.append(KernelSpec(f"gemv_{cfg.tag}{'_one_row' if m == 1 else ''}", _nf4_gemv_kernel, sig, consts,
                                dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False),
                                launch_args=launch, regime=f"{rows}, K a multiple of the blocksize",
                                target_options={"sm_80": _gemv_options(cfg, torch.bfloat16, True)}))
        if m == 1:
            continue
        consts = dict(HAS_BIAS=True, BLOCK_M=block_m, BLOCK_N=EPILOGUE_BLOCK_N, BLOCK_R=16, stride_br=1)
        sig = _signature(_gemv_epilogue_kernel, {"ws_ptr": "*fp32", "u_ws_ptr": "*fp32", "b_ptr": f"*{dt}",
                                                 "bias_ptr": f"*{dt}", "y_ptr": f"*{dt}", "u_ptr": "*fp32",
                                                 "scaling": "fp32", "u_scale": "fp32"}, consts)
        specs.append(KernelSpec("gemv_epilogue" + ("" if block_m == 16 else f"_m{block_m}"), _gemv_epilogue_kernel,
                                sig, consts, dict(num_warps=4, enable_fp_fusion=False)))
    return specs


__all__ = ["MatmulConfig", "nf4_lora_forward", "nf4_lora_backward", "lora_down", "lora_grad", "lora_dropout_bits",
           "lora_dropout_mask", "choose_path", "choose_dx_path", "fused_config", "compile_specs", "GPU_CONFIGS",
           "FUSED_CONFIGS", "FUSED_NARROW_CONFIG", "FUSED_NARROW_DX_CONFIG", "FUSED_SMALL_TILE_MAX_M", "FUSED_MAX_M",
           "SMALL_M_CONFIG", "GEMV_BLOCK_MS", "GEMV_BLOCK_NS", "gemv_config", "fragment_tile", "LORA_BLOCK_RS"]
