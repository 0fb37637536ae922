"""QLoRALinear's one storage mode: the NF4 weight held as frozen parameters and buffers, viewed as an NF4Weight.

What is checked: which tensors hold the weight (names, dtypes, frozen); that no dtype conversion of the module
touches them (``to(dtype)``, ``half()``, ``type()``, with a float ``quant_storage`` too); that the per-forward view
is reused while nothing changes and rebuilt when a tensor is replaced, and shares memory with the parameters so an
in-place write is seen; pickling and deep copies; the refusal of ``quant_storage=None`` (the former attribute
storage). Results are compared bit for bit against the NF4Weight the layer was built from: the storage only
reinterprets bytes, so any difference is a bug, and tolerance 0 is the bound.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from helpers import nf4_equal
from torch import nn

import qlora  # noqa: F401  (interpreter switch before the kernels)
from qlora.functional import qlora_linear
from qlora.layers import QLoRALinear
from qlora.nf4 import quantize_nf4

DEVICE = "cuda" if torch.cuda.is_available() and not qlora.interpreter_active() else "cpu"
OUT, IN = 8, 64  # 512 elements: 256 packed bytes, 8 blocks of 64


def _weight(seed: int, double_quant: bool = True):
    gen = torch.Generator().manual_seed(seed)
    return quantize_nf4(torch.randn(OUT, IN, generator=gen).to(DEVICE), blocksize=64, double_quant=double_quant)


def _layer(seed: int = 0, double_quant: bool = True, **kwargs) -> QLoRALinear:
    layer = QLoRALinear(_weight(seed, double_quant), r=2, lora_alpha=4, **kwargs)
    with torch.no_grad():  # a nonzero adapter, so the forward checks the adapter path too
        layer.lora_B.copy_(torch.randn(OUT, 2, generator=torch.Generator().manual_seed(seed + 100)))
    return layer


def _expected(layer: QLoRALinear, weight, x: torch.Tensor) -> torch.Tensor:
    return qlora_linear(x, weight, layer.lora_A, layer.lora_B, layer.scaling, layer.bias)


@pytest.mark.parametrize("double_quant", [True, False], ids=["double_quant", "single_quant"])
def test_the_weight_is_frozen_parameters_and_buffers_that_view_the_given_nf4_weight(double_quant):
    weight = _weight(0, double_quant)
    layer = QLoRALinear(weight, r=2, lora_alpha=4)
    params = {n: (p.dtype, tuple(p.shape), p.requires_grad) for n, p in layer.named_parameters() if "nf4" in n}
    expected = {"nf4_packed": (torch.uint8, (256, 1), False),
                "nf4_absmax": (torch.uint8 if double_quant else torch.int32, (8,), False)}
    if double_quant:
        expected["nf4_absmax2"] = (torch.int32, (1,), False)
    assert params == expected and layer.quant_storage == torch.uint8
    buffers = {n: b.dtype for n, b in layer.named_buffers()}
    assert buffers == ({"nf4_code": torch.int32, "nf4_nested_code": torch.int32} if double_quant
                       else {"nf4_code": torch.int32})
    assert not any(k.startswith("nf4_") for k in layer.state_dict())  # bitsandbytes' keys instead
    assert nf4_equal(layer.weight, weight)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


@pytest.mark.parametrize("storage", [torch.uint8, torch.float32], ids=["uint8", "float32"])
def test_dtype_conversions_cast_the_adapter_and_never_the_nf4_weight(storage):
    weight = _weight(1)
    for convert in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.type(torch.float16),
                    lambda m: m.double()):
        layer = convert(QLoRALinear(weight, r=2, lora_alpha=4, quant_storage=storage))
        assert layer.lora_A.dtype != torch.float32
        assert layer._parameters["nf4_packed"].dtype == storage
        assert nf4_equal(layer.weight, weight)


def test_the_view_is_reused_until_a_tensor_is_replaced_and_sees_in_place_writes():
    layer = _layer(2)
    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    first = layer._nf4
    assert layer._nf4 is first  # nothing changed: the forward reuses the view (host time)
    assert torch.equal(layer(x), _expected(layer, _weight(2), x))
    # An in-place write into the parameter is seen through the view: it shares the parameter's memory.
    other = _weight(4)
    with torch.no_grad():
        layer.nf4_packed.copy_(other.packed.reshape(-1, 1))
    assert torch.equal(layer._nf4.packed, other.packed)
    # Replacing a parameter object (as FSDP2's gather or a rollback does) makes a new view of the new tensor.
    layer.load_state_dict({k: v for k, v in _layer(4).state_dict().items() if k.startswith("weight")},
                          strict=False)
    assert nf4_equal(layer.weight, other)
    replaced = _weight(5)
    layer._parameters["nf4_packed"] = nn.Parameter(replaced.packed.reshape(-1, 1).clone(), requires_grad=False)
    assert torch.equal(layer.weight.packed, replaced.packed)
    # Swapping the parameter's data in place of the object is caught by the address check.
    layer.nf4_packed.data = other.packed.reshape(-1, 1).clone()
    assert torch.equal(layer.weight.packed, other.packed)


def test_set_quant_storage_keeps_the_values_and_the_forward():
    layer = _layer(6)
    x = torch.randn(2, IN, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    before = layer(x)
    for storage in (torch.float16, torch.bfloat16, torch.float32, torch.uint8):
        assert layer.set_quant_storage(storage) is layer and layer.nf4_packed.dtype == storage
        assert nf4_equal(layer.weight, _weight(6)) and torch.equal(layer(x), before)


@pytest.mark.parametrize("duplicate", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))],
                         ids=["deepcopy", "pickle"])
def test_copies_view_their_own_tensors(duplicate):
    layer = _layer(8)
    layer._nf4  # a cached view exists before copying
    twin = duplicate(layer)
    assert nf4_equal(twin.weight, layer.weight)
    other = _weight(9)
    with torch.no_grad():
        twin.nf4_packed.copy_(other.packed.reshape(-1, 1))
    assert torch.equal(twin.weight.packed, other.packed)  # the copy's view is of the copy's parameter ...
    assert nf4_equal(layer.weight, _weight(8))  # ... and the original is untouched


def test_quant_storage_none_is_refused_naming_the_argument():
    with pytest.raises(TypeError, match=r"quant_storage must be one of uint8, .* got None \(the NF4 weight is always"):
        QLoRALinear(_weight(10), r=2, lora_alpha=4, quant_storage=None)
    layer = _layer(10)
    with pytest.raises(TypeError, match="quant_storage must be one of"):
        layer.set_quant_storage(None)
    assert layer.quant_storage == torch.uint8 and nf4_equal(layer.weight, _weight(10))


def test_a_device_move_moves_every_nf4_tensor_and_drops_the_view():
    layer = _layer(11)
    layer._nf4  # cached: it references the tensors on the old device
    moved = layer.to("meta")
    assert moved is layer and layer._nf4_view is None  # the old tensors are not kept alive by the cache
    tensors = [*layer.named_parameters(), *layer.named_buffers()]
    assert {t.device.type for _, t in tensors} == {"meta"} and len(tensors) == 7  # lora_A/B, 3 params, 2 buffers
    assert layer.nf4_packed.dtype == torch.uint8 and not layer.nf4_packed.requires_grad
