"""Whole-model QLoRA: swap a model's ``nn.Linear`` layers for :class:`~qlora.layers.QLoRALinear` and count what
that leaves to train and to store.

``prepare_model(model)`` does what ``peft.get_peft_model`` does over a bitsandbytes 4-bit model: every targeted
linear layer gets an NF4 base weight (bit-exact with bitsandbytes) and a LoRA adapter, and everything but the
adapters is frozen. ``trainable_parameters_report(model)`` counts parameters (an NF4 weight counts as its logical
number of elements, as for the dense weight it replaced) and the bytes they occupy by kind.
"""

from __future__ import annotations

from itertools import chain

import math
import numbers
import sys
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from .kernels._checks import FLOAT_DTYPES, check_backend_device, check_blocksize
from .integrations import bitsandbytes as _bnb  # imports no bitsandbytes: it looks for it in sys.modules
from .layers import DEFAULT_LORA_ALPHA, DEFAULT_LORA_DROPOUT, DEFAULT_R, QLoRALinear

__all__ = ["prepare_model", "trainable_parameters_report", "ParameterReport", "qlora_layers"]

# Above this many layers (and with a terminal to draw on) ``progress=None`` shows a bar: quantizing a handful of
# layers is instant, a 7B model's 224 take long enough to want feedback.
_PROGRESS_MIN_LAYERS = 8


