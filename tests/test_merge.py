"""QLoRALinear's in-place ``merge()``/``unmerge()`` (PEFT's 4-bit semantics: requantize), ``to_dense_linear()``, and
one set of adapter defaults (PEFT's) across the entry points.

Requantization bound (elementwise, derived). ``merge`` stores ``NF4(R)`` with ``D = dequantize(W) + delta`` formed
in float32 and ``R`` = D rounded to the weight's dtype. Quantizing block b picks, for each element, the codebook value
nearest to ``R_i / s_b`` (``s_b = max |R|`` over the block) and dequantizes it as ``code * s'_b`` (``s'_b`` the stored
scale: ``s_b`` itself, or its 8-bit double-quantized value). Hence

    |dequant_i - R_i| <= (maxgap / 2 + 4 u32) * s_b + |s'_b - s_b| + u32 * |R_i|

with ``maxgap`` the widest gap between adjacent codebook values (|code| <= 1 carries the scale error through; the
``4 u32`` covers the float32 rounding of ``R_i / s_b`` and of the float32 decision thresholds; ``u32 * |R_i|`` the
final product's rounding). The difference to the exact float64 ``dequantize(W) + delta`` adds ``|R - D|`` (rounding to
the weight dtype) and ``u32 * |D|`` (the float32 sum).
"""

from __future__ import annotations

import inspect
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import qlora  # noqa: F401  (interpreter switch before the kernels)
from qlora.integrations import bitsandbytes as qbnb
from qlora.layers import DEFAULT_LORA_ALPHA, DEFAULT_LORA_DROPOUT, DEFAULT_R, QLoRALinear
from qlora.model import prepare_model
from qlora.nf4 import NF4Weight, quantize_nf4
from qlora.reference import quantize as ref_quantize

U32 = 2.0**-24
OUT, IN, R, BLOCK = 12, 64, 4, 32


def _layer(dtype: torch.dtype, double_quant: bool, seed: int = 0, bias: bool = True) -> QLoRALinear:
    """A layer with a trained-like adapter: lora_B nonzero, delta several times the weight's NF4 rounding error."""
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(IN, OUT, bias=bias).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(OUT, IN, generator=gen).to(dtype) * 0.1)
        if bias:
            linear.bias.copy_(torch.randn(OUT, generator=gen).to(dtype))
    layer = QLoRALinear.from_linear(linear, r=R, lora_alpha=8, blocksize=BLOCK, double_quant=double_quant)
    with torch.no_grad():
        layer.lora_B.copy_((torch.randn(OUT, R, generator=gen) * 0.3).to(dtype))
    return layer.eval()


def _scales(weight: NF4Weight) -> np.ndarray:
    """The per-block scales the weight dequantizes with (float64), double-quantized ones decoded by the oracle."""
    absmax = weight.absmax.numpy()
    if weight.double_quant:
        absmax = ref_quantize.double_dequantize(absmax, weight.absmax2.numpy(), np.float32(weight.offset),
                                                weight.nested_blocksize)
    return np.asarray(absmax, dtype=np.float64)


