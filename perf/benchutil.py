"""Helpers shared by the pytest-benchmark files ``perf/bench_*.py``: where the cases run, synchronized timing,
peak memory bandwidth, and the ``extra_info`` fields every benchmark reports.

Two regimes, chosen once at import:

- GPU (``torch.cuda.is_available() and not qlora.interpreter_active()``): the full-size cases. A benchmark
  round runs the operation ``ops_per_round`` times (calibrated so a round lasts about 20 ms) and then calls
  ``torch.cuda.synchronize()`` before the timer stops, so queued kernels are always inside the measurement.
  Derived figures use the median round divided by ``ops_per_round``.
- CPU (the Triton interpreter): small shapes, one operation per round, three rounds. The numbers say how slow
  the interpreter is and nothing about kernel performance; every case says so in ``extra_info["timing"]``.

``$QLORA_BENCH_QUICK=1`` (what ``python -m perf bench --quick`` sets) cuts the rounds: 1 timed round after 1
warm-up round on CPU, 5 after 1 on a GPU. The per-round work (``ops_per_round``) is unchanged.
"""

from __future__ import annotations

import functools
import math
import os
import re
import statistics
import time
from typing import Callable

import pytest
import torch

import qlora

ON_GPU: bool = torch.cuda.is_available() and not qlora.interpreter_active()
DEVICE = torch.device("cuda") if ON_GPU else torch.device("cpu")

INTERPRETER_TIMING = (
    f"Triton interpreter on a {os.cpu_count()}-core CPU: orientation only, not kernel performance"
)
GPU_TIMING = (
    "CUDA: each round runs the op ops_per_round times, then torch.cuda.synchronize() before the timer stops; "
    "seconds_per_op = median round / ops_per_round"
)

GPU_ONLY_REASON = (
    "GPU case: needs a CUDA device with the Triton kernels compiled "
    "(torch.cuda.is_available() and not qlora.interpreter_active())"
)
INTERPRETER_ONLY_REASON = (
    "interpreter orientation case: a GPU is in use here, so the full-size GPU cases run instead"
)

#: Marks of a case that only makes sense on a GPU.
gpu_only = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason=GPU_ONLY_REASON)]
#: Mark of a small case meant for the Triton interpreter on CPU.
interpreter_only = pytest.mark.skipif(ON_GPU, reason=INTERPRETER_ONLY_REASON)

# Round calibration on the GPU: a round lasts about this long, within these op counts.
GPU_ROUND_SECONDS = 0.02
GPU_MAX_OPS = 200
GPU_ROUNDS = 20
GPU_WARMUP_ROUNDS = 2
CPU_ROUNDS = 3
CPU_WARMUP_ROUNDS = 1
# --quick: enough for a smoke run and a rough number, far too few for a regression decision on its own.
QUICK_ENV = "QLORA_BENCH_QUICK"
QUICK: bool = os.environ.get(QUICK_ENV, "").strip() not in ("", "0")
GPU_QUICK_ROUNDS, GPU_QUICK_WARMUP_ROUNDS = 5, 1
CPU_QUICK_ROUNDS, CPU_QUICK_WARMUP_ROUNDS = 1, 1


# --------------------------------------------------------------------------------------------------------------
# bitsandbytes
# --------------------------------------------------------------------------------------------------------------


def import_bitsandbytes():
    """``(module, None)`` when ``import bitsandbytes`` works, else ``(None, reason)``.

    bitsandbytes' CPU backend runs ``from kernels import get_kernel`` (the Hugging Face Hub package) when imported;
    in a clone of this repository, run from its root, that finds the repository's own ``kernels/`` folder and
    leaves it in ``sys.modules``, where transformers and peft, imported later in the same process, fail on it. The
    Hub package is imported first, with the root left out (``qlora.integrations.import_hub_kernels_package``)."""
    from qlora.integrations import import_hub_kernels_package

    import_hub_kernels_package()
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
        import bitsandbytes.optim  # noqa: F401
    except Exception as err:  # an ImportError, or a broken native library raising something else
        return None, f"bitsandbytes is not importable ({type(err).__name__}: {err})"
    return bitsandbytes, None


def bitsandbytes_marks(bnb_reason: str | None) -> list:
    """Marks of a bitsandbytes comparison case: GPU only, and skipped with the import error's reason."""
    return [*gpu_only, pytest.mark.skipif(bnb_reason is not None, reason=bnb_reason or "")]


# --------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------


def sync() -> None:
    """Wait for every queued kernel of the device (a no-op on CPU)."""
    if ON_GPU:
        torch.cuda.synchronize()


