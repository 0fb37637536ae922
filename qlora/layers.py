"""``QLoRALinear``: a frozen NF4 base weight plus a trainable LoRA adapter, as PEFT builds it over bitsandbytes.

A thin module over :func:`qlora.functional.qlora_linear`. The NF4 weight is held as a plain attribute (an
immutable :class:`~qlora.nf4.NF4Weight`), not as buffers: ``module.to(torch.bfloat16)`` would otherwise cast its
float32 codebooks and scales. :meth:`_apply` moves it with the module's device changes (``.to(device)``,
``.cuda()``, ``.cpu()``), never its dtypes, and the state dict stores it under ``<prefix>weight`` with exactly the
keys of a bitsandbytes / Hugging Face 4-bit checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .functional import qlora_linear
from .nf4 import NF4Weight, quantize_nf4

__all__ = ["QLoRALinear"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class QLoRALinear(nn.Module):
    """``y = x @ W^T + (lora_alpha / r) * (dropout(x) @ lora_A^T) @ lora_B^T + bias`` with W frozen in NF4.

    Args:
        weight: the NF4 base weight, shape (out_features, in_features).
        r: LoRA rank (>= 1); lora_alpha: scaling numerator (``scaling = lora_alpha / r``).
        lora_dropout: dropout probability in [0, 1) on the adapter's input, active in training mode.
        bias: optional (out_features,) tensor, copied into a parameter that is frozen (PEFT's ``bias="none"``);
            set ``layer.bias.requires_grad_(True)`` to train it.
        dtype: dtype of the adapter and bias, and so of the inputs (default: the weight's original dtype).

    Parameters: ``lora_A`` (r, in_features), Kaiming-uniform with ``a = sqrt(5)`` as PEFT initializes it;
    ``lora_B`` (out_features, r), zeros, so a fresh layer computes the quantized base layer exactly.
    """

    def __init__(self, weight: NF4Weight, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 bias: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"weight must be a qlora.nf4.NF4Weight, got {type(weight).__name__}")
        if len(weight.shape) != 2:
            raise ValueError(f"weight must be 2-dimensional (out_features, in_features), got {tuple(weight.shape)}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be an int >= 1, got {r!r}")
        if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
            raise TypeError(f"lora_alpha must be a finite real number, got {lora_alpha!r}")
        if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not (
                0.0 <= lora_dropout < 1.0):
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {lora_dropout!r}")
        dtype = weight.dtype if dtype is None else dtype
        if dtype not in _FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.out_features, self.in_features = (int(d) for d in weight.shape)
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / r
        self.lora_dropout = float(lora_dropout)
        self._nf4 = weight
        device = weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if bias is None:
            self.register_parameter("bias", None)
        else:
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must be a tensor of shape ({self.out_features},), got "
                                 f"{getattr(bias, 'shape', type(bias).__name__)}")
            self.bias = nn.Parameter(bias.detach().to(device=device, dtype=dtype).clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    blocksize: int = 64, double_quant: bool = True) -> "QLoRALinear":
        """Quantize ``linear.weight`` to NF4 (bit-exact with bitsandbytes) and attach a fresh adapter in the
        weight's dtype; the bias, if any, is copied and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        with torch.no_grad():
            weight = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls(weight, r, lora_alpha, lora_dropout, bias=linear.bias, dtype=linear.weight.dtype)

    @property
    def weight(self) -> NF4Weight:
        """The frozen NF4 base weight."""
        return self._nf4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qlora_linear(x, self._nf4, self.lora_A, self.lora_B, self.scaling, self.bias,
                            dropout_p=self.lora_dropout, training=self.training)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A dense ``nn.Linear`` in the base weight's original dtype computing the same function (without dropout):
        ``W = dequantize(float32) + scaling * (lora_B @ lora_A)`` in float32, rounded once; the bias copied."""
        dense = self._nf4.dequantize(torch.float32)
        dense += self.scaling * (self.lora_B.float() @ self.lora_A.float())
        dtype = self._nf4.dtype
        merged = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=dtype,
                           device=dense.device)
        merged.weight.copy_(dense.to(dtype))
        if self.bias is not None:
            merged.bias.copy_(self.bias.to(dtype))
        return merged

    def extra_repr(self) -> str:
        w = self._nf4
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout:g}, "
                f"bias={self.bias is not None}, quant=nf4, blocksize={w.blocksize}, double_quant={w.double_quant}, "
                f"dtype={str(self.lora_A.dtype).replace('torch.', '')}")

    # The NF4 weight follows the module across devices, never across dtypes.
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, device=self._nf4.device))
        if probe.device != self._nf4.device:
            self._nf4 = self._nf4.to(probe.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.update(self._nf4.to_bnb_state_dict(prefix + "weight"))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        own = set(self._nf4.to_bnb_state_dict(key))
        present = {k for k in state_dict if k == key or k.startswith(key + ".")}
        if key in state_dict:
            try:
                weight = NF4Weight.from_bnb_state_dict(state_dict, key, device=self._nf4.device)
            except (KeyError, TypeError, ValueError) as err:
                error_msgs.append(f"while loading the NF4 weight {key!r}: {err}")
            else:
                if weight.shape != self._nf4.shape:
                    error_msgs.append(f"NF4 weight {key!r} has shape {tuple(weight.shape)}, the layer expects "
                                      f"{tuple(self._nf4.shape)}")
                else:
                    self._nf4 = weight
        elif strict:
            missing_keys.extend(sorted(own))
        rest = {k: v for k, v in state_dict.items() if k not in present}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
