"""``qlora quantize MODEL_DIR OUT_DIR``: a Hugging Face model folder to a 4-bit one that
``transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)`` loads with no extra argument.

The safetensors files keep their names (sharded like the input, with a new index), each selected linear weight
replaced by bitsandbytes' ``Linear4bit`` entries (:mod:`qlora.convert`); ``config.json`` gains the
``quantization_config`` ``transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", ...)``
writes, with ``llm_int8_skip_modules`` naming every 2-D weight left dense plus ``lm_head``; other top-level files
are copied. Written to a temporary folder renamed at the end. Layers must be ``nn.Linear`` (GPT-2's ``Conv1D`` is
not handled). Usage and options: README.md.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from .convert import (ConvertError, ConvertSummary, check_blocksize_and_targets, nf4_entries, nothing_selected,
                      select_linear_weights)
from .kernels._checks import FLOAT_DTYPES
from .bnb_format import DTYPE_NAMES, DTYPES_BY_NAME, SAFETENSORS_METADATA

__all__ = ["is_model_folder", "quantize_model_folder", "FolderSummary", "QUANT_STORAGE_NAMES"]

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
QUANT_STORAGE_NAMES = ("uint8", "float16", "bfloat16", "float32")
_QUANT_STORAGES = {"uint8": torch.uint8, "float16": torch.float16, "bfloat16": torch.bfloat16,
                   "float32": torch.float32}
# Files that hold weights in some format: never copied (the output holds the quantized safetensors only).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_WEIGHT_INDEXES = (INDEX_NAME, "pytorch_model.bin.index.json", "tf_model.h5.index.json",
                   "flax_model.msgpack.index.json")


@dataclass
class FolderSummary(ConvertSummary):
    """:class:`~qlora.convert.ConvertSummary` plus the files written: ``shards`` (safetensors, in order) and
    ``copied_files`` (names copied from the input folder)."""

    shards: list[str] = field(default_factory=list)
    copied_files: list[str] = field(default_factory=list)


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding ``config.json`` (a Hugging Face model folder)."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG_NAME).is_file()


def read_json_object(path: Path, what: str, error: type[Exception] = ConvertError) -> dict:
    """The JSON object in the UTF-8 file ``path``; ``error`` naming ``what`` and the path when the file cannot be
    read, is not JSON, or holds something other than an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{what} {str(path)!r} is not readable JSON: {err}") from None
    if not isinstance(value, dict):
        raise error(f"{what} {str(path)!r} must hold a JSON object")
    return value


def _shard_names(src: Path) -> list[str]:
    """The safetensors files of the model folder, in index order (or sorted when there is no index)."""
    index_path = src / INDEX_NAME
    if index_path.is_file():
        weight_map = read_json_object(index_path, "IN index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConvertError(f"IN index {str(index_path)!r} has no 'weight_map' object")
        names = list(dict.fromkeys(weight_map.values()))
        for name in names:
            if not isinstance(name, str) or os.path.basename(name) != name or not (src / name).is_file():
                raise ConvertError(f"IN index {str(index_path)!r} names the shard {name!r}, which is not a file "
                                   f"of {str(src)!r}")
        return names
    names = sorted(f.name for f in src.glob("*.safetensors") if f.is_file())
    if not names:
        others = sorted(f.name for f in src.iterdir() if f.suffix in _WEIGHT_SUFFIXES)
        hint = f" (it has {', '.join(others)}: save the model with safe_serialization=True)" if others else ""
        raise ConvertError(f"IN {str(src)!r} is a model folder without *.safetensors weights{hint}")
    return names


def _headers(src: Path, shards: list[str]) -> dict[str, tuple[str, torch.Tensor]]:
    """``key -> (shard, meta tensor of the key's shape and dtype)`` from the files' headers (no data read)."""
    from safetensors import SafetensorError, safe_open

    found: dict[str, tuple[str, torch.Tensor]] = {}
    for shard in shards:
        try:
            with safe_open(str(src / shard), framework="pt") as f:
                for key in f.keys():
                    if key in found:
                        raise ConvertError(f"IN: the tensor {key!r} is in both {found[key][0]!r} and {shard!r}")
                    piece = f.get_slice(key)
                    # Only floating tensors can be selected; any other dtype stands in as uint8 of its shape.
                    dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype(), torch.uint8)
                    found[key] = (shard, torch.empty(piece.get_shape(), dtype=dtype, device="meta"))
        except (SafetensorError, OSError) as err:
            raise ConvertError(f"IN {str(src / shard)!r} is not a readable safetensors file: {err}") from None
    return found


