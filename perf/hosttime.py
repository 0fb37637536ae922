"""Host-side (Python) cost of the layer and optimizer steps, with kernel execution stubbed at the Triton boundary.

:func:`stubbed_triton_launches` replaces the ``run`` method of Triton's launch objects (``JITFunction`` on a GPU,
``InterpretedFunction`` under the interpreter, ``Autotuner``) by a no-op for the duration of a ``with`` block:
every launcher still checks its arguments, picks its configs, allocates its outputs and calls ``kernel[grid](...)``,
but no kernel body runs. What remains is exactly the host work a GPU run pays before its kernels execute.

:func:`best_seconds` times a callable as the minimum, over ``rounds``, of the mean of ``inner`` calls: the minimum
filters out preemption on a loaded machine, the mean over ``inner`` calls smooths the clock resolution.

The workloads compared (``layer_workloads``, ``optimizer_workloads``) are shared by ``perf/bench_host.py`` (the
pytest-benchmark file) and ``tests/test_host_overhead.py`` (the default-suite ratio checks).
"""

from __future__ import annotations

import contextlib
import gc
import time
from typing import Callable

import torch
from torch import nn

import qlora


def launch_classes() -> list[type]:
    """Triton's launcher classes whose ``run`` every kernel launch goes through (compiled, interpreted, autotuned):
    what :func:`stubbed_triton_launches` and :func:`perf.launches.recorded_launches` wrap."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return [JITFunction, InterpretedFunction, Autotuner]


@contextlib.contextmanager
def dropping_tables_built_while_stubbed():
    """Within the block kernels may be stubbed: any codebook table that the block adds to the caches of
    ``qlora.kernels.codebook`` was built by a kernel that did not run (uninitialized memory), so those caches are
    cleared on exit if they grew; the rest of the process rebuilds them for real."""
    from qlora.kernels import codebook

    caches = (codebook._normal_float_cached, codebook._dynamic_map_cached)
    sizes = [cache.cache_info().currsize for cache in caches]
    try:
        yield
    finally:
        for cache, size in zip(caches, sizes):
            if cache.cache_info().currsize != size:
                cache.cache_clear()


@contextlib.contextmanager
def stubbed_triton_launches():
    """Within the block, ``kernel[grid](...)`` (and ``kernel.run(...)``) of every Triton kernel does nothing and
    returns None; launches are counted in the yielded dict's ``"launches"`` entry."""
    counter = {"launches": 0}

    def run(self, *args, **kwargs):
        counter["launches"] += 1
        return None

    classes = launch_classes()
    saved = [(cls, cls.__dict__["run"]) for cls in classes if "run" in cls.__dict__]
    for cls, _ in saved:
        cls.run = run
    try:
        with dropping_tables_built_while_stubbed():
            yield counter
    finally:
        for cls, original in saved:
            cls.run = original


def best_seconds(fn: Callable[[], object], rounds: int = 15, inner: int = 20) -> float:
    """Seconds per call of ``fn``: the minimum over ``rounds`` of the mean of ``inner`` back-to-back calls."""
    fn()  # warm caches (autotuner keys, lazily built tables)
    best = float("inf")
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            best = min(best, (time.perf_counter() - t0) / inner)
    finally:
        if gc_was_enabled:
            gc.enable()
    return best


def interleaved_ratio(fn_a: Callable[[], object], fn_b: Callable[[], object], rounds: int = 30,
                      inner: int = 20) -> float:
    """``best_seconds(fn_a) / best_seconds(fn_b)`` with the rounds of the two interleaved, so that a burst of load
    from other processes slows both alike; minima, since load only ever adds time."""
    fn_a()
    fn_b()
    best_a = best_b = float("inf")
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            for fn, which in ((fn_a, 0), (fn_b, 1)):
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                elapsed = (time.perf_counter() - t0) / inner
                if which == 0:
                    best_a = min(best_a, elapsed)
                else:
                    best_b = min(best_b, elapsed)
    finally:
        if gc_was_enabled:
            gc.enable()
    return best_a / best_b


# --- layer ----------------------------------------------------------------------------------------------------

LAYER_SHAPE = dict(m=4, in_features=256, out_features=256, r=8)


class TorchLoRALinear(nn.Module):
    """The plain-torch reference: a frozen ``nn.Linear`` plus ``lora_B(lora_A(x)) * scaling`` under autograd."""

    def __init__(self, in_features: int, out_features: int, r: int, lora_alpha: float, dtype: torch.dtype):
        super().__init__()
        self.base = nn.Linear(in_features, out_features, bias=False, dtype=dtype).requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(r, in_features, dtype=dtype) / in_features**0.5)
        self.lora_B = nn.Parameter(torch.randn(out_features, r, dtype=dtype) / r**0.5)
        self.scaling = lora_alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling


def layer_workloads(dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """``(qlora_step, torch_step)``: one forward + backward of a ``QLoRALinear`` and of :class:`TorchLoRALinear` of
    the same shapes (``LAYER_SHAPE``, r=8, no dropout) on the same input. Build outside the stub (quantization runs
    kernels), call inside it."""
    s = LAYER_SHAPE
    torch.manual_seed(0)
    dense = nn.Linear(s["in_features"], s["out_features"], bias=False, dtype=dtype, device=device)
    layer = qlora.QLoRALinear.from_linear(dense, r=s["r"], lora_alpha=16)
    ref = TorchLoRALinear(s["in_features"], s["out_features"], s["r"], 16, dtype).to(device)
    x = torch.randn(s["m"], s["in_features"], dtype=dtype, device=device, requires_grad=True)

    def run(module):
        def step():
            module(x).sum().backward()
        return step

    return run(layer), run(ref)


# --- optimizers ---------------------------------------------------------------------------------------------

OPTIM_SHAPES = ((16, 512), (512, 16))  # LoRA A and B of rank 16 on a 512-wide layer
OPTIM_NUM_PARAMS = 448  # a 7B model's LoRA tensors (32 layers x 7 projections x A and B)
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def optimizer_params(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """``OPTIM_NUM_PARAMS`` parameters alternating between ``OPTIM_SHAPES``, each with a gradient."""
    g = torch.Generator().manual_seed(0)
    params = []
    for i in range(OPTIM_NUM_PARAMS):
        p = nn.Parameter(torch.randn(OPTIM_SHAPES[i % 2], generator=g, dtype=torch.float32).to(device, dtype))
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float32).to(device, dtype)
        params.append(p)
    return params


OPTIMIZERS = {
    "torch_AdamW_foreach": lambda ps: torch.optim.AdamW(ps, foreach=True, **HYPER),
    "qlora_PagedAdamW_32bit_resident": lambda ps: qlora.PagedAdamW(ps, paging="none", **HYPER),
    "qlora_AdamW8bit": lambda ps: qlora.AdamW8bit(ps, min_8bit_size=4096, **HYPER),
    "qlora_PagedAdamW8bit_host": lambda ps: qlora.PagedAdamW8bit(ps, paging="host", min_paged_size=0,
                                                                  min_8bit_size=4096, **HYPER),
}