def qlora_layers(model: nn.Module) -> list[tuple[str, QLoRALinear]]:
    """``(qualified name, layer)`` of every :class:`QLoRALinear` in ``model`` (itself included, named ``""``), in
    registration order; a layer registered under two names is listed once, under the first."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QLoRALinear)]


def _check_target_modules(target_modules) -> tuple[str, ...] | None:
    if target_modules is None:
        return None
    if isinstance(target_modules, str):
        # PEFT reads a lone string as a regular expression over the full name; a list of suffixes is the
        # unambiguous form, so ask for it rather than guess which one was meant.
        raise TypeError(f"target_modules must be None or a list of module name suffixes such as "
                        f"[{target_modules!r}], got the string {target_modules!r}")
    if not isinstance(target_modules, (list, tuple, set, frozenset)):
        raise TypeError(f"target_modules must be None or a list of module name suffixes, got "
                        f"{type(target_modules).__name__}")
    names = tuple(target_modules)
    if not names:
        raise ValueError("target_modules must name at least one module (None targets every nn.Linear)")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"target_modules must hold strings, got {name!r} ({type(name).__name__})")
        if not name or name.startswith(".") or name.endswith(".") or ".." in name:
            raise ValueError(f"target_modules entries must be non-empty dotted names such as 'q_proj' or "
                             f"'self_attn.q_proj', got {name!r}")
    return names


def _matches(qualified_name: str, targets: Sequence[str]) -> bool:
    """PEFT's rule for a list of targets: the whole name, or a suffix that starts at a dot ("q_proj" matches
    "layers.0.self_attn.q_proj" but "proj" does not)."""
    return any(qualified_name == t or qualified_name.endswith("." + t) for t in targets)


def _linear_slots(model: nn.Module) -> list[tuple[nn.Module, str, str, nn.Linear]]:
    """``(parent, attribute, qualified name, linear)`` for every place an ``nn.Linear`` is registered.

    A layer registered twice (shared between two parents) appears once per place, so that replacing it
    replaces it everywhere. Linear layers inside ``nn.MultiheadAttention`` are left out: it reads
    ``out_proj.weight`` as a dense tensor instead of calling the module.
    """
    slots = []
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        if isinstance(parent, nn.MultiheadAttention):
            continue
        # Not named_children(): it lists a module once per parent, so nn.Sequential(lin, act, lin) would keep its
        # second slot dense.
        for attr, child in parent._modules.items():
            if isinstance(child, nn.Linear):
                name = f"{parent_name}.{attr}" if parent_name else attr
                slots.append((parent, attr, name, child))
    return slots


def _check_plain_forward(name: str, linear: nn.Linear) -> None:
    """Refuse a layer whose forward is not ``nn.Linear``'s: QLoRALinear computes ``x @ W^T + b`` (plus the
    adapter), so whatever else it computes (a subclass's ``forward``, an instance's own ``forward``, forward hooks)
    would be dropped silently."""
    kind = type(linear).__name__
    if type(linear).forward is not nn.Linear.forward:
        reason = f"is a {kind}, an nn.Linear subclass with its own forward"
    elif "forward" in vars(linear):
        reason = "has its forward replaced on the instance"
    elif linear._forward_hooks or linear._forward_pre_hooks:
        reason = "has forward hooks or pre-hooks registered"
    else:
        return
    raise TypeError(f"{name} {reason}, which a QLoRALinear would not compute; leave it out with target_modules, or "
                    "make it a plain nn.Linear")


def _check_number(name: str, value, low: float, high: float | None, high_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    if value < low or (high is not None and (value >= high if high_open else value > high)):
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {bound}, got {value!r}")
    return float(value)


def prepare_model(model: nn.Module, r: int = DEFAULT_R, lora_alpha: float = DEFAULT_LORA_ALPHA,
                  lora_dropout: float = DEFAULT_LORA_DROPOUT, target_modules: Iterable[str] | None = None,
                  blocksize: int = 64, double_quant: bool = True, progress: bool | None = None,
                  use_rslora: bool = False) -> nn.Module:
    """Replace ``model``'s targeted ``nn.Linear`` layers by :class:`QLoRALinear` (in place) and freeze the rest.

    Args:
        model: any ``nn.Module`` holding ``nn.Linear`` layers with float32/float16/bfloat16 weights on the device
            the kernels run on (CPU under the Triton interpreter, CUDA otherwise). It cannot itself be an
            ``nn.Linear`` (there is no parent to put the replacement in: use ``QLoRALinear.from_linear``).
        r, lora_alpha, lora_dropout: the adapter of every replaced layer (rank >= 1, ``scaling = lora_alpha / r``,
            dropout in [0, 1) on the adapter's input in training mode); defaults 8, 8, 0.0 (PEFT's ``LoraConfig``).
        target_modules: None (every ``nn.Linear``, as the QLoRA paper found necessary to match 16-bit fine-tuning)
            or a list of module names matched as PEFT does: the qualified name itself or a suffix of it starting
            after a dot (``"q_proj"``, ``"self_attn.q_proj"``, ``"layers.0.self_attn.q_proj"``).
        blocksize, double_quant: NF4 quantization of the base weights (SPEC sections 2 and 3).
        progress: show a tqdm bar over the layers; None shows it when more than 8 layers are quantized and
            stderr is a terminal.
        use_rslora: rank-stabilized LoRA, ``scaling = lora_alpha / sqrt(r)`` (PEFT's ``use_rslora``).

    A model loaded by transformers in 4 bits (``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``)
    is adopted in place: each targeted ``bitsandbytes.nn.Linear4bit`` becomes a :class:`QLoRALinear` over the very
    packed bytes and quantization state bitsandbytes holds (any ``quant_storage``, double-quantized or not; nothing
    is dequantized or requantized, so ``blocksize``/``double_quant`` do not apply to it), see
    :mod:`qlora.integrations.bitsandbytes`. FP4 and LLM.int8 layers are refused with an error naming them. The
    model's ``is_quantized`` flag is then cleared so that transformers' ``Trainer`` accepts it.

    Each replaced layer keeps its bias (frozen, PEFT's ``bias="none"``) and computes exactly the quantized base
    layer until training moves ``lora_B`` from zero. Afterwards only the ``lora_A``/``lora_B`` parameters of the
    model's :class:`QLoRALinear` layers require gradients. A linear layer registered in several places (two
    parents, or twice in one ``nn.Sequential``/``nn.ModuleList``) is replaced by one ``QLoRALinear`` everywhere; a weight tied to another module (an embedding tied to the LM head) is
    untied: the other module keeps its dense copy, frozen. ``nn.MultiheadAttention``'s ``out_proj`` is never
    replaced (that module reads its weight directly). A targeted layer whose forward is not ``nn.Linear``'s (a
    subclass with its own ``forward``, a replaced ``forward``, forward hooks) is refused with ``TypeError`` naming it,
    since the replacement would not compute it. All arguments and every targeted weight (dtype, device,
    finiteness) are checked before the model is modified.

    Returns:
        ``model`` itself.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise TypeError("model must contain the nn.Linear layers to replace, not be one; use "
                        "qlora.QLoRALinear.from_linear for a single layer")
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int >= 1, got {r!r}")
    if r < 1:
        raise ValueError(f"r must be an int >= 1, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real) or not math.isfinite(lora_alpha):
        raise TypeError(f"lora_alpha must be a finite real number, got {lora_alpha!r}")
    _check_number("lora_dropout", lora_dropout, 0.0, 1.0, high_open=True)
    targets = _check_target_modules(target_modules)
    check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be None, True or False, got {progress!r}")
    if not isinstance(use_rslora, bool):
        raise TypeError(f"use_rslora must be a bool, got {type(use_rslora).__name__}")

    slots = _linear_slots(model)
    chosen = [s for s in slots if targets is None or _matches(s[2], targets)]
    if not chosen:
        available = sorted({s[2].rsplit(".", 1)[-1] for s in slots})
        if targets is None:
            raise ValueError("model has no nn.Linear layer to prepare (already prepared layers are QLoRALinear; "
                             "nn.MultiheadAttention's out_proj is never replaced)")
        shown = ", ".join(available[:20]) + (", ..." if len(available) > 20 else "")
        raise ValueError(f"target_modules {list(targets)!r} matched no nn.Linear of the model; its nn.Linear "
                         f"names end in: {shown or '(none)'}")

    # One replacement per distinct layer, in first-seen order; every slot holding it gets the same module.
    layers: dict[int, tuple[str, nn.Linear]] = {}
    for _, _, name, linear in chosen:
        layers.setdefault(id(linear), (name, linear))
    for name, linear in layers.values():
        if _bnb.is_bnb_linear(linear):
            _bnb.check_adoptable(name, linear)  # NF4 Linear4bit only; FP4 and LLM.int8 raise naming the layer
            continue
        _check_plain_forward(name, linear)
        weight = linear.weight
        if weight.numel() == 0:
            raise ValueError(f"{name} has in_features={linear.in_features} and out_features={linear.out_features}; "
                             "a layer without weights has nothing to quantize (leave it out with target_modules)")
        if weight.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}.weight must be float32, float16 or bfloat16 to quantize, got {weight.dtype}")
        check_backend_device(f"{name}.weight", weight)
        if weight.numel() and not bool(torch.isfinite(weight).all()):
            raise ValueError(f"{name}.weight contains NaN or Inf; NF4 quantization needs finite weights")

    show = progress if progress is not None else (len(layers) > _PROGRESS_MIN_LAYERS and sys.stderr.isatty())
    # Each layer is swapped in as soon as it is quantized, so its dense weight can be freed before the next one
    # is read: peak memory stays one dense layer above the quantized model.
    for name, linear in tqdm(list(layers.values()), desc="qlora: quantizing", unit="layer", disable=not show,
                             file=sys.stderr, leave=False):
        if _bnb.is_bnb_linear(linear):
            replacement = _bnb.adopt_linear4bit(linear, r, lora_alpha, lora_dropout, use_rslora=use_rslora, name=name)
        else:
            replacement = QLoRALinear.from_linear(linear, r, lora_alpha, lora_dropout, blocksize=blocksize,
                                                  double_quant=double_quant, use_rslora=use_rslora)
        replacement.train(linear.training)
        # Every place holding the layer, matched by name or not: it stays one shared module.
        for parent, attr, _, held in slots:
            if held is linear:
                setattr(parent, attr, replacement)

    if any(_bnb.is_bnb_linear(linear) for _, linear in layers.values()):
        _bnb.finish_adoption(model)  # transformers' Trainer then accepts the 4-bit model: it has adapters now
    for module in model.modules():
        adapter = isinstance(module, QLoRALinear)
        for pname, param in module.named_parameters(recurse=False):
            param.requires_grad_(adapter and pname in ("lora_A", "lora_B"))
    return model


