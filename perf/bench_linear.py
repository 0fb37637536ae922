"""Benchmarks: the fused NF4 + LoRA linear layer (``qlora.functional.qlora_linear``), forward and backward.

Side by side in one session, for ``y = x @ W^T + s * (x @ A^T) @ B^T`` (bf16, no bias, no dropout):

- ``qlora_default``: ``qlora_linear`` on an NF4 (double-quantized, blocksize 64) ``W``, the default dispatch of
  kernels/linear.py (``choose_path``): at M <= 32 the GEMV decode kernel, up to ``FUSED_MAX_M`` rows (256 on sm_90,
  any M on sm_80) the fused tiled kernel, above dequantize-then-GEMM (W dequantized into a bf16 buffer by a Triton kernel, then a Triton GEMM with the
  LoRA term in its epilogue), forward and backward;
- ``qlora_fused_tiled``: the same layer forced onto the fused tiled path at every M (``MatmulConfig(path="fused")``
  with the GPU fused config ``fused_config(M)`` of kernels/linear.py): W decoded tile by tile inside the GEMM's K
  loop, forward and dx; so a GPU run times fused vs dequantize-then-GEMM vs dense torch side by side;
- ``dense_bf16``: plain torch on a dense bf16 ``W`` without grad (the speed-of-light reference, about 3.9x the
  weight memory of NF4);
- ``dequant_then_matmul``: the bitsandbytes / unsloth approach: dequantize the NF4 weight to bf16 on every
  call (again in the backward), then the torch matmul;
- ``bitsandbytes_4bit``: bitsandbytes itself, ``bnb.matmul_4bit`` on its own NF4 (double-quantized, blocksize
  64) form of W, plus the same LoRA term in torch, as PEFT's ``Linear4bit`` LoRA layer computes it (GPU only,
  when ``import bitsandbytes`` works; its decode path at M = 1 is bitsandbytes' GEMV kernel).

Modes: ``forward`` (grad mode on, as in training), ``backward`` (``torch.autograd.grad`` of a retained graph
w.r.t. x, A and B, so no gradient accumulation is timed) and ``forward+backward``. Every case reports
``time_ratio_vs_dense_bf16``: its time over the dense reference's, timed in the same session by the same
method (in a full run, the ``dense_bf16`` case's own benchmark); the ``qlora_*`` cases also report
``time_ratio_vs_dequant_then_matmul``; and each its achieved TFLOP/s. The small-M cases (M in 1, 4, 16;
forward, no grad: the decode path, a split-K GEMV on the GPU) report the bandwidth on the NF4 weight bytes
(packed codes + scales) against the peak.

GPU: M = K = N = 4096, r = 16. CPU (Triton interpreter): M = 64, K = N = 256, r = 8, orientation only.

Run: ``.venv/bin/python -m pytest perf/bench_linear.py --benchmark-only``.
"""

from __future__ import annotations

import pytest
import torch

from perf import benchutil as bu
from perf import roofline as rl

import qlora
from qlora.functional import qlora_linear
from qlora.kernels.linear import MatmulConfig, fused_config, nf4_lora_backward, nf4_lora_forward

if bu.ON_GPU:
    M, K, N, R = 4096, 4096, 4096, 16
else:
    M, K, N, R = 64, 256, 256, 8
SMALL_MS = (1, 4, 16, 32)  # both GEMV row tiles (16 and 32 rows)
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
SCALING = 2.0
DTYPE = torch.bfloat16
# The references first: their benchmarks become the references of the ratios (see benchutil.offer_reference).
IMPLS = ("dense_bf16", "dequant_then_matmul", "qlora_default", "qlora_fused_tiled", "bitsandbytes_4bit")
QLORA_IMPLS = ("qlora_default", "qlora_fused_tiled")
bnb, BNB_REASON = bu.import_bitsandbytes()


def _impl_param(impl: str):
    return pytest.param(impl, marks=bu.bitsandbytes_marks(BNB_REASON)) if impl == "bitsandbytes_4bit" else impl
MODES = ("forward", "backward", "forward+backward")


# --------------------------------------------------------------------------------------------------------------
# Counts
# --------------------------------------------------------------------------------------------------------------


def nf4_weight_bytes(n: int, k: int, blocksize: int = BLOCKSIZE, nested_blocksize: int = NESTED_BLOCKSIZE) -> int:
    """Bytes of a double-quantized NF4 (n, k) weight a matmul streams: the packed codes (two per byte), one
    uint8 scale code per block and one float32 second-level scale per ``nested_blocksize`` blocks."""
    return rl.nf4_storage_bytes(n * k, blocksize, nested_blocksize)


