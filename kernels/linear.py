"""Fused NF4 dequant-matmul + LoRA: forward and backward kernels (SPEC section 6).

Shapes: ``x`` (M, K), base weight W (N, K) stored as NF4 (packed 4-bit codes, blockwise scales, possibly
double-quantized), ``lora_a`` (R, K), ``lora_b`` (N, R), ``bias`` (N,). Compute dtype = ``x.dtype`` (fp32, fp16
or bf16); every matmul accumulates in float32.

Forward, two launches:

1. ``_lora_down_kernel``: ``u = dropout(x) @ A^T`` (M, R), float32, kept for the backward.
2. ``_nf4_lora_fwd_kernel``: ``y = x @ W^T + scaling * u @ B^T + bias``. W is dequantized tile by tile inside
   the K loop (it never exists densely in memory) and cast to the compute dtype, so the tile equals
   ``dequantize_4bit(..., dtype)`` bit for bit; the LoRA term and the bias are added in the epilogue and y is
   written once. For small M the K loop is split over programs (split-K) whose float32 partials
   ``_split_k_reduce_kernel`` sums.

Backward:

- ``g = dy @ B`` (M, R) with ``_lora_down_kernel``;
- ``dx = dy @ W + scaling * (g @ A) * mask`` with ``_nf4_lora_bwd_dx_kernel``, reading W in its stored (N, K)
  layout (no transposed copy);
- ``dA = scaling * g^T @ dropout(x)`` and ``dB = scaling * dy^T @ u`` (with ``dbias = sum_m dy`` fused in)
  with ``_lora_grad_kernel``.

Dropout: the keep mask of element (m, k) is ``tl.rand(seed, m * K + k) >= p``, regenerated wherever it is
needed (forward ``u``, backward ``dx`` and ``dA``), so it is never stored. Kernels multiply the 0/1 keep mask in
exactly and apply the ``1 / (1 - p)`` factor to the float32 result, not to the rounded inputs.
:func:`lora_dropout_mask` materializes the same mask (scaled) for tests.

Under the Triton interpreter ``tl.dot`` on bf16 is wrong, so with ``UPCAST`` the operands (all exactly
representable in the compute dtype) are widened to float32 before each dot: the products are exact, the sum is
float32, which is what the GPU's tensor cores compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_blocksize, check_same_device, check_tensor
from ._runtime import interpreter_active, kernel_device
from ._static import KernelSpec
from .quantize import load_block_scale, unpack_4bit

NESTED_BLOCKSIZE = 256
# Host-side facts and integer helpers of the launchers, which run on every call: the backend is fixed once the
# kernels are decorated, and triton.cdiv / triton.next_power_of_2 are constexpr functions that cost a microsecond
# or two per host call (a small layer's forward + backward made ~40 of them).
_INTERPRET = interpreter_active()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length() if n > 0 else 0
SMALL_M = 16  # at or below this many rows the forward takes the split-K (GEMV-like) path on a GPU


# --------------------------------------------------------------------------------------------------------------
# Device helpers and kernels
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _code_value(code_ptr, q):
    """code[q] for a tensor of 4-bit codes, by a select tree over the 16 table entries: no per-element gather,
    so nothing per element is staged through shared memory by the software pipeliner on a GPU."""
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
                  offs_n, offs_k, k0, K, mask_n, mask_k,
                  BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                  ROW_SCALE: tl.constexpr, TRANSPOSED: tl.constexpr, INDEX_64: tl.constexpr):
    """float32 ``code[q] * scale`` of W (N, K) at rows ``offs_n`` (int64) and columns ``offs_k`` (all in
    [k0, k0 + BLOCK_K)): shape (BLOCK_K, BLOCK_N) if TRANSPOSED (a W^T tile) else (BLOCK_N, BLOCK_K).

    ROW_SCALE: K is a multiple of BLOCKSIZE and BLOCK_K divides BLOCKSIZE, so each row of the tile lies in one
    4-bit block whose scale is loaded once per row; otherwise scales are gathered per element (blocks may span
    rows). INDEX_64: N * K may pass 2**31, else flat indices are int32 (half the registers).
    Masked-off elements come back finite; callers zero the other operand there.
    """
    if not INDEX_64:
        offs_n = offs_n.to(tl.int32)
        offs_k = offs_k.to(tl.int32)
    if TRANSPOSED:
        idx = offs_n[None, :] * K + offs_k[:, None]
        mask = mask_k[:, None] & mask_n[None, :]
    else:
        idx = offs_n[:, None] * K + offs_k[None, :]
        mask = mask_n[:, None] & mask_k[None, :]
    values = _code_value(code_ptr, unpack_4bit(packed_ptr, idx, mask))
    if ROW_SCALE:
        scale = load_block_scale(absmax_ptr, absmax2_ptr, nested_code_ptr, offset, (offs_n * K + k0) // BLOCKSIZE,
                                 mask_n, DOUBLE_QUANT, NESTED_BLOCKSIZE)
        if TRANSPOSED:
            return values * scale[None, :]
        else:
            return values * scale[:, None]
    else:
        return values * load_block_scale(absmax_ptr, absmax2_ptr, nested_code_ptr, offset, idx // BLOCKSIZE, mask,
                                         DOUBLE_QUANT, NESTED_BLOCKSIZE)


@triton.jit
def _to_dtype(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """float32 ``x`` rounded to ``dtype``, nearest-even. The interpreter's own fp32 -> bf16 cast truncates, so
    with UPCAST (interpreter) bf16 is rounded on the bits, as torch does; a GPU's ``cvt.rn`` is used otherwise."""
    if UPCAST and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _keep_mask(seed, rows, cols, ncols, p):
    """Dropout keep mask (bool) of elements (rows[:, None], cols[None, :]) of a (?, ncols) matrix."""
    flat = rows.to(tl.int64)[:, None] * ncols + cols[None, :]
    return tl.rand(seed, flat) >= p


