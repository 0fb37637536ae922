"""The NF4 weight container and its bitsandbytes / Hugging Face serialization.

``quantize_nf4(weight)`` turns a dense weight into an :class:`NF4Weight`: the packed 4-bit codes, the blockwise
scales (double-quantized by default) and the codebooks, exactly as bitsandbytes' ``Linear4bit`` stores them
(SPEC sections 2, 3 and 5). ``to_bnb_state_dict`` / ``from_bnb_state_dict`` read and write the keys a
Hugging Face 4-bit checkpoint holds, so checkpoints move both ways.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from dataclasses import dataclass, replace
from typing import Mapping

import torch

from .kernels import codebook as _codebook
from .kernels import quantize as _quantize
from .kernels._checks import check_backend_device, check_blocksize, check_finite

NESTED_BLOCKSIZE = 256
QUANT_TYPE = "nf4"
_STATE_KEY = "quant_state.bitsandbytes__nf4"

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


class _QuantStateView:
    """``weight.quant_state``: holds the JSON entry as the attribute ``bitsandbytes__nf4``, as a state dict key
    ``<prefix>.quant_state.bitsandbytes__nf4`` reads when resolved attribute by attribute."""

    def __init__(self, json_tensor: torch.Tensor) -> None:
        self.bitsandbytes__nf4 = json_tensor


class BnbKeyAttributes:
    """Attributes named after the bitsandbytes state dict keys (``quant_map``, ``nested_absmax``,
    ``nested_quant_map``, ``quant_state.bitsandbytes__nf4``; ``absmax`` is a field already), so that every key
    ``<module>.weight.<entry>`` that a layer's state dict holds also resolves with ``getattr`` from the module, as
    ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` resolves keys. (bitsandbytes' ``Params4bit``
    answers the same names.) Needs the fields ``packed``, ``code``, ``absmax2``, ``nested_code``, ``blocksize``,
    ``dtype``, ``shape``, ``offset``, ``nested_blocksize``; derives ``double_quant``, ``numel`` and ``device`` from
    them for every container that has those fields."""

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def quant_map(self) -> torch.Tensor:
        return self.code

    @property
    def nested_absmax(self) -> torch.Tensor | None:
        return self.absmax2

    @property
    def nested_quant_map(self) -> torch.Tensor | None:
        return self.nested_code

    @property
    def quant_state(self) -> _QuantStateView:
        nested = (self.nested_blocksize, self.offset) if self.double_quant else None
        return _QuantStateView(quant_state_tensor(self.blocksize, self.dtype, self.shape, nested))


@dataclass(frozen=True)
class NF4Weight(BnbKeyAttributes):
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

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    absmax2: torch.Tensor | None = None
    offset: float | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", torch.Size(self.shape))
        _validate(self)

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
        out = {
            prefix: self.packed.reshape(-1, 1),
            f"{prefix}.absmax": self.absmax,
            f"{prefix}.quant_map": self.code,
        }
        if self.double_quant:
            out[f"{prefix}.nested_absmax"] = self.absmax2
            out[f"{prefix}.nested_quant_map"] = self.nested_code
        out[f"{prefix}.{_STATE_KEY}"] = self.quant_state.bitsandbytes__nf4
        return out

    @classmethod
    def from_bnb_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], prefix: str, device: torch.device | str | None = None
    ) -> "NF4Weight":
        """Read the NF4 weight named ``prefix`` from a bitsandbytes / Hugging Face 4-bit state dict.

        The packed weight may be stored as uint8 or, as bitsandbytes' ``quant_storage`` does for FSDP, as another
        dtype whose bytes are the packed codes. Every key, dtype, shape and JSON field is checked, and the values
        that can be checked: ``quant_map`` must be the NF4 codebook and ``nested_quant_map`` the signed dynamic map
        (bit for bit), float32 block scales finite and >= 0, ``nested_offset`` a float32 value. A missing or
        malformed entry raises ``KeyError``/``ValueError`` naming the key. Tensors land on ``device`` (default:
        where they are).
        """
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")

        def get(key: str) -> torch.Tensor:
            if key not in state_dict:
                raise KeyError(f"state dict has no entry {key!r} (needed for the NF4 weight {prefix!r})")
            value = state_dict[key]
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"state dict entry {key!r} must be a tensor, got {type(value).__name__}")
            return value

        meta = _read_quant_state(get(f"{prefix}.{_STATE_KEY}"), f"{prefix}.{_STATE_KEY}")
        nested = "nested_offset" in meta or "nested_blocksize" in meta
        packed = get(prefix)
        if packed.dtype != torch.uint8:
            if packed.dtype.is_floating_point or packed.dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
                packed = packed.contiguous().view(torch.uint8)
            else:
                raise ValueError(f"state dict entry {prefix!r} must hold the packed bytes, got dtype {packed.dtype}")
        fields = dict(
            packed=packed.reshape(-1),
            absmax=get(f"{prefix}.absmax"),
            code=get(f"{prefix}.quant_map"),
            blocksize=meta["blocksize"],
            shape=torch.Size(meta["shape"]),
            dtype=_DTYPES_BY_NAME[meta["dtype"]],
        )
        if nested:
            fields.update(
                absmax2=get(f"{prefix}.nested_absmax"),
                nested_code=get(f"{prefix}.nested_quant_map"),
                offset=meta["nested_offset"],
                nested_blocksize=meta["nested_blocksize"],
            )
        weight = cls(**{k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in fields.items()})
        _check_bnb_values(prefix, weight.code, weight.absmax, weight.nested_code, weight.absmax2)
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
    if weight.dtype not in _DTYPE_NAMES:
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


def quant_state_tensor(blocksize: int, dtype: torch.dtype, shape, nested: tuple[int, float] | None) -> torch.Tensor:
    """The ``<prefix>.quant_state.bitsandbytes__nf4`` entry: 1-D uint8 CPU tensor of UTF-8 JSON with the keys and
    order of bitsandbytes' ``QuantState.as_dict(packed=True)``. ``nested`` is ``(nested_blocksize, offset)`` for a
    double-quantized weight, else None."""
    meta: dict[str, object] = {
        "quant_type": QUANT_TYPE,
        "blocksize": blocksize,
        "dtype": _DTYPE_NAMES[dtype],
        "shape": [int(d) for d in shape],
    }
    if nested is not None:
        nested_blocksize, offset = nested
        meta.update(nested_blocksize=nested_blocksize, nested_dtype="float32", nested_offset=float(offset))
    return torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)


def _read_quant_state(tensor: torch.Tensor, key: str) -> dict:
    """Decode and check the UTF-8 JSON that bitsandbytes packs into a uint8 tensor."""
    if tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise ValueError(f"state dict entry {key!r} must be a 1-D uint8 tensor of UTF-8 JSON, got "
                         f"{tensor.dtype} of shape {tuple(tensor.shape)}")
    try:
        meta = json.loads(bytes(tensor.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"state dict entry {key!r} is not valid UTF-8 JSON: {err}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"state dict entry {key!r} must hold a JSON object, got {type(meta).__name__}")
    required = {"quant_type": str, "blocksize": int, "dtype": str, "shape": list}
    for name, kind in required.items():
        if name not in meta:
            raise ValueError(f"state dict entry {key!r} lacks the JSON field {name!r}")
        if not isinstance(meta[name], kind) or isinstance(meta[name], bool):
            raise ValueError(f"JSON field {name!r} of {key!r} must be {kind.__name__}, got {meta[name]!r}")
    if meta["quant_type"] != QUANT_TYPE:
        raise ValueError(f"JSON field 'quant_type' of {key!r} is {meta['quant_type']!r}; only 'nf4' is supported")
    if meta["dtype"] not in _DTYPES_BY_NAME:
        raise ValueError(f"JSON field 'dtype' of {key!r} must be one of {sorted(_DTYPES_BY_NAME)}, got {meta['dtype']!r}")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in meta["shape"]):
        raise ValueError(f"JSON field 'shape' of {key!r} must be a list of non-negative ints, got {meta['shape']!r}")
    nested_fields = ("nested_blocksize", "nested_dtype", "nested_offset")
    present = [f for f in nested_fields if f in meta]
    if present and len(present) != len(nested_fields):
        missing = [f for f in nested_fields if f not in meta]
        raise ValueError(f"state dict entry {key!r} has {present} but lacks the JSON field(s) {missing}")
    if present:
        if meta["nested_dtype"] != "float32":
            raise ValueError(f"JSON field 'nested_dtype' of {key!r} must be 'float32', got {meta['nested_dtype']!r}")
        if not isinstance(meta["nested_blocksize"], int) or isinstance(meta["nested_blocksize"], bool):
            raise ValueError(f"JSON field 'nested_blocksize' of {key!r} must be an int, got {meta['nested_blocksize']!r}")
        offset = meta["nested_offset"]
        if not isinstance(offset, (int, float)) or isinstance(offset, bool) or not math.isfinite(offset):
            raise ValueError(f"JSON field 'nested_offset' of {key!r} must be a finite number, got {offset!r}")
        if not _is_float32_value(float(offset)):
            raise ValueError(f"JSON field 'nested_offset' of {key!r} must be a float32 value (bitsandbytes stores the "
                             f"offset as a float32 tensor; the kernels add it in float32), got {offset!r}")
        meta["nested_offset"] = float(offset)
    return meta


def _is_float32_value(x: float) -> bool:
    """Whether the Python float ``x`` is finite and exactly a float32 value (pure Python: no tensor is made)."""
    if not math.isfinite(x):
        return False
    try:
        return struct.unpack("f", struct.pack("f", x))[0] == x
    except OverflowError:  # beyond float32's range
        return False


@functools.lru_cache(maxsize=None)
def _reference_codebooks() -> tuple[torch.Tensor, torch.Tensor]:
    """The NF4 codebook and the signed dynamic map, as CPU tensors: the only ``quant_map``/``nested_quant_map``
    bitsandbytes writes for NF4 (and the only ones this package's quantizer produces)."""
    device = _codebook_device()
    return (_codebook.normal_float_codebook(4, device=device).cpu(),
            _codebook.dynamic_map(signed=True, device=device).cpu())


def _codebook_device() -> torch.device:
    from .kernels._runtime import kernel_device

    return kernel_device()


def _check_bnb_values(prefix: str, code: torch.Tensor, absmax: torch.Tensor, nested_code: torch.Tensor | None,
                      absmax2: torch.Tensor | None) -> None:
    """Values a bitsandbytes NF4 entry can never hold, named by key (the keys, dtypes and shapes are checked by
    the constructor): a ``quant_map`` other than the NF4 codebook (bit for bit), a ``nested_quant_map`` other than
    the signed dynamic map, and float32 block scales (``absmax`` without double quantization, ``nested_absmax``)
    that are NaN, infinite or negative. One reduction per scale tensor, at load only."""
    nf4, dynamic = _reference_codebooks()
    for key, value, want, what in ((f"{prefix}.quant_map", code, nf4, "the NF4 codebook"),
                                   (f"{prefix}.nested_quant_map", nested_code, dynamic, "the signed dynamic map")):
        if value is None or value.dtype != torch.float32 or value.shape != want.shape:
            continue  # the constructor names the dtype or shape at fault
        got = value.detach().cpu()
        if not torch.equal(got.view(torch.int32), want.view(torch.int32)):
            index = int((got.view(torch.int32) != want.view(torch.int32)).nonzero()[0][0])
            raise ValueError(f"state dict entry {key!r} must be {what} (only NF4 is supported); entry {index} is "
                             f"{got[index].item()!r}, expected {want[index].item()!r}")
    scales = [(f"{prefix}.nested_absmax", absmax2)] if absmax2 is not None else []
    if absmax.dtype == torch.float32:
        scales.append((f"{prefix}.absmax", absmax))
    for key, value in scales:
        if value.dtype != torch.float32 or not value.numel():
            continue
        bad = ~(torch.isfinite(value) & (value >= 0))
        if bool(bad.any()):
            index = int(bad.nonzero()[0][0])
            raise ValueError(f"state dict entry {key!r} must hold finite block scales >= 0; entry {index} is "
                             f"{value[index].item()!r}")


def _validate(w: NF4Weight) -> None:
    """Every field consistent with every other one; messages name the field."""
    n = math.prod(w.shape)
    check_blocksize(w.blocksize)
    if w.dtype not in _DTYPE_NAMES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {w.dtype}")
    for name in ("packed", "absmax", "code"):
        if not isinstance(getattr(w, name), torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(getattr(w, name)).__name__}")
    if w.packed.dtype != torch.uint8 or w.packed.dim() != 1 or w.packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed must be uint8 of shape ({(n + 1) // 2},) for shape {tuple(w.shape)}, got "
                         f"{w.packed.dtype} {tuple(w.packed.shape)}")
    if w.code.dtype != torch.float32 or tuple(w.code.shape) != (16,):
        raise ValueError(f"code must be float32 of shape (16,), got {w.code.dtype} {tuple(w.code.shape)}")
    nblocks = -(-n // w.blocksize)
    nested = (w.absmax2, w.offset, w.nested_code)
    if any(v is not None for v in nested) and any(v is None for v in nested):
        raise ValueError("absmax2, offset and nested_code must be given together (double quantization) or not at all")
    want_dtype = torch.uint8 if w.absmax2 is not None else torch.float32
    if w.absmax.dtype != want_dtype or tuple(w.absmax.shape) != (nblocks,):
        raise ValueError(f"absmax must be {want_dtype} of shape ({nblocks},) for {n} elements at blocksize "
                         f"{w.blocksize}, got {w.absmax.dtype} {tuple(w.absmax.shape)}")
    devices = {t.device for t in (w.packed, w.absmax, w.code, w.absmax2, w.nested_code) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors of an NF4Weight must be on one device, got {sorted(map(str, devices))}")
    if w.absmax2 is not None:
        if w.nested_blocksize != NESTED_BLOCKSIZE:
            raise ValueError(f"nested_blocksize must be {NESTED_BLOCKSIZE}, got {w.nested_blocksize!r}")
        nblocks2 = -(-nblocks // w.nested_blocksize)
        if w.absmax2.dtype != torch.float32 or tuple(w.absmax2.shape) != (nblocks2,):
            raise ValueError(f"absmax2 must be float32 of shape ({nblocks2},), got {w.absmax2.dtype} "
                             f"{tuple(w.absmax2.shape)}")
        if w.nested_code.dtype != torch.float32 or tuple(w.nested_code.shape) != (256,):
            raise ValueError(f"nested_code must be float32 of shape (256,), got {w.nested_code.dtype} "
                             f"{tuple(w.nested_code.shape)}")
        if not isinstance(w.offset, float) or not _is_float32_value(w.offset):
            raise ValueError(f"offset must be a finite Python float holding a float32 value, got {w.offset!r}")
