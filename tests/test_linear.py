"""Fused NF4 dequant-matmul + LoRA (kernels/linear.py, qlora/functional.py, qlora/layers.py) against the float64
oracle (qlora.reference.linear), torch.autograd on the dense weight, a tiny training run, and bad inputs.

Tolerances: the derived elementwise bounds of :mod:`qlora.bounds` (its docstring gives the derivation), the same
ones ``qlora verify`` uses.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hyp import examples

import qlora  # noqa: F401  (interpreter switch before the kernels)
from qlora.bounds import U32, elementwise_bound, oracle_dense_weight, qlora_linear_bounds
from qlora.functional import dropout_mask, qlora_linear
from qlora.kernels import _nf4_tiles as T
from qlora.kernels import linear as K
from qlora.kernels import lora as KL
from qlora.layers import QLoRALinear
from qlora.nf4 import NF4Weight, quantize_nf4
from qlora.reference.codebook import normal_float_codebook
from qlora.reference.linear import qlora_linear_backward, qlora_linear_forward

from helpers import interpreted_launches

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def _dense_weight(weight: NF4Weight, dtype: torch.dtype) -> np.ndarray:
    """The oracle's dense W: reference dequantization (float32) rounded to the compute dtype by torch (RNE)."""
    return oracle_dense_weight(weight, dtype)


def _assert_close(name: str, got: torch.Tensor, ref: np.ndarray, tol: np.ndarray) -> None:
    got = _np(got)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != {ref.shape}"
    err = np.abs(got - ref)
    bad = err > tol
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.size} elements out of tolerance; worst err "
                           f"{err[bad].max():.3e} vs tol {tol[bad][np.argmax(err[bad])]:.3e}")


def _check_against_oracle(x, w, lora_a, lora_b, scaling, bias, mask, dy, y, grads, dtype):
    """y and (dx, dA, dB, dbias) from the kernels against the oracle, within qlora.bounds.qlora_linear_bounds."""
    xn, an, bn, dyn = _np(x), _np(lora_a), _np(lora_b), _np(dy)
    biasn = None if bias is None else _np(bias)
    maskn = None if mask is None else _np(mask)
    y_ref = qlora_linear_forward(xn, w, an, bn, scaling, biasn, maskn)
    dx_ref, da_ref, db_ref, dbias_ref = qlora_linear_backward(dyn, xn, w, an, bn, scaling, maskn)
    dx, da, db, dbias = grads
    bounds = qlora_linear_bounds(xn, w, an, bn, scaling, biasn, maskn, dyn, dtype, y_ref, dx_ref, da_ref, db_ref,
                                 None if dbias is None else dbias_ref)
    _assert_close("y", y, y_ref, bounds.y)
    _assert_close("dx", dx, dx_ref, bounds.dx)
    _assert_close("dA", da, da_ref, bounds.d_lora_a)
    _assert_close("dB", db, db_ref, bounds.d_lora_b)
    if dbias is not None:
        _assert_close("dbias", dbias, dbias_ref, bounds.d_bias)


