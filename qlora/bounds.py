"""Derived elementwise error bounds of the QLoRA linear layer against the float64 oracle.

One bound, used by the tests (``tests/test_linear.py``, ``tests/test_device_pass.py``) and by ``qlora verify``. The
kernels see exactly the oracle's operands: x, A, B, bias and dy in the compute dtype, and W as the reference
dequantization rounded to that dtype (:func:`oracle_dense_weight`, what the kernels' dequantization produces,
into a buffer on the default path or inside the fused path's K loop). What remains is each kernel's own arithmetic, bounded from first principles (no constant is fitted to
measurements). With u32 = 2^-24 and u_d the unit roundoff of the compute dtype (round to nearest: 2^-24 float32,
2^-11 float16, 2^-8 bfloat16):

- a float32 sum of n terms in any order errs by at most n * u32 * sum |terms| (Higham, Accuracy and Stability of
  Numerical Algorithms, chapter 4, to first order: the exact factor 1 / (1 - n * u32) exceeds 1 by under 0.1%
  for the n < 2^14 of every check);
- products of bf16/fp16 operands are exact in float32 (8 + 8 or 11 + 11 significand bits <= 24); float32 products
  round once: one more u32 per term, in the same constants;
- the (M, r) intermediates u = dropout(x) @ A^T and g = dy @ B are accumulated in float32 and rounded once to the
  compute dtype before their second matmul, as an unfused LoRA's activations are: relative u_d of those terms;
- the dropout factor 1/(1-p), the scaling and the bias add are float32 operations: a few u32 each;
- each output is rounded once to the compute dtype: u_d * |exact|, and the accumulated error may itself be
  magnified by that rounding, a factor (1 + u_d); plus 2^-25 absolute (half the smallest fp16 subnormal spacing,
  for outputs that round into the subnormal range).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .reference import quantize as _ref_quantize

__all__ = ["U32", "UNIT_ROUNDOFF", "ABS_FLOOR", "elementwise_bound", "LinearBounds", "qlora_linear_bounds",
           "oracle_dense_weight"]

U32 = 2.0**-24
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
ABS_FLOOR = 2.0**-25


def elementwise_bound(exact: np.ndarray, abs_terms: np.ndarray, rel_of_terms: float, dtype: torch.dtype) -> np.ndarray:
    """``u_d * |exact| + (1 + u_d) * rel_of_terms * abs_terms + 2^-25``: the output rounding to ``dtype`` plus an
    accumulated error ``rel_of_terms`` relative to ``abs_terms`` (the same sums over |operands|), which the output
    rounding may magnify by ``1 + u_d``. Shapes broadcast; float64."""
    u_d = UNIT_ROUNDOFF[dtype]
    return u_d * np.abs(exact) + (1 + u_d) * rel_of_terms * abs_terms + ABS_FLOOR


@dataclass(frozen=True)
class LinearBounds:
    """Elementwise bounds on |kernel - oracle| for ``y`` (..., N), ``dx`` (..., K), ``d_lora_a`` (r, K),
    ``d_lora_b`` (N, r) and ``d_bias`` (N,) (None without a bias)."""

    y: np.ndarray
    dx: np.ndarray
    d_lora_a: np.ndarray
    d_lora_b: np.ndarray
    d_bias: np.ndarray | None


def qlora_linear_bounds(x, w, lora_a, lora_b, scaling: float, bias, mask, dy, dtype: torch.dtype,
                        y_exact: np.ndarray, dx_exact: np.ndarray, da_exact: np.ndarray, db_exact: np.ndarray,
                        dbias_exact: np.ndarray | None) -> LinearBounds:
    """The bounds of the module docstring for one forward and backward of ``qlora_linear`` in ``dtype``.

    Operands are float64 arrays holding the kernels' exact operands: ``x`` (..., K), ``w`` (N, K) from
    :func:`oracle_dense_weight`, ``lora_a`` (r, K), ``lora_b`` (N, r), ``bias`` (N,) or None, ``mask`` (..., K) the
    scaled dropout keep mask or None, ``dy`` (..., N); the ``*_exact`` arrays are the oracle's results.
    """
    m = math.prod(x.shape[:-1])
    n_out, k_in = w.shape
    r = lora_a.shape[0]
    u_d = UNIT_ROUNDOFF[dtype]
    s = abs(scaling)
    ax = np.abs(x).reshape(m, k_in)
    axd = ax if mask is None else ax * np.abs(mask).reshape(m, k_in)
    ady = np.abs(dy).reshape(m, n_out)
    aw, aa, ab = np.abs(w), np.abs(lora_a), np.abs(lora_b)

    # y = x @ W^T (K-term float32 sum) + s * u_rounded @ B^T (u: a K-term sum rounded u_d, then an r-term sum)
    # + bias (three more float32 roundings: the adds and the scaling).
    base = (ax @ aw.T).reshape(y_exact.shape)
    lora = (s * (axd @ aa.T) @ ab.T).reshape(y_exact.shape)
    bias_abs = 0.0 if bias is None else np.abs(bias)
    y = (elementwise_bound(y_exact, base, (k_in + 3) * U32, dtype)
         + elementwise_bound(0 * y_exact, lora, u_d + (k_in + r + 6) * U32, dtype) + 3 * U32 * bias_abs)
    # dx = dy @ W (N-term sum) + s/(1-p) * (g_rounded @ A) * keep (g: an N-term sum rounded u_d; an r-term sum).
    dx_base = (ady @ aw).reshape(dx_exact.shape)
    g_abs = ady @ ab
    dx_lora = s * (g_abs @ aa)
    if mask is not None:
        dx_lora = dx_lora * np.abs(mask).reshape(m, k_in)
    dx = (elementwise_bound(dx_exact, dx_base, (n_out + 3) * U32, dtype)
          + elementwise_bound(0 * dx_exact, dx_lora.reshape(dx_exact.shape), u_d + (n_out + r + 7) * U32, dtype))
    # dA = s/(1-p) * g_rounded^T @ (x * keep): an M-term sum of products of a rounded g.
    da = elementwise_bound(da_exact, s * g_abs.T @ axd, u_d + (m + n_out + 5) * U32, dtype)
    # dB = s * dy^T @ u_rounded: an M-term sum of products of a rounded u.
    db = elementwise_bound(db_exact, s * ady.T @ (axd @ aa.T), u_d + (m + k_in + 5) * U32, dtype)
    # dbias = the sum over M rows of dy, in float32.
    dbias = None if dbias_exact is None else elementwise_bound(dbias_exact, ady.sum(0), (m + 1) * U32, dtype)
    return LinearBounds(y, dx, da, db, dbias)


def oracle_dense_weight(weight, dtype: torch.dtype) -> np.ndarray:
    """The dense W the kernels multiply by, from the oracle: the reference dequantization of the NF4 ``weight``
    (a CPU :class:`~qlora.nf4.NF4Weight`) in float32, rounded to ``dtype`` by torch (round to nearest even), as a
    float64 array (out_features, in_features)."""
    absmax = weight.absmax.numpy()
    if weight.double_quant:
        absmax = _ref_quantize.double_dequantize(absmax, weight.absmax2.numpy(), np.float32(weight.offset),
                                                 weight.nested_blocksize)
    w32 = _ref_quantize.dequantize_4bit(weight.packed.numpy(), absmax, weight.code.numpy(), tuple(weight.shape),
                                        weight.blocksize)
    return torch.from_numpy(np.ascontiguousarray(w32)).to(dtype).to(torch.float64).numpy()
