"""Checkpoint files shared with the Hugging Face stack, in safetensors: the frozen base weights of a prepared model
as bitsandbytes writes them (:func:`save_quantized` / :func:`load_quantized`), and LoRA adapters as PEFT writes them
(:func:`save_adapter` / :func:`load_adapter`).

Each :class:`~qlora.layers.QLoRALinear` at module path ``M`` is stored under ``M.weight`` with the keys of a
bitsandbytes ``Linear4bit`` (:mod:`qlora.bnb_format`, docs/SPEC.md section 5), so a Hugging Face NF4 checkpoint
loads into a prepared model whose module names match. Adapters use PEFT's keys and ``adapter_config.json``.
Loading checks every entry (:func:`qlora.bnb_format.read_nf4` for the NF4 weights) before it changes the model;
docs/DESIGN.md ("Models, checkpoints, adapters") gives the reasons.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from typing import Mapping, NamedTuple

import torch
from torch import nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .bnb_format import SAFETENSORS_METADATA, nf4_keys, quant_state_key, tensors_for_safetensors
from .layers import QLoRALinear, _check_quant_storage, lora_alpha_scaling
from .nf4 import NF4Weight

__all__ = ["save_quantized", "load_quantized", "save_adapter", "load_adapter", "SkippedAdapterEntries",
           "ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# PeftModel wraps the user's model in a LoraModel (``base_model``) which holds it as ``model``.
_PEFT_PREFIX = "base_model.model."


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _check_model(model) -> list[tuple[str, QLoRALinear]]:
    """Every ``(qualified name, QLoRALinear)`` of ``model``, one entry per place a layer is registered (a shared
    layer appears in the state dict under each of its names)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = [(name, m) for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, QLoRALinear)]
    if not layers:
        raise ValueError("model has no QLoRALinear layer; prepare it first with qlora.prepare_model")
    return layers


