"""Adopt bitsandbytes 4-bit layers in place: the NF4 bytes a ``bitsandbytes.nn.Linear4bit`` holds, read by qlora's
kernels without dequantizing or requantizing.

A ``Linear4bit`` loaded by transformers with ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``
holds a ``Params4bit`` (the packed codes viewed as ``quant_storage``, shape ``(ceil(n/2) / itemsize, 1)``) and a
``QuantState`` (absmax, ``state2``, offset, code, blocksize, shape, dtype): byte for byte an
:class:`~qlora.nf4.NF4Weight` (docs/SPEC.md section 5). :func:`nf4_weight_of` wraps those tensors without a copy,
:func:`adopt_linear4bit` builds a :class:`~qlora.layers.QLoRALinear` on them, :func:`params4bit_from` goes the
other way (for merging). Only :func:`params4bit_from` imports bitsandbytes. What is refused and why:
docs/DESIGN.md, "Models, checkpoints, adapters".
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ..kernels._checks import check_backend_device
from ..layers import DEFAULT_LORA_ALPHA, DEFAULT_LORA_DROPOUT, DEFAULT_R, QLoRALinear
from ..nf4 import NF4Weight

__all__ = ["is_bnb_linear", "check_adoptable", "nf4_weight_of", "adopt_linear4bit", "params4bit_from",
           "finish_adoption"]


def _bnb():
    """The imported bitsandbytes module, or None when nothing has imported it (then no bitsandbytes layer exists)."""
    return sys.modules.get("bitsandbytes")


def is_bnb_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes linear layer of any kind (``Linear4bit`` and its ``LinearNF4`` /
    ``LinearFP4`` subclasses, ``Linear8bitLt``, ...). Never imports bitsandbytes."""
    if _bnb() is None:
        return False
    return isinstance(module, nn.Linear) and type(module).__module__.split(".", 1)[0] == "bitsandbytes"


def _is_linear4bit(module: nn.Module) -> bool:
    bnb = _bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def check_adoptable(name: str, module: nn.Module) -> None:
    """Raise unless ``module`` (at ``name``) is an NF4 ``Linear4bit`` whose bytes qlora's kernels can read as they
    are, on the device the kernels run on. Messages name the layer and say what to do."""
    where = name or "the model itself"
    if not _is_linear4bit(module):
        kind = type(module).__name__
        if kind == "Linear8bitLt" or "8bit" in kind:
            raise TypeError(f"layer {where!r} is a bitsandbytes {kind} (LLM.int8, 8-bit weights); qlora's kernels "
                            "take NF4 4-bit weights only: load the model with BitsAndBytesConfig(load_in_4bit=True, "
                            "bnb_4bit_quant_type='nf4'), or leave the layer out of target_modules")
        raise TypeError(f"layer {where!r} is a bitsandbytes {kind}, which qlora cannot adopt (only Linear4bit "
                        "with quant_type='nf4')")
    weight = module.weight
    quant_type = getattr(weight, "quant_type", None)
    state = getattr(weight, "quant_state", None)
    if state is not None:
        quant_type = getattr(state, "quant_type", quant_type)
    if quant_type != "nf4":
        raise TypeError(f"layer {where!r} is a bitsandbytes Linear4bit with quant_type={quant_type!r}; qlora's "
                        "kernels take NF4 only (FP4 has another codebook): load the model with "
                        "bnb_4bit_quant_type='nf4', or leave the layer out of target_modules")
    if not getattr(weight, "bnb_quantized", False) or state is None:
        raise ValueError(f"layer {where!r} is a bitsandbytes Linear4bit that is not quantized yet (bitsandbytes "
                         "quantizes on the first move to a device: call .to(device) first)")
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError(f"layer {where!r}: bitsandbytes has repacked this weight for its AVX512-BF16 CPU inference "
                         "path (it does so on the first eval-mode forward without gradients on such CPUs, rounding "
                         "the block scales to bfloat16), so the NF4 bytes are no longer available; adopt the layers "
                         "before running the bitsandbytes model in eval mode on CPU, or reload the model")
    check_backend_device(f"{where}.weight", weight)


