"""The fused NF4 + LoRA linear kernels as PyTorch custom operators, so ``torch.compile`` can trace through them.

- ``torch.ops.qlora.nf4_lora_forward(x, packed, absmax, code, shape, blocksize, absmax2, offset, nested_code,
  nested_blocksize, lora_a, lora_b, scaling, bias, dropout_p, seed) -> (y, u, keep)``
- ``torch.ops.qlora.nf4_lora_backward(dy, x, u, packed, absmax, code, shape, blocksize, absmax2, offset,
  nested_code, nested_blocksize, lora_a, lora_b, scaling, dropout_p, keep, need_dx, need_lora, need_bias)
  -> (dx, d_a, d_b, d_bias)``

Both are pure and wrap :func:`qlora.kernels.linear.nf4_lora_forward` / ``nf4_lora_backward``; the
:class:`~qlora.nf4.NF4Weight` travels as its tensors plus metadata. ``seed`` is a one-element int64 tensor (None
without dropout), ``keep`` the forward's bit-packed mask the backward reads (empty without dropout). Why opaque
operators, how the seed and the mask travel, and the on-disk cache caveat: docs/DESIGN.md, "torch.compile".
"""

from typing import Optional, Sequence

import torch
from torch import Tensor

from .kernels import linear as _linear

__all__ = ["nf4_lora_forward", "nf4_lora_backward"]


def _seed_arg(seed: Optional[Tensor]):
    # The kernels load the seed from the tensor on the device; nothing here reads it on the host.
    return 0 if seed is None else seed


def _weight(packed, absmax, code, shape, blocksize, absmax2, offset, nested_code, nested_blocksize) -> dict:
    # The launchers take the weight as keyword arguments; shape arrives from the schema as a list of ints.
    return dict(packed=packed, absmax=absmax, code=code, shape=tuple(int(d) for d in shape), blocksize=blocksize,
                absmax2=absmax2, offset=offset, nested_code=nested_code, nested_blocksize=nested_blocksize)


# --------------------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("qlora::nf4_lora_forward", mutates_args=())
def nf4_lora_forward(
    x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, shape: Sequence[int], blocksize: int,
    absmax2: Optional[Tensor], offset: Optional[float], nested_code: Optional[Tensor], nested_blocksize: int,
    lora_a: Tensor, lora_b: Tensor, scaling: float, bias: Optional[Tensor], dropout_p: float,
    seed: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, u, keep)``: y (M, N) in x's dtype, contiguous, ``x @ W^T + scaling * (dropout(x) @ A^T) @ B^T +
    bias``; u (M, R) float32 contiguous, ``dropout(x) @ A^T``; keep the bit-packed dropout mask of x, int32
    (M, ceil(K / 32)) contiguous when ``dropout_p > 0``, else an empty (0,) int32 tensor.

    x (M, K) fp32/fp16/bf16, any strides; W = the NF4 weight of ``shape`` (N, K); lora_a (R, K), lora_b (N, R),
    bias (N,) contiguous or None, all in x's dtype; seed a one-element int64 tensor (on x's device) or None.
    """
    keep = None
    if dropout_p > 0 and x.dim() == 2:  # (another x is refused by the launcher, naming x)
        # Generated here, from the seed staged on x's device as the launcher would, so that it can be returned
        # for the backward; the launcher then reads it (and checks its shape) instead of generating its own.
        _linear.check_scalar("dropout_p", dropout_p, 0.0, 1.0)
        keep = _linear.lora_dropout_bits(_linear.seed_tensor(_seed_arg(seed), x.device), tuple(x.shape), dropout_p)
    y, u = _linear.nf4_lora_forward(
        x, lora_a=lora_a, lora_b=lora_b, scaling=scaling, bias=bias, dropout_p=dropout_p, seed=_seed_arg(seed),
        keep=keep, **_weight(packed, absmax, code, shape, blocksize, absmax2, offset, nested_code, nested_blocksize))
    return y, u, (x.new_empty((0,), dtype=torch.int32) if keep is None else keep)


@nf4_lora_forward.register_fake
def _nf4_lora_forward_fake(x, packed, absmax, code, shape, blocksize, absmax2, offset, nested_code,
                           nested_blocksize, lora_a, lora_b, scaling, bias, dropout_p, seed):
    # The launcher allocates every output fresh and contiguous: y in x's dtype, u in float32, keep int32.
    y = x.new_empty((x.shape[0], shape[0]))
    u = x.new_empty((x.shape[0], lora_a.shape[0]), dtype=torch.float32)
    keep = x.new_empty(((x.shape[0], (x.shape[1] + 31) // 32) if dropout_p > 0 else (0,)), dtype=torch.int32)
    return y, u, keep


# --------------------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("qlora::nf4_lora_backward", mutates_args=())
def nf4_lora_backward(
    dy: Tensor, x: Tensor, u: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, shape: Sequence[int],
    blocksize: int, absmax2: Optional[Tensor], offset: Optional[float], nested_code: Optional[Tensor],
    nested_blocksize: int, lora_a: Tensor, lora_b: Tensor, scaling: float, dropout_p: float,
    keep: Optional[Tensor], need_dx: bool, need_lora: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, d_a, d_b, d_bias)`` of :func:`nf4_lora_forward`: dx (M, K), d_a (R, K), d_b (N, R), d_bias (N,), in
    x's dtype, contiguous. A gradient not asked for (``need_dx``; ``need_lora`` for d_a and d_b; ``need_bias``)
    comes back as an empty (0,) tensor: an operator schema cannot return None.

    dy (M, N) in x's dtype and x (M, K), any strides; u (M, R) float32 contiguous and ``keep`` (the bit-packed
    dropout mask, int32 (M, ceil(K / 32)); required when ``dropout_p > 0``, ignored otherwise) from the forward,
    with the same ``dropout_p``.
    """
    if dropout_p > 0 and (keep is None or keep.dim() != 2):
        raise ValueError("keep must be the forward's bit-packed dropout mask, int32 (M, ceil(K / 32)), when "
                         f"dropout_p > 0; got {None if keep is None else tuple(keep.shape)}")
    grads = _linear.nf4_lora_backward(
        dy, x, u, lora_a=lora_a, lora_b=lora_b, scaling=scaling, dropout_p=dropout_p,
        keep=keep if dropout_p > 0 else None, need_dx=need_dx, need_lora=need_lora, need_bias=need_bias,
        **_weight(packed, absmax, code, shape, blocksize, absmax2, offset, nested_code, nested_blocksize))
    return tuple(x.new_empty((0,)) if g is None else g for g in grads)