def _check_path(name: str, path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    try:
        return load_file(path, device="cpu")
    except SafetensorError as err:
        raise ValueError(f"{path!r} is not a readable safetensors file: {err}") from None


def _lora_keys(layers: list[tuple[str, QLoRALinear]]) -> set[str]:
    return {_join(name, p) for name, _ in layers for p in ("lora_A", "lora_B")}


# --------------------------------------------------------------------------------------------------------------
# Base weights: bitsandbytes / Hugging Face 4-bit format
# --------------------------------------------------------------------------------------------------------------

def save_quantized(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the base weights of a prepared ``model`` to the safetensors file ``path`` (overwritten).

    Keys: for each :class:`QLoRALinear` at ``M``, the six bitsandbytes NF4 entries under ``M.weight`` (four without
    double quantization; packed uint8 ``(ceil(n/2), 1)``, the JSON quant state as a 1-D uint8 tensor) and
    ``M.bias`` if any; every other parameter and persistent buffer under its ``model.state_dict()`` name, in its
    own dtype. ``lora_A``/``lora_B`` are left out (:func:`save_adapter` writes them).
    """
    layers = _check_model(model)
    path = _check_path("path", path)
    lora = _lora_keys(layers)
    state = {k: v for k, v in model.state_dict().items() if k not in lora}
    save_file(tensors_for_safetensors(state), path, metadata=SAFETENSORS_METADATA)


class _LoadSnapshot:
    """What :func:`load_quantized` may change, kept so that :meth:`restore` undoes it exactly: each QLoRALinear's
    registered parameters, buffers and NF4 metadata (the NF4 tensors are never written in place, only replaced),
    and a CPU copy of every other tensor that ``load_state_dict`` copies into."""

    def __init__(self, model: nn.Module, layers: list[QLoRALinear], own: Mapping[str, torch.Tensor],
                 keys: Mapping[str, torch.Tensor]) -> None:
        self.layers = [(layer, dict(layer._parameters), dict(layer._buffers), set(layer._non_persistent_buffers_set),
                        dict(layer._nf4_meta)) for layer in layers]
        self.values = [(own[k], own[k].detach().to("cpu", copy=True)) for k in keys]

    @torch.no_grad()
    def restore(self) -> None:
        for layer, params, buffers, non_persistent, meta in self.layers:
            layer._parameters.clear()
            layer._parameters.update(params)
            layer._buffers.clear()
            layer._buffers.update(buffers)
            layer._non_persistent_buffers_set.clear()
            layer._non_persistent_buffers_set.update(non_persistent)
            layer._nf4_meta = meta
        for target, saved in self.values:
            target.copy_(saved)


def load_quantized(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a file written by :func:`save_quantized` (or a Hugging Face / bitsandbytes NF4 checkpoint with the
    same module names) into the prepared ``model``, in place.

    Every :class:`QLoRALinear` takes its NF4 weight from the file (blocksize, double quantization and original
    dtype as stored; the shape must match the layer); every other entry of ``model.state_dict()`` except the
    LoRA adapters is loaded as ``load_state_dict`` does (floating tensors cast to the parameter's dtype). The
    adapters are untouched. A missing entry, a malformed NF4 entry (dtype, shape, JSON, values), a shape mismatch
    or, when ``strict``, an entry the model has no place for raises ``ValueError`` naming the key; nothing is
    changed then. Any other failure while loading (a module's own loading hook raising) restores every tensor of
    the model bit for bit before the error propagates. Returns ``model``.
    """
    layers = _check_model(model)
    path = _check_path("path", path)
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
    file = _read_safetensors(path)

    consumed: set[str] = set()
    weights: list[tuple[QLoRALinear, NF4Weight]] = []
    for name, layer in layers:
        key = _join(name, "weight")
        try:
            weight = NF4Weight.from_bnb_state_dict(file, key, device=layer.weight.device, shape=layer.weight.shape)
        except (KeyError, TypeError, ValueError) as err:
            message = err.args[0] if err.args else repr(err)
            raise ValueError(f"NF4 weight {key!r} in {path!r}: {message}") from None
        try:
            _check_quant_storage(weight, layer.quant_storage)
        except (TypeError, ValueError) as err:
            raise ValueError(f"NF4 weight {key!r} in {path!r}: {err}") from None
        weights.append((layer, weight))
        consumed.update(nf4_keys(key, weight.double_quant))

    own = model.state_dict()
    skip = _lora_keys(layers) | {k for name, layer in layers
                                 for k in nf4_keys(_join(name, "weight"), layer.weight.double_quant)}
    rest = {}
    for key, target in own.items():
        if key in skip:
            continue
        if key not in file:
            raise ValueError(f"checkpoint {path!r} has no entry {key!r}")
        value = file[key]
        if tuple(value.shape) != tuple(target.shape):
            hint = ""
            if quant_state_key(key) in file:
                hint = " (the file holds an NF4 weight there: include that layer in prepare_model's target_modules)"
            raise ValueError(f"checkpoint entry {key!r} has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(target.shape)}{hint}")
        if value.dtype != target.dtype and not (value.dtype.is_floating_point and target.dtype.is_floating_point):
            raise ValueError(f"checkpoint entry {key!r} has dtype {value.dtype}, the model expects {target.dtype}")
        rest[key] = value
        consumed.add(key)
    unexpected = sorted(set(file) - consumed)
    if strict and unexpected:
        shown = ", ".join(repr(k) for k in unexpected[:5]) + (", ..." if len(unexpected) > 5 else "")
        raise ValueError(f"checkpoint {path!r} has {len(unexpected)} entr{'y' if len(unexpected) == 1 else 'ies'} "
                         f"the model has no place for: {shown} (pass strict=False to ignore them)")

    # Everything is checked; what follows can still fail inside a module's own loading hook. Keep what it changes,
    # so that a failure leaves the model as it was, every tensor bit for bit.
    snapshot = _LoadSnapshot(model, [layer for layer, _ in weights], own, rest)
    try:
        for layer, weight in weights:
            layer._nf4 = weight
        # The remaining entries go through load_state_dict so that modules with their own loading hooks see them;
        # the NF4 weights are already in place and the adapters are deliberately absent, hence strict=False.
        result = model.load_state_dict(rest, strict=False)
        # The NF4 keys are those of the weights as stored now (double quantization may differ from before).
        skip |= {k for name, layer in layers for k in nf4_keys(_join(name, "weight"), layer.weight.double_quant)}
        left = set(result.missing_keys) - skip
        if left or result.unexpected_keys:  # cannot happen after the checks above; fail loudly if it does
            raise RuntimeError(f"load_state_dict disagreed with the checks: missing {sorted(left)}, unexpected "
                               f"{result.unexpected_keys}")
    except BaseException:
        snapshot.restore()
        raise
    return model


# --------------------------------------------------------------------------------------------------------------
# Adapters: PEFT LoRA format
# --------------------------------------------------------------------------------------------------------------

def _unique_layers(layers: list[tuple[str, QLoRALinear]]) -> list[tuple[str, QLoRALinear]]:
    seen, out = set(), []
    for name, layer in layers:
        if id(layer) not in seen:
            seen.add(id(layer))
            out.append((name, layer))
    return out


def _target_names(adapted: list[str]) -> list[str]:
    """PEFT ``target_modules`` that select exactly the adapted layers: their full module paths. PEFT matches an
    entry against a module's name or a dot-aligned suffix of it, so a full path selects that module in any model
    with the same structure (under a wrapper's prefix too) and nothing else; a shorter suffix such as "dense" would
    also select modules this model lacks or kept dense (a Hugging Face BERT's ``pooler.dense``)."""
    return sorted(set(adapted))


def _pattern_value(pattern: Mapping[str, object], name: str):
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup for plain names: the most specific key that is the name or
    a dot-aligned suffix of it; None when no key matches."""
    hits = [k for k in pattern if name == k or name.endswith("." + k)]
    return pattern[max(hits, key=len)] if hits else None


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    """Write the LoRA adapters of a prepared ``model`` as a PEFT adapter directory (created if needed).

    ``adapter_model.safetensors``: ``base_model.model.<M>.lora_A.weight`` (r, in_features) and
    ``base_model.model.<M>.lora_B.weight`` (out_features, r) for each :class:`QLoRALinear` at ``M``, in the
    adapters' dtype. ``adapter_config.json``: a PEFT ``LoraConfig`` (``peft_type`` "LORA", ``r``, ``lora_alpha``,
    ``lora_dropout``, ``target_modules``, ``bias`` "none", ``fan_in_fan_out`` false, ``inference_mode`` true,
    ...; ``target_modules`` the full paths of the adapted layers, so that PEFT adapts exactly those). When layers
    differ in rank or alpha, the most common value is ``r``/``lora_alpha`` and the others go to
    ``rank_pattern``/``alpha_pattern`` under their full module paths, as PEFT reads them. PEFT has no such pattern
    for ``lora_dropout``: layers that differ in it are refused (ValueError naming two of them) before anything is
    written.
    """
    layers = _unique_layers(_check_model(model))
    directory = _check_path("directory", directory)
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(f"base_model_name_or_path must be a str or None, got {type(base_model_name_or_path).__name__}")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"directory {directory!r} exists and is not a directory")

    # Counter.most_common keeps first-seen order among ties, so a uniform model gets its one value.
    r = Counter(layer.r for _, layer in layers).most_common(1)[0][0]
    alpha = Counter(layer.lora_alpha for _, layer in layers).most_common(1)[0][0]
    dropout = layers[0][1].lora_dropout
    differing = next(((name, layer) for name, layer in layers if layer.lora_dropout != dropout), None)
    if differing is not None:
        # adapter_config.json holds one lora_dropout (PEFT has no per-layer pattern for it): refuse rather than
        # write a value some layers do not have.
        raise ValueError(f"layers differ in lora_dropout ({layers[0][0]!r}: {dropout}, {differing[0]!r}: "
                         f"{differing[1].lora_dropout}); a PEFT adapter holds one value: set the same lora_dropout "
                         "on every QLoRALinear before saving")
    rslora = {layer.use_rslora for _, layer in layers}
    if len(rslora) > 1:
        raise ValueError("the model's QLoRALinear layers differ in use_rslora; a PEFT adapter_config.json has one "
                         "use_rslora for every layer")
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": _target_names([name for name, _ in layers]),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_rslora": rslora.pop(),  # rank-stabilized LoRA: scaling = lora_alpha / sqrt(r)
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {name: layer.r for name, layer in layers if layer.r != r},
        "alpha_pattern": {name: layer.lora_alpha for name, layer in layers if layer.lora_alpha != alpha},
    }
    tensors = {}
    for name, layer in layers:
        tensors[_PEFT_PREFIX + _join(name, "lora_A.weight")] = layer.lora_A
        tensors[_PEFT_PREFIX + _join(name, "lora_B.weight")] = layer.lora_B
    os.makedirs(directory, exist_ok=True)
    save_file(tensors_for_safetensors(tensors), os.path.join(directory, ADAPTER_WEIGHTS_NAME), metadata=SAFETENSORS_METADATA)
    with open(os.path.join(directory, ADAPTER_CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def _read_adapter_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path!r} is not valid UTF-8 JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path!r} must hold a JSON object, got {type(config).__name__}")

    def field(name, default=None):
        return config.get(name, default)

    if field("peft_type") != "LORA":
        raise ValueError(f"field 'peft_type' of {path!r} must be 'LORA', got {field('peft_type')!r}")
    r = field("r", 8)  # PEFT's default when the field is left out
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"field 'r' of {path!r} must be an int >= 1, got {r!r}")
    alpha = field("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"field 'lora_alpha' of {path!r} must be a finite number, got {alpha!r}")
    dropout = field("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"field 'lora_dropout' of {path!r} must be a number in [0, 1), got {dropout!r}")
    # Features that change what the stored tensors mean; loading them as plain LoRA would compute something else.
    unsupported = {"bias": ("none", None), "fan_in_fan_out": (False, None), "use_dora": (False, None),
                   "modules_to_save": (None, []), "layer_replication": (None, []), "lora_bias": (False, None)}
    for name, allowed in unsupported.items():
        if field(name) not in allowed:
            raise ValueError(f"field {name!r} of {path!r} is {field(name)!r}; only {allowed[0]!r} is supported")
    for name in ("rank_pattern", "alpha_pattern"):
        pattern = field(name, {}) or {}
        if not isinstance(pattern, dict):
            raise ValueError(f"field {name!r} of {path!r} must be an object, got {pattern!r}")
        for k, v in pattern.items():
            ok_int = isinstance(v, int) and not isinstance(v, bool) and v >= 1
            ok_num = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not (ok_int if name == "rank_pattern" else ok_num):
                raise ValueError(f"entry {k!r} of field {name!r} of {path!r} is invalid: {v!r}")
        config[name] = pattern
    use_rslora = field("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise ValueError(f"field 'use_rslora' of {path!r} must be true or false, got {use_rslora!r}")
    config.update(r=r, lora_alpha=alpha, lora_dropout=float(dropout), use_rslora=use_rslora)
    return config


class SkippedAdapterEntries(NamedTuple):
    """What ``load_adapter(..., strict=False)`` left out: ``unexpected_keys``, the adapter's entries with no
    QLoRALinear to go to (a module this model lacks, such as a Hugging Face BERT's ``pooler.dense``), and
    ``missing_keys``, the entries this model's layers would need but the adapter lacks (those layers keep their
    adapters as they were). Both sorted."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def load_adapter(model: nn.Module, directory: str | os.PathLike,
                 strict: bool = True) -> nn.Module | SkippedAdapterEntries:
    """Load a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) into the
    prepared ``model``, in place, and return it.

    Every :class:`QLoRALinear` at ``M`` needs ``base_model.model.<M>.lora_A.weight`` of shape (r, in_features)
    and ``...lora_B.weight`` of shape (out_features, r), with r the layer's rank and the config's (``r`` or its
    ``rank_pattern`` entry). The values are copied into ``lora_A``/``lora_B`` (bit-identical when the dtypes
    agree, else cast), and each layer takes the config's ``lora_alpha`` (``alpha_pattern``) and ``lora_dropout``,
    so the model computes the saved adapter (``use_rslora`` true: ``scaling = lora_alpha / sqrt(r)``). A missing or
    unexpected key, a shape or rank mismatch, or a config feature other than plain LoRA or rsLoRA (DoRA, trained
    biases, ``modules_to_save``) raises ``ValueError`` naming the key or field; nothing is changed then.

    ``strict=False`` loads the layers the adapter has both entries for and skips the rest: entries with no layer to
    go to and layers without entries (which keep their adapters). It returns a :class:`SkippedAdapterEntries`
    naming what was skipped instead of the model. A layer with only one of its two entries, a shape or rank
    mismatch, or an adapter that matches no layer at all is refused either way.
    """
    layers = _unique_layers(_check_model(model))
    directory = _check_path("directory", directory)
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
    config_path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    weights_path = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    if not os.path.isfile(weights_path) and os.path.isfile(os.path.join(directory, "adapter_model.bin")):
        raise ValueError(f"{directory!r} holds adapter_model.bin (pickle); only {ADAPTER_WEIGHTS_NAME} is read")
    config = _read_adapter_config(config_path)
    file = _read_safetensors(weights_path)

    updates = []
    consumed = set()
    missing: list[str] = []
    for name, layer in layers:
        r = _pattern_value(config["rank_pattern"], name) or config["r"]
        alpha = _pattern_value(config["alpha_pattern"], name)
        alpha = config["lora_alpha"] if alpha is None else alpha
        key_a = _PEFT_PREFIX + _join(name, "lora_A.weight")
        key_b = _PEFT_PREFIX + _join(name, "lora_B.weight")
        if not strict and key_a not in file and key_b not in file:
            missing += [key_a, key_b]
            continue
        for key, want in ((key_a, (layer.r, layer.in_features)), (key_b, (layer.out_features, layer.r))):
            if key not in file:
                raise ValueError(f"adapter {weights_path!r} has no entry {key!r}")
            t = file[key]
            if not t.dtype.is_floating_point:
                raise ValueError(f"adapter entry {key!r} must be floating point, got {t.dtype}")
            if tuple(t.shape) != want:
                raise ValueError(f"adapter entry {key!r} has shape {tuple(t.shape)}, the layer {name!r} "
                                 f"(r={layer.r}) expects {want}")
        if r != layer.r:
            raise ValueError(f"adapter_config.json gives r={r} for {name!r}, but its entries {key_a!r} and "
                             f"{key_b!r} have rank {layer.r}")
        updates.append((layer, file[key_a], file[key_b], alpha))
        consumed.update((key_a, key_b))
    unexpected = sorted(set(file) - consumed)
    if unexpected and strict:
        shown = ", ".join(repr(k) for k in unexpected[:5]) + (", ..." if len(unexpected) > 5 else "")
        raise ValueError(f"adapter {weights_path!r} has {len(unexpected)} entr"
                         f"{'y' if len(unexpected) == 1 else 'ies'} with no QLoRALinear layer to go to: {shown} "
                         "(pass strict=False to load the rest)")
    if not updates:
        raise ValueError(f"adapter {weights_path!r} has no entry for any QLoRALinear layer of the model (its entries "
                         f"start {unexpected[:2]!r}); is it the adapter of another model?")

    with torch.no_grad():
        for layer, a, b, alpha in updates:
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
            layer.lora_alpha = alpha
            layer.use_rslora = config["use_rslora"]
            layer.scaling = lora_alpha_scaling(alpha, layer.r, layer.use_rslora)
            layer.lora_dropout = config["lora_dropout"]
    return model if strict else SkippedAdapterEntries(sorted(missing), unexpected)
