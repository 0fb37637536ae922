"""Oracle of the codebooks (docs/SPEC.md sections 1 and 4), rebuilt the way bitsandbytes builds them.

- :func:`normal_float_codebook`: the NormalFloat tables (NF4 and its k-bit relatives), float32 ``(2**bits,)``.
- :func:`dynamic_map`: the 8-bit dynamic map of the 8-bit optimizers and of double quantization, float32 ``(256,)``.
- :func:`torch_linspace_float32`: torch's float32 ``linspace`` as its vectorized x86-64 CPU kernel computes it, each
  point one rounding of the exact ``start + step * i`` (a fused multiply-add). The separately rounded reading
  moves 42 of the 256 signed dynamic-map entries by one ulp; the fused one reproduces bitsandbytes' table and
  ``torch.linspace`` on x86-64 bit for bit (SPEC section 1, item 4).
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction

import numpy as np
from scipy.stats import norm

__all__ = ["normal_float_codebook", "dynamic_map", "torch_linspace_float32"]


def _round_to_float32(value: Fraction) -> np.float32:
    """The float32 nearest to the exact rational ``value``, ties to even: one rounding, no double rounding."""
    guess = np.float32(float(value))  # within one float32 ulp of the answer (two roundings at most)
    below = np.nextafter(guess, np.float32(-np.inf))
    above = np.nextafter(guess, np.float32(np.inf))

    def distance_then_odd(candidate: np.float32):
        return abs(Fraction(float(candidate)) - value), int(np.array(candidate).view(np.uint32)) & 1

    return min((below, guess, above), key=distance_then_odd)


def _fma_float32(a: np.float32, b: np.float32, c: np.float32) -> np.float32:
    """``a * b + c`` computed exactly and rounded once to float32 (a fused multiply-add)."""
    return _round_to_float32(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c)))


def torch_linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    """float32 ``(steps,)``: ``torch.linspace(start, end, steps)`` (float32, CPU, x86-64) replayed bit for bit.

    ``start`` and ``end`` are rounded to float32 first, as torch does with its Scalar arguments.
    """
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], dtype=np.float32)
    step = (end32 - start32) / np.float32(steps - 1)  # float32 subtraction, then float32 division
    halfway = steps // 2
    points = [
        _fma_float32(step, np.float32(i), start32)
        if i < halfway
        else _fma_float32(-step, np.float32(steps - 1 - i), end32)
        for i in range(steps)
    ]
    return np.array(points, dtype=np.float32)


def normal_float_codebook(bits: int = 4, offset: float = 0.9677083, use_extra_value: bool = True) -> np.ndarray:
    """The NormalFloat table NF``bits``: float32 ``(2**bits,)``, ascending, largest value exactly 1.0.

    bitsandbytes' ``create_normal_map`` generalized to ``bits`` in 2..8 (SPEC 1):

    - positive quantiles ``ppf(linspace(offset, 0.5, P + 1)[:-1])`` with ``P = 2**(bits-1)`` (asymmetric,
      ``use_extra_value=True``) or ``P = 2**(bits-1) - 1`` (symmetric);
    - negative quantiles ``-ppf(linspace(offset, 0.5, 2**(bits-1))[:-1])``: ``2**(bits-1) - 1`` of them;
    - zeros filling the table to ``2**bits`` entries: one exact zero (asymmetric) or two (symmetric, DESIGN.md);
    - linspace in float32 (:func:`torch_linspace_float32`), ``ppf`` in float64, cast to float32, sorted, divided
      by the largest value in float32.

    For ``bits=4`` with the defaults this is bit for bit the canonical NF4 table of SPEC 1 (code 7 is 0.0,
    code 15 is 1.0); the asymmetric tables all start at exactly -1.0.
    """
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    if isinstance(offset, bool) or not isinstance(offset, numbers.Real):
        raise TypeError(f"offset must be a real number, got {type(offset).__name__}")
    if not (math.isfinite(offset) and 0.5 < np.float32(offset) < 1.0):
        raise ValueError(f"offset must lie in (0.5, 1) after rounding to float32, got {offset!r}")
    if not isinstance(use_extra_value, (bool, np.bool_)):
        raise TypeError(f"use_extra_value must be a bool, got {type(use_extra_value).__name__}")

    half = 2 ** (bits - 1)
    num_positive = half if use_extra_value else half - 1
    num_negative = half - 1
    positive = norm.ppf(torch_linspace_float32(offset, 0.5, num_positive + 1)[:-1].astype(np.float64))
    negative = -norm.ppf(torch_linspace_float32(offset, 0.5, num_negative + 1)[:-1].astype(np.float64))
    zeros = np.zeros(2**bits - num_positive - num_negative)

    values = np.sort(np.concatenate([negative, zeros, positive]).astype(np.float32))
    return values / values.max()  # float32 / float32: one float32 rounding per entry


def dynamic_map(signed: bool = True) -> np.ndarray:
    """The 8-bit dynamic map: float32 ``(256,)``, ascending, largest value 1.0 (SPEC 4).

    bitsandbytes' ``create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)``: for exponent level
    ``i = 0..6``, the float32 midpoints ``(b[:-1] + b[1:]) / 2`` of ``b = linspace(0.1, 1, n_i)`` (float32,
    :func:`torch_linspace_float32`; ``n_i = 2**i + 1`` signed, ``2**(i+1) + 1`` unsigned), each multiplied in
    float32 by ``float32(10**(i - 6))``; signed maps add their negatives; then 0 and 1.0; sorted.
    Signed: 127 negatives (the most negative -0.992968738..., no -1.0), 0, 127 positives and 1.0.
    Unsigned: 0, 254 positives and 1.0.
    """
    if not isinstance(signed, (bool, np.bool_)):
        raise TypeError(f"signed must be a bool, got {type(signed).__name__}")
    levels = []
    for i in range(7):
        boundaries = torch_linspace_float32(0.1, 1.0, (2**i if signed else 2 ** (i + 1)) + 1)
        means = (boundaries[:-1] + boundaries[1:]) / np.float32(2)
        # bitsandbytes multiplies the float32 tensor by the Python number 10**(i-6), which torch rounds to
        # float32 before a float32 multiply; for i = 6 the factor is exactly 1.
        scaled = np.float32(10.0 ** (i - 6)) * means
        levels.append(scaled)
        if signed:
            levels.append(-scaled)
    levels.append(np.array([0.0, 1.0], dtype=np.float32))
    return np.sort(np.concatenate(levels)).astype(np.float32)