@nf4_lora_backward.register_fake
def _nf4_lora_backward_fake(dy, x, u, packed, absmax, code, shape, blocksize, absmax2, offset, nested_code,
                            nested_blocksize, lora_a, lora_b, scaling, dropout_p, keep, need_dx, need_lora,
                            need_bias):
    n, r, m, k = shape[0], lora_a.shape[0], x.shape[0], x.shape[1]

    def grad(wanted, size):
        return x.new_empty(size if wanted else (0,))

    return grad(need_dx, (m, k)), grad(need_lora, (r, k)), grad(need_lora, (n, r)), grad(need_bias, (n,))


# --------------------------------------------------------------------------------------------------------------
# Autograd of the forward operator
# --------------------------------------------------------------------------------------------------------------

# Positions of the differentiable inputs of nf4_lora_forward.
_X, _LORA_A, _LORA_B, _BIAS = 0, 10, 11, 13
_NUM_INPUTS = 16


def _setup_context(ctx, inputs, output):
    (x, packed, absmax, code, shape, blocksize, absmax2, offset, nested_code, nested_blocksize, lora_a, lora_b,
     scaling, bias, dropout_p, seed) = inputs
    _, u, keep = output
    # Every tensor goes through save_for_backward (None allowed), so the compiler sees what the backward reads.
    # The forward's bit-packed dropout mask is saved in place of the seed: the backward does not regenerate it.
    ctx.save_for_backward(x, u, packed, absmax, code, absmax2, nested_code, lora_a, lora_b,
                          keep if dropout_p > 0 else None)
    ctx.meta = (tuple(shape), blocksize, offset, nested_blocksize, scaling, dropout_p, bias is not None)


def _backward(ctx, dy, du, dkeep):
    # du and dkeep are unused: u and keep are by-products kept for this backward, never inputs of anything
    # differentiable.
    x, u, packed, absmax, code, absmax2, nested_code, lora_a, lora_b, keep = ctx.saved_tensors
    shape, blocksize, offset, nested_blocksize, scaling, dropout_p, has_bias = ctx.meta
    need = ctx.needs_input_grad
    need_dx = need[_X]
    need_lora = need[_LORA_A] or need[_LORA_B]
    need_bias = has_bias and need[_BIAS]
    grads: list = [None] * _NUM_INPUTS
    if not (need_dx or need_lora or need_bias):
        return tuple(grads)
    dx, d_a, d_b, d_bias = torch.ops.qlora.nf4_lora_backward(
        dy.to(x.dtype), x, u, packed, absmax, code, shape, blocksize, absmax2, offset, nested_code,
        nested_blocksize, lora_a, lora_b, scaling, dropout_p, keep, need_dx, need_lora, need_bias)
    grads[_X] = dx if need_dx else None
    grads[_LORA_A] = d_a if need[_LORA_A] else None
    grads[_LORA_B] = d_b if need[_LORA_B] else None
    grads[_BIAS] = d_bias if need_bias else None
    return tuple(grads)


nf4_lora_forward.register_autograd(_backward, setup_context=_setup_context)
