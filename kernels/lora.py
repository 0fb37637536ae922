"""LoRA helper kernels of the fused layer (docs/SPEC.md section 6): the rank-r projections and the dropout mask.

- ``lora_down``: ``u = dropout(x) @ A^T`` / ``g = dy @ B`` (M, R) in float32, tiled over M and split over the
  reduction D (partials summed by ``_sum_splits_kernel``) so that no shape runs on one program.
- ``lora_grad``: ``dA = scale * g^T @ dropout(x)``, ``dB^T = scaling * u^T @ dy`` (+ ``dbias``).
- ``lora_down_grad``: ``g = dy @ B`` and ``dB^T`` (+ ``dbias``) in one pass over dy, for the backward at up to
  ``DOWN_GRAD_MAX_M`` rows (g split over dy's column tiles, partials summed by ``_sum_splits_kernel``).
- ``lora_dropout_bits``: the bit-packed keep mask of an (M, K) input (int32 (M, ceil(K / 32)), bit j of word w of
  row m is column 32 w + j), four mask bits per Philox ``randint4x`` call; :func:`lora_dropout_mask` expands it.
  The counter scheme and threshold: docs/DESIGN.md, "Fused linear layer".
The seed is read by the kernel from a one-element int64 device tensor (no host read: CUDA graphs can capture the
layer); a Python int is accepted too and staged into such a tensor.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._host import cdiv, next_pow2
from ._checks import FLOAT_DTYPES, check_same_device, check_tensor
from ._runtime import interpreter_active, kernel_device, lean_under_interpreter
from ._static import KernelSpec
from ._tl import dot, interpreted_directly, keep_tile, load_tile, round_to

LORA_BLOCK_RS = (16, 32, 64)  # LoRA rank tile on a GPU; larger ranks loop over it
GPU_DOWN_BLOCK_D = 64
# g = dy B together with dB = dy^T u (one pass over dy, _lora_down_grad_kernel) up to this many rows: the float32
# partials of g (one (M, R) slice per column tile of dy, written and read back, and u read by every tile) then
# cost no more bytes than the second read of dy and lora_down's own partials they replace (perf/roofline.py, H200
# backward at K = N = 4096, r = 16: 6.21 / 6.30 / 6.59 us at M = 1 / 16 / 64 either way, one launch fewer). With
# 32-column tiles (128 programs) the partials cost more (6.75 us at M = 64); above 64 rows they outgrow dy's read.
DOWN_GRAD_MAX_M = 64
GPU_DOWN_GRAD_BLOCK_C = 64  # columns of dy per program: 64 programs at N = 4096
GPU_GRAD_BLOCK = dict(BLOCK_M=32, BLOCK_C=64)  # 64 x 64 spills 8-24 bytes under triton 3.6
BITS_BLOCK = dict(BLOCK_M=16, BLOCK_W=16)
INTERPRETER_BITS_WORDS = 8192  # mask words per program of the dropout kernel under the interpreter
REDUCE_BLOCK = 1024
SPLIT_CHOICES = (1, 2, 4, 8, 16, 32)


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _kept(r, threshold_biased):
    """r (uint32) >= threshold as an unsigned compare, done signed on both sides shifted by 2**31."""
    return ((r.to(tl.int32, bitcast=True) ^ -2147483648) >= threshold_biased).to(tl.int32)


@lean_under_interpreter
@triton.jit
def _dropout_bits_kernel(
    # pointers
    seed_ptr, bits_ptr,
    # sizes
    M, K, words_per_row, threshold_biased,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """bits (M, words_per_row) int32 keep mask of an (M, K) input (module docstring); bits of columns >= K are 0.
    seed: one-element int64 tensor."""
    seed = tl.load(seed_ptr)
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    word_index = offs_m[:, None] * words_per_row + offs_w[None, :]
    counter = word_index[:, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    nibble = (_kept(r0, threshold_biased) | (_kept(r1, threshold_biased) << 1) | (_kept(r2, threshold_biased) << 2)
              | (_kept(r3, threshold_biased) << 3))
    word = tl.sum(nibble << (4 * tl.arange(0, 8))[None, None, :], axis=2)
    valid = K - offs_w * 32  # columns of this word inside the row; >= 1 for every stored word
    low = (1 << tl.minimum(tl.maximum(valid, 1), 31)) - 1
    word = tl.where((valid >= 32)[None, :], word, word & low[None, :])
    tl.store(bits_ptr + word_index, word, mask=(offs_m < M)[:, None] & (offs_w < words_per_row)[None, :])


@triton.jit
def down_accumulate(acc, a_ptr, b_ptr, bits_ptr, offs_m, mask_m, offs_r, mask_r, d_start, d_end, words_per_row,
                    stride_am, stride_ad, stride_bd, stride_br, HAS_DROPOUT: tl.constexpr, BLOCK_D: tl.constexpr):
    """acc (BLOCK_M, BLOCK_R) float32 += (a * keep)[offs_m, d_start:d_end] @ b[d_start:d_end, offs_r]: the LoRA
    down-projection's reduction, shared by ``_lora_down_kernel`` and the GEMV's folded ``u`` (kernels/linear.py)."""
    for d0 in range(d_start, d_end, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < d_end
        a = load_tile(a_ptr, offs_m, offs_d, stride_am, stride_ad, mask_m, mask_d)
        if HAS_DROPOUT:
            a = tl.where(keep_tile(bits_ptr, offs_m, offs_d, words_per_row, mask_m, mask_d), a, 0.0)
        b = load_tile(b_ptr, offs_d.to(tl.int64), offs_r, stride_bd, stride_br, mask_d, mask_r)
        acc = dot(a, b, acc)
    return acc


down_accumulate = interpreted_directly(down_accumulate)


@lean_under_interpreter
@triton.jit
def _lora_down_kernel(
    # pointers
    a_ptr, b_ptr, bits_ptr, out_ptr,
    # sizes
    M, D, R, words_per_row, d_per_split, out_scale,
    # strides
    stride_am, stride_ad, stride_bd, stride_br,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[s] (M, R) float32 = out_scale * (a * keep) @ b over split s of D (d_per_split columns, a multiple of
    BLOCK_D). a (M, D) and b (D, R) in the compute dtype; bits (M, words_per_row) int32 when HAS_DROPOUT."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    d_start = pid_s * d_per_split
    d_end = min(D, d_start + d_per_split)
    # tl.full rather than tl.zeros (the same code on a GPU): tl.zeros is a @triton.jit library function, and each
    # call of one re-patches triton.language under the interpreter.
    acc = down_accumulate(tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32), a_ptr, b_ptr, bits_ptr, offs_m, mask_m,
                          offs_r, mask_r, d_start, d_end, words_per_row, stride_am, stride_ad, stride_bd, stride_br,
                          HAS_DROPOUT, BLOCK_D)
    out = out_ptr + pid_s.to(tl.int64) * M * R + offs_m[:, None] * R + offs_r[None, :]
    tl.store(out, acc * out_scale, mask=mask_m[:, None] & mask_r[None, :])


@lean_under_interpreter
@triton.jit
def _sum_splits_kernel(ws_ptr, out_ptr, numel, num_splits, scale, BLOCK: tl.constexpr):
    """out (numel,) = scale * sum over s of ws[s, :] (float32), rounded once to out's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, num_splits):
        acc += tl.load(ws_ptr + s * numel + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, round_to(acc * scale, out_ptr.dtype.element_ty), mask=mask)


