"""Distributed QLoRA: 4-bit base weights that PyTorch's FSDP2 shards, checkpoints that DCP saves, and the export of a
trained sharded model to one bitsandbytes-format file plus a PEFT adapter.

The pieces (see ``docs/FSDP.md`` for a launch recipe and the design):

- :func:`set_quant_storage` moves the NF4 weight of every :class:`~qlora.layers.QLoRALinear` into frozen parameters
  (``QLoRALinear.set_quant_storage``), which is what ``torch.distributed.fsdp.fully_shard`` shards, DDP broadcasts
  and DCP saves. Call it before ``fully_shard``.
- :func:`fully_shard_model`: ``fully_shard`` on each given block, then on the root, after :func:`set_quant_storage`.
- :func:`full_state_dict`: the whole (gathered) state dict on every rank, bitsandbytes keys for the NF4 weights.
- :func:`save_checkpoint` / :func:`load_checkpoint`: a sharded checkpoint of model and optimizer with
  ``torch.distributed.checkpoint`` (DCP). Loading works sharded (any world size for the model; the same sharding
  for 8-bit optimizer state) and unsharded in a single process without a process group.
- :func:`export_pretrained`: gathers the state and has one rank write what :func:`qlora.save_quantized` and
  :func:`qlora.save_adapter` write for an unsharded model.

Every function that gathers is a collective: all ranks call it, in the same order.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from typing import Iterable

import torch
from torch import nn

from .bnb_format import SAFETENSORS_METADATA, is_quant_state_key, quant_state_key, tensors_for_safetensors
from .interop import _check_model, _check_path, _lora_keys, _unique_layers
from .interop import save_adapter
from .layers import QUANT_STORAGES, QLoRALinear, _check_quant_storage, _is_dtensor

__all__ = ["set_quant_storage", "fully_shard_model", "full_state_dict", "save_checkpoint", "load_checkpoint",
           "export_pretrained"]


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


def set_quant_storage(model: nn.Module, quant_storage: torch.dtype | None = torch.uint8) -> nn.Module:
    """Store the NF4 weight of every :class:`QLoRALinear` in ``model`` as frozen parameters whose packed bytes are
    viewed as ``quant_storage`` (``torch.uint8`` by default; see :meth:`QLoRALinear.set_quant_storage`), or back as
    a plain attribute (None). Values, forward and state dict are unchanged. Call before sharding. Returns ``model``.
    """
    if quant_storage is not None and quant_storage not in QUANT_STORAGES:
        names = ", ".join(str(d).replace("torch.", "") for d in QUANT_STORAGES)
        raise TypeError(f"quant_storage must be None or one of {names}, got {quant_storage!r}")
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
                      quant_storage: torch.dtype = torch.uint8, **fully_shard_kwargs) -> nn.Module:
    """Shard ``model`` with FSDP2: every :class:`QLoRALinear` still holding its NF4 weight as an attribute gets
    ``quant_storage`` (default uint8; layers already given a storage keep theirs), then
    ``torch.distributed.fsdp.fully_shard(block, mesh=mesh, **fully_shard_kwargs)`` runs on each of ``blocks`` (e.g.
    the transformer layers, each one communication group) and finally on ``model`` itself (the rest). ``mesh``: a
    1-D ``DeviceMesh`` (default: ``fully_shard``'s, over the default process group on the current accelerator;
    on CPU pass ``init_device_mesh("cpu", (world_size,))``). Returns ``model``.
    """
    from torch.distributed.fsdp import fully_shard

    if quant_storage not in QUANT_STORAGES:
        names = ", ".join(str(d).replace("torch.", "") for d in QUANT_STORAGES)
        raise TypeError(f"quant_storage must be one of {names} (an NF4 weight held as an attribute would not be "
                        f"sharded), got {quant_storage!r}")
    layers = _unique_layers(_check_model(model))
    if any(layer._sharded() for _, layer in layers):
        raise RuntimeError("model is already sharded")
    for _, layer in layers:
        if layer.quant_storage is None:
            layer.set_quant_storage(quant_storage)
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
        if _is_dtensor(value):
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
