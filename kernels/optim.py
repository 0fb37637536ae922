"""Fused AdamW steps: 32-bit states, and 8-bit blockwise-quantized states (docs/SPEC.md section 7).

- :func:`adamw_step_` / :func:`adamw8bit_step_`: one tensor (float32 moments, or uint8 codes of the signed and
  unsigned dynamic maps with one float32 absmax per 256 elements); the parameter may be fp32, fp16 or bf16.
- :func:`adamw_multi_step_` / :func:`adamw8bit_multi_step_`: many tensors of one dtype in one launch, through a
  table of addresses and a work list of (tensor, first element) per program.
A program of the 8-bit kernels owns whole 256-element blocks: it dequantizes, updates in float32, reduces the new
absmax and requantizes, so the state never round-trips through memory in float32. The host rounds the step's
scalars once (:func:`step_scalars`); every float32 operation is rounded on its own (``enable_fp_fusion=False``).
Non-finite gradients propagate as in torch (the 8-bit block rule: docs/DESIGN.md, "Non-finite values").
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl

from ._host import cdiv, next_pow2
from ._checks import FLOAT_DTYPES, check_same_device, check_tensor
from ._runtime import ieee_semantics, interpreter_active, lean_under_interpreter
from ._static import KernelSpec
from ._tl import INTERPRETER

QBLOCK = 256  # 8-bit state blocksize (SPEC section 7)

# GPU launch configs: 1024 elements per program, 8 warps, so 4 elements per thread (16-byte fp32 accesses).
# With 4 warps the 8-bit step (two binary searches per element) spills on sm_80; 8 warps keep it in 48 registers.
_GPU_BLOCK_32 = 1024
_GPU_WARPS_32 = 8
_GPU_QBLOCKS_8 = 4
_GPU_WARPS_8 = 8
# The multi-tensor 8-bit kernel also loads its pointers from a table: at 8 warps its fp32 build keeps an 8-byte
# stack frame on sm_90 under triton 3.9; 16 warps (two of the program's 1024 elements per thread) keep it in registers.
_GPU_WARPS_8_MULTI = 16
# Under the interpreter the cost is per program instance: give each program a large slab.
_INTERP_MAX_BLOCK = 1 << 18


class StepScalars(NamedTuple):
    """Per-step float32 scalars (as Python floats holding float32 values) shared by every element."""

    decay: float
    beta1: float
    beta2: float
    c1: float
    c2: float
    step_size: float
    bc2_sqrt: float
    eps: float


_PACK_F32 = struct.Struct("<f")


def _f32(x: float) -> float:
    """``x`` rounded to the nearest float32 (ties to even, as NumPy's cast); +-inf where it overflows."""
    try:
        return _PACK_F32.unpack(_PACK_F32.pack(x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def step_scalars(step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> StepScalars:
    """The host side of one AdamW step: each scalar computed in float64 and rounded once to float32.

    ``decay = 1 - lr*wd``, ``c1 = 1 - b1``, ``c2 = 1 - b2``, ``step_size = lr / (1 - b1**t)``,
    ``bc2_sqrt = sqrt(1 - b2**t)``; ``b1``, ``b2`` and ``eps`` are rounded to float32 as given. A scalar
    that overflows float32 is rejected with ValueError.
    """
    scalars = StepScalars(
        decay=_f32(1.0 - lr * weight_decay),
        beta1=_f32(beta1),
        beta2=_f32(beta2),
        c1=_f32(1.0 - beta1),
        c2=_f32(1.0 - beta2),
        step_size=_f32(lr / (1.0 - beta1**step)),
        bc2_sqrt=_f32(math.sqrt(1.0 - beta2**step)),
        eps=_f32(eps),
    )
    for name, value in scalars._asdict().items():
        if not math.isfinite(value):
            raise ValueError(f"lr, eps and weight_decay must keep the float32 step scalars finite; {name} overflows")
    return scalars


@triton.jit
def _to_param_dtype(x, p_ptr):
    """Round float32 ``x`` to the parameter's dtype, to nearest, ties to even.

    bfloat16 is rounded with integer arithmetic on the bits: the Triton interpreter's own float32 ->
    bfloat16 conversion does not round to nearest-even, and this gives the same bits on a GPU.
    """
    if p_ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        bits = tl.where(x != x, 0x7FC0, bits)  # a NaN stays a (quiet) NaN
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(p_ptr.dtype.element_ty)


@triton.jit
def _adamw32_update(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask,
                    decay, beta1, beta2, c1, c2, step_size, bc2_sqrt, eps):
    """The 32-bit step of elements ``offs`` (masked): every kernel below runs exactly this code per element."""
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    p = p * decay
    m = beta1 * m + c1 * g
    v = beta2 * v + c2 * (g * g)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    tl.store(p_ptr + offs, _to_param_dtype(p, p_ptr), mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)


@lean_under_interpreter
@triton.jit
def _adamw32_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, n,
    decay, beta1, beta2, c1, c2, step_size, bc2_sqrt, eps,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _adamw32_update(p_ptr, g_ptr, m_ptr, v_ptr, offs, offs < n,
                    decay, beta1, beta2, c1, c2, step_size, bc2_sqrt, eps)


@triton.jit
def _work_item(table_ptr, work_ptr, ROW_WIDTH: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr):
    """This program's entry of a multi-tensor launch: (its tensor's table row, its first element or block, the
    param and grad pointers, the element count). A row holds ROW_WIDTH int64: addresses, then the count last."""
    pid = tl.program_id(0)
    row = table_ptr + ROW_WIDTH * tl.load(work_ptr + 2 * pid)
    first = tl.load(work_ptr + 2 * pid + 1)
    p_ptr = tl.load(row).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(G_DTYPE))
    return row, first, p_ptr, g_ptr, tl.load(row + ROW_WIDTH - 1)


@triton.jit
def _work_rows(table_ptr, work_ptr, ROW_WIDTH: tl.constexpr, ROWS: tl.constexpr):
    """Interpreter layout of a multi-tensor launch: this program's ROWS work units, each of any tensor. Returns
    (ROWS,) pointers to the units' table rows and (ROWS,) unit indices (256-element blocks or chunks) within
    their tensors; the work table holds (tensor, unit) per unit, padded with units past a tensor's end."""
    item = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    return table_ptr + ROW_WIDTH * tl.load(work_ptr + 2 * item), tl.load(work_ptr + 2 * item + 1)


@lean_under_interpreter
@triton.jit
def _adamw32_multi_kernel(
    table_ptr, work_ptr,
    decay, beta1, beta2, c1, c2, step_size, bc2_sqrt, eps,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    """Many tensors in one launch. ``table`` (int64, 5 per tensor): addresses of param, grad, exp_avg, exp_avg_sq,
    then the element count; ``work`` (int64, 2 per program): the tensor it steps and its first element. With
    ROWS (the interpreter's layout, :func:`_work_rows`): ROWS chunks of BLOCK elements per program, each of its
    own tensor (2 per chunk in ``work``), so a launch over many small tensors runs a few programs."""
    if ROWS:
        row, chunk = _work_rows(table_ptr, work_ptr, 5, ROWS)
        offs = chunk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        _adamw32_update(tl.load(row).to(tl.pointer_type(P_DTYPE))[:, None],
                        tl.load(row + 1).to(tl.pointer_type(G_DTYPE))[:, None],
                        tl.load(row + 2).to(tl.pointer_type(tl.float32))[:, None],
                        tl.load(row + 3).to(tl.pointer_type(tl.float32))[:, None], offs,
                        offs < tl.load(row + 4)[:, None], decay, beta1, beta2, c1, c2, step_size, bc2_sqrt, eps)
    else:
        row, start, p_ptr, g_ptr, n = _work_item(table_ptr, work_ptr, 5, P_DTYPE, G_DTYPE)
        m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
        offs = start + tl.arange(0, BLOCK)
        _adamw32_update(p_ptr, g_ptr, m_ptr, v_ptr, offs, offs < n,
                        decay, beta1, beta2, c1, c2, step_size, bc2_sqrt, eps)


@triton.jit
def _quantize_rows(x, valid, mid_ptr, ZERO_CODE: tl.constexpr):
    """Requantize a (blocks, QBLOCK) float32 tile: per-row absmax and the nearest-code search.

    A block holding a NaN or an infinity cannot be represented: it gets absmax NaN and the codes of 0.0,
    so it decodes to NaN throughout (the oracle's rule). Codes count the float32 midpoints strictly below
    ``x * (1/absmax)`` by a branchless binary search over the 256-entry table (255 midpoints padded with
    +inf): ties go to the lower code. A block whose ``1/absmax`` is not finite takes the code of 0.0.
    """
    a = tl.where(valid, tl.abs(x), 0.0)
    nonfinite = tl.max((~(a < float("inf"))).to(tl.int32), axis=1) > 0  # NaN compares false too
    absmax = tl.where(nonfinite, float("nan"), tl.max(a, axis=1))
    inv = tl.div_rn(tl.full(absmax.shape, 1.0, tl.float32), absmax)
    scalable = tl.abs(inv) < float("inf")  # false for inf and NaN
    s = x * inv[:, None]
    code = tl.zeros(x.shape, tl.int32)
    if INTERPRETER:  # the 256 midpoints gathered from a loaded table, not loaded through a pointer per element
        mids = tl.load(mid_ptr + tl.arange(0, 256))
    for k in tl.static_range(8):
        if INTERPRETER:
            mid = tl.reshape(tl.gather(mids, tl.reshape(code + ((128 >> k) - 1), (x.numel,)), 0), x.shape)
        else:
            mid = tl.load(mid_ptr + (code + ((128 >> k) - 1)))
        code = tl.where(mid < s, code + (128 >> k), code)
    code = tl.where(scalable[:, None], code, ZERO_CODE)
    return code.to(tl.uint8), absmax


@triton.jit
def _adamw8bit_update(p_ptr, g_ptr, mq_ptr, mabs_ptr, vq_ptr, vabs_ptr, smap_ptr, smid_ptr, umap_ptr, umid_ptr,
                      blk, n, decay, beta1, beta2, c1, c2, step_size, bc2_sqrt, eps,
                      QBLOCK: tl.constexpr, SIGNED_ZERO: tl.constexpr, UNSIGNED_ZERO: tl.constexpr,
                      PER_ROW: tl.constexpr):
    """The 8-bit step of the 256-element blocks ``blk`` of a tensor of ``n`` elements: every kernel below runs
    exactly this code per block. PER_ROW: each block of its own tensor, the pointers (blocks, 1) for the codes,
    param and grad and (blocks,) for the absmax, ``n`` (blocks,)."""
    offs = blk[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    if PER_ROW:
        mask = offs < n[:, None]
    else:
        mask = offs < n
    bmask = blk * QBLOCK < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mq = tl.load(mq_ptr + offs, mask=mask, other=SIGNED_ZERO).to(tl.int32)
    vq = tl.load(vq_ptr + offs, mask=mask, other=UNSIGNED_ZERO).to(tl.int32)
    mabs = tl.load(mabs_ptr + blk, mask=bmask, other=0.0)
    vabs = tl.load(vabs_ptr + blk, mask=bmask, other=0.0)
    if INTERPRETER:  # as in _quantize_rows: gathered from the loaded 256-entry maps
        m = tl.reshape(tl.gather(tl.load(smap_ptr + tl.arange(0, 256)), tl.reshape(mq, (mq.numel,)), 0), mq.shape)
        v = tl.reshape(tl.gather(tl.load(umap_ptr + tl.arange(0, 256)), tl.reshape(vq, (vq.numel,)), 0), vq.shape)
        m = m * mabs[:, None]
        v = v * vabs[:, None]
    else:
        m = tl.load(smap_ptr + mq) * mabs[:, None]
        v = tl.load(umap_ptr + vq) * vabs[:, None]
    p = p * decay
    m = beta1 * m + c1 * g
    v = beta2 * v + c2 * (g * g)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    tl.store(p_ptr + offs, _to_param_dtype(p, p_ptr), mask=mask)
    mq, mabs = _quantize_rows(m, mask, smid_ptr, SIGNED_ZERO)
    vq, vabs = _quantize_rows(v, mask, umid_ptr, UNSIGNED_ZERO)
    tl.store(mq_ptr + offs, mq, mask=mask)
    tl.store(vq_ptr + offs, vq, mask=mask)
    tl.store(mabs_ptr + blk, mabs, mask=bmask)
    tl.store(vabs_ptr + blk, vabs, mask=bmask)


@lean_under_interpreter
@triton.jit
def _adamw8bit_kernel(
    p_ptr, g_ptr, mq_ptr, mabs_ptr, vq_ptr, vabs_ptr,
    smap_ptr, smid_ptr, umap_ptr, umid_ptr, n,
    decay, beta1, beta2, c1, c2, step_size, bc2_sqrt, eps,
    QBLOCK: tl.constexpr, QBLOCKS: tl.constexpr, SIGNED_ZERO: tl.constexpr, UNSIGNED_ZERO: tl.constexpr,
):
    blk = tl.program_id(0).to(tl.int64) * QBLOCKS + tl.arange(0, QBLOCKS)
    _adamw8bit_update(p_ptr, g_ptr, mq_ptr, mabs_ptr, vq_ptr, vabs_ptr, smap_ptr, smid_ptr, umap_ptr, umid_ptr,
                      blk, n, decay, beta1, beta2, c1, c2, step_size, bc2_sqrt, eps,
                      QBLOCK, SIGNED_ZERO, UNSIGNED_ZERO, False)


@lean_under_interpreter
@triton.jit
def _adamw8bit_multi_kernel(
    table_ptr, work_ptr, smap_ptr, smid_ptr, umap_ptr, umid_ptr,
    decay, beta1, beta2, c1, c2, step_size, bc2_sqrt, eps,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
    QBLOCK: tl.constexpr, QBLOCKS: tl.constexpr, SIGNED_ZERO: tl.constexpr, UNSIGNED_ZERO: tl.constexpr,
    ROWS: tl.constexpr,
):
    """Many tensors in one launch. ``table`` (int64, 7 per tensor): addresses of param, grad, exp_avg codes and
    absmax, exp_avg_sq codes and absmax, then the element count; ``work`` (int64, 2 per program): the tensor it
    steps and its first 256-element block. With ROWS (the interpreter's layout, :func:`_work_rows`): QBLOCKS
    blocks per program, each of its own tensor (2 per block in ``work``)."""
    if ROWS:
        row, blk = _work_rows(table_ptr, work_ptr, 7, QBLOCKS)
        _adamw8bit_update(tl.load(row).to(tl.pointer_type(P_DTYPE))[:, None],
                          tl.load(row + 1).to(tl.pointer_type(G_DTYPE))[:, None],
                          tl.load(row + 2).to(tl.pointer_type(tl.uint8))[:, None],
                          tl.load(row + 3).to(tl.pointer_type(tl.float32)),
                          tl.load(row + 4).to(tl.pointer_type(tl.uint8))[:, None],
                          tl.load(row + 5).to(tl.pointer_type(tl.float32)), smap_ptr, smid_ptr, umap_ptr, umid_ptr,
                          blk, tl.load(row + 6), decay, beta1, beta2, c1, c2, step_size, bc2_sqrt, eps,
                          QBLOCK, SIGNED_ZERO, UNSIGNED_ZERO, True)
    else:
        row, first, p_ptr, g_ptr, n = _work_item(table_ptr, work_ptr, 7, P_DTYPE, G_DTYPE)
        mq_ptr = tl.load(row + 2).to(tl.pointer_type(tl.uint8))
        mabs_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
        vq_ptr = tl.load(row + 4).to(tl.pointer_type(tl.uint8))
        vabs_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
        blk = first + tl.arange(0, QBLOCKS)
        _adamw8bit_update(p_ptr, g_ptr, mq_ptr, mabs_ptr, vq_ptr, vabs_ptr, smap_ptr, smid_ptr, umap_ptr, umid_ptr,
                          blk, n, decay, beta1, beta2, c1, c2, step_size, bc2_sqrt, eps,
                          QBLOCK, SIGNED_ZERO, UNSIGNED_ZERO, False)


# --- dynamic maps -----------------------------------------------------------------------------------

_TABLES: dict[tuple[bool, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def dynamic_tables(signed: bool, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(map, midpoints)`` for the signed or unsigned dynamic map on ``device``, cached.

    ``map`` is :func:`qlora.kernels.codebook.dynamic_map`, float32 (256,) sorted ascending; ``midpoints`` is
    float32 (256,): ``(map[i] + map[i+1]) / 2`` computed in float32 for i < 255, padded with ``+inf`` to 256
    entries (the kernel's 8-step binary search probes indices 0..254 only).
    """
    device = torch.device(device)
    key = (bool(signed), device)
    if key not in _TABLES:
        from .codebook import dynamic_map

        values = dynamic_map(signed=bool(signed), device=device)
        mids = torch.full((256,), float("inf"), dtype=torch.float32, device=device)
        mids[:255] = (values[:-1] + values[1:]) / 2
        _TABLES[key] = (values, mids)
    return _TABLES[key]


def zero_code(signed: bool) -> int:
    """Code of 0.0 in the dynamic map: 127 signed (127 negatives below it), 0 unsigned."""
    return 127 if signed else 0


# --- launchers --------------------------------------------------------------------------------------


def _check_scalars(step, lr, beta1, beta2, eps, weight_decay) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1, got {step!r}")
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def _check_param_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    check_tensor("param", param, FLOAT_DTYPES)
    check_tensor("grad", grad, FLOAT_DTYPES)
    if grad.shape != param.shape:
        raise ValueError(f"grad must have the shape of param {tuple(param.shape)}, got {tuple(grad.shape)}")
    if not param.is_contiguous():
        raise ValueError("param must be contiguous (the step updates it in place)")


def _check_state(name: str, t: torch.Tensor, dtype: torch.dtype, numel: int) -> None:
    check_tensor(name, t, (dtype,))
    if t.numel() != numel:
        raise ValueError(f"{name} must have {numel} elements, got {t.numel()}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the step updates it in place)")


def _program_units(units: int, unit_elems: int, gpu_size: int, gpu_warps: int) -> tuple[int, int]:
    """``(units per program, warps)`` for ``units`` >= 1 work units of ``unit_elems`` elements: ``gpu_size`` and
    ``gpu_warps`` on a GPU; under the interpreter one large slab per program (one per tensor), one warp."""
    if interpreter_active():
        return min(_INTERP_MAX_BLOCK // unit_elems, next_pow2(units)), 1
    return gpu_size, gpu_warps


def _launch(kernel, args: tuple, units: int, size_name: str, gpu_size: int, gpu_warps: int, unit_elems: int = 1,
            **constexprs) -> None:
    """Launch ``kernel(*args)`` over ``units`` work units (elements, or blocks of ``unit_elems`` elements) with
    IEEE float32 semantics and no fp fusion. The constexpr ``size_name`` (units per program) is ``gpu_size``, with
    ``gpu_warps`` warps, on a GPU; under the interpreter one large slab per program, one warp."""
    size, warps = _program_units(units, unit_elems, gpu_size, gpu_warps)
    with ieee_semantics():
        kernel[(cdiv(units, size),)](
            *args, **{size_name: size}, **constexprs, num_warps=warps, enable_fp_fusion=False,
        )


def adamw_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step in place, 32-bit states.

    ``param``: float32/float16/bfloat16, contiguous, any shape; ``grad``: same shape, float32/16/bf16;
    ``exp_avg``, ``exp_avg_sq``: float32 with ``param.numel()`` elements, contiguous. ``step`` is the
    1-based count including this step. All on the kernels' device. Returns nothing.
    """
    _check_param_grad(param, grad)
    n = param.numel()
    _check_state("exp_avg", exp_avg, torch.float32, n)
    _check_state("exp_avg_sq", exp_avg_sq, torch.float32, n)
    check_same_device(param=param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    _check_scalars(step, lr, beta1, beta2, eps, weight_decay)
    if n == 0:
        return
    s = step_scalars(step, lr, beta1, beta2, eps, weight_decay)
    _launch(_adamw32_kernel, (param, grad.contiguous(), exp_avg, exp_avg_sq, n, *s), n,
            "BLOCK", _GPU_BLOCK_32, _GPU_WARPS_32)


def adamw8bit_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg_codes: torch.Tensor,
    exp_avg_absmax: torch.Tensor,
    exp_avg_sq_codes: torch.Tensor,
    exp_avg_sq_absmax: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One 8-bit AdamW step in place (blocksize 256).

    ``param``: float32/float16/bfloat16, contiguous, n elements; ``grad``: same shape; ``exp_avg_codes``:
    uint8 (n,) codes of the signed dynamic map; ``exp_avg_sq_codes``: uint8 (n,) codes of the unsigned
    map; ``*_absmax``: float32 (ceil(n/256),) one scale per block of 256 consecutive elements. A moment is
    ``map[code] * absmax`` (one float32 multiply). After the update each block is requantized: ``absmax =
    max|x|``, ``code`` = number of float32 midpoints of the map strictly below ``x * (1/absmax)``; a block
    whose ``1/absmax`` is not finite takes the code of 0.0 (127 signed, 0 unsigned), and a block holding a
    NaN or an infinity is stored as codes of 0.0 with absmax NaN. The state of a fresh parameter is all
    codes of 0.0 with absmax 0. Bit-exact with ``qlora.reference.optim.adamw8bit_step``.
    """
    _check_param_grad(param, grad)
    n = param.numel()
    nblocks = cdiv(n, QBLOCK)
    _check_state("exp_avg_codes", exp_avg_codes, torch.uint8, n)
    _check_state("exp_avg_absmax", exp_avg_absmax, torch.float32, nblocks)
    _check_state("exp_avg_sq_codes", exp_avg_sq_codes, torch.uint8, n)
    _check_state("exp_avg_sq_absmax", exp_avg_sq_absmax, torch.float32, nblocks)
    check_same_device(
        param=param, grad=grad, exp_avg_codes=exp_avg_codes, exp_avg_absmax=exp_avg_absmax,
        exp_avg_sq_codes=exp_avg_sq_codes, exp_avg_sq_absmax=exp_avg_sq_absmax,
    )
    _check_scalars(step, lr, beta1, beta2, eps, weight_decay)
    if n == 0:
        return
    s = step_scalars(step, lr, beta1, beta2, eps, weight_decay)
    smap, smid = dynamic_tables(True, param.device)
    umap, umid = dynamic_tables(False, param.device)
    _launch(
        _adamw8bit_kernel,
        (param, grad.contiguous(), exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax,
         smap, smid, umap, umid, n, *s),
        nblocks, "QBLOCKS", _GPU_QBLOCKS_8, _GPU_WARPS_8, unit_elems=QBLOCK,
        QBLOCK=QBLOCK, SIGNED_ZERO=zero_code(True), UNSIGNED_ZERO=zero_code(False),
    )


# --- many tensors per launch ------------------------------------------------------------------------------

# Tensors at least this large get a launch of their own (the single-tensor kernels above, whose pointers carry
# the alignment the compiler vectorizes on); smaller ones share one launch per (dtype pair, state kind, step
# scalars), where a launch's fixed host cost (~10-40 us) would dwarf their microsecond of device work.
MULTI_TENSOR_MAX_NUMEL = 1 << 20
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_WORK_TABLES: dict[tuple, torch.Tensor] = {}


def _index_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 (len(values),) on ``device``; from pinned memory without a host sync on CUDA."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.int64)
    return torch.tensor(values, dtype=torch.int64, pin_memory=True).to(device, non_blocking=True)


def _work_table(numels: tuple[int, ...], unit_elems: int, units_per_program: int, device: torch.device,
                pad_to: int = 1) -> torch.Tensor:
    """int64 ``(2 * entries,)``: for each program, the index of its tensor and its first unit (element or
    256-element block) there; with ``units_per_program`` 1, (tensor, unit) for every unit (the interpreter's
    ``ROWS`` layout), padded to a multiple of ``pad_to`` entries with the unit past tensor 0's end (which every
    access masks off). Cached per layout, which stays the same from step to step."""
    key = (numels, unit_elems, units_per_program, pad_to, device)
    table = _WORK_TABLES.get(key)
    if table is None:
        work: list[int] = []
        for i, n in enumerate(numels):
            units = cdiv(n, unit_elems)
            for first in range(0, units, units_per_program):
                work += (i, first)
        work += (0, cdiv(numels[0], unit_elems)) * (-(len(work) // 2) % pad_to)
        if len(_WORK_TABLES) >= 64:  # layouts change only when the set of parameters with gradients does
            _WORK_TABLES.clear()
        table = _WORK_TABLES[key] = _index_tensor(work, device)
    return table


def _unit_rows_table(numels: tuple[int, ...], unit_elems: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """The interpreter's multi-tensor layout (``ROWS``): the :func:`_work_table` of every unit of ``unit_elems``
    elements of every tensor, padded to whole programs of ``rows`` units, and ``rows`` (a power of two, at most
    _INTERP_MAX_BLOCK elements a program). A step over many small tensors then runs a few programs instead of one
    per tensor (an interpreted program costs its tile operations' Python, ~35 us each, whatever its size)."""
    rows = min(_INTERP_MAX_BLOCK // unit_elems, next_pow2(sum(cdiv(n, unit_elems) for n in numels)))
    return _work_table(numels, unit_elems, 1, device, pad_to=rows), rows


# Elements of one work unit of the 32-bit kernel under the interpreter (ROWS layout): a tensor's last unit is
# masked past its end, so a small unit wastes little on the many (r, K) and (N, r) tensors of LoRA adapters.
_INTERP_UNIT_32 = 256


def _adamw_multi(rows: list[int], numels: tuple[int, ...], p_dtype: torch.dtype, g_dtype: torch.dtype,
                 device: torch.device, s: StepScalars) -> None:
    """One 32-bit launch over many tensors, unchecked: ``rows`` holds, per tensor, the addresses of its param,
    grad, exp_avg and exp_avg_sq (contiguous, ``p_dtype``, ``g_dtype``, float32, float32) and its element count
    (> 0), as ``numels`` lists them."""
    if interpreter_active():
        work, units = _unit_rows_table(numels, _INTERP_UNIT_32, device)
        size, warps = _INTERP_UNIT_32, 1
        programs = work.numel() // (2 * units)
    else:
        size, warps = _program_units(max(numels), 1, _GPU_BLOCK_32, _GPU_WARPS_32)
        work, units = _work_table(numels, 1, size, device), 0
        programs = work.numel() // 2
    with ieee_semantics():
        _adamw32_multi_kernel[(programs,)](
            _index_tensor(rows, device), work, *s, P_DTYPE=_TL_DTYPES[p_dtype], G_DTYPE=_TL_DTYPES[g_dtype],
            BLOCK=size, ROWS=units, num_warps=warps, enable_fp_fusion=False)


def _adamw8bit_multi(rows: list[int], numels: tuple[int, ...], p_dtype: torch.dtype, g_dtype: torch.dtype,
                     device: torch.device, s: StepScalars) -> None:
    """One 8-bit launch over many tensors, unchecked: ``rows`` holds, per tensor, the addresses of its param, grad,
    exp_avg codes, exp_avg absmax, exp_avg_sq codes, exp_avg_sq absmax and its element count (> 0)."""
    if interpreter_active():
        work, size = _unit_rows_table(numels, QBLOCK, device)
        warps, programs, per_row = 1, work.numel() // (2 * size), True
    else:
        size, warps = _program_units(cdiv(max(numels), QBLOCK), QBLOCK, _GPU_QBLOCKS_8, _GPU_WARPS_8_MULTI)
        work = _work_table(numels, QBLOCK, size, device)
        programs, per_row = work.numel() // 2, False
    smap, smid = dynamic_tables(True, device)
    umap, umid = dynamic_tables(False, device)
    with ieee_semantics():
        _adamw8bit_multi_kernel[(programs,)](
            _index_tensor(rows, device), work, smap, smid, umap, umid, *s, P_DTYPE=_TL_DTYPES[p_dtype],
            G_DTYPE=_TL_DTYPES[g_dtype], QBLOCK=QBLOCK, QBLOCKS=size, SIGNED_ZERO=zero_code(True),
            UNSIGNED_ZERO=zero_code(False), ROWS=per_row, num_warps=warps, enable_fp_fusion=False)


def _check_many(params, grads, states: dict[str, tuple[Sequence[torch.Tensor], torch.dtype, int]]) -> None:
    """Per-tensor checks of the multi-tensor launchers (names carry the list index); one dtype per list."""
    if not isinstance(params, (list, tuple)) or not isinstance(grads, (list, tuple)) or len(grads) != len(params):
        raise ValueError("params and grads must be lists of the same length")
    for name, (tensors, _, _) in states.items():
        if not isinstance(tensors, (list, tuple)) or len(tensors) != len(params):
            raise ValueError(f"{name} must be a list with one tensor per parameter ({len(params)})")
    for i, (p, g) in enumerate(zip(params, grads)):
        check_tensor(f"params[{i}]", p, FLOAT_DTYPES)
        check_tensor(f"grads[{i}]", g, FLOAT_DTYPES)
        if g.shape != p.shape:
            raise ValueError(f"grads[{i}] must have the shape of params[{i}] {tuple(p.shape)}, got {tuple(g.shape)}")
        if not p.is_contiguous():
            raise ValueError(f"params[{i}] must be contiguous (the step updates it in place)")
        if p.dtype != params[0].dtype or g.dtype != grads[0].dtype:
            raise TypeError(f"params (and grads) must share one dtype; params[{i}] is {p.dtype}, grads[{i}] "
                            f"{g.dtype}, params[0] {params[0].dtype}, grads[0] {grads[0].dtype}")
        named = {f"params[{i}]": p, f"grads[{i}]": g, "params[0]": params[0]}
        for name, (tensors, dtype, unit) in states.items():
            _check_state(f"{name}[{i}]", tensors[i], dtype, cdiv(p.numel(), unit))
            named[f"{name}[{i}]"] = tensors[i]
        check_same_device(**named)


def _table_rows(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                states: tuple[Sequence[torch.Tensor], ...]) -> tuple[list[int], tuple[int, ...], list[torch.Tensor]]:
    """The multi-tensor launchers' address table, skipping empty tensors: per kept tensor the addresses of its
    param, its grad (made contiguous) and each of ``states`` in order, then its element count. Returns
    ``(rows, numels, grads)``; the caller holds the returned grads until the launch, since a contiguous copy
    made here is what its row points to."""
    keep = [i for i, p in enumerate(params) if p.numel()]
    kept_grads = [grads[i].contiguous() for i in keep]
    rows: list[int] = []
    for i, g in zip(keep, kept_grads):
        rows += (params[i].data_ptr(), g.data_ptr(), *(state[i].data_ptr() for state in states), params[i].numel())
    return rows, tuple(params[i].numel() for i in keep), kept_grads


def adamw_multi_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                      exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor], *, step: int,
                      lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """:func:`adamw_step_` on many tensors in one launch, bit for bit the same result.

    Lists of equal length: ``params`` (one float dtype, contiguous), ``grads`` (one float dtype, the params'
    shapes), ``exp_avgs``/``exp_avg_sqs`` (float32, contiguous, the params' element counts); all on one device.
    """
    _check_many(params, grads, {"exp_avgs": (exp_avgs, torch.float32, 1),
                                "exp_avg_sqs": (exp_avg_sqs, torch.float32, 1)})
    _check_scalars(step, lr, beta1, beta2, eps, weight_decay)
    rows, numels, kept_grads = _table_rows(params, grads, (exp_avgs, exp_avg_sqs))
    if numels:
        _adamw_multi(rows, numels, params[0].dtype, kept_grads[0].dtype, params[0].device,
                     step_scalars(step, lr, beta1, beta2, eps, weight_decay))


def adamw8bit_multi_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                          exp_avg_codes: Sequence[torch.Tensor], exp_avg_absmax: Sequence[torch.Tensor],
                          exp_avg_sq_codes: Sequence[torch.Tensor], exp_avg_sq_absmax: Sequence[torch.Tensor], *,
                          step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """:func:`adamw8bit_step_` on many tensors in one launch, bit for bit the same result; lists as in
    :func:`adamw_multi_step_`, the states as :func:`adamw8bit_step_` takes them."""
    _check_many(params, grads, {"exp_avg_codes": (exp_avg_codes, torch.uint8, 1),
                                "exp_avg_absmax": (exp_avg_absmax, torch.float32, QBLOCK),
                                "exp_avg_sq_codes": (exp_avg_sq_codes, torch.uint8, 1),
                                "exp_avg_sq_absmax": (exp_avg_sq_absmax, torch.float32, QBLOCK)})
    _check_scalars(step, lr, beta1, beta2, eps, weight_decay)
    rows, numels, kept_grads = _table_rows(params, grads,
                                           (exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax))
    if numels:
        _adamw8bit_multi(rows, numels, params[0].dtype, kept_grads[0].dtype, params[0].device,
                         step_scalars(step, lr, beta1, beta2, eps, weight_decay))


# --- static compile specs ----------------------------------------------------------------------------

_SCALAR_SIG = {name: "fp32" for name in StepScalars._fields}
_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# The launch the specs stand for: one step of a 64Mi-parameter tensor (the roofline's and the benchmark's shape)
# with torch's default AdamW hyperparameters at step 1; the multi-tensor kernels read sizes from their tables.
_SPEC_NUMEL = 64 << 20
_SPEC_SCALARS = step_scalars(1, 1e-3, 0.9, 0.999, 1e-8, 1e-2)._asdict()


def compile_specs() -> list[KernelSpec]:
    """One spec per kernel, parameter dtype and GPU launch config (no fp fusion, as launched): the single-tensor
    kernels and the multi-tensor ones (gradient in the parameter's dtype). Per-element figure: the elements one
    program steps (``BLOCK``, or ``QBLOCKS`` blocks of ``QBLOCK``); the kernels have no loop, so their whole
    instruction stream is counted over those."""
    specs = []
    multi_regime = f"many tensors per launch (each < {MULTI_TENSOR_MAX_NUMEL} elements)"
    for dtype, ty in _TRITON_DTYPES.items():
        specs.append(KernelSpec(
            name=f"adamw32_{ty}",
            fn=_adamw32_kernel,
            signature={"p_ptr": f"*{ty}", "g_ptr": f"*{ty}", "m_ptr": "*fp32", "v_ptr": "*fp32", "n": "i64",
                       **_SCALAR_SIG, "BLOCK": "constexpr"},
            constexprs={"BLOCK": _GPU_BLOCK_32},
            options={"num_warps": _GPU_WARPS_32, "enable_fp_fusion": False},
            launch_args={"n": _SPEC_NUMEL, **_SPEC_SCALARS}, regime="one tensor per launch (any n)",
            weight_elements_per_iteration=_GPU_BLOCK_32,
        ))
        specs.append(KernelSpec(
            name=f"adamw8bit_{ty}",
            fn=_adamw8bit_kernel,
            signature={"p_ptr": f"*{ty}", "g_ptr": f"*{ty}", "mq_ptr": "*u8", "mabs_ptr": "*fp32",
                       "vq_ptr": "*u8", "vabs_ptr": "*fp32", "smap_ptr": "*fp32", "smid_ptr": "*fp32",
                       "umap_ptr": "*fp32", "umid_ptr": "*fp32", "n": "i64", **_SCALAR_SIG,
                       "QBLOCK": "constexpr", "QBLOCKS": "constexpr", "SIGNED_ZERO": "constexpr",
                       "UNSIGNED_ZERO": "constexpr"},
            constexprs={"QBLOCK": QBLOCK, "QBLOCKS": _GPU_QBLOCKS_8, "SIGNED_ZERO": zero_code(True),
                        "UNSIGNED_ZERO": zero_code(False)},
            options={"num_warps": _GPU_WARPS_8, "enable_fp_fusion": False},
            launch_args={"n": _SPEC_NUMEL, **_SPEC_SCALARS}, regime="one tensor per launch (any n)",
            weight_elements_per_iteration=QBLOCK * _GPU_QBLOCKS_8,
        ))
        specs.append(KernelSpec(
            name=f"adamw32_multi_{ty}",
            fn=_adamw32_multi_kernel,
            signature={"table_ptr": "*i64", "work_ptr": "*i64", **_SCALAR_SIG, "P_DTYPE": "constexpr",
                       "G_DTYPE": "constexpr", "BLOCK": "constexpr", "ROWS": "constexpr"},
            constexprs={"P_DTYPE": _TL_DTYPES[dtype], "G_DTYPE": _TL_DTYPES[dtype], "BLOCK": _GPU_BLOCK_32,
                        "ROWS": 0},
            options={"num_warps": _GPU_WARPS_32, "enable_fp_fusion": False},
            launch_args=dict(_SPEC_SCALARS), regime=multi_regime, weight_elements_per_iteration=_GPU_BLOCK_32,
        ))
        specs.append(KernelSpec(
            name=f"adamw8bit_multi_{ty}",
            fn=_adamw8bit_multi_kernel,
            signature={"table_ptr": "*i64", "work_ptr": "*i64", "smap_ptr": "*fp32", "smid_ptr": "*fp32",
                       "umap_ptr": "*fp32", "umid_ptr": "*fp32", **_SCALAR_SIG, "P_DTYPE": "constexpr",
                       "G_DTYPE": "constexpr", "QBLOCK": "constexpr", "QBLOCKS": "constexpr",
                       "SIGNED_ZERO": "constexpr", "UNSIGNED_ZERO": "constexpr", "ROWS": "constexpr"},
            constexprs={"P_DTYPE": _TL_DTYPES[dtype], "G_DTYPE": _TL_DTYPES[dtype], "QBLOCK": QBLOCK,
                        "QBLOCKS": _GPU_QBLOCKS_8, "SIGNED_ZERO": zero_code(True),
                        "UNSIGNED_ZERO": zero_code(False), "ROWS": False},
            options={"num_warps": _GPU_WARPS_8_MULTI, "enable_fp_fusion": False},
            launch_args=dict(_SPEC_SCALARS), regime=multi_regime,
            weight_elements_per_iteration=QBLOCK * _GPU_QBLOCKS_8,
        ))
    return specs
