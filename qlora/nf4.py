"""The NF4 weight container: :class:`NF4Weight`, :func:`quantize_nf4` and :func:`requantize_nf4`.

An :class:`NF4Weight` holds the packed 4-bit codes, the blockwise (by default double-quantized) scales and the
codebooks exactly as bitsandbytes' ``Linear4bit`` stores them (docs/SPEC.md sections 2, 3 and 5). Its fields are
checked on construction by :func:`qlora.bnb_format.check_nf4`, the one place the NF4 invariants live;
``to_bnb_state_dict`` / ``from_bnb_state_dict`` use the keys and JSON codec of :mod:`qlora.bnb_format`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import torch

from .bnb_format import DTYPE_NAMES, NESTED_BLOCKSIZE, NF4Fields, check_nf4, nf4_keys, read_nf4
from .kernels import codebook as _codebook
from .kernels import quantize as _quantize
from .kernels._checks import check_backend_device, check_blocksize, check_finite
from .kernels.linear import word_aligned


@dataclass(frozen=True)
class NF4Weight(NF4Fields):
    """A weight of ``shape`` quantized to NF4 in blocks of ``blocksize`` consecutive (row-major) elements.

    Fields (``n = prod(shape)``, ``nblocks = ceil(n / blocksize)``):

    - ``packed``: uint8 ``(ceil(n/2),)``, element ``2i`` in the high nibble of byte ``i``, ``2i+1`` in the low one;
    - ``absmax``: float32 ``(nblocks,)`` scales, or uint8 ``(nblocks,)`` codes of them when double-quantized;
    - ``absmax2``: float32 ``(ceil(nblocks/256),)`` scales of the scales (double-quantized only, else None);
    - ``offset``: the float32 mean subtracted from the scales before double quantization, as a Python float
      (double-quantized only, else None);
    - ``code``: float32 ``(16,)`` NF4 codebook; ``nested_code``: float32 ``(256,)`` signed dynamic map or None;
    - ``blocksize``, ``nested_blocksize`` (256), ``shape`` (torch.Size) and ``dtype`` (the original weight dtype,
      the default of :meth:`dequantize`).
    """

    def __post_init__(self) -> None:
        check_nf4(self.packed, self.absmax, self.code, self.blocksize, self.shape, self.dtype, self.absmax2,
                  self.offset, self.nested_code, self.nested_blocksize)
        object.__setattr__(self, "shape", torch.Size(self.shape))
        # Once here, so that no call copies it: a packed view at an odd address, copied where the GPU kernels read
        # 32-bit words (the same bytes; kernels/linear.py word_aligned).
        object.__setattr__(self, "packed", word_aligned(self.packed))

    @property
    def nbytes(self) -> int:
        """Bytes held by every tensor of the container, codebooks included."""
        tensors = [self.packed, self.absmax, self.code, self.absmax2, self.nested_code]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def bits_per_param(self) -> float:
        """Storage per weight element: 4-bit codes plus scales (the codebooks, a constant 1 KiB at most, excluded).

        4.5 at blocksize 64 without double quantization, about 4.127 with it (SPEC section 3).
        """
        if self.numel == 0:
            return 0.0
        scale_bytes = self.absmax.numel() * self.absmax.element_size()
        if self.absmax2 is not None:
            scale_bytes += self.absmax2.numel() * self.absmax2.element_size()
        return 8.0 * (self.packed.numel() + scale_bytes) / self.numel

    def kernel_kwargs(self) -> dict:
        """The weight as the keyword arguments of the kernel launchers (``qlora.kernels.linear.nf4_lora_forward`` /
        ``nf4_lora_backward``: ``packed``, ``absmax``, ``code``, ``shape`` as a tuple, ``blocksize``, ``absmax2``,
        ``offset``, ``nested_code``, ``nested_blocksize``)."""
        return dict(packed=self.packed, absmax=self.absmax, code=self.code, shape=tuple(self.shape),
                    blocksize=self.blocksize, absmax2=self.absmax2, offset=self.offset, nested_code=self.nested_code,
                    nested_blocksize=self.nested_blocksize)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight, ``shape``, in ``dtype`` (default: the original dtype); float32 arithmetic inside."""
        # dequantize_4bit rejects a dtype other than float32/float16/bfloat16 (TypeError naming ``dtype``).
        return _quantize.dequantize_4bit(
            self.packed,
            self.absmax,
            self.code,
            self.shape,
            self.blocksize,
            self.dtype if dtype is None else dtype,
            absmax2=self.absmax2,
            offset=self.offset,
            nested_code=self.nested_code,
            nested_blocksize=self.nested_blocksize,
        )

    def to(self, device: torch.device | str) -> "NF4Weight":
        """A copy with every tensor on ``device`` (self when already there)."""
        device = torch.device(device)
        if self.packed.device == device:
            return self

        def move(t):
            return None if t is None else t.to(device)

        return replace(
            self,
            packed=move(self.packed),
            absmax=move(self.absmax),
            code=move(self.code),
            absmax2=move(self.absmax2),
            nested_code=move(self.nested_code),
        )

    def to_bnb_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """The entries bitsandbytes' ``Linear4bit`` writes for a weight named ``prefix`` (SPEC section 5).

        ``prefix`` is the full weight key, e.g. ``"model.layers.0.mlp.up_proj.weight"``. The JSON entry has the
        keys and order of bitsandbytes' ``QuantState.as_dict(packed=True)``.
        """
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        nested = [self.absmax2, self.nested_code] if self.double_quant else []
        values = [self.packed.reshape(-1, 1), self.absmax, self.code, *nested, self.quant_state.bitsandbytes__nf4]
        return dict(zip(nf4_keys(prefix, self.double_quant), values, strict=True))

    @classmethod
    def from_bnb_state_dict(cls, state_dict: Mapping[str, torch.Tensor], prefix: str,
                            device: torch.device | str | None = None, shape=None) -> "NF4Weight":
        """Read the NF4 weight named ``prefix`` from a bitsandbytes / Hugging Face 4-bit state dict.

        :func:`qlora.bnb_format.read_nf4` reads and checks every entry, values included (the packed bytes may be
        stored in another dtype, as bitsandbytes' ``quant_storage`` does); a missing or malformed entry raises
        ``KeyError``/``TypeError``/``ValueError`` naming the key. ``shape``, when given, is the shape the weight must
        have. Tensors land on ``device`` (default: where they are).
        """
        weight = cls(**read_nf4(state_dict, prefix, shape))
        return weight if device is None else weight.to(device)


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a dense floating ``weight`` (any shape; fp32, fp16 or bf16) to NF4, bit-exact with bitsandbytes.

    Blocks run over the flattened (row-major) weight. With ``double_quant`` the float32 scales are themselves
    quantized to 8 bits in blocks of 256 around their mean (SPEC section 3). NaN/Inf in ``weight`` is rejected.

    Every argument is checked here, once; the launchers are then called without their own checks, which would
    re-validate the codebooks built just below and the scales of a finite weight (up to six more reductions, each
    a host sync on a GPU).
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in DTYPE_NAMES:
        raise TypeError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
    check_backend_device("weight", weight)
    check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    check_finite("weight", weight)
    code = _codebook.normal_float_codebook(4, device=weight.device)
    packed, absmax = _quantize._quantize_4bit(weight, code, blocksize)
    if not double_quant:
        return NF4Weight(packed=packed, absmax=absmax, code=code, blocksize=blocksize, shape=weight.shape,
                         dtype=weight.dtype)
    nested_code = _codebook.dynamic_map(signed=True, device=weight.device)
    qabsmax, absmax2, offset = _quantize._double_quantize(absmax, nested_code, NESTED_BLOCKSIZE)
    return NF4Weight(packed=packed, absmax=qabsmax, code=code, blocksize=blocksize, shape=weight.shape,
                     dtype=weight.dtype, absmax2=absmax2, offset=offset, nested_code=nested_code,
                     nested_blocksize=NESTED_BLOCKSIZE)


