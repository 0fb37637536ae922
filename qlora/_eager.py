"""The eager (uncompiled) path of :func:`qlora.functional.qlora_linear`: one ``torch.autograd.Function`` that calls
the launchers of :mod:`qlora.kernels.linear` directly.

The custom operators of :mod:`qlora.ops` are what ``torch.compile`` traces; in eager code they cost host time a GPU
step pays before any kernel runs (dispatcher round trips, ``fill_defaults``, the Dynamo-disable wrapper, the autograd
wrapper of ``register_autograd``). The layer's host time before and after this path and the prechecked launchers
replaced them is in perf/README.md ("Host time"), bounded by ``tests/test_host_overhead.py``. This Function runs the
launchers' own launch code (after the checks, which qlora_linear and the weight's construction already made), so
eager results equal compiled ones bit for bit (``tests/test_compile.py``).

The :class:`~qlora.nf4.NF4Weight` is validated when it is built and is immutable, so nothing about it is checked
here; :func:`qlora.functional.qlora_linear` checks what can change per call before calling :meth:`apply`.
"""

from __future__ import annotations

import torch

from .kernels import linear as _linear
from .nf4 import NF4Weight


DOUBLE_BACKWARD_MESSAGE = (
    "qlora_linear (QLoRALinear) does not support double backward (gradients of gradients, create_graph=True "
    "followed by another backward): its backward is a fused kernel without a derivative of its own")


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on a gradient computed under ``create_graph=True``, whose own backward says double backward is
    unsupported (rather than torch saying the gradient "does not require grad"). ``anchor``, an input of the layer
    that requires grad, makes the result part of the graph."""

    @staticmethod
    def forward(ctx, t, anchor):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)


class NF4LoRAFunction(torch.autograd.Function):
    """``y = x @ W^T + scaling * (dropout(x) @ A^T) @ B^T + bias`` for x (M, K); differentiable in x, lora_a,
    lora_b and bias. ``seed`` is a one-element int64 tensor on x's device, read only by the kernels (0 without
    dropout); the forward generates the bit-packed dropout mask from it once and saves it for the backward."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, bias, weight: NF4Weight, scaling: float, dropout_p: float, seed):
        # The prechecked launchers: qlora_linear has checked everything a call can change, and the weight was
        # validated when it was built, so the launchers' own checks would only repeat them.
        kernel_weight = _linear.prechecked_weight(weight.packed, weight.absmax, weight.code, weight.shape,
                                                  weight.blocksize, weight.absmax2, weight.offset,
                                                  weight.nested_code)
        y, u, keep = _linear.nf4_lora_forward_prechecked(x, kernel_weight, lora_a, lora_b, bias, scaling, dropout_p,
                                                         seed)
        # The bit-packed keep mask (int32 (M, ceil(K / 32)), 1/16 of a bf16 x) is saved, so the backward reads the
        # forward's mask instead of launching the Philox kernel again.
        ctx.save_for_backward(x, u, lora_a, lora_b, keep)
        ctx.kernel_weight = kernel_weight
        ctx.meta = (scaling, dropout_p, bias is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, u, lora_a, lora_b, keep = ctx.saved_tensors
        scaling, dropout_p, has_bias = ctx.meta
        need_x, need_a, need_b, need_bias = ctx.needs_input_grad[:4]
        need_lora = need_a or need_b
        need_bias = has_bias and need_bias
        if not (need_x or need_lora or need_bias):
            return None, None, None, None, None, None, None, None
        dx, d_a, d_b, d_bias = _linear.nf4_lora_backward_prechecked(
            dy.to(x.dtype), x, u, ctx.kernel_weight, lora_a, lora_b, scaling, dropout_p, keep, need_x, need_lora,
            need_bias)
        grads = (dx if need_x else None, d_a if need_a else None, d_b if need_b else None,
                 d_bias if need_bias else None)
        anchor = next((t for t in (x, lora_a, lora_b) if t.requires_grad), None)
        if torch.is_grad_enabled() and anchor is not None:  # create_graph=True: may be differentiated again
            grads = tuple(None if g is None else _FirstOrderOnly.apply(g, anchor) for g in grads)
        return (*grads, None, None, None, None)
