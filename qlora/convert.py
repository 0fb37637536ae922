"""``qlora quantize``: a safetensors checkpoint's linear weights to the bitsandbytes NF4 format.

:func:`select_linear_weights` picks the 2-D float ``*.weight`` tensors to quantize (the name rule, or PEFT's
suffix rule with targets: docs/DESIGN.md, "Models, checkpoints, adapters"). Each quantized weight ``K`` is
replaced by the entries bitsandbytes' ``Linear4bit`` writes (docs/SPEC.md section 5, via
:meth:`qlora.nf4.NF4Weight.to_bnb_state_dict`); every other tensor is copied bit for bit. The output is one
safetensors file with metadata ``{"format": "pt"}``; :mod:`qlora.hf_folder` builds whole model folders on it.
"""

from __future__ import annotations

import os
import re
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from .kernels._checks import BLOCKSIZES, FLOAT_DTYPES
from .model import _matches  # the PEFT suffix rule prepare_model's target_modules use
from .bnb_format import SAFETENSORS_METADATA
from .nf4 import quantize_nf4

__all__ = ["ConvertError", "ConvertSummary", "input_files", "select_linear_weights", "quantize_safetensors"]

_EXCLUDED = re.compile(r"embed|norm|^ln$|^ln_|^ln\d|^lm_head$", re.IGNORECASE)


class ConvertError(Exception):
    """A bad input path, output path or selection; the message names it."""


@dataclass
class ConvertSummary:
    """What :func:`quantize_safetensors` did. Bytes count tensor data only (no file header)."""

    quantized: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    params_quantized: int = 0
    bytes_before: int = 0  # every input tensor
    bytes_after: int = 0  # every output tensor
    quantized_bytes_before: int = 0  # the dense weights that were quantized
    quantized_bytes_after: int = 0  # their NF4 entries, codebooks and JSON included
    storage_bytes: int = 0  # packed codes and scales only (SPEC's bits per parameter)

    @property
    def bits_per_param(self) -> float:
        """Packed codes plus scales per quantized parameter (4.127 at blocksize 64 with double quantization)."""
        return 8.0 * self.storage_bytes / self.params_quantized if self.params_quantized else 0.0

    def add_quantized(self, key: str, weight: torch.Tensor, entries: dict[str, torch.Tensor], nf4) -> None:
        """Count the dense ``weight`` stored under ``key`` and the NF4 ``entries`` / ``nf4`` that replace it."""
        self.quantized.append(key)
        self.params_quantized += weight.numel()
        self.quantized_bytes_before += _nbytes(weight)
        self.quantized_bytes_after += sum(_nbytes(v) for v in entries.values())
        self.storage_bytes += _nbytes(nf4.packed) + _nbytes(nf4.absmax) + (
            _nbytes(nf4.absmax2) if nf4.absmax2 is not None else 0)


