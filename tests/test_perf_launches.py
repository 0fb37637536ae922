"""Launches per layer forward and backward (perf/launches.py, printed by ``python -m perf roofline``), recorded from
actual calls of ``qlora_linear`` and its backward under the interpreter, against the counts the module docstring of
kernels/linear.py states: GEMV path 2 (a fill of its arrival counts and the GEMV, whose last programs sum
the partials; +1 dropout), dequantize-then-GEMM path 3 (+1 split lora_down, +1 dropout),
backward 5 (+1 split lora_down), 4 up to DOWN_GRAD_MAX_M (64) rows (g and dB in one launch, +1 when it splits);
under the interpreter, K a multiple of the blocksize, W is decoded in the GEMM's
K loop (no dequantize launch), which also computes u (without dropout) and g, and, when one row tile holds every
row, the LoRA and bias gradients (backward 1 launch, else 3); the dropout mask is generated once per forward +
backward."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import qlora  # noqa: F401  (interpreter switch before the kernels)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf import launches as L  # noqa: E402

# The fill that zeroes the GEMV's arrival counts is a torch launch, recorded by name (perf/launches.py).
GEMV = ["zero_fill", "_nf4_gemv_kernel"]
DEQUANT = ["_lora_down_kernel", "_dequantize_4bit_kernel", "_matmul_lora_kernel"]
BACKWARD = ["_lora_down_kernel", "_dequantize_4bit_kernel", "_matmul_lora_kernel", "_lora_grad_kernel",
            "_lora_grad_kernel"]
# Up to DOWN_GRAD_MAX_M rows g = dy B and dB = dy^T u share one pass over dy (kernels/lora.py lora_down_grad).
SMALL_BACKWARD = ["_lora_down_grad_kernel", "_dequantize_4bit_kernel", "_matmul_lora_kernel", "_lora_grad_kernel"]
# The GPU plan of the fused path (up to FUSED_MAX_M rows, K a multiple of the blocksize).
FUSED_BACKWARD = [name for name in BACKWARD if name != "_dequantize_4bit_kernel"]
SMALL_FUSED_BACKWARD = [name for name in SMALL_BACKWARD if name != "_dequantize_4bit_kernel"]
# The interpreter's plan when K is a multiple of the blocksize (kernels/linear.py, ``_launch_matmul``,
# ``_folds_down`` and ``_backward``): the fused GEMM computes u (without dropout) and g in its K loop, and dA, dB and
# the bias gradient too when one row tile (up to 2048 rows there) holds all M rows.
INTERPRETED_BACKWARD = ["_matmul_lora_kernel"]
INTERPRETED_BACKWARD_ROW_TILES = ["_matmul_lora_kernel", "_lora_grad_kernel", "_lora_grad_kernel"]


@pytest.mark.parametrize("m, k, forward, backward", [
    (1, 64, GEMV, INTERPRETED_BACKWARD),
    (40, 64, None, INTERPRETED_BACKWARD),  # above SMALL_M (32): the fused GEMM
    (2049, 64, None, INTERPRETED_BACKWARD_ROW_TILES),  # two row tiles of 2048: dA and dB by lora_grad
    (32, 96, DEQUANT, SMALL_BACKWARD),  # K not a multiple of the blocksize (64): the dequantize-then-GEMM path
    (65, 96, DEQUANT, BACKWARD),  # above DOWN_GRAD_MAX_M: g by lora_down, dB by lora_grad
], ids=["gemv", "fused", "fused_row_tiles", "dequant", "dequant_above_down_grad"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["no_dropout", "dropout"])
def test_recorded_launches_of_forward_and_backward(m, k, forward, backward, p):
    """Kernels launched by a real forward + backward (interpreter: no split reductions), in order; with dropout the
    mask kernel runs once, first in the forward, and never in the backward (which reads the saved mask). The fused
    forward reads u from lora_down only with dropout."""
    if forward is None:
        forward = ["_lora_down_kernel", "_matmul_lora_kernel"] if p else ["_matmul_lora_kernel"]
    rec = L.layer_launches(m, k, 24, 4, p, execute=True)
    assert list(rec.forward) == (["_dropout_bits_kernel"] if p else []) + forward
    assert list(rec.backward) == backward
    assert rec.counts() == (len(forward) + (p > 0), len(backward))


def test_stubbed_recording_counts_what_executes():
    """The roofline's count (kernel bodies stubbed) equals the executed one for the same shape and mode."""
    for m, p in ((1, 0.3), (32, 0.0)):
        ran = L.layer_launches(m, 64, 24, 4, p, execute=True)
        stubbed = L.layer_launches(m, 64, 24, 4, p, execute=False)
        assert (ran.forward, ran.backward) == (stubbed.forward, stubbed.backward)


