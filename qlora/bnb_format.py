"""The bitsandbytes / Hugging Face 4-bit checkpoint format and the NF4 invariants, each rule in one place.

- Keys: an NF4 weight named ``p`` is stored as ``p`` (packed codes), ``p.absmax``, ``p.quant_map``, with double
  quantization ``p.nested_absmax`` and ``p.nested_quant_map``, and ``p.quant_state.bitsandbytes__nf4`` (JSON):
  :func:`nf4_keys`, :func:`quant_state_key`. The layout and the JSON fields are docs/SPEC.md section 5.
- The JSON codec: :func:`encode_quant_state` / :func:`decode_quant_state`, dtype names :data:`DTYPE_NAMES`.
- :func:`check_nf4`: the one validation of an NF4 weight's fields; ``NF4Weight``, :func:`read_nf4` (every loader)
  and the layers' state-dict loading call it. Messages name the argument (a field, a key or a JSON field).
- :func:`read_nf4`: the checked fields of an NF4 weight in a state dict, values included (docs/DESIGN.md, "Models,
  checkpoints, adapters", says why values are checked at load and not per call).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
import json
import math
import struct
from typing import Mapping

import torch

from .kernels import codebook as _codebook
from .kernels._checks import check_blocksize, check_same_device

__all__ = ["NESTED_BLOCKSIZE", "QUANT_TYPE", "QUANT_STATE_SUFFIX", "DTYPE_NAMES", "DTYPES_BY_NAME",
           "SAFETENSORS_METADATA", "NF4Fields", "nf4_keys", "quant_state_key", "is_quant_state_key",
           "encode_quant_state", "decode_quant_state", "check_nf4", "check_code_table", "state_dict_names",
           "read_nf4", "tensors_for_safetensors"]

NESTED_BLOCKSIZE = 256
QUANT_TYPE = "nf4"
# The JSON entry of a weight ``p`` is ``p.<QUANT_STATE_SUFFIX>``.
QUANT_STATE_SUFFIX = "quant_state.bitsandbytes__nf4"
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}
# transformers refuses safetensors files whose metadata does not say they hold PyTorch tensors.
SAFETENSORS_METADATA = {"format": "pt"}
# The key suffix under which each tensor field of an NF4 weight is stored (bitsandbytes' order).
_FIELD_SUFFIXES = {"packed": "", "absmax": ".absmax", "code": ".quant_map", "absmax2": ".nested_absmax",
                   "nested_code": ".nested_quant_map"}
# check_nf4's default names: each field by its own name.
_FIELD_NAMES = {f: f for f in ("packed", "absmax", "code", "absmax2", "nested_code", "offset", "blocksize",
                               "nested_blocksize", "shape", "dtype")}


def quant_state_key(prefix: str) -> str:
    """``<prefix>.quant_state.bitsandbytes__nf4``: the JSON entry of the weight named ``prefix``."""
    return f"{prefix}.{QUANT_STATE_SUFFIX}"


def is_quant_state_key(key: str) -> bool:
    return key.endswith("." + QUANT_STATE_SUFFIX)


def nf4_keys(prefix: str, double_quant: bool) -> list[str]:
    """Every key of the NF4 weight ``prefix``: four, six when double-quantized, in bitsandbytes' order."""
    fields = ("packed", "absmax", "code", "absmax2", "nested_code") if double_quant else ("packed", "absmax", "code")
    return [prefix + _FIELD_SUFFIXES[f] for f in fields] + [quant_state_key(prefix)]


# --------------------------------------------------------------------------------------------------------------
# The JSON quant state
# --------------------------------------------------------------------------------------------------------------

