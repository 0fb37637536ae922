"""Hypothesis profiles shared by every test module.

``ci`` (the default) is sized so the whole default run stays well within 15 minutes on 2 cores: the
kernels run under the Triton interpreter there (measured: about 3 minutes for the whole suite). ``thorough``
draws ten times as many examples, randomized, and is selected with ``QLORA_HYPOTHESIS_PROFILE=thorough``. Tests
ask for a base number through :func:`examples` (the number their cost allows), which scales with the profile,
instead of hard-coding ``max_examples``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]

settings.register_profile(
    "ci",
    max_examples=50,
    deadline=None,  # interpreter timings vary with the number of program instances; no per-example deadline
    derandomize=True,  # a CI run is reproducible; `thorough` explores
    print_blob=True,
    suppress_health_check=_SLOW_OK,
)
settings.register_profile(
    "thorough",
    max_examples=500,
    deadline=None,
    print_blob=True,
    suppress_health_check=_SLOW_OK,
)

PROFILE = os.environ.get("QLORA_HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "thorough"):
    raise RuntimeError(f"QLORA_HYPOTHESIS_PROFILE must be 'ci' or 'thorough', got {PROFILE!r}")
settings.load_profile(PROFILE)

_SCALE = 20 if PROFILE == "thorough" else 2


def examples(n: int) -> settings:
    """``@examples(n)``: 2n examples under ``ci``, 20n under ``thorough``."""
    return settings(max_examples=n * _SCALE)