def synchronized(fn: Callable[[], object], ops: int) -> Callable[[], None]:
    """A callable running ``fn`` ``ops`` times and then synchronizing the device, so a timer stopped after it
    counts all the work queued."""

    def run() -> None:
        for _ in range(ops):
            fn()
        sync()

    return run


def calibrate_ops(fn: Callable[[], object], round_seconds: float = GPU_ROUND_SECONDS,
                  max_ops: int = GPU_MAX_OPS) -> int:
    """Ops per round so one round lasts about ``round_seconds``. Runs ``fn`` once first (Triton compiles and
    autotunes on a first call), then times three synchronized single calls and uses the fastest."""
    fn()
    sync()
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return max(1, min(max_ops, int(round_seconds / max(best, 1e-7))))


def rounds_and_warmup() -> tuple[int, int]:
    """``(timed rounds, warm-up rounds)`` of every benchmark and reference in this session."""
    if ON_GPU:
        return (GPU_QUICK_ROUNDS, GPU_QUICK_WARMUP_ROUNDS) if QUICK else (GPU_ROUNDS, GPU_WARMUP_ROUNDS)
    return (CPU_QUICK_ROUNDS, CPU_QUICK_WARMUP_ROUNDS) if QUICK else (CPU_ROUNDS, CPU_WARMUP_ROUNDS)


def run_benchmark(benchmark, fn: Callable[[], object]) -> float | None:
    """Time ``fn`` with ``benchmark.pedantic`` in the regime of this machine; return the median seconds per
    operation (None under ``--benchmark-disable``, where nothing is timed)."""
    ops = calibrate_ops(fn) if ON_GPU else 1
    rounds, warmup = rounds_and_warmup()
    benchmark.extra_info.update(
        device=device_name(),
        timing=GPU_TIMING if ON_GPU else INTERPRETER_TIMING,
        ops_per_round=ops,
        warmup_rounds=warmup,
    )
    benchmark.pedantic(synchronized(fn, ops), rounds=rounds, warmup_rounds=warmup, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return None
    seconds = stats.stats.median / ops
    benchmark.extra_info["seconds_per_op"] = seconds
    return seconds


def wall_seconds_per_op(fn: Callable[[], object]) -> float:
    """The median seconds per call of ``fn`` measured exactly as :func:`run_benchmark` does, without the
    benchmark fixture (for the in-run reference a ratio is taken against)."""
    ops = calibrate_ops(fn) if ON_GPU else 1
    rounds, warmup = rounds_and_warmup()
    run = synchronized(fn, ops)
    for _ in range(warmup):
        run()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / ops


_REFERENCE_SECONDS: dict[object, float] = {}


def offer_reference(key, seconds: float | None) -> None:
    """Use a benchmark's own ``seconds`` per op as the reference for ``key`` unless one was measured already,
    so that in a full run every ratio is taken against the reference case's benchmark (which gets 1.0)."""
    if seconds is not None:
        _REFERENCE_SECONDS.setdefault(key, seconds)


def reference_seconds(key, make_fn: Callable[[], Callable[[], object]]) -> float:
    """Seconds per op of a reference implementation, measured once per session and key by
    :func:`wall_seconds_per_op` on the callable ``make_fn()`` builds (its inputs are freed afterwards)."""
    if key not in _REFERENCE_SECONDS:
        _REFERENCE_SECONDS[key] = wall_seconds_per_op(make_fn())
    return _REFERENCE_SECONDS[key]


# --------------------------------------------------------------------------------------------------------------
# Peak bandwidth
# --------------------------------------------------------------------------------------------------------------

#: Published DRAM bandwidth (bytes/s) by device name: (pattern searched case-insensitively, value, label).
#: The first match wins, so the specific variants come before the generic ones.
SPEC_PEAK_BANDWIDTH: tuple[tuple[str, float, str], ...] = (
    (r"\bH200\b", 4.8e12, "H200 (spec 4.8 TB/s)"),
    (r"\bH100\b.*\bPCIe\b", 2.0e12, "H100 PCIe (spec 2.0 TB/s)"),
    (r"\bH100\b.*\bNVL\b", 3.9e12, "H100 NVL (spec 3.9 TB/s)"),
    (r"\bH100\b", 3.35e12, "H100 SXM (spec 3.35 TB/s)"),
    (r"\bA100\b.*\b80\s*GB\b", 2.0e12, "A100 80GB (spec 2.0 TB/s)"),
    (r"\bA100\b.*\b40\s*GB\b", 1.555e12, "A100 40GB (spec 1.555 TB/s)"),
)

PEAK_ENV = "QLORA_PEAK_BANDWIDTH"  # bytes/s; overrides the table


def spec_peak_bandwidth(name: str) -> tuple[float, str] | None:
    """``(bytes/s, label)`` for a device name found in :data:`SPEC_PEAK_BANDWIDTH`, else None."""
    for pattern, value, label in SPEC_PEAK_BANDWIDTH:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return value, label
    return None


def device_name() -> str:
    if ON_GPU:
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores, Triton interpreter)"


