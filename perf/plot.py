"""``python -m perf plot RESULTS... [--out DIR]``: PNG charts of results files (matplotlib, Agg backend).

- ``speed-vs-m_<run>.png``, one per run with fused-linear forward benchmarks: seconds per forward against M
  (log-log), one line per implementation, and each implementation's time over dense bf16's at the same M. The
  small-M points (``test_linear_small_m``) are forwards without grad, qlora_default timed and dense bf16 from
  the reference the benchmark measured; the large-M point (``test_linear[forward-*]``) is a forward in grad
  mode, every implementation timed.
- ``history_<device-slug>.png``, one per device and backend with two or more runs: the median seconds per
  operation of every benchmark against the run's commit, runs ordered by date, one panel per bench file.
"""

from __future__ import annotations

from pathlib import Path

from .bench import BACKEND_INTERPRETER, BENCH_FILES, device_slug, parse_date

IMPL_ORDER = ("dense_bf16", "dequant_then_matmul", "bitsandbytes_4bit", "qlora_default", "qlora_fused_tiled",
              "qlora_fused")  # qlora_fused: the name of the default dispatch in results saved before the rename
IMPL_STYLE = {"dense_bf16": ("tab:gray", "s"), "dequant_then_matmul": ("tab:orange", "^"),
              "bitsandbytes_4bit": ("tab:green", "v"), "qlora_default": ("tab:blue", "o"),
              "qlora_fused_tiled": ("tab:purple", "D"), "qlora_fused": ("tab:blue", "o")}
_FORWARD_MODES = ("forward", "forward (no grad)")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display here or in CI
    import matplotlib.pyplot as plt

    return plt


