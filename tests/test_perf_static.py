"""The static performance layer: resource parsing, a kernel built to spill, and `perf check` on planted regressions.

Compiling needs the interpreter off, so the compiling parts run in a fresh subprocess (``python -m perf`` or a
small script), as a user would run them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from perf import check as perf_check  # noqa: E402
from perf.static import parse_resource_usage  # noqa: E402

_ENV = {**os.environ, "QLORA_INTERPRET": "0", "PYTHONPATH": str(REPO)}


def _run(args, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=_ENV, capture_output=True, text=True,
                          timeout=timeout)


def test_parse_resource_usage_reads_cuobjdump_output():
    text = textwrap.dedent("""
        Resource usage:
         Common:
          GLOBAL:0
         Function quantize_4bit_kernel:
          REG:40 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0
         Function spilling_kernel:
          REG:255 STACK:1024 SHARED:16 LOCAL:1024 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0
    """)
    usage = parse_resource_usage(text)
    assert usage == {
        "quantize_4bit_kernel": {"registers": 40, "stack": 0, "shared": 0, "local": 0},
        "spilling_kernel": {"registers": 255, "stack": 1024, "shared": 16, "local": 1024},
    }


_SPILL_SCRIPT = textwrap.dedent("""
    import json, os
    os.environ["QLORA_INTERPRET"] = "0"
    import qlora  # noqa: F401  (interpreter off before decoration)
    import triton, triton.language as tl
    from qlora.kernels._static import KernelSpec
    from perf.static import compile_spec

    @triton.jit
    def spilling_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
        # One warp keeps an 8K-element fp32 tile alive across a reduction: 256 values per thread, more than the
        # 255 registers a thread can have, so ptxas must spill.
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs)
        tl.store(y_ptr + offs, x * tl.sum(x, 0))

    @triton.jit
    def small_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs) * 2.0)

    sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"}
    out = {}
    for name, fn, block in (("spill", spilling_kernel, 8192), ("small", small_kernel, 1024)):
        r = compile_spec("test", KernelSpec(name, fn, sig, {"BLOCK": block}, {"num_warps": 1}), 80)
        out[name] = {"spill": r.spill_bytes, "registers": r.registers}
    print(json.dumps(out))
""")


def test_static_report_sees_spills_of_a_kernel_built_to_spill(tmp_path):
    script = tmp_path / "spill_probe.py"  # @triton.jit needs its source in a file
    script.write_text(_SPILL_SCRIPT)
    proc = _run([str(script)])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["spill"]["spill"] > 0, result
    assert result["small"]["spill"] == 0 and 0 < result["small"]["registers"] < 64, result


def _rows():
    return [
        {"key": "quantize.q4@sm_90", "registers": 40, "spill_bytes": 0, "shared_bytes": 0, "mma": False,
         "wgmma": False},
        {"key": "linear.fwd@sm_90", "registers": 168, "spill_bytes": 0, "shared_bytes": 65536, "mma": False,
         "wgmma": True},
    ]


def test_compare_passes_on_identical_and_within_tolerance():
    baseline = perf_check.make_baseline(_rows())
    assert perf_check.compare(_rows(), baseline) == []
    grown = _rows()
    grown[1]["registers"] = 180  # +7%: inside the 10% tolerance
    assert perf_check.compare(grown, baseline) == []


@pytest.mark.parametrize("field, value, message", [
    ("spill_bytes", 64, "spills 64 B"),
    ("wgmma", False, "lost its wgmma"),
    ("registers", 200, "200 registers"),
    ("shared_bytes", 98304, "98304 B shared memory"),
])
def test_compare_flags_each_regression(field, value, message):
    baseline = perf_check.make_baseline(_rows())
    planted = _rows()
    planted[1][field] = value
    problems = perf_check.compare(planted, baseline)
    assert len(problems) == 1 and message in problems[0], problems


def test_compare_flags_missing_and_new_kernels():
    baseline = perf_check.make_baseline(_rows())
    problems = perf_check.compare(_rows()[:1] + [dict(_rows()[1], key="linear.renamed@sm_90")], baseline)
    assert any("no longer compiled" in p for p in problems) and any("not in the baseline" in p for p in problems)


def test_perf_check_passes_on_the_committed_baseline_and_fails_on_a_planted_regression(tmp_path):
    proc = _run(["-m", "perf", "check"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    baseline = json.loads(perf_check.BASELINE_PATH.read_text())
    key = sorted(baseline["kernels"])[0]
    baseline["kernels"][key]["registers"] = max(1, baseline["kernels"][key]["registers"] // 2)
    planted = tmp_path / "planted.json"
    planted.write_text(json.dumps(baseline))
    proc = _run(["-m", "perf", "check", "--baseline", str(planted)])
    assert proc.returncode == 1 and "REGRESSIONS" in proc.stdout and key in proc.stdout, proc.stdout + proc.stderr