@lean_under_interpreter
@triton.jit
def _lora_grad_kernel(
    # pointers
    left_ptr, right_ptr, bits_ptr, out_ptr, colsum_ptr,
    # sizes
    M, R, C, words_per_row, out_scale,
    # strides
    stride_rm, stride_rc, stride_or, stride_oc,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, HAS_COLSUM: tl.constexpr,
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
    acc = tl.full((BLOCK_R, BLOCK_C), 0.0, tl.float32)  # tl.full: see _lora_down_kernel
    colsum = tl.full((BLOCK_C,), 0.0, tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = offs_m < M
        left_t = round_to(load_tile(left_ptr, offs_r, offs_m, 1, R, mask_r, mask_m), compute_dtype)
        right = load_tile(right_ptr, offs_m, offs_c, stride_rm, stride_rc, mask_m, mask_c)
        if HAS_COLSUM:
            colsum += tl.sum(right.to(tl.float32), axis=0)
        if HAS_DROPOUT:
            right = tl.where(keep_tile(bits_ptr, offs_m, offs_c, words_per_row, mask_m, mask_c), right, 0.0)
        acc = dot(left_t, right, acc)
    out = out_ptr + offs_r[:, None] * stride_or + offs_c[None, :] * stride_oc
    tl.store(out, round_to(acc * out_scale, out_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_c[None, :])
    if HAS_COLSUM:
        if pid_r == 0:
            tl.store(colsum_ptr + offs_c, round_to(colsum, colsum_ptr.dtype.element_ty), mask=mask_c)


# --------------------------------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------------------------------


@lean_under_interpreter
@triton.jit
def _lora_down_grad_kernel(
    # pointers
    dy_ptr, b_ptr, u_ptr, ws_ptr, out_ptr, colsum_ptr,
    # sizes
    M, N, R, out_scale,
    # strides
    stride_ym, stride_yn, stride_bn, stride_br, stride_or, stride_oc,
    # meta-parameters
    HAS_COLSUM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Column tile c of dy (M, N), R <= BLOCK_R: ws[c] (M, R) float32 = dy[:, c] @ B[c, :] (split c of
    g = dy B, summed by :func:`sum_splits`), out[:, c] = out_scale * round(u)^T dy[:, c] (dB^T: out at
    ``j * stride_or + n * stride_oc``, dy's dtype, as :func:`lora_grad` computes it) and colsum[c] = sum_m dy[m, c].

    dy and B (N, R) in the compute dtype, any strides; u (M, R) float32 contiguous. Each dy tile is loaded once
    for both products."""
    pid_c = tl.program_id(0)
    compute_dtype = dy_ptr.dtype.element_ty
    offs_c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    mask_c = offs_c < N
    mask_r = offs_r < R
    b = load_tile(b_ptr, offs_c, offs_r, stride_bn, stride_br, mask_c, mask_r)
    # tl.full rather than tl.zeros: see _lora_down_kernel
    acc = tl.full((BLOCK_R, BLOCK_C), 0.0, tl.float32)
    colsum = tl.full((BLOCK_C,), 0.0, tl.float32)
    ws = ws_ptr + pid_c.to(tl.int64) * M * R
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = offs_m < M
        dy = load_tile(dy_ptr, offs_m, offs_c, stride_ym, stride_yn, mask_m, mask_c)
        g = dot(dy, b, tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32))
        tl.store(ws + offs_m[:, None] * R + offs_r[None, :], g, mask=mask_m[:, None] & mask_r[None, :])
        u_t = round_to(load_tile(u_ptr, offs_r, offs_m, 1, R, mask_r, mask_m), compute_dtype)
        acc = dot(u_t, dy, acc)
        if HAS_COLSUM:
            colsum += tl.sum(dy.to(tl.float32), axis=0)
    out = out_ptr + offs_r[:, None] * stride_or + offs_c[None, :] * stride_oc
    tl.store(out, round_to(acc * out_scale, out_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_c[None, :])
    if HAS_COLSUM:
        tl.store(colsum_ptr + offs_c, round_to(colsum, colsum_ptr.dtype.element_ty), mask=mask_c)


def pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_pow2(max(int(n), 1))))


def lora_block_r(r: int) -> int:
    """Rank tile: >= 16 (tl.dot's minimum), a power of two, at most 64 on a GPU; at most 32 under the interpreter
    (still one program for usual ranks; larger ranks go through the rank loops, which tests thus reach)."""
    return pow2_clamp(r, 16, 32 if interpreter_active() else LORA_BLOCK_RS[-1])


_NUM_SMS: list[int] = []


def num_sms() -> int:
    if not _NUM_SMS:
        _NUM_SMS.append(torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count)
    return _NUM_SMS[0]


def check_scalar(name: str, value, lo: float | None = None, hi_open: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite Python number, got {value!r}")
    if lo is not None and not (lo <= value < hi_open):
        raise ValueError(f"{name} must be in [{lo}, {hi_open}), got {value!r}")
    return float(value)


def seed_tensor(seed, device: torch.device) -> torch.Tensor:
    """The dropout seed as a one-element int64 tensor on ``device``: an int in [0, 2**31) is staged there; a tensor
    must already be a one-element integer tensor on that device (it is read by the kernel, never on the host)."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"seed must be a one-element int64 tensor, got dtype {seed.dtype} and shape "
                             f"{tuple(seed.shape)}")
        # A seed on another device (a CPU draw for a GPU layer) is copied without a host read or a sync; drawn
        # on the kernels' device it is used as it is (what a captured CUDA graph needs).
        return seed.reshape(1).to(device=device, dtype=torch.int64, non_blocking=True)
    check_seed_int(seed)
    return torch.tensor([seed], dtype=torch.int64, device=device)


def check_seed_int(seed) -> None:
    """An int seed must lie in [0, 2**31) (checked also where dropout is off and no tensor is made of it)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")


def _threshold_biased(p: float) -> int:
    threshold = min(int(round(p * 2.0**32)), 2**32 - 1)
    return threshold - 2**31


def split_count(tiles: int, reduction: int, block: int, sms: int) -> int:
    """Splits of a reduction of ``reduction`` elements in steps of ``block`` over ``tiles`` output tiles on ``sms``
    SMs: the smallest of ``SPLIT_CHOICES`` reaching about two programs per SM, each split keeping >= 2 steps."""
    want = cdiv(2 * sms, max(tiles, 1))
    most = max(1, reduction // (2 * block))
    split = 1
    for s in SPLIT_CHOICES:
        if s <= most and (split < want):
            split = s
    return split


def choose_splits(tiles: int, reduction: int, block: int) -> int:
    """:func:`split_count` on this GPU; 1 under the interpreter."""
    if interpreter_active():
        return 1
    return split_count(tiles, reduction, block, num_sms())


def sum_splits(ws: torch.Tensor, out: torch.Tensor, scale: float = 1.0) -> None:
    """out (any shape, contiguous) = scale * ws.sum(0) in float32, rounded once to out's dtype."""
    numel = out.numel()
    block = REDUCE_BLOCK if not interpreter_active() else pow2_clamp(numel, 16, 1 << 16)
    _sum_splits_kernel[(cdiv(numel, block),)](ws, out, numel, ws.shape[0], float(scale), BLOCK=block)


# --------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------


def lora_dropout_bits(seed, shape, p: float) -> torch.Tensor:
    """Bit-packed keep mask (int32 (M, ceil(K / 32)), module docstring) of an input of ``shape`` (M, K), on the
    kernels' device. ``seed``: int in [0, 2**31) or a one-element int64 tensor on that device."""
    p = check_scalar("p", p, 0.0, 1.0)
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2:
        raise ValueError(f"shape must be (M, K), got {shape!r}")
    m, k = int(shape[0]), int(shape[1])
    device = kernel_device() if not isinstance(seed, torch.Tensor) else seed.device
    seed_t = seed_tensor(seed, device)
    words = cdiv(k, 32)
    bits = torch.empty((m, words), dtype=torch.int32, device=device)
    if bits.numel() == 0:
        return bits
    meta = _bits_block(m, words)
    grid = (cdiv(m, meta["BLOCK_M"]), cdiv(words, meta["BLOCK_W"]))
    _dropout_bits_kernel[grid](seed_t, bits, m, k, words, _threshold_biased(p), **meta)
    return bits


def _bits_block(m: int, words: int) -> dict:
    """Tiles of the mask kernel. The bits do not depend on them (a word's Philox counters are its flat index). GPU:
    ``BITS_BLOCK``. Interpreter: one program per up to 8192 words, shaped to the mask (so a small mask is one
    program with few masked-off lanes): its cost is per program and per tile operation, not per element."""
    if not interpreter_active():
        return dict(BITS_BLOCK)
    block_w = pow2_clamp(words, 1, 64)
    return dict(BLOCK_M=pow2_clamp(m, 1, INTERPRETER_BITS_WORDS // block_w), BLOCK_W=block_w)


def expand_keep_bits(bits: torch.Tensor, k: int) -> torch.Tensor:
    """bool (M, k) keep mask from the bit-packed one."""
    cols = torch.arange(k, device=bits.device)
    return ((bits[:, cols // 32] >> (cols % 32).to(torch.int32)) & 1).bool()


def lora_dropout_mask(seed, shape, p: float, device: torch.device | str | None = None) -> torch.Tensor:
    """The scaled keep mask (float32, 0 or ``1 / (1 - p)``) that the kernels apply to ``x`` of ``shape`` (M, K)
    (flattened leading dims included) for ``seed``: :func:`lora_dropout_bits` expanded."""
    if isinstance(seed, bool) or not isinstance(seed, (int, torch.Tensor)):
        raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")
    p = check_scalar("p", p, 0.0, 1.0)
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2:
        raise ValueError(f"shape must be (M, K), got {shape!r}")
    device = kernel_device() if device is None else torch.device(device)
    if device.type != kernel_device().type:
        raise ValueError(f"device must be a {kernel_device().type} device where the kernels run, got {device}")
    m, k = int(shape[0]), int(shape[1])
    if m * k == 0:
        return torch.empty((m, k), dtype=torch.float32, device=device)
    keep = expand_keep_bits(lora_dropout_bits(seed, (m, k), p), k)
    return torch.where(keep, torch.tensor(1.0 / (1.0 - p), dtype=torch.float32, device=keep.device),
                       torch.tensor(0.0, dtype=torch.float32, device=keep.device)).to(device)


def _down_block_ms(block_r: int) -> tuple[int, ...]:
    # Row tiles lora_down may use on a GPU: 64 rows only at rank tile 16 (64 x 32/64 spills on sm_80/sm_90).
    return (16, 32, 64) if block_r == 16 else (16, 32)


def _down_stages(block_r: int) -> int:
    # Two stages at rank tile 64: with three, the 16-row build keeps 8 bytes on the stack on sm_80 (triton 3.9,
    # as launched with x's row stride a runtime value).
    return 2 if block_r == 64 else 3


def _grad_block(block_r: int) -> dict:
    # 32 x 32 (rows x columns) from rank tile 32 on: 64 x 64 and 64 x 32 spill a few bytes on sm_80 there.
    return dict(GPU_GRAD_BLOCK) if block_r == 16 else dict(BLOCK_M=32, BLOCK_C=32)


def _down_meta(m: int, d: int, block_r: int):
    if interpreter_active():
        return dict(BLOCK_M=pow2_clamp(m, 16, 256), BLOCK_D=pow2_clamp(d, 16, 512)), dict()
    block_m = 64 if m >= 64 * num_sms() else (32 if m > 16 else 16)
    block_m = min(block_m, _down_block_ms(block_r)[-1])
    return dict(BLOCK_M=block_m, BLOCK_D=GPU_DOWN_BLOCK_D), dict(num_warps=4, num_stages=_down_stages(block_r))


def keep_bits(keep, seed, m: int, k: int, p: float, device) -> torch.Tensor | None:
    """The bit-packed dropout mask of an (M, K) operand on ``device``: None when p == 0 (an int seed still
    validated), else ``keep`` as given (checked), or generated from ``seed``. Shared by :func:`lora_down`,
    :func:`lora_grad` and the fused layer's forward and backward (kernels/linear.py)."""
    if p == 0:
        if not isinstance(seed, torch.Tensor):
            check_seed_int(seed)  # validated even when unused; no tensor (a host-to-device copy) is made
        return None
    if keep is None:
        return lora_dropout_bits(seed_tensor(seed, device), (m, k), p)
    check_tensor("keep", keep, (torch.int32,), ndim=2)
    if tuple(keep.shape) != (m, cdiv(k, 32)) or not keep.is_contiguous():
        raise ValueError(f"keep must be contiguous int32 of shape {(m, cdiv(k, 32))}, got {tuple(keep.shape)}")
    return keep


def lora_down(a: torch.Tensor, b: torch.Tensor, *, dropout_p: float = 0.0, seed=0,
              keep: torch.Tensor | None = None) -> torch.Tensor:
    """``(dropout(a) @ b)`` as float32 (M, R): a (M, D) and b (D, R) in one float dtype, any strides.

    With ``dropout_p > 0`` element (m, d) of ``a`` is kept where its bit of ``keep`` (the bit-packed mask of
    :func:`lora_dropout_bits`, generated from ``seed`` when not given) is set, and the result is multiplied by
    ``1 / (1 - p)`` in float32. Tiled over M and split over D so that at least about two programs per SM run.
    """
    check_tensor("a", a, FLOAT_DTYPES, ndim=2)
    check_tensor("b", b, (a.dtype,), ndim=2)
    check_same_device(a=a, b=b)
    if b.shape[0] != a.shape[1]:
        raise ValueError(f"b must have {a.shape[1]} rows to match a {tuple(a.shape)}, got {tuple(b.shape)}")
    p = check_scalar("dropout_p", dropout_p, 0.0, 1.0)
    return launch_lora_down(a, b, p, keep_bits(keep, seed, a.shape[0], a.shape[1], p, a.device))


def launch_lora_down(a: torch.Tensor, b: torch.Tensor, p: float, keep: torch.Tensor | None) -> torch.Tensor:
    """:func:`lora_down` without its argument checks, for launchers that have checked them (the fused layer's
    forward and backward): a (M, D), b (D, R) on one device, ``keep`` the (M, ceil(D/32)) bits when p > 0."""
    m, d = a.shape
    r = b.shape[1]
    out = torch.empty((m, r), dtype=torch.float32, device=a.device)
    if m == 0 or r == 0:
        return out
    if d == 0:
        return out.zero_()
    words = cdiv(d, 32)
    block_r = lora_block_r(r)
    meta, launch = _down_meta(m, d, block_r)
    tiles = cdiv(m, meta["BLOCK_M"]) * cdiv(r, block_r)
    split = choose_splits(tiles, d, meta["BLOCK_D"])
    d_per_split = cdiv(cdiv(d, split), meta["BLOCK_D"]) * meta["BLOCK_D"]
    split = cdiv(d, d_per_split)
    scale = 1.0 / (1.0 - p)
    target = out if split == 1 else torch.empty((split, m, r), dtype=torch.float32, device=a.device)
    grid = (cdiv(m, meta["BLOCK_M"]), cdiv(r, block_r), split)
    _lora_down_kernel[grid](
        a, b, out if keep is None else keep, target, m, d, r, words, d_per_split, scale if split == 1 else 1.0,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        HAS_DROPOUT=p > 0, BLOCK_R=block_r, **meta, **launch,
    )
    if split > 1:
        sum_splits(target, out, scale)
    return out


def _check_colsum(colsum: torch.Tensor | None, n: int, dtype: torch.dtype) -> None:
    """The optional bias-gradient output of :func:`lora_grad` / :func:`lora_down_grad`: contiguous (n,) of dtype."""
    if colsum is not None:
        check_tensor("colsum", colsum, (dtype,), ndim=1)
        if colsum.numel() != n or not colsum.is_contiguous():
            raise ValueError(f"colsum must be contiguous of shape ({n},), got {tuple(colsum.shape)}")


def lora_grad(left: torch.Tensor, right: torch.Tensor, out: torch.Tensor, *, scale: float,
              colsum: torch.Tensor | None = None, dropout_p: float = 0.0, seed=0,
              keep: torch.Tensor | None = None) -> None:
    """``out[j, c] = scale * sum_m left[m, j] * dropout(right)[m, c]`` written into ``out`` (R, C) (any strides,
    right's dtype); with ``colsum`` (C,) also ``colsum[c] = sum_m right[m, c]`` (before dropout).

    left (M, R) float32 contiguous, right (M, C) in a float dtype, any strides. Rows of ``out`` are
    ``left``'s columns, so ``out`` may be a transposed view (``dB.T``). Dropout as in :func:`lora_down`.
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
    _check_colsum(colsum, c, right.dtype)
    p = check_scalar("dropout_p", dropout_p, 0.0, 1.0)
    launch_lora_grad(left, right, out, scale, colsum, p, keep_bits(keep, seed, m, c, p, right.device))


def launch_lora_grad(left: torch.Tensor, right: torch.Tensor, out: torch.Tensor, scale: float,
                     colsum: torch.Tensor | None, p: float, keep: torch.Tensor | None) -> None:
    """:func:`lora_grad` without its argument checks, for launchers that have checked them."""
    m, r = left.shape
    c = right.shape[1]
    if r == 0 or c == 0:
        return
    if m == 0:
        out.zero_()
        if colsum is not None:
            colsum.zero_()
        return
    block_r = lora_block_r(r)
    if interpreter_active():
        meta, launch = dict(BLOCK_M=pow2_clamp(m, 16, 256), BLOCK_C=pow2_clamp(c, 16, 512)), {}
    else:
        meta, launch = _grad_block(block_r), dict(num_warps=4, num_stages=3)
    grid = (cdiv(c, meta["BLOCK_C"]), cdiv(r, block_r))
    _lora_grad_kernel[grid](
        left, right, out if keep is None else keep, out, out if colsum is None else colsum, m, r, c,
        cdiv(c, 32), float(scale),
        right.stride(0), right.stride(1), out.stride(0), out.stride(1),
        HAS_DROPOUT=p > 0, HAS_COLSUM=colsum is not None, BLOCK_R=block_r, **meta, **launch,
    )


def lora_down_grad(dy: torch.Tensor, b: torch.Tensor, u: torch.Tensor, out: torch.Tensor, *, scale: float,
                   colsum: torch.Tensor | None = None) -> torch.Tensor:
    """``g = dy @ b`` as float32 (M, R), and in the same pass over dy ``out[j, n] = scale * sum_m round(u)[m, j] *
    dy[m, n]`` written into ``out`` (R, N) (any strides, dy's dtype; ``dB.T`` in the layer's backward) and with
    ``colsum`` (N,) ``colsum[n] = sum_m dy[m, n]``: :func:`lora_down` ``(dy, b)`` and :func:`lora_grad`
    ``(u, dy, out, colsum)`` in one launch (plus :func:`sum_splits` when dy has more than one column tile).

    dy (M, N) and b (N, R) in one float dtype, any strides; u (M, R) float32 contiguous; R at most one rank tile
    (:func:`lora_block_r`) and M at most ``DOWN_GRAD_MAX_M``, where the split of g over dy's column tiles costs no
    more bytes than reading dy twice."""
    check_tensor("dy", dy, FLOAT_DTYPES, ndim=2)
    check_tensor("b", b, (dy.dtype,), ndim=2)
    check_tensor("u", u, (torch.float32,), ndim=2)
    check_tensor("out", out, (dy.dtype,), ndim=2)
    check_same_device(dy=dy, b=b, u=u, out=out, colsum=colsum)
    m, n = dy.shape
    r = b.shape[1]
    if b.shape[0] != n or tuple(u.shape) != (m, r) or tuple(out.shape) != (r, n):
        raise ValueError(f"dy {tuple(dy.shape)}, b {tuple(b.shape)}, u {tuple(u.shape)} and out "
                         f"{tuple(out.shape)} disagree: want b ({n}, R), u ({m}, R), out (R, {n})")
    if not u.is_contiguous():
        raise ValueError("u must be contiguous")
    if not down_grad_fits(m, r):
        raise ValueError(f"lora_down_grad takes at most {DOWN_GRAD_MAX_M} rows and one rank tile "
                         f"({lora_block_r(r)}), got M = {m}, R = {r}: use lora_down and lora_grad")
    _check_colsum(colsum, n, dy.dtype)
    return launch_lora_down_grad(dy, b, u, out, check_scalar("scale", scale), colsum)


def down_grad_fits(m: int, r: int) -> bool:
    """Whether :func:`lora_down_grad` takes an (m, ·) dy at rank r: at most ``DOWN_GRAD_MAX_M`` rows and one rank
    tile (:func:`lora_block_r`)."""
    return m <= DOWN_GRAD_MAX_M and r <= lora_block_r(r)


def launch_lora_down_grad(dy: torch.Tensor, b: torch.Tensor, u: torch.Tensor, out: torch.Tensor, scale: float,
                          colsum: torch.Tensor | None) -> torch.Tensor:
    """:func:`lora_down_grad` without its argument checks, for launchers that have checked them."""
    m, n = dy.shape
    r = b.shape[1]
    g = torch.empty((m, r), dtype=torch.float32, device=dy.device)
    if m == 0 or n == 0 or r == 0:
        g.zero_()
        out.zero_()
        if colsum is not None:
            colsum.zero_()
        return g
    block_r = lora_block_r(r)
    if interpreter_active():
        meta, launch = dict(BLOCK_M=pow2_clamp(m, 16, DOWN_GRAD_MAX_M), BLOCK_C=pow2_clamp(n, 16, 512)), {}
    else:
        meta, launch = dict(BLOCK_M=DOWN_GRAD_MAX_M, BLOCK_C=GPU_DOWN_GRAD_BLOCK_C), dict(num_warps=4)
    tiles = cdiv(n, meta["BLOCK_C"])
    ws = g if tiles == 1 else torch.empty((tiles, m, r), dtype=torch.float32, device=dy.device)
    _lora_down_grad_kernel[(tiles,)](
        dy, b, u, ws, out, out if colsum is None else colsum, m, n, r, float(scale),
        dy.stride(0), dy.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        HAS_COLSUM=colsum is not None, BLOCK_R=block_r, **meta, **launch,
    )
    if tiles > 1:
        sum_splits(ws, g)
    return g


# --------------------------------------------------------------------------------------------------------------
# Static compile specifications: derived from the launch constants above
# --------------------------------------------------------------------------------------------------------------


def _signature(fn, types: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Every argument of ``fn`` typed: constexprs by name, the rest from ``types`` (pointers and scalars)."""
    return {name: ("constexpr" if name in constexprs else types[name]) for name in fn.arg_names}


def compile_specs(dt: str = "bf16") -> list[KernelSpec]:
    """Every kernel of this module in each config its launcher picks on a GPU, in bf16, with dropout on."""
    specs = []
    ptr = {f"{n}_ptr": "*fp32" for n in ("out", "left", "ws")}
    for block_r in LORA_BLOCK_RS:
        for block_m in _down_block_ms(block_r):
            # u = x @ A^T: x rows contiguous, A^T read through A's strides (d stride 1).
            consts = dict(HAS_DROPOUT=True, BLOCK_M=block_m, BLOCK_D=GPU_DOWN_BLOCK_D, BLOCK_R=block_r,
                          stride_ad=1, stride_bd=1)
            types = {**ptr, "a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "bits_ptr": "*i32", "M": "i32", "D": "i32",
                     "R": "i32", "words_per_row": "i32", "d_per_split": "i32", "out_scale": "fp32",
                     "stride_am": "i32", "stride_ad": "i32", "stride_bd": "i32", "stride_br": "i32"}
            specs.append(KernelSpec(f"lora_down_m{block_m}_r{block_r}", _lora_down_kernel,
                                    _signature(_lora_down_kernel, types, consts), consts,
                                    dict(num_warps=4, num_stages=_down_stages(block_r))))
        consts = dict(HAS_DROPOUT=True, HAS_COLSUM=True, BLOCK_R=block_r, **_grad_block(block_r), stride_rc=1)
        types = {**ptr, "right_ptr": f"*{dt}", "bits_ptr": "*i32", "out_ptr": f"*{dt}", "colsum_ptr": f"*{dt}",
                 "M": "i32", "R": "i32", "C": "i32", "words_per_row": "i32", "out_scale": "fp32",
                 "stride_rm": "i32", "stride_rc": "i32", "stride_or": "i32", "stride_oc": "i32"}
        specs.append(KernelSpec(f"lora_grad_r{block_r}", _lora_grad_kernel,
                                _signature(_lora_grad_kernel, types, consts), consts, dict(num_warps=4, num_stages=3)))
        # g and dB of the backward at <= DOWN_GRAD_MAX_M rows: dy (M, N) contiguous, B (N, R) and dB^T views.
        consts = dict(HAS_COLSUM=True, BLOCK_M=DOWN_GRAD_MAX_M, BLOCK_R=block_r, BLOCK_C=GPU_DOWN_GRAD_BLOCK_C,
                      stride_yn=1)
        types = {"dy_ptr": f"*{dt}", "b_ptr": f"*{dt}", "u_ptr": "*fp32", "ws_ptr": "*fp32", "out_ptr": f"*{dt}",
                 "colsum_ptr": f"*{dt}", "M": "i32", "N": "i32", "R": "i32", "out_scale": "fp32",
                 "stride_ym": "i32", "stride_yn": "i32", "stride_bn": "i32", "stride_br": "i32",
                 "stride_or": "i32", "stride_oc": "i32"}
        specs.append(KernelSpec(f"lora_down_grad_r{block_r}", _lora_down_grad_kernel,
                                _signature(_lora_down_grad_kernel, types, consts), consts, dict(num_warps=4)))
    for out_dt in ("fp32", dt):
        consts = dict(BLOCK=REDUCE_BLOCK)
        types = {"ws_ptr": "*fp32", "out_ptr": f"*{out_dt}", "numel": "i32", "num_splits": "i32", "scale": "fp32"}
        specs.append(KernelSpec(f"sum_splits_{out_dt}", _sum_splits_kernel,
                                _signature(_sum_splits_kernel, types, consts), consts, dict(num_warps=4)))
    consts = dict(BITS_BLOCK)
    types = {"seed_ptr": "*i64", "bits_ptr": "*i32", "M": "i32", "K": "i32", "words_per_row": "i32",
             "threshold_biased": "i32"}
    specs.append(KernelSpec("dropout_bits", _dropout_bits_kernel, _signature(_dropout_bits_kernel, types, consts),
                            consts, dict(num_warps=4)))
    return specs


__all__ = ["lora_down", "lora_grad", "lora_down_grad", "lora_dropout_bits", "lora_dropout_mask",
           "compile_specs"]
