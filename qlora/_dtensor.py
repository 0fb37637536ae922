"""DTensor helpers shared by the layer, the FSDP storage (:mod:`qlora.distributed`) and the optimizers'
sharded state (:mod:`qlora.distributed_optim`), usable without importing ``torch.distributed``."""

from __future__ import annotations

import sys

import torch


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (none can exist before that module is imported)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (sharing its memory), else ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def bitcast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` reinterpreted as ``dtype`` of the same item size, sharing memory; a DTensor stays a DTensor with the
    same mesh, placements, global shape and stride (its local shard reinterpreted)."""
    if t.dtype == dtype:
        return t
    if is_dtensor(t):
        return type(t).from_local(t.to_local().view(dtype), t.device_mesh, t.placements, run_check=False,
                                  shape=t.shape, stride=t.stride())
    return t.view(dtype)
