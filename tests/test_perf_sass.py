"""The SASS issue model (perf/sass.py), the packed-load tracer (perf/loads.py) and the amdgcn metadata reader on
hand-written listings whose counts are worked out here by hand; no compiler involved."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from perf import loads, sass  # noqa: E402
from perf.static import parse_amdgcn_metadata  # noqa: E402

# A prologue of 2, a loop body of 8 (.L_x_1 .. the backward BRA) holding 2 HGMMA.64x64x16, one LDG.E.U8, one
# LDGSTS.E.BYPASS.128, one F2FP, one FSEL, one LOP3; a forward branch out; EXIT; the trap self-loop; NOP padding.
_SASS = textwrap.dedent("""
    _k:
            /*0000*/                   LDC R1, c[0x0][0x28] ;
            /*0010*/               @P0 BRA `(.L_x_0) ;
    .L_x_1:
            /*0020*/                   LDG.E.U8 R4, desc[UR4][R2.64] ;
            /*0030*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR4][R6.64], P1 ;
            /*0040*/                   FSEL R7, R8, R9, P2 ;
            /*0050*/                   LOP3.LUT R10, R4, 0xf, RZ, 0xc0, !PT ;
            /*0060*/                   F2FP.BF16.F32.PACK_AB R11, R7, R7 ;
            /*0070*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
            /*0080*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], R24, gsb0 ;
            /*0090*/              @!P3 BRA `(.L_x_1) ;
    .L_x_0:
            /*00a0*/                   EXIT ;
    .L_x_2:
            /*00b0*/                   BRA `(.L_x_2);
            /*00c0*/                   NOP;
""")


def test_main_loop_counts_classes_and_mma_work():
    parsed = sass.parse_sass(_SASS)
    assert len(parsed.instructions) == 13 and parsed.labels[".L_x_1"] == 0x20
    assert parsed.loops() == [(2, 9)]  # the trap self-loop after EXIT is not a loop
    m = sass.model(parsed, num_warps=8, arch=90)
    assert m.has_loop and m.loops == 1 and m.instructions == 8
    assert m.by_class["mma"] == 2 and m.by_class["global_load"] == 1 and m.by_class["global_load_async"] == 1
    assert m.by_class["convert"] == 1 and m.by_class["control"] == 1 and m.by_class["alu"] == 2
    assert m.memory_ops == {"LDG.E.U8": 1, "LDGSTS.E.BYPASS.128": 1}
    # 8 warps = 2 warpgroups, each HGMMA 2*64*64*16 FLOPs: 2 instructions x 2 x 131072 = 524288 FLOPs per iteration;
    # at 4096 FLOP/clk/SM that is 128 clocks. Issue: 8 instructions x 8 warps / 4 schedulers = 16 clocks.
    assert m.mma_flops == 524288 and m.mma_clocks == 128 and m.issue_clocks == 16
    assert m.issue_to_mma == pytest.approx(16 / 128)


def test_main_loop_is_the_one_with_the_most_tensor_work():
    """Two loops with two MMA instructions each: the main loop is the one with more MMA FLOPs (two warpgroup
    HGMMA.64x64x16, 524288 FLOPs at 8 warps), not the longer one with two HMMA.16816 (2 x 8 warps x 4096 = 65536):
    the decode GEMV's u loop in column tile 0 is such a longer, lighter loop."""
    side = "".join(f"        /*{0xc0 + 0x10 * i:04x}*/                   IADD3 R{i}, R{i}, 0x1, RZ ;\n"
                   for i in range(10))
    listing = _SASS.split(".L_x_0:")[0] + (
        ".L_x_3:\n"
        "        /*00a0*/                   HMMA.16816.F32.BF16 R40, R44, R48, R40 ;\n"
        "        /*00b0*/                   HMMA.16816.F32.BF16 R40, R44, R50, R40 ;\n"
        f"{side}"
        "        /*0160*/              @!P4 BRA `(.L_x_3) ;\n"
        ".L_x_0:\n"
        "        /*0170*/                   EXIT ;\n")
    parsed = sass.parse_sass(listing)
    assert len(parsed.loops()) == 2
    m = sass.model(parsed, num_warps=8, arch=90)
    assert m.instructions == 8 and m.mma_flops == 524288


