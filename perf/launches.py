"""Kernel launches per QLoRA layer forward and backward, counted by recording the launches of real calls.

Nothing here is a hand-written table: :func:`layer_launches` calls ``qlora.functional.qlora_linear`` (forward)
and ``torch.autograd.grad`` (backward) with Triton's launch objects (``JITFunction``, ``InterpretedFunction``,
``Autotuner``) patched to record the kernel's name, so the counts are whatever the launch code of
``kernels/linear.py`` and ``kernels/lora.py`` does for that shape.

Two modes:

- ``execute=True`` (what the tests use, under the interpreter): the kernels run; the recorded launches are those of
  an actual forward + backward.
- ``execute=False`` (what ``python -m perf roofline`` prints): kernel bodies are stubbed (``perf/hosttime.py``), so
  a 4096 x 4096 layer costs only its host code. With ``gpu_sms`` given, the launchers' device queries are answered
  as a GPU with that many SMs would answer them (``interpreter_active() -> False`` and ``num_sms()`` in
  kernels/linear.py and kernels/lora.py, ``gpu_arch() -> 9``, the autotuned GEMM replaced by its kernel): the
  launch plan, i.e. split
  ``lora_down`` reductions and their ``_sum_splits_kernel`` launches, is then the GPU's, computed on any machine.

The counts include the dropout mask: with ``dropout_p > 0`` the forward launches ``_dropout_bits_kernel`` once and
the backward reads the saved mask (``tests/test_launches.py`` fails if the backward regenerates it).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass

import torch

from .hosttime import dropping_tables_built_while_stubbed, launch_classes

# Shapes reported by ``python -m perf roofline``: the GEMV path (M = 1, 32), the fused one (64) and, on the 132-SM
# sm_90 plan, dequantize-then-GEMM (4096) at the roofline's 4096-sized layer, r = 16, with and without dropout.
REPORT_SHAPES = tuple((m, 4096, 4096, 16, p) for m in (1, 32, 64, 4096) for p in (0.0, 0.1))
GPU_SMS = 132  # H100 / H200 SXM


def _kernel_name(launcher) -> str:
    fn = getattr(launcher, "fn", None)  # InterpretedFunction / Autotuner wrap the JITFunction or the function
    while fn is not None and not hasattr(fn, "__name__") and hasattr(fn, "fn"):
        fn = fn.fn
    return getattr(fn, "__name__", None) or getattr(launcher, "__name__", type(launcher).__name__)


@contextlib.contextmanager
def recorded_launches(execute: bool = True):
    """Within the block every ``kernel[grid](...)`` appends the kernel's name to the yielded list, and the fill
    that zeroes the decode GEMV's arrival counts appends ``zero_fill``; with ``execute=False`` the kernel does not
    run. An autotuned launch counts once (its inner launch is not counted again)."""
    names: list[str] = []
    depth = [0]
    classes = launch_classes()
    saved = [(cls, cls.__dict__["run"]) for cls in classes if "run" in cls.__dict__]

    def wrap(original):
        def run(self, *args, **kwargs):
            if depth[0] == 0:
                names.append(_kernel_name(self))
            if not execute:
                return None
            depth[0] += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                depth[0] -= 1
        return run

    from qlora.kernels import linear

    zeroed_arrivals = linear._zeroed_arrivals

    def zero_fill(*args, **kwargs):  # a torch fill launch on a GPU, not a Triton one: recorded by name
        if depth[0] == 0:
            names.append("zero_fill")
        return zeroed_arrivals(*args, **kwargs)

    for cls, original in saved:
        cls.run = wrap(original)
    linear._zeroed_arrivals = zero_fill
    try:
        with contextlib.nullcontext() if execute else dropping_tables_built_while_stubbed():
            yield names
    finally:
        for cls, original in saved:
            cls.run = original
        linear._zeroed_arrivals = zeroed_arrivals


@contextlib.contextmanager
def _as_gpu(sms: int):
    """The launchers' device queries answered as a GPU with ``sms`` SMs would (see the module docstring)."""
    from qlora.kernels import linear, lora

    patches = [(linear, "interpreter_active", lambda: False), (lora, "interpreter_active", lambda: False),
               (linear, "num_sms", lambda: sms), (lora, "num_sms", lambda: sms), (linear, "gpu_arch", lambda: 9),
               (linear, "_tuned_matmul", lambda: linear._matmul_lora_kernel)]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    for mod, name, value in patches:
        setattr(mod, name, value)
    try:
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


