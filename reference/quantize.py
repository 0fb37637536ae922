"""Oracle of blockwise 4-bit and 8-bit quantization and of double quantization of the scales.

- :func:`quantize_4bit` ``(x, code(16,), blocksize)`` -> ``packed`` uint8 ``(ceil(n/2),)``, ``absmax`` float32
  ``(ceil(n/blocksize),)``; :func:`dequantize_4bit` inverts it to float32 of ``shape``.
- :func:`quantize_8bit` / :func:`dequantize_8bit`: the same with one uint8 code per element.
- :func:`double_quantize` ``(absmax(m,), blocksize=256)`` -> ``qabsmax`` uint8 ``(m,)``, ``absmax2`` float32,
  ``offset`` np.float32; :func:`double_dequantize` inverts it.

The rules (the reciprocal scale, nearest code with ties to the lower one, nibble order and padding, zero and
subnormal blocks, the order-independent offset, two roundings when decoding nested scales) are docs/SPEC.md
sections 2 and 3; this file computes them step by step in the order SPEC states them.
"""

from __future__ import annotations

import math
import numbers
from functools import lru_cache

import numpy as np

from .codebook import dynamic_map

__all__ = [
    "BLOCKSIZES",
    "quantize_4bit",
    "dequantize_4bit",
    "quantize_8bit",
    "dequantize_8bit",
    "double_quantize",
    "double_dequantize",
]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256


# --------------------------------------------------------------------------------------------------------
# Argument checks: each error names the argument.
# --------------------------------------------------------------------------------------------------------


def _check_array(name: str, a, dtype=None) -> None:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if dtype is not None and a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {a.dtype.name}")


def _check_float_input(name: str, x) -> np.ndarray:
    """x as a flat float32 array; rejects non-float dtypes and values that are or become NaN/Inf."""
    _check_array(name, x)
    if x.dtype.kind != "f":
        raise TypeError(f"{name} must have a floating dtype (float16, float32 or float64), got {x.dtype.name}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf")
    with np.errstate(over="ignore"):
        flat = x.astype(np.float32).reshape(-1)  # reshape(-1) of a C-order copy: row-major order
    if not np.isfinite(flat).all():
        raise ValueError(f"{name} has values beyond the float32 range")
    return flat


def _check_blocksize(blocksize, name: str = "blocksize") -> int:
    if isinstance(blocksize, (bool, np.bool_)) or not isinstance(blocksize, numbers.Integral):
        raise ValueError(f"{name} must be one of {BLOCKSIZES}, got {blocksize!r}")
    if int(blocksize) not in BLOCKSIZES:
        raise ValueError(f"{name} must be one of {BLOCKSIZES}, got {blocksize!r}")
    return int(blocksize)


def _check_code(code, length: int) -> np.ndarray:
    _check_array("code", code, np.float32)
    if code.shape != (length,):
        raise ValueError(f"code must have shape ({length},), got {code.shape}")
    if not np.isfinite(code).all():
        raise ValueError("code contains NaN or Inf")
    if (np.diff(code) < 0).any():
        raise ValueError("code must be sorted ascending")
    return code


def _check_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, numbers.Integral) and not isinstance(shape, (bool, np.bool_)):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)) or not all(
        isinstance(d, numbers.Integral) and not isinstance(d, (bool, np.bool_)) for d in shape
    ):
        raise TypeError(f"shape must be a tuple of integers, got {shape!r}")
    if any(d < 0 for d in shape):
        raise ValueError(f"shape must have non-negative dimensions, got {tuple(shape)}")
    return tuple(int(d) for d in shape)


def _check_scales(name: str, absmax, expected: int) -> np.ndarray:
    _check_array(name, absmax, np.float32)
    if absmax.size != expected:
        raise ValueError(f"{name} must have {expected} entries, got {absmax.size}")
    absmax = absmax.reshape(-1)
    if not np.isfinite(absmax).all():
        raise ValueError(f"{name} contains NaN or Inf")
    if (absmax < 0).any():
        raise ValueError(f"{name} must be non-negative")
    return absmax


