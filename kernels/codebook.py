"""Codebooks: NormalFloat tables (SPEC section 1) and the 8-bit dynamic map (SPEC section 4).

``normal_float_codebook`` builds the NFk table in one Triton program. The normal quantile comes from
Wichura's AS241 (PPND16) rational approximation evaluated in float64 (the interpreter has no ``erfinv``),
and every float32 step of the reference recipe is replayed: torch's float32 ``linspace`` (one rounding per
point, as its fused multiply-add gives on x86-64), the rounding of each quantile to float32, the sort, and
the float32 division by the largest value. Bit for bit the oracle's tables (``qlora.reference.codebook``).

``dynamic_map`` is built with torch operations on the CPU (float32 adds, halvings and multiplies, each IEEE
round-to-nearest; the linspace points computed exactly in float64 and rounded once) and then moved to the
requested device: 256 numbers do not need a kernel, and the CPU keeps the arithmetic identical everywhere.

Both builders cache their tables per (arguments, device) and hand out copies, so callers may modify what
they receive without corrupting the cache.
"""

from __future__ import annotations

import functools
import numbers

import torch
import triton
import triton.language as tl

from ._runtime import interpreter_active, kernel_device, lean_under_interpreter
from ._static import KernelSpec

NF4_OFFSET = 0.9677083
# Closer to 0.5 the float32 linspace(offset, 0.5, 129) stops decreasing strictly (its step falls below the 2**-24
# spacing of float32 near 0.5) and quantiles collapse onto zero: a degenerate table, rejected.
_MIN_OFFSET = 0.5 + 2.0**-16
MIN_BITS = 2
MAX_BITS = 8

# Wichura (1988), Algorithm AS241 PPND16, in the order the kernel reads them: for each of the three
# regions, the 8 numerator coefficients (degree 0..7) then the 7 denominator coefficients (degree 1..7;
# the degree-0 coefficient is 1). Relative accuracy about 1e-16.
_AS241_COEFFICIENTS = (
    # |q| <= 0.425, polynomial in r = 0.180625 - q*q
    3.3871328727963666080e0, 1.3314166789178437745e2, 1.9715909503065514427e3, 1.3731693765509461125e4,
    4.5921953931549871457e4, 6.7265770927008700853e4, 3.3430575583588128105e4, 2.5090809287301226727e3,
    4.2313330701600911252e1, 6.8718700749205790830e2, 5.3941960214247511077e3, 2.1213794301586595867e4,
    3.9307895800092710610e4, 2.8729085735721942674e4, 5.2264952788528545610e3,
    # r = sqrt(-log(min(p, 1-p))) <= 5, polynomial in r - 1.6
    1.42343711074968357734e0, 4.63033784615654529590e0, 5.76949722146069140550e0, 3.64784832476320460504e0,
    1.27045825245236838258e0, 2.41780725177450611770e-1, 2.27238449892691845833e-2, 7.74545014278341407640e-4,
    2.05319162663775882187e0, 1.67638483018380384940e0, 6.89767334985100004550e-1, 1.48103976427480074590e-1,
    1.51986665636164571966e-2, 5.47593808499534494600e-4, 1.05075007164441684324e-9,
    # r > 5, polynomial in r - 5
    6.65790464350110377720e0, 5.46378491116411436990e0, 1.78482653991729133580e0, 2.96560571828504891230e-1,
    2.65321895265761230930e-2, 1.24266094738807843860e-3, 2.71155556874348757815e-5, 2.01033439929228813265e-7,
    5.99832206555887937690e-1, 1.36929880922735805310e-1, 1.48753612908506148525e-2, 7.86869131145613259100e-4,
    1.84631831751005468180e-5, 1.42151175831644588870e-7, 2.04426310338993978564e-15,
)


@triton.jit
def _as241_ratio(r, coef_ptr, REGION: tl.constexpr):
    """num(r) / den(r) of one AS241 region, Horner in float64 (coefficients loaded as float64: a Python float
    literal would be rounded to float32 by Triton's scalar typing)."""
    base = REGION * 15  # coefficients per region
    num = tl.load(coef_ptr + base + 7)
    for k in tl.static_range(6, -1, -1):
        num = num * r + tl.load(coef_ptr + base + k)
    den = tl.load(coef_ptr + base + 14)
    for k in tl.static_range(13, 7, -1):
        den = den * r + tl.load(coef_ptr + base + k)
    den = den * r + 1.0
    return num / den


@triton.jit
def _normal_quantile(p, coef_ptr):
    """Standard normal quantile of float64 probabilities p in (0, 1), AS241 PPND16, float64."""
    q = p - 0.5
    central = q * _as241_ratio(0.180625 - q * q, coef_ptr, 0)
    tail_p = tl.where(q < 0.0, p, 1.0 - p)
    # Clamp the log's argument in lanes that take the central branch, so no lane computes log(0).
    tail_r = tl.sqrt(-tl.log(tl.where(tl.abs(q) <= 0.425, 0.25, tail_p)))
    near = _as241_ratio(tail_r - 1.6, coef_ptr, 1)
    far = _as241_ratio(tail_r - 5.0, coef_ptr, 2)
    tail = tl.where(tail_r <= 5.0, near, far)
    tail = tl.where(q < 0.0, -tail, tail)
    return tl.where(tl.abs(q) <= 0.425, central, tail)


