"""The benchmark files' byte and FLOP counts, checked against hand-computed values, so a wrong bandwidth
formula fails here rather than printing a plausible number. No benchmark runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import qlora  # noqa: E402
from perf import bench_interpreter, bench_linear, bench_optim, bench_quantize  # noqa: E402
from perf import benchutil as bu  # noqa: E402

# --- quantize ---------------------------------------------------------------------------------------------


def test_quantize_bytes_1024_square():
    # n = 2**20: bf16 in 2n; out n/2 packed + 4 * n/64 float32 absmax.
    assert bench_quantize.quantize_4bit_bytes(1024 * 1024) == {
        "read": 2_097_152, "written": 524_288 + 65_536, "total": 2_686_976}


def test_quantize_bytes_4096_square():
    n = 4096 * 4096
    assert bench_quantize.quantize_4bit_bytes(n) == {
        "read": 33_554_432, "written": 8_388_608 + 1_048_576, "total": 42_991_616}


def test_quantize_bytes_rounds_partial_blocks_up():
    # 13000 elements: 6500 packed bytes, 204 blocks (the last one partial).
    assert bench_quantize.quantize_4bit_bytes(13_000) == {"read": 26_000, "written": 6_500 + 816, "total": 33_316}


def test_dequantize_bytes_1024_square():
    # n = 2**20: read n/2 packed + n/64 uint8 scale codes + 4 * (n/64/256) float32 absmax2; write 2n bf16.
    assert bench_quantize.dequantize_4bit_bytes(1024 * 1024) == {
        "read": 524_288 + 16_384 + 256, "written": 2_097_152, "total": 2_638_080}


def test_dequantize_bytes_4096_square():
    assert bench_quantize.dequantize_4bit_bytes(4096 * 4096) == {
        "read": 8_388_608 + 262_144 + 4_096, "written": 33_554_432, "total": 42_209_280}


def test_dequantize_bytes_rounds_partial_blocks_up():
    # 13000 elements: 6500 packed bytes, 204 scale codes, one (partial) nested block of absmax2.
    assert bench_quantize.dequantize_4bit_bytes(13_000) == {"read": 6_500 + 204 + 4, "written": 26_000,
                                                            "total": 32_708}


def test_dequantize_read_bytes_match_the_real_container():
    """What the formula says dequantize reads is what a double-quantized NF4Weight holds (codebooks aside)."""
    w = qlora.quantize_nf4(torch.randn(100, 130, dtype=torch.bfloat16), blocksize=64, double_quant=True)
    held = w.packed.numel() + w.absmax.numel() * w.absmax.element_size() + w.absmax2.numel() * 4
    assert held == bench_quantize.dequantize_4bit_bytes(13_000)["read"]
    assert held == bench_linear.nf4_weight_bytes(100, 130)


# --- linear ------------------------------------------------------------------------------------------------


def test_nf4_weight_bytes():
    assert bench_linear.nf4_weight_bytes(4096, 4096) == 8_388_608 + 262_144 + 4_096
    assert bench_linear.nf4_weight_bytes(256, 256) == 32_768 + 1_024 + 16
    assert bench_linear.dense_weight_bytes(4096, 4096) == 33_554_432


def test_linear_flops():
    m, n, k, r = 2, 3, 5, 7
    forward = 2 * 2 * 3 * 5 + 2 * 2 * 5 * 7 + 2 * 2 * 7 * 3  # x W^T, x A^T, u B^T
    backward = 60 + 84 + 140 + 84 + 140  # dy W, dy B, g A, dy^T u, g^T x
    assert bench_linear.linear_flops(m, n, k, r, "forward") == forward == 284
    assert bench_linear.linear_flops(m, n, k, r, "backward") == backward == 508
    assert bench_linear.linear_flops(m, n, k, r, "forward+backward") == 792
    with pytest.raises(ValueError):
        bench_linear.linear_flops(m, n, k, r, "sideways")


# --- interpreter ------------------------------------------------------------------------------------------


@pytest.mark.skipif(not qlora.interpreter_active(), reason="perf/bench_interpreter.py runs under the interpreter only")
def test_interpreter_bench_compares_layers_computing_the_same_function():
    """perf/bench_interpreter.py times a QLoRALinear against a plain-torch LoRA layer that holds the same dequantized
    base weight, bias and adapters: one forward + backward of each gives the same y and LoRA gradients up to float32
    summation order, at the demo's shapes (M > 16: the dequantize-then-GEMM path)."""
    s = bench_interpreter.DEMO_LAYER
    qlora_step, torch_step, layer, reference, x = bench_interpreter.demo_layer_workloads()
    assert tuple(x.shape) == (s["m"], s["in_features"]) == (112, 384) and s["out_features"] == 1536
    assert layer.lora_A.shape == (s["r"], 384) and reference.lora_B.shape == (1536, s["r"])
    assert bool((layer.lora_B != 0).any())  # the LoRA term is really computed
    y = layer(x.detach())
    y_ref = reference(x.detach())
    # Both sum K + r = 392 float32 products per output in different orders: each is within (K + r) * 2**-24 *
    # sum |terms| of the exact value (recursive summation, first order), so they differ by at most twice that.
    w = reference.base.weight.double()
    a, b = reference.lora_A.detach().double(), reference.lora_B.detach().double()
    x64 = x.detach().double()
    magnitude = (x64.abs() @ w.abs().t() + reference.base.bias.double().abs()
                 + layer.scaling * (x64.abs() @ a.abs().t()) @ b.abs().t())
    bound = 2 * (384 + s["r"]) * 2.0**-24 * magnitude
    assert bool(((y.detach().double() - y_ref.detach().double()).abs() <= bound).all())
    qlora_step()
    torch_step()
    # dy = 1: dA = scaling * (1 @ B)^T @ x sums N then M terms, dB = scaling * 1^T @ (x @ A^T) sums K then M
    # terms; the same first-order bound, doubled, over the sums of absolute terms.
    ones = torch.ones(s["m"], s["out_features"], dtype=torch.float64)
    bounds = {
        "lora_A": 2 * (s["out_features"] + s["m"]) * 2.0**-24 * layer.scaling * (ones @ b.abs()).t() @ x64.abs(),
        "lora_B": 2 * (384 + s["m"]) * 2.0**-24 * layer.scaling * ones.t() @ (x64.abs() @ a.abs().t()),
    }
    for name, bound in bounds.items():
        ours, theirs = getattr(layer, name).grad, getattr(reference, name).grad
        assert ours is not None and theirs is not None and ours.shape == theirs.shape == bound.shape
        assert bool(((ours.double() - theirs.double()).abs() <= bound).all()), name