@dataclass(frozen=True)
class ParameterReport:
    """Parameter counts and storage of a (prepared) model.

    ``trainable``/``total``: numbers of parameters, an NF4 weight counting as its logical ``prod(shape)``
    elements (``total`` is the parameter count of the original dense model when every LoRA is removed).
    Bytes by kind: ``weight_4bit_bytes`` (packed NF4 codes), ``scale_bytes`` (absmax or its 8-bit codes, the
    double-quantization scales and both codebooks), ``lora_bytes`` (``lora_A``/``lora_B``), ``other_bytes``
    (every other parameter and buffer: embeddings, norms, biases, dense layers left out).
    """

    trainable: int
    total: int
    weight_4bit_bytes: int
    scale_bytes: int
    lora_bytes: int
    other_bytes: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    @property
    def total_bytes(self) -> int:
        return self.weight_4bit_bytes + self.scale_bytes + self.lora_bytes + self.other_bytes

    def __str__(self) -> str:
        """Two lines: PEFT's ``print_trainable_parameters`` line, then the bytes by kind."""
        return (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || "
                f"trainable%: {self.trainable_percent:.4f}\n"
                f"memory: 4-bit weights {_human_bytes(self.weight_4bit_bytes)} | scales "
                f"{_human_bytes(self.scale_bytes)} | LoRA {_human_bytes(self.lora_bytes)} | rest "
                f"{_human_bytes(self.other_bytes)} | total {_human_bytes(self.total_bytes)}")


def _human_bytes(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps the number at least 1: "512 B", "8.78 KiB", "3.50 GiB"."""
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:,.2f} {unit}"


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def trainable_parameters_report(model: nn.Module) -> ParameterReport:
    """Count ``model``'s parameters (trainable and all) and its storage by kind; see :class:`ParameterReport`.

    Parameters and buffers shared between modules are counted once.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    trainable = total = weight_4bit = scales = lora = other = 0
    lora_ids = set()
    nf4_storage_ids = set()  # the frozen nf4_* parameters/buffers holding each NF4 weight: counted above
    for _, layer in qlora_layers(model):
        w = layer.weight
        total += w.numel
        weight_4bit += _nbytes(w.packed)
        scales += _nbytes(w.absmax) + _nbytes(w.absmax2) + _nbytes(w.code) + _nbytes(w.nested_code)
        lora_ids.update((id(layer.lora_A), id(layer.lora_B)))
        held = chain(layer.named_parameters(recurse=False), layer.named_buffers(recurse=False))
        nf4_storage_ids.update(id(t) for name, t in held if name.startswith("nf4_"))
    for param in model.parameters():
        if id(param) in nf4_storage_ids:
            continue
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
        if id(param) in lora_ids:
            lora += _nbytes(param)
        else:
            other += _nbytes(param)
    for buf in model.buffers():
        if id(buf) not in nf4_storage_ids:
            other += _nbytes(buf)
    return ParameterReport(trainable=trainable, total=total, weight_4bit_bytes=weight_4bit, scale_bytes=scales,
                           lora_bytes=lora, other_bytes=other)
