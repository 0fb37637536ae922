"""``python -m perf calibrate RESULTS.json``: the roofline model's prediction next to each measured time.

For every benchmark of a results file that ``perf/roofline.py`` models (quantize, dequantize, the linear layer's
forward/backward at each M, the AdamW steps), one line: the measured median per operation, the model's predicted
time for the same shapes on the run's GPU, and measured / predicted. A ratio near 1 means the model's bound (HBM
bytes, tensor FLOPs) is what limits the kernel; far above 1, something the model leaves out costs the time
(instruction issue, launches, host Python). This is how the first GPU loan calibrates the static model.

A run on the Triton interpreter (``gpu_check.sh --dry-run``) has no GPU to compare with: the table shows the
predictions for ``--device`` (default h200) and leaves the ratio empty.
"""

from __future__ import annotations

from . import bench as bench_mod
from . import roofline as rl


def calibration_rows(results: dict, device_key: str = "h200") -> list[dict]:
    """``[{"name", "group", "measured_s", "predicted_s", "ratio", "bound", "device", "workloads"}]`` for the rows
    the roofline models. On a GPU the roofline knows, the run's own device; otherwise ``device_key``'s peaks and
    ``ratio`` None."""
    meta = results["metadata"]
    on_gpu = meta.get("backend") == bench_mod.BACKEND_GPU
    run_device = bench_mod.roofline_device(meta.get("device", "")) if on_gpu else None
    device = run_device or rl.resolve_devices(device_key)[0]
    out = []
    for row in results["rows"]:
        loads = bench_mod.roofline_workloads(row.get("extra_info") or {}, device.target)
        if not loads:
            continue
        table = [rl.roofline(w, device) for w in loads]
        predicted = sum(r.predicted_s for r in table)
        bounds = {r.bound for r in table}
        measured = row["median_s"]
        out.append({
            "name": row["name"], "group": row.get("group"), "measured_s": measured, "predicted_s": predicted,
            "ratio": measured / predicted if run_device is not None and predicted > 0 else None,
            "bound": bounds.pop() if len(bounds) == 1 else "mixed", "device": device.key,
            "workloads": [w.name for w in loads],
        })
    return out


def _time(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"


def format_markdown(results: dict, rows: list[dict]) -> str:
    meta = results["metadata"]
    lines = [
        f"# Roofline model vs measured: {meta.get('device')} ({meta.get('backend')}), commit "
        f"{(meta.get('git') or {}).get('commit7')}, {meta.get('date')}",
        "",
        "measured = median per operation; predicted = `perf/roofline.py` (max of HBM byte time, tensor/FP32 "
        "FLOP time and instruction issue time per launch, the last two added where a launch's MMA waits stall its "
        "issue, summed), a static model, not a timing; ratio = measured / predicted.",
        "",
        "| benchmark | measured | predicted | ratio | model bound | device peaks |",
        "|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['name']} | {_time(r['measured_s'])} | {_time(r['predicted_s'])} | {ratio} | "
                     f"{r['bound']} | {r['device']} |")
    if not rows:
        lines.append("| (no benchmark the roofline models) | | | | | |")
    return "\n".join(lines) + "\n"
