"""Self-tests of the codebook oracle (``qlora.reference.codebook``) against facts nobody on this project wrote:
the canonical NF4 table (SPEC 1, as bitsandbytes ships it), bitsandbytes' signed dynamic map as it is
hard-coded in independent public ports of bitsandbytes, torch's own ``linspace``, and a float64 recomputation."""

from __future__ import annotations

import platform

import numpy as np
import pytest
from scipy.stats import norm

from qlora.reference.codebook import dynamic_map, normal_float_codebook, torch_linspace_float32

# SPEC 1: bitsandbytes' NF4 table, code 0..15, float32.
NF4_CANONICAL = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)  # fmt: skip

# bitsandbytes' create_dynamic_map(signed=True), codes 128..255 (code 127 is 0.0 and codes 0..126 are the
# negatives of codes 128..254), as hard-coded verbatim in several independent public ports of bitsandbytes
# (Rust, Fortran and Python). 42 of these 256 entries differ by one ulp from a linspace whose products and
# sums are rounded separately: they pin down the fused multiply-add that torch's vectorized CPU linspace does.
DYNAMIC_SIGNED_POSITIVE = np.array(
    [
        5.500000384017767e-07, 3.250000190746505e-06, 7.749999895168003e-06, 2.1249998098937795e-05,
        4.374999844003469e-05, 6.625000241911039e-05, 8.874999912222847e-05, 0.00015625001105945557,
        0.0002687500382307917, 0.0003812500217463821, 0.000493750034365803, 0.0006062500760890543,
        0.0007187500596046448, 0.0008312499849125743, 0.0009437500848434865, 0.001281249918974936,
        0.001843750011175871, 0.002406249986961484, 0.002968749962747097, 0.0035312497057020664,
        0.004093749914318323, 0.0046562496572732925, 0.0052187503315508366, 0.005781250074505806,
        0.006343749817460775, 0.006906250026077032, 0.0074687497690320015, 0.008031249977648258,
        0.008593750186264515, 0.009156249463558197, 0.009718749672174454, 0.011406250298023224,
        0.014218750409781933, 0.017031250521540642, 0.019843751564621925, 0.02265625074505806,
        0.025468749925494194, 0.028281250968575478, 0.031093750149011612, 0.033906251192092896,
        0.03671875223517418, 0.039531249552965164, 0.04234374687075615, 0.04515625163912773,
        0.047968748956918716, 0.05078125, 0.053593751043081284, 0.05640624836087227,
        0.05921875312924385, 0.062031250447034836, 0.06484375149011612, 0.0676562562584877,
        0.07046874612569809, 0.07328125089406967, 0.07609374821186066, 0.07890625298023224,
        0.08171875774860382, 0.08453124761581421, 0.08734375238418579, 0.09015624970197678,
        0.09296875447034836, 0.09578125923871994, 0.09859374910593033, 0.10703125596046448,
        0.12109375, 0.13515624403953552, 0.14921875298023224, 0.16328124701976776,
        0.17734375596046448, 0.19140625, 0.20546874403953552, 0.21953125298023224,
        0.23359374701976776, 0.24765624105930328, 0.26171875, 0.2757812738418579,
        0.28984373807907104, 0.30390626192092896, 0.3179687261581421, 0.33203125,
        0.3460937440395355, 0.36015623807907104, 0.37421876192092896, 0.3882812261581421,
        0.40234375, 0.4164062440395355, 0.43046873807907104, 0.44453126192092896,
        0.4585937261581421, 0.47265625, 0.48671871423721313, 0.500781238079071,
        0.5148437023162842, 0.5289062261581421, 0.54296875, 0.5570312738418579,
        0.5710937976837158, 0.585156261920929, 0.5992187261581421, 0.61328125,
        0.6273437738418579, 0.6414062976837158, 0.655468761920929, 0.6695312261581421,
        0.68359375, 0.6976562738418579, 0.7117187976837158, 0.725781261920929,
        0.7398437261581421, 0.75390625, 0.7679687738418579, 0.782031238079071,
        0.796093761920929, 0.8101562261581421, 0.82421875, 0.8382812738418579,
        0.852343738079071, 0.866406261920929, 0.8804687261581421, 0.89453125,
        0.9085937738418579, 0.922656238079071, 0.936718761920929, 0.9507812261581421,
        0.96484375, 0.9789062738418579, 0.992968738079071, 1.0,
    ],
    dtype=np.float32,
)  # fmt: skip

FLOAT32_EPS = 2.0**-23  # one float32 ulp of 1.0 (1.19e-7)
BITS = range(2, 9)


# ------------------------------------------------------------------------------------------------------
# NormalFloat
# ------------------------------------------------------------------------------------------------------


