"""AdamW / 8-bit AdamW kernels against the oracle and torch.optim.AdamW, and the paged optimizers.

Kernels: the 8-bit step is bit-exact with ``qlora.reference.optim.adamw8bit_step``; the 32-bit step is
within float32 rounding bounds of the float64 ``adamw_step`` and of ``torch.optim.AdamW``. Optimizers:
paged == resident bit for bit (host paging runs here on CPU tensors), state_dict round trips, layout and
input validation. Unified-memory paging needs a GPU: those tests are skipped elsewhere, with the reason.
"""

from __future__ import annotations

import copy
import inspect
import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hyp import examples

import qlora
from qlora import optim as qoptim
from qlora.kernels import optim as kopt
from qlora.paging import CHUNK_GRANULE, PAGE_ALIGN, FieldSpec, PagePlan, chunk_bytes
from qlora.reference import optim as ropt
from qlora.reference.codebook import dynamic_map as ref_dynamic_map
from qlora.reference.quantize import dequantize_8bit

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN/Inf cases in the interpreter's NumPy

U32 = 2.0**-24  # float32 unit roundoff
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ON_GPU = torch.cuda.is_available() and not qlora.interpreter_active()
DEV = torch.device("cuda") if ON_GPU else torch.device("cpu")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _np(t: torch.Tensor) -> np.ndarray:
    """float32/float16/uint8 arrays for the oracle; bfloat16 as its exact float32 values."""
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()