def _plain_log_ticks(ax) -> None:
    """Log-scale y ticks as plain numbers (``40``, ``1000``) rather than ``4 x 10^1``; call after plotting.
    Minor ticks are labelled only within one decade, where there would be no major label otherwise."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    low, high = ax.get_ylim()
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g") if high / low < 10 else NullFormatter())


def _file_order(file: str) -> tuple[int, str]:
    name = Path(file).name
    return (BENCH_FILES.index(name) if name in BENCH_FILES else len(BENCH_FILES), name)


def _run_stem(results: dict) -> str:
    meta = results["metadata"]
    date = parse_date(meta["date"]).strftime("%Y-%m-%dT%H%M%SZ")
    return f"{date}_{meta['git'].get('commit7')}_{device_slug(meta['device'])}"


def _where(meta: dict) -> str:
    if meta["backend"] == BACKEND_INTERPRETER:
        return "CPU, Triton interpreter: orientation only, not kernel performance"
    return meta["device"]


def speed_vs_m(results: dict) -> dict[str, dict[int, float]]:
    """``{impl: {M: seconds per forward}}`` from a run's fused-linear forward benchmarks (empty when it has
    none). A small-M case gives qlora_default's median and its dense bf16 reference; a benchmark of dense bf16
    itself at the same M wins over a reference."""
    series: dict[str, dict[int, float]] = {}
    references: dict[int, float] = {}
    for row in results["rows"]:
        info = row.get("extra_info") or {}
        if info.get("mode") not in _FORWARD_MODES or "M" not in info or "impl" not in info:
            continue
        series.setdefault(info["impl"], {})[int(info["M"])] = row["median_s"]
        if info.get("dense_reference_seconds") is not None:
            references[int(info["M"])] = info["dense_reference_seconds"]
    if references:
        dense = series.setdefault("dense_bf16", {})
        for m, seconds in references.items():
            dense.setdefault(m, seconds)
    return series


def plot_speed_vs_m(results: dict, path: Path) -> Path | None:
    """Write the speed-vs-M chart of one run to ``path``; None (nothing written) when the run has no linear
    forward benchmark."""
    series = speed_vs_m(results)
    if not series:
        return None
    plt = _pyplot()
    from matplotlib.ticker import NullLocator

    fig, (ax_time, ax_ratio) = plt.subplots(1, 2, figsize=(12, 4.8))
    impls = [i for i in IMPL_ORDER if i in series] + sorted(i for i in series if i not in IMPL_ORDER)
    dense = series.get("dense_bf16", {})
    for impl in impls:
        color, marker = IMPL_STYLE.get(impl, (None, "D"))
        ms = sorted(series[impl])
        ax_time.plot(ms, [series[impl][m] * 1e3 for m in ms], marker=marker, color=color, label=impl)
        shared = [m for m in ms if m in dense]
        if impl != "dense_bf16" and shared:
            ax_ratio.plot(shared, [series[impl][m] / dense[m] for m in shared], marker=marker, color=color,
                          label=f"{impl} / dense_bf16")
    every_m = sorted({m for points in series.values() for m in points})
    for ax in (ax_time, ax_ratio):
        ax.set_xscale("log", base=2)
        ax.set_xticks(every_m, [str(m) for m in every_m])
        ax.xaxis.set_minor_locator(NullLocator())  # the Ms measured are the only ticks
        ax.set_xlabel("M (rows of x)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_time.set_yscale("log")
    _plain_log_ticks(ax_time)
    ax_time.set_ylabel("median time per forward (ms)")
    ax_time.set_title("fused NF4 + LoRA linear: time vs M")
    ax_ratio.axhline(1.0, color="black", linewidth=0.8)
    ax_ratio.set_ylabel("time / dense bf16 time (lower is better)")
    ax_ratio.set_title("relative to dense bf16")
    meta = results["metadata"]
    fig.suptitle(f"{_where(meta)} | commit {meta['git'].get('commit7')} | {meta['date']}\n"
                 "M <= 32 (test_linear_small_m): forward without grad (decode path); larger M: forward in grad mode",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_history(runs: list[dict], path: Path) -> Path:
    """Write the history chart of ``runs`` (one device and backend) to ``path``: per bench file a panel, per
    benchmark a line of median seconds per operation (log scale) against the runs in date order."""
    runs = sorted(runs, key=lambda r: parse_date(r["metadata"]["date"]))
    labels = []
    for r in runs:
        meta = r["metadata"]
        dirty = "*" if meta["git"].get("dirty") else ""
        # Date and time: several runs of one commit on one day are common.
        labels.append(f"{meta['git'].get('commit7')}{dirty}\n{meta['date'][:10]}\n{meta['date'][11:16]}Z")
    # bench file -> benchmark name -> {run index: seconds}
    panels: dict[str, dict[str, dict[int, float]]] = {}
    for i, r in enumerate(runs):
        for row in r["rows"]:
            file = row["fullname"].split("::")[0]
            panels.setdefault(file, {}).setdefault(row["name"], {})[i] = row["median_s"]
    plt = _pyplot()
    files = sorted(panels, key=_file_order)
    fig, axes = plt.subplots(len(files), 1, figsize=(12, 3.6 * len(files)), squeeze=False)
    # A panel holds up to a dozen lines: 20 colours and 4 markers keep them apart (the default cycle has 10).
    colors, markers = plt.get_cmap("tab20").colors, ("o", "s", "^", "D")
    for ax, file in zip(axes[:, 0], files):
        for i, (name, points) in enumerate(panels[file].items()):
            xs = sorted(points)
            ax.plot(xs, [points[x] * 1e3 for x in xs], marker=markers[i % len(markers)], markersize=4,
                    color=colors[i % len(colors)], label=name)
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        ax.set_ylabel("median ms / op")
        ax.set_title(file, fontsize=9)
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    meta = runs[-1]["metadata"]
    fig.suptitle(f"median time per benchmark over commits ({_where(meta)}; * = dirty tree)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the legends sit outside the axes
    plt.close(fig)
    return path


def make_plots(runs: list[dict], out_dir: Path) -> tuple[list[Path], list[str]]:
    """Every chart the runs allow, written into ``out_dir``; returns the paths and notes on what was left out."""
    written, notes = [], []
    for r in runs:
        path = plot_speed_vs_m(r, out_dir / f"speed-vs-m_{_run_stem(r)}.png")
        if path is None:
            notes.append(f"speed vs M: run {_run_stem(r)} has no fused-linear forward benchmark")
        else:
            written.append(path)
    by_device: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        by_device.setdefault((r["metadata"]["device"], r["metadata"]["backend"]), []).append(r)
    for (device, backend), group in by_device.items():
        if len(group) < 2:
            notes.append(f"history: one run on {device} [{backend}]; a history needs two or more")
            continue
        # The interpreter's device name is fixed and a GPU's implies the gpu backend: the device names the file.
        written.append(plot_history(group, out_dir / f"history_{device_slug(device)}.png"))
    return written, notes
