"""Integer helpers of the launchers' host code, which runs on every call.

``triton.cdiv`` and ``triton.next_power_of_2`` are Triton ``constexpr_function``s: callable from Python, but each
call goes through Triton's wrapper and costs a microsecond or two, and a small layer's forward + backward made
dozens of them. These are the same integer functions in plain Python.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n for n >= 1 (0 for n <= 0), as ``triton.next_power_of_2``."""
    n = int(n)
    return 0 if n <= 0 else 1 << (n - 1).bit_length()
