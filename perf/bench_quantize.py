"""Benchmarks: NF4 quantize and dequantize (blocksize 64) of a bf16 weight, against bitsandbytes on a GPU.

GPU: a 4096 x 4096 bf16 weight. ``quantize`` times ``qlora.kernels.quantize.quantize_4bit`` (bf16 in, packed
codes and float32 absmax out); ``dequantize`` times ``NF4Weight.dequantize(bfloat16)`` of a double-quantized
weight, whose kernel decodes the uint8 scales in the same pass. bitsandbytes' ``quantize_4bit`` /
``dequantize_4bit`` (nf4, blocksize 64; ``compress_statistics`` False for quantize, True for dequantize) run
in the same session when ``import bitsandbytes`` works. ``extra_info`` holds the bytes moved, the achieved
bandwidth and its fraction of the peak (see ``perf/benchutil.py``).

CPU (Triton interpreter): a 1024 x 1024 weight, our kernels only, for orientation.

Run: ``.venv/bin/python -m pytest perf/bench_quantize.py --benchmark-only``.
"""

from __future__ import annotations

import math

import pytest
import torch

from perf import benchutil as bu
from perf import roofline as rl

import qlora
from qlora.kernels import codebook as _codebook
from qlora.kernels import quantize as _quantize

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
SHAPE = (4096, 4096) if bu.ON_GPU else (1024, 1024)
DTYPE = torch.bfloat16

bnb, BNB_REASON = bu.import_bitsandbytes()
IMPLS = ["qlora", pytest.param("bitsandbytes", marks=bu.bitsandbytes_marks(BNB_REASON))]


def quantize_4bit_bytes(n: int, blocksize: int = BLOCKSIZE, in_itemsize: int = 2) -> dict:
    """DRAM bytes of one 4-bit quantize of ``n`` elements: the input read once (``in_itemsize`` bytes each),
    the packed codes (one byte per two elements) and the float32 absmax (one per block) written."""
    read = in_itemsize * n
    written = -(-n // 2) + 4 * -(-n // blocksize)
    return {"read": read, "written": written, "total": read + written}


def dequantize_4bit_bytes(n: int, blocksize: int = BLOCKSIZE, nested_blocksize: int = NESTED_BLOCKSIZE,
                          out_itemsize: int = 2) -> dict:
    """DRAM bytes of one double-quantized 4-bit dequantize of ``n`` elements: the packed codes, the uint8
    scale codes (one per block) and the float32 second-level scales (one per ``nested_blocksize`` blocks)
    read; the output (``out_itemsize`` bytes each) written. The codebooks (1.1 KiB) are left out."""
    read = rl.nf4_storage_bytes(n, blocksize, nested_blocksize)
    written = out_itemsize * n
    return {"read": read, "written": written, "total": read + written}


def _shape_info(benchmark, direction: str, impl: str, counts: dict, seconds: float | None) -> None:
    benchmark.extra_info.update(
        impl=impl,
        op=direction,
        shape=list(SHAPE),
        dtype="bfloat16",
        blocksize=BLOCKSIZE,
        bytes_read=counts["read"],
        bytes_written=counts["written"],
        **bu.bandwidth_info(counts["total"], seconds),
    )


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    gen = torch.Generator(device=bu.DEVICE).manual_seed(0)
    return torch.randn(SHAPE, generator=gen, device=bu.DEVICE, dtype=torch.float32).mul_(0.02).to(DTYPE)


def _group(op: str) -> str:
    where = "GPU" if bu.ON_GPU else "Triton interpreter, orientation only"
    return f"{op} NF4 bs{BLOCKSIZE} {SHAPE[0]}x{SHAPE[1]} bf16 ({where})"


@pytest.mark.parametrize("impl", IMPLS)
def test_quantize(benchmark, weight, impl):
    benchmark.group = _group("quantize")
    if impl == "qlora":
        code = _codebook.normal_float_codebook(4, device=weight.device)

        def fn():
            return _quantize.quantize_4bit(weight, code, BLOCKSIZE)

        note = ("quantize_4bit also checks the input for NaN/Inf (one extra read of it and a host sync), "
                "which the byte count leaves out")
    else:
        def fn():
            return bnb.functional.quantize_4bit(weight, blocksize=BLOCKSIZE, compress_statistics=False,
                                                quant_type="nf4")

        note = "bitsandbytes.functional.quantize_4bit(nf4, blocksize=64, compress_statistics=False)"
    seconds = bu.run_benchmark(benchmark, fn)
    _shape_info(benchmark, "quantize", impl, quantize_4bit_bytes(math.prod(SHAPE)), seconds)
    benchmark.extra_info["note"] = note


@pytest.mark.parametrize("impl", IMPLS)
def test_dequantize(benchmark, weight, impl):
    benchmark.group = _group("dequantize (double-quantized scales)")
    if impl == "qlora":
        nf4 = qlora.quantize_nf4(weight, blocksize=BLOCKSIZE, double_quant=True)

        def fn():
            return nf4.dequantize(DTYPE)

        note = "NF4Weight.dequantize(bfloat16): one kernel decodes the uint8 scales and the codes"
    else:
        packed, state = bnb.functional.quantize_4bit(weight, blocksize=BLOCKSIZE, compress_statistics=True,
                                                     quant_type="nf4")

        def fn():
            return bnb.functional.dequantize_4bit(packed, state, blocksize=BLOCKSIZE, quant_type="nf4")

        note = "bitsandbytes.functional.dequantize_4bit of a compress_statistics=True state"
    seconds = bu.run_benchmark(benchmark, fn)
    _shape_info(benchmark, "dequantize", impl, dequantize_4bit_bytes(math.prod(SHAPE)), seconds)
    benchmark.extra_info["note"] = note
