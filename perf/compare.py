"""Compare two results files (``python -m perf compare OLD NEW``, ``python -m perf bench --compare OLD``).

Rows are matched by pytest node id and parameters (``perf.bench.row_key``). A matched row *regressed* when its
median seconds per operation grew by more than ``threshold`` (a fraction: 0.10 = 10%), and *improved* when it
shrank by more than that. Two runs are compared only when they ran on the same device with the same backend: a
GPU run against an interpreter run, or an H100 against an A100, says nothing about a change in the code, so
such a comparison is refused and nothing is flagged. A row whose benchmark group changed (the group names the
shapes) is listed but not compared either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .bench import BACKEND_INTERPRETER, format_seconds, row_key

DEFAULT_THRESHOLD = 0.10

REGRESSED, IMPROVED, UNCHANGED, NOT_COMPARED = "REGRESSED", "improved", "ok", "not compared"


@dataclass
class RowDiff:
    """One benchmark in both runs. Seconds per operation (medians); ``change``: new / old - 1 (0.2 = 20%
    slower), None when not compared."""

    name: str
    fullname: str
    old_s: float
    new_s: float
    change: float | None
    status: str
    note: str = ""


@dataclass
class Comparison:
    """The outcome of :func:`compare_runs`. ``comparable`` False: ``reason`` says why, and ``rows`` is empty."""

    comparable: bool
    reason: str
    threshold: float
    old_label: str
    new_label: str
    rows: list[RowDiff] = field(default_factory=list)
    only_old: list[str] = field(default_factory=list)
    only_new: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[RowDiff]:
        return [r for r in self.rows if r.status == REGRESSED]

    @property
    def exit_code(self) -> int:
        """1 when any row regressed, else 0 (a refused comparison flags nothing, so it is 0 as well)."""
        return 1 if self.regressions else 0


def check_threshold(value: float) -> float:
    """``value`` when it is a finite fraction in [0, 1]; ValueError otherwise (10 for 10% is a likely slip)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value!r}")
    if not 0 <= value <= 1:
        raise ValueError(f"is a fraction of the old median (0.10 = 10%) in [0, 1], got {value!r}")
    return float(value)


def run_label(results: dict) -> str:
    """``<commit7>[+dirty] <date> on <device> [<backend>]``."""
    meta = results["metadata"]
    dirty = "+dirty" if meta["git"].get("dirty") else ""
    return f"{meta['git'].get('commit7')}{dirty} {meta['date']} on {meta['device']} [{meta['backend']}]"


def compare_runs(old: dict, new: dict, threshold: float = DEFAULT_THRESHOLD) -> Comparison:
    """Row-by-row comparison of two results (``perf.bench.load``); see the module docstring."""
    threshold = check_threshold(threshold)
    om, nm = old["metadata"], new["metadata"]
    comp = Comparison(True, "", threshold, run_label(old), run_label(new))
    mismatch = [f"{what} {om[k]!r} vs {nm[k]!r}" for k, what in (("device", "device"), ("backend", "backend"))
                if om[k] != nm[k]]
    if mismatch:
        comp.comparable = False
        comp.reason = ("not comparable: " + "; ".join(mismatch) + ". Timings from different devices or backends "
                       "say nothing about a code change, so no row is flagged; compare runs of one device.")
        return comp
    if nm["backend"] == BACKEND_INTERPRETER:
        comp.notes.append("interpreter runs: these times measure the Triton interpreter on a CPU at small shapes "
                          "and move by up to 2x between runs on a shared machine; a flag here is weak evidence "
                          "about the kernels.")
        if (om.get("cpu"), om.get("cpu_count")) != (nm.get("cpu"), nm.get("cpu_count")):
            comp.notes.append(f"different CPUs: {om.get('cpu')} x{om.get('cpu_count')} vs "
                              f"{nm.get('cpu')} x{nm.get('cpu_count')}.")
    if (om.get("rounds"), om.get("quick")) != (nm.get("rounds"), nm.get("quick")):
        comp.notes.append(f"different round counts: {om.get('rounds')} (quick={om.get('quick')}) vs "
                          f"{nm.get('rounds')} (quick={nm.get('quick')}); a one-round median is one sample.")
    old_rows = {row_key(r): r for r in old["rows"]}
    new_rows = {row_key(r): r for r in new["rows"]}
    comp.only_old = [old_rows[k]["fullname"] for k in old_rows if k not in new_rows]
    comp.only_new = [new_rows[k]["fullname"] for k in new_rows if k not in old_rows]
    for key, n in new_rows.items():
        o = old_rows.get(key)
        if o is None:
            continue
        if o.get("group") != n.get("group"):
            comp.rows.append(RowDiff(n["name"], n["fullname"], o["median_s"], n["median_s"], None, NOT_COMPARED,
                                     f"group changed: {o.get('group')!r} -> {n.get('group')!r}"))
            continue
        change = n["median_s"] / o["median_s"] - 1 if o["median_s"] > 0 else math.inf
        status = REGRESSED if change > threshold else IMPROVED if change < -threshold else UNCHANGED
        comp.rows.append(RowDiff(n["name"], n["fullname"], o["median_s"], n["median_s"], change, status))
    return comp


def format_comparison(comp: Comparison) -> str:
    """Readable diff: old and new medians per operation, the change in percent and the verdict per row."""
    out = [f"old: {comp.old_label}", f"new: {comp.new_label}"]
    if not comp.comparable:
        out.append(comp.reason)
        return "\n".join(out)
    headers = ("benchmark", "old median", "new median", "change", "")
    body = []
    for r in comp.rows:
        change = "" if r.change is None else f"{100 * r.change:+.1f}%"
        verdict = r.status if not r.note else f"{r.status} ({r.note})"
        body.append((r.fullname, format_seconds(r.old_s), format_seconds(r.new_s), change, verdict))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]
    align = ("<", ">", ">", ">", "<")
    for cells in (headers, *body):
        out.append("  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, align, widths)).rstrip())
    for name in comp.only_old:
        out.append(f"only in old: {name}")
    for name in comp.only_new:
        out.append(f"only in new: {name}")
    out.extend(f"note: {n}" for n in comp.notes)
    pct = f"{100 * comp.threshold:g}%"
    if comp.regressions:
        out.append(f"{len(comp.regressions)} of {len(comp.rows)} benchmarks regressed (median time up by more "
                   f"than {pct}): " + ", ".join(r.name for r in comp.regressions))
    else:
        out.append(f"no regression: no median time of {len(comp.rows)} matched benchmarks grew by more than {pct}")
    return "\n".join(out)