def dense_weight_bytes(n: int, k: int, itemsize: int = 2) -> int:
    """Bytes of the dense (n, k) weight (bf16 by default)."""
    return n * k * itemsize


def linear_flops(m: int, n: int, k: int, r: int, mode: str) -> int:
    """Floating-point operations (2 per multiply-add) of the layer: forward ``x W^T`` (2mnk) plus the LoRA
    path ``(x A^T) B^T`` (2mkr + 2mrn); backward (no grad for W): ``dx = dy W`` (2mnk), ``g = dy B`` (2mnr),
    ``dx += s g A`` (2mrk), ``dB = s dy^T u`` (2mnr) and ``dA = s g^T x`` (2mrk)."""
    forward = 2 * m * n * k + 2 * m * k * r + 2 * m * r * n
    backward = 2 * m * n * k + 4 * m * n * r + 4 * m * r * k
    if mode == "forward":
        return forward
    if mode == "backward":
        return backward
    if mode == "forward+backward":
        return forward + backward
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


# --------------------------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------------------------


class _DequantMatmul(torch.autograd.Function):
    """``x @ W^T`` with W dequantized to x's dtype in the forward and dequantized again in the backward
    (nothing dense kept between the two), as bitsandbytes' 4-bit matmul does."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.weight = weight
        return x @ weight.dequantize(x.dtype).t()

    @staticmethod
    def backward(ctx, dy):
        return dy @ ctx.weight.dequantize(dy.dtype), None


def fused_tiled_config(m: int, dx: bool = False) -> MatmulConfig:
    """The fused tiled path's config for M rows, forward or ``dx``: kernels/linear.py's GPU config on a GPU; 16-row
    tiles under the interpreter (the GPU's 64 x 64 x 32 tiles would be as many interpreted programs at the CPU
    shapes)."""
    cfg = fused_config(m, dx=dx) if bu.ON_GPU else MatmulConfig(16, 64, 64, num_warps=4)
    return MatmulConfig(cfg.block_m, cfg.block_n, cfg.block_k, group_m=cfg.group_m, num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages, path="fused")


class _FusedTiled(torch.autograd.Function):
    """``qlora_linear`` (no bias, no dropout) on the fused tiled path: the kernel launchers of kernels/linear.py
    with ``config=fused_tiled_config(M)`` in the forward and ``fused_tiled_config(M, dx=True)`` in dx."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b):
        kw = weight.kernel_kwargs()
        y, u = nf4_lora_forward(x, lora_a=lora_a, lora_b=lora_b, scaling=SCALING,
                                config=fused_tiled_config(x.shape[0]), **kw)
        ctx.save_for_backward(x, u, lora_a, lora_b)
        ctx.weight = weight
        return y

    @staticmethod
    def backward(ctx, dy):
        x, u, lora_a, lora_b = ctx.saved_tensors
        config = fused_tiled_config(x.shape[0], dx=True)
        dx, d_a, d_b, _ = nf4_lora_backward(dy.contiguous(), x, u, lora_a=lora_a, lora_b=lora_b, scaling=SCALING,
                                            config=config, **ctx.weight.kernel_kwargs())
        return dx, None, d_a, d_b