def test_gpu_plan_adds_the_split_reductions():
    """As a 132-SM GPU plans a 4096 x 4096 layer: lora_down (u at M > 32, g above DOWN_GRAD_MAX_M rows) splits its
    reduction and a _sum_splits_kernel launch follows it, as it follows lora_down_grad (g split over dy's column
    tiles, with dB) up to DOWN_GRAD_MAX_M rows; the GEMV path (up to 32 rows) folds u into its own kernels."""
    rows = {(r.m, r.dropout_p): r for r in L.report(shapes=[(1, 4096, 4096, 16, 0.0), (1, 4096, 4096, 16, 0.1),
                                                            (32, 4096, 4096, 16, 0.1), (64, 4096, 4096, 16, 0.1),
                                                            (4096, 4096, 4096, 16, 0.0)])}
    # Up to FUSED_MAX_M rows (K a multiple of the blocksize) forward and dx decode W in the GEMM: no dequantize.
    split_backward = ["_lora_down_grad_kernel", "_sum_splits_kernel", *SMALL_FUSED_BACKWARD[1:]]
    assert list(rows[1, 0.0].forward) == GEMV and list(rows[1, 0.0].backward) == split_backward
    assert list(rows[1, 0.1].forward) == ["_dropout_bits_kernel", *GEMV]
    assert list(rows[32, 0.1].forward) == ["_dropout_bits_kernel", *GEMV]
    assert list(rows[64, 0.1].forward) == ["_dropout_bits_kernel", "_lora_down_kernel", "_sum_splits_kernel",
                                           "_matmul_lora_kernel"]
    assert list(rows[32, 0.1].backward) == list(rows[64, 0.1].backward) == split_backward
    # Above it, W is dequantized into a buffer before each dense GEMM.
    assert list(rows[4096, 0.0].forward) == ["_lora_down_kernel", "_sum_splits_kernel", *DEQUANT[1:]]
    assert list(rows[4096, 0.0].backward) == ["_lora_down_kernel", "_sum_splits_kernel", *BACKWARD[1:]]
    assert all(r.plan == "stubbed, GPU plan (132 SMs)" for r in rows.values())
    text = L.format_table(list(rows.values()))
    assert "dropout_bits, zero_fill, nf4_gemv" in text and "lora_grad x2" in text
    assert "lora_down_grad, sum_splits, matmul_lora, lora_grad" in text


def test_gpu_plan_needs_stubbed_kernels():
    with pytest.raises(ValueError, match="execute=False"):
        L.layer_launches(1, 64, 24, 4, execute=True, gpu_sms=132)


def test_stubbed_recording_leaves_no_codebook_built_by_a_stubbed_kernel():
    """A stubbed recording quantizes its weight with kernels that do not run: the NF4 table it builds on the way
    (uninitialized memory) must not stay in the codebook cache for the rest of the process."""
    from qlora.kernels import codebook as KC
    from qlora.reference import codebook as RC

    KC._normal_float_cached.cache_clear()
    L.layer_launches(32, 64, 24, 4, 0.0, execute=False)
    table = KC.normal_float_codebook(4)
    assert table.numpy().tobytes() == RC.normal_float_codebook(4).astype("float32").tobytes()


def test_stubbed_recording_never_quantizes_with_stubbed_kernels(monkeypatch):
    """The weight the recording uses is built without quantizing (n, k) under stubbed kernels: that left its scales
    uninitialized and the offset computed from them could come out inf, which the NF4 container refuses (a CI
    failure seen once, depending on what the allocator returned). Only a (1, 64) tensor is quantized, for real."""
    import qlora

    quantized = []
    real = qlora.quantize_nf4

    def spy(weight, *args, **kwargs):
        quantized.append(tuple(weight.shape))
        return real(weight, *args, **kwargs)

    monkeypatch.setattr(qlora, "quantize_nf4", spy)
    rec = L.layer_launches(32, 4096, 4096, 16, 0.0, execute=False, gpu_sms=132)
    assert quantized == [(1, 64)] and rec.forward
    weight = L._placeholder_weight(24, 64, torch.bfloat16, qlora.kernels.kernel_device())
    assert tuple(weight.shape) == (24, 64) and weight.offset == weight.offset and abs(weight.offset) < 1e30
    assert bool(torch.isfinite(weight.dequantize(torch.float32)).all())
