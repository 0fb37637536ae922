"""``python -m perf static|check|roofline|bench|compare|plot|calibrate``: the static performance layer (``perf/static.py``,
``perf/check.py``), the analytic roofline (``perf/roofline.py``) and the timed layer: benchmark runs kept as
results files (``perf/bench.py``), compared (``perf/compare.py``) and charted (``perf/plot.py``).

Exit codes: 0 success; 1 a regression (``check``, ``bench --compare``, ``compare``); 2 a usage error or a
benchmark run that failed."""

from __future__ import annotations

import argparse
import json
import os
import sys

TARGET_NAMES = ("sm_80", "sm_90", "gfx942", "gfx90a")  # perf/static.py TARGETS (not imported: it needs triton)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    static = sub.add_parser("static", help="build every kernel as launched for sm_80, sm_90, gfx942 and gfx90a and "
                                           "report resources and the SASS cost model")
    static.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    static.add_argument("--module", help="only this kernel module (e.g. quantize)")
    static.add_argument("--target", action="append", choices=TARGET_NAMES,
                        help="only this target (repeatable; default: all four)")
    static.add_argument("--jobs", type=int, default=None, help="compile processes (default: min(4, cores))")
    static.add_argument("--dump", metavar="DIR", help="write each build's binary, disassembly, ttgir and JSON record")
    static.add_argument("--update", action="store_true",
                        help="write the report as the baseline of the running Triton version")
    check = sub.add_parser("check", help="fail when a build regressed against the running Triton's baseline "
                                         "(perf/baselines/static-triton<version>.json)")
    check.add_argument("--baseline", default=None, help="baseline JSON (default: the running Triton version's)")
    check.add_argument("--module", help="check only this kernel module's builds")
    check.add_argument("--target", action="append", choices=TARGET_NAMES, help="check only this target (repeatable)")
    check.add_argument("--jobs", type=int, default=None)
    roofline = sub.add_parser("roofline", help="analytic roofline (bytes, FLOPs, predicted time) of each kernel family")
    roofline.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    roofline.add_argument("--device", choices=("h100", "h200", "a100", "all"), default="all",
                          help="published peaks of which GPU (default: all)")
    roofline.add_argument("--triton", metavar="VERSION",
                          help="static baseline (perf/baselines/static-triton<VERSION>.json) whose instruction counts "
                               "give the issue time (default: the newest committed)")
    roofline.add_argument("--no-launches", action="store_true",
                          help="leave out the table of kernel launches per layer forward and backward (recorded from "
                               "the launch code, perf/launches.py; imports torch and qlora)")
    bench = sub.add_parser("bench", help="run the pytest-benchmark files and save a results file")
    bench.add_argument("--only", metavar="PATTERN",
                       help="pytest -k expression selecting benchmarks (e.g. 'linear', 'small_m', 'adamw and qlora')")
    bench.add_argument("--out", metavar="PATH",
                       help="results file to write, or a folder for the default name (default: perf/results/)")
    bench.add_argument("--compare", metavar="SAVED.json",
                       help="compare the new run with this results file; exit 1 when a median regressed")
    bench.add_argument("--threshold", type=float, default=None,
                       help="regression threshold for --compare, a fraction of the old median (default 0.10)")
    bench.add_argument("--quick", action="store_true",
                       help="fewer rounds (CPU: 1 timed after 1 warm-up; GPU: 5 after 1): a smoke run")
    compare = sub.add_parser("compare", help="compare two saved results files; exit 1 when a median regressed")
    compare.add_argument("old", metavar="OLD.json")
    compare.add_argument("new", metavar="NEW.json")
    compare.add_argument("--threshold", type=float, default=None,
                         help="regression threshold, a fraction of the old median (default 0.10)")
    plot = sub.add_parser("plot", help="PNG charts of results files: speed vs M, history over commits")
    plot.add_argument("results", metavar="RESULTS", nargs="+", help="results files (perf/results/*.json)")
    plot.add_argument("--out", metavar="DIR", help="folder for the PNGs (default: perf/results/plots/)")
    calibrate = sub.add_parser("calibrate", help="the roofline's prediction next to each measured time of a run")
    calibrate.add_argument("results", metavar="RESULTS.json")
    calibrate.add_argument("--device", choices=("h100", "h200", "a100"), default="h200",
                           help="peaks to predict with when the run is not on a GPU the roofline knows")
    calibrate.add_argument("--out", metavar="PATH.md", help="also write the table as Markdown here")
    args = parser.parse_args(argv)

    if args.command == "calibrate":
        from . import calibrate as calibrate_mod

        results = _load(parser, args.results, "RESULTS.json")
        table = calibrate_mod.format_markdown(results, calibrate_mod.calibration_rows(results, args.device))
        print(table, end="")
        if args.out:
            from pathlib import Path

            Path(args.out).write_text(table)
        return 0

    if args.command in ("bench", "compare", "plot"):
        return _timed_layer(parser, args)

    if args.command == "roofline":
        # Pure arithmetic on shapes and datasheet peaks (no qlora or triton import, so --json runs anywhere, at
        # once); the text report adds the recorded launch counts.
        from . import roofline as roofline_mod

        try:
            table = roofline_mod.rows(args.device, triton=args.triton)
        except ValueError as err:
            parser.error(f"--triton: {err}")
        print(json.dumps(roofline_mod.as_dicts(table), indent=1) if args.json else roofline_mod.format_table(table))
        if not args.json and not args.no_launches:
            # Counted by recording the launches of a stubbed qlora_linear forward + backward with the launchers'
            # device queries answered as a 132-SM GPU (perf/launches.py): the only part that imports torch/qlora.
            import torch

            from qlora.kernels import interpreter_active

            from . import launches

            print()
            if interpreter_active() or torch.cuda.is_available():
                print(launches.format_table(launches.report()))
            else:  # the recording builds a small NF4 weight with the real kernels first
                print("Launches per layer: not recorded (the Triton interpreter is off and no GPU is present; "
                      "run without QLORA_INTERPRET=0)")
        return 0

    # The static layer compiles for GPUs: the kernels must be decorated with the interpreter off.
    if "qlora" in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("qlora was imported in interpreter mode before perf; run `python -m perf` in a fresh process")
    os.environ["QLORA_INTERPRET"] = "0"

    from pathlib import Path

    from . import check as check_mod
    from . import static as static_mod

    targets = tuple(args.target) if args.target else TARGET_NAMES
    if args.command == "static":
        if args.update and (args.module or args.target):
            parser.error("--update needs the full report; drop --module and --target")
        try:
            results, failures = static_mod.run(args.module, targets=targets, jobs=args.jobs, dump=bool(args.dump))
        except ValueError as err:
            parser.error(f"--module: {err}")
        rows = static_mod.as_rows(results)
        if args.json:
            print(json.dumps({"builds": rows, "failures": {f.key: f.error for f in failures}}, indent=1))
        else:
            print(static_mod.format_table(results))
            for f in failures:
                print(f"BUILD FAILED {f.key}: {f.error.splitlines()[-1][:300]}")
        if args.dump:
            written = static_mod.write_dump(results, Path(args.dump))
            print(f"{len(written)} files written to {args.dump}", file=sys.stderr)
        if args.update:
            path = check_mod.baseline_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            baseline = check_mod.make_baseline(rows, {f.key: f.error for f in failures})
            path.write_text(json.dumps(baseline, indent=1) + "\n")
            print(f"baseline written to {path}", file=sys.stderr)
        return 0

    try:
        baseline_path = Path(args.baseline) if args.baseline else check_mod.baseline_path()
        baseline = check_mod.load_baseline(baseline_path)
    except check_mod.MissingBaseline as err:
        print(f"static check: {err}")
        return 1
    try:
        results, failures = static_mod.run(args.module, targets=targets, jobs=args.jobs)
    except ValueError as err:
        parser.error(f"--module: {err}")
    rows = static_mod.as_rows(results)
    failed = {f.key: f.error for f in failures}

    def selection(key: str) -> bool:
        module_ok = args.module is None or key.startswith(args.module + ".")
        return module_ok and key.rsplit("@", 1)[1] in targets

    problems = check_mod.compare(rows, baseline, failed, selection)
    print(f"static check against {baseline_path} (triton {baseline.get('triton')}): {len(rows)} builds")
    print(check_mod.diff_table(rows, baseline))
    for line in check_mod.known_failures(baseline, failed, selection):
        print(f"KNOWN FAILURE (in the baseline, still a defect): {line}")
    if problems:
        print("REGRESSIONS:")
        for p in problems:
            print(f"  - {p}")
        return 1
    print("no regressions")
    return 0