def input_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of ``path``: the file itself, or every ``*.safetensors`` of a directory (sorted)."""
    p = Path(path)
    if not p.exists():
        raise ConvertError(f"IN {str(p)!r} does not exist")
    if p.is_dir():
        files = sorted(f for f in p.glob("*.safetensors") if f.is_file())
        if not files:
            raise ConvertError(f"IN {str(p)!r} is a directory without *.safetensors files")
        return files
    if not p.is_file():
        raise ConvertError(f"IN {str(p)!r} is neither a file nor a directory")
    return [p]


def _is_candidate(key: str, t: torch.Tensor) -> bool:
    return key.endswith(".weight") and t.dim() == 2 and t.dtype in FLOAT_DTYPES and t.numel() > 0


def select_linear_weights(tensors: dict[str, torch.Tensor], targets: Sequence[str] | None = None) -> list[str]:
    """The keys of ``tensors`` to quantize, in sorted order, by the rule of the module docstring."""
    chosen = []
    for key in sorted(tensors):
        t = tensors[key]
        if not _is_candidate(key, t):
            continue
        module = key[: -len(".weight")]
        if targets:
            if _matches(module, targets):
                chosen.append(key)
        elif not any(_EXCLUDED.search(part) for part in module.split(".")):
            chosen.append(key)
    return chosen


def _check_out_kind(out: Path) -> None:
    """OUT may be absent or a regular file: a symbolic link or a special file (a device such as /dev/null, a FIFO,
    a socket) would be replaced by the rename that writes OUT."""
    if out.is_symlink():
        raise ConvertError(f"OUT {str(out)!r} is a symbolic link; give the path of the file itself (writing OUT "
                           "replaces it)")
    if out.exists() and out.is_dir():
        raise ConvertError(f"OUT {str(out)!r} is a directory; give the path of the file to write")
    if out.exists() and not stat.S_ISREG(out.stat().st_mode):
        raise ConvertError(f"OUT {str(out)!r} exists and is not a regular file (a device, FIFO or socket); give the "
                           "path of a file to write")


def _check_out(out: Path) -> None:
    _check_out_kind(out)
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConvertError(f"OUT {str(out)!r}: cannot create the directory {str(parent)!r}: "
                           f"{err.strerror or err}") from None
    if not os.access(parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ConvertError(f"OUT {str(out)!r} is not writable")


def _read(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for f in files:
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as err:
            raise ConvertError(f"IN {str(f)!r} is not a readable safetensors file: {err}") from None
        for key, value in part.items():
            if key in tensors:
                raise ConvertError(f"IN: the tensor {key!r} is in both {str(origin[key])!r} and {str(f)!r}")
            tensors[key] = value
            origin[key] = f
    return tensors


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def check_blocksize_and_targets(blocksize: int, targets: Sequence[str] | None) -> list[str] | None:
    """``targets`` as a list (None stays None); ``ConvertError`` naming ``--blocksize`` or ``--target`` when the
    blocksize is not one of ``BLOCKSIZES`` or a target is not a dotted module name suffix."""
    if isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise ConvertError(f"--blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, got {blocksize!r}")
    if targets is None:
        return None
    targets = list(targets)
    for t in targets:
        if not t or t.startswith(".") or t.endswith(".") or ".." in t:
            raise ConvertError(f"--target {t!r} is not a module name suffix such as 'query' or "
                               f"'attention.self.query'")
    return targets


def nothing_selected(src: str | os.PathLike, targets: Sequence[str] | None) -> ConvertError:
    """The error for a checkpoint ``src`` in which the selection (``targets`` or the default rule) found nothing."""
    if targets:
        return ConvertError(f"--target {' '.join(targets)}: no 2-D floating '*.weight' tensor of {str(src)!r} "
                            f"has a matching name")
    return ConvertError(f"IN {str(src)!r}: nothing to quantize (no 2-D float32/float16/bfloat16 '*.weight' "
                        f"tensor outside embeddings, norms and lm_head)")


def nf4_entries(key: str, weight: torch.Tensor, device, blocksize: int, double_quant: bool, taken):
    """``(entries, nf4)``: bitsandbytes' ``Linear4bit`` entries (SPEC section 5) of the finite float weight stored
    under ``key``, on the CPU, and its :class:`~qlora.nf4.NF4Weight`; ``ConvertError`` naming the key when it holds
    NaN/Inf or when an entry would overwrite a key of ``taken``."""
    if not bool(torch.isfinite(weight).all()):
        raise ConvertError(f"IN: the tensor {key!r} holds NaN or Inf; NF4 quantization needs finite weights")
    with torch.no_grad():
        nf4 = quantize_nf4(weight.to(device), blocksize=blocksize, double_quant=double_quant)
    entries = {k: v.cpu().contiguous() for k, v in nf4.to_bnb_state_dict(key).items()}
    for k in entries:
        if k != key and k in taken:
            raise ConvertError(f"IN: the tensor {k!r} would be overwritten by the NF4 entries of {key!r}")
    return entries, nf4


def quantize_safetensors(src: str | os.PathLike, dst: str | os.PathLike, blocksize: int = 64,
                         double_quant: bool = True, targets: Sequence[str] | None = None,
                         device: torch.device | str | None = None, progress: bool | None = None) -> ConvertSummary:
    """Quantize the linear weights of the checkpoint ``src`` (a file or a directory of shards) into ``dst``.

    Args:
        blocksize: NF4 block size, one of 32, 64, ..., 4096; double_quant: quantize the scales too (SPEC 3).
        targets: module name suffixes restricting the selection (see the module docstring); None: the default rule.
        device: where the kernels run (default: CPU under the Triton interpreter, else CUDA); the output is
            written from CPU tensors.
        progress: a tqdm bar over the weights (None: only on a terminal).

    Raises :class:`ConvertError` naming the path or key for a missing or unreadable input, an unwritable output
    or one that is not a regular file (a symbolic link, a device), a selection that is empty, an output key that
    would collide with an input key, a non-finite weight, or a failed write. The output file is written to a
    uniquely named temporary file in ``dst``'s folder and renamed, so a failed run leaves any old ``dst`` intact and
    no temporary file behind.
    """
    from ._runtime import interpreter_active

    targets = check_blocksize_and_targets(blocksize, targets)
    files = input_files(src)
    out = Path(dst)
    _check_out(out)
    if device is None:
        device = torch.device("cpu" if interpreter_active() else "cuda")
    tensors = _read(files)
    chosen = select_linear_weights(tensors, targets)
    if not chosen:
        raise nothing_selected(src, targets)

    summary = ConvertSummary()
    summary.bytes_before = sum(_nbytes(t) for t in tensors.values())
    chosen_set = set(chosen)
    result: dict[str, torch.Tensor] = {}
    show = progress if progress is not None else sys.stderr.isatty()
    for key in tqdm(chosen, desc="qlora quantize", unit="weight", disable=not show, file=sys.stderr):
        weight = tensors[key]
        entries, nf4 = nf4_entries(key, weight, device, blocksize, double_quant, tensors)
        result.update(entries)
        summary.add_quantized(key, weight, entries, nf4)
    for key, value in tensors.items():
        if key not in chosen_set:
            result[key] = value
            summary.copied.append(key)
    summary.bytes_after = sum(_nbytes(t) for t in result.values())

    _write_atomically(result, out)
    return summary


def _write_atomically(tensors: dict[str, torch.Tensor], out: Path) -> None:
    """Write ``tensors`` to ``out`` through a temporary file of a unique name in ``out``'s folder, renamed over
    ``out`` only once complete: a failure (disk full, a file size limit, an interrupt) leaves any old ``out`` as it
    was and no temporary file behind, and no other file is ever overwritten."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    parent = out.parent if str(out.parent) else Path(".")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent)
    except OSError as err:
        raise ConvertError(f"OUT {str(out)!r}: cannot create a temporary file in {str(parent)!r}: "
                           f"{err.strerror or err}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        # mkstemp makes the file private (0600); give it the mode a newly created file gets under the umask.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        save_file(tensors, str(tmp), metadata=SAFETENSORS_METADATA)
        _check_out_kind(out)  # OUT may have been replaced by a link or a device meanwhile
        os.replace(tmp, out)
    except (OSError, SafetensorError) as err:
        tmp.unlink(missing_ok=True)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ConvertError(f"OUT {str(out)!r}: writing failed: {reason}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