def encode_quant_state(blocksize: int, dtype: torch.dtype, shape, nested: tuple[int, float] | None) -> torch.Tensor:
    """The ``<prefix>.quant_state.bitsandbytes__nf4`` entry: 1-D uint8 CPU tensor of UTF-8 JSON with the keys and
    order of bitsandbytes' ``QuantState.as_dict(packed=True)``. ``nested`` is ``(nested_blocksize, offset)`` for a
    double-quantized weight, else None."""
    meta: dict[str, object] = {
        "quant_type": QUANT_TYPE,
        "blocksize": blocksize,
        "dtype": DTYPE_NAMES[dtype],
        "shape": [int(d) for d in shape],
    }
    if nested is not None:
        nested_blocksize, offset = nested
        meta.update(nested_blocksize=nested_blocksize, nested_dtype="float32", nested_offset=float(offset))
    return torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)


def decode_quant_state(tensor: torch.Tensor, key: str) -> dict:
    """The JSON object of the entry ``key`` (a 1-D uint8 tensor), with each field's type checked: ``quant_type``
    'nf4', ``blocksize`` int, ``dtype`` a name of :data:`DTYPE_NAMES`, ``shape`` a list of ints >= 0, and the nested
    fields all or none (``nested_offset`` returned as a Python float). ``blocksize``, ``nested_blocksize`` and
    ``nested_offset`` also meet :func:`check_nf4`'s rules, reported in its words."""
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise ValueError(f"state dict entry {key!r} must be a 1-D uint8 tensor of UTF-8 JSON, got "
                         f"{getattr(tensor, 'dtype', type(tensor).__name__)} of shape "
                         f"{tuple(getattr(tensor, 'shape', ()))}")
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
    if meta["dtype"] not in DTYPES_BY_NAME:
        raise ValueError(f"JSON field 'dtype' of {key!r} must be one of {sorted(DTYPES_BY_NAME)}, got {meta['dtype']!r}")
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
        if not isinstance(offset, (int, float)) or isinstance(offset, bool):
            raise ValueError(f"JSON field 'nested_offset' of {key!r} must be a number, got {offset!r}")
        meta["nested_offset"] = float(offset)
        # The value rules of the nested fields, in check_nf4's words, for readers that build no NF4Weight (a
        # sharded layer's load).
        _check_nested_blocksize(f"JSON field 'nested_blocksize' of {key!r}", meta["nested_blocksize"])
        _check_offset(f"JSON field 'nested_offset' of {key!r}", meta["nested_offset"])
    check_blocksize(meta["blocksize"], name=f"JSON field 'blocksize' of {key!r}")
    return meta


# --------------------------------------------------------------------------------------------------------------
# The NF4 invariants
# --------------------------------------------------------------------------------------------------------------

def state_dict_names(prefix: str) -> dict[str, str]:
    """How :func:`check_nf4` names each field of the weight ``prefix`` read from a state dict: by its key, or by
    its JSON field."""
    state = quant_state_key(prefix)
    names = {f: f"state dict entry {prefix + suffix!r}" for f, suffix in _FIELD_SUFFIXES.items()}
    names.update({f: f"JSON field {json_name!r} of {state!r}" for f, json_name in (
        ("offset", "nested_offset"), ("blocksize", "blocksize"), ("nested_blocksize", "nested_blocksize"),
        ("shape", "shape"), ("dtype", "dtype"))})
    return names


def _is_float32_value(x) -> bool:
    """Whether ``x`` is a finite Python float that is exactly a float32 value (pure Python: no tensor is made)."""
    if not isinstance(x, float) or not math.isfinite(x):
        return False
    try:
        return struct.unpack("f", struct.pack("f", x))[0] == x
    except OverflowError:  # beyond float32's range
        return False


def _check_offset(name: str, offset) -> None:
    if not _is_float32_value(offset):
        raise ValueError(f"{name} must be a float32 value held as a finite Python float (bitsandbytes stores it as "
                         f"a float32 tensor; the kernels add it in float32), got {offset!r}")


