"""Compile specifications for the static performance layer (``python -m perf static``).

Each kernel module exposes ``compile_specs() -> list[KernelSpec]``: one entry per kernel and per launch
config it can use on a GPU (every autotune config included). ``perf`` specializes each spec as Triton's launcher
would for the launch it stands for, compiles it for sm_80, sm_90, gfx942 and gfx90a (no GPU needed) and reads
resources and the instruction stream of the binary (``perf/README.md``).

The optional fields describe that launch and the work of one main-loop iteration. A spec that leaves them out
gets the defaults of :meth:`KernelSpec.launch_values` and :meth:`KernelSpec.weight_elements`, derived from the
argument names by this package's conventions; ``perf static`` marks such builds ``launch: inferred`` so a kernel
author can see which numbers rest on the convention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Default value of an int argument the spec does not give: a large size that is a multiple of 16 (and so
# specialized as divisible by 16), standing for the 4096-sized shapes the roofline uses.
DEFAULT_INT_ARG = 4096
DEFAULT_FLOAT_ARG = 0.5


@dataclass(frozen=True)
class KernelSpec:
    """One compilable instance of a ``@triton.jit`` kernel.

    ``signature`` maps every argument name to a Triton type string (``"*fp32"``, ``"*u8"``, ``"i64"``,
    ``"fp32"``, or ``"constexpr"``); ``constexprs`` gives each constexpr's value. ``options`` are compile
    options (``num_warps``, ``num_stages``, ``enable_fp_fusion``) exactly as the launcher passes them.

    Optional, describing the launch this build stands for:

    - ``launch_args``: values of the non-constexpr scalar arguments (``{"M": 1, "stride_xk": 1, ...}``); Triton's
      launcher specializes on them (an int equal to 1 becomes a constant, a multiple of 16 is marked divisible
      by 16). Missing names get :meth:`launch_values`' defaults. Pointer arguments are always taken as fresh
      16-byte-aligned allocations of the signature's dtype.
    - ``regime``: the launches this build serves, in words (``"M<=16"``, ``"M>16"``, ``"any"``).
    - ``weight_elements_per_iteration``: the elements one main-loop iteration of one program handles, for the
      instructions-per-element figure: NF4 weight elements dequantized (linear kernels), or elements quantized,
      dequantized or stepped (quantize and optimizer kernels; for a kernel without a loop, the elements one
      program handles, over which its whole instruction stream is counted); 0 for no per-element figure.
    - ``weight_arg``: the argument holding the packed weight bytes (for the widest-load figure).
    - ``targets``: the compile targets (``"sm_80"``, ``"sm_90"``, ``"gfx942"``, ``"gfx90a"``) on which a launcher
      picks this build; None for all. A config chosen per GPU architecture is built only where it is launched.
    - ``target_options``: compile options the launcher adds on some targets only (``{"sm_80": {"maxnreg": 168}}``),
      over ``options`` (:meth:`options_for`).
    """

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    launch_args: dict[str, Any] | None = None
    regime: str | None = None
    weight_elements_per_iteration: int | None = None
    weight_arg: str | None = None
    targets: tuple[str, ...] | None = None
    target_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def options_for(self, target: str) -> dict[str, Any]:
        """The compile options of the launch on ``target`` (a target name such as ``"sm_80"``)."""
        return {**self.options, **self.target_options.get(target, {})}

    def launch_values(self) -> dict[str, Any]:
        """Value of every non-constexpr, non-pointer argument for the launch this build stands for.

        ``launch_args`` first; then the convention: strides are named ``stride_<tensor><dim>`` with a tensor's
        dims in storage order, so of the stride arguments that differ only in their last letter the last one is
        the unit (contiguous) stride, 1, and the others :data:`DEFAULT_INT_ARG`; every other int argument is
        :data:`DEFAULT_INT_ARG` and every float argument :data:`DEFAULT_FLOAT_ARG`.
        """
        given = dict(self.launch_args or {})
        unknown = set(given) - set(self.signature)
        if unknown:
            raise ValueError(f"launch_args of {self.name} name arguments the kernel does not have: {sorted(unknown)}")
        scalars = self._scalar_args()
        # The unit stride of a tensor is its last stride argument, constexpr or not: when that one is a
        # compile-time 1, every runtime stride of the tensor is an outer one.
        unit_strides = set()
        strides = [a for a in self.signature if a.startswith("stride_") and len(a) > len("stride_") + 1]
        for arg in strides:
            same_tensor = [s for s in strides if s[:-1] == arg[:-1]]
            unit_strides.add(same_tensor[-1])
        values = {}
        for arg in scalars:
            if arg in given:
                values[arg] = given[arg]
            elif self.signature[arg].startswith(("fp", "bf")):
                values[arg] = DEFAULT_FLOAT_ARG
            else:
                values[arg] = 1 if arg in unit_strides else DEFAULT_INT_ARG
        return values

    @property
    def launch_inferred(self) -> bool:
        """True when some scalar argument's value comes from the naming convention, not ``launch_args``."""
        return any(a not in (self.launch_args or {}) for a in self._scalar_args())

    def _scalar_args(self) -> list[str]:
        """The runtime scalar arguments (neither constexpr nor pointer), in signature order."""
        return [a for a, kind in self.signature.items() if kind != "constexpr" and not kind.startswith("*")]

    def weight_elements(self) -> int:
        """``weight_elements_per_iteration``, else the convention: a kernel with a ``packed_ptr`` argument
        dequantizes a (BLOCK_N, BLOCK_K) weight tile per iteration; other kernels read no NF4 weight (0)."""
        if self.weight_elements_per_iteration is not None:
            return int(self.weight_elements_per_iteration)
        if self.packed_weight_arg() and {"BLOCK_N", "BLOCK_K"} <= set(self.constexprs):
            return int(self.constexprs["BLOCK_N"]) * int(self.constexprs["BLOCK_K"])
        return 0

    def packed_weight_arg(self) -> str | None:
        """``weight_arg``, else ``packed_ptr`` when the kernel has it, else None."""
        if self.weight_arg is not None:
            return self.weight_arg
        return "packed_ptr" if "packed_ptr" in self.signature else None
