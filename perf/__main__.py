"""``python -m perf static|check|roofline``: the static performance layer (``perf/static.py``, ``perf/check.py``)
and the analytic roofline (``perf/roofline.py``)."""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    static = sub.add_parser("static", help="compile every kernel for sm_80 and sm_90 and report resource usage")
    static.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    static.add_argument("--module", help="only this kernel module (e.g. quantize)")
    static.add_argument("--jobs", type=int, default=None, help="compile processes (default: min(4, cores))")
    static.add_argument("--update", action="store_true", help="write the report as the new baseline")
    check = sub.add_parser("check", help="fail when a kernel regressed against perf/baselines/static.json")
    check.add_argument("--baseline", default=None, help="baseline JSON (default: perf/baselines/static.json)")
    check.add_argument("--jobs", type=int, default=None)
    roofline = sub.add_parser("roofline", help="analytic roofline (bytes, FLOPs, predicted time) of each kernel family")
    roofline.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    roofline.add_argument("--device", choices=("h100", "a100", "all"), default="all",
                          help="published peaks of which GPU (default: all)")
    args = parser.parse_args(argv)

    if args.command == "roofline":
        # Pure arithmetic on shapes and datasheet peaks: no qlora or triton import, so it runs anywhere, at once.
        from . import roofline as roofline_mod

        table = roofline_mod.rows(args.device)
        print(json.dumps(roofline_mod.as_dicts(table), indent=1) if args.json else roofline_mod.format_table(table))
        return 0

    # The static layer compiles for GPUs: the kernels must be decorated with the interpreter off.
    if "qlora" in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("qlora was imported in interpreter mode before perf; run `python -m perf` in a fresh process")
    os.environ["QLORA_INTERPRET"] = "0"

    from pathlib import Path

    from . import check as check_mod
    from . import static as static_mod

    if args.command == "static":
        results = static_mod.run(args.module, jobs=args.jobs)
        rows = static_mod.as_rows(results)
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            print(static_mod.format_table(results))
        if args.update:
            if args.module:
                parser.error("--update needs the full report; drop --module")
            check_mod.BASELINE_PATH.parent.mkdir(parents=True, exist_ok=True)
            check_mod.BASELINE_PATH.write_text(json.dumps(check_mod.make_baseline(rows), indent=1) + "\n")
            print(f"baseline written to {check_mod.BASELINE_PATH}", file=sys.stderr)
        return 0

    baseline_path = Path(args.baseline) if args.baseline else check_mod.BASELINE_PATH
    baseline = check_mod.load_baseline(baseline_path)
    rows = static_mod.as_rows(static_mod.run(jobs=args.jobs))
    problems = check_mod.compare(rows, baseline)
    print(f"static check against {baseline_path}: {len(rows)} kernel builds")
    print(check_mod.diff_table(rows, baseline))
    if problems:
        print("REGRESSIONS:")
        for p in problems:
            print(f"  - {p}")
        return 1
    print("no regressions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