def requantize_nf4(weight: NF4Weight, delta: torch.Tensor, safe_merge: bool = False, what: str = "the adapter"
                   ) -> NF4Weight:
    """``NF4(dequantize(weight) + delta)``: what merging a LoRA adapter into a 4-bit weight (``delta`` = ``scaling *
    B @ A``) or unmerging it (``-delta``) does in PEFT's bitsandbytes layers.

    The sum is formed in float32 (``weight`` dequantized to float32, ``delta`` (out_features, in_features), any float
    dtype, promoted), rounded once to the weight's original dtype and quantized again with its blocksize and double
    quantization. Lossy: each element lands on the NF4 grid of its block's new scale (SPEC section 2), so a merge
    followed by an unmerge does not give back the original bytes. ``safe_merge`` checks the sum for NaN/Inf first
    and raises PEFT's ``ValueError`` naming ``what`` (quantization refuses non-finite values in any case).
    """
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be a qlora.nf4.NF4Weight, got {type(weight).__name__}")
    if not isinstance(delta, torch.Tensor) or not delta.is_floating_point() or tuple(delta.shape) != tuple(weight.shape):
        raise ValueError(f"delta must be a floating tensor of the weight's shape {tuple(weight.shape)}, got "
                         f"{getattr(delta, 'dtype', type(delta).__name__)} {tuple(getattr(delta, 'shape', ()))}")
    dense = weight.dequantize(torch.float32) + delta.to(device=weight.device, dtype=torch.float32)
    if safe_merge and not bool(torch.isfinite(dense).all()):
        raise ValueError(f"NaNs detected in the merged weights. The adapter {what} seems to be broken")
    return quantize_nf4(dense.to(weight.dtype), blocksize=weight.blocksize, double_quant=weight.double_quant)
