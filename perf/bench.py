"""``python -m perf bench``: run the pytest-benchmark files and keep the numbers as a results file.

The benchmarks run in a child ``python -m pytest perf/bench_*.py --benchmark-only --benchmark-json=...`` (a
fresh process: the Triton interpreter switch, pytest's state and the CUDA context stay out of this one), and
its JSON is converted into *results*: one row per benchmark and the metadata of the run.

A results file (``perf/results/<date>_<commit7>_<device-slug>.json``, schema :data:`SCHEMA`)::

    {"schema": "qlora-perf-results/1",
     "metadata": {"date": "2026-11-23T14:13:05Z",        # UTC, ISO 8601, when the run started
                  "device": "NVIDIA H100 80GB HBM3",      # or "cpu (Triton interpreter)"
                  "backend": "gpu",                       # or "cpu-interpreter"
                  "git": {"commit": 40 hex, "commit7": ..., "dirty": bool},   # dirty: tracked files changed
                  "versions": {"python", "torch", "triton", "qlora", "bitsandbytes", "pytest-benchmark"},
                  "quick": bool, "rounds": int, "warmup_rounds": int, "only": str | None, ...},
     "rows": [{"name", "fullname", "group", "params",
               "median_s", "min_s", "mean_s", "stddev_s", "iqr_s",   # seconds per operation
               "rounds", "ops_per_round", "round_seconds",           # raw rounds, seconds each
               "GBps", "GBps_of", "TFLOPs", "percent_of_peak",
               "roofline", "percent_of_roofline", "extra_info"}, ...],
     "skipped": [{"fullname", "reason"}, ...]}

Times are per operation: a GPU round runs the operation ``ops_per_round`` times (``perf/benchutil.py``), so the
round statistics of pytest-benchmark are divided by it; the median is the headline figure. ``GBps`` is 1e9
bytes/s, ``TFLOPs`` 1e12 FLOP/s; ``percent_of_peak`` is the achieved bandwidth over the device's peak and
``percent_of_roofline`` the analytic prediction of ``perf/roofline.py`` over the measured median, both only on
a GPU the roofline knows (on CPU they are None).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from datetime import datetime, timezone
from pathlib import Path

from . import roofline as rl

SCHEMA = "qlora-perf-results/1"
PERF_DIR = Path(__file__).resolve().parent
REPO = PERF_DIR.parent
RESULTS_DIR = PERF_DIR / "results"
# The documented order (quantize, linear, optimizers); any other bench_*.py runs after them.
BENCH_FILES = ("bench_quantize.py", "bench_linear.py", "bench_optim.py")
QUICK_ENV = "QLORA_BENCH_QUICK"  # read by perf/benchutil.py in the child

# Backend labels and the interpreter's device name, as perf/benchutil.py writes them (not imported from there:
# benchutil imports torch and qlora, and reading or comparing results must not).
BACKEND_GPU = "gpu"
BACKEND_INTERPRETER = "cpu-interpreter"
INTERPRETER_DEVICE = "cpu (Triton interpreter)"


class BenchError(RuntimeError):
    """The benchmark run or a results file is unusable; the message says why."""


# --------------------------------------------------------------------------------------------------------------
# Running the benchmarks
# --------------------------------------------------------------------------------------------------------------


def bench_files() -> list[Path]:
    """The benchmark files, in :data:`BENCH_FILES` order, then any other ``perf/bench_*.py`` by name."""
    found = {p.name: p for p in PERF_DIR.glob("bench_*.py")}
    ordered = [found.pop(name) for name in BENCH_FILES if name in found]
    return ordered + [found[name] for name in sorted(found)]


def run_pytest_benchmark(only: str | None = None, quick: bool = False) -> tuple[dict, list[dict]]:
    """Run the benchmark files in a child pytest; return pytest-benchmark's JSON and the skipped cases.

    ``only``: a pytest ``-k`` expression (``"linear"``, ``"small_m"``, ``"test_quantize and not bitsandbytes"``).
    ``quick``: sets ``$QLORA_BENCH_QUICK`` in the child (fewer rounds, see ``perf/benchutil.py``).
    Raises :class:`BenchError` when pytest fails, selects nothing or times nothing."""
    files = bench_files()
    if not files:
        raise BenchError(f"no bench_*.py files in {PERF_DIR}")
    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as tmp:
        json_path, xml_path = Path(tmp) / "benchmark.json", Path(tmp) / "junit.xml"
        # Paths relative to the repository root, where the child runs: pytest-benchmark's fullnames then read
        # "perf/bench_linear.py::test_linear[...]" wherever `python -m perf` was started from.
        cmd = [sys.executable, "-m", "pytest", *(str(p.relative_to(REPO)) for p in files), "--benchmark-only",
               f"--benchmark-json={json_path}", f"--junitxml={xml_path}", "-q", "-p", "no:cacheprovider"]
        if only:
            cmd += ["-k", only]
        env = dict(os.environ)
        if quick:
            env[QUICK_ENV] = "1"
        else:
            env.pop(QUICK_ENV, None)  # an inherited setting would quietly shorten a full run
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output = proc.stdout
        # pytest exit codes: 0 all passed, 5 nothing collected or everything deselected.
        if proc.returncode == 5:
            raise BenchError(f"--only {only!r} selected no benchmark (a pytest -k expression over the names in "
                             f"{', '.join(p.name for p in files)})" if only else f"pytest collected no benchmark:\n"
                             f"{_tail(output)}")
        if proc.returncode != 0:
            raise BenchError(f"the benchmark run failed (pytest exit code {proc.returncode}); its output ends:\n"
                             f"{_tail(output)}")
        skipped = read_junit_skips(xml_path) if xml_path.exists() else []
        if not json_path.exists():
            raise BenchError(_nothing_timed(skipped, output))
        data = json.loads(json_path.read_text())
    if not data.get("benchmarks"):
        raise BenchError(_nothing_timed(skipped, output))
    return data, skipped


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _nothing_timed(skipped: list[dict], output: str) -> str:
    if skipped:
        reasons = "\n".join(f"  {s['fullname']}: {s['reason']}" for s in skipped)
        return f"every selected benchmark was skipped:\n{reasons}"
    return f"pytest ran but timed no benchmark; its output ends:\n{_tail(output)}"


def read_junit_skips(path: Path) -> list[dict]:
    """``[{"fullname", "reason"}]`` of the skipped cases in a pytest JUnit XML report."""
    out = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        skip = case.find("skipped")
        if skip is None:
            continue
        # classname "perf.bench_optim" + name "test_adamw_step[bnb_AdamW8bit]" -> pytest's node id.
        module = case.get("classname", "").replace(".", "/")
        out.append({"fullname": f"{module}.py::{case.get('name')}", "reason": skip.get("message", "")})
    return out


# --------------------------------------------------------------------------------------------------------------
# Metadata that the parent process knows: git and date
# --------------------------------------------------------------------------------------------------------------


def git_info(repo: Path = REPO) -> dict:
    """``{"commit", "commit7", "dirty"}`` of ``repo``: HEAD, and whether tracked files differ from it (untracked
    files, such as new results files, do not count). ``"unknown"`` and None outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "commit7": "unknown", "dirty": None}
    return {"commit": commit, "commit7": commit[:7], "dirty": bool(status.strip())}