def _check_nested_blocksize(name: str, nested_blocksize) -> None:
    if isinstance(nested_blocksize, bool) or nested_blocksize != NESTED_BLOCKSIZE:
        raise ValueError(f"{name} must be {NESTED_BLOCKSIZE}, got {nested_blocksize!r}")


@functools.lru_cache(maxsize=None)
def _reference_codebooks() -> tuple[torch.Tensor, torch.Tensor]:
    """The NF4 codebook and the signed dynamic map, as CPU tensors: the only ``quant_map``/``nested_quant_map``
    bitsandbytes writes for NF4 (and the only ones this package's quantizer produces)."""
    from .kernels._runtime import kernel_device

    device = kernel_device()
    return (_codebook.normal_float_codebook(4, device=device).cpu(),
            _codebook.dynamic_map(signed=True, device=device).cpu())


def _check_table_bits(name: str, value: torch.Tensor, size: int) -> None:
    want, what = (_reference_codebooks()[0], "the NF4 codebook") if size == 16 else (
        _reference_codebooks()[1], "the signed dynamic map")
    got = value.detach().cpu()
    differs = got.view(torch.int32) != want.view(torch.int32)
    if bool(differs.any()):
        index = int(differs.nonzero()[0][0])
        raise ValueError(f"{name} must be {what} (only NF4 is supported); entry {index} is {got[index].item()!r}, "
                         f"expected {want[index].item()!r}")


