"""Compile specifications for the static performance layer (``python -m perf static``).

Each kernel module exposes ``compile_specs() -> list[KernelSpec]``: one entry per kernel and per launch
config it can use on a GPU (every autotune config included). ``perf`` compiles each with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` for sm_80 and sm_90, no GPU needed,
and reads registers, spills and shared memory from the cubin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class KernelSpec:
    """One compilable instance of a ``@triton.jit`` kernel.

    ``signature`` maps every argument name to a Triton type string (``"*fp32"``, ``"*u8"``, ``"i64"``,
    ``"fp32"``, or ``"constexpr"``); ``constexprs`` gives each constexpr's value. ``options`` are compile
    options (``num_warps``, ``num_stages``, ``enable_fp_fusion``) exactly as the launcher passes them.
    """

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
