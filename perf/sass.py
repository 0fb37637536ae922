"""Instruction-issue cost model of one NVIDIA build, read from its SASS (``nvdisasm`` of the cubin).

Model (perf/README.md, "The SASS cost model"):

- A **loop** is a backward branch: a ``BRA`` whose target label lies at or before it; its body is every instruction
  from the target to the branch. The **main loop** is the innermost loop (one containing no other) with the most
  tensor-core instructions, ties broken by size; a kernel without a backward branch is its own "iteration" (the
  straight-line program, what one program instance issues once).
- Each instruction is one issue slot of one warp (dual issue does not exist on sm_80/sm_90). A loop iteration of a
  CTA with ``W`` warps issues ``instructions x W`` warp-instructions through the SM's 4 schedulers (one each per
  clock): **issue clocks = instructions x W / 4**, assuming every warp runs the same stream (Triton's layouts
  spread a tile evenly over warps) and nothing else is resident. A second resident CTA doubles issue and MMA work
  alike, so their ratio stands.
- **MMA clocks** = FLOPs of the loop's tensor-core instructions for the whole CTA / tensor FLOP per clock per SM
  (dense BF16/FP16: 4096 on sm_90, 2048 on sm_80). ``HMMA.MNK`` is one warp's ``2*M*N*K`` FLOPs, executed by
  every warp; ``HGMMA.MxNxK`` one warpgroup's (4 warps), executed by every warpgroup.
- **issue_to_mma** = issue clocks / MMA clocks: above 1 the loop cannot keep the tensor cores busy however fast
  memory is. Limits: latency (a loop can be slower than its issue time), throughput differences between classes
  (a few ops, e.g. MUFU, issue at a lower rate), and predicated-off instructions are counted as issued (they are).
- **load_chain**: the latency the issue count leaves out, as a count: the most global loads in one iteration that
  each wait for the previous one's value (a load whose address, or predicate, is computed from an earlier load of
  the same iteration, through registers or shared memory). A chain of L costs an iteration at least L memory
  latencies that only other resident warps can fill; a value loaded in an earlier iteration (prefetched) starts no
  chain.
- **outside_loop**: what a program issues once, besides its loops: the instructions outside every loop from the
  kernel's start to the first ``EXIT`` after its main loop (that one included), per thread. The issue model charges
  the main loop's trips only, which holds where a program runs many of them; a launch of programs that run two
  (the decode GEMV at M = 1) issues this much more per program. Conditional code up to that ``EXIT`` counts whole
  (an upper bound); code past it (a branch that ends in an ``EXIT`` of its own) not at all.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ISSUE_PER_CLOCK = 4  # warp-instructions an SM issues per clock: 4 schedulers, one each (sm_80 and sm_90)
TENSOR_FLOP_PER_CLOCK = {80: 2048, 86: 1024, 89: 1024, 90: 4096}  # dense BF16/FP16, per SM

_INSTR_RE = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:(@!?U?P[0-9T]+)\s+)?([A-Z][A-Z0-9_.x]*)(.*?);")
_LABEL_RE = re.compile(r"^(\.L_x_\d+|\.L_\w+):")
_TARGET_RE = re.compile(r"`\((\.L_\w+)\)")

CLASSES = ("mma", "global_load", "global_load_async", "global_store", "shared_load", "shared_store", "convert",
           "control", "alu")
_CLASS_OF = {
    "HMMA": "mma", "HGMMA": "mma", "IMMA": "mma", "QGMMA": "mma", "BMMA": "mma", "DMMA": "mma",
    "LDG": "global_load", "LD": "global_load",
    "LDGSTS": "global_load_async", "UTMALDG": "global_load_async", "UBLKCP": "global_load_async",
    "STG": "global_store", "ST": "global_store", "RED": "global_store", "ATOM": "global_store",
    "ATOMG": "global_store", "UTMASTG": "global_store",
    "LDS": "shared_load", "LDSM": "shared_load", "STS": "shared_store", "STSM": "shared_store",
    "F2F": "convert", "F2FP": "convert", "F2I": "convert", "I2F": "convert", "I2FP": "convert", "I2I": "convert",
    "FRND": "convert",
    "BRA": "control", "BAR": "control", "EXIT": "control", "RET": "control", "CALL": "control", "BSSY": "control",
    "BSYNC": "control", "WARPSYNC": "control", "DEPBAR": "control", "LDGDEPBAR": "control", "NOP": "control",
    "WARPGROUP": "control", "SYNCS": "control", "ARRIVES": "control", "MEMBAR": "control", "ELECT": "control",
}
_WIDTH_RE = re.compile(r"\.(U8|S8|U16|S16|32|64|128)\b")
_WIDTH_BYTES = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "32": 4, "64": 8, "128": 16}
# General, uniform and predicate registers (RZ, URZ, PT and UPT are constants and never match).
_REGISTER_RE = re.compile(r"(?<![\w.])(U?R\d+|U?P\d)(\.64)?(?![\w])")
_PREDICATE_RE = re.compile(r"U?P(\d|T)")
# Classes whose instructions write no register (their first operand is read: an address, a barrier, a branch
# target), except ELECT (a control op with a predicate and a register result), and three such opcodes of class alu.
_NO_RESULT_CLASSES = ("control", "global_store", "shared_store", "global_load_async")
_NO_RESULT_ALU = {"ERRBAR", "CCTL", "FENCE"}


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with modifiers: "LDG.E.U8", "HGMMA.64x64x16.F32.BF16"
    operands: str
    predicate: str | None = None

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]

    @property
    def klass(self) -> str:
        return _CLASS_OF.get(self.base, "alu")

    def memory_width(self) -> int | None:
        """Bytes per thread of a load or store (4 when the opcode names no width), None for other classes."""
        if self.klass not in ("global_load", "global_load_async", "global_store", "shared_load", "shared_store"):
            return None
        widths = [_WIDTH_BYTES[w] for w in _WIDTH_RE.findall(self.opcode)]
        return max(widths) if widths else 4

    def _operands(self) -> list[str]:
        return [op.strip() for op in self.operands.split(",") if op.strip()]

    def _result_operands(self) -> int:
        """How many leading operands this instruction writes: its first (none for stores, branches and barriers)
        and the predicates that follow it (carry or second comparison outputs: ``IADD3 R40, P0, ...``,
        ``ISETP... P0, PT, ...``; ``SHFL.IDX PT, R5, ...`` writes both of its first two)."""
        if (self.klass in _NO_RESULT_CLASSES and self.base != "ELECT") or self.base in _NO_RESULT_ALU:
            return 0
        ops = self._operands()
        lead = 2 if self.base == "SHFL" else 1
        while lead < len(ops) and _PREDICATE_RE.fullmatch(ops[lead]):
            lead += 1
        return min(lead, len(ops))

    def written(self) -> list[str]:
        """Registers this instruction writes (:meth:`_result_operands`): a vector load's whole register range, a
        64-bit result's pair."""
        regs = []
        for op in self._operands()[:self._result_operands()]:
            m = _REGISTER_RE.fullmatch(op)
            if m is None:
                continue
            count = 1
            if m.group(1).startswith(("R", "UR")):
                matrices = re.search(r"^LDSM\..*\.(\d)$", self.opcode)  # LDSM.16.M88.4: four registers
                if matrices:
                    count = int(matrices.group(1))
                elif self.klass in ("global_load", "shared_load"):
                    count = max(1, self.memory_width() // 4)
                elif ".WIDE" in self.opcode or re.search(r"\.64\b", self.opcode):
                    count = 2
            regs += _register_range(m.group(1), count)
        return regs

    def read(self) -> list[str]:
        """Registers this instruction reads: its guard predicate and every register operand after its results (a
        64-bit address ``[R40.64]`` reads R40 and R41); an MMA also reads its accumulator."""
        regs = [self.predicate.lstrip("@!")] if self.predicate else []
        for op in self._operands()[self._result_operands():]:
            for m in _REGISTER_RE.finditer(op):
                regs += _register_range(m.group(1), 2 if m.group(2) else 1)
        if self.klass == "mma":
            regs += self.written()
        return regs

    def mma_flops(self, num_warps: int) -> int:
        """FLOPs this instruction does for a whole CTA of ``num_warps`` warps (0 unless a tensor-core op)."""
        if self.base == "HGMMA":
            m = re.search(r"HGMMA\.(\d+)x(\d+)x(\d+)", self.opcode)
            if not m:
                raise ValueError(f"cannot read the shape of {self.opcode}")
            mm, nn, kk = map(int, m.groups())
            return 2 * mm * nn * kk * max(1, num_warps // 4)
        if self.base == "HMMA":
            m = re.search(r"HMMA\.(\d{2})(\d)(\d{1,2})\b", self.opcode)
            if not m:
                raise ValueError(f"cannot read the shape of {self.opcode}")
            mm, nn, kk = map(int, m.groups())
            return 2 * mm * nn * kk * num_warps
        return 0


def _register_range(name: str, count: int) -> list[str]:
    m = re.fullmatch(r"(U?[RP])(\d+)", name)
    return [f"{m.group(1)}{int(m.group(2)) + i}" for i in range(count)]


def load_chain(body: list[Instruction]) -> int:
    """The most global loads on one dependence chain in one pass over ``body`` (a loop iteration): a load's level
    is 1 + the highest level among the values it reads (address registers and guard predicate); other instructions
    pass on the highest level they read; a shared-memory store passes its value's level to every later shared
    load. Registers not yet written in the pass hold level 0 (loaded before the loop or in an earlier iteration)."""
    level: dict[str, int] = {}
    shared = 0
    longest = 0
    for ins in body:
        here = max((level.get(r, 0) for r in ins.read()), default=0)
        if ins.klass == "global_load":
            here += 1
            longest = max(longest, here)
        elif ins.klass == "shared_store":
            shared = max(shared, here)
        elif ins.klass == "shared_load":
            here = max(here, shared)
        for r in ins.written():
            level[r] = here
    return longest


@dataclass
class Sass:
    instructions: list[Instruction]
    labels: dict[str, int]  # label -> address of the instruction after it

    def loops(self) -> list[tuple[int, int]]:
        """(first, last) instruction indices of every backward branch's body, in program order."""
        index_of = {ins.address: i for i, ins in enumerate(self.instructions)}
        out = []
        for i, ins in enumerate(self.instructions):
            if ins.base != "BRA":
                continue
            m = _TARGET_RE.search(ins.operands)
            if not m or m.group(1) not in self.labels:
                continue
            target = self.labels[m.group(1)]
            # A branch to itself is the trap loop ptxas puts after EXIT, not a loop of the kernel.
            if target < ins.address and target in index_of:
                out.append((index_of[target], i))
        return sorted(set(out))


def parse_sass(text: str) -> Sass:
    """``nvdisasm -c`` output of a one-kernel cubin -> instructions and label addresses."""
    instructions: list[Instruction] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    for line in text.splitlines():
        m = _LABEL_RE.match(line.strip())
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR_RE.match(line)
        if not m:
            continue
        ins = Instruction(int(m.group(1), 16), m.group(3), m.group(4).strip(), m.group(2))
        for label in pending:
            labels[label] = ins.address
        pending = []
        instructions.append(ins)
    return Sass(instructions, labels)


def nvdisasm_path() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"


def disassemble(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(nvdisasm_path()), "-c", f.name], check=True, capture_output=True,
                              text=True).stdout


@dataclass
class LoopModel:
    """The main loop of one build (or the whole program when it has no loop) under the issue model."""

    has_loop: bool
    loops: int  # backward branches in the kernel
    instructions: int  # per iteration, per thread (= per warp)
    by_class: dict[str, int] = field(default_factory=dict)
    by_opcode: dict[str, int] = field(default_factory=dict)  # base opcode -> count, largest first
    memory_ops: dict[str, int] = field(default_factory=dict)  # full load/store opcode -> count
    issue_clocks: float = 0.0  # per CTA iteration
    mma_flops: int = 0  # per CTA iteration
    mma_clocks: float = 0.0
    issue_to_mma: float | None = None  # None without tensor-core work in the loop
    mma_in_kernel: bool = False  # any tensor-core instruction anywhere in the kernel
    instructions_total: int = 0  # whole kernel, static
    # The loop waits for all of its warpgroup MMAs (``WARPGROUP.DEPBAR.LE gsb0, 0x0``): the iteration's
    # tensor-core work ends before its warps issue anything more (Triton does so when an MMA operand is written to
    # shared memory from registers in the loop); a pipelined loop waits for all but one group (``0x1``).
    mma_waits_in_loop: bool = False
    load_chain: int = 0  # dependent global loads on the longest chain of one iteration (:func:`load_chain`)
    outside_loop: int | None = None  # per thread, issued once per program (:func:`outside_loop`); None without loop


def model(sass: Sass, num_warps: int, arch: int) -> LoopModel:
    """Issue/MMA model of the main loop of ``sass`` for a CTA of ``num_warps`` warps on ``sm_{arch}``."""
    loops = sass.loops()
    innermost = [(a, b) for (a, b) in loops
                 if not any((c, d) != (a, b) and a <= c and d <= b for (c, d) in loops)]
    instrs = sass.instructions
    if innermost:
        # The loop with the most tensor work per iteration (FLOPs, then MMA instructions, then length): a kernel's
        # side loops (the decode GEMV's u = x A^T in column tile 0) can hold as many, smaller, MMA instructions.
        def rank(span):
            body = instrs[span[0]:span[1] + 1]
            return (sum(ins.mma_flops(num_warps) for ins in body), sum(ins.klass == "mma" for ins in body),
                    len(body))

        first, last = max(innermost, key=rank)
        body = instrs[first:last + 1]
        once = outside_loop(sass, loops, last)
    else:
        once = None
        body = [ins for ins in instrs if ins.base != "NOP"]  # the tail padding after EXIT is not issued
    by_class = {c: 0 for c in CLASSES}
    by_opcode: dict[str, int] = {}
    memory: dict[str, int] = {}
    flops = 0
    for ins in body:
        by_class[ins.klass] += 1
        by_opcode[ins.base] = by_opcode.get(ins.base, 0) + 1
        if ins.memory_width() is not None:
            memory[ins.opcode] = memory.get(ins.opcode, 0) + 1
        flops += ins.mma_flops(num_warps)
    issue = len(body) * num_warps / ISSUE_PER_CLOCK
    per_clock = TENSOR_FLOP_PER_CLOCK.get(arch)
    mma_clocks = flops / per_clock if per_clock and flops else 0.0
    return LoopModel(
        has_loop=bool(innermost), loops=len(loops), instructions=len(body), by_class=by_class,
        by_opcode=dict(sorted(by_opcode.items(), key=lambda kv: (-kv[1], kv[0]))), memory_ops=memory,
        issue_clocks=issue, mma_flops=flops, mma_clocks=mma_clocks,
        issue_to_mma=issue / mma_clocks if mma_clocks else None,
        mma_in_kernel=any(ins.klass == "mma" for ins in instrs),
        instructions_total=sum(ins.base != "NOP" for ins in instrs),
        mma_waits_in_loop=bool(innermost) and any(_waits_for_all_mma(ins) for ins in body),
        load_chain=load_chain(body), outside_loop=once,
    )


def outside_loop(sass: Sass, loops: list[tuple[int, int]], main_last: int) -> int:
    """Instructions outside every loop of ``sass`` (``loops``: :meth:`Sass.loops`) from its start to the first
    ``EXIT`` after index ``main_last`` (the main loop's backward branch), that ``EXIT`` included and tail ``NOP`` s
    not: what one program issues once per thread besides its loops (module docstring)."""
    instrs = sass.instructions
    in_loops = {i for first, last in loops for i in range(first, last + 1)}
    end = next((i for i in range(main_last + 1, len(instrs)) if instrs[i].base == "EXIT"), len(instrs) - 1)
    return sum(1 for i in range(end + 1) if i not in in_loops and instrs[i].base != "NOP")


def _waits_for_all_mma(ins: Instruction) -> bool:
    """``WARPGROUP.DEPBAR.LE gsb0, 0x0``: wait until no warpgroup MMA of this warp is outstanding."""
    return ins.opcode.startswith("WARPGROUP.DEPBAR") and re.fullmatch(r"gsb0\s*,\s*0x0\s*;?", ins.operands.strip())

