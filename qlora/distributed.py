"""Distributed QLoRA: the NF4 weight sharded by PyTorch's FSDP2, sharded checkpoints (DCP), and the export of a
trained sharded model to one bitsandbytes-format file plus a PEFT adapter.

The sharded side of :class:`~qlora.layers.QLoRALinear`'s parameters lives here (:class:`ShardedNF4Weight`, loading a
sharded state dict); the user entry points are :func:`set_quant_storage`, :func:`fully_shard_model`,
:func:`full_state_dict`, :func:`save_checkpoint` / :func:`load_checkpoint` and :func:`export_pretrained`. The
optimizers' sharded state layout is :mod:`qlora.distributed_optim`. Launch recipe, storage table and what is tested:
``docs/FSDP.md``. Every function that gathers is a collective: all ranks call it, in the same order.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from ._dtensor import bitcast, is_dtensor
from .bnb_format import (DTYPE_NAMES, SAFETENSORS_METADATA, NF4Fields, check_code_table, decode_quant_state,
                         is_quant_state_key, quant_state_key, tensors_for_safetensors)
from .interop import _check_model, _check_path, _lora_keys, _unique_layers
from .interop import save_adapter
from .layers import (_ABSMAX, _ABSMAX2, _CODE, _NESTED_CODE, _PACKED, QLoRALinear, _check_quant_storage,
                     _check_quant_storage_dtype)
from .nf4 import NF4Weight

__all__ = ["ShardedNF4Weight", "set_quant_storage", "fully_shard_model", "full_state_dict", "save_checkpoint",
           "load_checkpoint", "export_pretrained"]


# -- QLoRALinear's NF4 parameters while FSDP2 holds them sharded --------------------------------------------------

@dataclass(frozen=True)
class ShardedNF4Weight(NF4Fields):
    """What ``QLoRALinear.weight`` is while FSDP2 holds the layer's parameters sharded (outside forward/backward).

    ``packed`` (the packed bytes viewed as ``quant_storage``, global shape ``(ceil(n/2) / itemsize, 1)``), ``absmax``
    (uint8 ``(nblocks,)`` codes when double-quantized, else float32 scales) and ``absmax2`` (float32
    ``(ceil(nblocks/256),)``, double-quantized only) are DTensors of which this rank holds its shard; ``code``
    (float32 (16,)) and ``nested_code`` (float32 (256,) or None) are whole on every rank; ``blocksize``, ``shape``,
    ``dtype``, ``offset``, ``nested_blocksize`` as in :class:`~qlora.nf4.NF4Weight`. :meth:`full` gathers it.
    """

    def full(self) -> NF4Weight:
        """The whole weight on every rank (all-gathers each sharded tensor: a collective, all ranks must call)."""
        return NF4Weight(
            packed=self.packed.full_tensor().view(torch.uint8).reshape(-1), absmax=self.absmax.full_tensor(),
            code=self.code, blocksize=self.blocksize, shape=self.shape, dtype=self.dtype,
            absmax2=None if self.absmax2 is None else self.absmax2.full_tensor(), offset=self.offset,
            nested_code=self.nested_code, nested_blocksize=self.nested_blocksize)


def sharded_nf4_weight(layer: QLoRALinear) -> ShardedNF4Weight:
    """``layer.weight`` of a layer whose NF4 parameters are sharded DTensors."""
    m, params, buffers = layer._nf4_meta, layer._parameters, layer._buffers
    dq = m["double_quant"]
    return ShardedNF4Weight(
        packed=params[_PACKED].detach(),
        absmax=params[_ABSMAX].detach() if dq else bitcast(params[_ABSMAX].detach(), torch.float32),
        code=buffers[_CODE].view(torch.float32), blocksize=m["blocksize"], shape=m["shape"],
        dtype=m["dtype"], absmax2=bitcast(params[_ABSMAX2].detach(), torch.float32) if dq else None,
        offset=m["offset"] if dq else None,
        nested_code=buffers[_NESTED_CODE].view(torch.float32) if dq else None,
        nested_blocksize=m["nested_blocksize"])


@torch.no_grad()
def load_sharded_nf4(layer: QLoRALinear, state_dict, key: str) -> None:
    """Load the NF4 weight ``key`` of ``state_dict`` into ``layer``'s sharded (FSDP2) parameters, shard by shard;
    the quantization settings must be the layer's own (called by ``QLoRALinear._load_from_state_dict``).

    The sharded entries must be DTensors laid out like the parameters, as ``model.state_dict()`` (or
    ``get_model_state_dict``) of a sharded model gives them and a DCP load fills them; a whole NF4 weight loads
    before ``fully_shard`` (or through DCP, which reshards). Everything is checked before anything is written.
    """
    m = layer._nf4_meta
    dq = m["double_quant"]
    keys = layer._bnb_keys(key)  # packed, absmax, quant_map, [nested_absmax, nested_quant_map,] JSON
    for k in keys:
        if k not in state_dict:
            raise KeyError(f"state dict has no entry {k!r} (needed for the NF4 weight {key!r})")
    key_absmax, key_code, *key_nested, state_key = keys[1:]
    meta_tensor = state_dict[state_key]
    if is_dtensor(meta_tensor):
        meta_tensor = meta_tensor.full_tensor()
    meta = decode_quant_state(meta_tensor, state_key)
    want = dict(blocksize=m["blocksize"], dtype=DTYPE_NAMES[m["dtype"]], shape=list(m["shape"]))
    for field, value in want.items():
        if meta[field] != value:
            raise ValueError(f"JSON field {field!r} of {state_key!r} is {meta[field]!r}, but this sharded layer "
                             f"has {value!r}; a sharded layer only loads its own quantization layout")
    if ("nested_offset" in meta) != dq:
        raise ValueError(f"{state_key!r} is {'' if 'nested_offset' in meta else 'not '}double-quantized, this "
                         f"sharded layer is {'' if dq else 'not '}")
    params, buffers = layer._parameters, layer._buffers
    plan = [(params[_PACKED], key, layer.quant_storage),
            (params[_ABSMAX], key_absmax, torch.uint8 if dq else torch.float32)]
    codes = [(buffers[_CODE], key_code, (16,))]
    if dq:
        key_absmax2, key_nested_code = key_nested
        plan.append((params[_ABSMAX2], key_absmax2, torch.float32))
        codes.append((buffers[_NESTED_CODE], key_nested_code, (256,)))
    copies = []
    for param, name, dtype in plan:
        value = state_dict[name]
        if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.shape != param.shape:
            raise ValueError(f"entry {name!r} must be {dtype} of shape {tuple(param.shape)} for this sharded "
                             f"layer, got {getattr(value, 'dtype', type(value).__name__)} "
                             f"{tuple(getattr(value, 'shape', ()))}")
        copies.append((param.to_local(), _local_piece(param, bitcast(value, param.dtype), name)))
    for buffer, name, shape in codes:
        value = state_dict[name]
        if is_dtensor(value):
            value = value.full_tensor()
        check_code_table(f"state dict entry {name!r}", value, shape[0])
        copies.append((buffer, value.view(torch.int32)))
    for dst, src in copies:
        dst.copy_(src)
    if dq:
        m["offset"] = meta["nested_offset"]
    layer._nf4_view = None  # the offset changed: the next gathered forward builds a new view


def _local_piece(param, value: torch.Tensor, name: str) -> torch.Tensor:
    """This rank's shard of the DTensor ``value``, which must be laid out like the DTensor ``param``."""
    if not is_dtensor(value):
        raise ValueError(f"entry {name!r} is a whole tensor but the layer is sharded: load a whole NF4 weight before "
                         "fully_shard, or load a sharded checkpoint through DCP (qlora.distributed.load_checkpoint)")
    if value.device_mesh != param.device_mesh or tuple(value.placements) != tuple(param.placements):
        raise ValueError(f"entry {name!r} is sharded as {value.placements} on {value.device_mesh}, the parameter "
                         f"as {param.placements} on {param.device_mesh}")
    return value.to_local()


