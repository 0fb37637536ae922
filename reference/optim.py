"""Oracle for the optimizers (SPEC section 7): AdamW in float64, and 8-bit AdamW in exact float32.

:func:`adamw_step` is PyTorch's ``torch.optim.AdamW`` (decoupled decay applied BEFORE the update) written
in float64. :func:`adamw8bit_step` keeps both moments blockwise-quantized to 8 bits and fixes every float32
rounding of the step, so that a float32 GPU kernel reproduces it bit for bit; its docstring is the
contract that kernel follows.

Steps are counted from 1: ``step`` is the number of the step being taken (the first call passes 1), as
PyTorch's state counter reads after its increment. Non-finite gradients are not rejected: as in PyTorch
they propagate through IEEE arithmetic into the moments and the parameter.
"""

from __future__ import annotations

import math
import numbers
from functools import lru_cache

import numpy as np

from .codebook import dynamic_map
from .quantize import dequantize_8bit, quantize_8bit

__all__ = ["adamw_step", "adamw8bit_step"]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def _array(name: str, a, dtypes=None) -> np.ndarray:
    """Reject non-arrays and dtypes outside ``dtypes`` (default: any float dtype), naming the argument."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if dtypes is None:
        if a.dtype.kind != "f":
            raise TypeError(f"{name} must have a float dtype (float16, float32, float64), got {a.dtype}")
    elif a.dtype not in dtypes:
        allowed = ", ".join(str(np.dtype(d)) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {a.dtype}")
    return a


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_hyper(step, lr, betas, eps, weight_decay):
    """Validate the hyperparameters; return them as ``(step, lr, b1, b2, eps, weight_decay)`` Python numbers."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an integer, got {type(step).__name__}")
    if step < 1:
        raise ValueError(f"step must be >= 1 (the first step is 1), got {step}")
    lr = _real("lr", lr)
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    b1, b2 = _real("betas[0]", betas[0]), _real("betas[1]", betas[1])
    for name, b in (("betas[0]", b1), ("betas[1]", b2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {b}")
    eps = _real("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    weight_decay = _real("weight_decay", weight_decay)
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    return int(step), lr, b1, b2, eps, weight_decay


def adamw_step(p, g, m, v, step, lr, betas, eps, weight_decay):
    """One step of PyTorch's AdamW, in float64.

    Args:
        p, g, m, v: float arrays of one shape (any float dtype; converted to float64): the parameter, its
            gradient, and the first and second moments before the step (zeros before step 1).
        step: int >= 1, the number of this step (1 on the first call).
        lr: learning rate >= 0. betas: ``(b1, b2)``, each in [0, 1). eps >= 0. weight_decay >= 0.

    Returns:
        ``(p, m, v)``: new float64 arrays of ``p``'s shape (the inputs are not modified)::

            p = p * (1 - lr*wd)
            m = b1*m + (1-b1)*g
            v = b2*v + (1-b2)*g*g
            p = p - lr/(1 - b1**t) * (m / (sqrt(v)/sqrt(1 - b2**t) + eps))

        which is ``p -= lr * (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps)`` grouped as PyTorch groups it.
    """
    arrays = {name: _array(name, a).astype(np.float64) for name, a in (("p", p), ("g", g), ("m", m), ("v", v))}
    for name in ("g", "m", "v"):
        if arrays[name].shape != arrays["p"].shape:
            raise ValueError(f"{name} must have the shape of p {arrays['p'].shape}, got {arrays[name].shape}")
    step, lr, b1, b2, eps, weight_decay = _check_hyper(step, lr, betas, eps, weight_decay)
    p, g, m, v = arrays["p"], arrays["g"], arrays["m"], arrays["v"]
    step_size = lr / (1.0 - b1**step)
    bc2_sqrt = math.sqrt(1.0 - b2**step)
    with np.errstate(all="ignore"):  # NaN/Inf gradients propagate, as in PyTorch
        p = p * (1.0 - lr * weight_decay)
        m = b1 * m + (1.0 - b1) * g
        v = b2 * v + (1.0 - b2) * (g * g)
        p = p - step_size * (m / (np.sqrt(v) / bc2_sqrt + eps))
    return p, m, v


def _host_scalars(step, lr, b1, b2, eps, weight_decay) -> dict[str, np.float32]:
    """The per-step scalars of the 8-bit step: each computed in float64 (Python floats) and rounded once."""
    exact = {
        "decay": 1.0 - lr * weight_decay,
        "b1": b1,
        "b2": b2,
        "c1": 1.0 - b1,
        "c2": 1.0 - b2,
        "step_size": lr / (1.0 - b1**step),
        "bc2_sqrt": math.sqrt(1.0 - b2**step),
        "eps": eps,
    }
    with np.errstate(over="ignore"):
        rounded = {name: np.float32(value) for name, value in exact.items()}
    for name, value in rounded.items():
        if not np.isfinite(value):
            raise ValueError(
                f"lr, eps and weight_decay must keep the step's float32 scalars finite; {name} = {exact[name]!r} "
                "overflows float32"
            )
    return rounded


@lru_cache(maxsize=2)
def _state_map(signed: bool) -> np.ndarray:
    """The dynamic map of a moment, built once (read-only)."""
    table = dynamic_map(signed=signed)
    table.setflags(write=False)
    return table


def _block_view(x: np.ndarray, blocksize: int) -> np.ndarray:
    """``x`` (n,) zero-padded to whole blocks, shape (nblocks, blocksize)."""
    padded = np.zeros(-(-x.size // blocksize) * blocksize, dtype=x.dtype)
    padded[: x.size] = x
    return padded.reshape(-1, blocksize)


def _decode(codes: np.ndarray, absmax: np.ndarray, table: np.ndarray, blocksize: int) -> np.ndarray:
    """float32 (n,): ``table[code] * absmax[block]``; a block with absmax NaN decodes to NaN throughout."""
    poisoned = np.isnan(absmax)
    values = dequantize_8bit(codes, np.where(poisoned, np.float32(0), absmax), table, (codes.size,), blocksize)
    return np.where(np.repeat(poisoned, blocksize)[: codes.size], np.float32(np.nan), values)


def _encode(x: np.ndarray, table: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """``quantize_8bit`` of float32 (n,), extended to non-finite values: a block holding NaN or Inf is stored
    as the codes of 0.0 with absmax NaN (what ``quantize_8bit`` writes for an all-zero block, then NaN)."""
    poisoned = ~np.isfinite(_block_view(x, blocksize)).all(axis=1)
    clean = np.where(np.repeat(poisoned, blocksize)[: x.size], np.float32(0), x)
    codes, absmax = quantize_8bit(clean, table, blocksize)
    return codes, np.where(poisoned, np.float32(np.nan), absmax).astype(np.float32)


def adamw8bit_step(p, g, m_codes, m_absmax, v_codes, v_absmax, step, lr, betas, eps, weight_decay, blocksize=256):
    """One AdamW step with 8-bit blockwise-quantized moments, in float32 rounded exactly as stated here.

    This is the contract of the 8-bit GPU kernel, which must reproduce it bit for bit.

    Args:
        p: float32 or float16 array, any shape, ``n`` elements. A bfloat16 parameter is passed as the float32
            array of its values (exact), and the caller rounds the returned float32 to bfloat16 (round to
            nearest, ties to even), which is what a kernel storing ``p.to(bfloat16)`` does.
        g: float32 or float16 array of ``p``'s shape (bfloat16 gradients: pass their float32 values).
        m_codes: uint8 ``(n,)``, first moment as codes of ``dynamic_map(signed=True)``, elements in
            ``p``'s row-major order.
        m_absmax: float32 ``(ceil(n / blocksize),)``, one scale per block of ``blocksize`` consecutive
            elements (the last block may be partial).
        v_codes, v_absmax: the second moment likewise, with ``dynamic_map(signed=False)``.
        step, lr, betas, eps, weight_decay: as in :func:`adamw_step`.
        blocksize: state block size, 256 in the optimizers (SPEC 7); 32..4096 (powers of two) accepted.

    Returns:
        ``(p, m_codes, m_absmax, v_codes, v_absmax)``, new arrays: ``p`` in ``p``'s dtype and shape, the
        states in the shapes and dtypes above.

    Arithmetic. Host side, per step, each scalar computed in float64 (Python floats) and rounded ONCE to
    float32::

        decay = f32(1 - lr*wd)    c1 = f32(1 - b1)    c2 = f32(1 - b2)
        step_size = f32(lr / (1 - b1**t))    bc2_sqrt = f32(sqrt(1 - b2**t))
        b1, b2, eps = f32(b1), f32(b2), f32(eps)

    (a value that overflows float32 is rejected with ValueError). Per element, in float32, every operation
    rounded on its own to nearest-even: no fused multiply-add (launch with ``enable_fp_fusion=False``),
    and division and square root correctly rounded (IEEE 754; in Triton ``tl.div_rn`` / ``tl.sqrt_rn``,
    since ``/`` and ``tl.sqrt`` may be approximate on GPUs)::

        p32 = f32(p);  g32 = f32(g)                      (exact for float16/bfloat16/float32)
        m = smap[m_code] * m_absmax[block];  v = umap[v_code] * v_absmax[block]
        p32 = p32 * decay
        m = (b1 * m) + (c1 * g32)
        v = (b2 * v) + (c2 * (g32 * g32))
        denom = (sqrt(v) / bc2_sqrt) + eps
        p32 = p32 - (step_size * (m / denom))

    then ``m`` and ``v`` are requantized blockwise with ``quantize_8bit`` and ``blocksize``: absmax =
    max |x| of the block (float32, exact); code = number of float32 midpoints ``(map[i] + map[i+1]) / 2``
    of the sorted map strictly below ``x * (1/absmax)`` (reciprocal rounded to float32, then a float32
    multiply); a block whose ``1/absmax`` is not finite takes the code of 0.0 everywhere, which is 127 in
    the signed map and 0 in the unsigned one. ``p32`` is rounded to ``p``'s dtype (to nearest, ties to
    even). A fresh state (before step 1) is all codes of 0.0 with absmax 0, i.e.
    ``quantize_8bit(zeros, map, blocksize)``.

    Non-finite values are not rejected; they propagate, as in PyTorch. In ``p`` they stay elementwise (IEEE
    arithmetic). A quantized block cannot hold one element's NaN or Inf, so a block of ``m`` or ``v`` whose
    updated value holds a NaN or an infinity anywhere is stored as the codes of 0.0 with absmax NaN, and
    it decodes to NaN throughout at the next step (``map[q] * NaN``): the whole block, and so the parameters
    it serves, turn NaN from the next step on. (An overflow of ``g*g`` to Inf poisons its block the same way.)

    SPEC 7 keeps float32 states for parameters under 4096 elements; that choice belongs to the optimizer,
    and this step computes any size it is given.
    """
    p = _array("p", p, (np.float32, np.float16))
    g = _array("g", g, (np.float32, np.float16))
    if g.shape != p.shape:
        raise ValueError(f"g must have the shape of p {p.shape}, got {g.shape}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    n = p.size
    nblocks = -(-n // blocksize)
    for name, codes, absmax in (("m", m_codes, m_absmax), ("v", v_codes, v_absmax)):
        _array(f"{name}_codes", codes, (np.uint8,))
        _array(f"{name}_absmax", absmax, (np.float32,))
        if codes.shape != (n,):
            raise ValueError(f"{name}_codes must have shape ({n},) (one code per element of p), got {codes.shape}")
        if absmax.shape != (nblocks,):
            raise ValueError(
                f"{name}_absmax must have shape ({nblocks},) (one scale per {blocksize} elements), got {absmax.shape}"
            )
        if np.any(absmax < 0) or np.any(np.isinf(absmax)):
            raise ValueError(f"{name}_absmax must be finite and non-negative, or NaN (it holds max |x| per block)")
    step, lr, b1, b2, eps, weight_decay = _check_hyper(step, lr, betas, eps, weight_decay)
    s = _host_scalars(step, lr, b1, b2, eps, weight_decay)

    signed_map, unsigned_map = _state_map(True), _state_map(False)
    m = _decode(m_codes, m_absmax, signed_map, blocksize)
    v = _decode(v_codes, v_absmax, unsigned_map, blocksize)
    p32 = p.reshape(n).astype(np.float32)
    g32 = g.reshape(n).astype(np.float32)
    # Every operand below is a float32 array or an np.float32 scalar, so NumPy computes and rounds each
    # operation in float32 and never fuses two of them.
    with np.errstate(all="ignore"):  # NaN/Inf gradients propagate
        p32 = p32 * s["decay"]
        m = (s["b1"] * m) + (s["c1"] * g32)
        v = (s["b2"] * v) + (s["c2"] * (g32 * g32))
        denom = (np.sqrt(v) / s["bc2_sqrt"]) + s["eps"]
        p32 = p32 - (s["step_size"] * (m / denom))
        p_new = p32.astype(p.dtype).reshape(p.shape)
    m_codes, m_absmax = _encode(m, signed_map, blocksize)
    v_codes, v_absmax = _encode(v, unsigned_map, blocksize)
    return p_new, m_codes, m_absmax, v_codes, v_absmax