def check_code_table(name: str, value, size: int) -> None:
    """``value`` is float32 ``(size,)`` and, bit for bit, the NF4 codebook (``size`` 16, a ``quant_map``) or the
    signed dynamic map (``size`` 256, a ``nested_quant_map``); ``name`` is what messages call it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype != torch.float32 or tuple(value.shape) != (size,):
        raise ValueError(f"{name} must be float32 of shape ({size},), got {value.dtype} {tuple(value.shape)}")
    _check_table_bits(name, value, size)


def _check_scales(name: str, value: torch.Tensor) -> None:
    bad = ~(torch.isfinite(value) & (value >= 0))
    if bool(bad.any()):
        index = int(bad.nonzero()[0][0])
        raise ValueError(f"{name} must hold finite block scales >= 0; entry {index} is {value[index].item()!r}")


def check_nf4(packed, absmax, code, blocksize, shape, dtype, absmax2=None, offset=None, nested_code=None,
              nested_blocksize=NESTED_BLOCKSIZE, *, names: Mapping[str, str] | None = None,
              values: bool = False) -> None:
    """Every field of an NF4 weight consistent with the others (the fields of ``qlora.nf4.NF4Weight``; ``n =
    prod(shape)``, ``nblocks = ceil(n / blocksize)``): ``packed`` uint8 ``(ceil(n/2),)``; ``absmax`` float32
    ``(nblocks,)``, or uint8 when double-quantized; ``code`` float32 ``(16,)``; ``absmax2`` float32
    ``(ceil(nblocks/256),)``, ``offset`` a float32 value as a Python float and ``nested_code`` float32 ``(256,)``, all
    three or none; ``blocksize`` one the kernels take, ``nested_blocksize`` 256; ``dtype`` float32, float16 or
    bfloat16; every tensor on one device.

    ``values`` also checks what the tensors hold (one reduction each, for loaders): ``code`` and ``nested_code``
    bit for bit the NF4 codebook and the signed dynamic map, float32 scales (``absmax`` without double
    quantization, ``absmax2``) finite and >= 0. ``names`` maps a field to what messages call it (default: the
    field's name; :func:`state_dict_names` for a state dict). Raises TypeError or ValueError.
    """
    # This runs whenever an NF4Weight is built (per forward when a layer views its parameters as one): plain Python
    # comparisons only, and no message is formatted unless a check fails.
    name = _FIELD_NAMES if names is None else {**_FIELD_NAMES, **names}
    check_blocksize(blocksize, name=name["blocksize"])
    if not isinstance(shape, (tuple, list, torch.Size)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"{name['shape']} must be a sequence of non-negative ints, got {shape!r}")
    shape = tuple(shape)
    if dtype not in DTYPE_NAMES:
        raise TypeError(f"{name['dtype']} must be float32, float16 or bfloat16, got {dtype}")
    for field, t in (("packed", packed), ("absmax", absmax), ("code", code)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name[field]} must be a torch.Tensor, got {type(t).__name__}")
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (n + 1) // 2:
        raise ValueError(f"{name['packed']} must be uint8 of shape ({(n + 1) // 2},) for shape {shape}, got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    if code.dtype != torch.float32 or tuple(code.shape) != (16,):
        raise ValueError(f"{name['code']} must be float32 of shape (16,), got {code.dtype} {tuple(code.shape)}")
    nested = (absmax2, offset, nested_code)
    if any(v is not None for v in nested) and any(v is None for v in nested):
        raise ValueError(f"{name['absmax2']}, {name['offset']} and {name['nested_code']} must be given together "
                         "(double quantization) or not at all")
    nblocks = -(-n // blocksize)
    want_dtype = torch.uint8 if absmax2 is not None else torch.float32
    if absmax.dtype != want_dtype or tuple(absmax.shape) != (nblocks,):
        raise ValueError(f"{name['absmax']} must be {want_dtype} of shape ({nblocks},) for {n} elements at blocksize "
                         f"{blocksize}, got {absmax.dtype} {tuple(absmax.shape)}")
    if absmax2 is not None:
        for field, t in (("absmax2", absmax2), ("nested_code", nested_code)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name[field]} must be a torch.Tensor, got {type(t).__name__}")
        _check_nested_blocksize(name["nested_blocksize"], nested_blocksize)
        nblocks2 = -(-nblocks // nested_blocksize)
        if absmax2.dtype != torch.float32 or tuple(absmax2.shape) != (nblocks2,):
            raise ValueError(f"{name['absmax2']} must be float32 of shape ({nblocks2},), got {absmax2.dtype} "
                             f"{tuple(absmax2.shape)}")
        if nested_code.dtype != torch.float32 or tuple(nested_code.shape) != (256,):
            raise ValueError(f"{name['nested_code']} must be float32 of shape (256,), got {nested_code.dtype} "
                             f"{tuple(nested_code.shape)}")
        _check_offset(name["offset"], offset)
    device = packed.device
    if absmax.device != device or code.device != device or (absmax2 is not None and (
            absmax2.device != device or nested_code.device != device)):
        check_same_device(**{name[f]: t for f, t in (("packed", packed), ("absmax", absmax), ("code", code),
                                                      ("absmax2", absmax2), ("nested_code", nested_code))})
    if not values:
        return
    _check_table_bits(name["code"], code, 16)
    if nested_code is not None:
        _check_table_bits(name["nested_code"], nested_code, 256)
    if absmax2 is not None:
        _check_scales(name["absmax2"], absmax2)
    else:
        _check_scales(name["absmax"], absmax)


def read_nf4(state_dict: Mapping[str, torch.Tensor], prefix: str, shape=None) -> dict:
    """The fields of the NF4 weight named ``prefix`` in a bitsandbytes / Hugging Face state dict, as keyword
    arguments of ``qlora.nf4.NF4Weight``, checked with :func:`check_nf4` (values included) naming keys.

    The packed weight may be stored as uint8 or, as bitsandbytes' ``quant_storage`` does for FSDP, as another
    dtype whose bytes are the packed codes. ``shape``, when given, is the shape the weight must have. A missing
    entry raises KeyError; a malformed one TypeError or ValueError; each names the key (or JSON field).
    """
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
    state_key = quant_state_key(prefix)
    if state_key not in state_dict:
        others = sorted(k for k in state_dict if k.startswith(f"{prefix}.quant_state."))
        if others:
            raise ValueError(f"state dict entry {others[0]!r} is not an NF4 quant state; only bitsandbytes' NF4 "
                             "format is supported")
        if prefix in state_dict:
            value = state_dict[prefix]
            raise KeyError(f"state dict has no entry {state_key!r}, so {prefix!r} ({getattr(value, 'dtype', '?')} "
                           f"{tuple(getattr(value, 'shape', ()))}) is not stored as an NF4 weight")
        raise KeyError(f"state dict has no entry {state_key!r} (needed for the NF4 weight {prefix!r})")

    def get(key: str) -> torch.Tensor:
        if key not in state_dict:
            raise KeyError(f"state dict has no entry {key!r} (needed for the NF4 weight {prefix!r})")
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state dict entry {key!r} must be a tensor, got {type(value).__name__}")
        return value

    meta = decode_quant_state(get(state_key), state_key)
    if shape is not None and tuple(meta["shape"]) != tuple(shape):
        raise ValueError(f"JSON field 'shape' of {state_key!r} is {meta['shape']}, but the weight must have shape "
                         f"{list(shape)}")
    nested = "nested_offset" in meta
    packed = get(prefix)
    if packed.dtype != torch.uint8:
        if packed.dtype.is_floating_point or packed.dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
            packed = packed.contiguous().view(torch.uint8)
        else:
            raise ValueError(f"state dict entry {prefix!r} must hold the packed bytes, got dtype {packed.dtype}")
    fields = dict(packed=packed.reshape(-1), absmax=get(prefix + _FIELD_SUFFIXES["absmax"]),
                  code=get(prefix + _FIELD_SUFFIXES["code"]), blocksize=meta["blocksize"],
                  shape=torch.Size(meta["shape"]), dtype=DTYPES_BY_NAME[meta["dtype"]])
    if nested:
        fields.update(absmax2=get(prefix + _FIELD_SUFFIXES["absmax2"]),
                      nested_code=get(prefix + _FIELD_SUFFIXES["nested_code"]),
                      offset=meta["nested_offset"], nested_blocksize=meta["nested_blocksize"])
    fields = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in fields.items()}
    check_nf4(**fields, names=state_dict_names(prefix), values=True)
    return fields


# --------------------------------------------------------------------------------------------------------------
# Containers and files
# --------------------------------------------------------------------------------------------------------------

class _QuantStateView:
    """``weight.quant_state``: holds the JSON entry as the attribute ``bitsandbytes__nf4``, as a state dict key
    ``<prefix>.quant_state.bitsandbytes__nf4`` reads when resolved attribute by attribute."""

    def __init__(self, json_tensor: torch.Tensor) -> None:
        self.bitsandbytes__nf4 = json_tensor


@dataclass(frozen=True)
class NF4Fields:
    """The fields of an NF4 weight, whole (:class:`~qlora.nf4.NF4Weight`) or sharded
    (:class:`~qlora.distributed.ShardedNF4Weight`), with the quantities they imply (``double_quant``, ``numel``,
    ``device``) and attributes named after the bitsandbytes state dict keys (``quant_map``, ``nested_absmax``,
    ``nested_quant_map``, ``quant_state.bitsandbytes__nf4``; ``absmax`` is a field already), so that every key
    ``<module>.weight.<entry>`` of a layer's state dict also resolves with ``getattr`` from the module, as
    ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` resolves keys (bitsandbytes' ``Params4bit``
    answers the same names)."""

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
        return _QuantStateView(encode_quant_state(self.blocksize, self.dtype, self.shape, nested))


def tensors_for_safetensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no storage, which is what safetensors can write: tied parameters and
    views of one buffer get their own copy (each key then loads on its own, as ``load_state_dict`` expects)."""
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if not t.is_contiguous() or (ptr is not None and ptr in seen):
            t = t.clone(memory_format=torch.contiguous_format)
            ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None:
            seen.add(ptr)
        out[key] = t
    return out
