"""The linear-layer oracle (SPEC section 6) against torch.autograd in float64, central finite differences,
and bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hyp import examples
from qlora.reference.linear import qlora_linear_backward, qlora_linear_forward

U64 = 2.0 ** -53  # unit roundoff of float64


def gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u): bound on the relative error of n chained float64 roundings;
    |fl(sum of n products) - exact| <= gamma_n * sum |products| for any summation order (blocked, pairwise,
    fused or not), which is why it covers both numpy's BLAS and torch's kernels."""
    return n * U64 / (1 - n * U64)


def _layer(seed, lead, k_in, n_out, rank, with_bias, dropout_p):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(lead + (k_in,))
    w = rng.standard_normal((n_out, k_in))
    a = rng.standard_normal((rank, k_in))
    b = rng.standard_normal((n_out, rank))
    bias = rng.standard_normal(n_out) if with_bias else None
    mask = None
    if dropout_p is not None:
        mask = (rng.random(x.shape) >= dropout_p) / (1.0 - dropout_p)
    dy = rng.standard_normal(lead + (n_out,))
    return x, w, a, b, bias, mask, dy


def _abs_bounds(x, w, a, b, scaling, bias, mask, dy):
    """Elementwise sums of |terms| of every output: the quantities the gamma_n bounds multiply."""
    k_in, n_out = w.shape[1], w.shape[0]
    xa = np.abs(x).reshape(-1, k_in)
    ma = np.ones_like(xa) if mask is None else np.abs(mask).reshape(-1, k_in)
    xda = xa * ma
    dya = np.abs(dy).reshape(-1, n_out)
    s = abs(scaling)
    y = xa @ np.abs(w).T + s * (xda @ np.abs(a).T) @ np.abs(b).T + (0 if bias is None else np.abs(bias))
    dx = dya @ np.abs(w) + s * (dya @ np.abs(b)) @ np.abs(a) * ma
    da = s * (dya @ np.abs(b)).T @ xda
    db = s * dya.T @ (xda @ np.abs(a).T)
    dbias = dya.sum(axis=0)
    return y, dx, da, db, dbias


def _torch_layer(x, w, a, b, scaling, bias, mask, dy):
    """The same layer as an independent torch graph; autograd supplies the gradients."""
    xt = torch.tensor(x, requires_grad=True)
    at = torch.tensor(a, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True)
    wt = torch.tensor(w)  # frozen base weight
    xd = xt if mask is None else xt * torch.tensor(mask)
    y = xt @ wt.T + scaling * ((xd @ at.T) @ bt.T)
    biast = None
    if bias is not None:
        biast = torch.tensor(bias, requires_grad=True)
        y = y + biast
    y.backward(torch.tensor(dy))
    dbias = None if biast is None else biast.grad.numpy()
    return y.detach().numpy(), xt.grad.numpy(), at.grad.numpy(), bt.grad.numpy(), dbias


def _assert_within(got, want, bound, what):
    assert got.shape == want.shape, what
    err = np.abs(got - want)
    worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.size else ()
    assert np.all(err <= bound), f"{what}: error {err[worst]} > bound {bound[worst]} at {worst}"


leads = st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple)
dims = st.integers(1, 12)
# LoRA scalings (alpha / r), kept out of the float64 underflow range, where the relative gamma_n bounds below
# would need an absolute subnormal term; 0 is kept (the adapter then contributes exact zeros).
scalings = st.one_of(st.just(0.0), st.floats(1e-3, 4.0), st.floats(-4.0, -1e-3))


@examples(25)
@given(seed=st.integers(0, 2**32 - 1), lead=leads, k_in=dims, n_out=dims, rank=st.integers(1, 6),
       scaling=scalings, with_bias=st.booleans(), dropout_p=st.sampled_from([None, 0.1, 0.5]))
def test_matches_torch_autograd(seed, lead, k_in, n_out, rank, scaling, with_bias, dropout_p):
    x, w, a, b, bias, mask, dy = _layer(seed, lead, k_in, n_out, rank, with_bias, dropout_p)
    y = qlora_linear_forward(x, w, a, b, scaling, bias=bias, dropout_mask=mask)
    dx, da, db, dbias = qlora_linear_backward(dy, x, w, a, b, scaling, dropout_mask=mask)
    ty, tdx, tda, tdb, tdbias = _torch_layer(x, w, a, b, scaling, bias, mask, dy)
    assert y.dtype == dx.dtype == da.dtype == db.dtype == dbias.dtype == np.float64
    rows = math.prod(lead)
    y_abs, dx_abs, da_abs, db_abs, dbias_abs = _abs_bounds(x, w, a, b, scaling, bias, mask, dy)
    # Each side is within gamma_depth * (sum of |terms|) of the exact value, so they differ by at most twice
    # that. Depths count the chained roundings on the longest path to each output:
    #   y:  u = (x*m) A^T has 1 + K, u B^T adds r, then *scaling, + base, + bias: K + r + 4;
    #   dx: dy W has N; (dy B) A has N + r, then *scaling, *mask, +: N + r + 4;
    #   dA: (dy B) has N, g^T (x*m) adds M and 1 for the mask, *scaling: N + M + 3;
    #   dB: u has K + 1, dy^T u adds M, *scaling: M + K + 3;   dbias: M additions.
    _assert_within(y, ty, 2 * gamma(k_in + rank + 4) * y_abs.reshape(y.shape), "y")
    _assert_within(dx, tdx, 2 * gamma(n_out + rank + 4) * dx_abs.reshape(dx.shape), "dx")
    _assert_within(da, tda, 2 * gamma(n_out + rows + 3) * da_abs, "d_lora_a")
    _assert_within(db, tdb, 2 * gamma(rows + k_in + 3) * db_abs, "d_lora_b")
    if with_bias:
        _assert_within(dbias, tdbias, 2 * gamma(rows) * dbias_abs, "d_bias")
    else:
        # Without a bias the oracle still returns the row sum of dy; check it against the exact sum.
        _assert_within(dbias, dy.reshape(rows, n_out).sum(axis=0), 2 * gamma(rows) * dbias_abs, "d_bias")


