"""Reliability under hostile use (issue 15): loads and steps that are all-or-nothing, values checked at the door of
foreign checkpoints and optimizer state dicts, prepare_model on shared layers and nn.Linear subclasses, and the small
edge cases of the layer. The import-order cases are in test_package.py, the CLI's write safety in
test_cli_commands.py.

No tolerances here: every comparison is bit for bit (a failed call must change nothing; a value loaded as stored
must be the value saved).
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import qlora  # noqa: F401  (interpreter switch before the kernels)
from qlora.interop import load_quantized, save_quantized
from qlora.layers import QLoRALinear
from qlora.model import prepare_model

DEVICE = torch.device("cpu" if qlora.interpreter_active() else "cuda")


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the model holds, by state-dict key (NF4 entries included) and by parameter/buffer name, copied."""
    out = {f"state:{k}": v.detach().clone() for k, v in model.state_dict().items()}
    out.update({f"param:{k}": v.detach().clone() for k, v in model.named_parameters()})
    out.update({f"buffer:{k}": v.detach().clone() for k, v in model.named_buffers()})
    return out


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = _snapshot(model)
    assert after.keys() == before.keys()
    for key, value in before.items():
        got = after[key]
        assert got.dtype == value.dtype and got.shape == value.shape and torch.equal(
            got.view(torch.uint8) if got.numel() else got, value.view(torch.uint8) if value.numel() else value), key


def _nf4_equal(a, b) -> bool:
    if (a.shape, a.dtype, a.blocksize, a.offset, a.nested_blocksize) != (
            b.shape, b.dtype, b.blocksize, b.offset, b.nested_blocksize):
        return False
    for name in ("packed", "absmax", "code", "absmax2", "nested_code"):
        x, y = getattr(a, name), getattr(b, name)
        if (x is None) != (y is None) or (x is not None and not (x.dtype == y.dtype and torch.equal(x, y))):
            return False
    return True


def _two_layer(seed: int, **prepare) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32), nn.Linear(32, 16)).to(DEVICE)
    return prepare_model(model, r=4, lora_alpha=8, lora_dropout=0.0, **prepare)


# --------------------------------------------------------------------------------------------------------------
# Item 2: load_quantized is all-or-nothing and loads the weight as stored
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("saved_dq, model_dq", [(True, False), (False, True)])
def test_load_quantized_takes_double_quantization_as_stored(tmp_path, saved_dq, model_dq):
    src = _two_layer(0, double_quant=saved_dq)
    save_quantized(src, tmp_path / "m.safetensors")
    dst = _two_layer(1, double_quant=model_dq)
    load_quantized(dst, tmp_path / "m.safetensors")
    for i in (0, 2):
        assert dst[i].weight.double_quant is saved_dq
        assert _nf4_equal(dst[i].weight, src[i].weight)
    assert torch.equal(dst[1].weight, src[1].weight)
    # The reloaded model saves the same entries again (its state dict follows the weight as stored).
    assert dst.state_dict().keys() == src.state_dict().keys()


class _FailingLoad(nn.Module):
    """A module whose loading hook copies its entry and then fails: a load that fails half-way."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4, device=DEVICE))

    def _load_from_state_dict(self, state_dict, prefix, *args):
        with torch.no_grad():
            self.scale.copy_(state_dict[prefix + "scale"])
        raise RuntimeError("hook failed after copying")


@pytest.mark.parametrize("quant_storage", [None, torch.uint8])
def test_load_quantized_failing_half_way_leaves_every_tensor_bit_identical(tmp_path, quant_storage):
    def build(seed, dq):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32), nn.Linear(32, 16)).to(DEVICE)
        prepare_model(model, r=4, lora_alpha=8, lora_dropout=0.0, double_quant=dq)
        model.append(_FailingLoad())
        with torch.no_grad():
            model[3].scale.mul_(seed + 2)
            model[1].weight.add_(seed)
        if quant_storage is not None:
            for i in (0, 2):
                model[i].set_quant_storage(quant_storage)
        return model

    save_quantized(build(0, dq=True), tmp_path / "m.safetensors")
    dst = build(1, dq=False)  # the file is double-quantized, the model is not: every layer would change
    before = _snapshot(dst)
    params_before = [id(p) for p in dst.parameters()]
    with pytest.raises(RuntimeError, match="hook failed after copying"):
        load_quantized(dst, tmp_path / "m.safetensors")
    _assert_unchanged(dst, before)
    assert [id(p) for p in dst.parameters()] == params_before
    assert not dst[0].weight.double_quant and dst[0].quant_storage == quant_storage


# --------------------------------------------------------------------------------------------------------------
# Item 3: prepare_model on a layer registered twice under one parent, and on nn.Linear subclasses
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("container", ["sequential", "modulelist"])
def test_layer_registered_twice_in_one_parent_is_replaced_in_both_slots(container):
    torch.manual_seed(0)
    lin = nn.Linear(16, 16).to(DEVICE)
    if container == "sequential":
        model = nn.Sequential(lin, nn.ReLU(), lin)
    else:
        model = nn.Module()
        model.layers = nn.ModuleList([lin, lin])
    prepare_model(model, r=2, lora_alpha=4, lora_dropout=0.0)
    slots = [model[0], model[2]] if container == "sequential" else list(model.layers)
    assert all(isinstance(m, QLoRALinear) for m in slots)
    assert slots[0] is slots[1]
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    # One adapter: the trainable parameters are that layer's lora_A and lora_B, once.
    assert [n for n, p in model.named_parameters() if p.requires_grad] in (
        [f"{p}.lora_A", f"{p}.lora_B"] for p in ("0", "layers.0"))


class _TimesTen(nn.Linear):
    def forward(self, x):
        return 10 * super().forward(x)


class _PlainSubclass(nn.Linear):
    """A subclass that changes nothing in the forward: replaced like nn.Linear."""

    def extra_repr(self) -> str:
        return "plain"


def test_linear_subclass_with_its_own_forward_is_refused_by_name_and_nothing_changes():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(keep=nn.Linear(16, 16), odd=nn.Sequential(_TimesTen(16, 8)))).to(DEVICE)
    before = _snapshot(model)
    with pytest.raises(TypeError, match=r"odd\.0 is a _TimesTen, an nn\.Linear subclass with its own forward"):
        prepare_model(model, r=2)
    assert type(model.keep) is nn.Linear and type(model.odd[0]) is _TimesTen
    _assert_unchanged(model, before)
    prepare_model(model, r=2, target_modules=["keep"])  # leaving it out works
    assert isinstance(model.keep, QLoRALinear) and type(model.odd[0]) is _TimesTen


@pytest.mark.parametrize("change, message", [
    (lambda m: setattr(m, "forward", lambda x: 2 * nn.Linear.forward(m, x)), "forward replaced on the instance"),
    (lambda m: m.register_forward_hook(lambda mod, args, out: out * 2), "forward hooks"),
    (lambda m: m.register_forward_pre_hook(lambda mod, args: None), "forward hooks"),
])
def test_linear_with_replaced_forward_or_hooks_is_refused(change, message):
    model = nn.Sequential(nn.Linear(16, 8)).to(DEVICE)
    change(model[0])
    with pytest.raises(TypeError, match=message):
        prepare_model(model, r=2)
    assert type(model[0]) is nn.Linear


def test_linear_subclass_without_its_own_forward_is_replaced():
    model = nn.Sequential(_PlainSubclass(16, 8)).to(DEVICE)
    prepare_model(model, r=2)
    assert isinstance(model[0], QLoRALinear)
