"""Helpers shared by several test modules (imported as ``helpers``: pytest puts tests/ on sys.path, and the FSDP
worker script runs from this folder)."""

from __future__ import annotations

import torch


def nf4_equal(a, b) -> bool:
    """Two NF4 weights hold the same bits: shape, dtype, blocksizes, offset and every tensor (dtype and values)."""
    if (tuple(a.shape), a.dtype, a.blocksize, a.offset, a.nested_blocksize) != (
            tuple(b.shape), b.dtype, b.blocksize, b.offset, b.nested_blocksize):
        return False
    for name in ("packed", "absmax", "code", "absmax2", "nested_code"):
        x, y = getattr(a, name), getattr(b, name)
        if (x is None) != (y is None) or (x is not None and not (x.dtype == y.dtype and torch.equal(x, y))):
            return False
    return True
