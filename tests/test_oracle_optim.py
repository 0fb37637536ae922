"""The optimizer oracles (SPEC section 7): AdamW against torch.optim.AdamW, the 8-bit step's float32
arithmetic replayed independently in torch, its accuracy against the 32-bit oracle, non-finite gradients,
and bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hyp import examples
from qlora.reference.codebook import dynamic_map
from qlora.reference.optim import adamw8bit_step, adamw_step
from qlora.reference.quantize import quantize_8bit

SIGNED, UNSIGNED = dynamic_map(signed=True), dynamic_map(signed=False)
EPS32 = 2.0 ** -23  # float32 machine epsilon (twice the unit roundoff)


def _fresh_8bit_state(n, blocksize=256):
    """The state before step 1: every code is the code of 0.0 and every absmax is 0."""
    m_codes, m_absmax = quantize_8bit(np.zeros(n, np.float32), SIGNED, blocksize)
    v_codes, v_absmax = quantize_8bit(np.zeros(n, np.float32), UNSIGNED, blocksize)
    return m_codes, m_absmax, v_codes, v_absmax


def _decode(codes, absmax, table, blocksize):
    """Test-side decoding, written from SPEC (map[code] * absmax[block], one float32 multiply)."""
    return table[codes] * np.repeat(absmax, blocksize)[: codes.size]


hyper = dict(
    lr=st.sampled_from([1e-4, 1e-3, 3e-2, 0.5]),
    beta1=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
    beta2=st.sampled_from([0.0, 0.9, 0.999, 0.99999]),
    eps=st.sampled_from([0.0, 1e-8, 1e-3]),
    weight_decay=st.sampled_from([0.0, 1e-2, 0.3]),
)


# --- 32-bit AdamW ----------------------------------------------------------------------------------


@examples(20)
@given(seed=st.integers(0, 2**32 - 1), shape=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
       **hyper)
def test_adamw_matches_torch_over_20_steps(seed, shape, lr, beta1, beta2, eps, weight_decay):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(shape)
    m, v = np.zeros(shape), np.zeros(shape)
    param = torch.nn.Parameter(torch.tensor(p))
    opt = torch.optim.AdamW([param], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
                            foreach=False)
    for step in range(1, 21):
        g = rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 2)
        param.grad = torch.tensor(g)
        opt.step()
        p, m, v = adamw_step(p, g, m, v, step, lr, (beta1, beta2), eps, weight_decay)
    state = opt.state[param]
    # Both sides round in float64; torch updates m by lerp (m + (1-b1)(g-m)) rather than b1 m + (1-b1) g.
    # Each step commits at most ~10 roundings relative to |p|, |update|, |m|, |v|, and errors never feed back
    # into m or v (the gradients are given) and are damped, not amplified, in p (|1 - lr wd| <= 1 here):
    # after 20 steps the difference is below 20 * 10 * 2 * 2^-53 ~ 4.4e-14 of the magnitudes involved.
    # 1e-12, relative to each array's largest entry, leaves a margin of about 20.
    for name, ours, theirs in (("p", p, param.detach().numpy()), ("m", m, state["exp_avg"].numpy()),
                               ("v", v, state["exp_avg_sq"].numpy())):
        assert ours.dtype == np.float64 and ours.shape == shape, name
        scale = np.abs(theirs).max()
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12 * scale, err_msg=name)


def test_adamw_first_step_closed_form_and_inputs_untouched():
    # Step 1 from zero moments: m = (1-b1) g, v = (1-b2) g^2, so m_hat / sqrt(v_hat) = sign(g) exactly in
    # real arithmetic and the update is lr * |g| / (|g| + eps) per element (float64 rounding only).
    g = np.array([[0.5, -2.0], [1e-3, -7.0]], dtype=np.float32)
    p = np.array([[1.0, -1.0], [0.25, 3.0]], dtype=np.float32)
    p0, g0 = p.copy(), g.copy()
    lr, eps, wd = 0.1, 1e-3, 0.01
    new_p, m, v = adamw_step(p, g, np.zeros_like(p), np.zeros_like(p), 1, lr, (0.9, 0.999), eps, wd)
    gd = g.astype(np.float64)
    want = p.astype(np.float64) * (1 - lr * wd) - lr * gd / (np.abs(gd) + eps)
    np.testing.assert_allclose(new_p, want, rtol=1e-14)
    np.testing.assert_allclose(m, 0.1 * gd, rtol=1e-15)
    np.testing.assert_allclose(v, 0.001 * gd * gd, rtol=1e-13)
    np.testing.assert_array_equal(p, p0)
    np.testing.assert_array_equal(g, g0)


# --- 8-bit AdamW: exact float32 arithmetic ------------------------------------------------------------


def _host_scalars(step, lr, beta1, beta2, eps, weight_decay):
    """The docstring's host side, written out here: float64 then one rounding to float32."""
    return dict(decay=np.float32(1 - lr * weight_decay), b1=np.float32(beta1), b2=np.float32(beta2),
                c1=np.float32(1 - beta1), c2=np.float32(1 - beta2), step_size=np.float32(lr / (1 - beta1**step)),
                bc2_sqrt=np.float32(math.sqrt(1 - beta2**step)), eps=np.float32(eps))


