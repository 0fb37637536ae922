"""Functional QLoRA linear layer over the NF4 + LoRA kernels (docs/SPEC.md section 6).

``qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None, dropout_p=0.0, training=True)`` computes
``y = x @ W^T + scaling * (dropout(x) @ A^T) @ B^T + bias`` for an NF4 base weight ``W``; gradients flow to ``x``,
``lora_A``, ``lora_B`` and ``bias``, never to ``W``. Eager calls run the autograd Function of :mod:`qlora._eager`;
under ``torch.compile`` the custom operators of :mod:`qlora.ops` are traced instead (no graph break, same bits).
Dropout (``training`` and ``dropout_p > 0``) draws one seed tensor per call from torch's default generator; the
forward generates the bit-packed keep mask from it once and the backward reads that mask. :func:`dropout_mask`
materializes the same mask for a given seed. Paths, launches and the compiled seed: docs/DESIGN.md.
"""

from __future__ import annotations

import math
import numbers
import struct

import numpy as np
import torch

from .kernels import linear as _linear
from .kernels._checks import FLOAT_DTYPES, check_backend_device, check_same_device
from ._eager import DOUBLE_BACKWARD_MESSAGE, NF4LoRAFunction
from .nf4 import NF4Weight
from .ops import nf4_lora_forward as _forward_op

__all__ = ["qlora_linear", "dropout_mask"]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _fits_float32(value: float) -> bool:
    """Whether ``value`` rounds to a finite float32 (pure Python, no tensor)."""
    try:
        return math.isfinite(struct.unpack("f", struct.pack("f", value))[0])
    except OverflowError:  # older Pythons raise instead of rounding to inf
        return False