def _check_codes(name: str, codes, expected: int) -> np.ndarray:
    _check_array(name, codes, np.uint8)
    if codes.size != expected:
        raise ValueError(f"{name} must have {expected} entries for the given shape, got {codes.size}")
    return codes.reshape(-1)


def _check_offset(offset) -> np.float32:
    if isinstance(offset, (bool, np.bool_)) or not isinstance(offset, numbers.Real):
        raise TypeError(f"offset must be a real number, got {type(offset).__name__}")
    if not math.isfinite(offset):
        raise ValueError(f"offset must be finite, got {offset!r}")
    offset32 = np.float32(offset)
    if float(offset32) != float(offset):
        raise ValueError(f"offset must be exactly representable in float32, got {offset!r}")
    return offset32


def _num_blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


# --------------------------------------------------------------------------------------------------------
# The blockwise rule shared by 4-bit and 8-bit.
# --------------------------------------------------------------------------------------------------------


def _midpoints(code: np.ndarray) -> np.ndarray:
    return (code[:-1] + code[1:]) / np.float32(2)  # float32 sum, then a halving (exact unless subnormal)


def _code_of(s, midpoints: np.ndarray) -> np.ndarray:
    """Number of midpoints strictly below s: nearest code, ties to the lower one."""
    return np.searchsorted(midpoints, s, side="left")


