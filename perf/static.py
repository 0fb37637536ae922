"""Static layer of the performance tracking: compile every kernel for real GPUs, no GPU needed.

For each ``KernelSpec`` that a ``qlora.kernels`` module lists in ``compile_specs()``, and for each target
architecture (sm_80, sm_90), this compiles the kernel with ``triton.compile(ASTSource(...), target=GPUTarget(...))``
and reads from the result:

- registers per thread, spill bytes and stack bytes, from ``cuobjdump --dump-resource-usage`` (ptxas puts spills
  in the stack frame on sm_80+, so local and stack bytes both count as spill: Triton kernels have neither local
  arrays nor calls);
- static shared memory, from the compiled metadata;
- whether the PTX issues tensor-core instructions (``mma.sync`` on sm_80, ``wgmma`` on sm_90).

Pointer arguments are compiled with the 16-byte divisibility hint a real launch of a fresh torch allocation gets,
so vectorization matches what a GPU launch would compile.

It must run in a process where ``qlora`` was imported with the interpreter off (``QLORA_INTERPRET=0``);
``python -m perf static`` takes care of that.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ARCHS = (80, 90)
_RESOURCE_RE = re.compile(r"Function\s+(\S+):\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclass(frozen=True)
class StaticResult:
    """What the compiler made of one kernel spec on one architecture."""

    module: str
    name: str
    arch: int
    registers: int
    spill_bytes: int  # local memory plus stack frame: a Triton kernel has no local arrays or calls, so both are spills
    stack_bytes: int
    shared_bytes: int
    num_warps: int
    mma: bool
    wgmma: bool

    @property
    def key(self) -> str:
        return f"{self.module}.{self.name}@sm_{self.arch}"


def _require_compiled_mode() -> None:
    import qlora  # decides the mode from QLORA_INTERPRET / TRITON_INTERPRET before any kernel is decorated

    if qlora.interpreter_active():
        raise RuntimeError(
            "the static report compiles kernels for GPUs and needs qlora imported with QLORA_INTERPRET=0; "
            "run it as `python -m perf static`"
        )


def discover_specs(module_filter: str | None = None):
    """All ``(module_name, KernelSpec)`` pairs of the kernel modules, in a stable order."""
    _require_compiled_mode()
    import qlora.kernels as kernels_pkg

    found = []
    for info in sorted(pkgutil.iter_modules(kernels_pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        if module_filter and info.name != module_filter:
            continue
        module = importlib.import_module(f"qlora.kernels.{info.name}")
        specs = getattr(module, "compile_specs", None)
        if specs is None:
            continue
        for spec in specs():
            found.append((info.name, spec))
    return found


def cuobjdump_path() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump --dump-resource-usage`` output -> {function: {registers, stack, shared, local}}."""
    usage = {}
    for name, reg, stack, shared, local in _RESOURCE_RE.findall(text):
        usage[name] = {"registers": int(reg), "stack": int(stack), "shared": int(shared), "local": int(local)}
    return usage


def compile_spec(module_name: str, spec, arch: int) -> StaticResult:
    """Compile one spec for ``sm_{arch}`` and measure it."""
    _require_compiled_mode()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arg_names = list(spec.fn.arg_names)
    attrs = {
        (arg_names.index(arg),): [["tt.divisibility", 16]]
        for arg, kind in spec.signature.items()
        if kind.startswith("*")
    }
    src = ASTSource(fn=spec.fn, signature=dict(spec.signature), constexprs=dict(spec.constexprs), attrs=attrs)
    options = {"num_warps": 4, **spec.options}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        dump = subprocess.run(
            [str(cuobjdump_path()), "--dump-resource-usage", cubin.name],
            check=True, capture_output=True, text=True,
        ).stdout
    usage = parse_resource_usage(dump)
    if len(usage) != 1:
        raise RuntimeError(f"expected one function in the cubin of {spec.name}, cuobjdump reported {sorted(usage)}")
    (fn_usage,) = usage.values()
    ptx = compiled.asm["ptx"]
    return StaticResult(
        module=module_name,
        name=spec.name,
        arch=arch,
        registers=fn_usage["registers"],
        spill_bytes=fn_usage["local"] + fn_usage["stack"],
        stack_bytes=fn_usage["stack"],
        shared_bytes=int(compiled.metadata.shared),
        num_warps=int(options["num_warps"]),
        mma="mma.sync" in ptx,
        wgmma="wgmma.mma_async" in ptx,
    )


def _compile_job(job):
    module_name, index, arch = job
    specs = [s for m, s in discover_specs(module_name)]
    return compile_spec(module_name, specs[index], arch)


def run(module_filter: str | None = None, archs=ARCHS, jobs: int | None = None) -> list[StaticResult]:
    """Compile every spec for every arch; ``jobs`` worker processes (default: CPU count, at most 4)."""
    specs = discover_specs(module_filter)
    work = []
    per_module: dict[str, int] = {}
    for module_name, _ in specs:
        index = per_module.get(module_name, 0)
        per_module[module_name] = index + 1
        work.extend((module_name, index, arch) for arch in archs)
    jobs = jobs or min(4, os.cpu_count() or 1)
    if jobs <= 1 or len(work) <= 1:
        return [_compile_job(job) for job in work]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_job, work))


def as_rows(results: list[StaticResult]) -> list[dict]:
    return [dict(asdict(r), key=r.key) for r in results]


def format_table(results: list[StaticResult]) -> str:
    header = ("kernel", "arch", "warps", "regs", "spill B", "stack B", "smem B", "mma", "wgmma")
    rows = [
        (f"{r.module}.{r.name}", f"sm_{r.arch}", str(r.num_warps), str(r.registers), str(r.spill_bytes),
         str(r.stack_bytes), str(r.shared_bytes), "yes" if r.mma else "-", "yes" if r.wgmma else "-")
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