def utc_now() -> str:
    """Now in UTC, ISO 8601 to the second with a ``Z`` suffix (``2026-11-23T14:13:05Z``)."""
    return datetime.now(timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_date(text: str) -> datetime:
    """A results file's ``metadata.date`` back into an aware datetime."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def device_slug(device: str) -> str:
    """File-name form of a device name: lower case, runs of other characters as one ``-``
    (``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``)."""
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "unknown-device"


def result_filename(metadata: dict) -> str:
    """``<date>_<commit7>_<device-slug>.json``; the date is ``metadata.date`` without colons
    (``2026-11-23T141305Z``), so names sort by time and are valid on every file system."""
    date = parse_date(metadata["date"]).strftime("%Y-%m-%dT%H%M%SZ")
    return f"{date}_{metadata['git']['commit7']}_{device_slug(metadata['device'])}.json"


# --------------------------------------------------------------------------------------------------------------
# Conversion: pytest-benchmark JSON -> results
# --------------------------------------------------------------------------------------------------------------


def _fallback_run_info(pb: dict) -> dict:
    """Run info of a pytest-benchmark JSON written without ``perf/conftest.py``'s ``qlora_run`` entry: read back
    from the cases' ``extra_info`` (``timing`` says interpreter or CUDA), versions unknown except Python's."""
    infos = [b.get("extra_info", {}) for b in pb.get("benchmarks", [])]
    timings = {str(i.get("timing", "")) for i in infos}
    on_gpu = any(t.startswith("CUDA") for t in timings)
    if on_gpu and any(t.startswith("Triton interpreter") for t in timings):
        raise BenchError("the pytest-benchmark JSON mixes GPU and interpreter cases")
    devices = {i["device"] for i in infos if "device" in i}
    if on_gpu and len(devices) != 1:
        raise BenchError(f"cannot tell the GPU from the cases' extra_info (devices {sorted(devices)})")
    machine = pb.get("machine_info", {})
    return {
        "device": devices.pop() if on_gpu else INTERPRETER_DEVICE,
        "backend": BACKEND_GPU if on_gpu else BACKEND_INTERPRETER,
        "cpu_count": machine.get("cpu", {}).get("count"),
        "cpu": machine.get("cpu", {}).get("brand_raw"),
        "versions": {"python": machine.get("python_version")},
    }


def convert(pb: dict, *, git: dict, date: str, skipped: list[dict] | None = None, only: str | None = None,
            command: str | None = None) -> dict:
    """Results (see the module docstring) of one pytest-benchmark JSON ``pb``.

    ``git``: :func:`git_info`; ``date``: :func:`utc_now` taken when the run started; ``skipped``: from
    :func:`read_junit_skips`; ``only`` and ``command``: recorded as given."""
    if not isinstance(pb, dict) or not isinstance(pb.get("benchmarks"), list):
        raise BenchError("not a pytest-benchmark JSON: no 'benchmarks' list")
    run = dict(pb.get("qlora_run") or _fallback_run_info(pb))
    parse_date(date)  # fail here on a malformed date rather than when the file name is made
    metadata = {
        "date": date,
        "device": run.pop("device"),
        "backend": run.pop("backend"),
        "git": dict(git),
        "versions": run.pop("versions", {}),
        "only": only,
        "command": command,
        **run,
        "pytest_benchmark_datetime": pb.get("datetime"),
    }
    rows = [convert_benchmark(b, metadata["device"], metadata["backend"]) for b in pb["benchmarks"]]
    keys = [row_key(r) for r in rows]
    if len(set(keys)) != len(keys):
        raise BenchError("two benchmarks share a name and params; they could not be told apart in a comparison")
    return {"schema": SCHEMA, "metadata": metadata, "rows": rows, "skipped": list(skipped or [])}


def convert_benchmark(b: dict, device: str, backend: str) -> dict:
    """One results row of one pytest-benchmark entry (times in seconds per operation)."""
    stats, info = b["stats"], dict(b.get("extra_info") or {})
    ops = info.get("ops_per_round") or 1
    row = {
        "name": b["name"],
        "fullname": b.get("fullname", b["name"]),
        "group": b.get("group"),
        "params": b.get("params") or {},
        "median_s": stats["median"] / ops,
        "min_s": stats["min"] / ops,
        "mean_s": stats["mean"] / ops,
        "stddev_s": stats.get("stddev", 0.0) / ops,
        "iqr_s": stats.get("iqr", 0.0) / ops,
        "rounds": stats.get("rounds"),
        "warmup_rounds": info.get("warmup_rounds"),
        "ops_per_round": ops,
        "round_seconds": list(stats.get("data") or []),
    }
    # Bandwidth: of all bytes moved, or (small-M linear) of the NF4 weight the GEMV streams.
    row["GBps"], row["GBps_of"], fraction = None, None, None
    for prefix, what in (("", "bytes_moved"), ("weight_", "NF4 weight bytes")):
        if f"{prefix}bytes_moved" in info:
            # Recomputed from the median per op, which is what the bench files report (seconds_per_op).
            row["GBps"] = info[f"{prefix}bytes_moved"] / row["median_s"] / 1e9
            row["GBps_of"] = what
            fraction = info.get(f"{prefix}fraction_of_peak")
            break
    row["TFLOPs"] = info["flops"] / row["median_s"] / 1e12 if info.get("flops") else None
    row["percent_of_peak"] = None if fraction is None else 100.0 * fraction
    match = roofline_prediction(info, device) if backend == BACKEND_GPU else None
    row["roofline"] = match
    row["percent_of_roofline"] = None if match is None else 100.0 * match["predicted_s"] / row["median_s"]
    row["extra_info"] = info
    return row


def row_key(row: dict) -> tuple[str, str]:
    """What identifies a benchmark across runs: its pytest node id and its parameters."""
    return row["fullname"], json.dumps(row.get("params") or {}, sort_keys=True)


# --------------------------------------------------------------------------------------------------------------
# Roofline match
# --------------------------------------------------------------------------------------------------------------


def roofline_device(device: str) -> rl.Device | None:
    """The ``perf/roofline.py`` device whose published peaks are this GPU's, or None. Only the exact variants
    the roofline models: H100 SXM (not PCIe or NVL, whose bandwidth differs), H200 (not NVL) and A100 80GB SXM."""
    if re.search(r"\bH200\b", device, re.I) and not re.search(r"\bNVL\b", device, re.I):
        return rl.DEVICES["h200"]
    if re.search(r"\bH100\b", device, re.I) and not re.search(r"\b(PCIe|NVL)\b", device, re.I):
        return rl.DEVICES["h100"]
    if re.search(r"\bA100\b", device, re.I) and re.search(r"\b80\s*GB\b", device, re.I) \
            and not re.search(r"\bPCIe\b", device, re.I):
        return rl.DEVICES["a100"]
    return None


# bench_optim case -> roofline.adamw variant. Not here: qlora_PagedAdamW8bit_host, whose host<->device copies
# the roofline does not model.
_ADAMW_VARIANT = {
    "torch_AdamW": "torch_fused",
    "qlora_PagedAdamW_32bit_resident": "adamw32",
    "qlora_AdamW8bit": "adamw8bit",
    "bnb_AdamW8bit": "adamw8bit",
    "bnb_PagedAdamW8bit": "adamw8bit",
    "bnb_PagedAdamW": "adamw32",
}
# The roofline approach of each bench_linear implementation: qlora_default is the default dispatch (the roofline's
# "qlora_default": the GEMV at M <= 32, the fused kernel up to FUSED_MAX_M rows, dequantize-then-GEMM above);
# qlora_fused_tiled (and qlora_fused, the
# default dispatch's name in results saved before the rename, when it ran the fused tiled kernel) the fused tiled
# kernel ("fused").
_LINEAR_APPROACH = {"qlora_default": "qlora_default", "qlora_fused": "fused", "qlora_fused_tiled": "fused",
                    "dense_bf16": "dense", "dequant_then_matmul": "dequant_matmul",
                    "bitsandbytes_4bit": "dequant_matmul"}  # bnb's matmul_4bit dequantizes, then a dense GEMM
_DTYPE = {"bfloat16": "bf16", "float16": "fp16"}


def roofline_workloads(info: dict, target: str = rl.DEFAULT_TARGET) -> list[rl.Workload] | None:
    """The roofline workloads whose predicted times add up to what the benchmark with ``extra_info`` ``info``
    times on a GPU of ``target`` (whose default dispatch ``qlora_default`` follows), or None when none matches."""
    try:
        if info.get("op") in ("quantize", "dequantize"):
            rows, cols = info["shape"]
            dtype = _DTYPE[info.get("dtype", "bfloat16")]
            if info["op"] == "dequantize":
                return [rl.nf4_dequantize(rows, cols, dtype, info.get("blocksize", rl.NF4_BLOCKSIZE))]
            # The benchmark times quantize_4bit alone; the roofline workload adds double quantization.
            whole = rl.nf4_quantize(rows, cols, dtype, info.get("blocksize", rl.NF4_BLOCKSIZE))
            op = whole.ops[0]
            return [rl.Workload(f"{whole.name}_first_level", whole.family, whole.approach, (op,),
                                f"{op.name} only (the benchmark does not double-quantize); {whole.assumptions}")]
        if info.get("impl") in _LINEAR_APPROACH and "M" in info:
            args = (info["M"], info["K"], info["N"], info["r"], _LINEAR_APPROACH[info["impl"]],
                    _DTYPE[info.get("dtype", "bfloat16")])
            mode = info.get("mode")
            if mode in ("forward", "forward (no grad)"):
                return [rl.lora_forward(*args, target=target)]
            if mode == "backward":
                return [rl.lora_backward(*args, target=target)]
            if mode == "forward+backward":
                return [rl.lora_forward(*args, target=target), rl.lora_backward(*args, target=target)]
            return None
        if info.get("optimizer") in _ADAMW_VARIANT and "numel" in info:
            return [rl.adamw(info["numel"], _ADAMW_VARIANT[info["optimizer"]])]
    except (KeyError, TypeError, ValueError):
        return None  # a shape or dtype the roofline does not model
    return None


def roofline_prediction(info: dict, device: str) -> dict | None:
    """``{"device", "workloads", "predicted_s", "bound"}`` of a benchmark on a GPU ``perf/roofline.py`` knows,
    else None. ``predicted_s`` in seconds, summed over the matched workloads."""
    dev = roofline_device(device)
    loads = roofline_workloads(info, dev.target) if dev is not None else None
    if not loads:
        return None
    table = [rl.roofline(w, dev) for w in loads]
    bounds = {r.bound for r in table}
    return {
        "device": dev.key,
        "workloads": [w.name for w in loads],
        "predicted_s": sum(r.predicted_s for r in table),
        "bound": bounds.pop() if len(bounds) == 1 else "mixed",
    }


# --------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------


def save(results: dict, out: str | Path | None = None) -> Path:
    """Write ``results``; ``out``: a file, a folder (existing, or a string ending in a separator) to put
    :func:`result_filename` in, or None for :data:`RESULTS_DIR`. An existing default name gets ``-2``, ``-3``...
    Returns the path written."""
    name = result_filename(results["metadata"])
    # Checked on the string: Path() drops a trailing separator.
    as_folder = out is None or str(out).endswith(("/", os.sep)) or Path(out).is_dir()
    out = None if out is None else Path(out)
    if as_folder:
        folder = RESULTS_DIR if out is None else out
        folder.mkdir(parents=True, exist_ok=True)
        path, n = folder / name, 1
        while path.exists():
            n += 1
            path = folder / f"{name[:-len('.json')]}-{n}.json"
    else:
        path = out
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path


def load(path: Path | str) -> dict:
    """A results file, checked for the fields a comparison and the plots use; :class:`BenchError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BenchError(f"{path}: not JSON ({err})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        hint = (" (a raw pytest-benchmark JSON? `python -m perf bench` writes results files)"
                if isinstance(data, dict) and "benchmarks" in data else "")
        raise BenchError(f"{path}: not a results file of schema {SCHEMA!r}{hint}")
    meta = data.get("metadata")
    if not isinstance(meta, dict) or not all(k in meta for k in ("date", "device", "backend", "git")):
        raise BenchError(f"{path}: metadata lacks date, device, backend or git")
    if not isinstance(data.get("rows"), list):
        raise BenchError(f"{path}: no 'rows' list")
    for row in data["rows"]:
        if not isinstance(row, dict) or not all(k in row for k in ("name", "fullname", "median_s")):
            raise BenchError(f"{path}: a row lacks name, fullname or median_s")
    return data


# --------------------------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------------------------


def format_seconds(seconds: float | None) -> str:
    """``1.23 s``, ``45.6 ms``, ``7.89 us``, ``120 ns``: three significant figures in the largest unit under
    which the number is at least 1."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(seconds) >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _figure(value: float | None, fmt: str = ".3g") -> str:
    return "" if value is None else format(value, fmt)


def _reference_ratio(info: dict) -> str:
    for key, label in (("time_ratio_vs_dense_bf16", "dense"), ("time_ratio_vs_torch", "torch")):
        if info.get(key) is not None:
            return f"{info[key]:.2f}x {label}"
    return ""


def describe_run(meta: dict) -> str:
    """One paragraph on where and what a run measured."""
    git = meta.get("git", {})
    dirty = " (dirty tree)" if git.get("dirty") else ""
    versions = ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items() if v)
    rounds = ""
    if meta.get("rounds") is not None:
        rounds = f"; {meta['rounds']} timed round(s) after {meta.get('warmup_rounds')} warm-up"
        rounds += " (--quick)" if meta.get("quick") else ""
    lines = [f"{meta['device']} [{meta['backend']}], commit {git.get('commit7')}{dirty}, {meta['date']}{rounds}",
             f"  {versions}" if versions else ""]
    if meta["backend"] == BACKEND_INTERPRETER:
        lines.append(f"  CPU/interpreter timing ({meta.get('cpu') or 'cpu'}, {meta.get('cpu_count')} cores): "
                     "how slow the Triton interpreter is at small shapes, orientation only, not kernel "
                     "performance")
    return "\n".join(line for line in lines if line)


def format_table(results: dict) -> str:
    """The run's description, then per benchmark group one line per case: median, min and mean seconds per
    operation, rounds, GB/s, TFLOP/s, % of peak bandwidth, % of roofline, and the time over the reference."""
    headers = ("case", "median", "min", "mean", "rounds", "GB/s", "TFLOP/s", "%peak", "%roofline", "vs ref")
    align = ("<", ">", ">", ">", ">", ">", ">", ">", ">", "<")
    groups: dict[str, list[tuple[str, ...]]] = {}
    for row in results["rows"]:
        cells = (
            row["name"], format_seconds(row["median_s"]), format_seconds(row.get("min_s")),
            format_seconds(row.get("mean_s")), str(row.get("rounds") or ""), _figure(row.get("GBps")),
            _figure(row.get("TFLOPs")), _figure(row.get("percent_of_peak"), ".1f"),
            _figure(row.get("percent_of_roofline"), ".1f"), _reference_ratio(row.get("extra_info") or {}),
        )
        groups.setdefault(row.get("group") or "(no group)", []).append(cells)
    everything = [headers, *(c for body in groups.values() for c in body)]
    widths = [max(len(c[i]) for c in everything) for i in range(len(headers))]

    def line(cells):
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, align, widths)).rstrip()

    out = [describe_run(results["metadata"]), "", line(headers)]
    for group, body in groups.items():
        out.append(f"-- {group}")
        out.extend(line(c) for c in body)
    out.append("")
    out.append("Times are seconds per operation (median headline; ops_per_round divided out). GB/s: bytes moved "
               "(or, small-M, the NF4 weight) over the median; %peak: of the device's peak bandwidth; %roofline: "
               "perf/roofline.py's predicted time over the median (GPU only). vs ref: time over the dense bf16 or "
               "torch AdamW reference timed in the same run.")
    for skip in results.get("skipped") or []:
        out.append(f"skipped {skip['fullname']}: {skip['reason']}")
    return "\n".join(out)
