"""Static layer of the performance tracking: build every kernel as a launch would, for real GPUs, no GPU needed.

For each ``KernelSpec`` that a ``qlora.kernels`` module lists in ``compile_specs()``, and for each target
(:data:`TARGETS`: sm_80, sm_90, gfx942, gfx90a):

1. **As launched.** The spec's launch (pointer dtypes, scalar values from ``KernelSpec.launch_values()``,
   constexprs, options) goes through Triton's own specialization (``perf/specialize.py``): ints equal to 1 become
   constants, multiples of 16 are marked divisible by 16, exactly as ``kernel[grid](...)`` would compile it.
2. ``triton.compile`` for the target (Triton's cache makes a repeated build cheap).
3. NVIDIA: registers and spill/stack bytes from ``cuobjdump --dump-resource-usage`` (ptxas puts spills in the
   stack frame on sm_80+; Triton kernels have neither local arrays nor calls, so both count as spill), shared
   memory from the compiled metadata, tensor-core instructions from the PTX, and the SASS cost model of
   ``perf/sass.py`` (main-loop instructions by class, issue_to_mma, instructions per weight element) plus the
   widest load of the packed weight (``perf/loads.py``).
   AMD: VGPRs, AGPRs, SGPRs, scratch (private segment: spills) and spill counts from the amdgcn's metadata, LDS
   from the compiled metadata, ``v_mfma`` present.

It must run in a process where ``qlora`` was imported with the interpreter off (``QLORA_INTERPRET=0``);
``python -m perf static`` takes care of that.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

# name -> (backend, arch, warp size)
TARGETS = {"sm_80": ("cuda", 80, 32), "sm_90": ("cuda", 90, 32), "gfx942": ("hip", "gfx942", 64),
           "gfx90a": ("hip", "gfx90a", 64)}
NVIDIA_TARGETS = ("sm_80", "sm_90")
ARCHS = (80, 90)  # kept for callers of the NVIDIA-only API
_RESOURCE_RE = re.compile(r"Function\s+(\S+):\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_AMD_META = {"vgpr_count": "vgprs", "agpr_count": "agprs", "sgpr_count": "sgprs",
             "private_segment_fixed_size": "scratch_bytes", "vgpr_spill_count": "vgpr_spills",
             "sgpr_spill_count": "sgpr_spills"}


@dataclass(frozen=True)
class StaticResult:
    """What the compiler made of one kernel spec on one target. Fields a target does not have are None."""

    module: str
    name: str
    target: str  # "sm_80", "sm_90", "gfx942", "gfx90a"
    kernel: str  # the @triton.jit function's name
    num_warps: int
    num_stages: int | None
    config: dict  # every BLOCK_*/GROUP_*/SPLIT_* constexpr
    regime: str | None
    launch: str  # "explicit" (the spec gives every scalar) or "inferred" (naming convention, kernels/_static.py)
    specialization: dict  # arg -> "constexpr=1" | "i32 div16" | ...
    registers: int  # NVIDIA: registers per thread; AMD: VGPRs (arch VGPRs; AGPRs separately)
    spill_bytes: int  # NVIDIA: local + stack bytes; AMD: scratch (private segment) bytes
    shared_bytes: int  # shared memory / LDS per CTA
    mma: bool  # mma.sync (sm_80/sm_90), v_mfma (AMD)
    wgmma: bool
    stack_bytes: int | None = None
    sgprs: int | None = None
    agprs: int | None = None
    # SASS cost model (NVIDIA only)
    loop: bool | None = None
    loop_instructions: int | None = None
    loop_by_class: dict | None = None
    loop_top_opcodes: dict | None = None
    loop_memory_ops: dict | None = None
    issue_clocks: float | None = None
    mma_clocks: float | None = None
    issue_to_mma: float | None = None
    weight_elements_per_iteration: int | None = None
    instr_per_weight_element: float | None = None
    weight_load_bytes: int | None = None
    weight_load_async: bool | None = None
    weight_load_kind: str | None = None
    kernel_instructions: int | None = None
    mma_waits_in_loop: bool | None = None  # the main loop waits for all its warpgroup MMAs (perf/sass.py)
    load_chain: int | None = None  # dependent global loads on the main loop's longest chain (perf/sass.py)
    outside_loop: int | None = None  # per thread, issued once per program besides its loops (perf/sass.py)
    artifacts: dict | None = field(default=None, compare=False)  # filled only for --dump; not in reports

    @property
    def key(self) -> str:
        return f"{self.module}.{self.name}@{self.target}"

    @property
    def arch(self) -> int | str:
        return TARGETS[self.target][1]


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

    names = sorted(m.name for m in pkgutil.iter_modules(kernels_pkg.__path__) if not m.name.startswith("_"))
    if module_filter and module_filter not in names:
        raise ValueError(f"module must be one of {names}, got {module_filter!r}")
    found = []
    for name in names:
        if module_filter and name != module_filter:
            continue
        specs = getattr(importlib.import_module(f"qlora.kernels.{name}"), "compile_specs", None)
        if specs is None:
            continue
        for spec in specs():
            found.append((name, spec))
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


def parse_amdgcn_metadata(amdgcn: str) -> dict[str, int]:
    """The kernel's resource figures from the ``.amdgpu_metadata`` block of an amdgcn listing:
    {vgprs, agprs, sgprs, scratch_bytes, vgpr_spills, sgpr_spills}."""
    out = {}
    for key, name in _AMD_META.items():
        m = re.search(rf"^\s*(?:- )?\.{key}:\s+(\d+)\s*$", amdgcn, re.MULTILINE)
        if m is None:
            raise RuntimeError(f"no .{key} in the amdgcn metadata")
        out[name] = int(m.group(1))
    return out


def _config(spec) -> dict:
    return {k: v for k, v in spec.constexprs.items() if k.startswith(("BLOCK", "GROUP", "SPLIT"))}


def _target(name: str):
    from triton.backends.compiler import GPUTarget

    if name not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {name!r}")
    return GPUTarget(*TARGETS[name])


def compile_spec(module_name: str, spec, arch: int | str, dump: bool = False) -> StaticResult:
    """Build one spec as launched for ``arch`` (a target name such as ``"sm_90"``/``"gfx942"``, or an int
    NVIDIA compute capability) and measure it; ``dump`` keeps the binary and its listings in ``artifacts``."""
    _require_compiled_mode()
    import triton
    from triton.compiler import ASTSource

    from . import loads, sass
    from .specialize import specialize_spec

    target_name = f"sm_{arch}" if isinstance(arch, int) else arch
    target = _target(target_name)
    spec_ = specialize_spec(spec, target)
    src = ASTSource(fn=spec.fn, signature=spec_.signature, constexprs=spec_.constexprs, attrs=spec_.attrs)
    compiled = triton.compile(src, target=target, options=dict(spec_.options.__dict__))
    options = spec_.options
    common = dict(
        module=module_name, name=spec.name, target=target_name, kernel=spec.fn.__name__,
        num_warps=int(options.num_warps), num_stages=getattr(options, "num_stages", None), config=_config(spec),
        regime=spec.regime, launch="inferred" if spec.launch_inferred else "explicit",
        specialization=spec_.summary(), shared_bytes=int(compiled.metadata.shared),
    )
    if target.backend == "hip":
        amdgcn = compiled.asm["amdgcn"]
        meta = parse_amdgcn_metadata(amdgcn)
        artifacts = ({"hsaco": compiled.asm["hsaco"], "amdgcn": amdgcn, "ttgir": compiled.asm["ttgir"]}
                     if dump else None)
        return StaticResult(**common, registers=meta["vgprs"], agprs=meta["agprs"], sgprs=meta["sgprs"],
                            spill_bytes=meta["scratch_bytes"], mma="v_mfma" in amdgcn, wgmma=False,
                            artifacts=artifacts)

    cubin = compiled.asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        dump_text = subprocess.run([str(cuobjdump_path()), "--dump-resource-usage", f.name],
                                   check=True, capture_output=True, text=True).stdout
    usage = parse_resource_usage(dump_text)
    if len(usage) != 1:
        raise RuntimeError(f"expected one function in the cubin of {spec.name}, cuobjdump reported {sorted(usage)}")
    (fn_usage,) = usage.values()
    ptx = compiled.asm["ptx"]
    sass_text = sass.disassemble(cubin)
    loop = sass.model(sass.parse_sass(sass_text), common["num_warps"], target.arch)
    elements = spec.weight_elements()
    weight_load = None
    weight_arg = spec.packed_weight_arg()
    if weight_arg is not None:
        runtime_args = [a for a, kind in spec_.signature.items() if kind != "constexpr"]
        if weight_arg in runtime_args:
            weight_load = loads.widest_load_of(compiled.asm["llir"], runtime_args.index(weight_arg))
    per_element = (loop.instructions * common["num_warps"] * 32 / elements) if elements else None
    artifacts = {"cubin": cubin, "sass": sass_text, "ttgir": compiled.asm["ttgir"]} if dump else None
    return StaticResult(
        **common, registers=fn_usage["registers"], spill_bytes=fn_usage["local"] + fn_usage["stack"],
        stack_bytes=fn_usage["stack"], mma="mma.sync" in ptx, wgmma="wgmma.mma_async" in ptx,
        loop=loop.has_loop, loop_instructions=loop.instructions, loop_by_class=loop.by_class,
        loop_top_opcodes=dict(list(loop.by_opcode.items())[:8]), loop_memory_ops=loop.memory_ops,
        issue_clocks=loop.issue_clocks, mma_clocks=loop.mma_clocks or None,
        issue_to_mma=None if loop.issue_to_mma is None else round(loop.issue_to_mma, 3),
        weight_elements_per_iteration=elements or None,
        instr_per_weight_element=None if per_element is None else round(per_element, 2),
        weight_load_bytes=None if weight_load is None else weight_load.bytes_per_thread,
        weight_load_async=None if weight_load is None else weight_load.asynchronous,
        weight_load_kind=None if weight_load is None else weight_load.kind,
        kernel_instructions=loop.instructions_total, mma_waits_in_loop=loop.mma_waits_in_loop,
        load_chain=loop.load_chain, outside_loop=loop.outside_loop, artifacts=artifacts,
    )


def _compile_job(job):
    module_name, index, target, dump = job
    specs = [s for m, s in discover_specs(module_name)]
    try:
        return compile_spec(module_name, specs[index], target, dump)
    except Exception as err:  # one failed build is reported with its error, not fatal to the report
        return BuildFailure(module_name, specs[index].name, target, _root_cause(err))


def _root_cause(err: BaseException) -> str:
    """``Type: message`` of the innermost cause (a CompilationError's own text is the source excerpt)."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = [ln for ln in str(err).splitlines() if ln.strip() and ln.strip() != "^"]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"[:500]


@dataclass(frozen=True)
class BuildFailure:
    module: str
    name: str
    target: str
    error: str

    @property
    def key(self) -> str:
        return f"{self.module}.{self.name}@{self.target}"


def run(module_filter: str | None = None, targets=tuple(TARGETS), jobs: int | None = None,
        dump: bool = False, names: str | None = None) -> tuple[list[StaticResult], list[BuildFailure]]:
    """Build every spec (or those whose name contains ``names``) for every target with ``jobs`` worker processes
    (default: CPU count, at most 4). Returns the results and the builds that failed."""
    for t in targets:
        _target(t)
    specs = discover_specs(module_filter)
    work = []
    per_module: dict[str, int] = {}
    for module_name, spec in specs:
        index = per_module.get(module_name, 0)
        per_module[module_name] = index + 1
        if names and names not in spec.name:
            continue
        work.extend((module_name, index, t, dump) for t in targets if spec.targets is None or t in spec.targets)
    jobs = jobs or min(4, os.cpu_count() or 1)
    if jobs <= 1 or len(work) <= 1:
        out = [_compile_job(job) for job in work]
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            out = list(pool.map(_compile_job, work))
    return [r for r in out if isinstance(r, StaticResult)], [r for r in out if isinstance(r, BuildFailure)]


def as_rows(results: list[StaticResult]) -> list[dict]:
    rows = []
    for r in results:
        row = asdict(r)
        row.pop("artifacts")
        rows.append(dict(row, key=r.key))
    return rows


def write_dump(results: list[StaticResult], out_dir: Path) -> list[Path]:
    """Per build: the binary, its disassembly, the ttgir and a JSON record (perf/README.md)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for r, row in zip(results, as_rows(results)):
        stem = out_dir / f"{r.module}.{r.name}@{r.target}"
        arts = r.artifacts or {}
        for ext, key in (("cubin", "cubin"), ("sass", "sass"), ("hsaco", "hsaco"), ("amdgcn", "amdgcn"),
                         ("ttgir", "ttgir")):
            if key in arts:
                path = stem.with_name(stem.name + "." + ext)
                data = arts[key]
                path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
                written.append(path)
        path = stem.with_name(stem.name + ".json")
        path.write_text(json.dumps(row, indent=1) + "\n")
        written.append(path)
    return written


def _fmt(value, spec="") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "-"
    return format(value, spec)


def format_table(results: list[StaticResult]) -> str:
    header = ("kernel", "target", "warps", "regs", "sgpr", "spill B", "smem B", "mma", "loop instr",
              "outside", "instr/elem", "issue/mma", "ld chain", "w-load", "launch")
    rows = []
    for r in results:
        wload = "-" if r.weight_load_bytes is None else (
            f"{r.weight_load_bytes}B {'async' if r.weight_load_async else 'sync'}")
        loop = "-" if r.loop_instructions is None else f"{r.loop_instructions}{'' if r.loop else ' (no loop)'}"
        rows.append((f"{r.module}.{r.name}", r.target, str(r.num_warps), str(r.registers), _fmt(r.sgprs),
                     str(r.spill_bytes), str(r.shared_bytes),
                     "wgmma" if r.wgmma else ("mma" if r.mma else "-"), loop, _fmt(r.outside_loop),
                     _fmt(r.instr_per_weight_element, ".1f"), _fmt(r.issue_to_mma, ".2f"), _fmt(r.load_chain),
                     wload, r.launch))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