def test_a_loop_that_waits_for_all_its_warpgroup_mmas_is_flagged():
    """``WARPGROUP.DEPBAR.LE gsb0, 0x0`` inside the main loop (the MMA ends before the next iteration issues) sets
    ``mma_waits_in_loop``; waiting for all but one group (``0x1``, a pipelined GEMM) or after the loop does not."""
    assert not sass.model(sass.parse_sass(_SASS), num_warps=8, arch=90).mma_waits_in_loop
    mma = "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], R24, gsb0 ;"
    for wait, inside, expected in (("0x0", True, True), ("0x1", True, False), ("0x0", False, False)):
        text = _SASS.replace(mma, mma + f"\n        /*0085*/                   WARPGROUP.DEPBAR.LE gsb0, {wait} ;")
        if not inside:
            text = _SASS.replace("EXIT ;", f"WARPGROUP.DEPBAR.LE gsb0, {wait} ;\n        /*00a8*/   EXIT ;")
        assert sass.model(sass.parse_sass(text), num_warps=8, arch=90).mma_waits_in_loop is expected, (wait, inside)


def test_hmma_shapes_and_a_kernel_without_loop():
    ins = sass.Instruction(0, "HMMA.16816.F32.BF16", "R0, R4, R8, R0")
    assert ins.mma_flops(num_warps=4) == 2 * 16 * 8 * 16 * 4
    assert sass.Instruction(0, "HMMA.1688.F32.TF32", "").mma_flops(num_warps=1) == 2 * 16 * 8 * 8
    straight = sass.parse_sass(textwrap.dedent("""
            /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
            /*0010*/                   FMUL R4, R4, 2 ;
            /*0020*/                   STG.E.128 desc[UR4][R2.64], R4 ;
            /*0030*/                   EXIT ;
    .L_x_0:
            /*0040*/                   BRA `(.L_x_0);
            /*0050*/                   NOP;
    """))
    m = sass.model(straight, num_warps=4, arch=80)
    assert not m.has_loop and m.instructions == 5 and m.issue_to_mma is None  # NOP padding is not issued
    assert sass.Instruction(0, "LDG.E.128", "").memory_width() == 16
    assert sass.Instruction(0, "LDG.E.U8", "").memory_width() == 1


def test_outside_loop_counts_what_a_program_issues_once():
    """``outside_loop``: instructions outside every loop, from the start to the first EXIT after the main loop (that
    EXIT included, the trap loop and NOP padding not): _SASS's LDC, its forward BRA and its EXIT. A side loop
    counts neither as main loop nor as code outside loops; code past a predicated EXIT after the main loop (the
    GEMV's column tile 0 work) is not counted; a kernel without a loop has no such figure."""
    assert sass.model(sass.parse_sass(_SASS), num_warps=8, arch=90).outside_loop == 3
    side = "".join(f"        /*{0xa0 + 0x10 * i:04x}*/                   IADD3 R{i}, R{i}, 0x1, RZ ;\n"
                   for i in range(4))
    two_loops = _SASS.split(".L_x_0:")[0] + (
        ".L_x_3:\n"
        f"{side}"
        "        /*00e0*/              @!P4 BRA `(.L_x_3) ;\n"
        "        /*00f0*/                   STG.E.128 desc[UR4][R2.64], R4 ;\n"
        "        /*0100*/               @P2 EXIT ;\n"
        "        /*0110*/                   IADD3 R9, R9, 0x1, RZ ;\n"
        "        /*0120*/                   STG.E desc[UR4][R2.64], R9 ;\n"
        ".L_x_0:\n"
        "        /*0130*/                   EXIT ;\n")
    m = sass.model(sass.parse_sass(two_loops), num_warps=8, arch=90)
    assert m.instructions == 8 and m.outside_loop == 4  # LDC, BRA, STG.E.128, @P2 EXIT
    no_loop = sass.parse_sass(_SASS.replace("@!P3 BRA `(.L_x_1) ;", "IADD3 R1, R1, 0x1, RZ ;"))
    assert sass.model(no_loop, num_warps=8, arch=90).outside_loop is None


