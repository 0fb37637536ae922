"""``QLoRALinear``: a frozen NF4 base weight plus a trainable LoRA adapter, as PEFT builds it over bitsandbytes.

A thin module over :func:`qlora.functional.qlora_linear`. The NF4 weight is always held as frozen parameters and
buffers that no dtype conversion casts (``nf4_packed``: the packed bytes viewed as ``quant_storage``, uint8 by
default; ``nf4_absmax``, ``nf4_absmax2``, ``nf4_code``, ``nf4_nested_code``: uint8 codes or float32 bit patterns
as int32), so ``Module.to``, DDP, FSDP2 and DCP see it; each forward views them as an :class:`~qlora.nf4.NF4Weight`
(cached while the tensors stay the same). The state dict holds bitsandbytes' keys (``docs/SPEC.md`` section 5).
Table of the tensors and why: ``docs/FSDP.md``; merging and defaults: ``docs/DESIGN.md``. What is specific to
sharded (FSDP2) parameters lives in :mod:`qlora.distributed`.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import nn

from ._dtensor import bitcast, is_dtensor
from .bnb_format import encode_quant_state, nf4_keys
from .functional import qlora_linear
from .kernels._checks import FLOAT_DTYPES
from .nf4 import NF4Weight, quantize_nf4, requantize_nf4

__all__ = ["QLoRALinear", "QUANT_STORAGES", "DEFAULT_R", "DEFAULT_LORA_ALPHA", "DEFAULT_LORA_DROPOUT"]

# The adapter defaults of every entry point (QLoRALinear, QLoRALinear.from_linear, qlora.prepare_model,
# qlora.integrations.bitsandbytes.adopt_linear4bit): peft.LoraConfig's, so code moved from PEFT behaves the same.
DEFAULT_R = 8
DEFAULT_LORA_ALPHA = 8
DEFAULT_LORA_DROPOUT = 0.0

# Dtypes the packed bytes may be viewed as. uint8 is the default and the safe choice under FSDP2 (never cast); the
# float dtypes reproduce bitsandbytes' ``quant_storage`` layout.
QUANT_STORAGES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)
# Names of the tensors that hold the NF4 weight.
_PACKED, _ABSMAX, _ABSMAX2 = "nf4_packed", "nf4_absmax", "nf4_absmax2"
_CODE, _NESTED_CODE = "nf4_code", "nf4_nested_code"
_QUANT_PARAMS = (_PACKED, _ABSMAX, _ABSMAX2)
_QUANT_BUFFERS = (_CODE, _NESTED_CODE)


class QLoRALinear(nn.Module):
    """``y = x @ W^T + (lora_alpha / r) * (dropout(x) @ lora_A^T) @ lora_B^T + bias`` with W frozen in NF4.

    Args:
        weight: the NF4 base weight, shape (out_features, in_features).
        r: LoRA rank (>= 1, default 8); lora_alpha: scaling numerator (``scaling = lora_alpha / r``, default 8).
        use_rslora: rank-stabilized LoRA (PEFT's ``use_rslora``): ``scaling = lora_alpha / sqrt(r)`` instead.
        lora_dropout: dropout probability in [0, 1) on the adapter's input, active in training mode (default 0).
        bias: optional (out_features,) tensor, copied into a parameter that is frozen (PEFT's ``bias="none"``);
            set ``layer.bias.requires_grad_(True)`` to train it.
        dtype: dtype of the adapter and bias, and so of the inputs (default: the weight's original dtype).
        quant_storage: the dtype the packed bytes are viewed as in the frozen parameter ``nf4_packed``: one of
            ``QUANT_STORAGES`` (uint8, the default; float16, bfloat16, float32: see :meth:`set_quant_storage`).

    Parameters: ``lora_A`` (r, in_features), Kaiming-uniform with ``a = sqrt(5)`` as PEFT initializes it;
    ``lora_B`` (out_features, r), zeros, so a fresh layer computes the quantized base layer exactly; the frozen
    ``nf4_packed``, ``nf4_absmax`` (and ``nf4_absmax2`` when double-quantized) holding the NF4 weight.

    Merging, as PEFT's bitsandbytes 4-bit LoRA layer: :meth:`merge` folds the adapter into the NF4 weight in place
    (requantizing; ``merged`` is then True and the forward is the base layer alone), :meth:`unmerge` takes it out
    again (requantizing again: approximate). :meth:`to_dense_linear` returns a separate dense ``nn.Linear``.
    """

    def __init__(self, weight: NF4Weight, r: int = DEFAULT_R, lora_alpha: float = DEFAULT_LORA_ALPHA,
                 lora_dropout: float = DEFAULT_LORA_DROPOUT,
                 bias: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                 quant_storage: torch.dtype = torch.uint8, use_rslora: bool = False) -> None:
        super().__init__()
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"weight must be a qlora.nf4.NF4Weight, got {type(weight).__name__}")
        if len(weight.shape) != 2 or 0 in weight.shape:
            raise ValueError(f"weight must be 2-dimensional (out_features, in_features), both >= 1, got "
                             f"{tuple(weight.shape)}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be an int >= 1, got {r!r}")
        if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real) or not math.isfinite(lora_alpha):
            raise TypeError(f"lora_alpha must be a finite real number, got {lora_alpha!r}")
        if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not (
                0.0 <= lora_dropout < 1.0):
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {lora_dropout!r}")
        if not isinstance(use_rslora, bool):
            raise TypeError(f"use_rslora must be a bool, got {type(use_rslora).__name__}")
        dtype = weight.dtype if dtype is None else dtype
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        _check_quant_storage(weight, quant_storage)
        self.out_features, self.in_features = (int(d) for d in weight.shape)
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.scaling = lora_alpha_scaling(lora_alpha, r, use_rslora)
        self.lora_dropout = float(lora_dropout)
        self.merged = False
        self._quant_storage = quant_storage
        self._nf4_meta: dict = {}
        self._nf4_view: tuple | None = None
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
        self._store(weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = DEFAULT_R, lora_alpha: float = DEFAULT_LORA_ALPHA,
                    lora_dropout: float = DEFAULT_LORA_DROPOUT,
                    blocksize: int = 64, double_quant: bool = True, use_rslora: bool = False) -> "QLoRALinear":
        """Quantize ``linear.weight`` to NF4 (bit-exact with bitsandbytes) and attach a fresh adapter in the
        weight's dtype; the bias, if any, is copied and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        with torch.no_grad():
            weight = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls(weight, r, lora_alpha, lora_dropout, bias=linear.bias, dtype=linear.weight.dtype,
                   use_rslora=use_rslora)

    def __getstate__(self):
        # The cached NF4Weight view is rebuilt from the tensors; a pickled or deep-copied one would be a copy.
        state = dict(self.__dict__)
        state["_nf4_view"] = None
        return state

    # -- where the NF4 weight lives ------------------------------------------------------------------------------
    @property
    def weight(self):
        """The frozen NF4 base weight: an :class:`~qlora.nf4.NF4Weight` of views of the parameters, or a
        :class:`qlora.distributed.ShardedNF4Weight` while FSDP2 holds them sharded."""
        if self._sharded():
            from .distributed import sharded_nf4_weight  # qlora.distributed imports this module

            return sharded_nf4_weight(self)
        return self._nf4

    @property
    def _nf4(self) -> NF4Weight:
        """The NF4 weight as views of the (unsharded; inside an FSDP2 forward/backward, gathered) parameters. The
        view is cached while the parameter objects and the packed bytes' address stay the same: replacing a tensor
        (loading, moving, FSDP2's gather) makes a new one."""
        params = self._parameters
        packed, absmax = params[_PACKED], params[_ABSMAX]
        if torch.compiler.is_compiling():  # traced once per graph: no cache (and no data_ptr on fake tensors)
            return self._view_parameters(packed, absmax)
        cached = self._nf4_view
        if cached is not None and cached[0] is packed and cached[1] is absmax and cached[2] == packed.data_ptr():
            return cached[3]
        weight = self._view_parameters(packed, absmax)
        self._nf4_view = (packed, absmax, packed.data_ptr(), weight)
        return weight

    @_nf4.setter
    def _nf4(self, weight: NF4Weight) -> None:
        # Assigning a new NF4 weight (as qlora.interop.load_quantized does) stores it in the layer's quant_storage.
        self._store(weight)

    @property
    def quant_storage(self) -> torch.dtype:
        """The dtype the packed bytes are viewed as in the frozen parameter ``nf4_packed`` (uint8 by default)."""
        return self._quant_storage

    def set_quant_storage(self, quant_storage: torch.dtype) -> "QLoRALinear":
        """View the packed bytes in ``nf4_packed`` as ``quant_storage``: ``torch.uint8`` (the default and the
        recommendation: no dtype conversion ever touches it, FSDP2's mixed precision included) or ``torch.float16``
        / ``torch.bfloat16`` / ``torch.float32`` (bitsandbytes' ``quant_storage`` layout; the packed byte count
        ``ceil(n/2)`` must then be a multiple of its item size, and under FSDP2 a ``MixedPrecisionPolicy`` whose
        ``param_dtype`` differs from it would cast the bytes, which the forward detects and refuses). The values,
        the forward and the state dict's bytes are unchanged; must be called before sharding. Returns ``self``.
        """
        if self._sharded():
            raise RuntimeError("set_quant_storage must be called before fully_shard: this layer is sharded")
        weight = self._nf4
        _check_quant_storage(weight, quant_storage)
        self._quant_storage = quant_storage
        self._store(weight)
        return self

    def _store(self, weight: NF4Weight) -> None:
        """Hold ``weight`` as the frozen parameters and buffers (replacing those of the previous one)."""
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"weight must be a qlora.nf4.NF4Weight, got {type(weight).__name__}")
        storage = self._quant_storage
        _check_quant_storage(weight, storage)
        for name in _QUANT_PARAMS:
            self._parameters.pop(name, None)
        for name in _QUANT_BUFFERS:
            self._buffers.pop(name, None)
            self._non_persistent_buffers_set.discard(name)
        self._nf4_view = None
        self._nf4_meta = dict(shape=weight.shape, dtype=weight.dtype, blocksize=weight.blocksize,
                              double_quant=weight.double_quant, offset=weight.offset,
                              nested_blocksize=weight.nested_blocksize)

        def frozen(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t, requires_grad=False)

        # Float32 tensors are held as their int32 bits: Module.to(dtype) and mixed precision cast floating tensors.
        self.register_parameter(_PACKED, frozen(weight.packed.view(storage).reshape(-1, 1)))
        absmax = weight.absmax if weight.double_quant else weight.absmax.view(torch.int32)
        self.register_parameter(_ABSMAX, frozen(absmax))
        self.register_buffer(_CODE, weight.code.view(torch.int32), persistent=False)
        if weight.double_quant:
            self.register_parameter(_ABSMAX2, frozen(weight.absmax2.view(torch.int32)))
            self.register_buffer(_NESTED_CODE, weight.nested_code.view(torch.int32), persistent=False)

    def _sharded(self) -> bool:
        return is_dtensor(self._parameters[_PACKED])

    def _view_parameters(self, packed: torch.Tensor, absmax: torch.Tensor) -> NF4Weight:
        """A new :class:`NF4Weight` of views of ``packed``, ``absmax`` and the other NF4 tensors."""
        if is_dtensor(packed):
            raise RuntimeError(
                "the NF4 weight of this QLoRALinear is sharded (FSDP2 gathers it only inside forward and backward); "
                "use qlora.distributed.full_state_dict(model) to gather it, or read the layer's shape and "
                "quantization settings from its attributes")
        if packed.dtype != self._quant_storage:
            raise RuntimeError(
                f"the packed NF4 weight has dtype {str(packed.dtype).replace('torch.', '')} but quant_storage is "
                f"{str(self._quant_storage).replace('torch.', '')}: something cast it (FSDP2's MixedPrecisionPolicy "
                "casts floating parameters to param_dtype); use quant_storage=torch.uint8, which nothing casts")
        m = self._nf4_meta
        dq = m["double_quant"]
        return NF4Weight(
            packed=packed.detach().view(torch.uint8).reshape(-1),
            absmax=absmax.detach() if dq else absmax.detach().view(torch.float32),
            code=self._buffers[_CODE].view(torch.float32),
            blocksize=m["blocksize"], shape=m["shape"], dtype=m["dtype"],
            absmax2=self._parameters[_ABSMAX2].detach().view(torch.float32) if dq else None,
            offset=m["offset"] if dq else None,
            nested_code=self._buffers[_NESTED_CODE].view(torch.float32) if dq else None,
            nested_blocksize=m["nested_blocksize"])

    def _quant_settings(self) -> tuple[int, bool]:
        """``(blocksize, double_quant)`` without touching the (possibly sharded) tensors."""
        return self._nf4_meta["blocksize"], self._nf4_meta["double_quant"]

    # -- compute ------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            # The adapter is in the NF4 weight: the base layer alone, as PEFT's forward of a merged layer. The fused
            # kernel stays the one base path; scaling 0 makes its (finite: merge quantized them) adapter term exact
            # zeros, and the detached adapters get no gradient.
            return qlora_linear(x, self._nf4, self.lora_A.detach(), self.lora_B.detach(), 0.0, self.bias,
                                dropout_p=0.0, training=self.training)
        return qlora_linear(x, self._nf4, self.lora_A, self.lora_B, self.scaling, self.bias,
                            dropout_p=self.lora_dropout, training=self.training)

    # -- merging, as PEFT's bitsandbytes Linear4bit LoRA layer does it ------------------------------------------
    def _delta_weight(self) -> torch.Tensor:
        """``scaling * lora_B @ lora_A`` in float32, (out_features, in_features)."""
        return self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Fold the adapter into the NF4 base weight in place, as PEFT's ``merge()`` on a 4-bit layer:
        ``W := NF4(dequantize(W) + scaling * lora_B @ lora_A)`` (:func:`qlora.nf4.requantize_nf4`; the sum in float32,
        rounded to the weight's original dtype, quantized with its blocksize and double quantization, held in the
        layer's ``quant_storage``). Afterwards ``merged`` is True and the forward computes the base layer alone.

        Lossy: every element of the merged weight is rounded to its block's NF4 grid, an error of up to half the
        widest gap between adjacent codebook values times the block's new absmax (about 0.15 * absmax), larger than
        the adapter's own effect when that is small. Merging an already merged layer warns and does nothing (PEFT's
        "All adapters are already merged"); each merge warns about the rounding as PEFT does. ``safe_merge`` raises
        ``ValueError`` before anything changes when the merged weight would hold NaN/Inf. Not while FSDP2 holds the
        weight sharded.
        """
        if not isinstance(safe_merge, bool):
            raise TypeError(f"safe_merge must be a bool, got {type(safe_merge).__name__}")
        if self.merged:
            warnings.warn("All adapters are already merged, nothing to do.")
            return
        warnings.warn("Merge lora module to 4-bit linear may get different generations due to rounding errors.")
        self._store(requantize_nf4(self._nf4, self._delta_weight(), safe_merge, what="of this QLoRALinear"))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter out of the NF4 weight again, as PEFT's ``unmerge()`` on a 4-bit layer:
        ``W := NF4(dequantize(W) - scaling * lora_B @ lora_A)``. Approximate: it subtracts from the requantized
        merged weight and rounds to the NF4 grid a second time, so the bytes differ from those before :meth:`merge`
        (each element within the two roundings' errors of the original). Unmerging a layer that is not merged warns
        and does nothing (PEFT's "Already unmerged"); otherwise it warns about the rounding as PEFT does.
        """
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        warnings.warn("Unmerge lora module to 4-bit linear may get different generations due to rounding errors.")
        self._store(requantize_nf4(self._nf4, -self._delta_weight()))
        self.merged = False

    @torch.no_grad()
    def to_dense_linear(self) -> nn.Linear:
        """A new dense ``nn.Linear`` in the base weight's original dtype computing the layer's function (without
        dropout); the layer itself is unchanged. ``W = dequantize(float32) + scaling * (lora_B @ lora_A)`` in float32,
        rounded once (no NF4 requantization: the adapter is not rounded to the 4-bit grid); when the layer is merged
        the adapter is already in the NF4 weight, so ``W = dequantize``. The bias copied."""
        dense = self._nf4.dequantize(torch.float32)
        if not self.merged:
            dense += self._delta_weight()
        dtype = self._nf4.dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=dtype,
                           device=dense.device)
        linear.weight.copy_(dense.to(dtype))
        if self.bias is not None:
            linear.bias.copy_(self.bias.to(dtype))
        return linear

    def extra_repr(self) -> str:
        blocksize, double_quant = self._quant_settings()
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, {'use_rslora=True, ' if self.use_rslora else ''}"
                f"scaling={self.scaling:g}, lora_dropout={self.lora_dropout:g}, "
                f"bias={self.bias is not None}, {'merged=True, ' if self.merged else ''}quant=nf4, "
                f"blocksize={blocksize}, double_quant={double_quant}, "
                f"quant_storage={str(self._quant_storage).replace('torch.', '')}, "
                f"dtype={str(self.lora_A.dtype).replace('torch.', '')}")

    # -- devices: the NF4 weight follows the module across devices, never across dtypes ------------------------
    def _apply(self, fn, recurse=True):
        # Hide the NF4 tensors from nn.Module._apply (it would cast a float quant_storage, or everything under
        # Module.type()), then move them by hand where fn sends an empty probe.
        hidden = [(store, name, store[name]) for store in (self._parameters, self._buffers)
                  for name in (*_QUANT_PARAMS, *_QUANT_BUFFERS) if store.get(name) is not None]
        for store, name, _ in hidden:
            store[name] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for store, name, t in hidden:
                store[name] = t
        device = self._parameters[_PACKED].device
        probe = fn(torch.empty(0, device=device))
        if probe.device != device:
            self._nf4_view = None  # it would keep the tensors on the old device alive
            for store, name, t in hidden:
                moved = t.detach().to(probe.device)
                store[name] = nn.Parameter(moved, requires_grad=False) if store is self._parameters else moved
        return self

    # -- state dict: bitsandbytes keys -------------------------------------------------------------------------
    def _bnb_keys(self, key: str) -> list[str]:
        _, double_quant = self._quant_settings()
        return nf4_keys(key, double_quant)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        key = prefix + "weight"
        for name in _QUANT_PARAMS:
            destination.pop(prefix + name, None)
        params, m = self._parameters, self._nf4_meta
        dq = m["double_quant"]

        def own(t):  # the parameter itself (keep_vars) or a detached alias; a DTensor under FSDP2
            return t if keep_vars else t.detach()

        # The packed bytes in the quant_storage dtype, as bitsandbytes writes them; float32 bits shown as float32.
        # Keys from qlora.bnb_format.nf4_keys, in its (bitsandbytes') order, as NF4Weight.to_bnb_state_dict.
        values = [own(params[_PACKED]),
                  own(params[_ABSMAX]) if dq else bitcast(params[_ABSMAX].detach(), torch.float32),
                  self._buffers[_CODE].view(torch.float32)]
        if dq:
            values += [bitcast(params[_ABSMAX2].detach(), torch.float32),
                       self._buffers[_NESTED_CODE].view(torch.float32)]
        values.append(encode_quant_state(m["blocksize"], m["dtype"], m["shape"],
                                         (m["nested_blocksize"], m["offset"]) if dq else None))
        destination.update(zip(nf4_keys(key, dq), values, strict=True))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        present = {k for k in state_dict if k == key or k.startswith(key + ".")}
        if key in state_dict:
            try:
                if self._sharded():
                    from .distributed import load_sharded_nf4  # qlora.distributed imports this module

                    load_sharded_nf4(self, state_dict, key)
                else:
                    self._load_whole(state_dict, key)
            except (KeyError, TypeError, ValueError) as err:
                error_msgs.append(f"while loading the NF4 weight {key!r}: {err.args[0] if err.args else err}")
        elif strict:
            missing_keys.extend(sorted(self._bnb_keys(key)))
        if strict:
            # Entries under the weight's name that no NF4 weight of this layout has (a stray "weight.foo", or nested
            # entries next to a weight that is not double-quantized) are unexpected, as nn.Module reports others.
            unexpected_keys.extend(sorted(present - set(self._bnb_keys(key))))
        rest = {k: v for k, v in state_dict.items() if k not in present}
        # nn.Module's loader must not look for the NF4 parameters under their own names: hide them.
        hidden = [(name, self._parameters[name]) for name in _QUANT_PARAMS if self._parameters.get(name) is not None]
        for name, _ in hidden:
            self._parameters[name] = None
        try:
            super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
        finally:
            for name, p in hidden:
                self._parameters[name] = p

    def _load_whole(self, state_dict, key: str) -> None:
        """Load a whole (unsharded) NF4 weight: any blocksize or double quantization, the layer's shape."""
        sharded = [k for k in self._bnb_keys(key) if is_dtensor(state_dict.get(k))]
        if sharded:
            raise ValueError(f"entry {sharded[0]!r} is a sharded DTensor but this layer is not sharded; gather the "
                             "state dict first (qlora.distributed.full_state_dict)")
        current = self._nf4
        weight = NF4Weight.from_bnb_state_dict(state_dict, key, device=current.device)
        if weight.shape != current.shape:
            raise ValueError(f"NF4 weight {key!r} has shape {tuple(weight.shape)}, the layer expects "
                             f"{tuple(current.shape)}")
        self._store(weight)


