"""Oracle of the QLoRA linear layer (docs/SPEC.md section 6), in float64 NumPy.

``W`` (N, K) arrives already dequantized; the oracle fixes the layer's arithmetic around it: ``y = x @ W^T +
scaling * ((x * mask) @ A^T) @ B^T + bias`` and its gradients dx, dA, dB, dbias (W is frozen). ``mask`` is the
dropout keep mask scaled by ``1/(1-p)``; leading dimensions of ``x`` are flattened to M rows and restored.

Every float input is converted to float64 and every result is float64; tests compare the kernels (bf16/fp16 with
float32 accumulation) to it with bounds derived from those roundings. Non-finite values propagate as IEEE
arithmetic makes them (docs/DESIGN.md, non-finite values).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["qlora_linear_forward", "qlora_linear_backward"]


def _float64(name: str, a) -> np.ndarray:
    """``a`` as float64; rejects non-arrays and non-float dtypes, naming the argument."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must have a float dtype (float16, float32, float64), got {a.dtype}")
    return a.astype(np.float64, copy=False)


def _check_scaling(scaling) -> float:
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling must be a real number, got {type(scaling).__name__}")
    if not math.isfinite(float(scaling)):
        raise ValueError(f"scaling must be finite, got {scaling}")
    return float(scaling)


def _check_layer(x, w, lora_a, lora_b, dropout_mask):
    """Validate the operands shared by forward and backward; return them as float64 arrays."""
    x = _float64("x", x)
    w = _float64("w", w)
    lora_a = _float64("lora_a", lora_a)
    lora_b = _float64("lora_b", lora_b)
    if x.ndim < 1:
        raise ValueError("x must have shape (..., K), got a 0-dimensional array")
    if w.ndim != 2:
        raise ValueError(f"w must have shape (N, K), got {w.shape}")
    n_out, k_in = w.shape
    if x.shape[-1] != k_in:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but w has K={k_in} (w shape {w.shape})")
    if lora_a.ndim != 2 or lora_a.shape[1] != k_in:
        raise ValueError(f"lora_a must have shape (r, K={k_in}), got {lora_a.shape}")
    rank = lora_a.shape[0]
    if lora_b.shape != (n_out, rank):
        raise ValueError(f"lora_b must have shape (N={n_out}, r={rank}), got {lora_b.shape}")
    if dropout_mask is None:
        x_dropped, mask = x, None
    else:
        mask = _float64("dropout_mask", dropout_mask)
        if mask.shape != x.shape:
            raise ValueError(f"dropout_mask must have the shape of x {x.shape}, got {mask.shape}")
        if not np.all(np.isfinite(mask)):
            raise ValueError("dropout_mask must be finite (it holds 0 or 1/(1-p) with p < 1)")
        if np.any(mask < 0):
            raise ValueError("dropout_mask must be non-negative (it holds 0 or 1/(1-p))")
        x_dropped = x * mask
    return x, w, lora_a, lora_b, mask, x_dropped


def qlora_linear_forward(x, w, lora_a, lora_b, scaling, bias=None, dropout_mask=None) -> np.ndarray:
    """QLoRA linear forward in float64.

    Args:
        x: float array ``(..., K)``, any number of leading dimensions (possibly of size 0).
        w: float array ``(N, K)``, the dequantized base weight.
        lora_a: float array ``(r, K)``; ``r`` may be 0 (no adapter).
        lora_b: float array ``(N, r)``.
        scaling: finite real, ``lora_alpha / r``.
        bias: float array ``(N,)`` or None.
        dropout_mask: float array of ``x``'s shape holding 0 or ``1/(1-p)``, or None (no dropout).

    Returns:
        float64 array ``(..., N)``: ``x @ w.T + scaling * ((x*mask) @ lora_a.T) @ lora_b.T + bias``.
    """
    x, w, lora_a, lora_b, _, x_dropped = _check_layer(x, w, lora_a, lora_b, dropout_mask)
    scaling = _check_scaling(scaling)
    if bias is not None:
        bias = _float64("bias", bias)
        if bias.shape != (w.shape[0],):
            raise ValueError(f"bias must have shape (N={w.shape[0]},), got {bias.shape}")
    lead = x.shape[:-1]
    rows = math.prod(lead)  # explicit: reshape(-1, 0) is ambiguous when K or N is 0
    x2 = x.reshape(rows, x.shape[-1])
    xd2 = x_dropped.reshape(rows, x.shape[-1])
    # The LoRA product goes through the (M, r) intermediate, as SPEC writes it and the kernels run it.
    y = x2 @ w.T + scaling * ((xd2 @ lora_a.T) @ lora_b.T)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, w.shape[0])


def qlora_linear_backward(dy, x, w, lora_a, lora_b, scaling, dropout_mask=None):
    """QLoRA linear backward in float64 (SPEC section 6).

    Args:
        dy: float array ``(..., N)``, the gradient of the loss with respect to ``y``; its leading
            dimensions must equal those of ``x``.
        x, w, lora_a, lora_b, scaling, dropout_mask: as in :func:`qlora_linear_forward` (the same mask
            that the forward pass used).

    Returns:
        ``(dx, d_lora_a, d_lora_b, d_bias)``, float64, shapes ``(..., K)``, ``(r, K)``, ``(N, r)``,
        ``(N,)``. ``d_bias`` is returned whether or not the layer has a bias. There is no gradient for
        ``w``.
    """
    x, w, lora_a, lora_b, mask, x_dropped = _check_layer(x, w, lora_a, lora_b, dropout_mask)
    scaling = _check_scaling(scaling)
    dy = _float64("dy", dy)
    n_out, k_in = w.shape
    if dy.shape != x.shape[:-1] + (n_out,):
        raise ValueError(f"dy must have shape {x.shape[:-1] + (n_out,)} (x's leading dims, N), got {dy.shape}")
    rows = math.prod(x.shape[:-1])  # explicit: reshape(-1, 0) is ambiguous when K or N is 0
    dy2 = dy.reshape(rows, n_out)
    xd2 = x_dropped.reshape(rows, k_in)
    u = xd2 @ lora_a.T
    g = dy2 @ lora_b
    # The LoRA part of dx flows back through the dropout mask; the base part does not see dropout.
    dx_lora = scaling * (g @ lora_a)
    if mask is not None:
        dx_lora = dx_lora * mask.reshape(rows, k_in)
    dx = dy2 @ w + dx_lora
    d_lora_a = scaling * (g.T @ xd2)
    d_lora_b = scaling * (dy2.T @ u)
    d_bias = dy2.sum(axis=0)
    return dx.reshape(x.shape), d_lora_a, d_lora_b, d_bias
