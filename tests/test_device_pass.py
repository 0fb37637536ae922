"""One pass of every kernel family against the oracle on the device the kernels run on, at fixed shapes that
reach every dispatch path: a CUDA GPU when the kernels are compiled (``bash perf/gpu_check.sh`` runs this file
there), the Triton interpreter on CPU otherwise (tiny shapes; part of the default run, so the GPU pass cannot rot).

The Hypothesis property tests of ``test_quantize.py``/``test_linear.py`` build CPU tensors and so run only under
the interpreter; this file is what exercises the compiled builds: the GPU launch configs (autotuned tiles, split-K
below ``SMALL_M`` rows, grouped tile order), ``div.rn``/no-FMA arithmetic and 64-bit addressing. Bounds are those of
``test_linear.py`` (reused, not restated); quantization is compared byte for byte.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import qlora
from qlora.functional import dropout_mask, qlora_linear
from qlora.kernels import codebook as KC
from qlora.kernels import quantize as KQ
from qlora.nf4 import quantize_nf4
from qlora.reference import codebook as RC
from qlora.reference import quantize as RQ
from qlora.kernels import linear as KLin
from test_linear import DTYPES, _check_against_oracle, _dense_weight

ON_GPU = torch.cuda.is_available() and not qlora.interpreter_active()
DEV = qlora.kernels.kernel_device()

# Rows M: 1 and 16 take the split-K decode path on a GPU with its 16-row tile, 17 and SMALL_M (32) with its 32-row
# tile, 33 and 256 the fused kernel's 64-row tiles, 1100 its 128-row tiles on sm_80 (whose FUSED_MAX_M has no limit)
# and the dequantize-then-GEMM path on sm_90 (FUSED_MAX_M 256; its 128-row fused tile is checked by
# test_fused_128_row_tile_on_device_matches_oracle). K is no
# multiple of any tile or blocksize; N is odd. A second K, a multiple of the blocksize but not of the GEMV's
# 64-column step times its split, sends M <= 32 down the decode (GEMV) path and larger M down the fused one up to
# FUSED_MAX_M (forward and dx); the first sends every M down the dequantize-then-GEMM path.
if ON_GPU:
    MS, K_INS, N_OUT, RANK = (1, 16, 17, 32, 33, 256, 1100), (1000, 1088), 333, 16
    QUANT_NUMELS = (1, 4097, 3 * 1024 * 1024 + 77)
else:
    MS, K_INS, N_OUT, RANK = (1, 16, 17, 40), (72, 64), 33, 4
    QUANT_NUMELS = (1, 4097)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # intended IEEE events under the interpreter


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().view(torch.int32).numpy()


def test_codebooks_on_device_match_oracle():
    for bits in (2, 4, 8):
        table = KC.normal_float_codebook(bits, device=DEV)
        assert table.device.type == DEV.type
        np.testing.assert_array_equal(_bits(table), RC.normal_float_codebook(bits).view(np.int32))
    np.testing.assert_array_equal(_bits(KC.dynamic_map(True, device=DEV)), RC.dynamic_map(True).view(np.int32))


@pytest.mark.parametrize("numel", QUANT_NUMELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_roundtrip_on_device_matches_oracle(numel, dtype):
    gen = torch.Generator().manual_seed(numel)
    x = (torch.randn(numel, generator=gen) * 3).to(dtype)
    code = KC.normal_float_codebook(4, device=DEV)
    packed, absmax = KQ.quantize_4bit(x.to(DEV), code, blocksize=64)
    ref_packed, ref_absmax = RQ.quantize_4bit(x.float().numpy(), RC.normal_float_codebook(4), blocksize=64)
    np.testing.assert_array_equal(packed.cpu().numpy(), ref_packed)
    np.testing.assert_array_equal(_bits(absmax), ref_absmax.view(np.int32))
    nested = KC.dynamic_map(True, device=DEV)
    qabsmax, absmax2, offset = KQ.double_quantize(absmax, nested, 256)
    ref_q, ref_a2, ref_off = RQ.double_quantize(ref_absmax, 256)
    np.testing.assert_array_equal(qabsmax.cpu().numpy(), ref_q)
    np.testing.assert_array_equal(_bits(absmax2), ref_a2.view(np.int32))
    assert np.float32(offset) == ref_off
    out = KQ.dequantize_4bit(packed, qabsmax, code, (numel,), 64, dtype, absmax2=absmax2, offset=offset,
                             nested_code=nested, nested_blocksize=256)
    ref_scales = RQ.double_dequantize(ref_q, ref_a2, ref_off, 256)
    ref_out = RQ.dequantize_4bit(ref_packed, ref_scales, RC.normal_float_codebook(4), (numel,), 64)
    # The kernel computes code * scale in float32 and rounds once to dtype; torch's cast of the oracle's float32 is
    # the same round-to-nearest-even.
    torch.testing.assert_close(out.cpu(), torch.from_numpy(np.ascontiguousarray(ref_out)).to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("K_IN", K_INS)
def test_fused_layer_on_device_matches_oracle(m, dtype, dropout_p, K_IN):
    """Forward and every gradient of ``qlora_linear`` at one M of every dispatch regime, within test_linear's
    derived bounds."""
    gen = torch.Generator().manual_seed(m)
    weight = quantize_nf4((torch.randn(N_OUT, K_IN, generator=gen)).to(dtype).to(DEV), blocksize=64)
    x = torch.randn(m, K_IN, generator=gen).to(dtype)
    lora_a = (torch.randn(RANK, K_IN, generator=gen) / K_IN**0.5).to(dtype)
    lora_b = (torch.randn(N_OUT, RANK, generator=gen) * 0.5).to(dtype)
    bias = torch.randn(N_OUT, generator=gen).to(dtype)
    dy = torch.randn(m, N_OUT, generator=gen).to(dtype)
    leaves = [t.to(DEV).requires_grad_(True) for t in (x, lora_a, lora_b, bias)]
    seed = 1234 + m
    y = qlora_linear(leaves[0], weight, leaves[1], leaves[2], 2.0, leaves[3], dropout_p=dropout_p, training=True,
                     seed=seed)
    y.backward(dy.to(DEV))
    mask = dropout_mask(seed, x.shape, dropout_p) if dropout_p > 0 else None
    grads = tuple(t.grad.cpu() for t in leaves)
    cpu_weight = weight.to("cpu")
    _check_against_oracle(x, _dense_weight(cpu_weight, dtype), lora_a, lora_b, 2.0, bias, mask, dy, y.detach().cpu(),
                          grads, dtype)


@pytest.mark.parametrize("m", [1, 16, KLin.SMALL_M])
def test_folded_gemv_epilogue_on_device_gives_the_bits_of_the_epilogue_launch(m):
    """The decode GEMV with its epilogue folded (the last program of a column tile sums the split's partials, counted
    with atomics) against the same launch with its epilogue apart: y and u bit for bit, here with the programs of a
    GPU running at once (4096 x 4096 on a GPU, 16 splits at M = 1: 512 programs), and with dropout. Under the
    interpreter a small weight with explicit splits (tests/test_linear.py runs both of the protocol's branches)."""
    n, k = (4096, 4096) if ON_GPU else (N_OUT, 256)
    gen = torch.Generator().manual_seed(77 + m)
    weight = quantize_nf4(torch.randn(n, k, generator=gen).to(torch.bfloat16).to(DEV), blocksize=64,
                          double_quant=True)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(DEV)
    lora_a = (torch.randn(RANK, k, generator=gen) / k**0.5).to(torch.bfloat16).to(DEV)
    lora_b = (torch.randn(n, RANK, generator=gen) * 0.5).to(torch.bfloat16).to(DEV)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16).to(DEV)
    folded = None if ON_GPU else KLin.MatmulConfig(KLin.gemv_config(m).block_m, 16, 64, split_k=4, path="gemv")
    apart = replace(folded or KLin.gemv_config(m), fold_epilogue=False,
                    split_k=folded.split_k if folded else KLin._gemv_split_k(n, k, KLin.gemv_config(m), m=m))
    kw = dict(lora_a=lora_a, lora_b=lora_b, scaling=2.0, bias=bias, dropout_p=0.25, seed=5, **weight.kernel_kwargs())
    y, u = KLin.nf4_lora_forward(x, config=folded, **kw)
    want_y, want_u = KLin.nf4_lora_forward(x, config=apart, **kw)
    assert torch.equal(y, want_y) and torch.equal(u, want_u)