@triton.jit
def _linspace_f32(start, end, steps, i):
    """Element i of torch's CPU float32 linspace(start, end, steps), as the oracle replays it: step rounded to
    float32, then start + step*i below steps//2 and end - step*(steps-1-i) above, each ONE float32 rounding
    (x86-64 builds of torch contract these into fused multiply-adds).

    The single rounding is obtained without an fma (Triton 3.6's interpreter evaluates tl.fma as a float32
    multiply and add, two roundings): in float64 both expressions are exact, since step is a float32 of
    magnitude >= 2**-23 (|end - start| >= 2**-16, steps <= 129), step*i with i < 2**8 has at most 32 significant
    bits, and the sum with a float32 in (0.5, 1) is a multiple of 2**-47 below 2: 48 bits. One cast rounds."""
    # div_rn: Triton lowers a float32 `/` to an approximate division on NVIDIA GPUs.
    start = tl.full([], start, tl.float32)
    end = tl.full([], end, tl.float32)
    step = tl.math.div_rn(end - start, tl.full([], steps - 1, tl.float32)).to(tl.float64)
    low = start.to(tl.float64) + step * i.to(tl.float64)
    high = end.to(tl.float64) - step * (steps - 1 - i).to(tl.float64)
    return tl.where(i < steps // 2, low, high).to(tl.float32)


@lean_under_interpreter
@triton.jit
def _normal_float_kernel(out_ptr, coef_ptr, offset, NUM_POSITIVE: tl.constexpr, NUM_NEGATIVE: tl.constexpr,
                         SIZE: tl.constexpr):
    """out (SIZE,) float32, one program: the NUM_NEGATIVE values -ppf(linspace(offset, 0.5, NUM_NEGATIVE+1)[:-1]),
    zeros, and the NUM_POSITIVE values ppf(linspace(offset, 0.5, NUM_POSITIVE+1)[:-1]), sorted ascending, each
    rounded to float32 and divided by the largest in float32.

    The sort is done by placement: the float32 linspace strictly decreases (consecutive points are a whole step
    apart, far more than a rounding), ppf and rounding to float32 are monotone, so the k-th negative value is the
    k-th smallest and the j-th positive one the j-th largest. (tl.sort gives the same table; under the
    interpreter one tl.sort of 256 values took 0.6-0.7 s, against milliseconds for the whole kernel.)
    """
    i = tl.arange(0, SIZE)
    is_negative = i < NUM_NEGATIVE
    is_positive = i >= SIZE - NUM_POSITIVE
    neg_p = _linspace_f32(offset, 0.5, NUM_NEGATIVE + 1, i)
    pos_p = _linspace_f32(offset, 0.5, NUM_POSITIVE + 1, SIZE - 1 - i)
    # Lanes holding a zero evaluate the quantile at 0.75, a harmless in-range probability.
    p = tl.where(is_negative, neg_p, tl.where(is_positive, pos_p, 0.75)).to(tl.float64)
    quantile = _normal_quantile(p, coef_ptr).to(tl.float32)
    value = tl.where(is_positive, quantile, tl.where(is_negative, -quantile, 0.0))
    largest = tl.max(value, axis=0)
    tl.store(out_ptr + i, tl.math.div_rn(value, tl.full(value.shape, 0.0, tl.float32) + largest))


def _normal_float_counts(bits: int, use_extra_value: bool) -> tuple[int, int]:
    half = 2 ** (bits - 1)
    return (half if use_extra_value else half - 1), half - 1


def _check_device(device) -> torch.device:
    resolved = kernel_device() if device is None else torch.device(device)
    if interpreter_active() and resolved.type != "cpu":
        raise ValueError(f"device must be cpu under the Triton interpreter, got {resolved}")
    if not interpreter_active() and resolved.type != "cuda":
        raise ValueError(f"device must be a CUDA device when kernels are compiled for the GPU, got {resolved}")
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def normal_float_codebook(bits: int = 4, offset: float = NF4_OFFSET, use_extra_value: bool = True,
                          device=None) -> torch.Tensor:
    """NormalFloat-k table, float32 ``(2**bits,)``, sorted ascending, largest value 1.0 (SPEC section 1).

    ``use_extra_value=True`` (NF4's asymmetric layout): 2**(bits-1) positive and 2**(bits-1)-1 negative
    quantiles plus one zero. ``use_extra_value=False``: 2**(bits-1)-1 on each side and the zero twice
    (DESIGN.md), at codes 2**(bits-1)-1 and 2**(bits-1). ``offset`` in (0.5, 1) is the largest probability.
    ``device`` defaults to the device the kernels run on.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    if isinstance(offset, bool) or not isinstance(offset, numbers.Real) or not 0.5 < float(offset) < 1.0:
        raise ValueError(f"offset must be a float in (0.5, 1), got {offset!r}")
    if not isinstance(use_extra_value, bool):
        raise TypeError(f"use_extra_value must be a bool, got {type(use_extra_value).__name__}")
    # The kernel sees offset as float32, as torch.linspace(offset, ...) rounds its start to float32; a
    # float64 offset that rounds to 1.0 (or 0.5) would give an infinite (or zero) largest quantile.
    offset32 = float(torch.tensor(float(offset), dtype=torch.float32))
    if not _MIN_OFFSET <= offset32 < 1.0:
        raise ValueError(f"offset must lie in [0.5 + 2**-16, 1) after rounding to float32, got {offset!r}")
    return _normal_float_cached(bits, offset32, use_extra_value, _check_device(device)).clone()


@functools.lru_cache(maxsize=None)
def _normal_float_cached(bits: int, offset32: float, use_extra_value: bool, device: torch.device) -> torch.Tensor:
    num_positive, num_negative = _normal_float_counts(bits, use_extra_value)
    coefficients = torch.tensor(_AS241_COEFFICIENTS, dtype=torch.float64, device=device)
    out = torch.empty(2**bits, dtype=torch.float32, device=device)
    _normal_float_kernel[(1,)](out, coefficients, offset32, NUM_POSITIVE=num_positive, NUM_NEGATIVE=num_negative,
                               SIZE=2**bits, num_warps=4, enable_fp_fusion=False)
    return out


def _linspace_f32_host(start: float, end: float, steps: int) -> torch.Tensor:
    """The float32 linspace of ``_linspace_f32`` for the dynamic map's linspace(0.1, 1, steps <= 129), on the CPU.

    Each point is start + step*i (or end - step*k) rounded once to float32, as a fused multiply-add gives. Here
    float64 evaluates that expression exactly, so one cast to float32 is that single rounding: step is a float32
    in [2**-8, 1), a multiple of 2**-31; step*i with i < 2**8 is a multiple of 2**-31 below 1; 0.1f is a multiple
    of 2**-27 and 1.0 of 1; so every product and sum is a multiple of 2**-31 below 2, which needs 32 bits.
    """
    start32 = torch.tensor(start, dtype=torch.float32)
    end32 = torch.tensor(end, dtype=torch.float32)
    step = ((end32 - start32) / torch.tensor(float(steps - 1), dtype=torch.float32)).double()
    i = torch.arange(steps, dtype=torch.float64)
    low = start32.double() + step * i
    high = end32.double() - step * (steps - 1 - i)
    return torch.where(torch.arange(steps) < steps // 2, low, high).to(torch.float32)


def dynamic_map(signed: bool = True, device=None) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic map (``create_dynamic_map(signed, 7, 8)``), float32 ``(256,)`` sorted
    ascending (SPEC section 4). For i = 0..6 the float32 midpoints of a float32 linspace(0.1, 1, 2**i + 1) (signed)
    or 2**(i+1) + 1 points (unsigned), each times float32(10**(i-6)) in float32, with their negatives when
    signed; then 0 and 1.0. Built with float32 torch operations on the CPU, then moved to ``device`` (default:
    the device the kernels run on)."""
    if not isinstance(signed, bool):
        raise TypeError(f"signed must be a bool, got {type(signed).__name__}")
    return _dynamic_map_cached(signed, _check_device(device)).clone()


@functools.lru_cache(maxsize=None)
def _dynamic_map_cached(signed: bool, device: torch.device) -> torch.Tensor:
    values = []
    for i in range(7):
        boundaries = _linspace_f32_host(0.1, 1.0, (2**i if signed else 2 ** (i + 1)) + 1)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scaled = torch.tensor(10.0 ** (i - 6), dtype=torch.float32) * means
        values.append(scaled)
        if signed:
            values.append(-scaled)
    values.append(torch.tensor([0.0, 1.0], dtype=torch.float32))
    return torch.sort(torch.cat(values)).values.to(device)


def compile_specs() -> list[KernelSpec]:
    """The codebook kernel for every bits/variant it is launched with (num_warps=4, no FMA contraction)."""
    specs = []
    for bits in range(MIN_BITS, MAX_BITS + 1):
        for use_extra_value in (True, False):
            num_positive, num_negative = _normal_float_counts(bits, use_extra_value)
            specs.append(KernelSpec(
                name=f"normal_float_nf{bits}_{'asym' if use_extra_value else 'sym'}",
                fn=_normal_float_kernel,
                signature={"out_ptr": "*fp32", "coef_ptr": "*fp64", "offset": "fp32", "NUM_POSITIVE": "constexpr",
                           "NUM_NEGATIVE": "constexpr", "SIZE": "constexpr"},
                constexprs={"NUM_POSITIVE": num_positive, "NUM_NEGATIVE": num_negative, "SIZE": 2**bits},
                options={"num_warps": 4, "enable_fp_fusion": False},
            ))
    return specs


__all__ = ["normal_float_codebook", "dynamic_map", "compile_specs", "NF4_OFFSET"]