def _threshold(parser: argparse.ArgumentParser, value: float | None) -> float:
    from .compare import DEFAULT_THRESHOLD, check_threshold

    if value is None:
        return DEFAULT_THRESHOLD
    try:
        return check_threshold(value)
    except ValueError as err:
        parser.error(f"--threshold {err}")


def _load(parser: argparse.ArgumentParser, path: str, what: str) -> dict:
    from .bench import BenchError, load

    try:
        return load(path)
    except BenchError as err:
        parser.error(f"{what}: {err}")


def _timed_layer(parser: argparse.ArgumentParser, args) -> int:
    """bench, compare and plot. Neither imports torch or qlora here: ``bench`` times in a child process."""
    from pathlib import Path

    from . import bench as bench_mod
    from . import compare as compare_mod

    if args.command == "compare":
        threshold = _threshold(parser, args.threshold)
        old, new = _load(parser, args.old, "OLD.json"), _load(parser, args.new, "NEW.json")
        comp = compare_mod.compare_runs(old, new, threshold)
        print(compare_mod.format_comparison(comp))
        return comp.exit_code

    if args.command == "plot":
        from . import plot as plot_mod

        runs = [_load(parser, path, "RESULTS") for path in args.results]
        out_dir = Path(args.out) if args.out else bench_mod.RESULTS_DIR / "plots"
        if out_dir.exists() and not out_dir.is_dir():
            parser.error(f"--out {out_dir}: exists and is not a folder")
        written, notes = plot_mod.make_plots(runs, out_dir)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        for path in written:
            print(path)
        if not written:
            print("no chart: the runs have no linear forward benchmark and no device has two runs", file=sys.stderr)
            return 1
        return 0

    # bench: check every argument before minutes of benchmarking.
    if args.threshold is not None and not args.compare:
        parser.error("--threshold applies to --compare; give --compare SAVED.json as well")
    threshold = _threshold(parser, args.threshold)
    saved = _load(parser, args.compare, "--compare") if args.compare else None
    out = args.out or None  # a string: save() reads a trailing separator as "a folder"
    if out is not None and Path(out).exists() and not Path(out).is_dir() and Path(out).suffix != ".json":
        parser.error(f"--out {out}: exists and is neither a folder nor a .json file")
    if args.only is not None and not args.only.strip():
        parser.error("--only: empty pattern; leave it out to run every benchmark")
    date = bench_mod.utc_now()
    git = bench_mod.git_info()
    where = "quick, " if args.quick else ""
    print(f"running {', '.join(p.name for p in bench_mod.bench_files())} under pytest-benchmark "
          f"({where}{'-k ' + repr(args.only) if args.only else 'all benchmarks'})...", file=sys.stderr, flush=True)
    try:
        pb, skipped = bench_mod.run_pytest_benchmark(args.only, args.quick)
        command = "python -m perf bench" + "".join(
            f" {flag} {value!r}" if value is not True else f" {flag}"
            for flag, value in (("--only", args.only), ("--quick", args.quick)) if value)
        results = bench_mod.convert(pb, git=git, date=date, skipped=skipped, only=args.only, command=command)
    except bench_mod.BenchError as err:
        print(f"python -m perf bench: error: {err}", file=sys.stderr)
        return 2
    path = bench_mod.save(results, out)
    print(bench_mod.format_table(results))
    print(f"\nresults written to {path}")
    if saved is None:
        return 0
    comp = compare_mod.compare_runs(saved, results, threshold)
    print(f"\ncomparison with {args.compare}:")
    print(compare_mod.format_comparison(comp))
    return comp.exit_code


if __name__ == "__main__":
    sys.exit(main())