def _requant_bound(target: torch.Tensor, weight: NF4Weight) -> np.ndarray:
    """Elementwise bound on |dequantize(weight) - target| for ``weight`` = requantization of the float32 ``target``
    (module docstring): rounding to the weight dtype, then the NF4 rounding with the stored scales."""
    d = target.double().numpy()
    rounded = target.to(weight.dtype).double().numpy()
    code = np.sort(weight.code.double().numpy())
    half_gap = np.diff(code).max() / 2
    flat = rounded.reshape(-1)
    nblocks = -(-flat.size // weight.blocksize)
    padded = np.zeros(nblocks * weight.blocksize)
    padded[:flat.size] = np.abs(flat)
    true_scale = padded.reshape(nblocks, weight.blocksize).max(axis=1)
    stored = _scales(weight)
    per_block = (half_gap + 4 * U32) * true_scale + np.abs(stored - true_scale)
    per_elem = np.repeat(per_block, weight.blocksize)[:flat.size].reshape(d.shape)
    return np.abs(rounded - d) + per_elem + U32 * np.abs(rounded) + U32 * np.abs(d)


def _delta64(layer: QLoRALinear) -> np.ndarray:
    return layer.scaling * (layer.lora_B.detach().double() @ layer.lora_A.detach().double()).numpy()


def _deq64(weight: NF4Weight) -> np.ndarray:
    return weight.dequantize(torch.float32).double().numpy()


@pytest.mark.parametrize("dtype,double_quant", [(torch.float32, False), (torch.float32, True),
                                                (torch.bfloat16, True)])
def test_merge_requantizes_in_place_and_unmerge_restores_approximately(dtype, double_quant):
    layer = _layer(dtype, double_quant)
    before = layer.weight
    delta = _delta64(layer)
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(7)).to(dtype)
    with torch.no_grad():
        unmerged_out = layer(x)
    assert not layer.merged
    with pytest.warns(UserWarning, match="Merge lora module to 4-bit linear"):
        layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    merged = layer.weight
    assert merged.blocksize == before.blocksize and merged.double_quant == double_quant and merged.dtype == dtype
    target = _deq64(before) + delta
    err = np.abs(_deq64(merged) - target)
    bound = _requant_bound(torch.from_numpy(target).float(), merged)
    assert (err <= bound).all(), (err - bound).max()
    # Exactly PEFT's recipe: the bytes are those of quantizing the float32 sum rounded to the weight's dtype.
    delta32 = layer.scaling * (layer.lora_B.detach().float() @ layer.lora_A.detach().float())
    recipe = quantize_nf4((before.dequantize(torch.float32) + delta32).to(dtype), blocksize=BLOCK,
                          double_quant=double_quant)
    assert torch.equal(merged.packed, recipe.packed) and torch.equal(merged.absmax, recipe.absmax)
    assert not torch.equal(merged.packed, before.packed)

    # The forward is now the base layer over the merged weight: x @ deq(W')^T + bias, up to the kernel's fp
    # accumulation (float32 sums of IN products: IN * u32 * sum |terms|) and the output rounding to dtype.
    with torch.no_grad():
        out = layer(x).double().numpy()
    xs = x.double().numpy()
    w_merged = _deq64(merged)
    bias = layer.bias.double().numpy()
    exact = xs @ w_merged.T + bias
    u_out = {torch.float32: U32, torch.bfloat16: 2.0**-8}[dtype]
    fp = IN * U32 * (np.abs(xs) @ np.abs(w_merged).T + np.abs(bias)) + u_out * np.abs(exact)
    # w_merged is dequantized in float32 and then rounded to dtype inside the kernel for bf16 inputs.
    fp += 2.0**-8 * (np.abs(xs) @ np.abs(w_merged).T) if dtype == torch.bfloat16 else 0
    assert (np.abs(out - exact) <= fp).all()
    # ... and it differs from the unmerged forward only by the requantization error carried through x, plus both
    # forwards' own rounding: the unmerged one's base sum as above and its LoRA path (float32 sums of IN and R
    # terms; for bf16 also W and the intermediate x @ A^T rounded to bf16, relative 2^-8 each).
    unmerged64 = unmerged_out.double().numpy()
    base_abs = np.abs(xs) @ np.abs(_deq64(before)).T
    lora_abs = (np.abs(xs) @ np.abs(layer.lora_A.detach().double().numpy()).T) @ np.abs(
        layer.scaling * layer.lora_B.detach().double().numpy()).T
    unmerged_fp = (IN * U32 * (base_abs + np.abs(bias)) + (IN + R + 2) * U32 * lora_abs
                   + u_out * np.abs(unmerged64))
    if dtype == torch.bfloat16:
        unmerged_fp += 2.0**-8 * (base_abs + lora_abs)
    carried = np.abs(xs) @ bound.T + fp + unmerged_fp
    assert (np.abs(out - unmerged64) <= carried).all(), (np.abs(out - unmerged64) - carried).max()

    with pytest.warns(UserWarning, match="Unmerge lora module to 4-bit linear"):
        layer.unmerge()
    assert not layer.merged
    restored = layer.weight
    recipe_back = quantize_nf4((merged.dequantize(torch.float32) - delta32).to(dtype), blocksize=BLOCK,
                               double_quant=double_quant)
    assert torch.equal(restored.packed, recipe_back.packed) and torch.equal(restored.absmax, recipe_back.absmax)
    # Two requantizations: |deq(W'') - deq(W)| <= bound(merge) + bound(unmerge), elementwise.
    back_target = w_merged - delta
    bound_back = _requant_bound(torch.from_numpy(back_target).float(), restored)
    err_back = np.abs(_deq64(restored) - _deq64(before))
    assert (err_back <= bound + bound_back).all(), (err_back - bound - bound_back).max()