def _check_inputs(x, weight, lora_A, lora_B, scaling, bias, dropout_p, training):
    """Every argument checked against the others; each error names the argument at fault.

    This runs on every call, so it checks only what a call can change: the weight is an immutable
    :class:`~qlora.nf4.NF4Weight`, validated in full (shapes, dtypes, one device) when it was built, so its
    fields are trusted here. Devices are compared to x's; the backend rule (CPU under the interpreter, CUDA
    otherwise) is checked on x alone, and on another tensor only when it sits elsewhere (for its message).
    """
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be a qlora.nf4.NF4Weight (use qlora.nf4.quantize_nf4), got "
                        f"{type(weight).__name__}")
    shape = weight.shape
    if len(shape) != 2:
        raise ValueError(f"weight must be 2-dimensional (out_features, in_features), got shape {tuple(shape)}")
    out_features, in_features = shape
    for name, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtype = x.dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {_dtype_name(dtype)}")
    x_shape = x.shape
    if not x_shape or x_shape[-1] != in_features:
        raise ValueError(f"x must have shape (..., {in_features}) to match the weight's in_features, got "
                         f"{tuple(x_shape)}")
    a_shape = lora_A.shape
    if len(a_shape) != 2 or a_shape[0] < 1 or a_shape[1] != in_features:
        raise ValueError(f"lora_A must have shape (r, {in_features}) with r >= 1, got {tuple(a_shape)}")
    rank = a_shape[0]
    if lora_B.shape != (out_features, rank):
        raise ValueError(f"lora_B must have shape ({out_features}, {rank}) (out_features, r of lora_A), got "
                         f"{tuple(lora_B.shape)}")
    if lora_A.dtype != dtype or lora_B.dtype != dtype:
        name, t = ("lora_A", lora_A) if lora_A.dtype != dtype else ("lora_B", lora_B)
        raise TypeError(f"{name} has dtype {_dtype_name(t.dtype)} but x has {_dtype_name(dtype)}; they must match")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        if bias.dtype != dtype:
            raise TypeError(f"bias has dtype {_dtype_name(bias.dtype)} but x has {_dtype_name(dtype)}; "
                            "they must match")
    device = x.device
    check_backend_device("x", x)
    w_device = weight.packed.device
    if (w_device != device or lora_A.device != device or lora_B.device != device
            or (bias is not None and bias.device != device)):
        named = dict(x=x, weight=weight.packed, lora_A=lora_A, lora_B=lora_B, bias=bias)
        for name, t in named.items():
            if t is not None:
                check_backend_device(name, t)
        check_same_device(**named)
    if type(scaling) is not float:
        if isinstance(scaling, torch.Tensor) and scaling.numel() == 1:
            scaling = scaling.item()
        # numbers.Real: Python and NumPy ints and floats (numpy.float32 included), not bool.
        if isinstance(scaling, (bool, np.bool_)) or not isinstance(scaling, numbers.Real):
            raise TypeError(f"scaling must be a finite real number, got {scaling!r}")
    if not math.isfinite(scaling):
        raise TypeError(f"scaling must be a finite real number, got {scaling!r}")
    if not _fits_float32(float(scaling)):
        raise ValueError(f"scaling must be within float32's range (the kernels multiply by it in float32), got "
                         f"{scaling!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if training is not True and training is not False:
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    return float(scaling), float(dropout_p)


def qlora_linear(x: torch.Tensor, weight: NF4Weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                 bias: torch.Tensor | None = None, dropout_p: float = 0.0, training: bool = True, *,
                 seed: int | None = None) -> torch.Tensor:
    """``x @ W^T + scaling * (dropout(x) @ lora_A^T) @ lora_B^T + bias`` with ``W`` the NF4 ``weight``.

    Args:
        x: (..., in_features), float32/float16/bfloat16, any strides; leading dims are flattened.
        weight: :class:`~qlora.nf4.NF4Weight` of shape (out_features, in_features), dequantized to x's dtype
            inside the kernel (whatever dtype it was quantized from).
        lora_A: (r, in_features), lora_B: (out_features, r), bias: (out_features,) or None (any strides); all in
            x's dtype.
        scaling: ``lora_alpha / r``: any finite real scalar within float32's range (Python, NumPy or a
            one-element tensor).
        dropout_p: LoRA dropout probability in [0, 1), applied to x on the adapter path only, when ``training``.
        seed: dropout seed in [0, 2**31); None draws one from torch's default generator. ``dropout_mask(seed,
            x.shape, dropout_p)`` is the mask that was applied.

    Returns:
        (..., out_features) in x's dtype. Differentiable in x, lora_A, lora_B and bias (first order; double
        backward raises a RuntimeError saying it is unsupported).

    Eager calls go through :class:`qlora._eager.NF4LoRAFunction` (the launchers, without the custom operators'
    dispatch cost); under ``torch.compile`` the custom operators of :mod:`qlora.ops` are traced. Both run the
    same launchers with the same arguments: results are bit-identical.
    """
    scaling, dropout_p = _check_inputs(x, weight, lora_A, lora_B, scaling, bias, dropout_p, training)
    p = dropout_p if training else 0.0
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31):
        raise ValueError(f"seed must be None or an int in [0, 2**31), got {seed!r}")
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()  # the kernel reads it densely; autograd maps the gradient back to the view
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    seed_t = None
    if p > 0:
        # The seed travels as a one-element int64 tensor on x's device, read only by the kernels (qlora/ops.py):
        # under torch.compile the draw is a graph node rather than a host-side .item() (a graph break), nothing
        # reads a device tensor on the host (CUDA graphs can capture the layer), and eager and compiled calls take
        # the same draw from the default generator.
        seed_t = (torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=x.device) if seed is None
                  else torch.tensor([seed], dtype=torch.int64, device=x.device))
    if not torch.compiler.is_compiling():
        y = NF4LoRAFunction.apply(x2d, lora_A, lora_B, bias, weight, scaling, p, 0 if seed_t is None else seed_t)
        return y.reshape(*lead, weight.shape[0])
    y, _, _ = _forward_op(x2d, weight.packed, weight.absmax, weight.code, list(weight.shape), weight.blocksize,
                       weight.absmax2, weight.offset, weight.nested_code, weight.nested_blocksize, lora_A, lora_B,
                       scaling, bias, p, seed_t)
    return y.reshape(*lead, weight.shape[0])


def _double_backward_unsupported(ctx, *grads):
    raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)


# The backward operator gets an autograd formula only to say that: without one, torch raises its generic "no autograd
# formula was registered" when a second-order gradient reaches it. First-order backward never records it.
torch.library.register_autograd("qlora::nf4_lora_backward", _double_backward_unsupported,
                                setup_context=lambda ctx, inputs, output: None)


def dropout_mask(seed: int, shape, p: float, device: torch.device | str | None = None) -> torch.Tensor:
    """The scaled dropout keep mask (float32, entries 0 or ``1/(1-p)``) the kernels use for an input of ``shape``
    (..., in_features) and ``seed``; the same mask the oracle's ``dropout_mask`` argument takes."""
    shape = tuple(shape)
    if len(shape) < 1:
        raise ValueError(f"shape must be (..., in_features), got {shape!r}")
    rows = math.prod(shape[:-1])
    return _linear.lora_dropout_mask(seed, (rows, shape[-1]), p, device).reshape(shape)
