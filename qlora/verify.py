"""``qlora verify``: the oracle against published facts, then every kernel against the oracle.

Each check returns ``(error, tolerance)``; it passes when ``error <= tolerance``. Exact checks have tolerance 0
and measure the number of differing values or bytes (or the largest difference); the linear layer's check measures
the largest ratio to :func:`qlora.bounds.qlora_linear_bounds`, the derived bound the tests use. The published
facts are those of docs/SPEC.md. The workloads are sized to finish in about a minute under the Triton interpreter.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import reference as ref
from .bounds import oracle_dense_weight, qlora_linear_bounds
from .functional import dropout_mask, qlora_linear
from .kernels import codebook as k_codebook
from .kernels import optim as k_optim
from .kernels import quantize as k_quantize
from .nf4 import quantize_nf4
from .optim import AdamW8bit, PagedAdamW, PagedAdamW8bit

# SPEC section 1: the canonical NF4 table (code 0..15), written here from the spec, not computed.
NF4_TABLE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)


@dataclass(frozen=True)
class Check:
    name: str
    shape: str
    dtype: str
    run: Callable[[], tuple[float, float]]


@dataclass(frozen=True)
class Outcome:
    check: Check
    error: float
    tolerance: float
    seconds: float
    failure: str | None = None

    @property
    def passed(self) -> bool:
        return self.failure is None and self.error <= self.tolerance


def _randn(shape, seed, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _mismatches(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return float("inf")
    return float(np.count_nonzero(a.view(np.uint8) != b.view(np.uint8)) if a.dtype == b.dtype else np.inf)


# --- the oracle against facts nobody here computed -------------------------------------------------------------

def _oracle_nf4_table():
    return _mismatches(ref.codebook.normal_float_codebook(4), NF4_TABLE), 0.0


def _oracle_dynamic_map():
    signed, unsigned = ref.codebook.dynamic_map(True), ref.codebook.dynamic_map(False)
    # SPEC 4: 256 values, min -0.992968738079071, max 1.0; unsigned: 0 and 1.0 at the ends.
    err = abs(float(signed.min()) - (-0.992968738079071)) + abs(float(signed.max()) - 1.0)
    err += abs(float(unsigned.min())) + abs(float(unsigned.max()) - 1.0)
    err += float(signed.size != 256) + float(unsigned.size != 256)
    return err, 0.0


def _oracle_nf4_error():
    x = _randn((1024, 1024), 0).numpy()
    code = ref.codebook.normal_float_codebook(4)
    packed, absmax = ref.quantize.quantize_4bit(x, code, 64)
    err = float(np.abs(ref.quantize.dequantize_4bit(packed, absmax, code, x.shape, 64) - x).mean())
    return abs(err - 0.0728), 5e-4  # SPEC 8: mean absolute round-trip error 0.0728


def _oracle_double_quant_bits():
    x = _randn((1024, 1024), 1).numpy()
    packed, absmax = ref.quantize.quantize_4bit(x, ref.codebook.normal_float_codebook(4), 64)
    qabsmax, absmax2, _ = ref.quantize.double_quantize(absmax, 256)
    scale_bits = 8 * (qabsmax.nbytes + absmax2.nbytes) / x.size
    return abs(scale_bits - 0.127), 5e-4  # SPEC 3: 8/64 + 32/(64*256) = 0.127 bits per parameter


def _oracle_8bit_error():
    x = _randn((1024, 1024), 2).numpy()
    dyn = ref.codebook.dynamic_map(True)
    codes, absmax = ref.quantize.quantize_8bit(x, dyn, 256)
    err = float(np.abs(ref.quantize.dequantize_8bit(codes, absmax, dyn, x.shape, 256) - x).mean())
    return err, 0.011  # SPEC 8, bitsandbytes' own bound for the signed dynamic map


# --- kernels against the oracle ---------------------------------------------------------------------------------

def _kernel_codebooks():
    err = 0.0
    for bits in range(2, 9):
        for extra in (True, False):
            ours = k_codebook.normal_float_codebook(bits, use_extra_value=extra).cpu().numpy()
            err += _mismatches(ours, ref.codebook.normal_float_codebook(bits, use_extra_value=extra))
    for signed in (True, False):
        err += _mismatches(k_codebook.dynamic_map(signed).cpu().numpy(), ref.codebook.dynamic_map(signed))
    return err, 0.0


def _kernel_quantize_4bit(shape, dtype, blocksize):
    def run():
        x = _randn(shape, 3, dtype)
        code = k_codebook.normal_float_codebook(4)
        packed, absmax = k_quantize.quantize_4bit(x, code, blocksize)
        r_packed, r_absmax = ref.quantize.quantize_4bit(x.float().numpy(), code.numpy(), blocksize)
        return _mismatches(packed.numpy(), r_packed) + _mismatches(absmax.numpy(), r_absmax), 0.0
    return run


def _kernel_dequantize_double(shape, blocksize):
    def run():
        x = _randn(shape, 4).numpy()
        code, dyn = ref.codebook.normal_float_codebook(4), ref.codebook.dynamic_map(True)
        packed, absmax = ref.quantize.quantize_4bit(x, code, blocksize)
        qabsmax, absmax2, offset = ref.quantize.double_quantize(absmax, 256)
        expected = ref.quantize.dequantize_4bit(
            packed, ref.quantize.double_dequantize(qabsmax, absmax2, offset, 256), code, shape, blocksize)
        ours = k_quantize.dequantize_4bit(
            torch.from_numpy(packed), torch.from_numpy(qabsmax), torch.from_numpy(code), shape, blocksize,
            torch.float32, absmax2=torch.from_numpy(absmax2), offset=float(offset),
            nested_code=torch.from_numpy(dyn), nested_blocksize=256)
        return _mismatches(ours.numpy(), expected), 0.0
    return run


def _kernel_double_quantize(nblocks):
    def run():
        absmax = np.abs(_randn((nblocks,), 5).numpy()) + np.float32(0.5)
        qabsmax, absmax2, offset = k_quantize.double_quantize(
            torch.from_numpy(absmax), k_codebook.dynamic_map(True), 256)
        r_q, r_a2, r_off = ref.quantize.double_quantize(absmax, 256)
        err = _mismatches(qabsmax.numpy(), r_q) + _mismatches(absmax2.numpy(), r_a2) + float(offset != float(r_off))
        return err, 0.0
    return run


def _kernel_quantize_8bit(shape, signed):
    def run():
        x = _randn(shape, 6).numpy()
        if not signed:
            x = np.abs(x)
        dyn = ref.codebook.dynamic_map(signed)
        codes, absmax = k_quantize.quantize_8bit(torch.from_numpy(x), torch.from_numpy(dyn), 256)
        r_codes, r_absmax = ref.quantize.quantize_8bit(x, dyn, 256)
        return _mismatches(codes.numpy(), r_codes) + _mismatches(absmax.numpy(), r_absmax), 0.0
    return run


def _kernel_linear(lead, k_in, n_out, r, dtype, dropout_p):
    """Forward and every gradient against the oracle: the largest ``|kernel - oracle| / bound`` over all of them,
    with :func:`qlora.bounds.qlora_linear_bounds` (the bound the tests use); <= 1 passes."""
    def run():
        weight = quantize_nf4(_randn((n_out, k_in), 7), blocksize=64)
        w = oracle_dense_weight(weight, dtype)
        x = _randn((*lead, k_in), 8, dtype).requires_grad_(True)
        lora_a = (_randn((r, k_in), 9) / k_in**0.5).to(dtype).requires_grad_(True)
        lora_b = (_randn((n_out, r), 10) * 0.1).to(dtype).requires_grad_(True)
        bias = _randn((n_out,), 11, dtype).requires_grad_(True)
        dy = _randn((*lead, n_out), 12, dtype)
        scaling, seed = 2.0, 1234
        y = qlora_linear(x, weight, lora_a, lora_b, scaling, bias, dropout_p=dropout_p, training=True, seed=seed)
        y.backward(dy)
        mask = dropout_mask(seed, x.shape, dropout_p).double().numpy() if dropout_p > 0 else None
        X, A, B, b, DY = (t.detach().double().numpy() for t in (x, lora_a, lora_b, bias, dy))
        exact = (ref.linear.qlora_linear_forward(X, w, A, B, scaling, b, mask),
                 *ref.linear.qlora_linear_backward(DY, X, w, A, B, scaling, mask))
        bounds = qlora_linear_bounds(X, w, A, B, scaling, b, mask, DY, dtype, *exact)
        got = (y, x.grad, lora_a.grad, lora_b.grad, bias.grad)
        tols = (bounds.y, bounds.dx, bounds.d_lora_a, bounds.d_lora_b, bounds.d_bias)
        ratios = [float((np.abs(g.detach().double().numpy() - e) / t).max()) for g, e, t in zip(got, exact, tols)]
        return max(ratios), 1.0
    return run


def _kernel_adamw_vs_oracle():
    """20 fused 32-bit steps against the float64 oracle and ``torch.optim.AdamW`` (SPEC 7: atol 1e-6, rtol 1e-5)."""
    shape, hp = (300, 77), dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    p0 = _randn(shape, 13)
    grads = [_randn(shape, 100 + t) for t in range(20)]
    ours = torch.nn.Parameter(p0.clone())
    theirs = torch.nn.Parameter(p0.clone())
    opt, torch_opt = PagedAdamW([ours], paging="none", **hp), torch.optim.AdamW([theirs], **hp)
    p, m, v = p0.double().numpy(), np.zeros(shape), np.zeros(shape)
    for t, g in enumerate(grads, start=1):
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
        p, m, v = ref.optim.adamw_step(p, g.double().numpy(), m, v, t, hp["lr"], hp["betas"], hp["eps"],
                                       hp["weight_decay"])
    got = ours.detach().double().numpy()
    err = max(float((np.abs(got - p) / (1e-6 + 1e-5 * np.abs(p))).max()),
              float((np.abs(got - theirs.detach().double().numpy()) / (1e-6 + 1e-5 * np.abs(p))).max()))
    return err, 1.0


def _kernel_adamw8bit_vs_oracle():
    """Ten 8-bit steps of the kernel against the oracle's float32 recipe: parameters and states bit for bit."""
    n, hp = 5000, dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    p = _randn((n,), 14)
    nblocks = -(-n // k_optim.QBLOCK)
    m_codes = torch.full((n,), k_optim.zero_code(True), dtype=torch.uint8)
    v_codes = torch.full((n,), k_optim.zero_code(False), dtype=torch.uint8)
    m_absmax, v_absmax = torch.zeros(nblocks), torch.zeros(nblocks)
    state = (p.numpy().copy(), m_codes.numpy().copy(), m_absmax.numpy().copy(), v_codes.numpy().copy(),
             v_absmax.numpy().copy())
    err = 0.0
    for t in range(1, 11):
        g = _randn((n,), 200 + t)
        k_optim.adamw8bit_step_(p, g, m_codes, m_absmax, v_codes, v_absmax, step=t, lr=hp["lr"],
                                beta1=hp["betas"][0], beta2=hp["betas"][1], eps=hp["eps"],
                                weight_decay=hp["weight_decay"])
        state = ref.optim.adamw8bit_step(state[0], g.numpy(), *state[1:], t, hp["lr"], hp["betas"], hp["eps"],
                                         hp["weight_decay"])
        for ours, want in zip((p, m_codes, m_absmax, v_codes, v_absmax), state):
            err += _mismatches(ours.numpy(), want)
    return err, 0.0


def _paged_equals_resident(cls):
    """Five steps with pages smaller than one tensor and tensors smaller than one page: bit-identical states."""
    def run():
        shapes = [(3000, 7), (50,), (4099,), (700, 3)]
        def make():
            return [torch.nn.Parameter(_randn(s, 20 + i)) for i, s in enumerate(shapes)]
        resident, paged = make(), make()
        base = AdamW8bit if cls is PagedAdamW8bit else PagedAdamW
        kw = {} if base is AdamW8bit else {"paging": "none"}
        opt_r = base(resident, lr=1e-2, **kw)
        opt_p = cls(paged, lr=1e-2, paging="host", page_size=4096, num_pages=2, min_paged_size=1)
        for t in range(5):
            for i, (a, b) in enumerate(zip(resident, paged)):
                a.grad = _randn(a.shape, 300 + 10 * t + i)
                b.grad = a.grad.clone()
            opt_r.step()
            opt_p.step()
        err = sum(_mismatches(a.detach().numpy(), b.detach().numpy()) for a, b in zip(resident, paged))
        sd_r, sd_p = opt_r.state_dict()["state"], opt_p.state_dict()["state"]
        for i in sd_r:
            for key, value in sd_r[i].items():
                if isinstance(value, torch.Tensor):
                    err += _mismatches(value.numpy(), sd_p[i][key].numpy())
        return err, 0.0
    return run


def all_checks() -> list[Check]:
    return [
        Check("oracle NF4 table == SPEC table", "(16,)", "float32", _oracle_nf4_table),
        Check("oracle dynamic maps: count and extremes", "(256,)", "float32", _oracle_dynamic_map),
        Check("oracle NF4 round-trip error == 0.0728", "1024x1024", "float32", _oracle_nf4_error),
        Check("oracle double-quant scale bits == 0.127", "1024x1024", "float32", _oracle_double_quant_bits),
        Check("oracle 8-bit dynamic error < 0.011", "1024x1024", "float32", _oracle_8bit_error),
        Check("kernel NFk codebooks (k=2..8) + dynamic maps", "(2^k,)", "float32", _kernel_codebooks),
        Check("kernel quantize_4bit bytes", "512x384", "bfloat16", _kernel_quantize_4bit((512, 384), torch.bfloat16, 64)),
        Check("kernel quantize_4bit bytes", "1000x77", "float16", _kernel_quantize_4bit((1000, 77), torch.float16, 128)),
        Check("kernel dequantize_4bit (double quant)", "512x384", "float32", _kernel_dequantize_double((512, 384), 64)),
        Check("kernel double_quantize", "(3000,)", "float32", _kernel_double_quantize(3000)),
        Check("kernel quantize_8bit signed", "256x1000", "float32", _kernel_quantize_8bit((256, 1000), True)),
        Check("kernel quantize_8bit unsigned", "256x1000", "float32", _kernel_quantize_8bit((256, 1000), False)),
        Check("kernel qlora_linear fwd+bwd / bound", "4x33x256->192 r8", "bfloat16",
              _kernel_linear((4, 33), 256, 192, 8, torch.bfloat16, 0.1)),
        Check("kernel qlora_linear fwd+bwd / bound", "5x320->96 r16", "float16",
              _kernel_linear((5,), 320, 96, 16, torch.float16, 0.0)),
        Check("kernel qlora_linear fwd+bwd / bound", "70x130->50 r4", "float32",
              _kernel_linear((70,), 130, 50, 4, torch.float32, 0.25)),
        Check("kernel AdamW 20 steps vs oracle, torch", "300x77", "float32", _kernel_adamw_vs_oracle),
        Check("kernel 8-bit AdamW 10 steps == oracle", "(5000,)", "float32", _kernel_adamw8bit_vs_oracle),
        Check("PagedAdamW host == resident", "4 tensors", "float32", _paged_equals_resident(PagedAdamW)),
        Check("PagedAdamW8bit host == resident", "4 tensors", "float32", _paged_equals_resident(PagedAdamW8bit)),
    ]


def run_checks(checks: list[Check] | None = None) -> list[Outcome]:
    outcomes = []
    for check in checks if checks is not None else all_checks():
        start = time.perf_counter()
        try:
            error, tolerance = check.run()
            outcomes.append(Outcome(check, float(error), float(tolerance), time.perf_counter() - start))
        except Exception as err:  # a crashing check is a failed check, reported with its reason
            outcomes.append(Outcome(check, float("nan"), 0.0, time.perf_counter() - start,
                                    failure=f"{type(err).__name__}: {err}"))
    return outcomes


def format_table(outcomes: list[Outcome]) -> str:
    header = ("check", "shape", "dtype", "error", "tolerance", "result", "s")
    rows = [
        (o.check.name, o.check.shape, o.check.dtype, f"{o.error:.3g}", f"{o.tolerance:.3g}",
         "pass" if o.passed else ("FAIL: " + o.failure if o.failure else "FAIL"), f"{o.seconds:.1f}")
        for o in outcomes
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)
