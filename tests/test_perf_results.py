"""The timed layer of ``perf/``: pytest-benchmark JSON -> results rows and metadata (``perf/bench.py``), the
results file name, comparisons and their exit codes (``perf/compare.py``), the PNG charts (``perf/plot.py``)
and the ``bench``/``compare``/``plot`` commands.

Everything runs on synthetic pytest-benchmark JSON written here, except one subprocess that times a single
small case with ``--quick`` (a few seconds), the only check that the child pytest, the ``qlora_run`` hook of
``perf/conftest.py`` and the conversion fit together.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import qlora  # noqa: F401  (first: it decides the Triton interpreter mode before anything imports triton)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from perf import bench, benchutil, plot  # noqa: E402
from perf import compare as cmp  # noqa: E402
from perf import roofline as rl  # noqa: E402
from perf.__main__ import main  # noqa: E402

H100_NAME = "NVIDIA H100 80GB HBM3"
GIT = {"commit": "0123456789abcdef0123456789abcdef01234567", "commit7": "0123456", "dirty": False}
DATE = "2026-11-23T14:13:05Z"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# --------------------------------------------------------------------------------------------------------------
# A small, realistic pytest-benchmark JSON (the fields pytest-benchmark 5 writes, and the bench files' extra_info)
# --------------------------------------------------------------------------------------------------------------


def _entry(fullname: str, params: dict, group: str, round_s: list[float], info: dict, ops: int) -> dict:
    data = sorted(round_s)
    n = len(data)
    median = data[n // 2] if n % 2 else (data[n // 2 - 1] + data[n // 2]) / 2
    mean = sum(data) / n
    return {
        "group": group,
        "name": fullname.split("::")[1],
        "fullname": fullname,
        "params": params,
        "param": "-".join(str(v) for v in params.values()),
        "extra_info": {"ops_per_round": ops, "warmup_rounds": 1, **info},
        "options": {"disable_gc": False, "timer": "perf_counter", "min_rounds": 5, "max_time": 1.0,
                    "min_time": 5e-06, "precision": None, "confidence": None, "warmup": False},
        "stats": {"min": data[0], "max": data[-1], "mean": mean, "stddev": 0.0, "rounds": n, "median": median,
                  "iqr": data[-1] - data[0], "q1": data[0], "q3": data[-1], "iqr_outliers": 0,
                  "stddev_outliers": 0, "outliers": "0;0", "ld15iqr": data[0], "hd15iqr": data[-1],
                  "ops": 1 / mean, "total": sum(data), "data": list(round_s), "iterations": 1},
    }


def synthetic_pb(gpu: bool = False, device: str = H100_NAME, scale: float = 1.0, run_info: bool = True) -> dict:
    """pytest-benchmark JSON of a run on a GPU (full shapes, 10 ops a round) or in the interpreter (small shapes,
    one op a round); ``scale`` multiplies every time."""
    ops = 10 if gpu else 1
    where = "GPU" if gpu else "Triton interpreter, orientation only"
    timing = benchutil.GPU_TIMING if gpu else benchutil.INTERPRETER_TIMING
    base = {"device": device if gpu else "cpu (2 cores, Triton interpreter)", "timing": timing}
    dim, m, k, n, r, numel = (4096, 4096, 4096, 4096, 16, 64 << 20) if gpu else (1024, 64, 256, 256, 8, 1 << 20)
    # Seconds per op; the rounds hold ops of them, with a little spread.
    per_op = {"quantize": 1e-4, "forward-dense_bf16": 2e-4, "forward-dequant_then_matmul": 3e-4,
              "forward-qlora_default": 2.5e-4, "forward+backward-qlora_default": 8e-4, "m1": 2e-5, "m16": 2.4e-5,
              "adam8": 1e-3, "adam8host": 4e-3}

    def rounds(key):
        s = per_op[key] * scale * ops
        return [s * 1.02, s, s * 0.99]

    def bw(nbytes, key, prefix=""):
        out = {f"{prefix}bytes_moved": nbytes, f"{prefix}achieved_GBps": nbytes / (per_op[key] * scale) / 1e9}
        if gpu:
            out[f"{prefix}fraction_of_peak"] = nbytes / (per_op[key] * scale) / 3.35e12
        return out

    lin_group = f"linear forward M={m} K={k} N={n} r={r} bf16 ({where})"
    entries = [
        _entry("perf/bench_quantize.py::test_quantize[qlora]", {"impl": "qlora"},
               f"quantize NF4 bs64 {dim}x{dim} bf16 ({where})", rounds("quantize"),
               {**base, "impl": "qlora", "op": "quantize", "shape": [dim, dim], "dtype": "bfloat16",
                "blocksize": 64, **bw(2 * dim * dim + dim * dim // 2 + 4 * dim * dim // 64, "quantize")}, ops),
    ]
    for impl in ("dense_bf16", "dequant_then_matmul", "qlora_default"):
        key = f"forward-{impl}"
        flops = 2 * m * n * k + 2 * m * k * r + 2 * m * r * n
        entries.append(_entry(
            f"perf/bench_linear.py::test_linear[{key}]", {"mode": "forward", "impl": impl}, lin_group, rounds(key),
            {**base, "impl": impl, "mode": "forward", "M": m, "K": k, "N": n, "r": r, "dtype": "bfloat16",
             "flops": flops, "tflops": flops / (per_op[key] * scale) / 1e12,
             "time_ratio_vs_dense_bf16": per_op[key] / per_op["forward-dense_bf16"]}, ops))
    flops = 2 * (2 * m * n * k + 2 * m * k * r + 2 * m * r * n) + 4 * m * n * r + 4 * m * r * k
    entries.append(_entry(
        "perf/bench_linear.py::test_linear[forward+backward-qlora_default]",
        {"mode": "forward+backward", "impl": "qlora_default"},
        f"linear forward+backward M={m} K={k} N={n} r={r} bf16 ({where})", rounds("forward+backward-qlora_default"),
        {**base, "impl": "qlora_default", "mode": "forward+backward", "M": m, "K": k, "N": n, "r": r,
         "dtype": "bfloat16", "flops": flops}, ops))
    for small, key in ((1, "m1"), (16, "m16")):
        entries.append(_entry(
            f"perf/bench_linear.py::test_linear_small_m[{small}]", {"m": small},
            f"linear forward small M K={k} N={n} r={r} bf16, no grad ({where})", rounds(key),
            {**base, "impl": "qlora_default", "mode": "forward (no grad)", "M": small, "K": k, "N": n, "r": r,
             "dtype": "bfloat16", "dense_reference_seconds": 3e-5 * scale,
             "time_ratio_vs_dense_bf16": per_op[key] / 3e-5, **bw(n * k // 2 + n * k // 64 + 4, key, "weight_")},
            ops))
    for case, key, bits in (("qlora_AdamW8bit", "adam8", 8), ("qlora_PagedAdamW8bit_host", "adam8host", 8)):
        entries.append(_entry(
            f"perf/bench_optim.py::test_adamw_step[{case}]", {"case": case},
            f"AdamW step, {dim}x{dim} float32 parameter ({where})", rounds(key),
            {**base, "optimizer": case, "numel": numel, "optim_bits": bits, "time_ratio_vs_torch": 2.0,
             **bw(16 * numel + 16 * numel // 256, key)}, ops))
    pb = {
        "machine_info": {"node": "vm", "machine": "x86_64", "python_version": "3.11.7", "system": "Linux",
                         "cpu": {"count": 2, "brand_raw": "AMD EPYC", "arch": "X86_64"}},
        "commit_info": {"id": GIT["commit"], "dirty": False, "project": "main", "branch": "main"},
        "benchmarks": entries,
        "datetime": "2026-11-23T14:13:20.000000+00:00",
        "version": "5.3.1",
    }
    if run_info:
        pb["qlora_run"] = {
            "device": device if gpu else bench.INTERPRETER_DEVICE,
            "backend": bench.BACKEND_GPU if gpu else bench.BACKEND_INTERPRETER,
            "timing": timing, "quick": False, "rounds": 3, "warmup_rounds": 1, "cpu_count": 2, "cpu": "AMD EPYC",
            "cuda": "12.4" if gpu else None,
            "versions": {"python": "3.11.7", "torch": "2.13.0", "triton": "3.9.0", "qlora": "0.1.0",
                         "bitsandbytes": None, "pytest-benchmark": "5.3.1"},
            "bitsandbytes_import_error": None,
        }
    return pb


def results_of(gpu=False, device=H100_NAME, scale=1.0, git=GIT, date=DATE) -> dict:
    return bench.convert(synthetic_pb(gpu, device, scale), git=git, date=date)


def by_name(results: dict) -> dict:
    return {row["name"]: row for row in results["rows"]}


# --------------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------------


def test_interpreter_run_converts_to_rows_and_metadata():
    pb = synthetic_pb()
    pb["qlora_run"] = benchutil.run_info()  # what perf/conftest.py really writes in this environment
    git = bench.git_info()
    date = bench.utc_now()
    res = bench.convert(pb, git=git, date=date, skipped=[{"fullname": "x", "reason": "GPU case"}], only="linear")
    meta = res["metadata"]
    assert res["schema"] == bench.SCHEMA
    assert meta["device"] == "cpu (Triton interpreter)" and meta["backend"] == "cpu-interpreter"
    assert "orientation only" in meta["timing"]
    assert set(meta["versions"]) >= {"python", "torch", "triton", "qlora", "bitsandbytes"}
    assert meta["versions"]["qlora"] == qlora.__version__
    if meta["git"]["commit"] != "unknown":  # "unknown" outside a git checkout
        assert re.fullmatch(r"[0-9a-f]{40}", meta["git"]["commit"])
        assert meta["git"]["commit7"] == meta["git"]["commit"][:7] and isinstance(meta["git"]["dirty"], bool)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["date"])
    assert meta["only"] == "linear" and res["skipped"] == [{"fullname": "x", "reason": "GPU case"}]

    rows = by_name(res)
    assert len(res["rows"]) == len(pb["benchmarks"])
    q = rows["test_quantize[qlora]"]
    assert q["fullname"] == "perf/bench_quantize.py::test_quantize[qlora]" and q["params"] == {"impl": "qlora"}
    assert q["group"].startswith("quantize NF4")
    assert q["median_s"] == pytest.approx(1e-4) and q["min_s"] == pytest.approx(0.99e-4)
    assert q["mean_s"] == pytest.approx(1e-4 * (1.02 + 1 + 0.99) / 3)
    assert q["rounds"] == 3 and q["ops_per_round"] == 1
    assert q["GBps"] == pytest.approx(q["extra_info"]["achieved_GBps"]) and q["GBps_of"] == "bytes_moved"
    small = rows["test_linear_small_m[1]"]
    assert small["GBps_of"] == "NF4 weight bytes"
    assert small["GBps"] == pytest.approx(small["extra_info"]["weight_achieved_GBps"])
    fused = rows["test_linear[forward-qlora_default]"]
    assert fused["TFLOPs"] == pytest.approx(fused["extra_info"]["tflops"])
    # On CPU there is no peak and no roofline.
    assert all(r["percent_of_peak"] is None and r["percent_of_roofline"] is None for r in res["rows"])


def test_gpu_run_divides_ops_per_round_and_adds_roofline_percentages():
    res = results_of(gpu=True)
    rows = by_name(res)
    assert res["metadata"]["device"] == H100_NAME and res["metadata"]["backend"] == "gpu"
    fused = rows["test_linear[forward-qlora_default]"]
    assert fused["ops_per_round"] == 10 and fused["median_s"] == pytest.approx(2.5e-4)  # round 2.5e-3 / 10
    # qlora_default is the roofline's "qlora_default" approach (at M > 16 its dequantize-then-GEMM launches).
    predicted = rl.roofline(rl.lora_forward(4096, 4096, 4096, 16, "qlora_default"),
                            rl.DEVICES["h100"]).predicted_s
    assert fused["roofline"]["device"] == "h100"
    assert fused["roofline"]["predicted_s"] == pytest.approx(predicted)
    assert fused["percent_of_roofline"] == pytest.approx(100 * predicted / 2.5e-4)
    # forward+backward: the forward and the backward workloads' predictions add up.
    both = rows["test_linear[forward+backward-qlora_default]"]["roofline"]
    shape = (4096, 4096, 4096, 16)
    approach = "qlora_default"
    assert both["workloads"] == [rl.lora_forward(*shape, approach).name, rl.lora_backward(*shape, approach).name]
    h100 = rl.DEVICES["h100"]
    assert both["predicted_s"] == pytest.approx(rl.roofline(rl.lora_forward(*shape, approach), h100).predicted_s
                                                + rl.roofline(rl.lora_backward(*shape, approach), h100).predicted_s)
    dense = rows["test_linear[forward-dense_bf16]"]["roofline"]
    assert dense["workloads"] == [rl.lora_forward(4096, 4096, 4096, 16, "dense").name]
    # quantize: only the first-level launch (the benchmark does not double-quantize).
    q = rows["test_quantize[qlora]"]
    first = rl.nf4_quantize(4096, 4096).ops[0]
    assert q["roofline"]["predicted_s"] == pytest.approx(rl.op_roofline(first, rl.DEVICES["h100"]).predicted_s)
    assert q["percent_of_peak"] == pytest.approx(100 * q["extra_info"]["fraction_of_peak"])
    assert rows["test_adamw_step[qlora_AdamW8bit]"]["roofline"]["workloads"] == ["adamw8bit_64M_fp32"]
    # Host paging's PCIe copies are not modelled: no roofline figure rather than a wrong one.
    assert rows["test_adamw_step[qlora_PagedAdamW8bit_host]"]["percent_of_roofline"] is None


@pytest.mark.parametrize("name, key", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA H100 PCIe", None),
    ("NVIDIA H100 NVL", None), ("NVIDIA A100-SXM4-40GB", None), ("NVIDIA A100 80GB PCIe", None),
    ("NVIDIA H200", "h200"), ("NVIDIA H200 NVL", None), ("cpu (Triton interpreter)", None),
])
def test_roofline_device_only_for_the_modelled_variants(name, key):
    found = bench.roofline_device(name)
    assert (None if found is None else found.key) == key


def test_gpu_without_a_roofline_device_keeps_peak_but_no_roofline():
    rows = by_name(results_of(gpu=True, device="NVIDIA H200 NVL"))
    q = rows["test_quantize[qlora]"]
    assert q["percent_of_roofline"] is None and q["percent_of_peak"] is not None


def test_json_without_qlora_run_falls_back_to_extra_info():
    gpu = bench.convert(synthetic_pb(gpu=True, run_info=False), git=GIT, date=DATE)
    assert gpu["metadata"]["device"] == H100_NAME and gpu["metadata"]["backend"] == "gpu"
    cpu = bench.convert(synthetic_pb(run_info=False), git=GIT, date=DATE)
    assert cpu["metadata"]["device"] == bench.INTERPRETER_DEVICE and cpu["metadata"]["backend"] == "cpu-interpreter"
    assert cpu["metadata"]["versions"] == {"python": "3.11.7"}


def test_convert_rejects_what_is_not_pytest_benchmark_json():
    with pytest.raises(bench.BenchError, match="benchmarks"):
        bench.convert({"rows": []}, git=GIT, date=DATE)
    with pytest.raises(ValueError):
        bench.convert(synthetic_pb(), git=GIT, date="yesterday")


# --------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------


def test_result_filename_scheme():
    meta = {"date": DATE, "git": GIT, "device": H100_NAME}
    assert bench.result_filename(meta) == "2026-11-23T141305Z_0123456_nvidia-h100-80gb-hbm3.json"
    meta["device"] = bench.INTERPRETER_DEVICE
    assert bench.result_filename(meta) == "2026-11-23T141305Z_0123456_cpu-triton-interpreter.json"
    assert bench.device_slug("NVIDIA A100-SXM4-80GB") == "nvidia-a100-sxm4-80gb"


def test_save_load_round_trip_and_name_collisions(tmp_path):
    res = results_of()
    first = bench.save(res, tmp_path)
    second = bench.save(res, str(tmp_path / "new") + "/")  # a trailing separator: a folder, created
    third = bench.save(res, tmp_path)
    assert first.name == "2026-11-23T141305Z_0123456_cpu-triton-interpreter.json"
    assert second.parent == tmp_path / "new" and second.name == first.name
    assert third.name == "2026-11-23T141305Z_0123456_cpu-triton-interpreter-2.json"
    explicit = bench.save(res, tmp_path / "sub" / "mine.json")
    assert explicit == tmp_path / "sub" / "mine.json"
    assert bench.load(first) == res == bench.load(explicit)


def test_load_explains_what_is_wrong(tmp_path):
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps(synthetic_pb()))
    with pytest.raises(bench.BenchError, match="raw pytest-benchmark JSON"):
        bench.load(raw)
    with pytest.raises(bench.BenchError, match="no such file"):
        bench.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(bench.BenchError, match="not JSON"):
        bench.load(bad)


def test_table_labels_interpreter_timing():
    text = bench.format_table(results_of())
    assert "cpu-interpreter" in text and "orientation only" in text
    assert "test_linear[forward-qlora_default]" in text and "250 us" in text
    assert "1.25x dense" in text
    gpu = bench.format_table(results_of(gpu=True))
    assert "orientation only" not in gpu.splitlines()[0] and "[gpu]" in gpu


# --------------------------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------------------------


def _slow_down(results: dict, name: str, factor: float) -> dict:
    out = copy.deepcopy(results)
    for row in out["rows"]:
        if row["name"] == name:
            row["median_s"] *= factor
    out["metadata"]["date"] = "2026-11-24T09:00:00Z"
    return out


def test_compare_flags_a_20_percent_slowdown_and_not_a_5_percent_one():
    old = results_of(gpu=True)
    slow = _slow_down(old, "test_linear[forward-qlora_default]", 1.20)
    comp = cmp.compare_runs(old, slow)
    assert comp.comparable and comp.exit_code == 1
    assert [r.name for r in comp.regressions] == ["test_linear[forward-qlora_default]"]
    assert comp.regressions[0].change == pytest.approx(0.20)
    assert all(r.status == cmp.UNCHANGED for r in comp.rows if r.name != "test_linear[forward-qlora_default]")

    mild = cmp.compare_runs(old, _slow_down(old, "test_linear[forward-qlora_default]", 1.05))
    assert mild.comparable and not mild.regressions and mild.exit_code == 0
    # The threshold decides: 5% is a regression at 0.04.
    assert cmp.compare_runs(old, _slow_down(old, "test_linear[forward-qlora_default]", 1.05), 0.04).exit_code == 1
    faster = cmp.compare_runs(old, _slow_down(old, "test_quantize[qlora]", 0.5))
    assert faster.exit_code == 0 and [r.status for r in faster.rows if r.name == "test_quantize[qlora]"] == ["improved"]


def test_compare_refuses_other_device_or_backend():
    h100 = results_of(gpu=True)
    slow_a100 = _slow_down(results_of(gpu=True, device="NVIDIA A100-SXM4-80GB"), "test_quantize[qlora]", 3.0)
    comp = cmp.compare_runs(h100, slow_a100)
    assert not comp.comparable and comp.rows == [] and comp.exit_code == 0
    assert "not comparable" in comp.reason and "A100" in comp.reason
    cross = cmp.compare_runs(results_of(), _slow_down(results_of(gpu=True), "test_quantize[qlora]", 3.0))
    assert not cross.comparable and "backend" in cross.reason and cross.exit_code == 0
    assert "not comparable" in cmp.format_comparison(cross)


def test_compare_lists_unmatched_rows_and_changed_groups():
    old = results_of(gpu=True)
    new = copy.deepcopy(old)
    gone = new["rows"].pop(0)
    new["rows"][0]["group"] = "linear forward M=8192 (GPU)"
    new["rows"][0]["median_s"] *= 2  # not compared: the shapes changed
    comp = cmp.compare_runs(old, new)
    assert comp.only_old == [gone["fullname"]] and comp.exit_code == 0
    assert comp.rows[0].status == cmp.NOT_COMPARED and "group changed" in comp.rows[0].note


@pytest.mark.parametrize("bad", [-0.1, 10, float("nan"), float("inf")])
def test_threshold_must_be_a_fraction(bad):
    with pytest.raises(ValueError):
        cmp.check_threshold(bad)


# --------------------------------------------------------------------------------------------------------------
# Commands (no benchmark runs: the child pytest is replaced by the synthetic JSON)
# --------------------------------------------------------------------------------------------------------------


def _write(tmp_path: Path, name: str, results: dict) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(results))
    return str(path)


def test_compare_command_exit_codes_and_diff(tmp_path, capsys):
    old = results_of(gpu=True)
    old_path = _write(tmp_path, "old.json", old)
    slow = _write(tmp_path, "slow.json", _slow_down(old, "test_linear_small_m[1]", 1.2))
    mild = _write(tmp_path, "mild.json", _slow_down(old, "test_linear_small_m[1]", 1.05))
    other = _write(tmp_path, "other.json", _slow_down(results_of(gpu=True, device="NVIDIA H200"),
                                                      "test_linear_small_m[1]", 1.5))
    assert main(["compare", old_path, slow]) == 1
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "test_linear_small_m[1]" in x and "REGRESSED" in x)
    assert "20 us" in line and "24 us" in line and "+20.0%" in line
    assert main(["compare", old_path, mild]) == 0
    assert "no regression" in capsys.readouterr().out
    assert main(["compare", old_path, mild, "--threshold", "0.04"]) == 1
    capsys.readouterr()
    assert main(["compare", old_path, other]) == 0
    assert "not comparable" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["compare", "OLD", "NEW", "--threshold", "-1"], "--threshold"),
    (["compare", "OLD", "NEW", "--threshold", "15"], "--threshold"),
    (["compare", "OLD", "missing.json"], "NEW.json"),
    (["bench", "--compare", "missing.json"], "--compare"),
    (["bench", "--threshold", "0.2"], "--compare"),
    (["bench", "--only", " "], "--only"),
    (["plot", "missing.json"], "RESULTS"),
])
def test_command_errors_name_the_argument(tmp_path, monkeypatch, capsys, argv, message):
    saved = _write(tmp_path, "saved.json", results_of())
    argv = [saved if a in ("OLD", "NEW") else a for a in argv]
    argv = [str(tmp_path / a) if a == "missing.json" else a for a in argv]

    def must_not_run(*args, **kwargs):
        raise AssertionError("arguments are checked before any benchmark runs")

    monkeypatch.setattr(bench, "run_pytest_benchmark", must_not_run)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_command_saves_prints_and_compares(tmp_path, monkeypatch, capsys):
    """The bench command end to end, with the child pytest replaced by synthetic pytest-benchmark JSON."""
    scale = {"value": 1.0}
    calls = []

    def fake_run(only, quick):
        calls.append((only, quick))
        return synthetic_pb(scale=scale["value"]), [{"fullname": "perf/bench_x.py::test_gpu", "reason": "GPU case"}]

    monkeypatch.setattr(bench, "run_pytest_benchmark", fake_run)
    out_dir = tmp_path / "results"
    assert main(["bench", "--quick", "--only", "linear", "--out", str(out_dir) + "/"]) == 0
    (saved,) = out_dir.glob("*.json")
    assert calls == [("linear", True)]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d{6}Z_([0-9a-f]{7}|unknown)_cpu-triton-interpreter\.json", saved.name)
    printed = capsys.readouterr().out
    assert "test_linear[forward-qlora_default]" in printed and str(saved) in printed
    assert "skipped perf/bench_x.py::test_gpu: GPU case" in printed
    results = bench.load(saved)
    assert results["metadata"]["only"] == "linear" and "--quick" in results["metadata"]["command"]

    scale["value"] = 1.25  # every benchmark 25% slower
    assert main(["bench", "--compare", str(saved), "--out", str(tmp_path / "second.json")]) == 1
    assert "REGRESSED" in capsys.readouterr().out
    scale["value"] = 1.02
    assert main(["bench", "--compare", str(saved), "--out", str(tmp_path / "third.json")]) == 0


def test_bench_command_reports_a_failed_run(monkeypatch, capsys):
    def failing(only, quick):
        raise bench.BenchError("the benchmark run failed (pytest exit code 1)")

    monkeypatch.setattr(bench, "run_pytest_benchmark", failing)
    assert main(["bench"]) == 2
    assert "pytest exit code 1" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------------


def _runs_over_commits() -> list[dict]:
    runs = []
    for i, (commit, day, scale) in enumerate([("aaaaaaa", 20, 1.0), ("ccccccc", 22, 0.9), ("bbbbbbb", 21, 1.1)]):
        git = {"commit": commit * 5 + "a" * 5, "commit7": commit, "dirty": i == 1}
        runs.append(results_of(gpu=True, scale=scale, git=git, date=f"2026-11-{day}T10:00:00Z"))
    return runs


def test_speed_vs_m_series():
    series = plot.speed_vs_m(results_of(gpu=True))
    assert series["qlora_default"] == {1: pytest.approx(2e-5), 16: pytest.approx(2.4e-5), 4096: pytest.approx(2.5e-4)}
    # Dense at small M comes from the small-M cases' reference; at M = 4096 from its own benchmark.
    assert series["dense_bf16"] == {1: 3e-5, 16: 3e-5, 4096: pytest.approx(2e-4)}
    assert set(series["dequant_then_matmul"]) == {4096}


def test_plot_writes_png_files(tmp_path, capsys):
    runs = _runs_over_commits()
    runs.append(results_of())  # an interpreter run: its own speed chart, and no history (one run)
    no_linear = results_of(gpu=True, device="NVIDIA H200")
    no_linear["rows"] = [r for r in no_linear["rows"] if "linear" not in r["fullname"]]
    runs.append(no_linear)
    written, notes = plot.make_plots(runs, tmp_path / "plots")
    names = sorted(p.name for p in written)
    assert names == sorted(
        [f"speed-vs-m_2026-11-{d}T100000Z_{c}_nvidia-h100-80gb-hbm3.png"
         for d, c in ((20, "aaaaaaa"), (21, "bbbbbbb"), (22, "ccccccc"))]
        + ["speed-vs-m_2026-11-23T141305Z_0123456_cpu-triton-interpreter.png", "history_nvidia-h100-80gb-hbm3.png"])
    for path in written:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000
    assert any("no fused-linear forward" in n for n in notes)
    assert any("one run on cpu (Triton interpreter)" in n for n in notes)

    # The command prints the paths, one a line.
    files = [_write(tmp_path, f"r{i}.json", r) for i, r in enumerate(_runs_over_commits())]
    assert main(["plot", *files, "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 4 and all(Path(p).is_file() for p in printed)


# --------------------------------------------------------------------------------------------------------------
# One real run: a single small case, quick
# --------------------------------------------------------------------------------------------------------------


def test_bench_command_runs_one_real_case(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "perf", "bench", "--quick", "--only", "test_linear_small_m[1-qlora_default]",
         "--out", str(tmp_path) + "/"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (path,) = tmp_path.glob("*.json")
    res = bench.load(path)
    assert [r["name"] for r in res["rows"]] == ["test_linear_small_m[1-qlora_default]"]
    meta = res["metadata"]
    assert meta["backend"] == "cpu-interpreter" and meta["quick"] and meta["rounds"] == 1
    assert res["rows"][0]["median_s"] > 0 and res["rows"][0]["GBps"] > 0
    assert "orientation only" in proc.stdout


def test_labels_agree_with_benchutil():
    # perf/bench.py repeats these so that reading and comparing results imports no torch; they must not drift.
    assert (bench.BACKEND_GPU, bench.BACKEND_INTERPRETER, bench.INTERPRETER_DEVICE, bench.QUICK_ENV) == (
        benchutil.BACKEND_GPU, benchutil.BACKEND_INTERPRETER, benchutil.INTERPRETER_DEVICE, benchutil.QUICK_ENV)