def _torch_replay(p, g, m, v, s):
    """The per-element float32 arithmetic of the docstring, as separate torch float32 ops (eager torch on
    CPU rounds every op on its own, never fusing two). torch's CPU float32 sqrt is NOT correctly rounded
    (seen 1 ulp off, e.g. at 1.1004035e-11), so the square root is taken in float64 and rounded once to
    float32, which is the correctly rounded float32 result: 53 >= 2*24 + 2 bits makes that double rounding
    innocuous."""
    c = {k: torch.tensor(val, dtype=torch.float32) for k, val in s.items()}  # 0-dim: no type promotion
    p32 = torch.from_numpy(p.reshape(-1).astype(np.float32))
    g32 = torch.from_numpy(g.reshape(-1).astype(np.float32))
    m, v = torch.from_numpy(m), torch.from_numpy(v)
    p32 = p32 * c["decay"]
    m = torch.add(torch.mul(c["b1"], m), torch.mul(c["c1"], g32))
    v = torch.add(torch.mul(c["b2"], v), torch.mul(c["c2"], torch.mul(g32, g32)))
    denom = torch.add(torch.div(torch.sqrt(v.double()).float(), c["bc2_sqrt"]), c["eps"])
    p32 = torch.sub(p32, torch.mul(c["step_size"], torch.div(m, denom)))
    return p32, m.numpy(), v.numpy()


def _assert_requantized(x, codes, absmax, table, blocksize, what):
    """codes/absmax are the blockwise requantization of the float32 state x: absmax is max|x| exactly, and
    every element decodes to within the local quantization bound of x."""
    n = x.size
    padded = np.zeros(-(-n // blocksize) * blocksize, np.float32)
    padded[:n] = np.abs(x)
    np.testing.assert_array_equal(absmax, padded.reshape(-1, blocksize).max(axis=1), err_msg=f"{what} absmax")
    scale = np.repeat(absmax, blocksize)[:n].astype(np.float64)
    decoded = _decode(codes, absmax, table, blocksize).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(scale > 0, x / scale, 0.0)  # exact ratio; |s| <= 1
    t = table.astype(np.float64)
    i = np.clip(np.searchsorted(t, s, side="right") - 1, 0, 254)
    # The nearest map value is one of the two entries bracketing s, so it is off by at most half their gap;
    # below the smallest entry (s in [-1, -0.99297) for the signed map) the only neighbour is t[0]. The
    # quantizer compares a float32 s (reciprocal and product, two roundings of 2^-24 each) with float32
    # midpoints (one more), so a value within 3 * 2^-24 |s| of a midpoint may take the other neighbour:
    # 2^-22 |s| covers that. The decode product adds half a float32 ulp of the result.
    half_gap = np.where(s < t[0], t[0] - s, (t[i + 1] - t[i]) / 2)
    bound = scale * (half_gap + 2.0**-22 * np.abs(s)) + np.spacing(np.abs(decoded).astype(np.float32)) / 2
    err = np.abs(decoded - x.astype(np.float64))
    worst = int(np.argmax(err - bound)) if n else 0
    assert np.all(err <= bound), f"{what}: element {worst} decodes to {decoded[worst]}, state {x[worst]}"


@examples(40)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 1300), dtype=st.sampled_from([np.float32, np.float16]),
       blocksize=st.sampled_from([64, 256]), steps=st.integers(1, 3), **hyper)
