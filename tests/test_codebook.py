"""Codebook kernels (``qlora.kernels.codebook``) against the oracle (``qlora.reference.codebook``), bit for bit:
every NFk table (k = 2..8, both variants, drawn offsets), the canonical NF4 table of SPEC 1, both dynamic maps;
the kernel's AS241 normal quantile against SciPy; the cache; every rejected argument."""

from __future__ import annotations

import qlora  # noqa: F401, I001  (first: it decides whether triton, imported below, runs the interpreter)
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from hyp import examples
from hypothesis import given
from hypothesis import strategies as st
from scipy.special import ndtri

from qlora.kernels import codebook as K
from qlora.reference import codebook as R

# SPEC 1, code 0..15.
NF4_SPEC = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
    dtype=np.float32,
)  # fmt: skip

U64 = 2.0**-53  # unit roundoff of float64


def _bits(a) -> np.ndarray:
    """float32 values as their bit patterns, so equality also separates -0.0 from 0.0."""
    a = a.cpu().numpy() if isinstance(a, torch.Tensor) else a
    assert a.dtype == np.float32
    return a.view(np.uint32)


def test_nf4_is_the_spec_table_bit_for_bit():
    table = K.normal_float_codebook()
    assert table.dtype == torch.float32 and table.shape == (16,)
    np.testing.assert_array_equal(_bits(table), NF4_SPEC.view(np.uint32))


@pytest.mark.parametrize("use_extra_value", [True, False])
@pytest.mark.parametrize("bits", range(2, 9))
def test_nfk_matches_oracle_bit_for_bit(bits, use_extra_value):
    table = K.normal_float_codebook(bits, use_extra_value=use_extra_value)
    assert table.shape == (2**bits,)
    np.testing.assert_array_equal(_bits(table), _bits(R.normal_float_codebook(bits, use_extra_value=use_extra_value)))


@examples(20)
@given(
    bits=st.integers(2, 8),
    use_extra_value=st.booleans(),
    # the kernel accepts offsets whose float32 rounding lies in [0.5 + 2**-16, 1): float32 values from the whole
    # range, both ends included, and float64 values strictly inside it (rounded the same way by both sides)
    offset=st.one_of(st.floats(0.5 + 2.0**-16, 1.0 - 2.0**-24, width=32), st.floats(0.5001, 0.9999),
                     st.sampled_from([0.5 + 2.0**-16, 1.0 - 2.0**-24])),
)
def test_nfk_any_offset_matches_oracle(bits, use_extra_value, offset):
    table = K.normal_float_codebook(bits, offset, use_extra_value)
    np.testing.assert_array_equal(_bits(table), _bits(R.normal_float_codebook(bits, offset, use_extra_value)))


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_matches_oracle_bit_for_bit(signed):
    table = K.dynamic_map(signed)
    assert table.dtype == torch.float32 and table.shape == (256,)
    np.testing.assert_array_equal(_bits(table), _bits(R.dynamic_map(signed)))


def test_symmetric_table_has_two_zero_codes():
    table = K.normal_float_codebook(4, use_extra_value=False).numpy()
    assert (table == 0).sum() == 2 and table[7] == 0 and table[8] == 0  # DESIGN.md: codes 2^(k-1)-1 and 2^(k-1)
    np.testing.assert_array_equal(table[:7], -table[9:][::-1])


def test_tables_are_cached_and_handed_out_as_copies():
    first = K.normal_float_codebook(5)
    first.fill_(3.0)  # a caller modifying its table must not change anyone else's
    again = K.normal_float_codebook(5)
    np.testing.assert_array_equal(_bits(again), _bits(R.normal_float_codebook(5)))
    assert again.data_ptr() != first.data_ptr()
    dyn = K.dynamic_map()
    dyn.zero_()
    np.testing.assert_array_equal(_bits(K.dynamic_map()), _bits(R.dynamic_map()))
    info = K._normal_float_cached.cache_info()
    K.normal_float_codebook(5)
    assert K._normal_float_cached.cache_info().hits == info.hits + 1  # no rebuild


