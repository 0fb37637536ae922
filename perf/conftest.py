"""pytest hooks for the benchmark files ``perf/bench_*.py``.

- Collection: pytest collects a file named on the command line whatever its name, so
  ``pytest perf/bench_quantize.py`` works as is; this hook also collects ``bench_*.py`` when the folder is
  given (``pytest perf --benchmark-only``). The default run (``testpaths = ["tests"]``) never comes here.
- Summary: pytest-benchmark's table shows times per round only; at the end of the session the derived
  figures each case put in ``benchmark.extra_info`` (seconds per op, bandwidth, fractions, ratios) are
  printed as well.
- JSON: ``--benchmark-json`` output gets a ``qlora_run`` entry (``perf.benchutil.run_info()``: device,
  backend, rounds, library versions), taken in the process that ran the benchmarks; ``python -m perf bench``
  turns the file into a results file with it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
_ROWS: list[tuple[str, dict]] = []

# extra_info keys printed in the summary, in this order; the rest stay in the JSON (--benchmark-json).
_SUMMARY_KEYS = (
    "seconds_per_op",
    "bytes_moved",
    "achieved_GBps",
    "fraction_of_peak",
    "fraction_of_copy",
    "weight_bytes_moved",
    "weight_achieved_GBps",
    "weight_fraction_of_peak",
    "tflops",
    "time_ratio_vs_dense_bf16",
    "time_ratio_vs_dequant_then_matmul",
    "time_ratio_vs_torch",
    "pcie_bytes_per_step",
    "pcie_GBps",
)


def pytest_collect_file(file_path: Path, parent):
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and file_path.parent == _HERE
        and not parent.session.isinitpath(file_path)  # named on the command line: pytest collects it itself
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_runtest_makereport(item, call):
    if call.when != "call":
        return None
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    info = getattr(fixture, "extra_info", None)
    if info:
        _ROWS.append((item.nodeid, dict(info)))
    return None


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    tr = terminalreporter
    tr.section("benchmark extra_info (derived figures)")
    labels = []
    for nodeid, info in _ROWS:
        fields = [f"{key}={_format(info[key])}" for key in _SUMMARY_KEYS if key in info]
        tr.write_line(f"{nodeid}")
        tr.write_line(f"    {'  '.join(fields)}")
        for key in ("timing", "peak_source"):
            if key in info and info[key] not in labels:
                labels.append(info[key])
    for label in labels:
        tr.write_line(f"note: {label}")


def pytest_benchmark_update_json(config, benchmarks, output_json):
    # Imported here, not at the top: the default test run loads no benchmark and must not pay for torch.
    from perf import benchutil

    info = benchutil.run_info()
    # py-cpuinfo's brand string ("AMD EPYC 9554 ...") says more than platform.processor(), which is often empty.
    brand = (output_json.get("machine_info") or {}).get("cpu", {}).get("brand_raw")
    if brand:
        info["cpu"] = brand
    output_json["qlora_run"] = info