def test_adamw8bit_float32_arithmetic_replayed_in_torch(seed, n, dtype, blocksize, steps, lr, beta1, beta2, eps,
                                                       weight_decay):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(dtype)
    state = _fresh_8bit_state(n, blocksize)
    betas = (beta1, beta2)
    for step in range(1, steps + 1):
        g = (rng.standard_normal(n) * 10.0 ** rng.integers(-4, 1)).astype(dtype)
        m_in = _decode(state[0], state[1], SIGNED, blocksize)
        v_in = _decode(state[2], state[3], UNSIGNED, blocksize)
        p_new, *state = adamw8bit_step(p, g, *state, step, lr, betas, eps, weight_decay, blocksize=blocksize)
        p32, m, v = _torch_replay(p, g, m_in, v_in, _host_scalars(step, lr, beta1, beta2, eps, weight_decay))
        # Bit for bit: the parameter, rounded to its dtype the way torch rounds (to nearest even).
        assert p_new.dtype == dtype and p_new.shape == p.shape
        np.testing.assert_array_equal(p_new, p32.to(torch.float16 if dtype == np.float16 else torch.float32).numpy())
        assert state[0].dtype == state[2].dtype == np.uint8 and state[0].shape == state[2].shape == (n,)
        assert state[1].dtype == state[3].dtype == np.float32 and state[1].shape == (-(-n // blocksize),)
        _assert_requantized(m, state[0], state[1], SIGNED, blocksize, f"m, step {step}")
        _assert_requantized(v, state[2], state[3], UNSIGNED, blocksize, f"v, step {step}")
        p = p_new


def test_adamw8bit_fp16_param_is_the_float32_step_rounded():
    rng = np.random.default_rng(7)
    p16 = rng.standard_normal(777).astype(np.float16)
    g = rng.standard_normal(777).astype(np.float32)
    state = _fresh_8bit_state(777)
    got = adamw8bit_step(p16, g, *state, 1, 1e-2, (0.9, 0.999), 1e-8, 0.1)
    want = adamw8bit_step(p16.astype(np.float32), g, *state, 1, 1e-2, (0.9, 0.999), 1e-8, 0.1)
    assert got[0].dtype == np.float16
    np.testing.assert_array_equal(got[0], want[0].astype(np.float16))  # numpy rounds to nearest even
    for a, b in zip(got[1:], want[1:]):
        np.testing.assert_array_equal(a, b)


def test_adamw8bit_fresh_state_and_zero_gradient():
    m_codes, m_absmax, v_codes, v_absmax = _fresh_8bit_state(300)
    assert (m_codes == 127).all() and (v_codes == 0).all() and not m_absmax.any() and not v_absmax.any()
    assert SIGNED[127] == 0.0 and UNSIGNED[0] == 0.0
    # A zero gradient keeps zero moments; the update is then 0 / eps = 0 and only the decay acts.
    p = np.linspace(-1, 1, 300, dtype=np.float32)
    out = adamw8bit_step(p, np.zeros_like(p), m_codes, m_absmax, v_codes, v_absmax, 1, 0.1, (0.9, 0.99), 1e-8, 0.5)
    np.testing.assert_array_equal(out[0], p * np.float32(1 - 0.1 * 0.5))
    np.testing.assert_array_equal(out[1], m_codes)
    np.testing.assert_array_equal(out[4], v_absmax)


# --- 8-bit AdamW: accuracy against the 32-bit oracle ------------------------------------------------


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_adamw8bit_tracks_32bit_oracle_over_50_steps(weight_decay):
    # bitsandbytes' protocol for its 8-bit optimizer test (test_optimizer8bit): params 0.1 * randn, grads
    # 0.01 * randn, lr 1e-3, betas (0.9, 0.999), eps 1e-8, errors checked after every step, and the two
    # parameter copies re-synchronized every 10 steps because quantized-state errors accumulate (without the
    # re-sync the mean absolute error after 50 steps is about 1.2e-4 for any faithful 8-bit Adam). Relative
    # error is mean|dp| / mean|p|: an elementwise mean of |dp|/|p| is ruled by the few params nearest zero.
    n, blocksize, lr, betas, eps = 8192, 256, 1e-3, (0.9, 0.999), 1e-8
    rng = np.random.default_rng(2024)
    p64 = (rng.standard_normal(n) * 0.1).astype(np.float32).astype(np.float64)
    m64, v64 = np.zeros(n), np.zeros(n)
    p8 = p64.astype(np.float32)
    state = _fresh_8bit_state(n)
    for step in range(1, 51):
        g = (rng.standard_normal(n) * 0.01).astype(np.float32)
        m_in = _decode(state[0], state[1], SIGNED, blocksize)
        v_in = _decode(state[2], state[3], UNSIGNED, blocksize)
        p64, m64, v64 = adamw_step(p64, g, m64, v64, step, lr, betas, eps, weight_decay)
        p8, *state = adamw8bit_step(p8, g, *state, step, lr, betas, eps, weight_decay)
        err = np.abs(p8.astype(np.float64) - p64)
        assert err.mean() < 6e-5, f"step {step}: mean abs error {err.mean():.3g}"
        assert err.mean() / np.abs(p64).mean() < 6e-4, f"step {step}: relative {err.mean() / np.abs(p64).mean():.3g}"
        # The stored states are the nearest codes of the float32 states computed from the decoded ones.
        _, m32, v32 = _torch_replay(p8, g, m_in, v_in, _host_scalars(step, lr, *betas, eps, weight_decay))
        _assert_requantized(m32, state[0], state[1], SIGNED, blocksize, f"m, step {step}")
        _assert_requantized(v32, state[2], state[3], UNSIGNED, blocksize, f"v, step {step}")
        if step % 10 == 0:
            p8 = p64.astype(np.float32)
            p64 = p8.astype(np.float64)


# --- non-finite gradients ---------------------------------------------------------------------------


def test_adamw_non_finite_gradient_propagates_elementwise():
    p, g = np.ones(6), np.array([0.1, np.nan, 0.2, np.inf, -0.3, 0.4])
    p1, m1, v1 = adamw_step(p, g, np.zeros(6), np.zeros(6), 1, 1e-3, (0.9, 0.999), 1e-8, 0.0)
    assert np.isnan(p1[[1, 3]]).all() and np.isfinite(p1[[0, 2, 4, 5]]).all()
    assert np.isnan(m1[1]) and np.isinf(m1[3]) and np.isinf(v1[3])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_adamw8bit_non_finite_gradient_poisons_its_block(bad):
    n = 600  # blocks [0, 256), [256, 512), [512, 600)
    rng = np.random.default_rng(3)
    p = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    g[300] = bad
    p1, mc, ma, vc, va = adamw8bit_step(p, g, *_fresh_8bit_state(n), 1, 1e-3, (0.9, 0.999), 1e-8, 0.0)
    # Step 1: the parameter goes NaN only where the gradient was bad (inf/inf or NaN arithmetic) ...
    assert np.isnan(p1[300]) and np.isfinite(np.delete(p1, 300)).all()
    # ... and the moment blocks holding the bad value are stored as codes of 0.0 with absmax NaN.
    assert np.isnan(ma[1]) and np.isnan(va[1]) and np.isfinite(ma[[0, 2]]).all() and np.isfinite(va[[0, 2]]).all()
    assert (mc[256:512] == 127).all() and (vc[256:512] == 0).all()
    # Step 2, finite gradient: the poisoned block decodes to NaN, so its whole parameter block goes NaN.
    p2, mc, ma, vc, va = adamw8bit_step(p1, rng.standard_normal(n).astype(np.float32), mc, ma, vc, va, 2, 1e-3,
                                        (0.9, 0.999), 1e-8, 0.0)
    assert np.isnan(p2[256:512]).all() and np.isfinite(p2[:256]).all() and np.isfinite(p2[512:]).all()
    assert np.isnan(ma[1]) and np.isnan(va[1])


# --- bad inputs --------------------------------------------------------------------------------------


def _adamw_args():
    z = np.zeros((2, 3))
    return dict(p=z + 1, g=z + 0.5, m=z, v=z, step=1, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


HYPER_BAD = [
    ("step", 0, ValueError, "step must be >= 1"),
    ("step", 1.0, TypeError, "step must be an integer"),
    ("step", True, TypeError, "step must be an integer"),
    ("lr", -1e-3, ValueError, "lr must be >= 0"),
    ("lr", float("nan"), ValueError, "lr must be finite"),
    ("lr", "0.1", TypeError, "lr must be a real number"),
    ("betas", (0.9,), TypeError, "betas must be a pair"),
    ("betas", 0.9, TypeError, "betas must be a pair"),
    ("betas", (1.0, 0.999), ValueError, "betas\\[0\\] must be in \\[0, 1\\)"),
    ("betas", (0.9, -0.1), ValueError, "betas\\[1\\] must be in \\[0, 1\\)"),
    ("betas", (0.9, float("inf")), ValueError, "betas\\[1\\] must be finite"),
    ("eps", -1e-8, ValueError, "eps must be >= 0"),
    ("weight_decay", -0.1, ValueError, "weight_decay must be >= 0"),
    ("weight_decay", float("inf"), ValueError, "weight_decay must be finite"),
]

ADAMW_BAD = HYPER_BAD + [
    ("p", [1.0, 2.0], TypeError, "p must be a numpy.ndarray"),
    ("p", np.ones((2, 3), dtype=np.int32), TypeError, "p must have a float dtype"),
    ("g", np.ones((3, 2)), ValueError, "g must have the shape of p \\(2, 3\\)"),
    ("m", np.ones(6), ValueError, "m must have the shape of p"),
    ("v", np.ones((2, 3), dtype=np.uint8), TypeError, "v must have a float dtype"),
]


@pytest.mark.parametrize("name,value,exc,match", ADAMW_BAD)
def test_adamw_bad_inputs(name, value, exc, match):
    args = _adamw_args()
    args[name] = value
    with pytest.raises(exc, match=match):
        adamw_step(**args)


def _adamw8bit_args():
    n = 300
    m_codes, m_absmax, v_codes, v_absmax = _fresh_8bit_state(n)
    return dict(p=np.ones(n, np.float32), g=np.ones(n, np.float32), m_codes=m_codes, m_absmax=m_absmax,
                v_codes=v_codes, v_absmax=v_absmax, step=1, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                weight_decay=0.0)


ADAMW8BIT_BAD = HYPER_BAD + [
    ("p", np.ones(300), TypeError, "p must have dtype in \\(float32, float16\\)"),
    ("g", np.ones(300, np.int16), TypeError, "g must have dtype in \\(float32, float16\\)"),
    ("g", np.ones((300, 1), np.float32), ValueError, "g must have the shape of p"),
    ("m_codes", np.zeros(300, np.int8), TypeError, "m_codes must have dtype in \\(uint8\\)"),
    ("m_codes", np.zeros(299, np.uint8), ValueError, "m_codes must have shape \\(300,\\)"),
    ("v_codes", np.zeros((300, 1), np.uint8), ValueError, "v_codes must have shape \\(300,\\)"),
    ("m_absmax", np.zeros(2, np.float64), TypeError, "m_absmax must have dtype in \\(float32\\)"),
    ("v_absmax", np.zeros(3, np.float32), ValueError, "v_absmax must have shape \\(2,\\)"),
    ("v_absmax", np.array([1.0, -1.0], np.float32), ValueError, "v_absmax must be finite and non-negative"),
    ("m_absmax", np.array([np.inf, 0.0], np.float32), ValueError, "m_absmax must be finite and non-negative"),
    ("blocksize", 100, ValueError, "blocksize must be one of"),
    ("blocksize", 512, ValueError, "m_absmax must have shape \\(1,\\)"),
    ("lr", 1e39, ValueError, "step_size = .* overflows float32"),
]


@pytest.mark.parametrize("name,value,exc,match", ADAMW8BIT_BAD)
def test_adamw8bit_bad_inputs(name, value, exc, match):
    args = _adamw8bit_args()
    args[name] = value
    with pytest.raises(exc, match=match):
        adamw8bit_step(**args)