@pytest.mark.skipif(not qlora.interpreter_active(), reason="perf/bench_interpreter.py runs under the interpreter only")
def test_interpreter_bench_compares_optimizers_taking_the_same_step():
    """perf/bench_interpreter.py's optimizer cases step copies of the same 72 adapter tensors with the same gradients:
    after one step qlora's 32-bit PagedAdamW equals torch's AdamW to float32 rounding (a few ulps of the update; the
    oracle tests bound it exactly), and AdamW8bit's parameters moved by the same first step (the first 8-bit step
    quantizes the new moments after using them, so it moves each parameter exactly as the 32-bit step does)."""
    steps, params = bench_interpreter.demo_adapter_workloads()
    shapes = bench_interpreter.DEMO_ADAPTER_SHAPES
    assert len(shapes) == 72 and sum(torch.Size(s).numel() for s in shapes) == 331776
    before = [p.detach().clone() for p in params["torch_AdamW_foreach"]]
    for step in steps.values():
        step()
    for name in ("qlora_PagedAdamW_32bit_resident", "qlora_AdamW8bit"):
        for ours, theirs, start in zip(params[name], params["torch_AdamW_foreach"], before):
            moved = (theirs.detach() - start).abs()
            assert bool(moved.min() > 0)  # every element took a step
            # the step is lr * m / (sqrt(v) + eps) ~ 1e-3: float32 rounding of it and of p is < 1e-9 here
            assert torch.allclose(ours.detach(), theirs.detach(), rtol=0, atol=1e-8), name


# --- optimizers --------------------------------------------------------------------------------------------