@dataclass(frozen=True)
class LayerLaunches:
    """Kernel names launched by one forward and by the backward that follows it, in launch order."""

    m: int
    k: int
    n: int
    r: int
    dropout_p: float
    forward: tuple[str, ...]
    backward: tuple[str, ...]
    plan: str  # "executed", "stubbed" or "stubbed, GPU plan (N SMs)"

    def counts(self) -> tuple[int, int]:
        return len(self.forward), len(self.backward)


def _placeholder_weight(n: int, k: int, dtype: torch.dtype, device) -> "qlora.NF4Weight":
    """A valid double-quantized NF4 weight of shape (n, k), blocksize 64, without quantizing an (n, k) tensor:
    every code 0, every scale code 0, absmax2 1, and the codebooks and offset of a real (1, 64) quantization run
    outside any recording. Quantizing the full weight with kernels stubbed left its scales uninitialized, and the
    offset computed from them could be inf (refused by the container's checks); run for real it costs seconds
    under the interpreter at 4096 x 4096. The layer's launches do not depend on the values."""
    import qlora

    real = qlora.quantize_nf4(torch.ones((1, 64), dtype=dtype, device=device), blocksize=64, double_quant=True)
    blocks = -(-(n * k) // 64)
    return qlora.NF4Weight(
        packed=torch.zeros((-(-(n * k) // 2),), dtype=torch.uint8, device=device),
        absmax=torch.zeros((blocks,), dtype=torch.uint8, device=device), code=real.code, blocksize=64,
        shape=(n, k), dtype=dtype, absmax2=torch.ones((-(-blocks // 256),), dtype=torch.float32, device=device),
        offset=real.offset, nested_code=real.nested_code, nested_blocksize=real.nested_blocksize)


def layer_launches(m: int, k: int, n: int, r: int, dropout_p: float = 0.0, *, execute: bool = True,
                   gpu_sms: int | None = None, dtype: torch.dtype = torch.bfloat16) -> LayerLaunches:
    """Record the launches of ``qlora_linear`` on x (m, k), an NF4 W (n, k) (blocksize 64, double-quantized),
    LoRA rank r, bias, in training mode with ``dropout_p``, then of its backward (x, A, B and bias need grad).
    ``gpu_sms`` (only with ``execute=False``): the launch plan of a GPU with that many SMs."""
    import qlora
    from qlora.functional import qlora_linear
    from qlora.kernels._runtime import kernel_device

    if gpu_sms is not None and execute:
        raise ValueError("gpu_sms emulates a GPU's launch plan and needs execute=False")
    device = kernel_device()
    weight = _placeholder_weight(n, k, dtype, device)
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)

    x, lora_a, lora_b, bias = leaf(m, k), leaf(r, k), leaf(n, r), leaf(n)
    plan = "executed" if execute else ("stubbed" if gpu_sms is None else f"stubbed, GPU plan ({gpu_sms} SMs)")
    emulate = _as_gpu(gpu_sms) if gpu_sms is not None else contextlib.nullcontext()
    with emulate, recorded_launches(execute=execute) as names:
        y = qlora_linear(x, weight, lora_a, lora_b, 2.0, bias, dropout_p=dropout_p, training=True, seed=3)
        forward = tuple(names)
        names.clear()
        torch.autograd.grad(y, (x, lora_a, lora_b, bias), torch.ones_like(y))
        backward = tuple(names)
    return LayerLaunches(m, k, n, r, float(dropout_p), forward, backward, plan)


def report(shapes=REPORT_SHAPES, gpu_sms: int = GPU_SMS) -> list[LayerLaunches]:
    """The launches of each of ``shapes`` ((m, k, n, r, dropout_p)) as a GPU with ``gpu_sms`` SMs plans them."""
    return [layer_launches(*shape, execute=False, gpu_sms=gpu_sms) for shape in shapes]


def _short(names: tuple[str, ...]) -> str:
    counts = Counter(names)
    return ", ".join(f"{name.strip('_').removesuffix('_kernel')}" + (f" x{c}" if c > 1 else "")
                     for name, c in counts.items())


def format_table(rows: list[LayerLaunches]) -> str:
    lines = ["Launches per QLoRA layer (qlora_linear forward, then its backward; recorded from the launch code, "
             f"{rows[0].plan if rows else ''}):",
             f"{'M':>5} {'K':>5} {'N':>5} {'r':>3} {'dropout':>7} | {'fwd':>3} {'bwd':>3} | kernels forward / backward"]
    for row in rows:
        fwd, bwd = row.counts()
        lines.append(f"{row.m:>5} {row.k:>5} {row.n:>5} {row.r:>3} {row.dropout_p:>7g} | {fwd:>3} {bwd:>3} | "
                     f"{_short(row.forward)} / {_short(row.backward)}")
    return "\n".join(lines)
