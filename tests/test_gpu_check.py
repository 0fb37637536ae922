"""``perf/gpu_check.sh --dry-run``: the one-shot GPU check walked on CPU under the Triton interpreter with tiny
shapes, so the script a short GPU loan depends on cannot rot between loans; and its usage errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "perf" / "gpu_check.sh"


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_walks_every_step_and_writes_its_files(tmp_path):
    proc = _run("--dry-run", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    summary = json.loads((out / "gpu_check_summary.json").read_text())
    assert summary["dry_run"] is True and summary["device"] == "cpu"
    assert [s["step"] for s in summary["steps"]] == ["tests", "bench", "calibrate", "plot", "profile"]
    assert all(s["status"] == "passed" and s["rc"] == 0 for s in summary["steps"][:4]), summary["steps"]
    assert summary["steps"][4] == {"step": "profile", "rc": 0, "seconds": 0, "status": "skipped: no GPU"}
    results = json.loads((out / "gpu_check_bench.json").read_text())
    assert results["metadata"]["backend"] == "cpu-interpreter" and results["rows"]
    table = (out / "gpu_check_calibration.md").read_text()
    # One table line per modelled benchmark, with the prediction for the default H200 peaks and no ratio on CPU.
    modelled = [line for line in table.splitlines() if line.startswith("| test_")]
    assert modelled and all(line.rstrip().endswith("| h200 |") for line in modelled)
    assert list((out / "plots").glob("*.png"))
    assert "tests=" not in proc.stderr  # no shell error text


def test_usage_errors_exit_2(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    proc = _run("--dry-run", str(not_a_folder))
    assert proc.returncode == 2 and "is not a folder" in proc.stderr
    proc = _run("--bogus")
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr
    proc = _run("--dry-run", str(tmp_path / "a"), str(tmp_path / "b"))
    assert proc.returncode == 2 and "one OUT_DIR only" in proc.stderr


def test_help_prints_the_whole_header():
    proc = _run("--help")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and lines[0].startswith("# One-shot GPU check") and lines[-1] == "# step 5 skipped)."
    assert all(line.startswith("#") for line in lines) and "CAP_PROFILE" in proc.stdout


def test_profile_step_command_refuses_without_a_gpu():
    """The GPU-only step 5 runs ``python -m perf.profile_linear 1 16 4096``: on this CPU machine the same command
    parses its M values and exits 2 with its reason (no CUDA device with compiled kernels), not a traceback."""
    proc = subprocess.run([sys.executable, "-m", "perf.profile_linear", "1", "16", "4096"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "needs a CUDA device" in proc.stderr and "Traceback" not in proc.stderr


def test_decode_profile_walks_every_variant_under_the_interpreter(capsys):
    """``perf.profile_linear``'s decode section (GPU-only in the GPU check) walked on CPU at a small weight, so that
    a short GPU loan does not find it broken: a line per variant with its time, none failed, the dispatcher's own
    line the reference of the others' comparison."""
    import torch

    import qlora
    from perf.profile_linear import decode_variants, profile_decode

    gen = torch.Generator().manual_seed(0)
    weight = qlora.quantize_nf4((torch.randn(256, 512, generator=gen) * 0.02).to(torch.bfloat16), blocksize=64,
                                double_quant=True)
    lora_a = (torch.randn(8, 512, generator=gen) * 0.01).to(torch.bfloat16)
    lora_b = (torch.randn(256, 8, generator=gen) * 0.01).to(torch.bfloat16)
    profile_decode(1, weight, lora_a, lora_b, gen, calls=1)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("M=1 decode GEMV variants (K = 512, N = 256, r = 8") and "none" in lines[0]
    labels = [label for label, _ in decode_variants(1, 256, 512, sms=132)]
    assert len(lines) == 1 + len(labels)
    for label, line in zip(labels, lines[1:]):
        assert line.split("  ")[2].strip() == label and " us  model -" in line and "failed" not in line, line
    assert lines[1].rstrip().endswith("same bits")  # the dispatcher against itself
