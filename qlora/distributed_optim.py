"""The optimizers' state of sharded (DTensor) parameters: how :mod:`qlora.optim` saves and reloads it.

Each rank steps its local shard and keeps state shaped like it. ``state_dict()`` gives a sharded parameter's state
as DTensors: element-wise fields with the parameter's mesh, placements and global shape; each 8-bit ``*_absmax``
as a 2-D DTensor ``(shards, blocks of the largest shard)``, one zero-padded row per shard, sharded on dim 0, so it
reloads only onto the same sharding (DCP refuses any other from the shape). Decisions and what is tested:
``docs/FSDP.md`` ("Optimizers on sharded parameters"); the state fields themselves: ``docs/SPEC.md`` section 7.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ._dtensor import is_dtensor, local
from .kernels import optim as _kernels
from .paging import FieldSpec


def absmax_layout(p) -> tuple[int, tuple[int, int], list]:
    """How the per-shard 8-bit scales of the DTensor ``p`` are saved: ``(blocks per row, global shape,
    placements)``. Every rank's local scales are padded to the block count of the largest shard and form one row of
    a ``(shards, blocks per row)`` DTensor, sharded on dim 0 along the one mesh dimension that shards ``p``
    (replicated along the others)."""
    from torch.distributed.tensor import Replicate, Shard

    sharding = [(i, pl) for i, pl in enumerate(p.placements) if not isinstance(pl, Replicate)]
    if len(sharding) > 1 or (sharding and type(sharding[0][1]) is not Shard):
        raise ValueError(
            f"8-bit optimizer state of a parameter with placements {p.placements}: only one plain Shard placement "
            "(FSDP2's fully_shard on a 1-D mesh, or HSDP's (Replicate, Shard)) is supported")
    largest = list(p.shape)
    mesh_dim, ways = None, 1
    if sharding:
        mesh_dim, placement = sharding[0]
        ways = p.device_mesh.size(mesh_dim)
        largest[placement.dim] = -(-largest[placement.dim] // ways)
    per_rank = -(-math.prod(largest) // _kernels.QBLOCK)
    placements = [Shard(0) if i == mesh_dim else Replicate() for i in range(p.device_mesh.ndim)]
    return per_rank, (ways, per_rank), placements


def sharded_state(p, state: dict[str, Any], fields: Sequence[FieldSpec]) -> dict[str, Any]:
    """A new state dict entry for the DTensor parameter ``p`` whose local state (this rank's tensors) is
    ``state``: ``step`` as is, every field in ``fields`` as a DTensor laid out as the module docstring says."""
    dtensor = type(p)
    out = {"step": state["step"]}
    for f in fields:
        t = state[f.name]
        if f.unit == 1:
            out[f.name] = dtensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                             stride=p.stride())
        else:
            per_rank, shape, placements = absmax_layout(p)
            padded = t.new_zeros(1, per_rank)
            padded[0, : t.numel()] = t
            out[f.name] = dtensor.from_local(padded, p.device_mesh, placements, run_check=False, shape=shape,
                                             stride=(per_rank, 1))
    return out


def local_saved_field(p, t: torch.Tensor, f: FieldSpec, name: str) -> torch.Tensor:
    """This rank's part of field ``f`` of a saved state of the parameter ``p``: a DTensor saved by
    :func:`sharded_state` (checked to be laid out as ``p``'s state is), or, for an 8-bit scale of a sharded ``p``,
    one rank's padded row saved per rank; any other tensor is returned as is. ``name`` names it in errors."""
    if not is_dtensor(t):
        if is_dtensor(p) and f.unit != 1 and tuple(t.shape) == (1, absmax_layout(p)[0]):
            return t[0, : f.count(local(p).numel())]
        return t
    if not is_dtensor(p):
        raise ValueError(f"{name} is a DTensor but the parameter is not; load a gathered (plain) state dict")
    if f.unit == 1:
        shape, placements = tuple(p.shape), tuple(p.placements)
    else:
        _, shape, placements = absmax_layout(p)
        placements = tuple(placements)
    if tuple(t.shape) != shape or tuple(t.placements) != placements or t.device_mesh != p.device_mesh:
        raise ValueError(f"state_dict has a different parameter layout: {name} is a DTensor of shape "
                         f"{tuple(t.shape)} with placements {tuple(t.placements)}, expected {shape} with "
                         f"{placements} on the parameter's mesh (8-bit state reloads only onto the same sharding)")
    out = t.to_local()
    if f.unit != 1:
        out = out.reshape(-1)[: f.count(local(p).numel())]
    return out
