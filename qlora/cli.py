"""The ``qlora`` command line."""

from __future__ import annotations

import argparse
import sys


def _cmd_verify(args: argparse.Namespace) -> int:
    from . import verify

    checks = verify.all_checks()
    if args.only:
        checks = [c for c in checks if args.only.lower() in c.name.lower()]
        if not checks:
            print(f"qlora verify: no check matches --only {args.only!r}", file=sys.stderr)
            return 2
    outcomes = verify.run_checks(checks)
    print(verify.format_table(outcomes))
    failed = sum(not o.passed for o in outcomes)
    print(f"\n{len(outcomes) - failed} passed, {failed} failed")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora", description="QLoRA kernel suite: NF4 + LoRA + paged AdamW in Triton")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    verify = sub.add_parser("verify", help="check the oracle against published facts and every kernel against the oracle",
                            description="Runs the oracle self-checks and every kernel against the oracle on default "
                                        "workloads, prints a table, and exits 0 only when all pass.")
    verify.add_argument("--only", metavar="TEXT", help="run only the checks whose name contains TEXT")
    verify.set_defaults(func=_cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
