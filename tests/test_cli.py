"""`qlora verify`: the main job of the README. Its table, its exit codes, and that a failing check fails it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qlora  # noqa: F401  (selects the interpreter before any kernel module is decorated)
from qlora import cli, verify


def test_verify_runs_every_check_and_passes(capsys):
    assert cli.main(["verify"]) == 0
    out = capsys.readouterr().out
    names = {c.name for c in verify.all_checks()}
    assert all(name in out for name in names)
    assert f"{len(verify.all_checks())} passed, 0 failed" in out
    # Every family is covered: the oracle's facts, quantization, the fused layer, the optimizers and paging.
    for family in ("oracle NF4 table", "quantize_4bit", "double_quantize", "qlora_linear", "8-bit AdamW", "Paged"):
        assert any(family in name for name in names), family


def test_only_filters_and_unknown_filter_is_an_error(capsys):
    assert cli.main(["verify", "--only", "codebooks"]) == 0
    out = capsys.readouterr().out
    assert "kernel NFk codebooks" in out and "1 passed, 0 failed" in out
    assert cli.main(["verify", "--only", "no-such-check"]) == 2
    assert "no check matches" in capsys.readouterr().err


def test_a_wrong_kernel_result_fails_the_run(monkeypatch, capsys):
    # Plant a one-ulp error in the kernel codebook: the exact check must see it and the command must exit 1.
    real = verify.k_codebook.normal_float_codebook

    def off_by_one_ulp(*args, **kwargs):
        table = real(*args, **kwargs).clone()
        table[3] = float(np.nextafter(np.float32(table[3].item()), np.float32(1.0)))
        return table

    monkeypatch.setattr(verify.k_codebook, "normal_float_codebook", off_by_one_ulp)
    assert cli.main(["verify", "--only", "codebooks"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_the_linear_check_uses_the_library_bound_and_fails_past_it(monkeypatch):
    """The qlora_linear check measures |kernel - oracle| / qlora.bounds.qlora_linear_bounds: the real kernels stay
    within it; outputs scaled by 1 + 2^-7 (16 float16 unit roundoffs, far beyond one output rounding plus the
    accumulation terms) exceed it."""
    (check,) = [c for c in verify.all_checks() if "qlora_linear" in c.name and c.dtype == "float16"]
    ratio, tolerance = check.run()
    assert tolerance == 1.0 and 0.0 < ratio <= 1.0
    real = verify.qlora_linear
    monkeypatch.setattr(verify, "qlora_linear", lambda *args, **kwargs: real(*args, **kwargs) * (1 + 2.0**-7))
    ratio, _ = check.run()
    assert ratio > 2.0


def test_a_crashing_check_is_reported_not_raised():
    def boom():
        raise ValueError("planted")

    (outcome,) = verify.run_checks([verify.Check("planted", "-", "-", boom)])
    assert not outcome.passed and "ValueError: planted" in outcome.failure
    assert "FAIL: ValueError: planted" in verify.format_table([outcome])


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "qlora"
    assert script.exists(), f"the `qlora` console script is missing next to {sys.executable}: pip install -e ."
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "verify" in proc.stdout


def test_missing_command_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2


_FAULTS_OF_LARGE_TEMPORARIES = """
import json, resource, sys
import numpy as np
import qlora
from qlora._runtime import keep_freed_memory_for_the_interpreter
applied = keep_freed_memory_for_the_interpreter() if sys.argv[1] == "keep" else False
def temporaries():  # what an interpreted tile operation does: allocate a few MiB, touch it, free it
    for _ in range(20):
        a = np.ones(1 << 20, np.float32)
        b = a * 2.0
        del a, b
temporaries()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
temporaries()
print(json.dumps([applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_command_keeps_freed_memory_so_temporaries_do_not_fault_again():
    """With the setting, 4 MiB NumPy temporaries reuse memory the process already holds (no page faults on the
    second round); without it glibc returns them to the kernel and each round faults ~1000 pages per array."""
    import json
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    runs = {}
    for mode in ("keep", "default"):
        proc = subprocess.run([sys.executable, "-c", _FAULTS_OF_LARGE_TEMPORARIES, mode], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    if not qlora.interpreter_active():
        assert runs["keep"][0] is False  # a GPU process is left alone
        return
    assert runs["keep"][0] is True
    # 40 arrays of 1024 pages each: thousands of faults by default, a handful (interpreter state) when kept.
    assert runs["default"][1] > 10_000 and runs["keep"][1] < 500, runs


def test_the_setting_leaves_a_users_malloc_choice_alone(monkeypatch):
    from qlora._runtime import keep_freed_memory_for_the_interpreter

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")
    assert keep_freed_memory_for_the_interpreter() is False


def test_only_the_command_applies_the_setting(monkeypatch):
    """main(argv) runs inside a caller's process (tests, scripts): only the console script's main() applies it."""
    calls = []
    monkeypatch.setattr("qlora._runtime.keep_freed_memory_for_the_interpreter", lambda: calls.append(1) or True)
    monkeypatch.setattr(sys, "argv", ["qlora", "verify", "--only", "codebook"])
    assert cli.main(["verify", "--only", "codebook"]) == 0
    assert calls == []
    assert cli.main() == 0
    assert calls == [1]