def _fresh_8bit(n: int):
    nb = -(-n // 256)
    return (torch.full((n,), 127, dtype=torch.uint8, device=DEV), torch.zeros(nb, device=DEV),
            torch.zeros(n, dtype=torch.uint8, device=DEV), torch.zeros(nb, device=DEV))


def _oracle_8bit(p, g, state, step, lr, betas, eps, wd):
    """The oracle's step on torch tensors; returns the new p (in p's dtype) and the four state arrays."""
    out = ropt.adamw8bit_step(_np(p), _np(g), *[_np(s) for s in state], step, lr, betas, eps, wd)
    p_new = torch.from_numpy(out[0]).to(p.dtype)  # bfloat16: the oracle's float32, rounded to nearest even
    return p_new, out[1:]


def _assert_bits_equal(actual: torch.Tensor, expected, what: str):
    a = actual.detach().cpu()
    e = expected if isinstance(expected, torch.Tensor) else torch.from_numpy(np.asarray(expected))
    assert a.dtype == e.dtype and a.shape == e.shape, (what, a.dtype, e.dtype, a.shape, e.shape)
    nan = a.isnan() & e.isnan() if a.is_floating_point() else torch.zeros_like(a, dtype=torch.bool)
    diff = ~(nan | (a == e))
    assert not diff.any(), f"{what}: {int(diff.sum())} of {a.numel()} differ, first at {diff.nonzero()[:3].tolist()}"


# --- kernels: 8-bit step, bit-exact with the oracle ------------------------------------------------------

hparams = st.fixed_dictionaries({
    "lr": st.floats(1e-5, 1e-1),
    "betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.0, 0.9999)),
    "eps": st.sampled_from([0.0, 1e-8, 1e-6, 1e-3]),
    "wd": st.floats(0.0, 0.1),
})


@examples(12)
@given(n=st.integers(1, 1500), dtype=st.sampled_from(DTYPES), hp=hparams, t0=st.integers(1, 2000),
       seed=st.integers(0, 2**31 - 1), random_state=st.booleans())
def test_adamw8bit_step_is_bit_exact_with_oracle(n, dtype, hp, t0, seed, random_state):
    g = _gen(seed)
    p = torch.randn(n, generator=g).to(dtype).to(DEV)
    state = list(_fresh_8bit(n))
    if random_state:  # any codes and scales, not only those a run reaches: covers the whole map
        state[0].copy_(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8))
        state[2].copy_(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8))
        state[1].copy_(torch.rand(state[1].shape, generator=g) * 0.1)
        state[3].copy_(torch.rand(state[3].shape, generator=g) * 1e-3)
    for t in range(t0, t0 + 2):
        grad = (torch.randn(n, generator=g) * 0.01).to(dtype).to(DEV)
        p_exp, s_exp = _oracle_8bit(p, grad, state, t, hp["lr"], hp["betas"], hp["eps"], hp["wd"])
        kopt.adamw8bit_step_(p, grad, *state, step=t, lr=hp["lr"], beta1=hp["betas"][0], beta2=hp["betas"][1],
                             eps=hp["eps"], weight_decay=hp["wd"])
        _assert_bits_equal(p, p_exp, f"param step {t}")
        for name, s, e in zip(("m_codes", "m_absmax", "v_codes", "v_absmax"), state, s_exp):
            _assert_bits_equal(s, e, f"{name} step {t}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw8bit_step_edge_blocks_match_oracle(dtype):
    """Zero blocks, subnormal scales (1/absmax not finite), and NaN/Inf gradients, which poison their block."""
    n = 256 * 5 + 17
    g = _gen(7)
    p = torch.randn(n, generator=g).to(dtype).to(DEV)
    state = list(_fresh_8bit(n))
    state[1][1] = 1e-39  # subnormal absmax: the block decodes to tiny values and 1/absmax overflows
    state[0][256:512] = 200
    state[3][1] = 1e-39
    state[2][256:512] = 200
    grad = (torch.randn(n, generator=g) * 0.01).to(dtype).to(DEV)
    grad[:256] = 0  # block 0: all-zero moments, absmax 0
    grad[256:512] = 0
    grad[600] = float("nan")  # block 2
    grad[800] = float("inf")  # block 3
    grad[n - 1] = -float("inf")  # last, partial block
    for t in (1, 2):
        p_exp, s_exp = _oracle_8bit(p, grad, state, t, 1e-3, (0.9, 0.999), 1e-8, 1e-2)
        kopt.adamw8bit_step_(p, grad, *state, step=t, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
        _assert_bits_equal(p, p_exp, "param")
        for name, s, e in zip(("m_codes", "m_absmax", "v_codes", "v_absmax"), state, s_exp):
            _assert_bits_equal(s, e, name)
        grad = torch.where(grad.isfinite(), grad, torch.zeros((), dtype=dtype))
    assert state[1][0] == 0 and bool((state[0][:256] == 127).all()) and bool((state[2][:256] == 0).all())
    assert state[1][2].isnan() and state[1][3].isnan() and state[1][-1].isnan()
    # Poisoned blocks turn their parameters NaN from the next step on; the others stay finite.
    assert p[512:768].isnan().all() and p[:512].isfinite().all() and p[1024:n - 17].isfinite().all()


# --- kernels: 32-bit step -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_tensor_launches_equal_per_tensor_steps_bit_for_bit(dtype):
    """One launch over many tensors (the interpreter's layout: programs of units from any tensor, padded with
    masked units past tensor 0's end; a GPU's: one tensor per program) gives each tensor what its own
    single-tensor kernel gives (itself bit-exact with the oracle), over three steps so that the 8-bit states
    are requantized from non-trivial values: sizes with partial last blocks, a single element, more units than
    one program holds, and an empty tensor (skipped)."""
    g = _gen(21)
    numels = (1, 255, 256, 257, 3000, 12288, 70000, 0, 513)
    params = [(torch.randn(n, generator=g) * 0.1).to(dtype).to(DEV) for n in numels]
    grads = [[(torch.randn(n, generator=g) * 0.01).to(dtype).to(DEV) for n in numels] for _ in range(3)]
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
    multi8 = [p.clone() for p in params]
    one8 = [p.clone() for p in params]
    state_multi = [list(_fresh_8bit(n)) for n in numels]
    state_one = [list(_fresh_8bit(n)) for n in numels]
    multi32 = [p.clone() for p in params]
    one32 = [p.clone() for p in params]
    mv_multi = [[torch.zeros(n, device=DEV), torch.zeros(n, device=DEV)] for n in numels]
    mv_one = [[torch.zeros(n, device=DEV), torch.zeros(n, device=DEV)] for n in numels]
    for step in range(1, 4):
        kopt.adamw8bit_multi_step_(multi8, grads[step - 1], *[[s[k] for s in state_multi] for k in range(4)],
                                   step=step, **kw)
        kopt.adamw_multi_step_(multi32, grads[step - 1], [s[0] for s in mv_multi], [s[1] for s in mv_multi],
                               step=step, **kw)
        for i in range(len(numels)):
            kopt.adamw8bit_step_(one8[i], grads[step - 1][i], *state_one[i], step=step, **kw)
            kopt.adamw_step_(one32[i], grads[step - 1][i], *mv_one[i], step=step, **kw)
    for i, n in enumerate(numels):
        _assert_bits_equal(multi8[i], one8[i], f"8-bit param {i} ({n} elements)")
        _assert_bits_equal(multi32[i], one32[i], f"32-bit param {i} ({n} elements)")
        for k in range(4):
            _assert_bits_equal(state_multi[i][k], state_one[i][k], f"8-bit state {k} of param {i}")
        for k in range(2):
            _assert_bits_equal(mv_multi[i][k], mv_one[i][k], f"32-bit state {k} of param {i}")
    assert not torch.equal(multi8[6], params[6]) and not torch.equal(multi32[0], params[0])


def test_interpreter_multi_tensor_layout_packs_units_from_many_tensors():
    """Under the interpreter the multi-tensor work table lists (tensor, unit) for every unit, in order, and pads
    the last program with units past tensor 0's end (which the kernels mask off entirely)."""
    if not qlora.interpreter_active():
        pytest.skip("the GPU layout is one tensor per program")
    work, rows = kopt._unit_rows_table((300, 5, 1024), 256, torch.device("cpu"))
    units = [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (2, 2), (2, 3)]
    assert rows == 8  # the next power of two of the 7 units, within the interpreter's slab
    assert work.view(-1, 2).tolist() == [list(u) for u in units] + [[0, 2]]
    big, rows = kopt._unit_rows_table((1 << 20,), 256, torch.device("cpu"))
    assert rows == kopt._INTERP_MAX_BLOCK // 256 and big.numel() == 2 * 4096


@examples(6)
@given(n=st.integers(1, 3000), lr=st.floats(1e-5, 1e-3), wd=st.floats(0.0, 0.1), seed=st.integers(0, 2**31 - 1))
def test_adamw_step_float32_tracks_float64_oracle_and_torch_for_20_steps(n, lr, wd, seed):
    """fp32 params, 20 steps: atol 1e-6, rtol 1e-5 against the float64 oracle and against torch.

    Bound: a step rounds p twice (decay, subtraction: 2u|p|) and the update ~10 times (<= 16u|upd|), and
    carries the moments' own roundings; |upd| = step_size*|m|/denom <= lr*K with K = max |m_hat|/sqrt(v_hat)
    (asserted <= 4 below on the float64 trajectory). Over 20 steps: 40u|p| + 20*16u*lr*K <= 2.4e-6|p| +
    7.7e-8: inside rtol 1e-5 and atol 1e-6 for the oracle; torch's own float32 rounding (same bound) adds as
    much, still inside.
    """
    g = _gen(seed)
    betas, eps = (0.9, 0.999), 1e-8
    p = torch.randn(n, generator=g, device="cpu").to(DEV)
    ref = torch.nn.Parameter(p.clone().cpu())
    torch_opt = torch.optim.AdamW([ref], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    m, v = torch.zeros(n, device=DEV), torch.zeros(n, device=DEV)
    p64, m64, v64 = p.cpu().double().numpy(), np.zeros(n), np.zeros(n)
    k_max = 0.0
    m_bound, v_bound = np.zeros(n), np.zeros(n)
    for t in range(1, 21):
        grad = torch.randn(n, generator=g)
        kopt.adamw_step_(p, grad.to(DEV), m, v, step=t, lr=lr, beta1=betas[0], beta2=betas[1], eps=eps,
                         weight_decay=wd)
        g64 = grad.double().numpy()
        # m = b1*m + c1*g: 3 roundings plus b1, c1 rounded to float32 (<= 4u of |b1 m| + |c1 g|), earlier
        # errors decaying by b1; v likewise with 5 (the extra g*g), all terms non-negative.
        m_bound = betas[0] * m_bound + 4 * U32 * (betas[0] * np.abs(m64) + (1 - betas[0]) * np.abs(g64)) * 1.01
        v_bound = betas[1] * v_bound + 5 * U32 * (betas[1] * v64 + (1 - betas[1]) * g64 * g64) * 1.01
        p64, m64, v64 = ropt.adamw_step(p64, g64, m64, v64, t, lr, betas, eps, wd)
        k_max = max(k_max, float(np.max(np.abs(m64 / (1 - betas[0]**t)) / np.sqrt(v64 / (1 - betas[1]**t)))))
        ref.grad = grad.clone()
        torch_opt.step()
    assert k_max <= 4.0  # the derivation's premise
    torch.testing.assert_close(p.cpu().double(), torch.from_numpy(p64), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(p.cpu(), ref.detach(), atol=1e-6, rtol=1e-5)
    assert (np.abs(m.cpu().double().numpy() - m64) <= m_bound).all()
    assert (np.abs(v.cpu().double().numpy() - v64) <= v_bound).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adamw_step_half_params_round_once_from_float32(dtype):
    """A float16/bfloat16 parameter is updated in float32 and rounded once: the result is the float64 step's
    value rounded to the dtype, or its neighbour where the float32 and float64 values straddle a rounding
    boundary (at most one ulp of the dtype)."""
    n = 2000
    g = _gen(3)
    p = torch.randn(n, generator=g).to(dtype).to(DEV)
    grad = (torch.randn(n, generator=g) * 0.1).to(dtype).to(DEV)
    m = (torch.randn(n, generator=g) * 0.01).to(DEV)
    v = (torch.rand(n, generator=g) * 1e-3).to(DEV)
    p64, _, _ = ropt.adamw_step(_np(p), _np(grad), _np(m), _np(v), 5, 1e-2, (0.9, 0.999), 1e-8, 0.1)
    kopt.adamw_step_(p, grad, m, v, step=5, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    expected = torch.from_numpy(p64).to(dtype)
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(expected.float())  # |x| in [2**(e-1), 2**e): spacing eps * 2**(e-1)
    ulp = torch.maximum(info.eps * torch.pow(2.0, exponent.float() - 1), torch.tensor(info.tiny * info.eps))
    p = p.cpu()
    assert ((p.float() - expected.float()).abs() <= ulp).all()
    assert (p == expected).float().mean() > 0.99  # straddles are rare: a systematic bias would fail here


def test_hyperparameters_are_runtime_arguments():
    """An lr scheduler changes lr and the step count every step: none of them may be a constexpr (a recompile)."""
    for kernel in (kopt._adamw32_kernel, kopt._adamw8bit_kernel, kopt._adamw32_multi_kernel,
                   kopt._adamw8bit_multi_kernel):
        annotations = inspect.get_annotations(kernel.fn)  # the Python function, interpreted or compiled
        constexprs = {name for name, ann in annotations.items() if "constexpr" in str(ann)}
        assert "BLOCK" in constexprs or "QBLOCKS" in constexprs  # the check sees constexprs at all
        assert not constexprs & set(kopt.StepScalars._fields), constexprs
    specs = kopt.compile_specs()
    assert {s.name for s in specs} == {f"adamw{b}{multi}_{t}" for b in ("32", "8bit") for multi in ("", "_multi")
                                       for t in ("fp32", "fp16", "bf16")}
    assert all(s.options["enable_fp_fusion"] is False for s in specs)
    # The static report's per-element figure: the elements one program of the GPU launch steps.
    for s in specs:
        per_program = s.constexprs.get("BLOCK") or s.constexprs["QBLOCK"] * s.constexprs["QBLOCKS"]
        assert s.weight_elements() == per_program == 1024, s.name
        assert not s.launch_inferred, s.name  # every scalar argument as a launch passes it


def test_kernel_launchers_reject_bad_inputs():
    n = 300
    p, grad = torch.zeros(n, device=DEV), torch.zeros(n, device=DEV)
    m, v = torch.zeros(n, device=DEV), torch.zeros(n, device=DEV)
    kw = dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    with pytest.raises(TypeError, match="param must have dtype"):
        kopt.adamw_step_(p.double(), grad, m, v, **kw)
    with pytest.raises(ValueError, match="grad must have the shape"):
        kopt.adamw_step_(p, grad[:-1], m, v, **kw)
    with pytest.raises(TypeError, match="exp_avg must have dtype"):
        kopt.adamw_step_(p, grad, m.half(), v, **kw)
    with pytest.raises(ValueError, match="exp_avg_sq must have 300 elements"):
        kopt.adamw_step_(p, grad, m, v[:10], **kw)
    with pytest.raises(ValueError, match="param must be contiguous"):
        kopt.adamw_step_(torch.zeros(20, 15, device=DEV).t(), torch.zeros(15, 20, device=DEV), m, v, **kw)
    with pytest.raises(ValueError, match="param is on meta"):
        kopt.adamw_step_(p.to("meta"), grad, m, v, **kw)
    with pytest.raises(ValueError, match="step must be an int >= 1"):
        kopt.adamw_step_(p, grad, m, v, **{**kw, "step": 0})
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        kopt.adamw_step_(p, grad, m, v, **{**kw, "lr": -1e-3})
    with pytest.raises(ValueError, match="beta2 must be in"):
        kopt.adamw_step_(p, grad, m, v, **{**kw, "beta2": 1.0})
    with pytest.raises(ValueError, match="step_size overflows"):
        kopt.adamw_step_(p, grad, m, v, **{**kw, "lr": 1e39})
    mq, ma, vq, va = _fresh_8bit(n)
    with pytest.raises(TypeError, match="exp_avg_codes must have dtype"):
        kopt.adamw8bit_step_(p, grad, mq.int(), ma, vq, va, **kw)
    with pytest.raises(ValueError, match=r"exp_avg_sq_absmax must have 2 elements"):
        kopt.adamw8bit_step_(p, grad, mq, ma, vq, va[:1], **kw)


# --- optimizers -----------------------------------------------------------------------------------------------


def _params(shapes, dtype=torch.float32, seed=0):
    g = _gen(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.5).to(dtype).to(DEV)) for s in shapes]


def _drive(opt, params, steps, seed, skip=()):
    """``steps`` steps with seeded gradients; ``skip`` holds (step, index) pairs left without a gradient."""
    g = _gen(seed)
    for t in range(steps):
        opt.zero_grad()
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g).to(p.dtype).to(p.device)
            if (t, i) not in skip:
                p.grad = grad
        opt.step()


def _assert_same_state(a, b, params_a, params_b):
    a.synchronize()  # paged state stays on the device between steps: write it back before reading it
    b.synchronize()
    for pa, pb in zip(params_a, params_b):
        _assert_bits_equal(pa, pb.detach().cpu(), "param")
        sa, sb = a.state[pa], b.state[pb]
        assert sa.keys() == sb.keys()
        for key in sa:
            if key == "step":
                assert sa[key] == sb[key]
            else:
                _assert_bits_equal(sa[key], sb[key].detach().cpu(), key)


def test_adamw8bit_against_adamw_50_steps_bitsandbytes_protocol():
    """50 steps of 8-bit AdamW against torch.optim.AdamW (float32), bitsandbytes' test protocol (from which
    the thresholds come): p ~ 0.1 randn, g ~ 0.01 randn; after each step torch's moments are set to the
    dequantized 8-bit moments and the 8-bit parameter to torch's, so each step's error is measured from a
    common start: mean abs error < 6e-5, mean relative < 6e-4. At every step the 8-bit state must equal the
    oracle's 8-bit step from the same start, bit for bit."""
    shape = (128, 64)
    g = _gen(11)
    p0 = torch.randn(shape, generator=g) * 0.1
    p8 = torch.nn.Parameter(p0.clone().to(DEV))
    p32 = torch.nn.Parameter(p0.clone())
    opt8 = qoptim.AdamW8bit([p8])
    opt32 = torch.optim.AdamW([p32])
    smap, umap = ref_dynamic_map(True), ref_dynamic_map(False)
    for t in range(1, 51):
        grad = torch.randn(shape, generator=g) * 0.01
        st8 = opt8.state[p8]
        before = [st8[k].reshape(-1) for k in ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes",
                                               "exp_avg_sq_absmax")] if st8 else list(_fresh_8bit(p8.numel()))
        p_exp, s_exp = _oracle_8bit(p8.detach().reshape(-1), grad.reshape(-1), before, t, 1e-3, (0.9, 0.999), 1e-8,
                                    1e-2)
        p8.grad, p32.grad = grad.to(DEV), grad.clone()
        opt8.step()
        opt32.step()
        _assert_bits_equal(p8.detach().reshape(-1), p_exp, f"param step {t}")
        for key, e in zip(("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"), s_exp):
            _assert_bits_equal(opt8.state[p8][key].reshape(-1), e, f"{key} step {t}")
        err = (p8.detach().cpu() - p32.detach()).abs()
        assert err.mean() < 6e-5
        assert (err / (p32.detach().abs() + 1e-9)).mean() < 6e-4
        st8 = opt8.state[p8]
        for key, table in (("exp_avg", smap), ("exp_avg_sq", umap)):
            deq = dequantize_8bit(_np(st8[f"{key}_codes"]).reshape(-1), _np(st8[f"{key}_absmax"]), table, shape, 256)
            opt32.state[p32][key].copy_(torch.from_numpy(deq))
        p8.data.copy_(p32.detach())


def test_adamw8bit_free_running_stays_close_to_adamw():
    """Without resynchronizing, 8-bit AdamW drifts from float32 AdamW only by the quantization error of its
    moments: with randn states most entries sit in the map's top decades, whose relative gap is at most
    ~7% (gap 0.9/64 at 0.1*absmax, halved); m/sqrt(v) then errs by a few percent per step, so the mean
    distance to float32 AdamW stays under 10% of the mean distance travelled (about 2% measured). A wrong
    code, scale or map gives an error of the size of the distance itself."""
    shape = (64, 64)
    g = _gen(5)
    p0 = torch.randn(shape, generator=g) * 0.1
    p8, p32 = torch.nn.Parameter(p0.clone().to(DEV)), torch.nn.Parameter(p0.clone())
    opt8, opt32 = qoptim.AdamW8bit([p8], lr=1e-3), torch.optim.AdamW([p32], lr=1e-3)
    for _ in range(50):
        grad = torch.randn(shape, generator=g) * 0.01
        p8.grad, p32.grad = grad.to(DEV), grad.clone()
        opt8.step()
        opt32.step()
    drift = (p8.detach().cpu() - p32.detach()).abs().mean()
    travelled = (p32.detach() - p0).abs().mean()
    assert drift < 0.1 * travelled


def test_paged_adamw_against_torch_adamw_with_groups_scheduler_closure():
    """Two parameter groups with their own hyperparameters, an lr scheduler, a closure, a parameter that
    never gets a gradient and one that skips a step: as torch.optim.AdamW (fp32 bound of the 20-step test)."""
    shapes = [(33, 7), (130,), (5,)]
    ours, theirs = _params(shapes), [p.detach().cpu().clone().requires_grad_() for p in _params(shapes)]
    frozen = torch.nn.Parameter(torch.ones(9, device=DEV))

    def groups(ps, extra):
        return [{"params": [ps[0], *extra]}, {"params": ps[1:], "lr": 3e-3, "weight_decay": 0.0, "betas": (0.8, 0.99)}]

    opt = qoptim.PagedAdamW(groups(ours, [frozen]), lr=1e-3, paging="host", page_size=4096, min_paged_size=100)
    ref = torch.optim.AdamW(groups(theirs, []), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    g = _gen(2)
    for t in range(6):
        grads = [torch.randn(s, generator=g) for s in shapes]

        def closure():
            opt.zero_grad()
            loss = sum((p * gr.to(DEV)).sum() for p, gr in zip(ours, grads))
            assert torch.is_grad_enabled()
            loss.backward()  # d loss / d p = the drawn gradient
            if t == 3:
                ours[2].grad = None  # skipped this step
            return loss

        loss = opt.step(closure)
        assert loss is not None
        for i, (p, gr) in enumerate(zip(theirs, grads)):
            p.grad = None if (t == 3 and i == 2) else gr
        ref.step()
        sched.step()
        ref_sched.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), atol=1e-6, rtol=1e-5)
    assert opt.state[ours[2]]["step"] == 5 and opt.state[ours[0]]["step"] == 6
    assert not opt.state[frozen] and bool((frozen == 1).all())
    report = opt.memory_report()
    assert report["paged_tensors"] == 2 and report["resident_tensors"] == 1  # (5,) is under min_paged_size