def _check_out(src: Path, out: Path) -> None:
    if out.resolve() == src.resolve():
        raise ConvertError(f"OUT {str(out)!r} is the input folder; give a new folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"OUT {str(out)!r} exists and is not an empty folder; it is never overwritten")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConvertError(f"OUT {str(out)!r}: cannot create the folder {str(parent)!r}: {err.strerror or err}") \
            from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConvertError(f"OUT {str(out)!r} is not writable")


def quantization_config(double_quant: bool, compute_dtype: torch.dtype, quant_storage: torch.dtype,
                        skip_modules: Sequence[str]) -> dict:
    """The ``quantization_config`` of config.json: the fields of transformers' ``BitsAndBytesConfig.to_dict()``
    for NF4 4-bit loading."""
    return {
        "quant_method": "bitsandbytes",
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": DTYPE_NAMES[compute_dtype],
        "bnb_4bit_quant_storage": str(quant_storage).replace("torch.", ""),
        "llm_int8_skip_modules": list(skip_modules),
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


def quantize_model_folder(src: str | os.PathLike, dst: str | os.PathLike, blocksize: int = 64,
                          double_quant: bool = True, targets: Sequence[str] | None = None,
                          compute_dtype: torch.dtype | str | None = None, quant_storage: torch.dtype | str = "uint8",
                          device: torch.device | str | None = None, progress: bool | None = None) -> FolderSummary:
    """Write the 4-bit model folder ``dst`` from the model folder ``src`` (see the module docstring).

    Args:
        blocksize, double_quant, targets: as :func:`qlora.convert.quantize_safetensors`.
        compute_dtype: ``bnb_4bit_compute_dtype`` (float32, float16, bfloat16; a dtype or its name); None: the
            dtype most of the quantized weights have.
        quant_storage: the dtype the packed bytes are stored as (uint8, float16, bfloat16, float32; bitsandbytes'
            ``bnb_4bit_quant_storage``, for FSDP); every quantized weight's packed byte count must be a multiple
            of its item size.
        device, progress: where the kernels run, and a tqdm bar over the weights (None: only on a terminal).

    Raises :class:`~qlora.convert.ConvertError` naming the path, key or option: no config.json or safetensors, a
    model already quantized, an output that exists and is not empty, an empty selection, a non-finite weight, a
    packed size the ``quant_storage`` cannot hold.
    """
    from safetensors.torch import load_file, save_file

    from ._runtime import interpreter_active

    src, out = Path(src), Path(dst)
    targets = check_blocksize_and_targets(blocksize, targets)
    if isinstance(quant_storage, str):
        if quant_storage not in _QUANT_STORAGES:
            raise ConvertError(f"--quant-storage must be one of {', '.join(QUANT_STORAGE_NAMES)}, got "
                               f"{quant_storage!r}")
        quant_storage = _QUANT_STORAGES[quant_storage]
    if quant_storage not in _QUANT_STORAGES.values():
        raise ConvertError(f"--quant-storage must be one of {', '.join(QUANT_STORAGE_NAMES)}, got {quant_storage!r}")
    if isinstance(compute_dtype, str):
        if compute_dtype not in DTYPES_BY_NAME:
            raise ConvertError(f"--compute-dtype must be one of float32, float16, bfloat16, got {compute_dtype!r}")
        compute_dtype = DTYPES_BY_NAME[compute_dtype]
    if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
        raise ConvertError(f"--compute-dtype must be one of float32, float16, bfloat16, got {compute_dtype!r}")
    if not is_model_folder(src):
        raise ConvertError(f"IN {str(src)!r} is not a model folder (a folder with {CONFIG_NAME})")
    config = read_json_object(src / CONFIG_NAME, "IN config")
    if config.get("quantization_config") is not None:
        raise ConvertError(f"IN {str(src / CONFIG_NAME)!r} already has a quantization_config: the model is "
                           "quantized already")
    shards = _shard_names(src)
    _check_out(src, out)
    headers = _headers(src, shards)
    stubs = {key: stub for key, (_, stub) in headers.items()}
    chosen = set(select_linear_weights(stubs, targets))
    if not chosen:
        raise nothing_selected(src, targets)
    itemsize = quant_storage.itemsize
    for key in sorted(chosen):
        packed_bytes = (stubs[key].numel() + 1) // 2
        if packed_bytes % itemsize:
            raise ConvertError(f"--quant-storage {str(quant_storage).replace('torch.', '')}: the tensor {key!r} "
                               f"packs into {packed_bytes} bytes, not a multiple of {itemsize}")
    if compute_dtype is None:
        compute_dtype = Counter(stubs[key].dtype for key in sorted(chosen)).most_common(1)[0][0]
    dense_modules = sorted(key[: -len(".weight")] for key, stub in stubs.items()
                           if key not in chosen and key.endswith(".weight") and stub.dim() == 2
                           and stub.dtype in FLOAT_DTYPES)
    skip = sorted(set(dense_modules) | {"lm_head"})
    if device is None:
        device = torch.device("cpu" if interpreter_active() else "cuda")

    summary = FolderSummary()
    tmp = out.with_name(f".{out.name}.qlora-tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    show = progress if progress is not None else sys.stderr.isatty()
    bar = tqdm(total=len(chosen), desc="qlora quantize", unit="weight", disable=not show, file=sys.stderr)
    try:
        tmp.mkdir()
        weight_map: dict[str, str] = {}
        for shard in shards:
            tensors = load_file(str(src / shard))
            result: dict[str, torch.Tensor] = {}
            for key, value in tensors.items():
                summary.bytes_before += value.numel() * value.element_size()
                if key not in chosen:
                    result[key] = value
                    summary.copied.append(key)
                    continue
                entries, nf4 = nf4_entries(key, value, device, blocksize, double_quant, headers)
                entries[key] = entries[key].reshape(-1).view(quant_storage).reshape(-1, 1)
                result.update(entries)
                summary.add_quantized(key, value, entries, nf4)
                bar.update()
            save_file(result, str(tmp / shard), metadata=SAFETENSORS_METADATA)
            summary.bytes_after += sum(v.numel() * v.element_size() for v in result.values())
            weight_map.update({key: shard for key in result})
            summary.shards.append(shard)
            del tensors, result
        if len(shards) > 1 or (src / INDEX_NAME).is_file():
            index = {"metadata": {"total_size": summary.bytes_after}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        config["quantization_config"] = quantization_config(double_quant, compute_dtype, quant_storage, skip)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name != CONFIG_NAME and f.name not in _WEIGHT_INDEXES and \
                    f.suffix not in _WEIGHT_SUFFIXES:
                shutil.copy2(f, tmp / f.name)
                summary.copied_files.append(f.name)
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(tmp, out)
    except OSError as err:
        raise ConvertError(f"OUT {str(out)!r}: writing failed: {err.strerror or err}") from None
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return summary