_LLIR = textwrap.dedent("""
    define ptx_kernel void @k(ptr addrspace(1) %0, ptr addrspace(1) %1, i32 %2, ptr addrspace(1) %3) {
      %5 = getelementptr i8, ptr addrspace(1) %1, i64 %9
      %6 = getelementptr bfloat, ptr addrspace(1) %0, i64 %9
      %7 = phi ptr addrspace(1) [ %5, %4 ], [ %8, %10 ]
      %8 = getelementptr i8, ptr addrspace(1) %7, i32 %2
      %9 = sext i32 %2 to i64
      %11 = tail call i16 asm sideeffect "mov.u16 $0, 0x0;\\0A\\09@$2 ld.global.b8 { $0 }, [ $1 + 0 ];", "=c,l,b"(ptr addrspace(1) %8, i1 true)
      %12 = tail call { i32, i32 } asm sideeffect "@$3 ld.global.v2.b32 { $0, $1 }, [ $2 + 0 ];", "=r,=r,l,b"(ptr addrspace(1) %7, i1 true)
      tail call void asm sideeffect "cp.async.cg.shared.global [ $0 + 0 ], [ $1 + 0 ], 0x10, $2;", "r,l,r"(ptr addrspace(3) %13, ptr addrspace(1) %6, i32 16)
      %14 = load <4 x i32>, ptr addrspace(1) %3, align 16
      ret void
    }
""")


def test_loads_are_traced_to_their_parameters():
    found = loads.global_loads(_LLIR)
    assert [(ld.kind, ld.bytes_per_thread, ld.asynchronous, sorted(ld.params)) for ld in found] == [
        ("ld.global", 1, False, [1]), ("ld.global", 8, False, [1]), ("cp.async", 16, True, [0]),
        ("load", 16, False, [3]),
    ]
    widest = loads.widest_load_of(_LLIR, 1)
    assert (widest.bytes_per_thread, widest.asynchronous) == (8, False)
    assert loads.widest_load_of(_LLIR, 2) is None  # an int parameter: no load reads it


def test_amdgcn_metadata():
    text = textwrap.dedent("""
        amdhsa.kernels:
          - .agpr_count:     4
            .group_segment_fixed_size: 0
            .private_segment_fixed_size: 96
            .sgpr_count:     74
            .sgpr_spill_count: 0
            .vgpr_count:     224
            .vgpr_spill_count: 12
    """)
    assert parse_amdgcn_metadata(text) == {"vgprs": 224, "agprs": 4, "sgprs": 74, "scratch_bytes": 96,
                                           "vgpr_spills": 12, "sgpr_spills": 0}
    with pytest.raises(RuntimeError, match="vgpr_count"):
        parse_amdgcn_metadata(".sgpr_count: 3")


def _loop(body: str) -> str:
    """A one-loop listing around ``body`` (instruction lines without addresses)."""
    lines = [line.strip() for line in body.strip().splitlines()]
    out = ["_k:", ".L_x_1:"]
    out += [f"        /*{0x10 * i:04x}*/                   {line}" for i, line in enumerate(lines)]
    out.append(f"        /*{0x10 * len(lines):04x}*/              @!P6 BRA `(.L_x_1) ;")
    out.append(f"        /*{0x10 * len(lines) + 0x10:04x}*/                   EXIT ;")
    return "\n".join(out) + "\n"