def test_merging_twice_or_unmerging_unmerged_warns_and_changes_nothing():
    layer = _layer(torch.float32, True)
    packed = layer.weight.packed.clone()
    with pytest.warns(UserWarning, match="Already unmerged. Nothing to do."):
        layer.unmerge()
    assert torch.equal(layer.weight.packed, packed) and not layer.merged
    with pytest.warns(UserWarning):
        layer.merge()
    merged_packed = layer.weight.packed.clone()
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do.") as record:
        layer.merge()
    assert not any("Merge lora module" in str(w.message) for w in record)  # it did not requantize again
    assert torch.equal(layer.weight.packed, merged_packed) and layer.merged


def test_merged_forward_gives_the_adapter_no_gradient_and_keeps_parameter_storage():
    layer = _layer(torch.float32, True).set_quant_storage(torch.uint8)
    with pytest.warns(UserWarning):
        layer.merge()
    assert layer.quant_storage == torch.uint8 and "nf4_packed" in dict(layer.named_parameters())
    layer.train()
    x = torch.randn(3, IN, requires_grad=True)
    layer(x).sum().backward()
    assert layer.lora_A.grad is None and layer.lora_B.grad is None and x.grad is not None
    # pickled and restored, the layer stays merged
    assert pickle.loads(pickle.dumps(layer)).merged


def test_safe_merge_refuses_a_broken_adapter_and_changes_nothing():
    layer = _layer(torch.float32, False)
    packed = layer.weight.packed.clone()
    with torch.no_grad():
        layer.lora_B[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
            layer.merge(safe_merge=True)
        with pytest.raises(TypeError, match="safe_merge must be a bool"):
            layer.merge(safe_merge=1)
    assert not layer.merged and torch.equal(layer.weight.packed, packed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_to_dense_linear_is_the_old_merge_bit_for_bit(dtype):
    layer = _layer(dtype, True, bias=True)
    # The former QLoRALinear.merge(): float32 dequantize + scaling * B @ A, rounded once to the original dtype.
    old = layer.weight.dequantize(torch.float32)
    old += layer.scaling * (layer.lora_B.detach().float() @ layer.lora_A.detach().float())
    dense = layer.to_dense_linear()
    assert isinstance(dense, nn.Linear) and dense.weight.dtype == dtype
    assert torch.equal(dense.weight, old.to(dtype)) and torch.equal(dense.bias, layer.bias.to(dtype))
    assert not layer.merged  # the layer itself is unchanged
    # A merged layer already holds the adapter in its NF4 weight: the dense layer is that weight, not W + 2 delta.
    with pytest.warns(UserWarning):
        layer.merge()
    assert torch.equal(layer.to_dense_linear().weight, layer.weight.dequantize(torch.float32).to(dtype))


def _defaults(fn) -> tuple:
    params = inspect.signature(fn).parameters
    return tuple(params[name].default for name in ("r", "lora_alpha", "lora_dropout"))


def test_every_entry_point_has_the_same_defaults_and_they_are_peft_s():
    expected = (DEFAULT_R, DEFAULT_LORA_ALPHA, DEFAULT_LORA_DROPOUT)
    for fn in (QLoRALinear.__init__, QLoRALinear.from_linear, prepare_model, qbnb.adopt_linear4bit):
        assert _defaults(fn) == expected, fn.__qualname__
    # The defaults are used: a layer built without them, alone or through prepare_model.
    layer = QLoRALinear.from_linear(nn.Linear(IN, OUT))
    model = prepare_model(nn.Sequential(nn.Linear(IN, OUT)))
    for built in (layer, model[0]):
        assert (built.r, built.lora_alpha, built.lora_dropout) == expected
        assert built.scaling == DEFAULT_LORA_ALPHA / DEFAULT_R
    pytest.importorskip("qlora.integrations.peft")  # imports peft the way the integration needs it
    from peft import LoraConfig

    config = LoraConfig()
    assert (config.r, config.lora_alpha, config.lora_dropout) == expected