@examples(10)
@given(seed=st.integers(0, 2**32 - 1), lead=st.lists(st.integers(1, 2), min_size=1, max_size=2).map(tuple),
       k_in=st.integers(1, 4), n_out=st.integers(1, 4), rank=st.integers(1, 3), scaling=scalings,
       dropout_p=st.sampled_from([None, 0.5]))
def test_backward_matches_central_differences(seed, lead, k_in, n_out, rank, scaling, dropout_p):
    x, w, a, b, bias, mask, r = _layer(seed, lead, k_in, n_out, rank, True, dropout_p)
    h = 1e-6

    def loss(x_, a_, b_, bias_):
        y = qlora_linear_forward(x_, w, a_, b_, scaling, bias=bias_, dropout_mask=mask)
        return np.sum(r * y) + 0.5 * np.sum(y * y)

    y = qlora_linear_forward(x, w, a, b, scaling, bias=bias, dropout_mask=mask)
    grads = qlora_linear_backward(r + y, x, w, a, b, scaling, dropout_mask=mask)  # dL/dy = r + y
    params = [x, a, b, bias]
    # Error budget of one evaluation of L. y is affine in every single coordinate, so L is quadratic along
    # it and the central difference has no truncation term (h^2/6 * L''' = 0); only cancellation is left.
    # Each y_i is within gamma_{K+r+4} * Yabs_i of exact (Yabs from |params| + h, covering both shifted
    # points); it enters L with weight |r_i + y_i| <= |r_i| + Yabs_i; forming and summing the 2n terms
    # adds gamma_{2n+2} * sum(|r| Yabs + Yabs^2 / 2). Second-order terms (gamma^2) are below 1e-30 here.
    y_abs = _abs_bounds(np.abs(x) + h, w, np.abs(a) + h, np.abs(b) + h, scaling, np.abs(bias) + h, mask, r)[0]
    y_abs = y_abs.reshape(y.shape)
    r_abs = np.abs(r)
    eval_err = (np.sum((r_abs + y_abs) * gamma(k_in + rank + 4) * y_abs)
                + gamma(2 * y.size + 2) * np.sum(r_abs * y_abs + 0.5 * y_abs ** 2))
    for which, (param, grad) in enumerate(zip(params, grads)):
        fd, steps = np.empty_like(param), np.empty_like(param)
        for idx in np.ndindex(param.shape):
            plus, minus = param.copy(), param.copy()
            plus[idx] += h
            minus[idx] -= h
            step = plus[idx] - minus[idx]  # the step actually taken, after rounding param +- h
            args_p, args_m = list(params), list(params)
            args_p[which], args_m[which] = plus, minus
            fd[idx], steps[idx] = (loss(*args_p) - loss(*args_m)) / step, step
        # |fd - exact| <= 2 * eval_err / step, plus the roundings of the difference and the quotient and
        # the backward's own float64 error, together below 4 u |grad|.
        bound = 2 * eval_err / steps + 4 * U64 * np.abs(grad)
        _assert_within(grad, fd, bound, ["dx", "dA", "dB", "dbias"][which])


