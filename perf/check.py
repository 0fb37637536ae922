"""``python -m perf check``: compare a static report with the committed baseline of the running Triton version.

Builds differ between Triton versions (registers, spills, the instruction stream), so each tested version has its
own baseline, ``perf/baselines/static-triton<major>.<minor>.json``, written by
``python -m perf static --update`` under that version. ``check`` picks the running version's file; when there is
none it says so and fails (exit 1): a version nobody baselined is not silently passed.

A regression, per build (kernel spec x target): it starts spilling or spills more (NVIDIA local/stack bytes, AMD
scratch); it loses its tensor-core instructions (mma.sync, wgmma, v_mfma); registers or shared memory/LDS grow by
more than the tolerance (10%); instructions per weight element grow by 10% or more; issue_to_mma grows at all; its
main loop starts waiting for all its warpgroup MMAs (``mma_waits_in_loop``: tensor-core work no longer overlaps the
issue of the next iteration); its main loop's chain of dependent global loads grows (``load_chain``: one more memory
latency an iteration); what a program issues outside its loops grows by more than 10% (``outside_loop``: the decode
GEMV runs only two loop trips a program at M = 1); a build that compiled no longer does; a build appears or
disappears (renames and new kernels come with a refreshed baseline). Builds that already failed when the baseline
was written are listed as known failures on every run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

BASELINE_DIR = Path(__file__).parent / "baselines"
DEFAULT_TOLERANCE = {"registers_pct": 10.0, "shared_pct": 10.0, "instr_per_weight_element_pct": 10.0,
                     "issue_to_mma_pct": 0.0, "outside_loop_pct": 10.0}
_FIELDS = ("registers", "sgprs", "spill_bytes", "shared_bytes", "mma", "wgmma", "loop_instructions",
           "instr_per_weight_element", "issue_to_mma", "weight_load_bytes", "weight_load_async", "mma_waits_in_loop",
           "load_chain", "outside_loop",
           # not gated: what the roofline's issue term needs to pick a build and size its launch (perf/roofline.py
           # fused_issue, tiled_issue, per_element_issue)
           "kernel", "config", "num_warps", "regime", "weight_elements_per_iteration")


def triton_version() -> str:
    """``major.minor`` of the installed Triton (no import of triton itself: its metadata only)."""
    from importlib.metadata import version

    m = re.match(r"(\d+)\.(\d+)", version("triton"))
    if m is None:
        raise RuntimeError(f"cannot read the Triton version from {version('triton')!r}")
    return f"{m.group(1)}.{m.group(2)}"


def baseline_path(version: str | None = None) -> Path:
    """The baseline file of Triton ``version`` (default: the installed one)."""
    return BASELINE_DIR / f"static-triton{version or triton_version()}.json"


def make_baseline(rows: list[dict], failures: dict[str, str] | None = None, tolerance: dict | None = None,
                  version: str | None = None) -> dict:
    return {
        "about": "python -m perf static --update writes this under the Triton version it names; "
                 "python -m perf check compares against it",
        "triton": version or triton_version(),
        "tolerance": dict(tolerance or DEFAULT_TOLERANCE),
        "kernels": {row["key"]: {f: row.get(f) for f in _FIELDS} for row in sorted(rows, key=lambda r: r["key"])},
        "known_failures": dict(sorted((failures or {}).items())),
    }


class MissingBaseline(FileNotFoundError):
    pass


def load_baseline(path: Path | None = None) -> dict:
    path = path or baseline_path()
    if not path.exists():
        have = sorted(p.name for p in BASELINE_DIR.glob("static-triton*.json"))
        raise MissingBaseline(
            f"no static baseline at {path} for the running triton {triton_version()} (committed: "
            f"{', '.join(have) or 'none'}); write one with `python -m perf static --update` under this version")
    return json.loads(path.read_text())


def _grew(now, base, pct: float) -> bool:
    return now is not None and base is not None and now > base * (1 + pct / 100) + 1e-9


def compare(rows: list[dict], baseline: dict, failures: dict[str, str] | None = None,
            selection=None) -> list[str]:
    """Regression messages; empty when the report is within the baseline.

    ``failures``: {key: error} of builds that did not compile now. ``selection``: a predicate on keys; when
    given, only the baseline's builds it accepts are expected (``check --module/--target`` runs a subset)."""
    tol = {**DEFAULT_TOLERANCE, **baseline.get("tolerance", {})}
    base = {k: v for k, v in baseline["kernels"].items() if selection is None or selection(k)}
    known = {k: v for k, v in baseline.get("known_failures", {}).items() if selection is None or selection(k)}
    failures = failures or {}
    now = {row["key"]: row for row in rows}
    problems = []
    for key in sorted(failures):
        if key in base:
            problems.append(f"{key}: no longer compiles: {failures[key].splitlines()[-1][:300]}")
        elif key not in known:
            problems.append(f"{key}: does not compile (not in the baseline): {failures[key].splitlines()[-1][:300]}")
    for key in sorted(set(base) - set(now) - set(failures)):
        problems.append(f"{key}: in the baseline but no longer built (renamed or removed?)")
    for key in sorted(set(now) - set(base)):
        problems.append(f"{key}: not in the baseline (new kernel, config or target: refresh it with --update)")
    for key in sorted(set(base) & set(now)):
        b, n = base[key], now[key]
        if n["spill_bytes"] > b["spill_bytes"]:
            problems.append(f"{key}: spills {n['spill_bytes']} B (local/stack or scratch; baseline "
                            f"{b['spill_bytes']} B)")
        if n.get("mma_waits_in_loop") and b.get("mma_waits_in_loop") is False:
            problems.append(f"{key}: its main loop now waits for all its warpgroup MMAs (mma_waits_in_loop)")
        if _grew(n.get("load_chain"), b.get("load_chain"), 0.0):
            problems.append(f"{key}: {n['load_chain']} dependent global loads on its main loop's longest chain, "
                            f"baseline {b['load_chain']} (load_chain)")
        for flag in ("mma", "wgmma"):
            if b.get(flag) and not n.get(flag):
                problems.append(f"{key}: lost its {flag} tensor-core instructions" if flag == "wgmma" or
                                key.split("@")[1].startswith("sm_") else f"{key}: lost its v_mfma instructions")
        for field, pct, what in (("registers", tol["registers_pct"], "registers"),
                                 ("sgprs", tol["registers_pct"], "SGPRs"),
                                 ("shared_bytes", tol["shared_pct"], "B shared memory"),
                                 ("instr_per_weight_element", tol["instr_per_weight_element_pct"],
                                  "instructions per weight element"),
                                 ("issue_to_mma", tol["issue_to_mma_pct"], "issue_to_mma"),
                                 ("outside_loop", tol["outside_loop_pct"],
                                  "instructions outside its loops per program (outside_loop)")):
            if _grew(n.get(field), b.get(field), pct):
                problems.append(f"{key}: {n[field]} {what}, baseline {b[field]} (+{pct:g}% allowed)")
    return problems


def known_failures(baseline: dict, failures: dict[str, str], selection=None) -> list[str]:
    """Builds that fail now and failed when the baseline was written: reported on every run, not regressions."""
    known = baseline.get("known_failures", {})
    return [f"{k}: {failures[k].splitlines()[-1][:300]}" for k in sorted(failures)
            if k in known and (selection is None or selection(k))]


def diff_table(rows: list[dict], baseline: dict) -> str:
    """Every build whose figures moved, baseline -> now."""
    base = baseline["kernels"]
    lines = []
    for row in sorted(rows, key=lambda r: r["key"]):
        b = base.get(row["key"])
        if b is None:
            continue
        changes = [f"{f} {b.get(f)} -> {row.get(f)}" for f in _FIELDS if b.get(f) != row.get(f)]
        if changes:
            lines.append(f"  {row['key']}: " + ", ".join(changes))
    return "\n".join(lines) if lines else "  (no build's figures moved)"