def test_registers_read_and_written():
    """Operand roles as the load chain needs them: a carry-out predicate is written, a carry-in read; a 64-bit
    address reads its register pair; a vector load writes its whole range; SHFL and ISETP write their leading
    predicates; a guard predicate is read; stores write nothing."""
    def ins(line):
        (only,) = sass.parse_sass(f"        /*0000*/                   {line}\n").instructions
        return only

    lea = ins("LEA R56, P0, R40, UR20, 0x2 ;")
    assert lea.written() == ["R56", "P0"] and lea.read() == ["R40", "UR20"]
    hi = ins("LEA.HI.X R57, R40, UR21, RZ, 0x2, P0 ;")
    assert hi.written() == ["R57"] and hi.read() == ["R40", "UR21", "P0"]
    load = ins("@!P0 LDG.E.128 R72, desc[UR12][R56.64+0x10] ;")
    assert load.written() == ["R72", "R73", "R74", "R75"] and load.read() == ["P0", "UR12", "R56", "R57"]
    assert ins("IMAD.WIDE.U32 R52, R61, 0x4, R116 ;").written() == ["R52", "R53"]
    assert ins("LDSM.16.M88.4 R40, [R8+UR4] ;").written() == ["R40", "R41", "R42", "R43"]
    shfl = ins("SHFL.IDX PT, R5, R3.reuse, R4, 0x1f ;")
    assert shfl.written() == ["R5"] and shfl.read() == ["R3", "R4"]
    setp = ins("ISETP.NE.U32.AND P1, PT, R106, RZ, PT ;")
    assert setp.written() == ["P1"] and setp.read() == ["R106"]
    store = ins("STS [R18+UR6], R63 ;")
    assert store.written() == [] and store.read() == ["R18", "UR6", "R63"]


def test_load_chain_counts_loads_waiting_on_loads():
    """The decode GEMV's scale path: a block's absmax code (a byte load) indexes the nested code table (a second
    load, its address computed from the first's value): a chain of 2. Through shared memory the chain goes on (3);
    a guard predicate computed from a loaded value makes the guarded load wait too; a value loaded in the
    previous iteration (written later in the body) and an asynchronous copy start no chain."""
    table_lookup = """
        LDG.E.U8 R40, desc[UR12][R40.64] ;
        LEA R56, P0, R40, UR20, 0x2 ;
        LEA.HI.X R57, R40, UR21, RZ, 0x2, P0 ;
        LDG.E R56, desc[UR12][R56.64] ;
        FMUL R60, R56, R61 ;
    """
    assert sass.model(sass.parse_sass(_loop(table_lookup)), 4, 90).load_chain == 2
    through_shared = table_lookup + """
        STS [R18+UR6], R60 ;
        BAR.SYNC.DEFER_BLOCKING 0x0 ;
        LDS R64, [R8] ;
        IMAD.WIDE R66, R64, 0x4, R100 ;
        LDG.E R70, desc[UR12][R66.64] ;
    """
    assert sass.model(sass.parse_sass(_loop(through_shared)), 4, 90).load_chain == 3
    guarded = """
        LDG.E R10, desc[UR12][R2.64] ;
        ISETP.GT.AND P1, PT, R10, RZ, PT ;
        @P1 LDG.E R12, desc[UR12][R4.64] ;
    """
    assert sass.model(sass.parse_sass(_loop(guarded)), 4, 90).load_chain == 2
    prefetched = """
        LEA R56, P0, R40, UR20, 0x2 ;
        LEA.HI.X R57, R40, UR21, RZ, 0x2, P0 ;
        LDG.E R58, desc[UR12][R56.64] ;
        LDG.E.U8 R40, desc[UR12][R42.64] ;
        LDGSTS.E.BYPASS.128 [R5], desc[UR4][R58.64] ;
    """
    assert sass.model(sass.parse_sass(_loop(prefetched)), 4, 90).load_chain == 1
    assert sass.model(sass.parse_sass(_loop("LDGSTS.E.BYPASS.128 [R5], desc[UR4][R6.64] ;")), 4, 90).load_chain == 0