def test_nan_and_inf_gradients_follow_torch_adamw():
    """Not rejected, not skipped: with float32 moments NaN/Inf reach exactly the elements torch's reach."""
    ours, theirs = _params([(50,)]), [p.detach().cpu().clone().requires_grad_() for p in _params([(50,)])]
    opt, ref = qoptim.PagedAdamW(ours, paging="none"), torch.optim.AdamW(theirs)
    grad = torch.randn(50, generator=_gen(1))
    grad[3], grad[10], grad[20] = float("nan"), float("inf"), -float("inf")
    for _ in range(2):
        ours[0].grad, theirs[0].grad = grad.to(DEV), grad.clone()
        opt.step()
        ref.step()
    a, b = ours[0].detach().cpu(), theirs[0].detach()
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, equal_nan=True)


# --- paging ---------------------------------------------------------------------------------------------------

_F32 = (FieldSpec("exp_avg", torch.float32), FieldSpec("exp_avg_sq", torch.float32))
_F8 = (FieldSpec("c", torch.uint8), FieldSpec("a", torch.float32, 256), FieldSpec("d", torch.uint8),
       FieldSpec("b", torch.float32, 256))


@examples(60)
@given(page_size=st.integers(4096 // PAGE_ALIGN, 64).map(lambda k: k * PAGE_ALIGN),
       tensors=st.lists(st.tuples(st.integers(1, 20000), st.booleans()), min_size=1, max_size=12))
def test_page_plan_packs_chunks_without_overlap(page_size, tensors):
    """Chunks tile each tensor exactly, start on 256-element boundaries, never cross a page; segments are
    128-byte aligned, disjoint, inside the page; small tensors share pages; pages are used in order."""
    plan = PagePlan(page_size)
    all_chunks = []
    for key, (numel, eight_bit) in enumerate(tensors):
        fields = _F8 if eight_bit else _F32
        chunks = plan.add(key, numel, fields)
        assert chunks[0].start == 0 and chunks[-1].stop == numel
        for a, b in zip(chunks, chunks[1:]):
            assert a.stop == b.start and b.page >= a.page
        for c in chunks:
            assert c.start % CHUNK_GRANULE == 0 and c.stop > c.start
            for f, seg in zip(fields, c.segments):
                assert (seg.lo, seg.hi) == f.entries(c.start, c.stop)
                assert seg.nbytes == (seg.hi - seg.lo) * f.dtype.itemsize
        all_chunks += chunks
    pages_seen = [c.page for c in all_chunks]
    assert pages_seen == sorted(pages_seen) and set(pages_seen) == set(range(len(plan.pages)))
    for page in plan.pages:
        spans = sorted((s.offset, s.offset + s.nbytes) for c in page for s in c.segments)
        assert all(lo % PAGE_ALIGN == 0 for lo, _ in spans) and spans[-1][1] <= page_size
        assert all(hi <= lo2 for (_, hi), (lo2, _) in zip(spans, spans[1:]))
    # Next fit: a chunk opens a new page only when the previous page could not take even one granule of it.
    for prev, chunk in zip(all_chunks, all_chunks[1:]):
        if chunk.page != prev.page:
            used = max(seg.offset + seg.nbytes for c in plan.pages[prev.page] for seg in c.segments)
            fields = _F8 if tensors[chunk.key][1] else _F32
            smallest = min(chunk.start + CHUNK_GRANULE, tensors[chunk.key][0])
            free = page_size - (-(-used // PAGE_ALIGN) * PAGE_ALIGN)
            assert chunk_bytes(fields, chunk.start, smallest) > free


@examples(8)
@given(
    shapes=st.lists(st.integers(1, 2500), min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
    eight_bit=st.booleans(),
    page_kib=st.sampled_from([4, 6, 16, 64]),
    num_pages=st.integers(2, 3),
    seed=st.integers(0, 2**16),
)
def test_paged_step_equals_resident_step_bit_for_bit(shapes, dtype, eight_bit, page_kib, num_pages, seed):
    """Host paging (pages smaller than a tensor, and tensors smaller than a page sharing one) changes no bit."""
    kw = dict(min_8bit_size=256) if eight_bit else {}
    cls = qoptim.PagedAdamW8bit if eight_bit else qoptim.PagedAdamW
    params_a, params_b = _params(shapes, dtype, seed), _params(shapes, dtype, seed)
    resident = cls(params_a, lr=1e-2, paging="none", **kw)
    paged = cls(params_b, lr=1e-2, paging="host", page_size=page_kib * 1024, num_pages=num_pages,
                min_paged_size=0, **kw)
    skip = {(1, 0)}
    _drive(resident, params_a, 3, seed, skip)
    _drive(paged, params_b, 3, seed, skip)
    _assert_same_state(paged, resident, params_b, params_a)
    report = paged.memory_report()
    dev = report["devices"][str(params_b[0].device)]
    assert report["paged_tensors"] == len(shapes) and report["resident_tensors"] == 0
    assert dev["backend"] == "host"
    assert dev["device_bytes_allocated"] <= report["device_budget_bytes"] == page_kib * 1024 * num_pages
    # Pages stay on the device between steps and leave it only under pressure (LRU). The last step steps every
    # tensor: when all pages fit it moves nothing; when there are at least twice as many pages as the budget,
    # every page was evicted before its turn came again, so all the paged state went up and came back down.
    moved = dev["last_step"]
    if dev["plan_pages"] <= num_pages:
        assert moved["bytes_to_device"] == moved["bytes_to_host"] == 0
    elif dev["plan_pages"] >= 2 * num_pages:
        assert moved["bytes_to_device"] == moved["bytes_to_host"] == report["paged_state_bytes"]
    else:
        assert 0 < moved["bytes_to_device"] <= report["paged_state_bytes"]


@pytest.mark.parametrize("eight_bit", [False, True])
def test_paged_step_with_tensors_spanning_and_sharing_pages(eight_bit):
    """The two layouts the issue names, made certain: a tensor larger than a page (split over several, the last
    one partial) and several tensors smaller than a page sharing one; two device pages cycling over many."""
    shapes = [(5000,), (10,), (300,), (7,), (2000,)]
    kw = dict(min_8bit_size=256) if eight_bit else {}
    cls = qoptim.PagedAdamW8bit if eight_bit else qoptim.PagedAdamW
    params_a, params_b = _params(shapes, seed=3), _params(shapes, seed=3)
    resident = cls(params_a, paging="none", **kw)
    paged = cls(params_b, paging="host", page_size=4096, num_pages=2, min_paged_size=0, **kw)
    _drive(resident, params_a, 2, 4)
    _drive(paged, params_b, 2, 4)
    _assert_same_state(paged, resident, params_b, params_a)
    pages = paged._pagers[params_b[0].device].plan.pages
    keys_per_page = [{c.key for c in page} for page in pages]
    pages_per_key = {k: sum(k in keys for keys in keys_per_page) for k in set().union(*keys_per_page)}
    assert pages_per_key[id(params_b[0])] >= 3  # 5000 elements over 4 KiB pages
    assert any(len(keys) >= 2 for keys in keys_per_page)  # small tensors share a page
    assert len(pages) > 2 * paged.memory_report()["num_pages"]  # buffers are reused across the walk


def test_paging_auto_on_cpu_uses_host_and_small_tensors_stay_resident():
    params = _params([(300, 400), (1000,)])
    opt = qoptim.PagedAdamW8bit(params)  # defaults: paging="auto", min_paged_size=1e5
    _drive(opt, params, 1, 0)
    report = opt.memory_report()
    assert report["paged_tensors"] == 1 and report["resident_tensors"] == 1
    assert report["devices"][str(params[0].device)]["backend"] in (("unified", "host") if ON_GPU else ("host",))
    # 8-bit state of 120000 elements: codes (1 B each) and two absmax per 256 elements, as stored.
    assert report["paged_state_bytes"] == 2 * 120000 + 2 * 4 * math.ceil(120000 / 256)
    assert report["resident_state_bytes"] == 2 * 4 * 1000  # under min_8bit_size: float32 moments


# --- state dicts -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda ps: qoptim.AdamW8bit(ps, min_8bit_size=512),
    lambda ps: qoptim.PagedAdamW(ps, paging="host", page_size=4096, min_paged_size=0),
    lambda ps: qoptim.PagedAdamW8bit(ps, paging="host", page_size=4096, min_paged_size=0, min_8bit_size=512),
], ids=["AdamW8bit", "PagedAdamW", "PagedAdamW8bit"])
def test_state_dict_round_trip_continues_bit_identically(make):
    shapes = [(40, 30), (100,)]
    params = _params(shapes, torch.bfloat16)
    opt = make(params)
    _drive(opt, params, 2, 1)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    if isinstance(opt, qoptim.AdamW8bit):
        assert saved["state"][0]["exp_avg_codes"].dtype == torch.uint8  # stored quantized
        assert saved["state"][1]["exp_avg"].dtype == torch.float32  # under min_8bit_size
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = make(clones)
    fresh.load_state_dict(saved)
    _assert_same_state(fresh, opt, clones, params)
    _drive(opt, params, 2, 2)
    _drive(fresh, clones, 2, 2)
    _assert_same_state(fresh, opt, clones, params)


def test_state_dict_moves_between_paged_and_resident_and_from_torch():
    params = _params([(600,)])
    paged = qoptim.PagedAdamW8bit(params, paging="host", page_size=4096, min_paged_size=0, min_8bit_size=256)
    _drive(paged, params, 2, 0)
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resident = qoptim.AdamW8bit(clones, min_8bit_size=256)
    resident.load_state_dict(copy.deepcopy(paged.state_dict()))
    _drive(paged, params, 1, 1)
    _drive(resident, clones, 1, 1)
    _assert_same_state(resident, paged, clones, params)
    # torch.optim.AdamW's state (tensor step, float32 moments) loads into the 32-bit optimizer.
    theirs = [torch.nn.Parameter(torch.randn(50, generator=_gen(4)))]
    ref = torch.optim.AdamW(theirs)
    _drive(ref, theirs, 2, 3)
    ours = [torch.nn.Parameter(theirs[0].detach().clone().to(DEV))]
    opt = qoptim.PagedAdamW(ours, paging="none")
    opt.load_state_dict(ref.state_dict())
    assert opt.state[ours[0]]["step"] == 2
    _drive(ref, theirs, 1, 5)
    _drive(opt, ours, 1, 5)
    torch.testing.assert_close(ours[0].detach().cpu(), theirs[0].detach(), atol=1e-6, rtol=1e-5)


def test_load_state_dict_refuses_a_different_layout():
    params = _params([(600,), (20,)])
    opt = qoptim.AdamW8bit(params, min_8bit_size=256)
    _drive(opt, params, 1, 0)
    saved = opt.state_dict()
    with pytest.raises(ValueError, match=r"different parameter layout: group 0 holds 2 parameter\(s\), this"):
        qoptim.AdamW8bit(_params([(600,)]), min_8bit_size=256).load_state_dict(saved)
    with pytest.raises(ValueError, match=r"different parameter layout: 1 parameter group\(s\), this optimizer has 2"):
        qoptim.AdamW8bit([{"params": _params([(600,)])}, {"params": _params([(20,)])}]).load_state_dict(saved)
    with pytest.raises(ValueError, match=r"exp_avg_codes has shape \(600,\), expected \(20, 30\)"):
        qoptim.AdamW8bit(_params([(20, 30), (20,)]), min_8bit_size=256).load_state_dict(saved)
    with pytest.raises(ValueError, match="holds 8-bit state .* keeps 32-bit"):
        qoptim.PagedAdamW(_params([(600,), (20,)]), paging="none").load_state_dict(saved)
    with pytest.raises(ValueError, match="holds 8-bit state .* keeps 32-bit"):
        qoptim.AdamW8bit(_params([(600,), (20,)])).load_state_dict(saved)  # default min_8bit_size 4096
    bad = copy.deepcopy(saved)
    bad["state"][0]["exp_avg_absmax"] = bad["state"][0]["exp_avg_absmax"].double()
    target = qoptim.AdamW8bit(_params([(600,), (20,)]), min_8bit_size=256)
    with pytest.raises(TypeError, match="exp_avg_absmax must have dtype torch.float32"):
        target.load_state_dict(bad)
    assert not target.state  # refused before anything changed
    with pytest.raises(TypeError, match="state_dict must be a dict with 'state' and 'param_groups'"):
        target.load_state_dict({"state": {}})


# --- bad inputs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [qoptim.AdamW8bit, qoptim.PagedAdamW, qoptim.PagedAdamW8bit])
def test_optimizers_reject_bad_hyperparameters_and_params(cls):
    p = _params([(10,)])
    with pytest.raises(ValueError, match="lr must be >= 0"):
        cls(p, lr=-1e-3)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        cls(p, eps=-1e-8)
    with pytest.raises(ValueError, match=r"betas\[0\] must be in \[0, 1\)"):
        cls(p, betas=(1.0, 0.999))
    with pytest.raises(ValueError, match=r"betas\[1\] must be in \[0, 1\)"):
        cls(p, betas=(0.9, -0.1))
    with pytest.raises(TypeError, match="betas must be a pair"):
        cls(p, betas=0.9)
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        cls(p, weight_decay=-0.1)
    with pytest.raises(ValueError, match="lr must be finite"):
        cls(p, lr=float("nan"))
    cls([torch.zeros(4, dtype=torch.int64)])  # frozen integer tensors are accepted and never stepped
    with pytest.raises(TypeError, match="parameter 1 of group 0 has dtype float64"):
        cls([torch.zeros(4), torch.zeros(4, dtype=torch.float64)])
    with pytest.raises(ValueError, match=r"lr \(parameter group 1\) must be >= 0"):
        cls([{"params": p}, {"params": _params([(3,)]), "lr": -1.0}])
    if cls is not qoptim.AdamW8bit:
        with pytest.raises(ValueError, match="paging must be one of"):
            cls(p, paging="disk")
        with pytest.raises(ValueError, match="page_size must be an int >= 4096"):
            cls(p, page_size=1024)
        with pytest.raises(ValueError, match="page_size must be a multiple of 128"):
            cls(p, page_size=5000)
        with pytest.raises(ValueError, match="num_pages must be an int >= 2"):
            cls(p, num_pages=1)


def test_step_rejects_sparse_gradients_and_bad_group_values():
    emb = torch.nn.Embedding(10, 4, sparse=True).to(DEV)
    emb(torch.tensor([1, 2], device=DEV)).sum().backward()
    opt = qoptim.PagedAdamW(emb.parameters(), paging="none")
    with pytest.raises(TypeError, match="does not support sparse gradients"):
        opt.step()
    p = _params([(10,)])
    opt = qoptim.AdamW8bit(p)
    p[0].grad = torch.ones_like(p[0])
    opt.param_groups[0]["lr"] = -1.0  # e.g. a broken scheduler
    with pytest.raises(ValueError, match=r"lr \(parameter group 0\) must be >= 0"):
        opt.step()
    assert not opt.state[p[0]]  # nothing stepped


def test_unified_paging_needs_cuda_parameters():
    if ON_GPU:
        pytest.skip("CPU-only check: here the parameters live on the GPU")
    with pytest.raises(ValueError, match="paging='unified' needs CUDA parameters; parameter 0 of group 0 is on cpu"):
        qoptim.PagedAdamW(_params([(10,)]), paging="unified")


# --- GPU only: unified memory and pinned host paging on a device -------------------------------------------

gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device with the kernels compiled (QLORA_INTERPRET=0)")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("paging", ["unified", "host"])
@pytest.mark.parametrize("cls", [qoptim.PagedAdamW, qoptim.PagedAdamW8bit])
def test_gpu_paged_equals_resident(paging, cls):
    from qlora.cuda_runtime import managed_supported

    if paging == "unified" and not managed_supported(DEV):
        pytest.skip("this GPU has no concurrent managed access")
    shapes = [(1024, 300), (5000,), (70_000,), (3,)]
    params_a, params_b = _params(shapes, torch.bfloat16), _params(shapes, torch.bfloat16)
    resident = cls(params_a, paging="none")
    paged = cls(params_b, paging=paging, page_size=64 * 1024, num_pages=2, min_paged_size=4096)
    _drive(resident, params_a, 3, 0, {(1, 1)})
    _drive(paged, params_b, 3, 0, {(1, 1)})
    paged.synchronize()
    _assert_same_state(paged, resident, params_b, params_a)
    report = paged.memory_report()
    assert report["devices"][str(params_b[0].device)]["backend"] == paging
    assert report["paged_tensors"] == 3 and report["device_budget_bytes"] == 128 * 1024


@pytest.mark.gpu
@gpu
def test_gpu_auto_paging_picks_unified_where_supported():
    from qlora.cuda_runtime import managed_supported

    opt = qoptim.PagedAdamW(_params([(200_000,)]))
    _drive(opt, opt.param_groups[0]["params"], 1, 0)
    backend = opt.memory_report()["devices"][str(opt.param_groups[0]["params"][0].device)]["backend"]
    assert backend == ("unified" if managed_supported(DEV) else "host")
