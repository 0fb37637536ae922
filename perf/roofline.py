"""Analytic roofline of every kernel family at named workload shapes: ``python -m perf roofline``.

No kernel is compiled or run: this module is arithmetic on shapes and on published device peaks, so it imports
nothing beyond the standard library and runs in milliseconds on any machine.

Model. A workload is a sequence of kernel launches (:class:`Op`), each with the DRAM bytes it must move, the
floating-point operations it must do, and the unit doing them (BF16 tensor cores, or the FP32 CUDA cores for
elementwise work), and the warp-instructions it must issue. One launch takes
``max(bytes / HBM bandwidth, flops / peak of its unit, warp-instructions / (SMs x 4 schedulers x clock))``;
launches of one workload run one after another, so the workload's predicted time is the *sum* of its launches'
times. This is a static model, not a timing. Instruction counts come from the SASS cost model of
``python -m perf static`` (``perf/sass.py``) as recorded in the committed baseline of a Triton version
(``perf/baselines/static-triton<version>.json``), for the builds the launcher picks at the shape: for the
kernels that dequantize NF4 in their loop (the decode GEMV, the fused tiled kernel), instructions per weight
element times the weight elements all programs dequantize (each row tile of ``BLOCK_M`` rows dequantizes all of W
once, :func:`fused_issue`); for the dense GEMM after the dequantize launch, main-loop instructions x warps x K
steps x output tiles (:func:`tiled_issue`); for the quantize, dequantize and AdamW kernels, instructions per element
times the elements handled, rounded up to whole programs (:func:`per_element_issue`).

The linear layer. ``"qlora_default"`` is the default dispatch (kernels/linear.py ``choose_path`` and
``choose_dx_path``, mirrored by :func:`default_path` and :func:`default_dx_path`), launch by launch: where K is a
multiple of the blocksize, at M <= 32 the GEMV and its epilogue, up to ``FUSED_MAX_M`` rows (per target: the
dispatcher's rule differs between sm_80 and sm_90, so these workloads are built per device) ``lora_down``
(+ ``sum_splits`` when it splits its reduction) and the fused ``_matmul_lora_kernel`` (W decoded in its K loop,
charged the build ``fused_config`` picks); otherwise ``lora_down``, ``dequantize_4bit`` and the dense GEMM with the
LoRA term in its epilogue; the backward ``lora_down`` (g), the fused dx kernel or dequantize again and the dense
dx GEMM, ``lora_grad`` twice (the sequence ``perf/launches.py`` records). ``"fused"`` is the fused tiled path
(``MatmulConfig(path="fused")``) at every M. :func:`model_path` is the NF4 path the model predicts fastest at a
shape; ``tests/test_perf_roofline.py`` checks the dispatcher picks it.

Not modelled: launch latency and host time (a few microseconds per launch, which dominate at decode sizes), the
issue cost of kernels without a per-element or main-loop figure (LoRA helpers, the GEMV epilogue, torch's and
bitsandbytes' kernels), the GEMM's prologue and epilogue instructions, L2 reuse beyond the compulsory traffic,
wave quantization, and overlap between launches.

Bytes are the *compulsory* DRAM traffic of each launch: every input read once, every output written once, each
operand in its stored dtype; a tile re-read from L2 costs nothing. The 16-entry NF4 codebook, the 256-entry
dynamic map and scalar arguments (the double-quantization offset, hyperparameters) are read once into cache and
are left out. Each workload's ``assumptions`` string states what it counts.

FLOPs: a multiply-add counts 2 (matmuls: ``2*M*N*K``); elementwise work counts every add, multiply, compare,
``abs``, ``max``, ``sqrt`` and division as 1. The FP32 peaks below count an FMA as 2, so for elementwise kernels
the compute time is a rough lower bound; it is well below their byte time either way. What bounds the quantize,
dequantize and 8-bit AdamW kernels is instruction issue (table lookups, searches and packing are not FLOPs).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

TENSOR_BF16 = "bf16_tensor"  # dense BF16/FP16 tensor-core matmul, float32 accumulation
FP32_SIMT = "fp32"  # non-tensor FP32 arithmetic on the CUDA cores (elementwise kernels, in-kernel dequantization)
UNITS = (TENSOR_BF16, FP32_SIMT)

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
NF4_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256  # double quantization: one float32 absmax2 per 256 first-level scales (bitsandbytes)
ADAM8_BLOCKSIZE = 256  # 8-bit optimizer state: one float32 absmax per 256 elements (kernels/optim.py QBLOCK)
SMALL_M = 32  # rows at or below which the forward takes the decode GEMV (kernels/linear.py SMALL_M)
GEMV_BLOCK_MS = (16, 32)  # the GEMV's row tiles (kernels/linear.py GEMV_BLOCK_MS): the smallest >= M
# Rows up to which the default takes the fused tiled kernel, per target, None for any (kernels/linear.py
# FUSED_MAX_M, keyed by architecture: 8 -> sm_80, 9 -> sm_90).
FUSED_MAX_M: dict[str, int | None] = {"sm_80": None, "sm_90": 256}
DEFAULT_TARGET = "sm_90"  # whose dispatch a "qlora_default" workload follows when no target is given
# Up to this many rows the fused launch uses its 64-row tiles (kernels/linear.py FUSED_SMALL_TILE_MAX_M); the
# per-code build (K not a multiple of the blocksize) has only the 64-row tile.
FUSED_SMALL_TILE_ROWS = 256
FUSED_NARROW_BLOCK_N = 32  # up to 64 rows (kernels/linear.py FUSED_NARROW_CONFIG)

# FLOPs per element of the elementwise kernels, counted from kernels/quantize.py and kernels/optim.py.
QUANT4_FLOPS_PER_ELEM = 18  # |x|, running max, x * (1/absmax), 15 midpoint compares (linear scan of the table)
QUANT4_FLOPS_PER_BLOCK = 1  # the IEEE reciprocal 1/absmax
DQ_FLOPS_PER_SCALE = 13  # mean-sum add, - offset, |.|, max, * (1/absmax2), 8-step binary search over 255 midpoints
DQ_FLOPS_PER_NESTED_BLOCK = 1  # 1/absmax2
DEQUANT_FLOPS_PER_ELEM = 1  # code[q] * scale (the table lookup is a select, not arithmetic)
DEQUANT_FLOPS_PER_BLOCK = 2  # nested_code[q] * absmax2 + offset, two roundings
# p*decay (1); m = b1*m + c1*g (3); v = b2*v + c2*g*g (4); sqrt(v)/bc2 + eps (3); p - lr*(m/denom) (3).
ADAMW_FLOPS_PER_ELEM = 14
# 8-bit: the 14 above, decoding m and v (2 multiplies), and requantizing each of them: |.|, max, * (1/absmax)
# and an 8-step binary search (11 each).
ADAMW8_FLOPS_PER_ELEM = ADAMW_FLOPS_PER_ELEM + 2 + 2 * 11


# --------------------------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """Published peaks of one GPU. Bandwidth in bytes/s, throughputs in FLOP/s (dense, no structured sparsity)."""

    key: str
    name: str
    hbm_bytes_per_s: float
    bf16_tensor_flops: float
    fp32_flops: float
    sms: int = 0
    clock_hz: float = 0.0  # the clock at which the dense tensor peak is quoted (peak / (SMs x FLOP/clk/SM))
    target: str = ""  # the perf static target whose builds run here

    @property
    def issue_per_s(self) -> float:
        """Warp-instructions per second: 4 schedulers per SM, one instruction each per clock."""
        return self.sms * 4 * self.clock_hz

    def peak(self, unit: str) -> float:
        """FLOP/s of ``unit`` (one of :data:`UNITS`)."""
        if unit == TENSOR_BF16:
            return self.bf16_tensor_flops
        if unit == FP32_SIMT:
            return self.fp32_flops
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")

    def ridge(self, unit: str) -> float:
        """Arithmetic intensity (FLOP/byte) above which a launch on ``unit`` is compute-bound."""
        return self.peak(unit) / self.hbm_bytes_per_s


DEVICES: dict[str, Device] = {
    # "NVIDIA H100 Tensor Core GPU" datasheet, H100 SXM column: GPU memory 80 GB HBM3 at 3.35 TB/s; BF16 Tensor
    # Core 1,979 TFLOPS *with sparsity*, i.e. 989.4 dense (the dense figure in the "NVIDIA H100 Tensor Core GPU
    # Architecture" whitepaper); FP32 67 TFLOPS (66.9 in the whitepaper).
    "h100": Device("h100", "NVIDIA H100 SXM5 80GB (HBM3)", 3.35e12, 989.4e12, 66.9e12, 132, 1.83e9, "sm_90"),
    # "NVIDIA A100 Tensor Core GPU" datasheet, A100 80GB SXM column: HBM2e at 2,039 GB/s; BF16 Tensor Core
    # 312 TFLOPS dense (624 with sparsity); FP32 19.5 TFLOPS. SMs and clocks (H100 SXM: 132 SMs; A100: 108 SMs,
    # 1.41 GHz boost) are the whitepapers'; the H100 clock is the one its dense peak implies, 989.4e12 / (132 SMs x
    # 4096 FLOP/clk/SM) = 1.83 GHz.
    "a100": Device("a100", "NVIDIA A100 SXM4 80GB (HBM2e)", 2.039e12, 312e12, 19.5e12, 108, 1.41e9, "sm_80"),
    # "NVIDIA H200 Tensor Core GPU" datasheet, H200 SXM column: 141 GB HBM3e at 4.8 TB/s; BF16 Tensor Core
    # 1,979 TFLOPS with sparsity (989.4 dense, the H100 SXM's compute); FP32 67 TFLOPS.
    "h200": Device("h200", "NVIDIA H200 SXM 141GB (HBM3e)", 4.8e12, 989.4e12, 66.9e12, 132, 1.83e9, "sm_90"),
}


# --------------------------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One kernel launch: ``bytes`` of compulsory DRAM traffic, ``flops`` floating-point operations on ``unit``,
    ``instructions`` warp-instructions issued per target (``{"sm_90": n}``; a target not listed: not modelled)."""

    name: str
    bytes: int
    flops: int
    unit: str
    instructions: tuple = ()  # ((target, warp-instructions), ...): hashable
    # Targets on which the launch's tensor-core work and its instruction issue do not overlap: its main loop waits
    # for all of its warpgroup MMAs and one CTA fills an SM (:func:`mma_serial_targets`).
    mma_serial: tuple = ()
    # ((target, programs), ...): the launch's grid where it may leave SMs idle (:func:`grid_programs`); a target not
    # listed fills the GPU.
    programs: tuple = ()

    def program_count(self, target: str) -> int:
        return dict(self.programs).get(target, 0)

    def issue_count(self, target: str) -> float:
        return dict(self.instructions).get(target, 0.0)

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}")
        for field_name in ("bytes", "flops"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{field_name} must be a non-negative int, got {value!r}")


@dataclass(frozen=True)
class Workload:
    """A named computation at fixed shapes, done by ``approach`` as the launches ``ops`` run in order.

    ``baseline``: the name of the workload this one is compared with (the speedup column), or None.
    """

    name: str
    family: str
    approach: str
    ops: tuple[Op, ...]
    assumptions: str
    baseline: str | None = None

    @property
    def bytes(self) -> int:
        return sum(op.bytes for op in self.ops)

    @property
    def flops(self) -> int:
        return sum(op.flops for op in self.ops)

    @property
    def intensity(self) -> float:
        """FLOP per DRAM byte over all launches."""
        return self.flops / self.bytes


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _dtype_bytes(dtype: str, allowed=tuple(DTYPE_BYTES)) -> int:
    if dtype not in allowed:
        raise ValueError(f"dtype must be one of {allowed}, got {dtype!r}")
    return DTYPE_BYTES[dtype]


def _count_name(count: int) -> str:
    """64M for 64 * 2**20; the plain number otherwise."""
    return f"{count >> 20}M" if count % (1 << 20) == 0 else str(count)


def nf4_storage_bytes(numel: int, blocksize: int = NF4_BLOCKSIZE, nested_blocksize: int = NESTED_BLOCKSIZE) -> int:
    """Bytes of a double-quantized NF4 weight of ``numel`` elements: packed codes (1/2 byte each), one uint8 scale
    code per ``blocksize`` elements and one float32 absmax2 per ``nested_blocksize`` scales (codebooks excluded)."""
    _positive("numel", numel)
    nblocks = _cdiv(numel, _positive("blocksize", blocksize))
    return _cdiv(numel, 2) + nblocks + 4 * _cdiv(nblocks, _positive("nested_blocksize", nested_blocksize))


def nf4_quantize(rows: int, cols: int, dtype: str = "bf16", blocksize: int = NF4_BLOCKSIZE,
                 triton: str | None = None) -> Workload:
    """NF4 quantization of a (rows, cols) ``dtype`` weight, then double quantization of its float32 scales;
    ``triton``: whose static baseline gives the instruction counts (default: the newest committed)."""
    n = _positive("rows", rows) * _positive("cols", cols)
    elem = _dtype_bytes(dtype)
    nblocks = _cdiv(n, _positive("blocksize", blocksize))
    nested = _cdiv(nblocks, NESTED_BLOCKSIZE)
    _, builds = static_builds(triton)
    quantize = Op("quantize_4bit", n * elem + _cdiv(n, 2) + 4 * nblocks,
                  QUANT4_FLOPS_PER_ELEM * n + QUANT4_FLOPS_PER_BLOCK * nblocks, FP32_SIMT,
                  per_element_issue(builds, QUANTIZE_BUILD.format(dtype=dtype, blocksize=blocksize), n))
    double = Op("double_quantize", 4 * nblocks + nblocks + 4 * nested,
                DQ_FLOPS_PER_SCALE * nblocks + DQ_FLOPS_PER_NESTED_BLOCK * nested, FP32_SIMT,
                per_element_issue(builds, DOUBLE_QUANTIZE_BUILD.format(blocksize=NESTED_BLOCKSIZE), nblocks))
    return Workload(
        f"nf4_quantize_{rows}x{cols}_{dtype}", "quantize", "qlora", (quantize, double),
        f"quantize_4bit reads the weight ({elem} B/elem) and writes packed codes (0.5 B/elem) and one float32 absmax "
        f"per {blocksize}-block; double_quantize reads those absmax (4 B/block) and writes one uint8 code per block "
        f"and one float32 absmax2 per {NESTED_BLOCKSIZE} blocks. Not counted: the implementation's extra read of "
        f"the absmax for the order-independent mean (offset), +4 B/block. Issue time of both launches from the "
        f"static baseline's instructions per element.",
    )


def nf4_dequantize(rows: int, cols: int, dtype: str = "bf16", blocksize: int = NF4_BLOCKSIZE,
                   triton: str | None = None) -> Workload:
    """Dequantization of a double-quantized NF4 (rows, cols) weight to a dense ``dtype`` tensor; ``triton``: whose
    static baseline gives the instruction counts (default: the newest committed)."""
    n = _positive("rows", rows) * _positive("cols", cols)
    elem = _dtype_bytes(dtype)
    _, builds = static_builds(triton)
    issue = per_element_issue(builds, dequantize_build(dtype, blocksize), n)
    return Workload(
        f"nf4_dequantize_{rows}x{cols}_{dtype}", "dequantize", "qlora", (_dequantize_op(n, elem, blocksize, issue),),
        f"reads packed codes (0.5 B/elem), one uint8 scale code per {blocksize}-block and one float32 absmax2 per "
        f"{NESTED_BLOCKSIZE} blocks; writes the {dtype} weight ({elem} B/elem). Issue time from the static "
        f"baseline's instructions per element.",
    )


def _dequantize_op(n: int, elem: int, blocksize: int, instructions: tuple = ()) -> Op:
    """The dequantize launch; ``instructions`` as :attr:`Op.instructions` (empty: issue not modelled, e.g. for
    the dequantize-then-matmul approach, which stands for bitsandbytes' kernel)."""
    nblocks = _cdiv(n, blocksize)
    return Op("dequantize_nf4", nf4_storage_bytes(n, blocksize) + n * elem,
              DEQUANT_FLOPS_PER_ELEM * n + DEQUANT_FLOPS_PER_BLOCK * nblocks, FP32_SIMT, instructions)


# --------------------------------------------------------------------------------------------------------------
# Instruction issue, from the static baselines (python -m perf static --update)
# --------------------------------------------------------------------------------------------------------------

BASELINE_DIR = Path(__file__).parent / "baselines"
# The builds (``module.spec name`` in the baseline, kernels/*.py ``compile_specs``) whose issue the linear layer's
# launches are charged, by name prefix (the config tag follows): the decode GEMV (``_nf4_gemv_kernel``, path
# "gemv"); ``_matmul_lora_kernel`` with W dequantized in its K loop (path "fused", forward and dx); the same kernel
# as a dense GEMM after the dequantize launch (path "dequant", forward and dx).
GEMV_BUILD = "linear.gemv_m"
# A GEMV launch of one row is its own build (Triton makes an int equal to 1 a constant): "<tile>_one_row".
GEMV_ONE_ROW = "_one_row@"
FUSED_FWD_BUILD = "linear.fused_fwd_"
FUSED_DX_BUILD = "linear.fused_dx_"
# The fused builds where K is not a multiple of the blocksize (codes decoded one by one, scales per element).
FUSED_PERCODE_FWD_BUILD = "linear.fused_percode_fwd_"
FUSED_PERCODE_DX_BUILD = "linear.fused_percode_dx_"


def _fused_terms(builds: list[dict], prefix: str, rows: int, cols: int, weight_elements: int,
                 tile: tuple[int, int]) -> tuple:
    """``(instructions, mma_serial, programs)`` of an :class:`Op` for the fused build ``prefix*`` with tile
    ``(BLOCK_M, BLOCK_N)``, for an output of ``rows`` x ``cols`` over a weight of ``weight_elements``."""
    block_m, block_n = tile
    return (fused_issue(builds, prefix, rows, weight_elements, block_m, block_n),
            mma_serial_targets(builds, prefix, block_m, block_n),
            grid_programs(builds, prefix, rows, cols, block_m, block_n=block_n))


def _fused_tile(m: int, k: int, blocksize: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the fused build a launch uses: ``fused_config``'s where K is a multiple of the
    blocksize, the per-code build's (64 x 64) otherwise."""
    return (fused_block_m(m), fused_block_n(m)) if k % blocksize == 0 else (64, 64)


def fused_build(direction: str, k: int, blocksize: int) -> str:
    """The build-name prefix the fused tiled kernel's ``direction`` (``"fwd"`` or ``"dx"``) launch is charged:
    the byte-pair decode where W's rows are whole scale blocks (``k % blocksize == 0``), else the per-code one."""
    aligned = k % blocksize == 0
    return {("fwd", True): FUSED_FWD_BUILD, ("dx", True): FUSED_DX_BUILD,
            ("fwd", False): FUSED_PERCODE_FWD_BUILD, ("dx", False): FUSED_PERCODE_DX_BUILD}[direction, aligned]
DENSE_FWD_BUILD = "linear.dense_fwd_"
DENSE_DX_BUILD = "linear.dense_dx_"
# The builds the launchers of the elementwise workloads pick: quantize_4bit compiles one build per input dtype and
# blocksize; double quantization is the 8-bit quantize at the nested blocksize; dequantize_4bit of a
# double-quantized weight one per output dtype (blocksize 64; other blocksizes carry a ``_b<blocksize>`` suffix);
# the optimizers' single-tensor kernels (a 64Mi-element tensor gets a launch of its own) one per parameter dtype.
QUANTIZE_BUILD = "quantize.q4_{dtype}_b{blocksize}"
DOUBLE_QUANTIZE_BUILD = "quantize.q8_fp32_b{blocksize}"
DEQUANTIZE_BUILD = "quantize.dq4_{dtype}_nested"
ADAMW_BUILD = {"adamw32": "optim.adamw32_fp32", "adamw8bit": "optim.adamw8bit_fp32"}


def dequantize_build(dtype: str, blocksize: int = NF4_BLOCKSIZE) -> str:
    """The ``dequantize_4bit`` build of a double-quantized weight with ``dtype`` output at ``blocksize``."""
    base = DEQUANTIZE_BUILD.format(dtype=dtype)
    return base if blocksize == NF4_BLOCKSIZE else f"{base}_b{blocksize}"


def static_builds(triton: str | None = None) -> tuple[str | None, list[dict]]:
    """``(version, builds)`` of the static baseline of Triton ``triton`` (``"3.9"``), default the newest committed
    one; ``(None, [])`` when there is none. Plain JSON: nothing is compiled or imported."""
    files = {p.name[len("static-triton"):-len(".json")]: p for p in BASELINE_DIR.glob("static-triton*.json")}
    if triton is None:
        if not files:
            return None, []
        triton = max(files, key=lambda v: tuple(int(x) for x in v.split(".")))
    if triton not in files:
        raise ValueError(f"triton must be one of {sorted(files)} (committed static baselines), got {triton!r}")
    data = json.loads(files[triton].read_text())
    return triton, [dict(b, key=k) for k, b in data["kernels"].items()]


def _tile_matches(config: dict, block_m: int | None, block_n: int | None) -> bool:
    """Whether a build's config has the row tile ``block_m`` and column tile ``block_n`` (None: any)."""
    return ("BLOCK_M" in config and block_m in (None, config["BLOCK_M"])
            and block_n in (None, config.get("BLOCK_N")))


def _nvidia_builds(builds: list[dict], prefix: str):
    """``(target, build)`` of the builds whose name (the key without ``@target``) starts with ``prefix``, on the
    NVIDIA targets (the issue model is 4 schedulers x 1 instruction per clock per SM)."""
    for b in builds:
        name, _, target = b["key"].rpartition("@")
        if name.startswith(prefix) and target.startswith("sm_"):
            yield target, b


def gemv_launch_builds(builds: list[dict], m: int) -> list[dict]:
    """``builds`` without the GEMV builds that do not stand for a launch of ``m`` rows: at M = 1 the GEMV is charged
    its one-row build (:data:`GEMV_ONE_ROW`), at more rows the build launched with M a multiple of 16 (x's rows
    loaded at run time: 519 against 517 instructions per K step on sm_90 under triton 3.9, 576 against 578 on
    sm_80)."""
    return [b for b in builds if not b["key"].startswith(GEMV_BUILD) or (GEMV_ONE_ROW in b["key"]) == (m == 1)]


def fused_issue(builds: list[dict], prefix: str, rows: int, weight_elements: int,
                block_m: int | None = None, block_n: int | None = None) -> tuple:
    """``((target, warp-instructions), ...)``: what a kernel that dequantizes NF4 W in its loop (the builds named
    ``prefix*``: :data:`GEMV_BUILD`, :data:`FUSED_FWD_BUILD`, :data:`FUSED_DX_BUILD`) issues for ``rows`` rows of
    a weight of ``weight_elements``, per target. Each program of ``BLOCK_M`` rows dequantizes the whole weight once
    (a split over K divides the work, not its total), so warp-instructions = instructions per weight element / 32
    x weight elements x ceil(rows / BLOCK_M); of several builds, the one with the fewest (the autotuner's best
    case), or only those with ``BLOCK_M == block_m`` (and ``BLOCK_N == block_n``) when given (the build the
    launcher picks). Builds without a per-element figure are skipped."""
    best: dict[str, float] = {}
    for target, b in _nvidia_builds(builds, prefix):
        per_elem, config = b.get("instr_per_weight_element"), b.get("config") or {}
        if not per_elem or not _tile_matches(config, block_m, block_n):
            continue
        count = per_elem / 32 * weight_elements * _cdiv(rows, config["BLOCK_M"])
        best[target] = min(best.get(target, count), count)
    return tuple(sorted(best.items()))


# Per-SM resources of the NVIDIA targets, for how many CTAs of a build fit on one SM: registers, shared memory
# (bytes), resident warps (CUDA occupancy tables; sm_90: H100/H200, sm_80: A100).
SM_RESOURCES = {"sm_90": (65536, 228 * 1024, 64), "sm_80": (65536, 164 * 1024, 64)}


def ctas_per_sm(build: dict, target: str) -> int:
    """CTAs of ``build`` resident on one SM of ``target``: registers (allocated per warp in units of 8 per
    thread), shared memory and warps each allow some; the fewest."""
    regs, smem, warps = SM_RESOURCES[target]
    per_warp = -(-max(build["registers"], 1) // 8) * 8 * 32
    fits = [regs // (per_warp * build["num_warps"]), warps // build["num_warps"]]
    if build.get("shared_bytes"):
        fits.append(smem // build["shared_bytes"])
    return min(fits)


def mma_serial_targets(builds: list[dict], prefix: str, block_m: int | None = None,
                       block_n: int | None = None) -> tuple:
    """The targets on which the build ``fused_issue`` charges (``prefix*``, ``BLOCK_M == block_m`` when given)
    runs its tensor-core work and its instruction issue one after the other: its main loop waits for all its
    warpgroup MMAs (``mma_waits_in_loop``: Triton writes the decoded W tile to shared memory every iteration and
    waits before overwriting it) and one CTA fills an SM, so no other CTA issues while it waits."""
    serial = set()
    for target, b in _nvidia_builds(builds, prefix):
        config = b.get("config") or {}
        if not _tile_matches(config, block_m, block_n) or not b.get("instr_per_weight_element"):
            continue
        if b.get("mma_waits_in_loop") and ctas_per_sm(b, target) == 1:
            serial.add(target)
    return tuple(sorted(serial))


def grid_programs(builds: list[dict], prefix: str, rows: int, cols: int, block_m: int | None = None,
                  splits: int = 1, block_n: int | None = None) -> tuple:
    """``((target, programs), ...)``: the grid of a tiled launch of the build ``prefix*`` (``BLOCK_M == block_m``
    when given; the one :func:`fused_issue` / :func:`tiled_issue` charge) for an output of ``rows`` x ``cols``:
    ceil(rows / BLOCK_M) x ceil(cols / BLOCK_N) x ``splits`` (the GEMV's split over K)."""
    out: dict[str, int] = {}
    for target, b in _nvidia_builds(builds, prefix):
        config = b.get("config") or {}
        if not {"BLOCK_M", "BLOCK_N"} <= set(config) or not _tile_matches(config, block_m, block_n):
            continue
        count = _cdiv(rows, config["BLOCK_M"]) * _cdiv(cols, config["BLOCK_N"]) * splits
        out[target] = max(out.get(target, 0), count)
    return tuple(sorted(out.items()))


def tiled_issue(builds: list[dict], prefix: str, rows: int, cols: int, inner: int) -> tuple:
    """``((target, warp-instructions), ...)``: what a tiled GEMM build (``prefix*``: :data:`DENSE_FWD_BUILD`,
    :data:`DENSE_DX_BUILD`) issues for an output of ``rows`` x ``cols`` reduced over ``inner``: its main loop's
    instructions (per warp, per K step) x warps x K steps x output tiles; of several builds, the fewest. The
    prologue and the epilogue (the LoRA term, bias, dropout, the store) are not counted: one pass per tile
    against ``inner / BLOCK_K`` loop trips."""
    best: dict[str, float] = {}
    for target, b in _nvidia_builds(builds, prefix):
        loop, warps, config = b.get("loop_instructions"), b.get("num_warps"), b.get("config") or {}
        if not loop or not warps or not {"BLOCK_M", "BLOCK_N", "BLOCK_K"} <= set(config):
            continue
        tiles = _cdiv(rows, config["BLOCK_M"]) * _cdiv(cols, config["BLOCK_N"])
        count = loop * warps * _cdiv(inner, config["BLOCK_K"]) * tiles
        best[target] = min(best.get(target, count), count)
    return tuple(sorted(best.items()))


def per_element_issue(builds: list[dict], build: str, elements: int) -> tuple:
    """``((target, warp-instructions), ...)``: what the build ``build`` (``"module.spec"``, a baseline key without
    its ``@target``) issues to handle ``elements`` elements, per NVIDIA target whose baseline records its
    instructions per element. One main-loop iteration (a whole program for a kernel without a loop) handles
    ``weight_elements_per_iteration`` elements, so warp-instructions = instructions per element / 32 x elements
    per iteration x ceil(elements / elements per iteration): a partly filled last program issues in full. Empty
    when the baseline has no such figure for the build."""
    _positive("elements", elements)
    out = []
    for b in builds:
        name, _, target = b["key"].rpartition("@")
        per_elem, per_iter = b.get("instr_per_weight_element"), b.get("weight_elements_per_iteration")
        if name != build or not per_elem or not per_iter:
            continue
        out.append((target, per_elem / 32 * per_iter * _cdiv(elements, per_iter)))
    return tuple(sorted(out))


# --------------------------------------------------------------------------------------------------------------
# The LoRA linear layer: this suite's paths launch by launch, and the torch approaches it is compared with
# --------------------------------------------------------------------------------------------------------------

# The NF4 paths of kernels/linear.py (``PATHS``): the decode GEMV, W dequantized into a buffer then a dense GEMM,
# W dequantized tile by tile in the GEMM's K loop.
NF4_PATHS = ("gemv", "dequant", "fused")
# "qlora_default": the launches of the default dispatch (kernels/linear.py ``choose_path`` without a config);
# "fused": the fused tiled path (``MatmulConfig(path="fused")``, perf/bench_linear.py's qlora_fused_tiled) at
# every M; "dequant_matmul" and "dense": torch.
LINEAR_APPROACHES = ("qlora_default", "fused", "dequant_matmul", "dense")
_APPROACH_PREFIX = {"qlora_default": "qlora_default", "fused": "nf4_fused_tiled",
                    "dequant_matmul": "nf4_dequant_matmul", "dense": "dense"}
GPU_SMS = 132  # the H100/H200 SXM the launch plans below are computed for (perf/launches.py GPU_SMS)
# Launch constants of kernels/linear.py and kernels/lora.py that decide how many programs and partials a launch
# has (tests/test_perf_roofline.py checks them against the launchers).
GEMV_BLOCK_NS, GEMV_BLOCK_K = {16: 128, 32: 64}, 128  # kernels/linear.py GEMV_BLOCK_NS, SMALL_M_CONFIG.block_k
SPLIT_CHOICES = (1, 2, 4, 8, 16, 32)  # kernels/lora.py SPLIT_CHOICES (also the GEMV's split-K choices)
DOWN_BLOCK_D = 64  # kernels/lora.py GPU_DOWN_BLOCK_D
DOWN_GRAD_MAX_M = 64  # kernels/lora.py DOWN_GRAD_MAX_M: g and dB share one launch up to this many rows
DOWN_GRAD_BLOCK_C = 64  # kernels/lora.py GPU_DOWN_GRAD_BLOCK_C: columns of dy per program of that launch


def default_path(m: int, k: int, blocksize: int = NF4_BLOCKSIZE, target: str = DEFAULT_TARGET) -> str:
    """The forward path the default dispatch takes on ``target`` (kernels/linear.py ``choose_path`` without a
    config): where K is a multiple of the blocksize the GEMV at ``m <= SMALL_M`` and the fused tiled kernel at
    ``m <= FUSED_MAX_M[target]`` (None: any m); dequantize-then-GEMM otherwise."""
    if target not in FUSED_MAX_M:
        raise ValueError(f"target must be one of {sorted(FUSED_MAX_M)}, got {target!r}")
    if k % blocksize:
        return "dequant"
    if m <= SMALL_M:
        return "gemv"
    limit = FUSED_MAX_M[target]
    return "fused" if limit is None or m <= limit else "dequant"


def default_dx_path(m: int, k: int, blocksize: int = NF4_BLOCKSIZE, target: str = DEFAULT_TARGET) -> str:
    """The backward's dx path (kernels/linear.py ``choose_dx_path``): the forward's, fused where that is the GEMV."""
    path = default_path(m, k, blocksize, target)
    return "fused" if path == "gemv" else path


def gemv_block_m(m: int) -> int:
    """Row tile of the decode GEMV for ``m <= SMALL_M`` rows (kernels/linear.py ``gemv_config``)."""
    return next(b for b in GEMV_BLOCK_MS if m <= b)


def fused_block_m(m: int) -> int:
    """Row tile of the fused launch for ``m`` rows (kernels/linear.py ``fused_config``)."""
    return 64 if m <= FUSED_SMALL_TILE_ROWS else 128


def fused_block_n(m: int) -> int:
    """Column tile of the fused launch for ``m`` rows (kernels/linear.py ``fused_config``): 32 for one 64-row tile
    (``FUSED_NARROW_CONFIG``), then that of the 64- or 128-row tile."""
    return FUSED_NARROW_BLOCK_N if m <= 64 else fused_block_m(m)


def _split_count(want: int, most: int) -> int:
    """kernels/lora.py ``choose_splits`` / kernels/linear.py ``_gemv_split_k``: the smallest choice reaching
    ``want`` programs per tile, at most ``most``."""
    split = 1
    for s in SPLIT_CHOICES:
        if s <= most and split < want:
            split = s
    return split


def gemv_splits(n: int, k: int, m: int = 1, sms: int = GPU_SMS) -> int:
    """K splits of the decode GEMV for ``m`` rows on ``sms`` SMs (kernels/linear.py ``_gemv_split_k`` with
    ``gemv_config(m)``, then rounded as ``_launch_gemv`` rounds it to whole K steps)."""
    block_n = GEMV_BLOCK_NS[gemv_block_m(m)]
    split = _split_count(_cdiv(2 * sms, _cdiv(n, block_n)), max(1, k // (2 * GEMV_BLOCK_K)))
    while split > 1 and 64 * m * split > k:  # the float32 partials of y within a quarter of W's packed bytes
        split //= 2
    return _cdiv(k, _cdiv(_cdiv(k, split), GEMV_BLOCK_K) * GEMV_BLOCK_K)


def gpu_block_r(r: int) -> int:
    """The LoRA rank tile on a GPU (kernels/lora.py ``lora_block_r``): a power of two from 16 to 64."""
    return max(16, min(64, 1 << (r - 1).bit_length()))


def lora_down_splits(m: int, d: int, r: int, sms: int = GPU_SMS) -> int:
    """Splits of the reduction D of ``lora_down`` (M, D) @ (D, R) on ``sms`` SMs (kernels/lora.py
    ``launch_lora_down``, ``_down_meta`` and ``choose_splits``); > 1 adds a ``_sum_splits_kernel`` launch."""
    block_r = gpu_block_r(r)
    block_m = 64 if m >= 64 * sms else (32 if m > 16 else 16)
    block_m = min(block_m, 64 if block_r == 16 else 32)
    tiles = _cdiv(m, block_m) * _cdiv(r, block_r)
    split = _split_count(_cdiv(2 * sms, tiles), max(1, d // (2 * DOWN_BLOCK_D)))
    return _cdiv(d, _cdiv(_cdiv(d, split), DOWN_BLOCK_D) * DOWN_BLOCK_D)


def _linear_args(m, k, n, r, dtype, blocksize):
    for name, value in (("m", m), ("k", k), ("n", n), ("r", r), ("blocksize", blocksize)):
        _positive(name, value)
    # The fp32 compute dtype runs on CUDA cores, not on the BF16 tensor cores this model assigns matmuls to.
    return _dtype_bytes(dtype, ("bf16", "fp16"))


def _check_approach(approach):
    if approach not in LINEAR_APPROACHES:
        raise ValueError(f"approach must be one of {LINEAR_APPROACHES}, got {approach!r}")


def _check_path(path):
    if path not in NF4_PATHS:
        raise ValueError(f"path must be one of {NF4_PATHS}, got {path!r}")


def _linear_name(kind: str, m, k, n, r, approach, dtype) -> str:
    return f"{_APPROACH_PREFIX[approach]}_lora_{kind}_m{m}_k{k}_n{n}_r{r}_{dtype}"


def _lora_down_ops(label: str, m: int, d: int, r: int, e: int) -> list[Op]:
    """``lora_down`` (reads the (m, d) activation and the (d, r) factor, writes float32 (m, r), or float32 partials
    per split) and, when it splits, ``sum_splits`` (reads the partials, writes the float32 result)."""
    splits = lora_down_splits(m, d, r)
    ops = [Op(label, e * m * d + e * d * r + 4 * splits * m * r, 2 * m * d * r, TENSOR_BF16)]
    if splits > 1:
        ops.append(Op(f"sum_splits ({splits} partials)", 4 * splits * m * r + 4 * m * r, splits * m * r, FP32_SIMT))
    return ops


def _lora_down_grad_ops(m: int, n: int, r: int, e: int) -> list[Op]:
    """``lora_down_grad`` (kernels/lora.py: each program reads its columns of dy and B and all of u, writes a float32
    (m, r) partial of g and its columns of dB) and ``sum_splits`` over the partials when dy has several column
    tiles."""
    tiles = _cdiv(n, DOWN_GRAD_BLOCK_C)
    ops = [Op(f"lora_down_grad g = dy B, dB = dy^T u ({tiles} column tiles)",
              e * m * n + e * n * r + 4 * tiles * m * r + 4 * tiles * m * r + e * n * r, 4 * m * n * r, TENSOR_BF16)]
    if tiles > 1:
        ops.append(Op(f"sum_splits ({tiles} partials)", 4 * tiles * m * r + 4 * m * r, tiles * m * r, FP32_SIMT))
    return ops


def down_grad_fused(m: int, r: int) -> bool:
    """Whether the backward computes g and dB in one pass over dy (kernels/linear.py ``_backward``: at most
    ``DOWN_GRAD_MAX_M`` rows and one rank tile)."""
    return m <= DOWN_GRAD_MAX_M and r <= gpu_block_r(r)


def nf4_forward_launches(m: int, k: int, n: int, r: int, path: str, dtype: str = "bf16",
                         blocksize: int = NF4_BLOCKSIZE, triton: str | None = None, gemv_split: int | None = None,
                         gemv_block_n: int | None = None, gemv_fold: bool = True) -> tuple[Op, ...]:
    """The launches of this suite's forward ``y = x W^T + s (x A^T) B^T`` (no bias, no dropout) on NF4 ``path``
    (one of :data:`NF4_PATHS`), as the launchers of kernels/linear.py make them on a 132-SM GPU; issue from the
    static baseline of ``triton``. FLOPs ``2mnk + 2mkr + 2mnr`` (plus the dequantize pass on path "dequant").
    Path "gemv" only: ``gemv_split`` (K splits, default the launcher's, :func:`gemv_splits`) and ``gemv_block_n``
    (rows of W per program, default the launcher's; issue is charged only from a baseline build of that tile) model
    an explicit config's launch, and ``gemv_fold`` False the launch with its epilogue apart (``fold_epilogue``
    False: a second launch reads the partials back from DRAM). Folded (the launcher's default), the partials are
    written to DRAM but read back by the tile's last program right after the tile's splits wrote them, from L2
    (a few MB at most against the 40-50 MB L2 of an A100 / H100 / H200), and the arrival counts are zeroed by a
    fill launch of their own."""
    e = _linear_args(m, k, n, r, dtype, blocksize)
    _check_path(path)
    _, builds = static_builds(triton)
    if not isinstance(gemv_fold, bool):
        raise TypeError(f"gemv_fold must be a bool, got {type(gemv_fold).__name__}")
    if path == "gemv":
        split = gemv_splits(n, k, m) if gemv_split is None else _positive("gemv_split", gemv_split)
        block_n = GEMV_BLOCK_NS[gemv_block_m(m)] if gemv_block_n is None else _positive("gemv_block_n", gemv_block_n)
        partials = 4 * split * (m * n + m * r)
        launched = gemv_launch_builds(builds, m)
        issue = (fused_issue(launched, GEMV_BUILD, m, n * k, gemv_block_m(m), block_n),
                 mma_serial_targets(launched, GEMV_BUILD, gemv_block_m(m), block_n),
                 grid_programs(launched, GEMV_BUILD, m, n, gemv_block_m(m), split, block_n))
        gemv_bytes = e * m * k + nf4_storage_bytes(n * k, blocksize) + e * r * k + partials
        if gemv_fold:
            tiles = _cdiv(n, block_n)
            return (
                Op("zero_fill (arrival counts)", 4 * (tiles + 1), 0, FP32_SIMT),
                Op(f"nf4_gemv ({split} K splits, epilogue folded)", gemv_bytes + e * n * r + e * m * n + 4 * m * r,
                   2 * m * n * k + 2 * m * k * r + 2 * m * n * r, TENSOR_BF16, *issue),
            )
        return (
            Op(f"nf4_gemv ({split} K splits)", gemv_bytes, 2 * m * n * k + 2 * m * k * r, TENSOR_BF16, *issue),
            Op("gemv_epilogue", partials + e * n * r + e * m * n + 4 * m * r, 2 * m * n * r, TENSOR_BF16),
        )
    ops = _lora_down_ops("lora_down u = x A^T", m, k, r, e)
    if path == "dequant":
        ops.append(_dequantize_op(n * k, e, blocksize, per_element_issue(builds, dequantize_build(dtype, blocksize),
                                                                         n * k)))
        ops.append(Op("matmul_lora y = x W^T + s u B^T", e * m * k + e * n * k + 4 * m * r + e * n * r + e * m * n,
                      2 * m * n * k + 2 * m * n * r, TENSOR_BF16, tiled_issue(builds, DENSE_FWD_BUILD, m, n, k),
                      programs=grid_programs(builds, DENSE_FWD_BUILD, m, n)))
    else:
        ops.append(Op("matmul_lora (W dequantized in the K loop)",
                      e * m * k + nf4_storage_bytes(n * k, blocksize) + 4 * m * r + e * n * r + e * m * n,
                      2 * m * n * k + 2 * m * n * r, TENSOR_BF16,
                      *_fused_terms(builds, fused_build("fwd", k, blocksize), m, n, n * k,
                                    _fused_tile(m, k, blocksize))))
    return tuple(ops)


def nf4_backward_launches(m: int, k: int, n: int, r: int, path: str, dtype: str = "bf16",
                          blocksize: int = NF4_BLOCKSIZE, triton: str | None = None) -> tuple[Op, ...]:
    """The launches of this suite's backward (W frozen, no dropout, no bias gradient) after a forward on NF4
    ``path``: ``g = dy B``; ``dx = dy W + s g A`` (path "fused": W dequantized in the dx kernel's loop; "gemv" and
    "dequant": dequantize W again, then the dense dx GEMM, as kernels/linear.py does); ``dA = s g^T x``;
    ``dB = s dy^T u`` (with g in one launch up to ``DOWN_GRAD_MAX_M`` rows). FLOPs ``2mnk + 4mnr + 4mkr`` (plus
    the dequantize pass)."""
    e = _linear_args(m, k, n, r, dtype, blocksize)
    _check_path(path)
    _, builds = static_builds(triton)
    fused_db = down_grad_fused(m, r)
    ops = _lora_down_grad_ops(m, n, r, e) if fused_db else _lora_down_ops("lora_down g = dy B", m, n, r, e)
    if path == "fused":
        ops.append(Op("matmul_lora dx (W dequantized in the K loop)",
                      e * m * n + nf4_storage_bytes(n * k, blocksize) + 4 * m * r + e * r * k + e * m * k,
                      2 * m * n * k + 2 * m * k * r, TENSOR_BF16,
                      *_fused_terms(builds, fused_build("dx", k, blocksize), m, k, n * k,
                                    _fused_tile(m, k, blocksize))))
    else:
        ops.append(_dequantize_op(n * k, e, blocksize, per_element_issue(builds, dequantize_build(dtype, blocksize),
                                                                         n * k)))
        ops.append(Op("matmul_lora dx = dy W + s g A", e * m * n + e * n * k + 4 * m * r + e * r * k + e * m * k,
                      2 * m * n * k + 2 * m * k * r, TENSOR_BF16, tiled_issue(builds, DENSE_DX_BUILD, m, k, n),
                      programs=grid_programs(builds, DENSE_DX_BUILD, m, k)))
    ops.append(Op("lora_grad dA = g^T x", 4 * m * r + e * m * k + e * r * k, 2 * m * k * r, TENSOR_BF16))
    if not fused_db:
        ops.append(Op("lora_grad dB = dy^T u", 4 * m * r + e * m * n + e * n * r, 2 * m * n * r, TENSOR_BF16))
    return tuple(ops)


def nf4_path_times(m: int, k: int, n: int, r: int, device: Device, dtype: str = "bf16",
                   blocksize: int = NF4_BLOCKSIZE, triton: str | None = None) -> dict[str, float]:
    """``{path: predicted seconds}`` of the forward on ``device`` for each NF4 path the library can run at this
    shape (the GEMV only at ``m <= SMALL_M`` with K a multiple of the blocksize, as kernels/linear.py requires)."""
    if not isinstance(device, Device):
        raise TypeError(f"device must be a Device (one of DEVICES), got {type(device).__name__}")
    out = {}
    for path in NF4_PATHS:
        if path == "gemv" and (m > SMALL_M or k % blocksize):
            continue
        ops = nf4_forward_launches(m, k, n, r, path, dtype, blocksize, triton)
        out[path] = sum(op_roofline(op, device).predicted_s for op in ops)
    return out


def model_path(m: int, k: int, n: int, r: int, device: Device, dtype: str = "bf16", blocksize: int = NF4_BLOCKSIZE,
               triton: str | None = None) -> str:
    """The NF4 forward path this model predicts fastest at the shape on ``device`` (of :func:`nf4_path_times`)."""
    times = nf4_path_times(m, k, n, r, device, dtype, blocksize, triton)
    return min(times, key=times.get)


_PATH_TEXT = {
    "gemv": "the decode GEMV reads x, the NF4 weight (packed 0.5 B/elem + uint8 scale per block + float32 absmax2 "
            "per 256 blocks) and A once, split over K (the launcher's rule for 132 SMs), and writes float32 partials "
            "of y and u per split; the epilogue launch reads them and B and writes y (and u, float32). Issue of the "
            "GEMV from the static baseline's instructions per weight element",
    "dequant": "lora_down reads x and A and writes u (float32; split over K on 132 SMs, its partials summed by a "
               "sum_splits launch); dequantize_4bit reads the NF4 weight and writes W in the compute dtype "
               "(2 B/elem), which the dense GEMM (LoRA term in its epilogue) reads back with x, u and B, writing y. "
               "Issue of the dequantize launch (instructions per element) and of the GEMM (main-loop instructions x "
               "warps x K steps x tiles) from the static baseline",
    "fused": "lora_down as on the dequantize path; the fused tiled kernel reads x again, the NF4 weight, u and B "
             "and writes y, each row tile (64 rows up to 64, else 128) decoding all of W in its K loop. Issue from "
             "the static baseline's instructions per weight element x weight elements x row tiles (the byte-pair "
             "build where K is a multiple of the blocksize, the per-code build otherwise)",
}


def lora_forward(m: int, k: int, n: int, r: int, approach: str = "qlora_default", dtype: str = "bf16",
                 blocksize: int = NF4_BLOCKSIZE, triton: str | None = None, target: str = DEFAULT_TARGET) -> Workload:
    """Forward of a LoRA linear ``y = x W^T + s * (x A^T) B^T``: x (m, k), W (n, k), A (r, k), B (n, r), y (m, n).

    ``approach``: ``"qlora_default"`` (this suite's default dispatch on ``target``: :func:`default_path`),
    ``"fused"`` (this suite's fused tiled path, W in NF4 dequantized tile by tile inside the GEMM), ``"dequant_matmul"``
    (bitsandbytes / unsloth in torch: dequantize W to a dense tensor, then separate matmuls) or ``"dense"`` (W
    stored in ``dtype``, torch matmuls). FLOPs ``2mnk + 2mkr + 2mnr`` for all (plus the dequantize pass).
    """
    e = _linear_args(m, k, n, r, dtype, blocksize)
    _check_approach(approach)
    family = "lora_decode" if m <= SMALL_M else "lora_fwd"
    name = _linear_name("fwd", m, k, n, r, approach, dtype)
    if approach in ("qlora_default", "fused"):
        path = default_path(m, k, blocksize, target) if approach == "qlora_default" else "fused"
        what = f"path {path!r}" + (" (the default dispatch)" if approach == "qlora_default" else "")
        return Workload(name, family, approach, nf4_forward_launches(m, k, n, r, path, dtype, blocksize, triton),
                        f"{what}: {_PATH_TEXT[path]}.",
                        baseline=_linear_name("fwd", m, k, n, r, "dequant_matmul", dtype))
    ops = [] if approach == "dense" else [_dequantize_op(n * k, e, blocksize)]
    ops += [
        Op("matmul x W^T", e * m * k + e * n * k + e * m * n, 2 * m * n * k, TENSOR_BF16),
        Op("lora_down u = x A^T", e * m * k + e * r * k + e * m * r, 2 * m * k * r, TENSOR_BF16),
        Op("lora_up y += s u B^T (addmm)", e * m * r + e * n * r + 2 * e * m * n, 2 * m * n * r, TENSOR_BF16),
    ]
    what = ("dequantize_nf4 writes W densely (2 B/elem) and the matmul reads it back"
            if approach == "dequant_matmul" else f"W stored in {dtype}, read once by the matmul")
    return Workload(
        name, family, approach, tuple(ops),
        f"{what}; the LoRA branch is two more matmuls that read x again, write and read u ({dtype}), and add "
        f"into y with addmm (reads and writes y once more). PEFT's separate scale and add would cost three more "
        f"m x n passes; bitsandbytes' fused 4-bit GEMV (inference, m = 1, no autograd) is not this path. Issue "
        f"not modelled (torch's and bitsandbytes' kernels).",
    )


def lora_backward(m: int, k: int, n: int, r: int, approach: str = "qlora_default", dtype: str = "bf16",
                  blocksize: int = NF4_BLOCKSIZE, triton: str | None = None, target: str = DEFAULT_TARGET) -> Workload:
    """Backward of :func:`lora_forward` with W frozen: ``dx = dy W + s (dy B) A``, ``dA = s (dy B)^T x``,
    ``dB = s dy^T u``; dy (m, n), g = dy B (m, r). FLOPs ``2mnk + 4mnr + 4mkr`` for every approach
    (dy W; dy B and dy^T u; g A and g^T x), plus the dequantize pass where W is dequantized."""
    e = _linear_args(m, k, n, r, dtype, blocksize)
    _check_approach(approach)
    name = _linear_name("bwd", m, k, n, r, approach, dtype)
    if approach in ("qlora_default", "fused"):
        path = default_dx_path(m, k, blocksize, target) if approach == "qlora_default" else "fused"
        dx = ("dequantize_4bit writes W in the compute dtype again (nothing is kept from the forward) and the dense "
              "dx GEMM (LoRA term in its epilogue) reads it back with dy, g and A" if path == "dequant" else
              "the fused tiled dx kernel reads dy again, the NF4 weight, g and A, each row tile decoding all of W "
              "in its K loop")
        return Workload(
            name, "lora_bwd", approach, nf4_backward_launches(m, k, n, r, path, dtype, blocksize, triton),
            f"path {path!r}{' (the default dispatch)' if approach == 'qlora_default' else ''}: "
            + ("g = dy B and dB = dy^T u in one launch (reads dy, B and u, writes float32 partials of g per 64 "
               "columns of dy, summed by a sum_splits launch, and dB)" if down_grad_fused(m, r) else
               "g = dy B (reads dy and B, writes g float32; split over N on 132 SMs with a sum_splits launch)")
            + f"; {dx}; dA = g^T x (reads g and x)"
            + ("" if down_grad_fused(m, r) else "; dB = dy^T u (reads dy a third time and u)")
            + ". Issue of the dx launch (and of the dequantize launch) from the static baseline; the LoRA helpers' "
              "issue not modelled.",
            baseline=_linear_name("bwd", m, k, n, r, "dequant_matmul", dtype),
        )
    ops = [] if approach == "dense" else [_dequantize_op(n * k, e, blocksize)]
    ops += [
        Op("matmul dx = dy W", e * m * n + e * n * k + e * m * k, 2 * m * n * k, TENSOR_BF16),
        Op("lora g = dy B", e * m * n + e * n * r + e * m * r, 2 * m * n * r, TENSOR_BF16),
        Op("lora dB = dy^T u", e * m * n + e * m * r + e * n * r, 2 * m * n * r, TENSOR_BF16),
        Op("lora dA = g^T x", e * m * r + e * m * k + e * r * k, 2 * m * k * r, TENSOR_BF16),
        Op("lora dx += g A (addmm)", e * m * r + e * r * k + 2 * e * m * k, 2 * m * k * r, TENSOR_BF16),
    ]
    what = ("dequantize_nf4 writes W densely again (autograd does not keep it) and dy W reads it back"
            if approach == "dequant_matmul" else f"W stored in {dtype}, read once by dy W")
    return Workload(
        name, "lora_bwd", approach, tuple(ops),
        f"{what}; the LoRA gradients are four separate matmuls (dy is read three times, x once, g and u in "
        f"{dtype}), the last adding into dx with addmm (reads and writes dx once more). Issue not modelled.",
    )


# --------------------------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------------------------

ADAMW_VARIANTS = ("torch_fused", "adamw32", "adamw8bit")


def adamw(numel: int, variant: str = "adamw32", triton: str | None = None) -> Workload:
    """One AdamW step over ``numel`` float32 parameters with float32 gradients.

    ``variant``: ``"adamw32"`` (this suite, float32 moments), ``"adamw8bit"`` (this suite, uint8 moment codes with
    a float32 absmax per 256 elements each) or ``"torch_fused"`` (``torch.optim.AdamW(fused=True)``, float32
    moments: the same bytes as ``adamw32``, the 32-bit reference). ``triton``: whose static baseline gives the
    instruction counts of this suite's kernels (default: the newest committed; torch's kernel: not modelled).
    """
    _positive("numel", numel)
    if variant not in ADAMW_VARIANTS:
        raise ValueError(f"variant must be one of {ADAMW_VARIANTS}, got {variant!r}")
    size = _count_name(numel)
    issue = ()
    if variant in ADAMW_BUILD:
        _, builds = static_builds(triton)
        issue = per_element_issue(builds, ADAMW_BUILD[variant], numel)
    if variant == "adamw8bit":
        # p read+write 8, g 4, m and v codes read+write 1+1 each, each absmax read+written once per 256 elements.
        nbytes = 8 * numel + 4 * numel + 2 * numel + 2 * numel + 2 * 2 * 4 * _cdiv(numel, ADAM8_BLOCKSIZE)
        op = Op("adamw8bit_step", nbytes, ADAMW8_FLOPS_PER_ELEM * numel, FP32_SIMT, issue)
        return Workload(
            f"adamw8bit_{size}_fp32", "optim", "qlora", (op,),
            "p read+write 8 B, g read 4 B, m and v uint8 codes read+write 2 B each, a float32 absmax per 256 "
            "elements for m and for v read+written (1/16 B/elem): 16.0625 B/elem. Issue time from the static "
            "baseline's instructions per element.",
            baseline=f"torch_adamw_fused_{size}_fp32",
        )
    # p read+write 8, g read 4, m read+write 8, v read+write 8: 28 B/elem.
    op = Op(f"{variant}_step", 28 * numel, ADAMW_FLOPS_PER_ELEM * numel, FP32_SIMT, issue)
    if variant == "torch_fused":
        return Workload(f"torch_adamw_fused_{size}_fp32", "optim", "torch", (op,),
                        "torch.optim.AdamW(fused=True): p, m, v read+written (8 B each), g read (4 B): 28 B/elem.")
    return Workload(f"adamw32_{size}_fp32", "optim", "qlora", (op,),
                    "p, m, v read+written (8 B each), g read (4 B): 28 B/elem. Issue time from the static "
                    "baseline's instructions per element.",
                    baseline=f"torch_adamw_fused_{size}_fp32")


def default_workloads(triton: str | None = None, target: str = DEFAULT_TARGET) -> list[Workload]:
    """The named workloads the report covers (4096 x 4096 weights, r = 16, bf16, 64M optimizer parameters);
    ``triton``: whose static baseline gives the instruction counts (default: the newest committed); ``target``:
    whose default dispatch the "qlora_default" workloads follow."""
    dim, rank = 4096, 16
    out = [nf4_quantize(dim, dim, triton=triton), nf4_dequantize(dim, dim, triton=triton)]
    for approach in LINEAR_APPROACHES:
        out.append(lora_forward(4096, dim, dim, rank, approach, triton=triton, target=target))
    for approach in LINEAR_APPROACHES:
        out.append(lora_backward(4096, dim, dim, rank, approach, triton=triton, target=target))
    for m in (1, 4, 16):
        for approach in LINEAR_APPROACHES:
            out.append(lora_forward(m, dim, dim, rank, approach, triton=triton, target=target))
    for variant in ADAMW_VARIANTS:
        out.append(adamw(64 << 20, variant, triton=triton))
    return out


# --------------------------------------------------------------------------------------------------------------
# Roofline rows
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpTime:
    """Roofline of one launch on one device. Times in seconds; ``bound`` is ``"memory"`` or ``"compute"``."""

    name: str
    unit: str
    bytes: int
    flops: int
    memory_s: float
    compute_s: float
    issue_s: float
    predicted_s: float
    bound: str


@dataclass(frozen=True)
class RooflineRow:
    """Roofline of one workload on one device.

    ``bytes``/``flops``: totals over the launches; ``intensity``: flops / bytes (FLOP/byte). ``memory_s``: bytes
    over HBM bandwidth; ``compute_s``: each launch's flops over its unit's peak, summed; ``issue_s``: each launch's
    warp-instructions over the issue rate, summed (0 where not modelled); ``predicted_s``: the sum over launches
    of ``max(memory, compute, issue)``. ``bound``: ``"memory"``, ``"compute"`` or ``"issue"`` when every launch
    is, else ``"mixed"``; ``compute_share``: the fraction of ``predicted_s`` spent in launches bound by compute or
    issue. ``speedup``: the ``baseline`` workload's predicted time over this one's, on
    the same device (None without a baseline).
    """

    workload: str
    family: str
    approach: str
    device: str
    bytes: int
    flops: int
    intensity: float
    memory_s: float
    compute_s: float
    issue_s: float
    predicted_s: float
    bound: str
    compute_share: float
    baseline: str | None
    speedup: float | None
    assumptions: str
    ops: tuple[OpTime, ...]


def op_roofline(op: Op, device: Device) -> OpTime:
    """``max(bytes / bandwidth, flops / peak, warp-instructions / issue rate)`` of one launch, or
    ``max(bytes / bandwidth, flops / peak + warp-instructions / issue rate)`` where the launch's MMA and issue do
    not overlap (``op.mma_serial``); a grid of P < SMs programs (``op.programs``) has only P SMs' tensor and issue
    rates. The bound is the largest term (compute or issue only when strictly larger than memory; issue over
    compute likewise)."""
    memory_s = op.bytes / device.hbm_bytes_per_s
    compute_s = op.flops / device.peak(op.unit)
    count = op.issue_count(device.target)
    issue_s = count / device.issue_per_s if count and device.issue_per_s else 0.0
    programs = op.program_count(device.target)
    if programs and device.sms and programs < device.sms:
        # Fewer programs than SMs: only that many SMs issue and run MMAs (HBM time is left as it is).
        compute_s *= device.sms / programs
        issue_s *= device.sms / programs
    bound = "compute" if compute_s > memory_s else "memory"
    if issue_s > max(memory_s, compute_s):
        bound = "issue"
    if device.target in op.mma_serial:
        predicted = max(memory_s, compute_s + issue_s)
        if predicted > memory_s:
            bound = "issue" if issue_s > compute_s else "compute"
    else:
        predicted = max(memory_s, compute_s, issue_s)
    return OpTime(op.name, op.unit, op.bytes, op.flops, memory_s, compute_s, issue_s, predicted, bound)


def roofline(workload: Workload, device: Device, baseline_s: float | None = None) -> RooflineRow:
    """The row of ``workload`` on ``device``; ``baseline_s``: the baseline's predicted seconds on that device."""
    times = tuple(op_roofline(op, device) for op in workload.ops)
    predicted = sum(t.predicted_s for t in times)
    compute_s = sum(t.predicted_s for t in times if t.bound != "memory")
    bounds = {t.bound for t in times}
    return RooflineRow(
        workload=workload.name,
        family=workload.family,
        approach=workload.approach,
        device=device.key,
        bytes=workload.bytes,
        flops=workload.flops,
        intensity=workload.intensity,
        memory_s=sum(t.memory_s for t in times),
        compute_s=sum(t.compute_s for t in times),
        issue_s=sum(t.issue_s for t in times),
        predicted_s=predicted,
        bound=bounds.pop() if len(bounds) == 1 else "mixed",
        compute_share=compute_s / predicted,
        baseline=workload.baseline,
        speedup=None if baseline_s is None else baseline_s / predicted,
        assumptions=workload.assumptions,
        ops=times,
    )


def resolve_devices(selection: str = "all") -> list[Device]:
    """``"all"`` or one key of :data:`DEVICES`."""
    if selection == "all":
        return list(DEVICES.values())
    if selection not in DEVICES:
        raise ValueError(f"device must be 'all' or one of {sorted(DEVICES)}, got {selection!r}")
    return [DEVICES[selection]]


def rows(devices: str | list[Device] = "all", workloads: list[Workload] | None = None,
         triton: str | None = None) -> list[RooflineRow]:
    """Rows of ``workloads`` (default :func:`default_workloads` for each device's target) on each device, grouped by
    device.

    A workload whose ``baseline`` is not among ``workloads`` gets ``speedup`` None."""
    devs = resolve_devices(devices) if isinstance(devices, str) else list(devices)
    out = []
    for device in devs:
        loads = default_workloads(triton, device.target) if workloads is None else list(workloads)
        by_name = {w.name: w for w in loads}
        if len(by_name) != len(loads):
            raise ValueError("workloads must have distinct names")
        for w in loads:
            base = by_name.get(w.baseline) if w.baseline else None
            base_s = roofline(base, device).predicted_s if base is not None else None
            out.append(roofline(w, device, base_s))
    return out


def as_dicts(table: list[RooflineRow]) -> list[dict]:
    """JSON-ready dicts of ``table`` (nested launches included)."""
    return [asdict(row) for row in table]


def _fmt_us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:.3g}" if us < 10 else f"{us:,.1f}"


def format_table(table: list[RooflineRow]) -> str:
    """Readable report: per device, its peaks and one line per workload; then each workload's assumptions."""
    headers = ("workload", "MB", "GFLOP", "FLOP/B", "mem us", "comp us", "issue us", "pred us", "bound", "speedup")
    lines: list[str] = []
    devices = [d for d in DEVICES.values() if any(r.device == d.key for r in table)]
    for device in devices:
        body = []
        for row in (r for r in table if r.device == device.key):
            bound = row.bound if row.bound != "mixed" else f"mixed ({row.compute_share:.0%} compute/issue)"
            speedup = "" if row.speedup is None else f"{row.speedup:.2f}x vs {_baseline_label(row.baseline)}"
            body.append((row.workload, f"{row.bytes / 1e6:,.2f}", f"{row.flops / 1e9:,.3f}", f"{row.intensity:,.1f}",
                         _fmt_us(row.memory_s), _fmt_us(row.compute_s),
                         _fmt_us(row.issue_s) if row.issue_s else "-", _fmt_us(row.predicted_s), bound, speedup))
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
        lines.append(f"{device.name}: HBM {device.hbm_bytes_per_s / 1e12:.3f} TB/s, "
                     f"BF16 tensor {device.bf16_tensor_flops / 1e12:.1f} TFLOP/s "
                     f"(ridge {device.ridge(TENSOR_BF16):.0f} FLOP/B), FP32 {device.fp32_flops / 1e12:.1f} TFLOP/s "
                     f"(ridge {device.ridge(FP32_SIMT):.1f} FLOP/B)")
        # The workload column is left-aligned, the figures right-aligned; the last two are text.
        align = ["<"] + [">"] * 7 + ["<", "<"]
        for cells in (headers, *body):
            lines.append("  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, align, widths)).rstrip())
        lines.append("")
    lines.append("A static model, not a timing. MB = 1e6 bytes of DRAM traffic; us = microseconds; issue = warp-"
                 "instructions over SMs x 4 x clock ('-': not modelled); pred = sum over launches of max(mem, comp, "
                 "issue), or max(mem, comp + issue) for a launch whose loop waits for its warpgroup MMAs with one CTA "
                 "per SM (mma_serial_targets); 'mixed (N% compute/issue)' = N% of that time in launches bound by "
                 "compute or issue.")
    lines.append("Assumptions:")
    # Workloads that differ only in shape share their text: list it once, under all their names.
    names_by_text: dict[str, list[str]] = {}
    for row in table:
        names = names_by_text.setdefault(row.assumptions, [])
        if row.workload not in names:
            names.append(row.workload)
    for text, names in names_by_text.items():
        lines.append(f"- {', '.join(names)}: {text}")
    return "\n".join(lines)


def _baseline_label(name: str | None) -> str:
    for prefix in ("nf4_dequant_matmul", "torch_adamw_fused"):
        if name and name.startswith(prefix):
            return prefix
    return str(name)