# -- entry points ---------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DistributedDataParallel wrapper (state dict keys without ``module.``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if _distributed() else 0


@contextmanager
def _quiet_single_process():
    """DCP warns that it assumes a single process when no process group is initialized; here that is the intent."""
    if _distributed():
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        yield


def set_quant_storage(model: nn.Module, quant_storage: torch.dtype = torch.uint8) -> nn.Module:
    """View the packed NF4 bytes of every :class:`QLoRALinear` in ``model`` as ``quant_storage`` (``torch.uint8``
    by default; see :meth:`QLoRALinear.set_quant_storage`). Every layer is checked before any changes; values,
    forward and the state dict's bytes are unchanged. Call before sharding. Returns ``model``.
    """
    _check_quant_storage_dtype(quant_storage)
    layers = _unique_layers(_check_model(_unwrap(model)))
    for name, layer in layers:  # refuse before changing anything
        if layer._sharded():
            raise RuntimeError(f"set_quant_storage must be called before fully_shard: layer {name!r} is sharded")
        try:
            _check_quant_storage(layer.weight, quant_storage)
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err}") from None
    for _, layer in layers:
        layer.set_quant_storage(quant_storage)
    return model


def fully_shard_model(model: nn.Module, blocks: Iterable[nn.Module] = (), *, mesh=None,
                      quant_storage: torch.dtype | None = None, **fully_shard_kwargs) -> nn.Module:
    """Shard ``model`` with FSDP2: ``torch.distributed.fsdp.fully_shard(block, mesh=mesh, **fully_shard_kwargs)``
    on each of ``blocks`` (e.g. the transformer layers, each one communication group) and finally on ``model``
    itself (the rest). ``quant_storage``: None keeps each :class:`QLoRALinear`'s own (uint8 unless set), a dtype is
    given to every layer first (:func:`set_quant_storage`). ``mesh``: a 1-D ``DeviceMesh`` (default:
    ``fully_shard``'s, over the default process group on the current accelerator; on CPU pass
    ``init_device_mesh("cpu", (world_size,))``). Returns ``model``.
    """
    from torch.distributed.fsdp import fully_shard

    layers = _unique_layers(_check_model(model))
    if any(layer._sharded() for _, layer in layers):
        raise RuntimeError("model is already sharded")
    if quant_storage is not None:
        set_quant_storage(model, quant_storage)
    for _, layer in layers:  # a cached view would keep each whole weight alive next to its shards
        layer._nf4_view = None
    for block in blocks:
        fully_shard(block, mesh=mesh, **fully_shard_kwargs)
    fully_shard(model, mesh=mesh, **fully_shard_kwargs)
    return model