@pytest.mark.skipif(not ON_GPU, reason="the GPU tiles need a GPU (under the interpreter test_linear runs the same "
                                       "kernel with small tiles)")
@pytest.mark.parametrize("arch", sorted(KLin.FUSED_CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_128_row_tile_on_device_matches_oracle(arch, dtype):
    """The fused kernel's 128-row tile of each architecture (sm_90's 128 x 128 x 128 is not reached by the default
    dispatch: 64-row tiles up to FUSED_SMALL_TILE_MAX_M = 256 rows, dequantize-then-GEMM above), forced with an
    explicit config: forward, dx and the LoRA gradients within
    test_linear's derived bounds. An architecture's tile compiles for any GPU, so both run on whichever is here."""
    m, k_in, p = 256, 1088, 0.25
    cfg = KLin.FUSED_CONFIGS[arch][1]
    gen = torch.Generator().manual_seed(arch)
    weight = quantize_nf4(torch.randn(N_OUT, k_in, generator=gen).to(dtype).to(DEV), blocksize=64)
    x = torch.randn(m, k_in, generator=gen).to(dtype)
    lora_a = (torch.randn(RANK, k_in, generator=gen) / k_in**0.5).to(dtype)
    lora_b = (torch.randn(N_OUT, RANK, generator=gen) * 0.5).to(dtype)
    bias = torch.randn(N_OUT, generator=gen).to(dtype)
    dy = torch.randn(m, N_OUT, generator=gen).to(dtype)
    kw = weight.kernel_kwargs()
    seed = 99
    y, u = KLin.nf4_lora_forward(x.to(DEV), lora_a=lora_a.to(DEV), lora_b=lora_b.to(DEV), scaling=2.0,
                                 bias=bias.to(DEV), dropout_p=p, seed=seed, config=cfg, **kw)
    grads = KLin.nf4_lora_backward(dy.to(DEV), x.to(DEV), u, lora_a=lora_a.to(DEV), lora_b=lora_b.to(DEV),
                                   scaling=2.0, dropout_p=p, seed=seed, need_bias=True, config=cfg, **kw)
    mask = dropout_mask(seed, x.shape, p)
    _check_against_oracle(x, _dense_weight(weight.to("cpu"), dtype), lora_a, lora_b, 2.0, bias, mask, dy, y.cpu(),
                          tuple(g.cpu() for g in grads), dtype)