def lora_alpha_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """The LoRA scaling PEFT uses: ``lora_alpha / sqrt(r)`` with rank-stabilized LoRA (rsLoRA), else
    ``lora_alpha / r``."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _check_quant_storage_dtype(quant_storage) -> None:
    """``quant_storage`` is one of QUANT_STORAGES (TypeError naming the argument otherwise)."""
    if quant_storage not in QUANT_STORAGES:
        names = ", ".join(str(d).replace("torch.", "") for d in QUANT_STORAGES)
        hint = (" (the NF4 weight is always held as frozen parameters; None, the former plain-attribute storage, "
                "no longer exists: use torch.uint8)") if quant_storage is None else ""
        raise TypeError(f"quant_storage must be one of {names}, got {quant_storage!r}{hint}")


def _check_quant_storage(weight: NF4Weight, quant_storage: torch.dtype) -> None:
    """``quant_storage`` valid for ``weight``: one of QUANT_STORAGES whose item size divides the packed bytes."""
    _check_quant_storage_dtype(quant_storage)
    nbytes, size = weight.packed.numel(), quant_storage.itemsize
    if nbytes % size:
        raise ValueError(f"quant_storage={str(quant_storage).replace('torch.', '')} needs a packed byte count that is "
                         f"a multiple of {size}; a weight of shape {tuple(weight.shape)} packs into {nbytes} bytes "
                         "(use quant_storage=torch.uint8)")