#: ``backend`` labels of a run (see :func:`run_info`).
BACKEND_GPU = "gpu"
BACKEND_INTERPRETER = "cpu-interpreter"
#: The device of every interpreter run: the core count goes to ``cpu_count``, so that runs on CPU machines
#: of different sizes still carry one device name (they time the interpreter, not a kernel).
INTERPRETER_DEVICE = "cpu (Triton interpreter)"


def _distribution_version(name: str) -> str | None:
    """The installed version of distribution ``name`` without importing it, or None when not installed."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def run_info() -> dict:
    """What a results file records about the process that ran the benchmarks: ``device`` (the GPU's name, or
    :data:`INTERPRETER_DEVICE`), ``backend`` (:data:`BACKEND_GPU` or :data:`BACKEND_INTERPRETER`), the timing
    note, the rounds, the CPU, and the library versions (bitsandbytes: its installed version or None, with
    the import error when it is installed but does not import). ``perf/conftest.py`` puts this into
    pytest-benchmark's JSON, where ``python -m perf bench`` reads it."""
    import platform

    import triton

    rounds, warmup = rounds_and_warmup()
    bnb_version = _distribution_version("bitsandbytes")
    bnb_error = import_bitsandbytes()[1] if bnb_version is not None else None
    return {
        "device": torch.cuda.get_device_name() if ON_GPU else INTERPRETER_DEVICE,
        "backend": BACKEND_GPU if ON_GPU else BACKEND_INTERPRETER,
        "timing": GPU_TIMING if ON_GPU else INTERPRETER_TIMING,
        "quick": QUICK,
        "rounds": rounds,
        "warmup_rounds": warmup,
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "cuda": torch.version.cuda if ON_GPU else None,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "qlora": qlora.__version__,
            "bitsandbytes": bnb_version,
            "pytest-benchmark": _distribution_version("pytest-benchmark"),
        },
        "bitsandbytes_import_error": bnb_error,
    }


@functools.lru_cache(maxsize=None)
def measured_copy_bandwidth(nbytes: int = 512 << 20, iters: int = 20) -> float:
    """Practical peak: bytes/s of a device-to-device ``torch.Tensor.copy_`` of ``nbytes`` (each copy reads
    and writes ``nbytes``), timed with CUDA events; measured once per session."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / iters
    return 2 * nbytes / seconds


@functools.lru_cache(maxsize=None)
def peak_bandwidth() -> dict:
    """The bandwidth the fractions are taken against: ``$QLORA_PEAK_BANDWIDTH`` if set, else the spec table
    entry for this device, else the measured copy. The measured copy is reported as well either way."""
    copy = measured_copy_bandwidth()
    override = os.environ.get(PEAK_ENV, "").strip()
    if override:
        peak, source = float(override), f"${PEAK_ENV}"
    else:
        spec = spec_peak_bandwidth(device_name())
        if spec is not None:
            peak, source = spec[0], f"spec table: {spec[1]}"
        else:
            peak, source = copy, "measured device-to-device torch.Tensor.copy_ of 512 MiB (practical peak)"
    return {"peak_Bps": peak, "peak_source": source, "copy_Bps": copy}


def bandwidth_info(nbytes: int, seconds: float | None, what: str = "") -> dict:
    """``extra_info`` fields for ``nbytes`` moved in ``seconds``: the byte count, the achieved bandwidth
    and, on a GPU, the fractions of the peak and of the measured copy. ``what`` prefixes the keys."""
    p = f"{what}_" if what else ""
    info: dict = {f"{p}bytes_moved": int(nbytes)}
    if seconds is None or seconds <= 0:
        return info
    achieved = nbytes / seconds
    info[f"{p}achieved_GBps"] = achieved / 1e9
    if ON_GPU:
        peak = peak_bandwidth()
        info[f"{p}fraction_of_peak"] = achieved / peak["peak_Bps"]
        info[f"{p}fraction_of_copy"] = achieved / peak["copy_Bps"]
        info["peak_GBps"] = peak["peak_Bps"] / 1e9
        info["peak_source"] = peak["peak_source"]
        info["copy_GBps"] = peak["copy_Bps"] / 1e9
    return info