def test_rank_zero_and_empty_rows():
    rng = np.random.default_rng(0)
    x, w, bias = rng.standard_normal((3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)
    a, b = np.zeros((0, 5)), np.zeros((4, 0))
    # r = 0: no adapter. The LoRA term is an exact 0.0 (an empty sum), so y is bit for bit the same numpy
    # product x @ w.T plus the bias.
    np.testing.assert_array_equal(qlora_linear_forward(x, w, a, b, 2.0, bias=bias), x @ w.T + bias)
    dx, da, db, dbias = qlora_linear_backward(np.ones((3, 4)), x, w, a, b, 2.0)
    assert da.shape == (0, 5) and db.shape == (4, 0)
    np.testing.assert_array_equal(dx, np.ones((3, 4)) @ w)
    np.testing.assert_array_equal(dbias, np.full(4, 3.0))
    # No rows at all: empty outputs of the right shapes, zero weight gradients.
    x0 = np.zeros((2, 0, 5))
    a1, b1 = rng.standard_normal((2, 5)), rng.standard_normal((4, 2))
    assert qlora_linear_forward(x0, w, a1, b1, 1.0).shape == (2, 0, 4)
    dx, da, db, dbias = qlora_linear_backward(np.zeros((2, 0, 4)), x0, w, a1, b1, 1.0)
    assert dx.shape == (2, 0, 5)
    assert not da.any() and not db.any() and not dbias.any()


def test_low_precision_inputs_are_widened_exactly():
    x, w, a, b, bias, mask, dy = _layer(1, (2, 3), 6, 5, 2, True, 0.5)
    args16 = [t.astype(np.float16) for t in (x, w, a, b)]
    args64 = [t.astype(np.float64) for t in args16]
    # float16 -> float64 is exact, so the results are those of the widened inputs, bit for bit.
    np.testing.assert_array_equal(qlora_linear_forward(*args16, 0.5, bias=bias.astype(np.float32)),
                                  qlora_linear_forward(*args64, 0.5, bias=bias.astype(np.float32).astype(np.float64)))
    got = qlora_linear_backward(dy.astype(np.float32), *args16, 0.5, dropout_mask=mask.astype(np.float32))
    want = qlora_linear_backward(dy.astype(np.float32).astype(np.float64), *args64, 0.5, dropout_mask=mask)
    for g, t in zip(got, want):
        np.testing.assert_array_equal(g, t)


def _good():
    x, w, a, b, bias, mask, dy = _layer(2, (3,), 4, 5, 2, True, 0.5)
    return dict(x=x, w=w, lora_a=a, lora_b=b, scaling=1.5, bias=bias, dropout_mask=mask), dy


BAD_FORWARD = [
    ("x", [[1.0, 2.0]], TypeError, "x must be a numpy.ndarray"),
    ("x", np.ones((3, 4), dtype=np.int64), TypeError, "x must have a float dtype"),
    ("x", np.array(1.0), ValueError, "x must have shape \\(..., K\\)"),
    ("x", np.ones((3, 7)), ValueError, "x has 7 features"),
    ("w", np.ones(20), ValueError, "w must have shape \\(N, K\\)"),
    ("w", np.ones((5, 4), dtype=np.complex128), TypeError, "w must have a float dtype"),
    ("lora_a", np.ones((2, 3)), ValueError, "lora_a must have shape \\(r, K=4\\)"),
    ("lora_b", np.ones((5, 3)), ValueError, "lora_b must have shape \\(N=5, r=2\\)"),
    ("lora_b", np.ones((5, 2), dtype=bool), TypeError, "lora_b must have a float dtype"),
    ("bias", np.ones(4), ValueError, "bias must have shape \\(N=5,\\)"),
    ("bias", np.ones(5, dtype=np.int32), TypeError, "bias must have a float dtype"),
    ("dropout_mask", np.ones((3, 5)), ValueError, "dropout_mask must have the shape of x"),
    ("dropout_mask", np.full((3, 4), np.inf), ValueError, "dropout_mask must be finite"),
    ("dropout_mask", np.full((3, 4), -2.0), ValueError, "dropout_mask must be non-negative"),
    ("scaling", float("nan"), ValueError, "scaling must be finite"),
    ("scaling", float("inf"), ValueError, "scaling must be finite"),
    ("scaling", "2", TypeError, "scaling must be a real number"),
    ("scaling", True, TypeError, "scaling must be a real number"),
]


@pytest.mark.parametrize("name,value,exc,match", BAD_FORWARD)
def test_bad_inputs_rejected(name, value, exc, match):
    kwargs, dy = _good()
    kwargs[name] = value
    with pytest.raises(exc, match=match):
        qlora_linear_forward(**kwargs)
    if name != "bias":  # the backward takes no bias
        kwargs.pop("bias")
        with pytest.raises(exc, match=match):
            qlora_linear_backward(dy, **kwargs)


@pytest.mark.parametrize("dy,exc,match", [
    (np.ones((3, 4)), ValueError, "dy must have shape \\(3, 5\\)"),
    (np.ones((1, 3, 5)), ValueError, "dy must have shape \\(3, 5\\)"),
    (np.ones((3, 5), dtype=np.int8), TypeError, "dy must have a float dtype"),
])
def test_bad_dy_rejected(dy, exc, match):
    kwargs, _ = _good()
    kwargs.pop("bias")
    with pytest.raises(exc, match=match):
        qlora_linear_backward(dy, **kwargs)


def test_non_finite_values_propagate():
    kwargs, dy = _good()
    kwargs["x"] = kwargs["x"].copy()
    kwargs["x"][1, 2] = np.nan
    y = qlora_linear_forward(**kwargs)
    # Row 1 of x reaches only row 1 of y; IEEE arithmetic carries the NaN there and nowhere else.
    assert np.isnan(y[1]).all() and np.isfinite(np.delete(y, 1, axis=0)).all()