def full_state_dict(model: nn.Module, *, cpu: bool = True) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every DTensor gathered into a whole tensor (CPU copies when ``cpu``).

    Collective: every rank must call it (it all-gathers each sharded entry, in state dict order); every rank gets
    the whole dict. NF4 weights appear under their bitsandbytes keys (``<M>.weight``, ``.absmax``, ``.quant_map``,
    ``.nested_absmax``, ``.nested_quant_map``, ``.quant_state.bitsandbytes__nf4``). A DDP wrapper is looked through.
    """
    out = {}
    for key, value in _unwrap(model).state_dict().items():
        if is_dtensor(value):
            value = value.full_tensor()
        out[key] = value.detach().cpu() if cpu else value.detach()
    return out


def _json_as_bytes(state: dict) -> dict:
    """The JSON quant states as ``bytes`` objects: DCP loads a tensor only into one of the saved size, and the
    JSON's length changes with the double-quantization offset; an object is loaded whatever its size."""
    return {k: bytes(v.tolist()) if is_quant_state_key(k) else v for k, v in state.items()}


def _json_as_tensors(state: dict) -> dict:
    return {k: torch.tensor(list(v), dtype=torch.uint8) if is_quant_state_key(k) else v
            for k, v in state.items()}


def _checkpoint_state(model: nn.Module, optimizer) -> tuple[nn.Module, dict]:
    """The unwrapped model and the state DCP saves or loads in place: ``{"model": ..., "optim": ...}``."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = _unwrap(model)
    state = {"model": _json_as_bytes(model.state_dict())}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return model, state


def save_checkpoint(checkpoint_dir: str | os.PathLike, model: nn.Module, optimizer=None) -> None:
    """Save ``model`` (and ``optimizer``) as a DCP checkpoint in the directory ``checkpoint_dir``.

    The checkpoint holds ``{"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer)}``:
    every rank writes its shards (DTensors), replicated entries (codebooks, JSON quant states as ``bytes``,
    optimizer steps) are written once. Collective when a process group is initialized; works without one.
    """
    import torch.distributed.checkpoint as dcp

    path = _check_path("checkpoint_dir", checkpoint_dir)
    _, state = _checkpoint_state(model, optimizer)
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=path)


def load_checkpoint(checkpoint_dir: str | os.PathLike, model: nn.Module, optimizer=None) -> None:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (and ``optimizer``), in place.

    ``model`` must have the same structure and, for the NF4 weights, the same ``quant_storage`` as the saved one;
    it may be sharded differently or not at all (DCP reads each rank's part by global offsets), e.g. one process
    without a process group loads a checkpoint saved by N ranks. The optimizer state of a sharded parameter
    reloads onto any sharding for 32-bit state, onto the same sharding for 8-bit state (its blocks follow the
    shards). Collective when a process group is initialized.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    path = _check_path("checkpoint_dir", checkpoint_dir)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint_dir {path!r} is not a directory")
    model, state = _checkpoint_state(model, optimizer)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=path)
    model.load_state_dict(_json_as_tensors(state["model"]))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])


@contextmanager
def _whole_adapters(layers: list[tuple[str, QLoRALinear]], full: dict[str, torch.Tensor]):
    """Temporarily give each layer its gathered ``lora_A``/``lora_B`` as plain parameters (restored after)."""
    saved = []
    try:
        for name, layer in layers:
            for attr in ("lora_A", "lora_B"):
                old = layer._parameters[attr]
                saved.append((layer, attr, old))
                key = f"{name}.{attr}" if name else attr
                layer._parameters[attr] = nn.Parameter(full[key], requires_grad=old.requires_grad)
        yield
    finally:
        for layer, attr, old in reversed(saved):
            layer._parameters[attr] = old


def export_pretrained(model: nn.Module, quantized_path: str | os.PathLike, adapter_dir: str | os.PathLike,
                      base_model_name_or_path: str | None = None, *, rank: int = 0) -> None:
    """Write a (possibly sharded) prepared ``model`` as one bitsandbytes-format safetensors file and one PEFT
    adapter directory, exactly what :func:`qlora.save_quantized` and :func:`qlora.save_adapter` write for the
    same model unsharded (the packed NF4 weights as uint8 ``(ceil(n/2), 1)`` whatever the ``quant_storage``).

    Collective: every rank calls it; the state is gathered (:func:`full_state_dict`), rank ``rank`` writes (the
    file's directory is created if needed), and every rank returns once the files are written, or raises if
    writing them failed. Load the results with :func:`qlora.load_quantized` and :func:`qlora.load_adapter` into an
    unsharded prepared model.
    """
    import torch.distributed as dist

    world = dist.get_world_size() if _distributed() else 1
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank must be an int in [0, {world}) (the world size), got {rank!r}")
    quantized_path = _check_path("quantized_path", quantized_path)
    adapter_dir = _check_path("adapter_dir", adapter_dir)
    inner = _unwrap(model)
    layers = _check_model(inner)
    full = full_state_dict(inner)
    failure = None
    if _rank() == rank:
        try:
            _write_export(inner, layers, full, quantized_path, adapter_dir, base_model_name_or_path)
        except Exception as err:  # every rank must learn of it, or they would wait for this one forever
            failure = err
    if _distributed():
        message = [None if failure is None else f"{type(failure).__name__}: {failure}"]
        dist.broadcast_object_list(message, src=rank)
        if failure is None and message[0] is not None:
            raise RuntimeError(f"rank {rank} failed to write the export: {message[0]}")
    if failure is not None:
        raise failure


def _write_export(model: nn.Module, layers, full: dict[str, torch.Tensor], quantized_path: str, adapter_dir: str,
                  base_model_name_or_path: str | None) -> None:
    from safetensors.torch import save_file

    lora = _lora_keys(layers)
    state = {}
    for key, value in full.items():
        if key in lora:
            continue
        if quant_state_key(key) in full:  # a packed NF4 weight, possibly viewed as a float quant_storage
            value = value.contiguous().view(torch.uint8).reshape(-1, 1)
        state[key] = value
    os.makedirs(os.path.dirname(os.path.abspath(quantized_path)), exist_ok=True)
    save_file(tensors_for_safetensors(state), quantized_path, metadata=SAFETENSORS_METADATA)
    with _whole_adapters(_unique_layers(layers), full):
        save_adapter(model, adapter_dir, base_model_name_or_path)