def _quantize_blocks(flat: np.ndarray, code: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """flat float32 (n,) -> codes int64 (n,), absmax float32 (nblocks,)."""
    n = flat.size
    nblocks = _num_blocks(n, blocksize)
    blocks = np.zeros((nblocks, blocksize), dtype=np.float32)  # zero padding cannot raise a block's absmax
    blocks.reshape(-1)[:n] = flat

    absmax = np.abs(blocks).max(axis=1, initial=np.float32(0))
    with np.errstate(divide="ignore", over="ignore"):
        reciprocal = np.float32(1) / absmax
    usable = np.isfinite(reciprocal)
    # float32 multiply; a block without a finite reciprocal gets s = 0 (x * 0, x finite) throughout
    scaled = blocks * np.where(usable, reciprocal, np.float32(0))[:, None]

    codes = _code_of(scaled.reshape(-1)[:n], _midpoints(code))
    return codes, absmax


def _dequantize_blocks(codes: np.ndarray, absmax: np.ndarray, code: np.ndarray, blocksize: int) -> np.ndarray:
    """codes (n,), absmax float32 (nblocks,) -> float32 (n,): code[q] * absmax[block] in float32."""
    scales = np.repeat(absmax, blocksize)[: codes.size]
    return code[codes] * scales


# --------------------------------------------------------------------------------------------------------
# 4-bit
# --------------------------------------------------------------------------------------------------------


def quantize_4bit(x: np.ndarray, code: np.ndarray, blocksize: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise 4-bit quantization of ``x`` (any float dtype, any shape) with the 16-entry float32 ``code``.

    Returns ``packed`` uint8 ``(ceil(n/2),)`` (element 2i in the high nibble, 2i+1 in the low one, an odd n
    padded with the code of 0.0) and ``absmax`` float32 ``(ceil(n/blocksize),)``.
    """
    flat = _check_float_input("x", x)
    code = _check_code(code, 16)
    blocksize = _check_blocksize(blocksize)

    codes, absmax = _quantize_blocks(flat, code, blocksize)
    if codes.size % 2:
        codes = np.append(codes, _code_of(np.float32(0), _midpoints(code)))
    pairs = codes.astype(np.uint8).reshape(-1, 2)
    packed = (pairs[:, 0] << 4) | pairs[:, 1]
    return packed.astype(np.uint8), absmax


def dequantize_4bit(
    packed: np.ndarray, absmax: np.ndarray, code: np.ndarray, shape, blocksize: int = 64
) -> np.ndarray:
    """float32 array of ``shape`` from ``packed`` uint8 ``(ceil(n/2),)`` and ``absmax`` float32
    ``(ceil(n/blocksize),)``, ``n = prod(shape)``: ``code[q] * absmax[block]`` in float32."""
    shape = _check_shape(shape)
    n = math.prod(shape)
    blocksize = _check_blocksize(blocksize)
    packed = _check_codes("packed", packed, _num_blocks(n, 2))
    absmax = _check_scales("absmax", absmax, _num_blocks(n, blocksize))
    code = _check_code(code, 16)

    codes = np.stack([packed >> 4, packed & 0x0F], axis=1).reshape(-1)[:n]
    return _dequantize_blocks(codes, absmax, code, blocksize).reshape(shape)


# --------------------------------------------------------------------------------------------------------
# 8-bit
# --------------------------------------------------------------------------------------------------------


def quantize_8bit(x: np.ndarray, code: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise 8-bit quantization of ``x`` (any float dtype, any shape) with the 256-entry float32 ``code``
    (a dynamic map). Returns ``codes`` uint8 ``(n,)`` and ``absmax`` float32 ``(ceil(n/blocksize),)``."""
    flat = _check_float_input("x", x)
    code = _check_code(code, 256)
    blocksize = _check_blocksize(blocksize)

    codes, absmax = _quantize_blocks(flat, code, blocksize)
    return codes.astype(np.uint8), absmax


def dequantize_8bit(codes: np.ndarray, absmax: np.ndarray, code: np.ndarray, shape, blocksize: int) -> np.ndarray:
    """float32 array of ``shape`` from ``codes`` uint8 ``(n,)`` and ``absmax`` float32 ``(ceil(n/blocksize),)``."""
    shape = _check_shape(shape)
    n = math.prod(shape)
    blocksize = _check_blocksize(blocksize)
    codes = _check_codes("codes", codes, n)
    absmax = _check_scales("absmax", absmax, _num_blocks(n, blocksize))
    code = _check_code(code, 256)

    return _dequantize_blocks(codes, absmax, code, blocksize).reshape(shape)


# --------------------------------------------------------------------------------------------------------
# Double quantization
# --------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _signed_dynamic_map() -> np.ndarray:
    table = dynamic_map(signed=True)
    table.setflags(write=False)
    return table


def double_quantize(absmax: np.ndarray, blocksize: int = NESTED_BLOCKSIZE) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """Quantize the float32 scales ``absmax`` ``(m,)``: returns ``qabsmax`` uint8 ``(m,)``, ``absmax2`` float32
    ``(ceil(m/blocksize),)`` and ``offset`` (np.float32, the mean of ``absmax``)."""
    _check_array("absmax", absmax, np.float32)
    absmax = _check_scales("absmax", absmax, absmax.size)
    blocksize = _check_blocksize(blocksize)
    if absmax.size == 0:
        return np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.float32), np.float32(0.0)

    offset = np.float32(math.fsum(absmax.astype(np.float64)) / absmax.size)  # float64 sum and division
    centered = absmax - offset  # float32 subtraction
    qabsmax, absmax2 = quantize_8bit(centered, _signed_dynamic_map(), blocksize)
    return qabsmax, absmax2, offset


def double_dequantize(
    qabsmax: np.ndarray, absmax2: np.ndarray, offset, blocksize: int = NESTED_BLOCKSIZE
) -> np.ndarray:
    """float32 ``(m,)`` scales from ``qabsmax`` uint8 ``(m,)``, ``absmax2`` float32 ``(ceil(m/blocksize),)`` and
    ``offset``: ``dyn[q] * absmax2[j // blocksize]`` rounded to float32, then ``+ offset`` rounded to float32."""
    _check_array("qabsmax", qabsmax, np.uint8)
    blocksize = _check_blocksize(blocksize)
    qabsmax = qabsmax.reshape(-1)
    m = qabsmax.size
    _check_array("absmax2", absmax2, np.float32)
    expected = _num_blocks(m, blocksize)
    if absmax2.size != expected:
        raise ValueError(
            f"absmax2 must have ceil(len(qabsmax) / blocksize) = {expected} entries for {m} qabsmax codes, "
            f"got {absmax2.size}"
        )
    absmax2 = _check_scales("absmax2", absmax2, expected)
    offset = _check_offset(offset)

    product = _dequantize_blocks(qabsmax, absmax2, _signed_dynamic_map(), blocksize)  # first rounding
    return product + offset  # a separate float32 add: the second rounding