class Problem:
    """The layer's tensors: dense bf16 W, its NF4 form, LoRA A (R, K) and B (N, R)."""

    def __init__(self, n: int, k: int, r: int):
        gen = torch.Generator(device=bu.DEVICE).manual_seed(0)

        def randn(*shape, scale):
            return torch.randn(shape, generator=gen, device=bu.DEVICE, dtype=torch.float32).mul_(scale).to(DTYPE)

        self.n, self.k, self.r = n, k, r
        self.dense = randn(n, k, scale=0.02)
        self.nf4 = qlora.quantize_nf4(self.dense, blocksize=BLOCKSIZE, double_quant=True)
        self.lora_a = randn(r, k, scale=0.01).requires_grad_()
        self.lora_b = randn(n, r, scale=0.01).requires_grad_()
        self._gen = gen
        self.bnb_weight = self.bnb_state = None
        if bnb is not None and bu.ON_GPU:
            self.bnb_weight, self.bnb_state = bnb.functional.quantize_4bit(
                self.dense, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")

    def x(self, m: int, requires_grad: bool) -> torch.Tensor:
        x = torch.randn((m, self.k), generator=self._gen, device=bu.DEVICE, dtype=torch.float32).to(DTYPE)
        return x.requires_grad_(requires_grad)

    def forward(self, impl: str, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_a, self.lora_b
        if impl == "qlora_default":
            return qlora_linear(x, self.nf4, a, b, SCALING)
        if impl == "qlora_fused_tiled":
            return _FusedTiled.apply(x, self.nf4, a, b)
        if impl == "dense_bf16":
            return x @ self.dense.t() + SCALING * ((x @ a.t()) @ b.t())
        if impl == "dequant_then_matmul":
            return _DequantMatmul.apply(x, self.nf4) + SCALING * ((x @ a.t()) @ b.t())
        if impl == "bitsandbytes_4bit":
            return bnb.matmul_4bit(x, self.bnb_weight.t(), quant_state=self.bnb_state) \
                + SCALING * ((x @ a.t()) @ b.t())
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")

    def make_fn(self, impl: str, mode: str, m: int):
        """The callable a benchmark times for ``impl`` in ``mode`` at ``m`` rows."""
        x = self.x(m, requires_grad=True)
        inputs = (x, self.lora_a, self.lora_b)
        dy = torch.randn((m, self.n), generator=self._gen, device=bu.DEVICE, dtype=torch.float32).to(DTYPE)
        if mode == "forward":
            return lambda: self.forward(impl, x)
        if mode == "backward":
            y = self.forward(impl, x)
            return lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)
        if mode == "forward+backward":
            return lambda: torch.autograd.grad(self.forward(impl, x), inputs, dy)
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    def make_decode_fn(self, impl: str, m: int):
        """Forward without grad (inference / decode) at ``m`` rows."""
        x = self.x(m, requires_grad=False)

        def fn():
            with torch.no_grad():
                return self.forward(impl, x)

        return fn


@pytest.fixture(scope="module")
def problem() -> Problem:
    return Problem(N, K, R)


def _where() -> str:
    return "GPU" if bu.ON_GPU else "Triton interpreter, orientation only"


def _ratio(seconds: float | None, reference: float) -> float | None:
    return None if seconds is None else seconds / reference


# --------------------------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", [_impl_param(i) for i in IMPLS])
@pytest.mark.parametrize("mode", MODES)
def test_linear(benchmark, problem, mode, impl):
    benchmark.group = f"linear {mode} M={M} K={K} N={N} r={R} bf16 ({_where()})"
    seconds = bu.run_benchmark(benchmark, problem.make_fn(impl, mode, M))
    if impl not in QLORA_IMPLS:
        bu.offer_reference((impl, mode, M), seconds)
    dense = bu.reference_seconds(("dense_bf16", mode, M), lambda: problem.make_fn("dense_bf16", mode, M))
    flops = linear_flops(M, N, K, R, mode)
    info = dict(impl=impl, mode=mode, M=M, K=K, N=N, r=R, dtype="bfloat16", flops=flops,
                dense_reference_seconds=dense, time_ratio_vs_dense_bf16=_ratio(seconds, dense))
    if seconds is not None:
        info["tflops"] = flops / seconds / 1e12
    if impl in QLORA_IMPLS:
        dequant = bu.reference_seconds(("dequant_then_matmul", mode, M),
                                       lambda: problem.make_fn("dequant_then_matmul", mode, M))
        info.update(dequant_reference_seconds=dequant,
                    time_ratio_vs_dequant_then_matmul=_ratio(seconds, dequant))
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("impl", [_impl_param(i) for i in ("qlora_default", "bitsandbytes_4bit")])
@pytest.mark.parametrize("m", SMALL_MS)
def test_linear_small_m(benchmark, problem, m, impl):
    benchmark.group = f"linear forward small M K={K} N={N} r={R} bf16, no grad ({_where()})"
    seconds = bu.run_benchmark(benchmark, problem.make_decode_fn(impl, m))
    dense = bu.reference_seconds(("dense_bf16", "decode", m), lambda: problem.make_decode_fn("dense_bf16", m))
    benchmark.extra_info.update(
        impl=impl,
        mode="forward (no grad)",
        M=m, K=K, N=N, r=R, dtype="bfloat16",
        dense_reference_seconds=dense,
        time_ratio_vs_dense_bf16=_ratio(seconds, dense),
        dense_weight_bytes=dense_weight_bytes(N, K),
        dense_reference_weight_GBps=dense_weight_bytes(N, K) / dense / 1e9,
        **bu.bandwidth_info(nf4_weight_bytes(N, K), seconds, what="weight"),
    )