@triton.jit
def _load_tile(ptr, rows, cols, stride_r, stride_c, mask_r, mask_c):
    """The (len(rows), len(cols)) tile at ``ptr + rows * stride_r + cols * stride_c``, zero where masked off."""
    return tl.load(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask_r[:, None] & mask_c[None, :],
                   other=0.0)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``acc + a @ b``; with UPCAST (interpreter) the operands are widened to float32 first (module docstring)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _grouped_tile(pid, num_pid_m, num_pid_cols, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid`` in grouped order: GROUP_M row tiles sweep all column tiles
    together, so the W tiles they share stay in L2 (the Triton matmul tutorial's ordering)."""
    group_size = GROUP_M * num_pid_cols
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % group_size) % rows_in_group, (pid % group_size) // rows_in_group


@triton.jit
def _lora_down_kernel(
    a_ptr, b_ptr, out_ptr, M, D, R, seed, p, out_scale,
    stride_am, stride_ad, stride_bd, stride_br,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out (M, R) float32 contiguous = out_scale * (a * keep) (M, D) @ b (D, R); a and b in the compute dtype.

    ``u = dropout(x) @ A^T`` (b = A viewed transposed) and ``g = dy @ B``.
    """
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        a = _load_tile(a_ptr, offs_m, offs_d, stride_am, stride_ad, mask_m, mask_d)
        if HAS_DROPOUT:
            a = tl.where(_keep_mask(seed, offs_m, offs_d, D, p), a, 0.0)
        b = _load_tile(b_ptr, offs_d.to(tl.int64), offs_r, stride_bd, stride_br, mask_d, mask_r)
        acc = _dot(a, b, acc, UPCAST, DOT_PRECISION)
    out = out_ptr + offs_m[:, None] * R + offs_r[None, :]
    tl.store(out, acc * out_scale, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _nf4_lora_fwd_kernel(
    x_ptr, packed_ptr, absmax_ptr, absmax2_ptr, nested_code_ptr, code_ptr, u_ptr, b_ptr, bias_ptr, y_ptr,
    M, N, K, R, offset, scaling,
    stride_xm, stride_xk, stride_bn, stride_br, M_BUCKET,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    K_ALIGNED: tl.constexpr, INDEX_64: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """y (M, N) = x @ W^T + scaling * u @ B^T + bias, W dequantized in the K loop.

    SPLIT_K == 1: y is the output in x's dtype. SPLIT_K > 1: y is a float32 (SPLIT_K, M, N) workspace; split s
    covers its slice of K and split 0 alone adds the LoRA term and the bias. ``M_BUCKET`` only keys autotuning.
    """
    pid_k = tl.program_id(1)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    compute_dtype = x_ptr.dtype.element_ty
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = min(K, k_start + k_per_split)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        x = _load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, mask_m, mask_k)
        # W^T tile (BLOCK_K, BLOCK_N): element (k, n) of W^T is W[n, k], flat index n * K + k.
        w = _dequant_tile(packed_ptr, absmax_ptr, absmax2_ptr, nested_code_ptr, code_ptr, offset,
                          offs_n, offs_k, k0, K, mask_n, mask_k, BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE,
                          K_ALIGNED and BLOCKSIZE % BLOCK_K == 0, True, INDEX_64)
        acc = _dot(x, _to_dtype(w, compute_dtype, UPCAST), acc, UPCAST, DOT_PRECISION)

    if pid_k == 0:
        lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            # u is float32; round it to the compute dtype as an unfused LoRA (lora_A's output) would. (Loaded
            # directly: through _load_tile with a unit stride the sm_90 build of one config changes registers.)
            u = tl.load(u_ptr + offs_m[:, None] * R + offs_r[None, :],
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            u = _to_dtype(u, compute_dtype, UPCAST)
            bt = _load_tile(b_ptr, offs_r, offs_n, stride_br, stride_bn, mask_r, mask_n)
            lora = _dot(u, bt, lora, UPCAST, DOT_PRECISION)
        acc += scaling * lora
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]

    mask_out = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], _to_dtype(acc, y_ptr.dtype.element_ty, UPCAST),
                 mask=mask_out)
    else:
        ws = y_ptr + pid_k.to(tl.int64) * M * N
        tl.store(ws + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask_out)


@triton.jit
def _split_k_reduce_kernel(ws_ptr, y_ptr, numel, SPLIT_K: tl.constexpr, UPCAST: tl.constexpr,
                           BLOCK: tl.constexpr):
    """y (numel,) = sum over s of ws[s, :] (float32 workspace), rounded once to y's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * numel + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, _to_dtype(acc, y_ptr.dtype.element_ty, UPCAST), mask=mask)


@triton.jit
def _nf4_lora_bwd_dx_kernel(
    dy_ptr, packed_ptr, absmax_ptr, absmax2_ptr, nested_code_ptr, code_ptr, g_ptr, a_ptr, dx_ptr,
    M, N, K, R, offset, lora_scale, seed, p,
    stride_dym, stride_dyn, stride_ar, stride_ak,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    K_ALIGNED: tl.constexpr, INDEX_64: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dx (M, K) = dy @ W + lora_scale * (g @ A) * keep, W (N, K) dequantized in its stored layout.

    ``lora_scale`` is scaling / (1 - p) with dropout, else scaling; g (M, R) is float32 contiguous.
    """
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)

    compute_dtype = dy_ptr.dtype.element_ty
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = _load_tile(dy_ptr, offs_m, offs_n, stride_dym, stride_dyn, mask_m, mask_n)
        # W tile (BLOCK_N, BLOCK_K) read row-major as stored: flat index n * K + k.
        w = _dequant_tile(packed_ptr, absmax_ptr, absmax2_ptr, nested_code_ptr, code_ptr, offset,
                          offs_n.to(tl.int64), offs_k, pid_k.to(tl.int64) * BLOCK_K, K, mask_n, mask_k,
                          BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE, K_ALIGNED and BLOCKSIZE % BLOCK_K == 0, False,
                          INDEX_64)
        acc = _dot(dy, _to_dtype(w, compute_dtype, UPCAST), acc, UPCAST, DOT_PRECISION)

    lora = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        g = _to_dtype(_load_tile(g_ptr, offs_m, offs_r, R, 1, mask_m, mask_r), compute_dtype, UPCAST)
        a = _load_tile(a_ptr, offs_r, offs_k, stride_ar, stride_ak, mask_r, mask_k)
        lora = _dot(g, a, lora, UPCAST, DOT_PRECISION)
    if HAS_DROPOUT:
        lora = tl.where(_keep_mask(seed, offs_m, offs_k, K, p), lora, 0.0)
    acc += lora_scale * lora
    tl.store(dx_ptr + offs_m[:, None] * K + offs_k[None, :], _to_dtype(acc, dx_ptr.dtype.element_ty, UPCAST),
             mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _lora_grad_kernel(
    left_ptr, right_ptr, out_ptr, colsum_ptr, M, R, C, seed, p, out_scale,
    stride_rm, stride_rc, stride_or, stride_oc,
    HAS_DROPOUT: tl.constexpr, HAS_COLSUM: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[j, c] = out_scale * sum_m left[m, j] * (right * keep)[m, c]; colsum[c] = sum_m right[m, c].

    left (M, R) float32 contiguous (g or u), right (M, C) in the compute dtype (x or dy); out at
    ``j * stride_or + c * stride_oc`` in the compute dtype. ``dA`` (left g, right x, dropout) and ``dB^T``
    (left u, right dy, with the bias gradient as colsum).
    """
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    compute_dtype = right_ptr.dtype.element_ty
    offs_c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_c = offs_c < C
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = offs_m < M
        left_t = _to_dtype(_load_tile(left_ptr, offs_r, offs_m, 1, R, mask_r, mask_m), compute_dtype, UPCAST)
        right = _load_tile(right_ptr, offs_m, offs_c, stride_rm, stride_rc, mask_m, mask_c)
        if HAS_COLSUM:
            colsum += tl.sum(right.to(tl.float32), axis=0)
        if HAS_DROPOUT:
            right = tl.where(_keep_mask(seed, offs_m, offs_c, C, p), right, 0.0)
        acc = _dot(left_t, right, acc, UPCAST, DOT_PRECISION)
    out = out_ptr + offs_r[:, None] * stride_or + offs_c[None, :] * stride_oc
    tl.store(out, _to_dtype(acc * out_scale, out_ptr.dtype.element_ty, UPCAST), mask=mask_r[:, None] & mask_c[None, :])
    if HAS_COLSUM:
        if pid_r == 0:
            tl.store(colsum_ptr + offs_c, _to_dtype(colsum, colsum_ptr.dtype.element_ty, UPCAST), mask=mask_c)


@triton.jit
def _dropout_mask_kernel(out_ptr, M, D, seed, p, scale, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """out (M, D) float32 = scale where kept, else 0: the mask the other kernels regenerate."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    keep = _keep_mask(seed, offs_m, offs_d, D, p)
    tl.store(out_ptr + offs_m[:, None] * D + offs_d[None, :], tl.where(keep, scale, 0.0),
             mask=(offs_m < M)[:, None] & (offs_d < D)[None, :])


# --------------------------------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatmulConfig:
    """Tile sizes and launch options of the fused NF4 matmul kernels (forward and dx)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def meta(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUP_M=self.group_m)


# Autotune lists of the large-M path (training shapes), per GPU architecture (compute capability major).
# Each entry (forward and dx) compiles for sm_80 and sm_90 with zero spill (checked from the cubin; see
# compile_specs): the in-loop dequantization holds a W tile's codes, indices and a 16-way select tree in
# registers next to the accumulator, so 128 x 128 tiles spill and are left out. The PTX issues mma.sync on sm_80
# and wgmma on sm_90. Not yet timed on a GPU.
GPU_CONFIGS: dict[int, tuple[MatmulConfig, ...]] = {
    8: (
        MatmulConfig(64, 128, 32, num_warps=8, num_stages=3),
        MatmulConfig(128, 64, 32, num_warps=8, num_stages=3),
        MatmulConfig(64, 64, 32, num_warps=4, num_stages=3),
    ),
    9: (
        MatmulConfig(64, 128, 64, num_warps=8, num_stages=3),
        MatmulConfig(128, 64, 32, num_warps=8, num_stages=3),
        MatmulConfig(64, 64, 32, num_warps=4, num_stages=3),
    ),
}
# Small-M forward (decoding, evaluation): one 16-row tile, wide K steps, K split over programs to fill the GPU.
SMALL_M_CONFIG = MatmulConfig(16, 64, 64, group_m=1, num_warps=4, num_stages=4)
SPLIT_K_CHOICES = (1, 2, 4, 8, 16)
LORA_BLOCK_RS = (16, 32, 64)  # LoRA rank tile on a GPU; larger ranks loop over it
GPU_DOWN_BLOCK = dict(BLOCK_M=64, BLOCK_D=32)  # the in-loop dropout RNG (Philox) spills at 64 x 64
GPU_GRAD_BLOCK = dict(BLOCK_M=64, BLOCK_C=64)
REDUCE_BLOCK = 1024
MASK_BLOCK = dict(BLOCK_M=32, BLOCK_D=128)


def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, _next_pow2(max(int(n), 1))))


def _lora_block_r(r: int) -> int:
    """Rank tile: >= 16 (tl.dot's minimum), a power of two, at most 64 on a GPU; at most 32 under the interpreter
    (still one program for usual ranks; larger ranks go through the rank loops, which tests thus reach)."""
    return _pow2_clamp(r, 16, 32 if _INTERPRET else LORA_BLOCK_RS[-1])


def _interpreter_config(rows: int, cols: int, inner: int) -> MatmulConfig:
    # Few, huge programs: interpreter cost grows with the number of program instances and loop trips.
    return MatmulConfig(_pow2_clamp(rows, 16, 128), _pow2_clamp(cols, 16, 256), _pow2_clamp(inner, 16, 256),
                        group_m=1)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 compute means fp32 products (torch's default, TF32 off); bf16/fp16 ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def _num_sms() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _small_m_split_k(m: int, n: int, k: int, cfg: MatmulConfig) -> int:
    """Enough K splits that about two programs per SM run, each keeping at least two K steps."""
    tiles = _cdiv(m, cfg.block_m) * _cdiv(n, cfg.block_n)
    want = max(1, 2 * _num_sms() // max(tiles, 1))
    max_split = max(1, _cdiv(k, 2 * cfg.block_k))
    split = 1
    for s in SPLIT_K_CHOICES:
        if s <= want and s <= max_split:
            split = s
    return split


def _autotuned(kernel, configs: tuple[MatmulConfig, ...]):
    return triton.autotune(
        configs=[triton.Config(c.meta(), num_warps=c.num_warps, num_stages=c.num_stages) for c in configs],
        key=["M_BUCKET", "N", "K"],
    )(kernel)


_TUNED: dict[tuple[str, int], object] = {}


def _tuned_kernel(name: str):
    """The autotuned large-M kernel for the current GPU's architecture (built on first use)."""
    major = torch.cuda.get_device_capability()[0]
    arch = 9 if major >= 9 else 8
    key = (name, arch)
    if key not in _TUNED:
        kernel = _nf4_lora_fwd_kernel if name == "fwd" else _nf4_lora_bwd_dx_kernel
        _TUNED[key] = _autotuned(kernel, GPU_CONFIGS[arch])
    return _TUNED[key]


# --------------------------------------------------------------------------------------------------------------
# Launchers
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
    nblocks = _cdiv(n * k, blocksize)
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
        if absmax2.numel() != _cdiv(nblocks, NESTED_BLOCKSIZE):
            raise ValueError(f"absmax2 must hold {_cdiv(nblocks, NESTED_BLOCKSIZE)} scales, "
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


def _check_scalar(name: str, value, lo: float | None = None, hi_open: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite Python number, got {value!r}")
    if lo is not None and not (lo <= value < hi_open):
        raise ValueError(f"{name} must be in [{lo}, {hi_open}), got {value!r}")
    return float(value)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")
    return seed


def _weight_args(packed, absmax, code, absmax2, offset, nested_code):
    """Kernel pointer/scalar arguments of the weight; unused double-quant pointers alias absmax."""
    if absmax2 is None:
        return packed, absmax, absmax, absmax, code, 0.0
    return packed, absmax, absmax2, nested_code, code, float(offset)


def _check_lora(x_name, x, lora_a, lora_b, n, k, dtype):
    check_tensor("lora_a", lora_a, (dtype,), ndim=2)
    check_tensor("lora_b", lora_b, (dtype,), ndim=2)
    r = lora_a.shape[0]
    if r < 1 or lora_a.shape[1] != k:
        raise ValueError(f"lora_a must have shape (r, {k}) with r >= 1, got {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (n, r):
        raise ValueError(f"lora_b must have shape ({n}, {r}) to match lora_a's rank {r}, got {tuple(lora_b.shape)}")
    return r


def lora_down(a: torch.Tensor, b: torch.Tensor, *, dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """``(dropout(a) @ b)`` as float32 (M, R): a (M, D) and b (D, R) in one float dtype, any strides.

    With ``dropout_p > 0`` element (m, d) of ``a`` is kept where ``rand(seed, m * D + d) >= p`` and the result is
    multiplied by ``1 / (1 - p)`` in float32.
    """
    check_tensor("a", a, FLOAT_DTYPES, ndim=2)
    check_tensor("b", b, (a.dtype,), ndim=2)
    check_same_device(a=a, b=b)
    if b.shape[0] != a.shape[1]:
        raise ValueError(f"b must have {a.shape[1]} rows to match a {tuple(a.shape)}, got {tuple(b.shape)}")
    p = _check_scalar("dropout_p", dropout_p, 0.0, 1.0)
    seed = _check_seed(seed)
    m, d = a.shape
    r = b.shape[1]
    out = torch.empty((m, r), dtype=torch.float32, device=a.device)
    if m == 0 or r == 0:
        return out
    if d == 0:
        return out.zero_()
    block_r = _lora_block_r(r)
    if _INTERPRET:
        meta = dict(BLOCK_M=_pow2_clamp(m, 16, 256), BLOCK_D=_pow2_clamp(d, 16, 512))
    else:
        meta = dict(GPU_DOWN_BLOCK)
    grid = (_cdiv(m, meta["BLOCK_M"]), _cdiv(r, block_r))
    _lora_down_kernel[grid](
        a, b, out, m, d, r, seed, p, 1.0 / (1.0 - p),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        HAS_DROPOUT=p > 0, UPCAST=_INTERPRET, DOT_PRECISION=_dot_precision(a.dtype),
        BLOCK_R=block_r, **meta,
    )
    return out


def lora_grad(left: torch.Tensor, right: torch.Tensor, out: torch.Tensor, *, scale: float,
              colsum: torch.Tensor | None = None, dropout_p: float = 0.0, seed: int = 0) -> None:
    """``out[j, c] = scale * sum_m left[m, j] * dropout(right)[m, c]`` written into ``out`` (R, C) (any strides,
    right's dtype); with ``colsum`` (C,) also ``colsum[c] = sum_m right[m, c]`` (before dropout).

    left (M, R) float32 contiguous, right (M, C) in a float dtype, any strides. Rows of ``out`` are
    ``left``'s columns, so ``out`` may be a transposed view (``dB.T``).
    """
    check_tensor("left", left, (torch.float32,), ndim=2)
    check_tensor("right", right, FLOAT_DTYPES, ndim=2)
    check_tensor("out", out, (right.dtype,), ndim=2)
    check_same_device(left=left, right=right, out=out, colsum=colsum)
    if not left.is_contiguous():
        raise ValueError("left must be contiguous")
    m, r = left.shape
    c = right.shape[1]
    if right.shape[0] != m or tuple(out.shape) != (r, c):
        raise ValueError(f"left {tuple(left.shape)}, right {tuple(right.shape)} and out {tuple(out.shape)} disagree")
    if colsum is not None:
        check_tensor("colsum", colsum, (right.dtype,), ndim=1)
        if colsum.numel() != c or not colsum.is_contiguous():
            raise ValueError(f"colsum must be contiguous of shape ({c},), got {tuple(colsum.shape)}")
    p = _check_scalar("dropout_p", dropout_p, 0.0, 1.0)
    seed = _check_seed(seed)
    if r == 0 or c == 0:
        return
    if m == 0:
        out.zero_()
        if colsum is not None:
            colsum.zero_()
        return
    block_r = _lora_block_r(r)
    if _INTERPRET:
        meta = dict(BLOCK_M=_pow2_clamp(m, 16, 256), BLOCK_C=_pow2_clamp(c, 16, 512))
    else:
        meta = dict(GPU_GRAD_BLOCK)
    grid = (_cdiv(c, meta["BLOCK_C"]), _cdiv(r, block_r))
    _lora_grad_kernel[grid](
        left, right, out, out if colsum is None else colsum, m, r, c, seed, p, float(scale),
        right.stride(0), right.stride(1), out.stride(0), out.stride(1),
        HAS_DROPOUT=p > 0, HAS_COLSUM=colsum is not None, UPCAST=_INTERPRET,
        DOT_PRECISION=_dot_precision(right.dtype), BLOCK_R=block_r, **meta,
    )


def nf4_lora_forward(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape, blocksize: int,
    lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, bias: torch.Tensor | None = None, *,
    absmax2: torch.Tensor | None = None, offset: float | None = None, nested_code: torch.Tensor | None = None,
    nested_blocksize: int = NESTED_BLOCKSIZE, dropout_p: float = 0.0, seed: int = 0,
    config: MatmulConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``y = x @ W^T + scaling * (dropout(x) @ A^T) @ B^T + bias``; returns ``(y, u)``.

    x (M, K) fp32/fp16/bf16, any strides; W (N, K) given as NF4 tensors (``shape = (N, K)``, the arguments of
    ``dequantize_4bit``) and dequantized to x's dtype in the K loop; lora_a (R, K), lora_b (N, R), bias (N,)
    in x's dtype. y (M, N) in x's dtype, contiguous; u (M, R) float32 = ``dropout(x) @ A^T`` for the backward.
    ``config`` forces a tile configuration (tests use it to exercise split-K under the interpreter).
    """
    n, k, double_quant = _check_nf4(packed, absmax, code, shape, blocksize, absmax2, offset, nested_code,
                                    nested_blocksize)
    check_tensor("x", x, FLOAT_DTYPES, ndim=2)
    if x.shape[1] != k:
        raise ValueError(f"x must have {k} columns (in_features of the weight), got shape {tuple(x.shape)}")
    r = _check_lora("x", x, lora_a, lora_b, n, k, x.dtype)
    if bias is not None:
        check_tensor("bias", bias, (x.dtype,), ndim=1)
        if bias.numel() != n or not bias.is_contiguous():
            raise ValueError(f"bias must be contiguous of shape ({n},), got {tuple(bias.shape)}")
    check_same_device(x=x, packed=packed, absmax=absmax, code=code, absmax2=absmax2, nested_code=nested_code,
                      lora_a=lora_a, lora_b=lora_b, bias=bias)
    scaling = _check_scalar("scaling", scaling)
    p = _check_scalar("dropout_p", dropout_p, 0.0, 1.0)
    seed = _check_seed(seed)
    m = x.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    # u = dropout(x) @ A^T: A (R, K) read transposed through its strides.
    u = lora_down(x, lora_a.t(), dropout_p=p, seed=seed)
    if m == 0:
        return y, u
    interp = _INTERPRET
    common = dict(
        BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, NESTED_BLOCKSIZE=NESTED_BLOCKSIZE,
        K_ALIGNED=k % blocksize == 0, INDEX_64=n * k >= 2**31 - 1, HAS_BIAS=bias is not None, UPCAST=interp,
        DOT_PRECISION=_dot_precision(x.dtype),
        BLOCK_R=_lora_block_r(r),
    )
    weight = _weight_args(packed, absmax, code, absmax2, offset, nested_code)
    args = (x, *weight[:5], u, lora_b, y if bias is None else bias)
    scalars = (m, n, k, r, weight[5], scaling,
               x.stride(0), x.stride(1), lora_b.stride(0), lora_b.stride(1), _next_pow2(m))
    if config is None and not interp and m > SMALL_M:
        kernel = _tuned_kernel("fwd")

        def grid(meta):
            return (_cdiv(m, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]), 1)

        kernel[grid](*args, y, *scalars, SPLIT_K=1, enable_fp_fusion=False, **common)
        return y, u
    if config is None:
        config = _interpreter_config(m, n, k) if interp else SMALL_M_CONFIG
        split_k = 1 if interp else _small_m_split_k(m, n, k, config)
    else:
        split_k = config.split_k
    if split_k not in SPLIT_K_CHOICES:
        raise ValueError(f"config.split_k must be one of {SPLIT_K_CHOICES}, got {split_k!r}")
    grid = (_cdiv(m, config.block_m) * _cdiv(n, config.block_n), split_k)
    target = y if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    launch = dict(num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=False)
    _nf4_lora_fwd_kernel[grid](*args, target, *scalars, SPLIT_K=split_k, **config.meta(), **common, **launch)
    if split_k > 1:
        block = REDUCE_BLOCK if not interp else _pow2_clamp(m * n, 16, 1 << 16)
        _split_k_reduce_kernel[(_cdiv(m * n, block),)](target, y, m * n, SPLIT_K=split_k, UPCAST=interp,
                                                              BLOCK=block)
    return y, u


def nf4_lora_backward(
    dy: torch.Tensor, x: torch.Tensor, u: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
    code: torch.Tensor, shape, blocksize: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, *,
    absmax2: torch.Tensor | None = None, offset: float | None = None, nested_code: torch.Tensor | None = None,
    nested_blocksize: int = NESTED_BLOCKSIZE, dropout_p: float = 0.0, seed: int = 0,
    need_dx: bool = True, need_lora: bool = True, need_bias: bool = False, config: MatmulConfig | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`nf4_lora_forward`: ``(dx, dA, dB, dbias)``, each None unless asked for.

    dy (M, N) and x (M, K) in one float dtype, any strides; u (M, R) float32 from the forward (same ``dropout_p``
    and ``seed``). ``dx = dy @ W + scaling * ((dy @ B) @ A) * mask`` with W dequantized in its stored layout,
    ``dA = scaling * (dy @ B)^T @ dropout(x)``, ``dB = scaling * dy^T @ u``, ``dbias = dy.sum(0)``; all in x's
    dtype with float32 accumulation, contiguous.
    """
    n, k, double_quant = _check_nf4(packed, absmax, code, shape, blocksize, absmax2, offset, nested_code,
                                    nested_blocksize)
    check_tensor("x", x, FLOAT_DTYPES, ndim=2)
    check_tensor("dy", dy, (x.dtype,), ndim=2)
    if x.shape[1] != k or tuple(dy.shape) != (x.shape[0], n):
        raise ValueError(f"dy {tuple(dy.shape)} and x {tuple(x.shape)} must be (M, {n}) and (M, {k})")
    r = _check_lora("x", x, lora_a, lora_b, n, k, x.dtype)
    check_tensor("u", u, (torch.float32,), ndim=2)
    if tuple(u.shape) != (x.shape[0], r) or not u.is_contiguous():
        raise ValueError(f"u must be contiguous float32 of shape {(x.shape[0], r)}, got {tuple(u.shape)}")
    check_same_device(dy=dy, x=x, u=u, packed=packed, absmax=absmax, code=code, absmax2=absmax2,
                      nested_code=nested_code, lora_a=lora_a, lora_b=lora_b)
    scaling = _check_scalar("scaling", scaling)
    p = _check_scalar("dropout_p", dropout_p, 0.0, 1.0)
    seed = _check_seed(seed)
    m = x.shape[0]
    dx = d_a = d_b = d_bias = None
    g = lora_down(dy, lora_b) if (need_dx or need_lora) else None  # g = dy @ B, float32 (M, R)
    lora_scale = scaling / (1.0 - p)
    if need_dx:
        dx = torch.empty((m, k), dtype=x.dtype, device=x.device)
        if m:
            _launch_dx(dy, packed, absmax, code, absmax2, offset, nested_code, g, lora_a, dx, m, n, k, r,
                       blocksize, double_quant, lora_scale, seed, p, config)
    if need_lora:
        d_a = torch.empty((r, k), dtype=x.dtype, device=x.device)
        lora_grad(g, x, d_a, scale=lora_scale, dropout_p=p, seed=seed)
    if need_lora or need_bias:
        d_b = torch.empty((n, r), dtype=x.dtype, device=x.device)
        d_bias = torch.empty((n,), dtype=x.dtype, device=x.device) if need_bias else None
        lora_grad(u, dy, d_b.t(), scale=scaling, colsum=d_bias)
        if not need_lora:
            d_b = None
    return dx, d_a, d_b, d_bias


def _launch_dx(dy, packed, absmax, code, absmax2, offset, nested_code, g, lora_a, dx, m, n, k, r, blocksize,
               double_quant, lora_scale, seed, p, config):
    interp = _INTERPRET
    weight = _weight_args(packed, absmax, code, absmax2, offset, nested_code)
    args = (dy, *weight[:5], g, lora_a, dx, m, n, k, r, weight[5], lora_scale, seed, p,
            dy.stride(0), dy.stride(1), lora_a.stride(0), lora_a.stride(1))
    common = dict(BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, NESTED_BLOCKSIZE=NESTED_BLOCKSIZE,
                  K_ALIGNED=k % blocksize == 0, INDEX_64=n * k >= 2**31 - 1, HAS_DROPOUT=p > 0, UPCAST=interp,
                  DOT_PRECISION=_dot_precision(dy.dtype), BLOCK_R=_lora_block_r(r))
    if config is None and not interp:
        kernel = _tuned_kernel("dx")

        def grid(meta):
            return (_cdiv(m, meta["BLOCK_M"]) * _cdiv(k, meta["BLOCK_K"]),)

        kernel[grid](*args, enable_fp_fusion=False, **common)
        return
    if config is None:
        config = _interpreter_config(m, k, n)
        # rows x dx columns x reduction over N: the interpreter config's "cols" is K here, "inner" is N.
        config = MatmulConfig(config.block_m, config.block_k, config.block_n, group_m=1)
    grid = (_cdiv(m, config.block_m) * _cdiv(k, config.block_k),)
    _nf4_lora_bwd_dx_kernel[grid](*args, **common, **config.meta(), num_warps=config.num_warps,
                                  num_stages=config.num_stages, enable_fp_fusion=False)


def lora_dropout_mask(seed: int, shape, p: float, device: torch.device | str | None = None) -> torch.Tensor:
    """The scaled keep mask (float32, 0 or ``1 / (1 - p)``) that the kernels regenerate for ``x`` of ``shape``
    (M, K), flattened leading dims included: element (m, k) is kept where ``rand(seed, m * K + k) >= p``."""
    seed = _check_seed(seed)
    p = _check_scalar("p", p, 0.0, 1.0)
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2:
        raise ValueError(f"shape must be (M, K), got {shape!r}")
    m, d = int(shape[0]), int(shape[1])
    # Default: where the kernels run (a CPU tensor cannot be written by a compiled kernel).
    device = kernel_device() if device is None else torch.device(device)
    if device.type != kernel_device().type:
        raise ValueError(f"device must be a {kernel_device().type} device where the kernels run, got {device}")
    out = torch.empty((m, d), dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out
    grid = (_cdiv(m, MASK_BLOCK["BLOCK_M"]), _cdiv(d, MASK_BLOCK["BLOCK_D"]))
    _dropout_mask_kernel[grid](out, m, d, seed, p, 1.0 / (1.0 - p), **MASK_BLOCK)
    return out


# --------------------------------------------------------------------------------------------------------------
# Static compile specifications (every GPU launch config)
# --------------------------------------------------------------------------------------------------------------

_TL_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _matmul_signature(kind: str, dt: str, out_dt: str) -> dict[str, str]:
    weight = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "absmax2_ptr": "*fp32", "nested_code_ptr": "*fp32",
              "code_ptr": "*fp32"}
    if kind == "fwd":
        sig = {"x_ptr": f"*{dt}", **weight, "u_ptr": "*fp32", "b_ptr": f"*{dt}", "bias_ptr": f"*{dt}",
               "y_ptr": f"*{out_dt}", "M": "i32", "N": "i32", "K": "i32", "R": "i32", "offset": "fp32",
               "scaling": "fp32", "stride_xm": "i32", "stride_xk": "i32", "stride_bn": "i32", "stride_br": "i32",
               "M_BUCKET": "i32"}
        consts = ("BLOCKSIZE", "DOUBLE_QUANT", "NESTED_BLOCKSIZE", "K_ALIGNED", "INDEX_64", "HAS_BIAS", "UPCAST",
                  "DOT_PRECISION",
                  "BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "GROUP_M", "SPLIT_K")
    else:
        sig = {"dy_ptr": f"*{dt}", **weight, "g_ptr": "*fp32", "a_ptr": f"*{dt}", "dx_ptr": f"*{dt}",
               "M": "i32", "N": "i32", "K": "i32", "R": "i32", "offset": "fp32", "lora_scale": "fp32",
               "seed": "i32", "p": "fp32", "stride_dym": "i32", "stride_dyn": "i32", "stride_ar": "i32",
               "stride_ak": "i32"}
        consts = ("BLOCKSIZE", "DOUBLE_QUANT", "NESTED_BLOCKSIZE", "K_ALIGNED", "INDEX_64", "HAS_DROPOUT", "UPCAST",
                  "DOT_PRECISION",
                  "BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "GROUP_M")
    return {**sig, **{c: "constexpr" for c in consts}}


def compile_specs() -> list[KernelSpec]:
    """Every kernel of this module in every config a GPU launch can pick: the autotune lists of both
    architectures and the split-K small-M path, in bf16 (the training dtype; fp16 compiles to the same code
    shape), double-quantized with blocksize 64, LoRA rank tile 16; plus the LoRA helper kernels per rank tile."""
    specs: list[KernelSpec] = []
    dt = _TL_TYPES[torch.bfloat16]
    weight_consts = dict(BLOCKSIZE=64, DOUBLE_QUANT=True, NESTED_BLOCKSIZE=NESTED_BLOCKSIZE, K_ALIGNED=True,
                         INDEX_64=False, UPCAST=False,
                         DOT_PRECISION="tf32", BLOCK_R=16)
    seen = []
    for arch in sorted(GPU_CONFIGS):
        for cfg in GPU_CONFIGS[arch]:
            if cfg in seen:
                continue
            seen.append(cfg)
            tag = f"m{cfg.block_m}n{cfg.block_n}k{cfg.block_k}w{cfg.num_warps}s{cfg.num_stages}"
            options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False)
            specs.append(KernelSpec(
                name=f"nf4_lora_fwd_{tag}", fn=_nf4_lora_fwd_kernel, signature=_matmul_signature("fwd", dt, dt),
                constexprs=dict(weight_consts, HAS_BIAS=True, SPLIT_K=1, **cfg.meta()), options=options))
            # dx tiles (M, K) and loops over N: the autotuner reads BLOCK_K as the dx column tile.
            specs.append(KernelSpec(
                name=f"nf4_lora_bwd_dx_{tag}", fn=_nf4_lora_bwd_dx_kernel,
                signature=_matmul_signature("dx", dt, dt),
                constexprs=dict(weight_consts, HAS_DROPOUT=True, **cfg.meta()), options=options))
    cfg = SMALL_M_CONFIG
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False)
    for split_k in SPLIT_K_CHOICES:
        specs.append(KernelSpec(
            name=f"nf4_lora_fwd_small_m_split{split_k}", fn=_nf4_lora_fwd_kernel,
            signature=_matmul_signature("fwd", dt, dt if split_k == 1 else "fp32"),
            constexprs=dict(weight_consts, HAS_BIAS=True, SPLIT_K=split_k, **cfg.meta()), options=options))
        if split_k > 1:
            specs.append(KernelSpec(
                name=f"split_k_reduce_{split_k}", fn=_split_k_reduce_kernel,
                signature={"ws_ptr": "*fp32", "y_ptr": f"*{dt}", "numel": "i32", "SPLIT_K": "constexpr",
                           "UPCAST": "constexpr", "BLOCK": "constexpr"},
                constexprs=dict(SPLIT_K=split_k, UPCAST=False, BLOCK=REDUCE_BLOCK), options={"num_warps": 4}))
    for block_r in LORA_BLOCK_RS:
        specs.append(KernelSpec(
            name=f"lora_down_r{block_r}", fn=_lora_down_kernel,
            signature={"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "out_ptr": "*fp32", "M": "i32", "D": "i32", "R": "i32",
                       "seed": "i32", "p": "fp32", "out_scale": "fp32", "stride_am": "i32", "stride_ad": "i32",
                       "stride_bd": "i32", "stride_br": "i32", "HAS_DROPOUT": "constexpr", "UPCAST": "constexpr",
                       "DOT_PRECISION": "constexpr", "BLOCK_M": "constexpr", "BLOCK_D": "constexpr",
                       "BLOCK_R": "constexpr"},
            constexprs=dict(HAS_DROPOUT=True, UPCAST=False, DOT_PRECISION="tf32", BLOCK_R=block_r, **GPU_DOWN_BLOCK),
            options={"num_warps": 4}))
        specs.append(KernelSpec(
            name=f"lora_grad_r{block_r}", fn=_lora_grad_kernel,
            signature={"left_ptr": "*fp32", "right_ptr": f"*{dt}", "out_ptr": f"*{dt}", "colsum_ptr": f"*{dt}",
                       "M": "i32", "R": "i32", "C": "i32", "seed": "i32", "p": "fp32", "out_scale": "fp32",
                       "stride_rm": "i32", "stride_rc": "i32", "stride_or": "i32", "stride_oc": "i32",
                       "HAS_DROPOUT": "constexpr", "HAS_COLSUM": "constexpr", "UPCAST": "constexpr",
                       "DOT_PRECISION": "constexpr", "BLOCK_M": "constexpr", "BLOCK_R": "constexpr",
                       "BLOCK_C": "constexpr"},
            constexprs=dict(HAS_DROPOUT=True, HAS_COLSUM=True, UPCAST=False, DOT_PRECISION="tf32",
                            BLOCK_R=block_r, **GPU_GRAD_BLOCK),
            options={"num_warps": 4}))
    specs.append(KernelSpec(
        name="dropout_mask", fn=_dropout_mask_kernel,
        signature={"out_ptr": "*fp32", "M": "i32", "D": "i32", "seed": "i32", "p": "fp32", "scale": "fp32",
                   "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"},
        constexprs=dict(MASK_BLOCK), options={"num_warps": 4}))
    return specs


__all__ = ["MatmulConfig", "nf4_lora_forward", "nf4_lora_backward", "lora_down", "lora_grad",
           "lora_dropout_mask", "compile_specs", "GPU_CONFIGS", "SMALL_M_CONFIG"]