def test_nf4_is_the_canonical_table_bit_for_bit():
    table = normal_float_codebook()
    assert table.dtype == np.float32 and table.shape == (16,)
    np.testing.assert_array_equal(table.view(np.uint32), NF4_CANONICAL.view(np.uint32))
    assert table[7] == 0.0 and table[15] == 1.0 and table[0] == -1.0


@pytest.mark.parametrize("use_extra_value", [True, False], ids=["asymmetric", "symmetric"])
@pytest.mark.parametrize("bits", BITS)
def test_nfk_table_shape_order_and_ends(bits, use_extra_value):
    table = normal_float_codebook(bits, use_extra_value=use_extra_value)
    assert table.dtype == np.float32 and table.shape == (2**bits,)
    assert table.max() == 1.0 and table[-1] == 1.0
    # Both variants hold -ppf(offset)/ppf(offset) as their first entry: exactly -1 in float32.
    assert table[0] == -1.0
    zero_codes = np.flatnonzero(table == 0.0)
    half = 2 ** (bits - 1)
    if use_extra_value:
        # 2**(k-1)-1 negatives, one zero, 2**(k-1) positives, all distinct.
        np.testing.assert_array_equal(zero_codes, [half - 1])
        assert (np.diff(table) > 0).all()
    else:
        # DESIGN.md: the zero appears twice, at codes 2**(k-1)-1 and 2**(k-1); the table is symmetric.
        np.testing.assert_array_equal(zero_codes, [half - 1, half])
        assert (np.diff(table[:half]) > 0).all() and (np.diff(table[half:]) > 0).all()
        np.testing.assert_array_equal(table, -table[::-1])
    assert (table[:half - 1] < 0).all() and (table[half + 1 :] > 0).all()


def _float64_throughout(bits: int, offset: float, use_extra_value: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """The same recipe with a float64 linspace and no float32 step: (table, its quantile points z, ppf(offset))."""
    half = 2 ** (bits - 1)
    num_positive = half if use_extra_value else half - 1
    positive = norm.ppf(np.linspace(offset, 0.5, num_positive + 1)[:-1])
    negative = -norm.ppf(np.linspace(offset, 0.5, half)[:-1])
    z = np.sort(np.concatenate([negative, np.zeros(2**bits - num_positive - half + 1), positive]))
    z_max = norm.ppf(offset)
    return z / z_max, z, z_max


@pytest.mark.parametrize("use_extra_value", [True, False], ids=["asymmetric", "symmetric"])
@pytest.mark.parametrize("bits", BITS)
def test_nfk_within_derived_bound_of_float64_throughout(bits, use_extra_value):
    offset = 0.9677083
    table = normal_float_codebook(bits, offset, use_extra_value).astype(np.float64)
    exact, z, z_max = _float64_throughout(bits, offset, use_extra_value)
    # Entry x = ppf(q) / ppf(q0), q a linspace point and q0 = offset. The float32 replay moves
    #  - each point q by at most 3 * 2**-25: the float32 offset (half an ulp of [0.5, 1): 2**-25), the
    #    float32 step (half an ulp of the step, times at most (steps-1) steps: |0.5 - offset| * 2**-24 <= 2**-25)
    #    and the one rounding of the point itself (2**-25);
    #  - q0 by at most 2**-25 (the float32 offset alone);
    # to first order x moves by dq / (pdf(z) z0) + |x| dq0 / (pdf(z0) z0). On top: three float32 roundings of
    # relative size 2**-24 (ppf cast to float32, ppf(q0) cast, the division). Second-order terms are below
    # dq**2 * max|ppf''| / z0 < 1e-12 (|ppf''| = |z| / pdf(z)**2 < 400 on [0.5, 0.97]).
    dq, dq0 = 3 * 2.0**-25, 2.0**-25
    bound = (
        dq / (norm.pdf(z) * z_max)
        + np.abs(exact) * dq0 / (norm.pdf(z_max) * z_max)
        + 3 * 2.0**-24 * np.abs(exact)
        + 1e-12
    )
    deviation = np.abs(table - exact)
    assert (deviation <= bound).all(), (deviation / bound).max()
    if bits == 4:
        # SPEC 1's own statement about the trap: float64-throughout lands within 1 ulp (of 1.0), not on it.
        assert deviation.max() <= FLOAT32_EPS
        assert (table.astype(np.float32) != exact.astype(np.float32)).any()


def test_nf4_other_offset_changes_table():
    # The offset is really used: a different one moves every nonzero entry except the ends.
    moved = normal_float_codebook(4, offset=0.99)
    assert moved[0] == -1.0 and moved[15] == 1.0 and moved[7] == 0.0
    assert (moved[1:7] != NF4_CANONICAL[1:7]).all() and (moved[8:15] != NF4_CANONICAL[8:15]).all()


# ------------------------------------------------------------------------------------------------------
# torch's float32 linspace
# ------------------------------------------------------------------------------------------------------


def test_linspace_endpoints_and_monotone():
    for steps in (2, 3, 8, 9, 65, 129):
        points = torch_linspace_float32(0.9677083, 0.5, steps)
        assert points.dtype == np.float32 and points.shape == (steps,)
        assert points[0] == np.float32(0.9677083) and points[-1] == np.float32(0.5)
        assert (np.diff(points) < 0).all()
    np.testing.assert_array_equal(torch_linspace_float32(0.25, 1.0, 1), [0.25])


def test_linspace_matches_torch_on_vectorized_cpu():
    # torch's CPU linspace depends on the kernel build it dispatches to: the AVX2/AVX-512 builds contract
    # start + step*i into one fused multiply-add, the scalar DEFAULT build does not. bitsandbytes' tables
    # (the dynamic-map fact above) come from the former; compare where torch runs it.
    torch = pytest.importorskip("torch")
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() not in ("x86_64", "amd64") or capability not in ("AVX2", "AVX512"):
        pytest.skip(f"torch's CPU linspace here is the {capability} build on {platform.machine()}")
    for steps in range(2, 130):
        for start, end in ((0.9677083, 0.5), (0.1, 1.0), (-3.7, 11.2)):
            ours = torch_linspace_float32(start, end, steps)
            theirs = torch.linspace(start, end, steps, dtype=torch.float32).numpy()
            np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32), err_msg=f"steps={steps}")


