"""``python -m perf check``: compare a static report with the committed baseline.

A regression is a kernel that starts spilling (or spills more), loses its tensor-core instructions, or grows
registers or shared memory by more than the baseline's stated tolerance; a kernel missing from either side is
reported too, so renames and new kernels come with a refreshed baseline (``python -m perf static --update``).
"""

from __future__ import annotations

import json
from pathlib import Path

BASELINE_PATH = Path(__file__).parent / "baselines" / "static.json"
DEFAULT_TOLERANCE = {"registers_pct": 10.0, "shared_pct": 10.0}
_FIELDS = ("registers", "spill_bytes", "shared_bytes", "mma", "wgmma")


def make_baseline(rows: list[dict], tolerance: dict | None = None) -> dict:
    return {
        "about": "python -m perf static --update writes this; python -m perf check compares against it",
        "tolerance": dict(tolerance or DEFAULT_TOLERANCE),
        "kernels": {row["key"]: {f: row[f] for f in _FIELDS} for row in sorted(rows, key=lambda r: r["key"])},
    }


def load_baseline(path: Path = BASELINE_PATH) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"no baseline at {path}; create it with `python -m perf static --update`")
    return json.loads(path.read_text())


def compare(rows: list[dict], baseline: dict) -> list[str]:
    """Human-readable regression messages; empty when the report is within the baseline."""
    tol = {**DEFAULT_TOLERANCE, **baseline.get("tolerance", {})}
    base = baseline["kernels"]
    now = {row["key"]: row for row in rows}
    problems = []
    for key in sorted(set(base) - set(now)):
        problems.append(f"{key}: in the baseline but no longer compiled (renamed or removed?)")
    for key in sorted(set(now) - set(base)):
        problems.append(f"{key}: not in the baseline (new kernel or config: refresh it with --update)")
    for key in sorted(set(base) & set(now)):
        b, n = base[key], now[key]
        if n["spill_bytes"] > b["spill_bytes"]:
            problems.append(f"{key}: spills {n['spill_bytes']} B of local memory (baseline {b['spill_bytes']} B)")
        for flag in ("mma", "wgmma"):
            if b[flag] and not n[flag]:
                problems.append(f"{key}: lost its {flag} tensor-core instructions")
        limit = b["registers"] * (1 + tol["registers_pct"] / 100)
        if n["registers"] > limit:
            problems.append(f"{key}: {n['registers']} registers, baseline {b['registers']} "
                            f"(+{tol['registers_pct']:g}% allowed = {limit:.0f})")
        limit = b["shared_bytes"] * (1 + tol["shared_pct"] / 100)
        if n["shared_bytes"] > limit:
            problems.append(f"{key}: {n['shared_bytes']} B shared memory, baseline {b['shared_bytes']} B "
                            f"(+{tol['shared_pct']:g}% allowed = {limit:.0f})")
    return problems


def diff_table(rows: list[dict], baseline: dict) -> str:
    """Every kernel whose figures moved, baseline -> now."""
    base = baseline["kernels"]
    lines = []
    for row in sorted(rows, key=lambda r: r["key"]):
        b = base.get(row["key"])
        if b is None:
            continue
        changes = [f"{f} {b[f]} -> {row[f]}" for f in _FIELDS if b[f] != row[f]]
        if changes:
            lines.append(f"  {row['key']}: " + ", ".join(changes))
    return "\n".join(lines) if lines else "  (no kernel's figures moved)"