def _randn(gen, shape, dtype, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


@st.composite
def layer_cases(draw):
    lead = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=2)))
    if math.prod(lead) > 40:
        lead = lead[:1]
    return dict(
        lead=lead,
        # Multiples of the blocksizes reach the per-row scale path (one 4-bit block per tile row).
        k=draw(st.one_of(st.integers(1, 80), st.sampled_from([32, 64, 128]))),
        n=draw(st.integers(1, 72)),
        r=draw(st.one_of(st.integers(1, 12), st.integers(30, 40))),
        dtype=draw(st.sampled_from(DTYPES)),
        has_bias=draw(st.booleans()),
        dropout_p=draw(st.sampled_from([0.0, 0.0, 0.25, 0.6])),
        noncontig=draw(st.booleans()),
        blocksize=draw(st.sampled_from([32, 64, 128])),
        double_quant=draw(st.booleans()),
        scaling=draw(st.sampled_from([0.5, 2.0, 16.0 / 3.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _build(case):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, k, n, r = case["dtype"], case["k"], case["n"], case["r"]
    weight = quantize_nf4(_randn(gen, (n, k), dtype), blocksize=case["blocksize"], double_quant=case["double_quant"])
    shape = (*case["lead"], k)
    if case["noncontig"]:
        # Every other column of a wider tensor: stride 2 along K, leading dims still flattenable as a view.
        x = _randn(gen, (*case["lead"], 2 * k), dtype)[..., ::2]
    else:
        x = _randn(gen, shape, dtype)
    lora_a = _randn(gen, (r, k), dtype, 1 / math.sqrt(k))
    lora_b = _randn(gen, (n, r), dtype, 0.5)
    bias = _randn(gen, (n,), dtype) if case["has_bias"] else None
    dy = _randn(gen, (*case["lead"], n), dtype)
    return weight, x, lora_a, lora_b, bias, dy


@examples(25)
@given(case=layer_cases())
def test_qlora_linear_matches_oracle(case):
    """Forward and every gradient of the autograd function against the float64 oracle."""
    weight, x, lora_a, lora_b, bias, dy = _build(case)
    dtype, p = case["dtype"], case["dropout_p"]
    x = x.requires_grad_(True)
    lora_a.requires_grad_(True)
    lora_b.requires_grad_(True)
    if bias is not None:
        bias.requires_grad_(True)
    seed = case["seed"] % (2**31)
    y = qlora_linear(x, weight, lora_a, lora_b, case["scaling"], bias, dropout_p=p, training=True, seed=seed)
    assert y.dtype == dtype and y.shape == (*case["lead"], case["n"])
    y.backward(dy)
    mask = dropout_mask(seed, x.shape, p) if p > 0 else None
    grads = (x.grad, lora_a.grad, lora_b.grad, None if bias is None else bias.grad)
    assert all(g is None or g.dtype == dtype for g in grads)
    assert weight.packed.grad is None
    _check_against_oracle(x, _dense_weight(weight, dtype), lora_a, lora_b, case["scaling"], bias, mask, dy, y, grads,
                          dtype)


def _run_path(case, cfg):
    """Forward and backward launchers with ``cfg`` against the oracle (the GPU tile shapes, scaled down)."""
    weight, x, lora_a, lora_b, bias, dy = _build(case)
    dtype, p, seed = case["dtype"], case["dropout_p"], case["seed"] % (2**31)
    x2 = x.reshape(-1, case["k"])
    dy2 = dy.reshape(-1, case["n"])
    kw = weight.kernel_kwargs()
    assert K.choose_path(x2.shape[0], case["k"], weight.blocksize, cfg) == cfg.path
    y, u = K.nf4_lora_forward(x2, lora_a=lora_a, lora_b=lora_b, scaling=case["scaling"], bias=bias, dropout_p=p,
                              seed=seed, config=cfg, **kw)
    grads = K.nf4_lora_backward(dy2, x2, u, lora_a=lora_a, lora_b=lora_b, scaling=case["scaling"], dropout_p=p,
                                seed=seed, need_bias=bias is not None, config=cfg, **kw)
    mask = K.lora_dropout_mask(seed, x2.shape, p) if p > 0 else None
    _check_against_oracle(x2, _dense_weight(weight, dtype), lora_a, lora_b, case["scaling"], bias, mask, dy2, y,
                          grads, dtype)


@examples(8)
@given(case=layer_cases(), path=st.sampled_from(["fused", "dequant"]), group_m=st.sampled_from([1, 2, 3]))
def test_tiled_paths_with_small_tiles_match_oracle(case, path, group_m):
    """The tiled paths under the interpreter with 16-wide tiles: many programs, grouped order, edge masks in every
    direction (K and N not multiples of the tile, odd N), W dequantized tile by tile ("fused") or into a buffer
    ("dequant"); forward and dx."""
    _run_path(case, K.MatmulConfig(16, 16, 16, group_m=group_m, path=path))


@pytest.mark.parametrize("layout", ["words", "word_pairs", "split", "interleave"])
@pytest.mark.parametrize("block_n, block_k", [(16, 16), (64, 128)], ids=["below_a_block", "several_blocks"])
@examples(6)
@given(case=layer_cases(), blocks=st.integers(1, 5), group_m=st.sampled_from([1, 2]))
def test_interpreter_pair_decode_with_small_tiles_matches_oracle(layout, block_n, block_k, case, blocks, group_m):
    """The interpreter's default above SMALL_M (K a multiple of the blocksize): W decoded a packed byte at a time in the
    GEMM's K loop (``PAIRS``), here with small tiles so that programs and K steps are many, and with tiles smaller
    than a scale block (16) or holding several (64 or 128 against blocksizes 32 to 128), every edge masked;
    forward and dx through the default launchers (no config), no dequantize launch. Every layout of the decoded
    tile: the interpreter's uint32 words, NVIDIA's word pairs (``WORD_PAIRS``: the tile assembled from column
    pairs as the GPUs' inline assembly returns them), the even/odd split of a byte's two values (AMD's) and their
    interleaving (``INTERLEAVE``)."""
    from unittest import mock

    import triton.language as tl

    case["k"] = case["blocksize"] * blocks
    case["lead"] = (K.SMALL_M + 1 + case["seed"] % 24,)

    def tiles(rows, cols, inner, path):
        assert path == "fused"
        return K.MatmulConfig(16, block_n, block_k, group_m=group_m, path=path)

    weight, x, lora_a, lora_b, bias, dy = _build(case)
    dtype, p, seed = case["dtype"], case["dropout_p"], case["seed"] % (2**31)
    kw = weight.kernel_kwargs()
    with mock.patch.object(K, "_interpreter_config", tiles), interpreted_launches() as launched, \
            mock.patch.object(K, "PAIR_LAYOUT_UNDER_INTERPRETER", tl.constexpr(layout)):
        y, u = K.nf4_lora_forward(x, lora_a=lora_a, lora_b=lora_b, scaling=case["scaling"], bias=bias,
                                  dropout_p=p, seed=seed, **kw)
        grads = K.nf4_lora_backward(dy, x, u, lora_a=lora_a, lora_b=lora_b, scaling=case["scaling"], dropout_p=p,
                                    seed=seed, need_bias=bias is not None, **kw)
    assert "_matmul_lora_kernel" in launched and "_dequantize_4bit_kernel" not in launched
    mask = K.lora_dropout_mask(seed, x.shape, p) if p > 0 else None
    _check_against_oracle(x, _dense_weight(weight, dtype), lora_a, lora_b, case["scaling"], bias, mask, dy, y, grads,
                          dtype)


@examples(8)
@given(case=layer_cases(), blocks=st.integers(1, 5), rows=st.integers(1, 64))
def test_dx_launch_computes_the_lora_gradients_when_one_row_tile_holds_every_row(case, blocks, rows):
    """Under the interpreter the dx launch that computes g also computes dA, dB and the bias gradient (FOLD_GRADS)
    when one row tile holds all M rows: here a 64-row tile with 16-wide column tiles and K steps of 16, so several
    column tiles (column tile 0 writes dB and the bias gradient, each tile its columns of dA) and several steps (dB
    written step by step) run; dropout, bias, strided x and ranks above the rank tile (no fold: lora_grad) drawn.
    Against the oracle; the backward is that one launch."""
    case["k"] = case["blocksize"] * blocks
    case["lead"] = (rows,)
    cfg = K.MatmulConfig(64, 16, 16, group_m=1, path="fused")
    weight, x, lora_a, lora_b, bias, dy = _build(case)
    dtype, p, seed = case["dtype"], case["dropout_p"], case["seed"] % (2**31)
    kw = weight.kernel_kwargs()
    y, u = K.nf4_lora_forward(x, lora_a=lora_a, lora_b=lora_b, scaling=case["scaling"], bias=bias, dropout_p=p,
                              seed=seed, config=cfg, **kw)
    keep = KL.lora_dropout_bits(seed, x.shape, p) if p > 0 else None  # the forward's mask, as the layer saves it
    with interpreted_launches() as launched:
        grads = K.nf4_lora_backward(dy, x, u, lora_a=lora_a, lora_b=lora_b, scaling=case["scaling"], dropout_p=p,
                                    seed=seed, keep=keep, need_bias=bias is not None, config=cfg, **kw)
    folds = case["r"] <= KL.lora_block_r(case["r"])
    assert launched == (["_matmul_lora_kernel"] if folds else
                        ["_lora_down_kernel", "_matmul_lora_kernel", "_lora_grad_kernel", "_lora_grad_kernel"])
    mask = K.lora_dropout_mask(seed, x.shape, p) if p > 0 else None
    _check_against_oracle(x, _dense_weight(weight, dtype), lora_a, lora_b, case["scaling"], bias, mask, dy, y, grads,
                          dtype)


@pytest.mark.parametrize("m, k, layout", [(3, 128, "words"), (3, 128, "word_pairs"), (3, 256, "word_fragments_mma"),
                                          (3, 256, "word_fragments_wgmma"), (40, 128, "words"),
                                          (40, 128, "word_pairs"), (40, 96, "words")],
                         ids=["gemv", "gemv_word_pairs", "gemv_fragments_mma", "gemv_fragments_wgmma", "fused",
                              "fused_word_pairs", "dequant"])
def test_64_bit_indexing_gives_the_same_bits(monkeypatch, m, k, layout):
    """A W of 2^31 or more elements is indexed in int64 (``INDEX_64``); forced on a small W, every path (the decode
    GEMV, in W's order and in the MMAs' fragment orders with the GPUs' 128 x 128 tile, the fused kernel's word
    decodes, the interpreter's and the GPUs', the dequantize-then-GEMM path) gives the bits of int32 indexing."""
    import triton.language as tl

    monkeypatch.setattr(K, "PAIR_LAYOUT_UNDER_INTERPRETER", tl.constexpr(layout))
    if layout.startswith("word_fragments"):  # the tile the fragment order is built for (2 K steps of 128)
        monkeypatch.setattr(K, "_interpreter_config", lambda rows, cols, inner, path: (
            K.MatmulConfig(16, 128, 128, path=path) if path == "gemv" else K.MatmulConfig(16, 16, 16, path=path)))
    gen = torch.Generator().manual_seed(11)
    weight = quantize_nf4(_randn(gen, (24, k), torch.bfloat16))
    kw = weight.kernel_kwargs()
    x, dy = _randn(gen, (m, k), torch.bfloat16), _randn(gen, (m, 24), torch.bfloat16)
    a, b = _randn(gen, (4, k), torch.bfloat16, 0.2), _randn(gen, (24, 4), torch.bfloat16)

    def run():
        y, u = K.nf4_lora_forward(x, lora_a=a, lora_b=b, scaling=2.0, **kw)
        return (y, u, *K.nf4_lora_backward(dy, x, u, lora_a=a, lora_b=b, scaling=2.0, **kw))

    want = run()
    init = K._Weight.__init__

    def init_64(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.index_64 = True

    monkeypatch.setattr(K._Weight, "__init__", init_64)
    got = run()
    assert all((w is None and g is None) or torch.equal(w, g) for w, g in zip(want, got))


@pytest.mark.parametrize("layout", ["words", "word_pairs", "split", "interleave"])
def test_gemv_reads_no_scale_past_the_weight(monkeypatch, layout):
    """A K step longer than K's rest (K = 192, BLOCK_K = 128) covers scale sub-blocks past the row; for the last
    row they would index past the scales. The weight's scale tensors here are views whose storage continues with
    NaN-making bytes (absmax code 255, absmax2 NaN): a read past either would turn y into NaN (0 * NaN in the
    dot). 256 rows x 3 blocks = 768 = 3 x 256 blocks, so the first index past the end of absmax2 is one past it."""
    import triton.language as tl

    gen = torch.Generator().manual_seed(5)
    weight = quantize_nf4(_randn(gen, (256, 192), torch.bfloat16))
    x = _randn(gen, (2, 192), torch.bfloat16)
    monkeypatch.setattr(K, "PAIR_LAYOUT_UNDER_INTERPRETER", tl.constexpr(layout))

    def forward(**kw):
        y, _ = K.nf4_lora_forward(x, lora_a=torch.zeros(4, 192, dtype=torch.bfloat16),
                                  lora_b=torch.zeros(256, 4, dtype=torch.bfloat16), scaling=1.0,
                                  config=K.MatmulConfig(16, 64, 128, path="gemv"), **kw)
        return y

    def bait(t, value):
        return torch.cat([t, torch.full((64,), value, dtype=t.dtype)])[: t.numel()]

    want = forward(**weight.kernel_kwargs())
    y = forward(**{**weight.kernel_kwargs(), "absmax": bait(weight.absmax, 255),
                   "absmax2": bait(weight.absmax2, float("nan"))})
    assert torch.isfinite(y).all()
    assert torch.equal(y, want)


@pytest.mark.parametrize("n", [96, 100], ids=["n_fills_its_tiles", "ragged_last_tile"])
def test_gemv_drops_row_masks_only_when_n_fills_its_tiles(monkeypatch, n):
    """EVEN_N (no row mask on W's loads and the partials' store) is passed exactly when N is a multiple of BLOCK_N;
    both builds match the oracle, the ragged one with a last tile of 4 rows."""
    from triton.runtime import interpreter

    seen = []
    original = interpreter.InterpretedFunction.run

    def run(self, *args, **kwargs):
        if self.fn.__name__ == "_nf4_gemv_kernel":
            seen.append(kwargs["EVEN_N"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", run)
    case = dict(lead=(3,), k=128, n=n, r=4, dtype=torch.bfloat16, has_bias=True, dropout_p=0.0, noncontig=False,
                blocksize=64, double_quant=True, scaling=2.0, seed=11)
    _run_path(case, K.MatmulConfig(16, 32, 64, split_k=2, path="gemv"))
    assert seen == [n % 32 == 0]


@pytest.mark.parametrize("n, k", [(128, 192), (100, 160)], ids=["tiles_fill_n_and_k", "ragged_n_and_k"])
def test_tiled_kernel_drops_column_masks_only_where_its_tiles_fill_the_columns(monkeypatch, n, k):
    """EVEN_N of the fused forward (columns N) and dx (columns K) launches with 64-column tiles: set exactly where the
    tiles fill the columns (``_even_n``), and both builds match the oracle."""
    from triton.runtime import interpreter

    seen = []
    original = interpreter.InterpretedFunction.run

    def run(self, *args, **kwargs):
        if self.fn.__name__ == "_matmul_lora_kernel":
            seen.append(("fwd" if kwargs["B_TRANSPOSED"] else "dx", kwargs["EVEN_N"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", run)
    case = dict(lead=(20,), k=k, n=n, r=4, dtype=torch.float16, has_bias=True, dropout_p=0.0, noncontig=False,
                blocksize=32, double_quant=True, scaling=2.0, seed=12)
    _run_path(case, K.MatmulConfig(16, 64, 32, group_m=1, path="fused"))
    assert seen == [("fwd", n % 64 == 0), ("dx", k % 64 == 0)]
    assert K._even_n(128, 64) and not K._even_n(128, 32) and not K._even_n(100, 64)


@st.composite
def decode_cases(draw):
    """Decode shapes: M <= SMALL_M (32) rows, both GEMV row tiles, K a multiple of the blocksize (the GEMV path's rows
    are whole scale blocks)."""
    case = draw(layer_cases())
    case["lead"] = (draw(st.sampled_from([1, 2, 5, 16, 17, 32])),)
    case["k"] = case["blocksize"] * draw(st.integers(1, 5))
    return case


@examples(8)
@given(case=decode_cases(), split_k=st.sampled_from([1, 2, 4, 8]), block_k=st.sampled_from([32, 64, 128]),
       block_n=st.sampled_from([16, 32]))
def test_gemv_path_matches_oracle(case, split_k, block_k, block_n):
    """The decode kernel: K split over programs (some splits empty), BLOCK_K below, at and above the blocksize
    (several scale blocks per row in one step), N not a multiple of the tile, the LoRA down-projection folded
    into column tile 0, and the split-K epilogue; W by the interpreter's byte-major word tile (its default)."""
    _run_path(case, K.MatmulConfig(_gemv_rows(case), block_n, block_k, split_k=split_k, path="gemv"))


@examples(8)
@given(case=decode_cases(), split_k=st.sampled_from([2, 4, 8]), block_k=st.sampled_from([32, 64, 128]),
       block_n=st.sampled_from([16, 32]), u_first=st.booleans())
def test_folded_gemv_epilogue_gives_the_bits_of_the_epilogue_launch(case, split_k, block_k, block_n, u_first):
    """The GEMV with its epilogue folded (the last of a column tile's S + 1 arrivals writes its y) against the same
    launch with the epilogue apart: y and u bit for bit, with every output buffer filled with NaN before the launch
    (a tile nobody wrote would show), and each column tile counted S + 1 times and u S times. Under the interpreter
    programs run one column tile after another: with ``GEMV_U_FIRST`` False column tile 0's splits have all
    arrived when u completes, so the program completing u writes tile 0's y (the other branch of the protocol);
    with it True every tile's last split does."""
    from unittest import mock

    weight, x, lora_a, lora_b, bias, _ = _build(case)
    x2 = x.reshape(-1, case["k"])
    kw = dict(lora_a=lora_a, lora_b=lora_b, scaling=case["scaling"], bias=bias, dropout_p=case["dropout_p"],
              seed=case["seed"] % (2**31), **weight.kernel_kwargs())
    apart = K.MatmulConfig(_gemv_rows(case), block_n, block_k, split_k=split_k, path="gemv", fold_epilogue=False)
    want_y, want_u = K.nf4_lora_forward(x2, config=apart, **kw)
    empty, zeroed = torch.empty, K._zeroed_arrivals
    counts = []

    def nan_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    def recorded_arrivals(*args, **kwargs):
        counts.append(zeroed(*args, **kwargs))
        return counts[-1]

    with mock.patch.object(K, "GEMV_U_FIRST", u_first), mock.patch("torch.empty", nan_empty), \
            mock.patch.object(K, "_zeroed_arrivals", recorded_arrivals):
        y, u = K.nf4_lora_forward(x2, config=replace(apart, fold_epilogue=True), **kw)
    assert torch.equal(y, want_y) and torch.equal(u, want_u)
    k_per_split = -(-(-(-case["k"] // split_k)) // block_k) * block_k
    splits, tiles = -(-case["k"] // k_per_split), -(-case["n"] // block_n)
    assert counts[0].tolist() == [splits + 1] * tiles + [splits]


@pytest.mark.parametrize("m, labels", [
    (1, ["dispatcher (2 splits, 1 stage)", "epilogue launched apart", "W's own column order", "2 stages", "1 split",
         "4 splits", "64-row tiles, 1 split"]),
    # 32 rows: the partials' cap (K / (64 M) splits) leaves 1 split, and its tile already has 64 rows.
    (32, ["dispatcher (1 split, 1 stage)", "epilogue launched apart", "2 stages", "2 splits"]),
])
def test_decode_variants_that_the_gpu_profiler_times_match_oracle(m, labels):
    """``perf.profile_linear`` times these GEMV launches side by side on a GPU (the static model cannot rank them):
    each is a config the launchers take, and each computes y and the gradients within the oracle's bounds, here at
    the GPU's own tiles (16 x 128 x 128 or 32 x 64 x 128) on a small weight."""
    from perf.profile_linear import decode_variants

    variants = decode_variants(m, 256, 512, sms=132)
    assert [label for label, _ in variants] == labels
    case = dict(lead=(m,), k=512, n=256, r=8, dtype=torch.bfloat16, has_bias=True, dropout_p=0.0, noncontig=False,
                blocksize=64, double_quant=True, scaling=2.0, seed=m)
    base = K.gemv_config(m)
    for label, cfg in variants[1:]:
        assert cfg.path == "gemv" and (cfg.block_m, cfg.block_k) == (base.block_m, base.block_k)
        assert cfg.block_n == (64 if label.startswith("64-row") else base.block_n)
        _run_path(case, cfg)


def test_decode_variants_at_the_profiled_shape():
    """At K = N = 4096 on 132 SMs: the dispatcher's split (16 at M = 1, 4 at M = 16: _gemv_split_k), that launch with
    its epilogue launched apart and with W in its own column order (128-row tiles only), the two-stage launch with
    that split, and other splits; no M outside the GEMV's rows."""
    from perf.profile_linear import decode_variants

    one = decode_variants(1, 4096, 4096, sms=132)
    assert [label for label, _ in one] == ["dispatcher (16 splits, 1 stage)", "epilogue launched apart",
                                           "W's own column order", "2 stages", "4 splits", "8 splits", "32 splits",
                                           "64-row tiles, 8 splits"]
    assert one[0][1] is None
    assert [(c.num_stages, c.split_k, c.block_n, c.fold_epilogue, c.fragment_order) for _, c in one[1:]] == [
        (1, 16, 128, False, True), (1, 16, 128, True, False), (2, 16, 128, True, True), (1, 4, 128, True, True),
        (1, 8, 128, True, True), (1, 32, 128, True, True), (1, 8, 64, True, True)]
    sixteen = decode_variants(16, 4096, 4096, sms=132)
    assert [(c.num_stages, c.split_k, c.block_n, c.fold_epilogue, c.fragment_order) for _, c in sixteen[1:]] == [
        (1, 4, 128, False, True), (1, 4, 128, True, False), (2, 4, 128, True, True), (1, 1, 128, True, True),
        (1, 2, 128, True, True), (1, 8, 128, True, True), (1, 2, 64, True, True)]
    thirty_two = decode_variants(32, 4096, 4096, sms=132)  # 64 rows of W: no fragment order, no variant without it
    assert [label for label, _ in thirty_two] == ["dispatcher (2 splits, 1 stage)", "epilogue launched apart",
                                                  "2 stages", "1 split", "4 splits"]
    for m in (0, K.SMALL_M + 1):
        with pytest.raises(ValueError, match="m must be in"):
            decode_variants(m, 4096, 4096, sms=132)


def _gemv_rows(case) -> int:
    """The GEMV row tile for the case's M (kernels/linear.py gemv_config)."""
    return K.gemv_config(case["lead"][0]).block_m


@pytest.mark.parametrize("layout", ["word_pairs", "split", "interleave"])
@examples(4)
@given(case=decode_cases(), split_k=st.sampled_from([1, 2]), block_k=st.sampled_from([32, 64, 128]),
       block_n=st.sampled_from([16, 32]))
def test_gemv_gpu_layouts_match_oracle(layout, case, split_k, block_k, block_n):
    """The decode kernel's GPU decodes, run here under the interpreter: NVIDIA's word decode (``word_pairs``:
    :func:`_word_tile`'s column pairs, joins and permute, in W's column order), as sm_80 and sm_90 run it in bf16
    and fp16; the byte-at-a-time decode as AMD GPUs and sm_80 in float32 run it ("split": x split into its even and
    odd columns) and as sm_90 in float32 (``INTERLEAVE``: a byte's two values interleaved into W's column order, W
    the MMA's first operand, y^T accumulated)."""
    from unittest import mock

    import triton.language as tl

    with mock.patch.object(K, "PAIR_LAYOUT_UNDER_INTERPRETER", tl.constexpr(layout)):
        _run_path(case, K.MatmulConfig(_gemv_rows(case), block_n, block_k, split_k=split_k, path="gemv"))


@pytest.mark.parametrize("layout", ["word_fragments_mma", "word_fragments_wgmma"])
@examples(4)
@given(case=decode_cases(), split_k=st.sampled_from([1, 2]))
def test_gemv_fragment_order_matches_oracle(layout, case, split_k):
    """The 16-row GEMV tile on NVIDIA GPUs (128 rows of W, K steps of 128) decodes W into the MMA's fragment order
    (mma.sync on sm_80, the warpgroup MMA on sm_90): the tile's rows and columns relabelled (``_fragment_rows``,
    ``_column_tile``) and x's columns with them (``_fragment_columns``), run here under the interpreter: against
    the oracle, with N below the tile (rows past N masked in the relabelled order) and K steps reaching past K's
    rest."""
    from unittest import mock

    import triton.language as tl

    with mock.patch.object(K, "PAIR_LAYOUT_UNDER_INTERPRETER", tl.constexpr(layout)):
        _run_path(case, K.MatmulConfig(_gemv_rows(case), 128, 128, split_k=split_k, path="gemv"))


def test_gemv_options_bound_registers_only_for_the_mma_sync_fragment_order():
    """``maxnreg`` (GEMV_MMA_MAXNREG) goes to a GEMV launch exactly where its tile decodes W in mma.sync's fragment
    order: an NVIDIA GPU before sm_90, the 128 x 128 tile of W (``fragment_tile``), a 16-bit compute dtype,
    ``fragment_order`` on."""
    tile16, tile32 = K.gemv_config(1), K.gemv_config(32)
    bound = {"maxnreg": K.GEMV_MMA_MAXNREG}
    assert K._gemv_options(tile16, torch.bfloat16, True) == K._gemv_options(tile16, torch.float16, True) == bound
    assert K._gemv_options(tile16, torch.bfloat16, False) == {}  # sm_90 or AMD
    assert K._gemv_options(tile16, torch.float32, True) == {}  # the byte decode
    assert K._gemv_options(tile32, torch.bfloat16, True) == {}  # 64 rows of W: W's own order
    assert K._gemv_options(replace(tile16, fragment_order=False), torch.bfloat16, True) == {}
    # the tile the kernel decodes in fragment order (its FRAGMENT constexpr), which profile_linear also asks
    assert K.fragment_tile(tile16) and not K.fragment_tile(tile32)
    assert not K.fragment_tile(replace(tile16, fragment_order=False))
    assert not K.fragment_tile(replace(tile16, block_k=64))


@pytest.mark.parametrize("kind", ["mma", "wgmma"])
def test_fragment_order_puts_each_value_in_the_thread_that_loaded_it(kind):
    """The relabelling itself, against the layouts it is derived from (written out here): thread t of warp v loads
    words 4 (t % 4) .. 4 (t % 4) + 3 of tile rows t // 4 + 8 v + 32 r (16-byte loads); the MMA's first operand of a
    128 x 128 tile wants rows t // 4 + 8 a + 16 v + 64 b in that thread, and columns 2 (t % 4) + h + 8 e + 16 j
    (wgmma's A fragment) or 8 (t % 4) + e + 32 j (Triton's mma.sync operand with 8 consecutive values along K). The
    fragment-ordered tile (``_column_tile``) holds at (L, k) the value loaded at row position i, column col with
    ``_fragment_rows``[i] = L (W's row L is loaded there) and ``_fragment_columns`` placing x's column col at k; and
    the thread the MMA reads (L, k) from is the thread that loaded it."""
    import triton
    import triton.language as tl

    fragment = T.FRAGMENT_MMA if kind == "mma" else T.FRAGMENT_WGMMA

    @triton.jit
    def relabel(rows_ptr, cols_ptr, tile_ptr, FRAGMENT: tl.constexpr):
        tl.store(rows_ptr + tl.arange(0, 128), T._fragment_rows(128))
        cols = tl.reshape(tl.arange(0, 128), (1, 128))
        tl.store(cols_ptr + tl.arange(0, 128), tl.reshape(T._fragment_columns(cols, FRAGMENT), (128,)))
        # c_k holds columns 8 c + 2 k + pair of row i: tagged with their position i * 128 + column
        at = (tl.arange(0, 128)[:, None, None] * 128 + 8 * tl.arange(0, 16)[None, :, None]
              + tl.arange(0, 2)[None, None, :])
        values = T._column_tile(at, at + 2, at + 4, at + 6, FRAGMENT)
        tl.store(tile_ptr + tl.arange(0, 128)[:, None] * 128 + tl.arange(0, 128)[None, :], values)

    rows, cols = torch.empty(128, dtype=torch.int32), torch.empty(128, dtype=torch.int32)
    tile = torch.empty(128, 128, dtype=torch.int32)
    relabel[(1,)](rows, cols, tile, FRAGMENT=fragment)
    rows, cols, tile = rows.tolist(), cols.tolist(), tile.tolist()
    assert sorted(rows) == list(range(128)) and sorted(cols) == list(range(128))
    loaded_by = {}  # (row position, column) of the loaded words -> (warp, lane)
    for v, t, r, e in itertools.product(range(4), range(32), range(4), range(32)):
        loaded_by[(t // 4 + 8 * v + 32 * r, 32 * (t % 4) + e)] = (v, t)
    for v, t, a, b, j, e in itertools.product(range(4), range(32), range(2), range(2), range(8), range(4)):
        row = t // 4 + 8 * a + 16 * v + 64 * b
        if kind == "wgmma":  # e = 2 e' + h: columns 2 c + h + 8 e' + 16 j
            col = 2 * (t % 4) + e % 2 + 8 * (e // 2) + 16 * j
        else:  # 8 c + e + 32 j, e < 8 (j < 4)
            col = 8 * (t % 4) + e + 4 * (j % 2) + 32 * (j // 2)
        i, loaded_col = divmod(tile[row][col], 128)
        assert rows[i] == row and cols[col] == loaded_col, (row, col)
        assert loaded_by[(i, loaded_col)] == (v, t), (row, col)


def _run_word_decode_asm(asm: str, word: int, scale: np.float32, code: np.ndarray, dtype: torch.dtype) -> list[int]:
    """Executes ``_word_decode_asm``'s PTX for one word on a CPU: the four output registers ($0-$3) as 32-bit ints.
    Inputs as the kernel passes them (pack=2 over two copies): $4 = $5 the word, $6 = $7 its scale, $8 = $9 the
    lane table, whose copy in warp lane L is code[L % 16] (_lane_code_table). Knows only the instructions the
    block uses; any other one fails the test."""
    regs = {"$4": word, "$5": word, "$6": scale, "$7": scale}
    out = [None] * 4

    def value(name):
        return int(name, 0) if name[0].isdigit() else regs[name]

    def to_16(x):
        return int(torch.tensor([x], dtype=torch.float32).to(dtype).view(torch.int16).item()) & 0xFFFF

    for instr in (i.strip() for i in asm.replace("{", ";").replace("}", ";").split(";")):
        if not instr or instr.startswith(".reg"):
            continue
        op, args = instr.split(None, 1)
        args = [a.strip() for a in args.split(",")]
        if op == "shr.b32":
            result = (value(args[1]) & 0xFFFFFFFF) >> value(args[2])
        elif op == "mov.b32":
            result = value(args[1])
        elif op == "shfl.sync.idx.b32":
            assert args[1] in ("$8", "$9") and args[3:] == ["0x1f", "0xffffffff"], instr
            result = np.float32(code[(value(args[2]) & 31) % 16])  # lane (index & 31) holds code[lane % 16]
        elif op == "mul.rn.f32":
            result = np.float32(value(args[1])) * np.float32(value(args[2]))
        elif op in ("cvt.rn.bf16x2.f32", "cvt.rn.f16x2.f32"):
            # d = {hi: a, lo: b}, each rounded to nearest even
            result = (to_16(value(args[1])) << 16) | to_16(value(args[2]))
        else:
            raise AssertionError(f"instruction not emulated: {instr}")
        if args[0].startswith("$"):
            out[int(args[0][1:])] = result
        else:
            regs[args[0]] = result
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@examples(20)
@given(word=st.integers(0, 2**32 - 1), scale_bits=st.integers(0x30000000, 0x48000000))
def test_word_decode_assembly_computes_the_column_pairs(dtype, word, scale_bits):
    """The GPUs' word decode (``_word_tile`` on NVIDIA, 16-bit compute dtypes) is inline PTX that no CPU test runs:
    executed here instruction by instruction, output k of a word holds its columns 2k (low half) and 2k + 1
    (high half), each ``round(code[nibble] * scale)`` in the compute dtype, with column e's nibble the high one of
    byte e // 2 for even e, the low one for odd e (the packing of ``quantize_4bit``)."""
    asm = (T._WORD_DECODE_BF16 if dtype == torch.bfloat16 else T._WORD_DECODE_F16).value
    # Scales as float32 bit patterns (about 5e-10 to 1.3e5), not st.floats: Hypothesis refuses floats once a
    # library has set the CPU's flush-to-zero mode.
    scale = np.array([scale_bits], dtype=np.uint32).view(np.float32)[0]
    code = normal_float_codebook().astype(np.float32)
    got = _run_word_decode_asm(asm, word, scale, code, dtype)

    def column(e):
        byte = (word >> (8 * (e // 2))) & 0xFF
        q = byte >> 4 if e % 2 == 0 else byte & 15
        v = torch.tensor([code[q] * scale], dtype=torch.float32).to(dtype)
        return int(v.view(torch.int16).item()) & 0xFFFF

    assert got == [column(2 * k) | (column(2 * k + 1) << 16) for k in range(4)]


def test_default_dispatch(monkeypatch):
    for arch in (8, 9):
        assert K.choose_path(1, 4096, 64, arch=arch) == "gemv"
        assert K.choose_path(K.SMALL_M, 4096, 64, arch=arch) == "gemv"
        assert K.choose_path(K.SMALL_M + 1, 4096, 64, arch=arch) == "fused"
        assert K.choose_path(64, 4096, 64, arch=arch) == "fused"
        # rows of W not whole scale blocks: dequantize-then-GEMM at every M
        assert K.choose_path(1, 1000, 64, arch=arch) == K.choose_path(32, 1000, 64, arch=arch) == "dequant"
        # the dx path is the forward's, with the fused kernel for the (forward-only) GEMV
        assert K.choose_dx_path(1, 4096, 64, arch) == "fused" and K.choose_dx_path(1, 1000, 64, arch) == "dequant"
    assert K.FUSED_MAX_M == {8: None, 9: 256}
    assert K.choose_path(256, 4096, 64, arch=9) == "fused" and K.choose_path(257, 4096, 64, arch=9) == "dequant"
    assert K.choose_dx_path(4096, 4096, 64, 9) == "dequant"
    assert K.choose_path(1 << 20, 4096, 64, arch=8) == "fused" and K.choose_dx_path(4096, 4096, 64, 8) == "fused"
    assert K.FUSED_SMALL_TILE_MAX_M == 256
    for arch, (small, large) in K.FUSED_CONFIGS.items():
        # one 64-row tile: 32 columns (twice the programs), the forward with a 128-wide K step, dx a 64-wide one
        # (its 128-wide build does not compile on sm_90); then 64 x 64 tiles up to 256 rows, 128-row ones above
        assert K.fused_config(64, arch) == K.FUSED_NARROW_CONFIG == K.MatmulConfig(64, 32, 128)
        assert K.fused_config(64, arch, dx=True) == K.FUSED_NARROW_DX_CONFIG == K.MatmulConfig(64, 32, 64)
        for dx in (False, True):
            assert K.fused_config(65, arch, dx) == K.fused_config(256, arch, dx) == small
            assert K.fused_config(257, arch, dx) == large
        assert small.block_m == 64 and large.block_m == 128
    # the GEMV's row tile: 16 up to 16 rows, 32 up to SMALL_M; a config outside those is refused
    assert K.SMALL_M == 32 and K.gemv_config(16) == K.SMALL_M_CONFIG and K.gemv_config(17).block_m == 32
    assert K.gemv_config(32).block_m == 32 and K.gemv_config(32).block_k == K.SMALL_M_CONFIG.block_k
    with pytest.raises(ValueError, match="block_m in"):
        K._check_config(K.MatmulConfig(16, 64, 128, path="gemv"), 17)
    with pytest.raises(ValueError, match="block_m in"):
        K._check_config(K.MatmulConfig(64, 64, 128, path="gemv"), 40)
    # Without an arch the GPU's own is asked once: NVIDIA from compute capability 9.0 on is 9; older NVIDIA GPUs and
    # AMD (ROCm reports a capability 9.x) are 8.
    for capability, hip, arch in (((9, 0), None, 9), ((10, 0), None, 9), ((8, 6), None, 8), ((9, 4), "6.2", 8)):
        monkeypatch.setattr(K, "_GPU_ARCH", [])
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        monkeypatch.setattr(torch.version, "hip", hip)
        assert K.gpu_arch() == arch and K.choose_path(512, 4096, 64) == ("dequant" if arch == 9 else "fused")
    monkeypatch.setattr(K, "_GPU_ARCH", [])


@examples(6)
@given(case=layer_cases())
def test_matches_torch_autograd_on_dense_weight(case):
    """Same outputs and gradients as torch.autograd through F.linear on the dequantized dense weight, computed in
    float64 (so the bounds are those of the oracle comparison)."""
    weight, x, lora_a, lora_b, bias, dy = _build(case)
    dtype, p, seed = case["dtype"], case["dropout_p"], case["seed"] % (2**31)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, lora_a, lora_b)]
    bias_leaf = None if bias is None else bias.detach().clone().requires_grad_(True)
    y = qlora_linear(*leaves[:1], weight, *leaves[1:], case["scaling"], bias_leaf, dropout_p=p, seed=seed)
    y.backward(dy)

    w64 = torch.from_numpy(_dense_weight(weight, dtype))
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (x, lora_a, lora_b)]
    ref_bias = None if bias is None else bias.detach().double().requires_grad_(True)
    mask = dropout_mask(seed, x.shape, p).double() if p > 0 else torch.ones(x.shape, dtype=torch.float64)
    xr, ar, br = ref_leaves
    y_ref = torch.nn.functional.linear(xr, w64, ref_bias) + case["scaling"] * torch.nn.functional.linear(
        torch.nn.functional.linear(xr * mask, ar), br)
    y_ref.backward(dy.double())
    grads = (leaves[0].grad, leaves[1].grad, leaves[2].grad, None if bias is None else bias_leaf.grad)
    # The oracle comparison already bounds each quantity; here the reference values come from torch instead.
    ref_y = y_ref.detach().numpy()
    assert np.allclose(qlora_linear_forward(_np(x), _np(w64), _np(lora_a), _np(lora_b), case["scaling"],
                                            None if bias is None else _np(bias),
                                            None if p == 0 else _np(mask)), ref_y, rtol=1e-12, atol=1e-12)
    _check_against_oracle(x, _np(w64), lora_a, lora_b, case["scaling"], bias, None if p == 0 else mask, dy, y,
                          grads, dtype)
    for got, want in zip(grads[:3], ref_leaves):
        assert got.shape == want.grad.shape


def test_dropout_mask_is_a_seeded_bernoulli_mask():
    m, k, p = 64, 96, 0.3
    mask = dropout_mask(1234, (2, m // 2, k), p)
    assert mask.shape == (2, m // 2, k) and mask.dtype == torch.float32
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    assert bool(((mask == 0) | (mask == scale)).all())
    keep = float((mask != 0).float().mean())
    # Binomial(6144, 0.7): standard deviation sqrt(0.7 * 0.3 / 6144) = 0.0058; 6 sigma = 0.035.
    assert abs(keep - (1 - p)) < 0.035
    assert torch.equal(mask, dropout_mask(1234, (m, k), p).reshape(2, m // 2, k))
    assert not torch.equal(mask, dropout_mask(1235, (2, m // 2, k), p))


def test_dropout_only_in_training_and_seeded_from_torch():
    gen = torch.Generator().manual_seed(7)
    weight = quantize_nf4(_randn(gen, (24, 40), torch.float32))
    x = _randn(gen, (6, 40), torch.float32)
    a = _randn(gen, (4, 40), torch.float32, 0.2)
    b = _randn(gen, (24, 4), torch.float32)
    plain = qlora_linear(x, weight, a, b, 2.0)
    # Eval mode ignores dropout_p entirely: bit-identical to p = 0.
    assert torch.equal(qlora_linear(x, weight, a, b, 2.0, dropout_p=0.5, training=False), plain)
    torch.manual_seed(99)
    first = qlora_linear(x, weight, a, b, 2.0, dropout_p=0.5)
    torch.manual_seed(99)
    again = qlora_linear(x, weight, a, b, 2.0, dropout_p=0.5)
    assert torch.equal(first, again)
    assert not torch.equal(first, plain)


def _tiny_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    dense = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).to(dtype)
    model = torch.nn.Sequential(
        QLoRALinear.from_linear(dense[0], r=4, lora_alpha=8, lora_dropout=0.1),
        torch.nn.GELU(),
        QLoRALinear.from_linear(dense[2], r=4, lora_alpha=8),
    )
    return model


def test_training_reduces_loss_and_merge_matches():
    model = _tiny_model()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]  # base bias frozen (PEFT bias="none")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 16, generator=gen)
    target = torch.randn(32, 8, generator=gen)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.eval()
    with torch.no_grad():
        loss0 = float(torch.nn.functional.mse_loss(model(x), target))
    model.train()
    for _ in range(12):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(x)
        loss1 = float(torch.nn.functional.mse_loss(out, target))
        merged = torch.nn.Sequential(model[0].to_dense_linear(), torch.nn.GELU(), model[2].to_dense_linear())
        out_merged = merged(x)
    assert loss1 < 0.8 * loss0, (loss0, loss1)
    assert isinstance(merged[0], torch.nn.Linear) and merged[0].weight.dtype == torch.float32
    # fp32 throughout: the fused layer and the merged dense layer differ only by float32 reassociation
    # (K + r + 4 roundings of sums of |terms| of size ~ |out| * few), far below 1e-4 for these O(1) values.
    assert torch.allclose(out, out_merged, rtol=1e-4, atol=1e-4), (out - out_merged).abs().max()


def test_trainable_bias_gets_its_gradient():
    gen = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(20, 12).to(torch.bfloat16)
    layer = QLoRALinear.from_linear(lin, r=2, lora_alpha=4, blocksize=32, double_quant=False)
    assert layer.bias.requires_grad is False
    layer.bias.requires_grad_(True)
    dy = _randn(gen, (3, 5, 12), torch.bfloat16)
    layer(_randn(gen, (3, 5, 20), torch.bfloat16)).backward(dy)
    # dbias = sum of dy over 15 rows in float32, rounded once to bf16.
    want = dy.double().sum((0, 1))
    assert torch.allclose(layer.bias.grad.double(), want, rtol=2**-8, atol=16 * 2**-24 * 15)


def test_module_init_matches_peft_and_base_layer():
    torch.manual_seed(5)
    lin = torch.nn.Linear(48, 20)
    layer = QLoRALinear.from_linear(lin, r=8, lora_alpha=16)
    assert layer.scaling == 2.0 and layer.r == 8 and layer.in_features == 48 and layer.out_features == 20
    assert torch.count_nonzero(layer.lora_B) == 0
    # Kaiming-uniform with a = sqrt(5): bound = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + 5)) -> 1 / sqrt(48).
    bound = 1 / math.sqrt(48)
    a_max = float(layer.lora_A.detach().abs().max())
    assert 0.5 * bound < a_max <= bound
    assert layer.weight.double_quant and layer.weight.blocksize == 64 and layer.weight.shape == (20, 48)
    assert not any(p.requires_grad for p in [layer.bias])
    text = repr(layer)
    for field in ("in_features=48", "out_features=20", "r=8", "lora_alpha=16", "scaling=2", "bias=True",
                  "blocksize=64", "double_quant=True"):
        assert field in text
    x = torch.randn(7, 48)
    # A fresh adapter adds exactly zero: the layer is the quantized base layer (oracle tolerance with B = 0).
    y_ref = qlora_linear_forward(_np(x), _dense_weight(layer.weight, torch.float32), _np(layer.lora_A),
                                 _np(layer.lora_B), 2.0, _np(layer.bias))
    base = np.abs(_np(x)) @ np.abs(_dense_weight(layer.weight, torch.float32)).T
    _assert_close("y", layer(x), y_ref, elementwise_bound(y_ref, base + np.abs(_np(layer.bias)), 52 * U32, torch.float32))


def test_module_dtype_cast_keeps_nf4_weight_and_state_dict_round_trips():
    torch.manual_seed(6)
    layer = QLoRALinear.from_linear(torch.nn.Linear(30, 10), r=3, lora_alpha=3)
    torch.nn.init.normal_(layer.lora_B)
    layer = layer.to(torch.float16)
    assert layer.lora_A.dtype == torch.float16 and layer.weight.code.dtype == torch.float32
    assert layer.weight.absmax.dtype == torch.uint8 and layer.weight.absmax2.dtype == torch.float32
    x = torch.randn(4, 30).to(torch.float16)
    state = layer.state_dict()
    assert {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
            "weight.quant_state.bitsandbytes__nf4"} <= set(state)
    fresh = QLoRALinear.from_linear(torch.nn.Linear(30, 10), r=3, lora_alpha=3).to(torch.float16)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), layer(x))
    with pytest.raises(RuntimeError, match="weight"):
        QLoRALinear.from_linear(torch.nn.Linear(30, 11), r=3, lora_alpha=3).load_state_dict(state)


# ------------------------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    gen = torch.Generator().manual_seed(11)
    weight = quantize_nf4(_randn(gen, (12, 20), torch.bfloat16))
    return dict(x=_randn(gen, (3, 20), torch.bfloat16), weight=weight, a=_randn(gen, (4, 20), torch.bfloat16),
                b=_randn(gen, (12, 4), torch.bfloat16), bias=_randn(gen, (12,), torch.bfloat16))


@pytest.mark.parametrize("change, error, message", [
    (dict(weight=torch.zeros(12, 20)), TypeError, "weight must be a qlora.nf4.NF4Weight"),
    (dict(x=torch.zeros(3, 21, dtype=torch.bfloat16)), ValueError, r"x must have shape \(\.\.\., 20\)"),
    (dict(x=torch.zeros(3, 20, dtype=torch.int32)), TypeError, "x must be float32, float16 or bfloat16"),
    (dict(x=[[0.0] * 20]), TypeError, "x must be a torch.Tensor"),
    (dict(a=torch.zeros(4, 19, dtype=torch.bfloat16)), ValueError, r"lora_A must have shape \(r, 20\)"),
    (dict(a=torch.zeros(0, 20, dtype=torch.bfloat16)), ValueError, "lora_A must have shape .* r >= 1"),
    (dict(b=torch.zeros(12, 5, dtype=torch.bfloat16)), ValueError, r"lora_B must have shape \(12, 4\)"),
    (dict(b=torch.zeros(11, 4, dtype=torch.bfloat16)), ValueError, r"lora_B must have shape \(12, 4\)"),
    (dict(a=torch.zeros(4, 20)), TypeError, "lora_A has dtype float32 but x has bfloat16"),
    (dict(b=torch.zeros(12, 4, dtype=torch.float16)), TypeError, "lora_B has dtype float16 but x has bfloat16"),
    (dict(bias=torch.zeros(12)), TypeError, "bias has dtype float32 but x has bfloat16"),
    (dict(bias=torch.zeros(13, dtype=torch.bfloat16)), ValueError, r"bias must have shape \(12,\)"),
    (dict(x=torch.zeros(3, 20, dtype=torch.bfloat16, device="meta")), ValueError, "x is on meta"),
    (dict(scaling=float("nan")), TypeError, "scaling must be a finite real number"),
    (dict(scaling="2"), TypeError, "scaling must be a finite real number"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be a number in \[0, 1\)"),
    (dict(dropout_p=-0.1), ValueError, r"dropout_p must be a number in \[0, 1\)"),
    (dict(training=1), TypeError, "training must be a bool"),
    (dict(seed=-1), ValueError, "seed must be None or an int"),
])
def test_qlora_linear_rejects_bad_inputs(small, change, error, message):
    args = dict(x=small["x"], weight=small["weight"], a=small["a"], b=small["b"], scaling=2.0, bias=small["bias"],
                dropout_p=0.1, training=True, seed=None)
    args.update(change)
    with pytest.raises(error, match=message):
        qlora_linear(args["x"], args["weight"], args["a"], args["b"], args["scaling"], args["bias"],
                     dropout_p=args["dropout_p"], training=args["training"], seed=args["seed"])


def test_kernel_launchers_reject_bad_inputs(small):
    kw = small["weight"].kernel_kwargs()
    x, a, b = small["x"], small["a"], small["b"]
    with pytest.raises(ValueError, match="packed must hold 120 bytes"):
        K.nf4_lora_forward(x, lora_a=a, lora_b=b, scaling=1.0, **{**kw, "packed": kw["packed"][:-1]})
    with pytest.raises(TypeError, match="absmax must have dtype in \\(uint8\\)"):
        K.nf4_lora_forward(x, lora_a=a, lora_b=b, scaling=1.0, **{**kw, "absmax": kw["absmax"].float()})
    with pytest.raises(ValueError, match="absmax2, offset and nested_code must be given together"):
        K.nf4_lora_forward(x, lora_a=a, lora_b=b, scaling=1.0, **{**kw, "offset": None})
    with pytest.raises(ValueError, match="blocksize must be one of"):
        K.nf4_lora_forward(x, lora_a=a, lora_b=b, scaling=1.0, **{**kw, "blocksize": 48})
    with pytest.raises(ValueError, match="config.split_k must be one of"):
        K.nf4_lora_forward(x, lora_a=a, lora_b=b, scaling=1.0, config=K.MatmulConfig(16, 16, 16, split_k=3), **kw)
    with pytest.raises(TypeError, match="config.fold_epilogue must be a bool, got int"):
        K.nf4_lora_forward(x, lora_a=a, lora_b=b, scaling=1.0,
                           config=K.MatmulConfig(16, 16, 32, path="gemv", fold_epilogue=1), **kw)
    with pytest.raises(TypeError, match="config.fragment_order must be a bool, got str"):
        K.nf4_lora_forward(x, lora_a=a, lora_b=b, scaling=1.0,
                           config=K.MatmulConfig(16, 16, 32, path="gemv", fragment_order="no"), **kw)
    with pytest.raises(ValueError, match="u must be contiguous float32 of shape"):
        K.nf4_lora_backward(torch.zeros(3, 12, dtype=torch.bfloat16), x, torch.zeros(3, 5), lora_a=a, lora_b=b,
                            scaling=1.0, **kw)
    with pytest.raises(TypeError, match="dy must have dtype in \\(float16\\)|dy must have dtype in \\(bfloat16\\)"):
        K.nf4_lora_backward(torch.zeros(3, 12), x, torch.zeros(3, 4), lora_a=a, lora_b=b, scaling=1.0, **kw)
    with pytest.raises(ValueError, match="seed must be an int"):
        K.lora_dropout_mask(2**31, (2, 2), 0.5)
    # A given keep mask must be the bit-packed mask of the dropped operand: (M, ceil(K / 32)) int32, contiguous.
    left, right, out = torch.zeros(3, 4), torch.zeros(3, 40), torch.zeros(4, 40)
    with pytest.raises(ValueError, match=r"keep must be contiguous int32 of shape \(3, 2\)"):
        K.lora_grad(left, right, out, scale=1.0, dropout_p=0.5, keep=torch.zeros(3, 1, dtype=torch.int32))
    with pytest.raises(TypeError, match="keep must have dtype in \\(int32\\)"):
        K.lora_grad(left, right, out, scale=1.0, dropout_p=0.5, keep=torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"keep must be contiguous int32 of shape \(3, 2\)"):
        K.lora_down(right, torch.zeros(40, 4), dropout_p=0.5, keep=torch.zeros(2, 3, dtype=torch.int32).T)
    with pytest.raises(ValueError, match=r"p must be in \[0.0, 1.0\)"):
        K.lora_dropout_mask(0, (2, 2), 1.0)


@examples(10)
@given(m=st.integers(0, KL.DOWN_GRAD_MAX_M), n=st.one_of(st.integers(1, 40), st.integers(500, 1100)),
       r=st.integers(1, 32), dtype=st.sampled_from(DTYPES), with_colsum=st.booleans(), seed=st.integers(0, 2**16))
def test_lora_down_grad_gives_the_bits_of_lora_down_and_lora_grad(m, n, r, dtype, with_colsum, seed):
    """The backward's g = dy B and dB = dy^T u in one pass over dy (``lora_down_grad``, up to DOWN_GRAD_MAX_M rows)
    give the bits of lora_down (g) and lora_grad (dB through a transposed view, the bias gradient as column sums),
    which the layer tests check against the oracle: the same tiles and roundings. N above the interpreter's 512
    columns: g summed from its column tiles' partials by sum_splits (the partials add in lora_down's order)."""
    gen = torch.Generator().manual_seed(seed)
    dy, b = _randn(gen, (m, n), dtype), _randn(gen, (n, r), dtype)
    u = torch.randn((m, r), generator=gen)
    d_b, want_d_b = torch.full((n, r), 7.0, dtype=dtype), torch.full((n, r), 7.0, dtype=dtype)
    colsum, want_colsum = (torch.full((n,), 7.0, dtype=dtype), torch.full((n,), 7.0, dtype=dtype)) if with_colsum \
        else (None, None)
    g = KL.lora_down_grad(dy, b, u, d_b.t(), scale=1.5, colsum=colsum)
    KL.lora_grad(u, dy, want_d_b.t(), scale=1.5, colsum=want_colsum)
    assert torch.equal(g, KL.lora_down(dy, b))
    assert torch.equal(d_b, want_d_b)
    assert colsum is None or torch.equal(colsum, want_colsum)


def test_lora_down_grad_rejects_bad_arguments():
    dy, b, u, out = torch.zeros(3, 40), torch.zeros(40, 4), torch.zeros(3, 4), torch.zeros(4, 40)
    with pytest.raises(TypeError, match="b must have dtype in \\(float32\\)"):
        KL.lora_down_grad(dy, b.bfloat16(), u, out, scale=1.0)
    with pytest.raises(TypeError, match="u must have dtype in \\(float32\\)"):
        KL.lora_down_grad(dy, b, u.bfloat16(), out, scale=1.0)
    with pytest.raises(ValueError, match=r"disagree: want b \(40, R\), u \(3, R\), out \(R, 40\)"):
        KL.lora_down_grad(dy, b, torch.zeros(3, 5), out, scale=1.0)
    with pytest.raises(ValueError, match="u must be contiguous"):
        KL.lora_down_grad(dy, b, torch.zeros(4, 3).T, out, scale=1.0)
    with pytest.raises(ValueError, match="at most 64 rows and one rank tile"):
        KL.lora_down_grad(torch.zeros(65, 40), b, torch.zeros(65, 4), out, scale=1.0)
    with pytest.raises(ValueError, match="at most 64 rows and one rank tile"):
        KL.lora_down_grad(dy, torch.zeros(40, 33), torch.zeros(3, 33), torch.zeros(33, 40), scale=1.0)
    with pytest.raises(ValueError, match=r"colsum must be contiguous of shape \(40,\)"):
        KL.lora_down_grad(dy, b, u, out, scale=1.0, colsum=torch.zeros(41))
    with pytest.raises(TypeError, match="scale must be a finite Python number"):
        KL.lora_down_grad(dy, b, u, out, scale=float("nan"))


def test_module_rejects_bad_arguments():
    lin = torch.nn.Linear(8, 4)
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear"):
        QLoRALinear.from_linear(torch.nn.Conv1d(8, 4, 1), r=2, lora_alpha=2)
    with pytest.raises(ValueError, match="r must be an int >= 1"):
        QLoRALinear.from_linear(lin, r=0, lora_alpha=2)
    with pytest.raises(ValueError, match=r"lora_dropout must be a number in \[0, 1\)"):
        QLoRALinear.from_linear(lin, r=2, lora_alpha=2, lora_dropout=1.5)
    with pytest.raises(TypeError, match="lora_alpha must be a finite real number"):
        QLoRALinear.from_linear(lin, r=2, lora_alpha=float("inf"))
    with pytest.raises(ValueError, match="blocksize must be one of"):
        QLoRALinear.from_linear(lin, r=2, lora_alpha=2, blocksize=100)
    with pytest.raises(TypeError, match="weight must be a qlora.nf4.NF4Weight"):
        QLoRALinear(lin.weight, r=2, lora_alpha=2)
    layer = QLoRALinear.from_linear(lin, r=2, lora_alpha=2)
    with pytest.raises(TypeError, match="lora_A has dtype float32 but x has float16"):
        layer(torch.zeros(2, 8, dtype=torch.float16))


def test_compile_specs_cover_every_kernel_argument():
    """Each spec names every argument of its kernel and gives every constexpr a value (compiled in
    tests/test_perf_static.py / `python -m perf static`); every GPU autotune config is listed."""
    for module in (K, KL):
        specs = module.compile_specs()
        names = {s.name for s in specs}
        assert len(names) == len(specs)
        for spec in specs:
            assert list(spec.signature) == list(spec.fn.arg_names), spec.name
            constexprs = {k for k, v in spec.signature.items() if v == "constexpr"}
            assert constexprs == set(spec.constexprs), spec.name
    kernels = {s.fn for s in K.compile_specs()} | {s.fn for s in KL.compile_specs()}
    assert {K._matmul_lora_kernel, K._nf4_gemv_kernel, K._gemv_epilogue_kernel, KL._lora_down_kernel,
            KL._lora_grad_kernel, KL._sum_splits_kernel, KL._dropout_bits_kernel} <= kernels
    names = {s.name for s in K.compile_specs()}
    for cfg in {c for arch in K.GPU_CONFIGS.values() for c in arch}:
        assert {f"dense_fwd_{cfg.tag}", f"dense_dx_{cfg.tag}"} <= names
    specs = {s.name: s for s in K.compile_specs()}
    arch_targets = {8: {"sm_80", "gfx942", "gfx90a"}, 9: {"sm_90"}}
    for arch, configs in K.FUSED_CONFIGS.items():
        for cfg in configs:
            for name in (f"fused_fwd_{cfg.tag}", f"fused_dx_{cfg.tag}"):
                # built at least for the targets whose architecture launches it
                assert arch_targets[arch] <= set(specs[name].targets or arch_targets[8] | arch_targets[9]), name
        tag = configs[0].tag  # where K is not a multiple of the blocksize (code by code)
        assert {f"fused_percode_fwd_{tag}", f"fused_percode_dx_{tag}"} <= names
    assert f"gemv_{K.SMALL_M_CONFIG.tag}" in names


# ------------------------------------------------------------------------------------------------------------------
# Dropout mask, device seed, launch counts
# ------------------------------------------------------------------------------------------------------------------


def _philox4x32(counter: np.ndarray, seed: int) -> list[np.ndarray]:
    """Philox4x32-10 (Salmon et al. 2011) on counters (c0, c1, 0, 0) = (low, high word of ``counter``), key =
    (low, high word of ``seed``): an independent NumPy model of Triton's ``randint4x``."""
    mask = np.uint64(0xFFFFFFFF)
    c = [(counter.astype(np.uint64) & mask), (counter.astype(np.uint64) >> np.uint64(32)),
         np.zeros_like(counter, np.uint64), np.zeros_like(counter, np.uint64)]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[0]
        p2 = np.uint64(0xCD9E8D57) * c[2]
        c = [((p2 >> np.uint64(32)) ^ c[1] ^ k0) & mask, p2 & mask, ((p0 >> np.uint64(32)) ^ c[3] ^ k1) & mask,
             p0 & mask]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    return c


@pytest.mark.parametrize("m, k, p, seed", [(3, 70, 0.25, 1234), (1, 32, 0.6, 0), (5, 7, 0.1, 2**31 - 1)])
def test_dropout_bits_are_philox_randint4x(m, k, p, seed):
    """Every bit of the packed mask against an independent Philox model: word w of row m from the 4 outputs of
    counters (m * words + w) * 8 + j, bit 4 j + i kept where output i >= round(p * 2**32); bits past K are 0."""
    bits = KL.lora_dropout_bits(seed, (m, k), p).numpy().view(np.uint32)
    words = -(-k // 32)
    threshold = np.uint64(round(p * 2**32))
    counters = (np.arange(m * words, dtype=np.uint64)[:, None] * 8 + np.arange(8, dtype=np.uint64)).reshape(-1)
    outs = _philox4x32(counters, seed)
    kept = np.stack([o >= threshold for o in outs], axis=-1).reshape(m, words, 32)  # bit 4 j + i
    cols = np.arange(words * 32).reshape(words, 32)
    kept &= (cols < k)[None]
    want = (kept.astype(np.uint64) << np.arange(32, dtype=np.uint64)).sum(-1).astype(np.uint32)
    np.testing.assert_array_equal(bits, want)
    mask = K.lora_dropout_mask(seed, (m, k), p).numpy()
    np.testing.assert_array_equal(mask != 0, kept.reshape(m, -1)[:, :k])


def test_dropout_bits_do_not_depend_on_the_tiles():
    """The interpreter launches the mask kernel with tiles shaped to the mask (few programs); a GPU with BITS_BLOCK
    (here 3 x 2 programs, partial in both directions). A word's counters are its flat index, so the bits agree."""
    m, k, p = 40, 600, 0.3
    words = -(-k // 32)
    want = KL.lora_dropout_bits(77, (m, k), p)
    got = torch.empty_like(want)
    block = KL.BITS_BLOCK
    grid = (-(-m // block["BLOCK_M"]), -(-words // block["BLOCK_W"]))
    assert grid == (3, 2) and KL._bits_block(m, words) != block
    KL._dropout_bits_kernel[grid](KL.seed_tensor(77, got.device), got, m, k, words, KL._threshold_biased(p), **block)
    assert torch.equal(got, want)


def test_seed_tensor_is_never_read_on_the_host(monkeypatch):
    """CUDA graphs: with dropout, the layer's forward and backward never read a tensor's value on the host (the
    seed is a tensor the kernels load); host reads are made to fail for the duration."""
    gen = torch.Generator().manual_seed(4)
    weight = quantize_nf4(_randn(gen, (24, 64), torch.bfloat16))
    x = _randn(gen, (3, 64), torch.bfloat16).requires_grad_(True)
    a = _randn(gen, (4, 64), torch.bfloat16, 0.2).requires_grad_(True)
    b = _randn(gen, (24, 4), torch.bfloat16).requires_grad_(True)

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor was read on the host")

    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    qlora_linear(x, weight, a, b, 2.0, dropout_p=0.3).float().sum().backward()
    monkeypatch.undo()
    assert x.grad is not None and a.grad is not None


@pytest.mark.parametrize("m, k, p, forward, backward", [
    # The GEMV's epilogue folded into it (its arrival counts' zero fill is a torch launch, not a Triton one)
    (1, 64, 0.0, ["_nf4_gemv_kernel"], 1),
    (16, 64, 0.3, ["_dropout_bits_kernel", "_nf4_gemv_kernel"], 1),
    (32, 64, 0.3, ["_dropout_bits_kernel", "_nf4_gemv_kernel"], 1),  # the 32-row tile
    (33, 64, 0.0, ["_matmul_lora_kernel"], 1),
    (36, 64, 0.3, ["_dropout_bits_kernel", "_lora_down_kernel", "_matmul_lora_kernel"], 1),
    (2049, 64, 0.0, ["_matmul_lora_kernel"], 3),  # two row tiles of 2048: dA and dB by lora_grad
    # K not a multiple of the blocksize: W dequantized; up to DOWN_GRAD_MAX_M rows g and dB share one launch
    (40, 48, 0.3, ["_dropout_bits_kernel", "_lora_down_kernel", "_dequantize_4bit_kernel", "_matmul_lora_kernel"], 4),
    (65, 48, 0.0, ["_lora_down_kernel", "_dequantize_4bit_kernel", "_matmul_lora_kernel"], 5),
])
def test_launch_counts_per_layer(m, k, p, forward, backward):
    """Launches per layer under the interpreter as the module docstring states them (no split lora_down; W decoded
    in the GEMM's K loop when K is a multiple of the blocksize, with u = x A^T (no dropout) and g = dy B computed
    there too, and dA, dB and the bias gradient when one row tile holds all M rows; else W dequantized into a
    buffer first); the backward reuses the forward's bit-packed mask: [g (with dB and the bias gradient up to
    DOWN_GRAD_MAX_M rows), dequantize,] dx[, dA[, dB]]."""
    gen = torch.Generator().manual_seed(5)
    weight = quantize_nf4(_randn(gen, (24, k), torch.bfloat16))
    x, a = _randn(gen, (m, k), torch.bfloat16), _randn(gen, (4, k), torch.bfloat16)
    b = _randn(gen, (24, 4), torch.bfloat16)
    kw = weight.kernel_kwargs()
    keep = KL.lora_dropout_bits(9, (m, k), p) if p > 0 else None
    with interpreted_launches() as counts:
        y, u = K.nf4_lora_forward(x, lora_a=a, lora_b=b, scaling=1.0, dropout_p=p, seed=9, **kw)
        assert counts == forward
        counts.clear()
        K.nf4_lora_backward(torch.ones_like(y), x, u, lora_a=a, lora_b=b, scaling=1.0, dropout_p=p, keep=keep,
                            need_bias=True, **kw)
    assert len(counts) == backward, counts


@pytest.mark.parametrize("m", [3, 20], ids=["gemv", "dequant"])
def test_dropout_mask_generated_once_and_read_by_the_backward(monkeypatch, m):
    """qlora_linear with dropout: the forward launches the mask kernel once and saves the bit-packed mask; the
    backward reads it (no second launch). The saved mask is the Philox mask of the seed bit for bit, and every
    output and gradient matches the oracle given that mask (and equals the launchers' given the same bits)."""
    gen = torch.Generator().manual_seed(6)
    dtype, k, n, r, p, seed, scaling = torch.bfloat16, 64, 24, 4, 0.35, 4321, 1.5
    weight = quantize_nf4(_randn(gen, (n, k), dtype))
    x = _randn(gen, (m, k), dtype).requires_grad_(True)
    a = _randn(gen, (r, k), dtype, 0.2).requires_grad_(True)
    b = _randn(gen, (n, r), dtype).requires_grad_(True)
    bias = _randn(gen, (n,), dtype).requires_grad_(True)
    dy = _randn(gen, (m, n), dtype)
    masks = []
    original = K.lora_dropout_bits

    def recording(*args, **kwargs):
        masks.append(original(*args, **kwargs))
        return masks[-1]

    monkeypatch.setattr(K, "lora_dropout_bits", recording)
    with interpreted_launches() as counts:
        y = qlora_linear(x, weight, a, b, scaling, bias, dropout_p=p, training=True, seed=seed)
        assert counts.count("_dropout_bits_kernel") == 1
        y.backward(dy)
    assert counts.count("_dropout_bits_kernel") == 1, counts  # the backward launched none
    monkeypatch.undo()
    (keep,) = masks
    assert torch.equal(keep, KL.lora_dropout_bits(seed, (m, k), p))
    grads = (x.grad, a.grad, b.grad, bias.grad)
    _, u = K.nf4_lora_forward(x.detach(), lora_a=a.detach(), lora_b=b.detach(), scaling=scaling, bias=bias.detach(),
                              dropout_p=p, keep=keep, **weight.kernel_kwargs())
    want = K.nf4_lora_backward(dy, x.detach(), u, lora_a=a.detach(), lora_b=b.detach(), scaling=scaling,
                               dropout_p=p, keep=keep, need_bias=True, **weight.kernel_kwargs())
    assert all(torch.equal(got, w) for got, w in zip(grads, want))
    mask = torch.where(KL.expand_keep_bits(keep, k), torch.tensor(1.0 / (1.0 - p)), torch.tensor(0.0))
    _check_against_oracle(x, _dense_weight(weight, dtype), a, b, scaling, bias, mask, dy, y, grads, dtype)