@triton.jit
def _quantile_probe(p_ptr, out_ptr, coef_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    p = tl.load(p_ptr + i, mask=i < n, other=0.5)
    tl.store(out_ptr + i, K._normal_quantile(p, coef_ptr), mask=i < n)


@examples(5)
@given(seed=st.integers(0, 2**32 - 1))
def test_as241_quantile_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    p = np.concatenate([
        rng.uniform(0.0, 1.0, 4096),                    # all three AS241 regions
        10.0 ** rng.uniform(-300, -1, 1024),            # lower tail, r > 5 below p ~ 1.4e-11
        1.0 - 10.0 ** rng.uniform(-16, -1, 1024),       # upper tail
        [0.075, 0.925, np.exp(-25.0), 0.5 + 2.0**-30],  # region boundaries, near the centre
    ])  # fmt: skip
    p = p[(p > 0) & (p < 1) & (p != 0.5)]
    out = torch.empty(p.size, dtype=torch.float64)
    coef = torch.tensor(K._AS241_COEFFICIENTS, dtype=torch.float64)
    _quantile_probe[(1,)](torch.from_numpy(p), out, coef, p.size, BLOCK=triton.next_power_of_2(p.size))
    expected = ndtri(p)
    # Bound, relative: Wichura's approximation error (< 1e-16, ~1 u64); Horner of degree 7 in float64 with
    # non-negative coefficients and argument has condition 1 and at most 14 roundings per polynomial (gamma_14),
    # so the ratio is within 29 u64, one more for the factor q (central region) or for log/sqrt of the tail
    # argument (each about 1 ulp, entering the quantile with a factor about 1); SciPy's ndtri has its own few
    # ulps. 64 u64 covers the sum with margin; an error in a coefficient or a branch is orders of magnitude larger.
    np.testing.assert_array_less(np.abs(out.numpy() - expected), 64 * U64 * np.abs(expected))


@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"bits": 1}, ValueError, r"bits must be an int in \[2, 8\]"),
    ({"bits": 9}, ValueError, r"bits must be an int in \[2, 8\]"),
    ({"bits": 4.0}, ValueError, r"bits must be an int"),
    ({"bits": True}, ValueError, r"bits must be an int"),
    ({"offset": 0.5}, ValueError, r"offset must be a float in \(0.5, 1\)"),
    ({"offset": 1.0}, ValueError, r"offset must be a float in \(0.5, 1\)"),
    ({"offset": float("nan")}, ValueError, r"offset must be a float"),
    ({"offset": "0.9"}, ValueError, r"offset must be a float"),
    ({"offset": 0.5 + 2.0**-18}, ValueError, r"offset must lie in \[0.5 \+ 2\*\*-16, 1\)"),
    ({"offset": 1.0 - 2.0**-30}, ValueError, r"offset must lie in"),  # rounds to 1.0 in float32
    ({"use_extra_value": 1}, TypeError, r"use_extra_value must be a bool"),
    ({"device": "meta"}, ValueError, r"device must be cpu under the Triton interpreter"),
])  # fmt: skip
def test_normal_float_codebook_rejects(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        K.normal_float_codebook(**kwargs)


def test_dynamic_map_rejects():
    with pytest.raises(TypeError, match="signed must be a bool"):
        K.dynamic_map(signed=1)
    with pytest.raises(ValueError, match="device must be cpu"):
        K.dynamic_map(device="meta")


_COMPILE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["QLORA_INTERPRET"] = "0"
    import qlora  # noqa: F401  (interpreter off before the kernels are decorated)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from qlora.kernels import codebook

    report = {}
    for spec in codebook.compile_specs():
        if spec.name in sys.argv[1:]:
            src = ASTSource(fn=spec.fn, signature=dict(spec.signature), constexprs=dict(spec.constexprs))
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(spec.options))
            report[spec.name] = compiled.asm["ptx"]
    print(json.dumps(report))
""")


def test_gpu_build_replays_the_float32_steps():
    """Compiled for sm_90 (no GPU needed): every float32 division is IEEE div.rn (Triton's `/` gives div.approx),
    the linspace points are exact float64 sums rounded once to float32 (cvt.rn.f32.f64), and no float32
    multiply-add is left where ptxas could contract it (.rn forms only: compiled with enable_fp_fusion=False)."""
    names = ["normal_float_nf4_asym", "normal_float_nf8_sym"]
    env = {**os.environ, "QLORA_INTERPRET": "0", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, *names], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(report) == names
    for name, ptx in report.items():
        assert "div.rn.f32" in ptx and not re.search(r"div\.(?:approx|full)(?:\.ftz)?\.f32", ptx), name
        assert not re.search(r"\b(?:mul|add|sub|fma)\.f32\b", ptx), name
        assert "cvt.rn.f32.f64" in ptx and not re.search(r"\bfma\.rn\.f32\b", ptx), name