# ------------------------------------------------------------------------------------------------------
# Dynamic map
# ------------------------------------------------------------------------------------------------------


def test_signed_dynamic_map_is_bitsandbytes_table():
    table = dynamic_map(signed=True)
    assert table.dtype == np.float32 and table.shape == (256,)
    np.testing.assert_array_equal(table[128:].view(np.uint32), DYNAMIC_SIGNED_POSITIVE.view(np.uint32))
    np.testing.assert_array_equal(table[:127], -DYNAMIC_SIGNED_POSITIVE[:127][::-1])
    assert table[127] == 0.0


def test_signed_dynamic_map_facts():
    # SPEC 4: 256 distinct ascending values, min -0.992968738079071 (no -1.0), smallest positive ~5.5e-07, max 1.0.
    table = dynamic_map(signed=True)
    assert (np.diff(table) > 0).all()
    assert table[0] == np.float32(-0.992968738079071) and -1.0 not in table
    assert table[-1] == 1.0
    smallest_positive = table[table > 0].min()
    assert abs(smallest_positive - 5.5e-07) <= 1e-12  # 5.500000384e-07: 10**-6 * (0.1 + 1) / 2 in float32
    assert (table < 0).sum() == 127 and (table > 0).sum() == 128


def test_unsigned_dynamic_map_facts():
    # SPEC 4: 254 positives from 7 levels of 2**(i+1) midpoints, then 0 and 1.0.
    table = dynamic_map(signed=False)
    assert table.dtype == np.float32 and table.shape == (256,)
    assert (np.diff(table) > 0).all()
    assert table[0] == 0.0 and table[-1] == 1.0 and (table[1:] > 0).all()
    assert abs(table[1] - 3.25e-07) <= 1e-12  # 10**-6 * (0.1 + 0.55) / 2: the first midpoint of linspace(0.1, 1, 3)
    # The unsigned level i uses the same linspace (2**(i+1) + 1 points) as the signed level i+1: its level 5
    # is float32(0.1) times the signed level 6 (the signed entries in (0.1, 1), whose scale is exactly 1).
    signed_level6 = DYNAMIC_SIGNED_POSITIVE[(DYNAMIC_SIGNED_POSITIVE > 0.1) & (DYNAMIC_SIGNED_POSITIVE < 1.0)]
    assert signed_level6.size == 64
    expected = np.float32(0.1) * signed_level6
    assert np.isin(expected, table).all()


# ------------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"bits": 1}, ValueError, r"^bits\b"),
        ({"bits": 9}, ValueError, r"^bits\b"),
        ({"bits": 4.0}, ValueError, r"^bits\b"),
        ({"bits": True}, ValueError, r"^bits\b"),
        ({"offset": 0.5}, ValueError, r"^offset\b"),
        ({"offset": 1.0}, ValueError, r"^offset\b"),
        ({"offset": 0.99999999}, ValueError, r"^offset\b"),  # rounds to 1.0 in float32
        ({"offset": float("nan")}, ValueError, r"^offset\b"),
        ({"offset": "0.9"}, TypeError, r"^offset\b"),
        ({"use_extra_value": "yes"}, TypeError, r"^use_extra_value\b"),
    ],
)
def test_normal_float_codebook_rejects(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        normal_float_codebook(**kwargs)


def test_dynamic_map_and_linspace_reject():
    with pytest.raises(TypeError, match=r"^signed\b"):
        dynamic_map(signed=1)
    with pytest.raises(ValueError, match=r"^steps\b"):
        torch_linspace_float32(0.0, 1.0, 0)