def test_linear_impls_compute_the_same_layer():
    """qlora_default (default dispatch: dequantize-then-GEMM at M = 32) and qlora_fused_tiled (W dequantized per
    tile, the explicit fused config) time the same layer: same y and gradients up to accumulation order. Both
    multiply the same bf16 operands exactly in float32 and round once to bf16, so they differ by at most one bf16
    rounding of each (2 * 2^-8 relative) plus float32 reassociation (K * 2^-24 of the sum of |terms|, K = 256)."""
    prob = bench_linear.Problem(64, 256, 8)
    assert bench_linear.fused_tiled_config(64).path == "fused"
    outs = {}
    for impl in bench_linear.QLORA_IMPLS:
        x = prob.x(32, requires_grad=True) if not outs else outs["x"].detach().clone().requires_grad_(True)
        y = prob.forward(impl, x)
        grads = torch.autograd.grad(y, (x, prob.lora_a, prob.lora_b), torch.ones_like(y))
        outs.setdefault("x", x)
        outs[impl] = [t.float() for t in (y, *grads)]
    for got, want in zip(outs["qlora_fused_tiled"], outs["qlora_default"]):
        scale = want.abs().max().item()
        assert torch.allclose(got, want, rtol=2 * 2.0**-8, atol=256 * 2.0**-24 * scale + 2.0**-8 * scale)


def test_adamw_step_bytes_32bit():
    assert bench_optim.adamw_step_bytes(1_000, 32) == 28_000  # p 4+4, g 4, m 4+4, v 4+4
    assert bench_optim.adamw_step_bytes(64 * 2**20, 32) == 1_879_048_192
    assert bench_optim.adamw_step_bytes(1_000, 32, param_itemsize=2, grad_itemsize=2) == 22_000


def test_adamw_step_bytes_8bit():
    # p 8, g 4, codes 1+1 per moment; 4 absmax blocks per moment, each read and written (4+4 bytes).
    assert bench_optim.adamw_step_bytes(1_000, 8) == 12_000 + 4_000 + 2 * 4 * 8
    assert bench_optim.adamw_step_bytes(64 * 2**20, 8) == 16 * 64 * 2**20 + 16 * 262_144
    with pytest.raises(ValueError):
        bench_optim.adamw_step_bytes(1_000, 16)


def test_paged_state_bytes():
    assert bench_optim.paged_state_bytes(1_000, 32) == 8_000
    assert bench_optim.paged_state_bytes(1_000, 8) == 2_000 + 32
    assert bench_optim.paged_state_bytes(2**20, 8) == 2_129_920


# --- shared helpers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 3.35e12),
    ("NVIDIA H100 PCIe", 2.0e12),
    ("NVIDIA H100 NVL", 3.9e12),
    ("NVIDIA H200", 4.8e12),
    ("NVIDIA A100-SXM4-80GB", 2.0e12),
    ("NVIDIA A100 80GB PCIe", 2.0e12),
    ("NVIDIA A100-SXM4-40GB", 1.555e12),
    ("NVIDIA A100-PCIE-40GB", 1.555e12),
    ("NVIDIA GH200 480GB", None),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_spec_peak_bandwidth_table(name, peak):
    found = bu.spec_peak_bandwidth(name)
    assert (None if found is None else found[0]) == peak


def test_bandwidth_info_arithmetic(monkeypatch):
    monkeypatch.setattr(bu, "ON_GPU", True)
    monkeypatch.setattr(bu, "peak_bandwidth",
                        lambda: {"peak_Bps": 4e12, "peak_source": "test", "copy_Bps": 2e12})
    info = bu.bandwidth_info(3_000_000_000, 1.5)
    assert info["bytes_moved"] == 3_000_000_000
    assert info["achieved_GBps"] == pytest.approx(2.0)
    assert info["fraction_of_peak"] == pytest.approx(0.5e-3)
    assert info["fraction_of_copy"] == pytest.approx(1e-3)
    weight = bu.bandwidth_info(100, None, what="weight")
    assert weight == {"weight_bytes_moved": 100}


def test_benchmarks_importing_bitsandbytes_leave_peft_importable():
    """Regression: run from the repository root (as `python -m pytest` and `python -m perf bench` are), bitsandbytes'
    import of the Hub package ``kernels`` found this repository's ``kernels/`` folder and left it in
    ``sys.modules``; peft (through transformers) then failed to import in the same process."""
    import importlib.util
    import os
    import subprocess

    for name in ("bitsandbytes", "peft"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed")
    code = ("import qlora; from perf import benchutil; bnb, reason = benchutil.import_bitsandbytes(); "
            "import qlora.integrations.peft, sys; "
            "print(reason is None, sys.modules['kernels'].__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    imported, kernels_file = proc.stdout.strip().splitlines()[-1].split(" ", 1)
    assert imported == "True" and Path(kernels_file).resolve() != REPO / "kernels" / "__init__.py", kernels_file
