"""Which global loads of an NVIDIA build read a given kernel argument, how wide they are and whether they are async.

Read from the LLVM IR Triton generates (``compiled.asm["llir"]``), which is in SSA form: every global load
(Triton's inline-asm ``ld.global``/``cp.async``/``cp.async.bulk.tensor``, or a plain LLVM ``load`` from
``addrspace(1)``) takes a pointer whose definition chain (``getelementptr``, ``phi``, ``select``...) ends at the
kernel's parameters. The pointer parameters that chain reaches are the tensors the load reads. The IR keeps the
vector width the PTX will have (``ld.global.v4.b32`` = 16 bytes per thread); ``ptxas`` does not widen loads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_DEFINE_RE = re.compile(r"^define\b[^(]*@[\w.$]+\((.*)\)[^)]*\{\s*$")
_ASSIGN_RE = re.compile(r"^\s*(%[\w.]+)\s*=\s*(.*)$")
_VALUE_RE = re.compile(r"%[\w.]+")
_GLOBAL_PTR_RE = re.compile(r"ptr addrspace\(1\)\s+(?:[a-z_]+(?:\([^)]*\))?\s+)*(%[\w.]+)")
_LD_RE = re.compile(r"ld\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[bsuf](\d+)")
_CP_ASYNC_RE = re.compile(r"cp\.async\.c[ag]\.shared\.global[^,]*,[^,]*,\s*(0x[0-9a-f]+|\d+)")
_LLVM_LOAD_RE = re.compile(r"^load\s+(<(\d+) x (\w+)>|\w+),\s*ptr addrspace\(1\)\s+(%[\w.]+)")
_SCALAR_BYTES = {"i8": 1, "i16": 2, "half": 2, "bfloat": 2, "i32": 4, "float": 4, "i64": 8, "double": 8}


@dataclass(frozen=True)
class GlobalLoad:
    bytes_per_thread: int
    asynchronous: bool  # cp.async (LDGSTS) or TMA: the copy overlaps with the issuing warp's work
    kind: str  # "ld.global", "cp.async", "tma", "load"
    params: frozenset[int]  # indices of the pointer parameters the address derives from


def _definitions(lines: list[str]) -> dict[str, list[str]]:
    defs: dict[str, list[str]] = {}
    for line in lines:
        m = _ASSIGN_RE.match(line)
        if m:
            defs.setdefault(m.group(1), []).extend(_VALUE_RE.findall(m.group(2)))
    return defs


def _reach(start: str, defs: dict[str, list[str]], params: dict[str, int]) -> frozenset[int]:
    seen, stack, found = set(), [start], set()
    while stack:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        if value in params:
            found.add(params[value])
        stack.extend(defs.get(value, ()))
    return frozenset(found)


def global_loads(llir: str) -> list[GlobalLoad]:
    """Every global load of the (one) kernel in ``llir`` with the parameters its address derives from."""
    lines = llir.splitlines()
    params: dict[str, int] = {}
    for line in lines:
        m = _DEFINE_RE.match(line)
        if m:
            for i, decl in enumerate(m.group(1).split(",")):
                names = _VALUE_RE.findall(decl)
                if names and decl.strip().startswith("ptr"):  # index arithmetic reaches int params too: skip them
                    params[names[-1]] = i
            break
    defs = _definitions(lines)
    out = []
    for line in lines:
        m = _ASSIGN_RE.match(line)
        rhs = m.group(2) if m else line.strip()
        if "asm" in rhs and ("ld.global" in rhs or "cp.async" in rhs):
            pointers = _GLOBAL_PTR_RE.findall(rhs.split('"', 4)[-1] if rhs.count('"') >= 4 else rhs)
            if "cp.async.bulk.tensor" in rhs:
                kind, width, is_async = "tma", 0, True
            elif (cp := _CP_ASYNC_RE.search(rhs)) is not None:
                kind, width, is_async = "cp.async", int(cp.group(1), 0), True
            elif (ld := _LD_RE.search(rhs)) is not None:
                kind, width, is_async = "ld.global", int(ld.group(1) or 1) * int(ld.group(2)) // 8, False
            else:
                continue
            reached = frozenset().union(*(_reach(p, defs, params) for p in pointers)) if pointers else frozenset()
            out.append(GlobalLoad(width, is_async, kind, reached))
        elif "llvm.nvvm.cp.async.bulk.tensor" in rhs and "global" not in rhs.split("(")[0]:
            reached = frozenset().union(*(_reach(p, defs, params) for p in _VALUE_RE.findall(rhs)))
            out.append(GlobalLoad(0, True, "tma", reached))
        else:
            ld = _LLVM_LOAD_RE.match(rhs)
            if ld:
                count = int(ld.group(2) or 1)
                scalar = ld.group(3) or ld.group(1)
                out.append(GlobalLoad(count * _SCALAR_BYTES.get(scalar, 4), False, "load",
                                      _reach(ld.group(4), defs, params)))
    return out


def widest_load_of(llir: str, param_index: int) -> GlobalLoad | None:
    """The widest global load whose address derives from LLVM parameter ``param_index`` (async preferred on a tie),
    None when no load reads it."""
    loads = [ld for ld in global_loads(llir) if param_index in ld.params]
    if not loads:
        return None
    return max(loads, key=lambda ld: (ld.bytes_per_thread, ld.asynchronous))
