"""As-launched specialization: what Triton's launcher would compile for one launch, computed by Triton's own code.

A launch ``kernel[grid](*args, **kwargs)`` runs ``JITFunction.run``, which binds the arguments with the function
that ``triton.runtime.jit.create_function_from_signature`` generates (each argument through Triton's
``specialize_impl``: ints equal to 1 become constants, multiples of 16 are marked divisible by 16, pointers get
their alignment), then ``JITFunction._pack_args`` turns that into the compile inputs (signature, constexprs,
attributes, options). This module calls exactly those two entry points, with the backend of the chosen target
instead of the active driver's, so no GPU is needed. Both exist with the same arguments in triton 3.6 and 3.9;
``tests/test_perf_specialize.py`` checks the result against a launch through ``JITFunction.run`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Triton type strings of the pointer element types the kernels use, and the torch dtypes a launch passes.
_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "u8": "uint8", "i8": "int8",
                 "i32": "int32", "i64": "int64", "u32": "uint32", "fp64": "float64", "i16": "int16"}
ALIGNED_ADDRESS = 1 << 20  # a fresh torch allocation: 256-byte aligned (so divisible by 16)


class LaunchPointer:
    """Stands for a tensor argument: what ``specialize_impl`` reads of one (``data_ptr()`` and ``dtype``)."""

    def __init__(self, dtype, address: int = ALIGNED_ADDRESS):
        self.dtype = dtype
        self._address = address

    def data_ptr(self) -> int:
        return self._address

    def __repr__(self) -> str:
        return f"LaunchPointer({self.dtype}, 0x{self._address:x})"


@dataclass(frozen=True)
class Specialization:
    """The compile inputs of one launch: ``signature`` {arg: type or "constexpr"}, ``constexprs`` {(i,): value},
    ``attrs`` {(i,): [[attribute, value]]} and ``options`` (the backend's options object)."""

    signature: dict[str, str]
    constexprs: dict[tuple, Any]
    attrs: dict[tuple, list]
    options: Any

    def summary(self) -> dict[str, str]:
        """{arg: "constexpr=1" | "i32 div16" | "*bf16 div16" | "fp32"} for reports and the dump."""
        names = list(self.signature)
        out = {}
        for i, name in enumerate(names):
            kind = self.signature[name]
            if kind == "constexpr":
                out[name] = f"constexpr={self.constexprs.get((i,))!r}"
                continue
            flags = [f"div{v}" for a, v in self.attrs.get((i,), []) if a == "tt.divisibility"]
            out[name] = " ".join([kind, *flags])
        return out


def launch_arguments(spec, target_name: str | None = None) -> tuple[list, dict]:
    """``(args, kwargs)`` of the launch ``spec`` stands for: a pointer stand-in per pointer argument, the values of
    :meth:`KernelSpec.launch_values` for scalars, the constexprs and launch options as keywords (those of the launch
    on ``target_name``, :meth:`KernelSpec.options_for`, when given)."""
    import torch

    values = spec.launch_values()
    # Every argument by name: a spec may pin a runtime int (a unit stride) as "constexpr" with its launch value,
    # which Triton's binder then specializes exactly as it would the int 1 of a real launch.
    args = []
    kwargs = {}
    for name in spec.fn.arg_names:
        kind = spec.signature.get(name)
        if kind is None:
            raise ValueError(f"spec {spec.name}: argument {name!r} of {spec.fn.__name__} missing from its signature")
        if kind == "constexpr":
            if name not in spec.constexprs:
                raise ValueError(f"spec {spec.name}: constexpr {name!r} has no value")
            kwargs[name] = spec.constexprs[name]
        elif kind.startswith("*"):
            element = kind[1:]
            if element not in _TORCH_DTYPES:
                raise ValueError(f"spec {spec.name}: pointer type {kind!r} of {name!r} is not one of "
                                 f"{sorted('*' + t for t in _TORCH_DTYPES)}")
            kwargs[name] = LaunchPointer(getattr(torch, _TORCH_DTYPES[element]))
        else:
            kwargs[name] = values[name]
    return args, {**kwargs, **(spec.options if target_name is None else spec.options_for(target_name))}


def _run_defaults(fn) -> dict:
    """The option keywords ``JITFunction.run`` adds before binding (debug and the knobs it reads), as it does."""
    from triton import knobs

    extra = {"debug": getattr(fn, "debug", None) or knobs.runtime.debug}
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # 3.6 reads the first, 3.9 both
        if hasattr(knobs.compilation, knob):
            extra[knob] = getattr(knobs.compilation, knob)
    return extra


def specialize(fn, args: list, kwargs: dict, target) -> Specialization:
    """Triton's own specialization of ``fn[grid](*args, **kwargs)`` for ``target`` (a ``GPUTarget``)."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**kwargs, **_run_defaults(fn)}
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    # 3.9 lists every argument in attrs (empty for constants), 3.6 only those with attributes: keep the non-empty.
    attrs = {path: value for path, value in attrs.items() if value}
    return Specialization(dict(signature), dict(constexprs), attrs, options)


def target_name(target) -> str:
    """``"sm_90"`` for ``GPUTarget("cuda", 90, 32)``, ``"gfx942"`` for ``GPUTarget("hip", "gfx942", 64)``."""
    return f"sm_{target.arch}" if target.backend == "cuda" else str(target.arch)


def specialize_spec(spec, target) -> Specialization:
    args, kwargs = launch_arguments(spec, target_name(target))
    return specialize(spec.fn, args, kwargs, target)
