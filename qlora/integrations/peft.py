"""PEFT on qlora's kernels: a LoRA layer for bitsandbytes NF4 ``Linear4bit`` targets, registered with PEFT's
custom-module dispatch.

``enable(lora_config)`` registers :class:`QLoRAPeftLinear` for ``bitsandbytes.nn.Linear4bit`` and returns the
config, so ``peft.get_peft_model(model_4bit, qlora.integrations.peft.enable(LoraConfig(...)))`` builds PEFT LoRA
layers whose forward and backward run ``torch.ops.qlora.nf4_lora_forward`` / ``_backward`` on the very bytes
bitsandbytes holds (:func:`qlora.integrations.bitsandbytes.nf4_weight_of`); everything else is PEFT's, and
``save_pretrained`` writes a standard adapter (:func:`from_pretrained` loads one onto qlora's layers). Targets that
are not ``Linear4bit`` go to PEFT's own layers. Numerics against plain PEFT, dropout and what is refused:
docs/DESIGN.md, "Models, checkpoints, adapters"; usage: README.md.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from . import import_hub_kernels_package

import_hub_kernels_package()  # transformers (imported by peft) needs the Hub's `kernels`, not this repo's folder

import peft  # noqa: E402
from peft import LoraConfig, PeftModel  # noqa: E402
from peft.tuners.lora.layer import LoraLayer  # noqa: E402
from peft.tuners.tuners_utils import check_adapters_to_merge  # noqa: E402

from ..functional import qlora_linear  # noqa: E402
from ..kernels._checks import FLOAT_DTYPES  # noqa: E402
from ..nf4 import NF4Weight, requantize_nf4  # noqa: E402
from .bitsandbytes import check_adoptable, nf4_weight_of, params4bit_from  # noqa: E402

__all__ = ["enable", "from_pretrained", "QLoRAPeftLinear"]

# Keyword arguments PEFT's LoRA layers accept for LoRA variants; none applies to plain LoRA (popped, as PEFT does).
_VARIANT_KWARGS = ("alora_offsets",)


class QLoRAPeftLinear(nn.Module, LoraLayer):
    """PEFT's LoRA layer over a bitsandbytes NF4 ``Linear4bit`` (``base_layer``), computed by qlora's kernels.

    Built by PEFT's dispatch as ``QLoRAPeftLinear(target, adapter_name, config=lora_config, r=..., lora_alpha=...,
    target_name=..., ...)``. Input ``x`` (..., in_features) float32/float16/bfloat16; output (..., out_features) in
    x's dtype. bitsandbytes' own forward (``base_layer(x)``) runs only with adapters disabled or merged, and this
    layer switches off bitsandbytes' AVX512-BF16 CPU repacking of the weight, which would change the bytes the
    kernels read.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, target_name: str = "", **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        base = self.get_base_layer()
        check_adoptable(target_name, base)  # NF4, quantized, bytes not repacked, on the kernels' device
        base.support_avx512bf16_for_cpu = False
        self._target_name = target_name
        self._nf4_cache: tuple | None = None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, target_name=target_name)

    # -- the NF4 weight: bitsandbytes' tensors, re-wrapped only when the Params4bit changes -----------------------
    def _nf4(self) -> NF4Weight:
        weight = self.get_base_layer().weight
        cache = self._nf4_cache
        # Holding the Params4bit and QuantState objects keeps their ids from being reused while cached.
        if cache is None or cache[0] is not weight or cache[1] is not weight.quant_state or \
                cache[2] != weight.data_ptr():
            nf4 = nf4_weight_of(self.get_base_layer(), self._target_name)
            self._nf4_cache = cache = (weight, weight.quant_state, weight.data_ptr(), nf4)
        return cache[3]

    # -- compute ------------------------------------------------------------------------------------------------
    def _qlora_linear(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """Base layer plus adapter ``adapter`` in one :func:`qlora.functional.qlora_linear` call, in x's dtype."""
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"input of {self._target_name or 'the layer'!r} must be float32, float16 or bfloat16, "
                            f"got {x.dtype}")
        lora_A = self.lora_A[adapter].weight
        lora_B = self.lora_B[adapter].weight
        bias = self.get_base_layer().bias
        dropout = self.lora_dropout[adapter]
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        return qlora_linear(x, self._nf4(), lora_A.to(x.dtype), lora_B.to(x.dtype), self.scaling[adapter],
                            None if bias is None else bias.to(x.dtype), dropout_p=p, training=self.training)

    def _plain_lora(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """PEFT's LoRA term ``B(A(dropout(x))) * scaling`` in the adapter's dtype, returned in x's dtype."""
        lora_A = self.lora_A[adapter]
        out = self.lora_B[adapter](lora_A(self.lora_dropout[adapter](x.to(lora_A.weight.dtype))))
        return (out * self.scaling[adapter]).to(x.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        for key in _VARIANT_KWARGS:
            kwargs.pop(key, None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        active = [name for name in self.active_adapters if name in self.lora_A]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        result = self._qlora_linear(x, active[0])
        for adapter in active[1:]:
            result = result + self._plain_lora(x, adapter)
        return result

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str],
                             **kwargs: Any) -> torch.Tensor:
        """Row ``i`` of the batch through adapter ``adapter_names[i]`` (``"__base__"``: the base layer alone)."""
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(adapter_names):
            rows.setdefault(name, []).append(i)
        pieces = []
        for name, index in rows.items():
            index = torch.tensor(index, device=x.device)
            sub = x.index_select(0, index)
            if name == "__base__" or name not in self.lora_A:
                pieces.append((index, self.base_layer(sub, *args, **kwargs)))
            else:
                pieces.append((index, self._qlora_linear(sub, name)))
        first = pieces[0][1]
        result = first.new_zeros((x.shape[0], *first.shape[1:]))
        for index, piece in pieces:
            result = result.index_copy(0, index, piece.to(result.dtype))
        return result

    # -- merging: requantize (lossy, as PEFT's bitsandbytes layers are) -----------------------------------------
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``scaling * lora_B @ lora_A``, (out_features, in_features), in the adapters' dtype."""
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    @torch.no_grad()
    def _requantize(self, sign: float, adapter: str, safe_merge: bool) -> None:
        """Base weight := NF4(dequantize(W) + sign * delta) (:func:`qlora.nf4.requantize_nf4`), stored with the
        Params4bit's ``quant_storage``."""
        base = self.get_base_layer()
        requantized = requantize_nf4(self._nf4(), sign * self.get_delta_weight(adapter), safe_merge, what=adapter)
        base.weight = params4bit_from(requantized, like=base.weight)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the active adapters (or ``adapter_names``) into the 4-bit base weight: dequantize, add
        ``get_delta_weight``, requantize to NF4. Rounds to the NF4 grid, as PEFT's bitsandbytes layers do."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        for adapter in adapter_names:
            if adapter not in self.lora_A:
                continue
            warnings.warn("Merge lora module to 4-bit linear may get different generations due to rounding errors.")
            self._requantize(1.0, adapter, safe_merge)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract the merged adapters from the 4-bit base weight again (requantizing: not bit-exact)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lora_A:
                continue
            warnings.warn("Unmerge lora module to 4-bit linear may get different generations due to rounding "
                          "errors.")
            self._requantize(-1.0, adapter, safe_merge=False)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _bitsandbytes_linear4bit():
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ImportError("qlora.integrations.peft.enable needs bitsandbytes (the layers it adopts are "
                          "bitsandbytes.nn.Linear4bit): pip install 'qlora-kernels[integrations]'") from err
    return bnb.nn.Linear4bit


def enable(lora_config: LoraConfig) -> LoraConfig:
    """Register :class:`QLoRAPeftLinear` for ``bitsandbytes.nn.Linear4bit`` targets in ``lora_config`` (PEFT's
    ``LoraConfig._register_custom_module``) and return the same config, for ``peft.get_peft_model``.

    Raises ``TypeError`` for anything but a ``peft.LoraConfig``, ``ValueError`` for the features qlora's kernels
    do not compute (``use_dora``, ``lora_bias``, ``fan_in_fan_out``), ``RuntimeError`` when the installed PEFT has
    no custom-module dispatch. ``use_rslora`` is honoured (PEFT computes the scaling, ``lora_alpha / sqrt(r)``).
    """
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a peft.LoraConfig, got {type(lora_config).__name__}")
    for field, wanted in (("use_dora", False), ("lora_bias", False), ("fan_in_fan_out", False)):
        if getattr(lora_config, field, wanted) != wanted:
            raise ValueError(f"lora_config.{field}={getattr(lora_config, field)!r} is not supported by qlora's "
                             f"kernels (plain LoRA only); set {field}={wanted!r}")
    if not hasattr(lora_config, "_register_custom_module"):
        raise RuntimeError(f"peft {peft.__version__} has no LoraConfig._register_custom_module (custom-module "
                           "dispatch); install peft >= 0.21")
    lora_config._register_custom_module({_bitsandbytes_linear4bit(): QLoRAPeftLinear})
    return lora_config


def from_pretrained(model: nn.Module, adapter_dir: str, adapter_name: str = "default", is_trainable: bool = False,
                    **kwargs: Any) -> PeftModel:
    """``peft.PeftModel.from_pretrained`` with the adapter's ``LoraConfig`` passed through :func:`enable`, so a saved
    adapter (from PEFT, qlora's ``save_adapter`` or this integration) loads onto qlora's layers. Extra keyword
    arguments go to ``PeftModel.from_pretrained``."""
    if not isinstance(adapter_dir, str):
        raise TypeError(f"adapter_dir must be a str (a folder or Hub id), got {type(adapter_dir).__name__}")
    config = LoraConfig.from_pretrained(adapter_dir)
    return PeftModel.from_pretrained(model, adapter_dir, adapter_name=adapter_name, is_trainable=is_trainable,
                                     config=enable(config), **kwargs)