def nf4_weight_of(module: nn.Module, name: str = "") -> NF4Weight:
    """The NF4 weight of the bitsandbytes ``Linear4bit`` ``module`` as an :class:`NF4Weight` over the same memory.

    ``packed`` is ``module.weight.data`` reinterpreted as uint8 and flattened (a view, whatever the
    ``quant_storage``); ``absmax``, ``code``, ``absmax2`` (``state2.absmax``) and ``nested_code``
    (``state2.code``) are bitsandbytes' own tensors; ``offset`` is the float32 ``QuantState.offset`` as a Python
    float (exact). Checked with :func:`check_adoptable` first; ``name`` is used in messages.
    """
    check_adoptable(name, module)
    weight = module.weight
    state = weight.quant_state
    data = weight.data
    if not data.is_contiguous():
        raise ValueError(f"layer {name or 'the model itself'!r}: the packed weight is not contiguous")
    packed = data.view(torch.uint8).reshape(-1)
    fields = dict(packed=packed, absmax=state.absmax, code=state.code, blocksize=int(state.blocksize),
                  shape=torch.Size(state.shape), dtype=state.dtype)
    if getattr(state, "nested", False):
        state2 = state.state2
        fields.update(absmax2=state2.absmax, nested_code=state2.code, offset=float(state.offset),
                      nested_blocksize=int(state2.blocksize))
    try:
        return NF4Weight(**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"layer {name or 'the model itself'!r}: its bitsandbytes quantization state does not "
                         f"have the NF4 layout qlora reads: {err}") from None


def adopt_linear4bit(module: nn.Module, r: int = DEFAULT_R, lora_alpha: float = DEFAULT_LORA_ALPHA,
                     lora_dropout: float = DEFAULT_LORA_DROPOUT, use_rslora: bool = False,
                     name: str = "") -> QLoRALinear:
    """A :class:`QLoRALinear` computing what the NF4 ``Linear4bit`` ``module`` computes, plus a fresh adapter.

    The NF4 weight is :func:`nf4_weight_of` (bitsandbytes' own tensors, shared, not copied); the adapter (and the
    frozen bias, copied) take the dtype the weight was quantized from (``QuantState.dtype``, the model's dtype when
    transformers loaded it), which is the dtype the layer's inputs must then have. The training mode is kept.
    """
    weight = nf4_weight_of(module, name)
    bias = None if module.bias is None else module.bias.detach()
    layer = QLoRALinear(weight, r, lora_alpha, lora_dropout, bias=bias, dtype=weight.dtype, use_rslora=use_rslora)
    layer.train(module.training)
    return layer


def params4bit_from(weight: NF4Weight, like) -> "torch.nn.Parameter":
    """A bitsandbytes ``Params4bit`` holding ``weight`` (quantized, frozen), with the ``quant_storage``,
    ``blocksize``, ``compress_statistics`` and ``module`` of the ``Params4bit`` ``like``. Imports bitsandbytes."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    storage = getattr(like, "quant_storage", torch.uint8)
    if weight.packed.numel() % storage.itemsize:
        raise ValueError(f"a weight of shape {tuple(weight.shape)} packs into {weight.packed.numel()} bytes, not a "
                         f"multiple of the {storage} quant_storage item size")
    state2 = None
    offset = None
    if weight.double_quant:
        state2 = QuantState(absmax=weight.absmax2, code=weight.nested_code, blocksize=weight.nested_blocksize,
                            dtype=torch.float32)
        offset = torch.tensor(weight.offset, dtype=torch.float32, device=weight.device)
    state = QuantState(absmax=weight.absmax, shape=weight.shape, code=weight.code, blocksize=weight.blocksize,
                       quant_type="nf4", dtype=weight.dtype, offset=offset, state2=state2)
    return bnb.nn.Params4bit(weight.packed.view(storage).reshape(-1, 1), requires_grad=False, quant_state=state,
                             blocksize=weight.blocksize, compress_statistics=weight.double_quant, quant_type="nf4",
                             quant_storage=storage, module=getattr(like, "module", None), bnb_quantized=True)


def finish_adoption(model: nn.Module) -> None:
    """Tell transformers that ``model`` now trains: called by ``prepare_model`` after it adopted bitsandbytes layers.

    transformers marks a model it loaded in 4 bits ``is_quantized = True``, and its ``Trainer`` refuses such a model
    unless PEFT wrapped it ("cannot perform fine-tuning on purely quantized models"): the check stands for "no
    trainable adapters", which no longer holds once qlora's adapters are attached. This sets ``is_quantized`` to
    False and nothing else: ``hf_quantizer``, ``quantization_method`` and ``config.quantization_config`` stay, so
    transformers still treats the weights as bitsandbytes 4-bit ones where it asks them (no ``.to(dtype)``).
    """
    if getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is not None:
        model.is_quantized = False
