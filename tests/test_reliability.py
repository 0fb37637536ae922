"""Reliability under hostile use (issue 15): loads and steps that are all-or-nothing, values checked at the door of
foreign checkpoints and optimizer state dicts, prepare_model on shared layers and nn.Linear subclasses, and the small
edge cases of the layer. The import-order cases are in test_package.py, the CLI's write safety in
test_cli_commands.py.

No tolerances here: every comparison is bit for bit (a failed call must change nothing; a value loaded as stored
must be the value saved).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
from helpers import nf4_equal
from torch import nn

import qlora  # noqa: F401  (interpreter switch before the kernels)
from qlora.functional import qlora_linear
from qlora.interop import load_adapter, load_quantized, save_adapter, save_quantized
from qlora.layers import QLoRALinear
from qlora.model import prepare_model
from qlora.nf4 import NF4Weight, quantize_nf4
from safetensors.torch import load_file, save_file

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
        assert nf4_equal(dst[i].weight, src[i].weight)
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


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16])
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


# --------------------------------------------------------------------------------------------------------------
# Items 4, 5 and 7 (optimizers): a step that raises changes nothing; state dict values; unsupported options;
# frozen integer parameters
# --------------------------------------------------------------------------------------------------------------

OPTIMIZERS = {
    "AdamW8bit": lambda ps, **kw: qlora.AdamW8bit(ps, min_8bit_size=512, **kw),
    "PagedAdamW": lambda ps, **kw: qlora.PagedAdamW(ps, paging="host", page_size=4096, min_paged_size=0, **kw),
    "PagedAdamW8bit": lambda ps, **kw: qlora.PagedAdamW8bit(ps, paging="host", page_size=4096, min_paged_size=0,
                                                            min_8bit_size=512, **kw),
}


def _params_with_grads(seed: int, shapes=((600,), (24, 5))) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=g).to(DEVICE)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(DEVICE)
    return params


def _optimizer_snapshot(opt) -> tuple:
    """Every parameter and every state tensor (plus step counters), copied."""
    opt.synchronize()
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = {id(p): {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
             for p, s in opt.state.items()}
    return params, state


def _assert_optimizer_unchanged(opt, before) -> None:
    params, state = _optimizer_snapshot(opt)
    for a, b in zip(params, before[0]):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert state.keys() == before[1].keys()
    for pid, fields in before[1].items():
        assert state[pid].keys() == fields.keys()
        for k, v in fields.items():
            got = state[pid][k]
            assert (torch.equal(got.view(torch.uint8), v.view(torch.uint8)) if isinstance(v, torch.Tensor)
                    else got == v), k


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("stepped_before", [False, True])
def test_a_step_that_overflows_changes_nothing(name, stepped_before):
    params = _params_with_grads(0)
    opt = OPTIMIZERS[name](params, lr=1e-3)
    if stepped_before:
        opt.step()
    before = _optimizer_snapshot(opt)
    opt.param_groups[0]["lr"] = 1e39  # finite in float64, overflows the float32 step size
    with pytest.raises(ValueError, match=r"step_size overflows \(parameter group 0\) at step"):
        opt.step()
    _assert_optimizer_unchanged(opt, before)
    opt.param_groups[0]["lr"] = 1e-3  # and the next good step still works from where it was
    opt.step()
    assert all(opt.state[p]["step"] == (2 if stepped_before else 1) for p in params)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_second_group_that_overflows_leaves_the_first_unstepped(name):
    first, second = _params_with_grads(0), _params_with_grads(1)
    opt = OPTIMIZERS[name]([{"params": first}, {"params": second, "eps": 1e39}])
    before = _optimizer_snapshot(opt)
    with pytest.raises(ValueError, match=r"eps overflows \(parameter group 1\)"):
        opt.step()
    _assert_optimizer_unchanged(opt, before)
    assert not opt.state  # no parameter got state


def test_a_corrupted_step_counter_is_refused_before_anything_changes():
    params = _params_with_grads(0)
    opt = qlora.AdamW8bit(params, min_8bit_size=512)
    opt.step()
    opt.state[params[1]]["step"] = 1.5
    before = _optimizer_snapshot(opt)
    with pytest.raises(ValueError, match=r"state of parameter 1 of group 0: step must be an int >= 0, got 1\.5"):
        opt.step()
    _assert_optimizer_unchanged(opt, before)


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("option", ["maximize", "amsgrad"])
def test_unsupported_adamw_options_are_refused(name, option):
    params = _params_with_grads(0)
    with pytest.raises(ValueError, match=f"{option}=True is not supported"):
        OPTIMIZERS[name](params, **{option: True})
    with pytest.raises(ValueError, match=rf"{option}=True \(parameter group 1\) is not supported"):
        OPTIMIZERS[name]([{"params": params[:1]}, {"params": params[1:], option: True}])
    OPTIMIZERS[name](params, **{option: False})  # torch.optim.AdamW's default is accepted


def test_a_torch_adamw_state_dict_saved_with_maximize_is_refused():
    params = _params_with_grads(0)
    torch_opt = torch.optim.AdamW([nn.Parameter(p.detach().clone()) for p in params], maximize=True)
    for p, q in zip(torch_opt.param_groups[0]["params"], params):
        p.grad = q.grad.clone()
    torch_opt.step()
    opt = qlora.PagedAdamW(params, paging="none")
    with pytest.raises(ValueError, match=r"maximize=True \(saved parameter group 0\) is not supported"):
        opt.load_state_dict(torch_opt.state_dict())
    assert not opt.state


@pytest.mark.parametrize("field, index, value", [
    ("exp_avg_absmax", 1, float("nan")),
    ("exp_avg_absmax", 0, -1.0),
    ("exp_avg_sq_absmax", 2, float("inf")),
])
def test_optimizer_state_dict_with_impossible_8bit_scales_is_refused(field, index, value):
    params = _params_with_grads(0)
    opt = qlora.AdamW8bit(params, min_8bit_size=512)
    opt.step()
    saved = opt.state_dict()
    saved["state"][0][field] = saved["state"][0][field].clone()
    saved["state"][0][field][index] = value
    fresh = qlora.AdamW8bit([nn.Parameter(p.detach().clone()) for p in params], min_8bit_size=512)
    with pytest.raises(ValueError, match=rf"state of parameter 0: {field} must hold finite scales >= 0, got "
                                         rf"{value} at index {index}"):
        fresh.load_state_dict(saved)
    assert not fresh.state


def test_optimizer_state_dict_with_a_negative_second_moment_is_refused():
    params = _params_with_grads(0)
    opt = qlora.PagedAdamW(params, paging="none")
    opt.step()
    saved = opt.state_dict()
    saved["state"][1]["exp_avg_sq"] = saved["state"][1]["exp_avg_sq"].clone()
    saved["state"][1]["exp_avg_sq"][3, 2] = -1e-3
    fresh = qlora.PagedAdamW([nn.Parameter(p.detach().clone()) for p in params], paging="none")
    with pytest.raises(ValueError, match=r"state of parameter 1: exp_avg_sq must be >= 0"):
        fresh.load_state_dict(saved)
    assert not fresh.state


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizers_take_model_parameters_with_the_nf4_weight_held_as_uint8(name):
    """README's FSDP pattern: set_quant_storage(torch.uint8) makes the NF4 weight frozen uint8 parameters, and
    model.parameters() is passed to the optimizer as is; those are never stepped."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16)).to(DEVICE)
    prepare_model(model, r=4, lora_alpha=8, lora_dropout=0.0)
    model[0].set_quant_storage(torch.uint8)
    assert any(p.dtype == torch.uint8 for p in model.parameters())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = OPTIMIZERS[name](model.parameters(), lr=1e-2)
    model(torch.randn(3, 32, device=DEVICE)).square().sum().backward()
    lora_a = model[0].lora_A.detach().clone()
    opt.step()
    assert not torch.equal(model[0].lora_A, lora_a)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]) and p not in opt.state, n
    opt.load_state_dict(opt.state_dict())  # the layout with the frozen parameters round-trips


# --------------------------------------------------------------------------------------------------------------
# Item 5 (NF4 files): values checked at load, naming the key
# --------------------------------------------------------------------------------------------------------------

_KEY = "0.weight"


def _json(meta: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)


def _with_offset(offset):
    def change(sd):
        meta = json.loads(bytes(sd[f"{_KEY}.quant_state.bitsandbytes__nf4"].tolist()))
        sd[f"{_KEY}.quant_state.bitsandbytes__nf4"] = _json({**meta, "nested_offset": offset})
    return change


def _set(entry, index, value):
    def change(sd):
        t = sd[f"{_KEY}.{entry}"].clone()
        t[index] = value
        sd[f"{_KEY}.{entry}"] = t
    return change


def _replace(entry, fn):
    def change(sd):
        sd[f"{_KEY}.{entry}"] = fn(sd[f"{_KEY}.{entry}"].clone())
    return change


BAD_VALUES = [  # (double-quantized?, change, the key named, words of the message)
    (True, _replace("quant_map", lambda t: t.flip(0)), "quant_map", "must be the NF4 codebook"),
    (True, _set("quant_map", 3, float("nan")), "quant_map",
     r"must be the NF4 codebook \(only NF4 is supported\); entry 3 is nan"),
    (False, _replace("quant_map", lambda t: t * 0.5), "quant_map", "must be the NF4 codebook"),
    (True, _set("nested_quant_map", 7, float("nan")), "nested_quant_map", "must be the signed dynamic map"),
    (True, _set("nested_absmax", 0, float("nan")), "nested_absmax", "finite block scales >= 0; entry 0 is nan"),
    (True, _set("nested_absmax", 0, -1.0), "nested_absmax", "finite block scales >= 0; entry 0 is -1.0"),
    (False, _set("absmax", 5, float("nan")), "absmax", "finite block scales >= 0; entry 5 is nan"),
    (False, _set("absmax", 2, -0.25), "absmax", "finite block scales >= 0; entry 2 is -0.25"),
    (False, _set("absmax", 1, float("inf")), "absmax", "finite block scales >= 0; entry 1 is inf"),
    (True, _with_offset(0.1), "quant_state.bitsandbytes__nf4", "'nested_offset' of .* must be a float32 value"),
    (True, _with_offset(1e300), "quant_state.bitsandbytes__nf4", "'nested_offset' of .* must be a float32 value"),
]


@pytest.mark.parametrize("dq, change, entry, message", BAD_VALUES)
def test_nf4_entries_with_impossible_values_are_refused_naming_the_key(tmp_path, dq, change, entry, message):
    src = _two_layer(0, double_quant=dq)
    sd = src[0].weight.to_bnb_state_dict(_KEY)
    change(sd)
    pattern = f"(?=.*{re.escape(repr(f'{_KEY}.{entry}'))})(?=.*{message})"  # names the key, and says why
    with pytest.raises(ValueError, match=pattern):
        NF4Weight.from_bnb_state_dict(sd, _KEY)
    # The same through a file into a prepared model: refused, nothing changed.
    file = {k: v for k, v in src.state_dict().items() if "lora_" not in k}
    file.update(sd)
    save_file({k: v.contiguous() for k, v in file.items()}, tmp_path / "bad.safetensors")
    dst = _two_layer(1, double_quant=dq)
    before = _snapshot(dst)
    with pytest.raises(ValueError, match=pattern):
        load_quantized(dst, tmp_path / "bad.safetensors")
    _assert_unchanged(dst, before)


def test_nf4_weight_refuses_an_offset_that_is_not_a_float32_value():
    w = quantize_nf4(torch.randn(16, 16, device=DEVICE))
    for offset in (0.1, 1e300):
        with pytest.raises(ValueError, match="offset must be a float32 value held as a finite Python float"):
            dataclasses.replace(w, offset=offset)
    dataclasses.replace(w, offset=0.5)  # float32 values are fine


# --------------------------------------------------------------------------------------------------------------
# Item 7: the smaller ones (layer, functional form, adapters)
# --------------------------------------------------------------------------------------------------------------

def _layer_inputs(seed: int = 0, n: int = 8, k: int = 64, r: int = 2):
    g = torch.Generator().manual_seed(seed)
    weight = quantize_nf4(torch.randn(n, k, generator=g).to(DEVICE))
    lora_a = torch.randn(r, k, generator=g).to(DEVICE)
    lora_b = torch.randn(n, r, generator=g).to(DEVICE)
    x = torch.randn(3, k, generator=g).to(DEVICE)
    return x, weight, lora_a, lora_b


def test_a_non_contiguous_bias_is_accepted_and_gets_its_gradient():
    x, weight, lora_a, lora_b = _layer_inputs()
    storage = torch.randn(16, device=DEVICE, requires_grad=True)
    strided = storage[::2]  # (8,), stride 2
    assert not strided.is_contiguous()
    y = qlora_linear(x, weight, lora_a, lora_b, 2.0, bias=strided)
    dense = strided.detach().clone().requires_grad_(True)
    y_dense = qlora_linear(x, weight, lora_a, lora_b, 2.0, bias=dense)
    assert torch.equal(y, y_dense)  # the same kernel on the same values
    dy = torch.randn_like(y)
    y.backward(dy)
    y_dense.backward(dy)
    assert torch.equal(storage.grad[::2], dense.grad) and not storage.grad[1::2].any()


@pytest.mark.parametrize("scaling", [np.float32(2.0), np.float64(2.0), np.int64(2), torch.tensor(2.0)])
def test_scaling_takes_any_real_scalar(scaling):
    x, weight, lora_a, lora_b = _layer_inputs()
    assert torch.equal(qlora_linear(x, weight, lora_a, lora_b, scaling), qlora_linear(x, weight, lora_a, lora_b, 2.0))


@pytest.mark.parametrize("scaling", [1e39, -1e39, 3.5e38])
def test_scaling_beyond_float32_is_refused_not_inf(scaling):
    x, weight, lora_a, lora_b = _layer_inputs()
    with pytest.raises(ValueError, match="scaling must be within float32's range"):
        qlora_linear(x, weight, lora_a, lora_b, scaling)
    layer = QLoRALinear(weight, r=1, lora_alpha=scaling)  # the layer's scaling goes through the same check
    with pytest.raises(ValueError, match="scaling must be within float32's range"):
        layer(x)


def test_double_backward_says_it_is_unsupported():
    x, weight, lora_a, lora_b = _layer_inputs()
    x.requires_grad_(True)
    lora_a.requires_grad_(True)
    y = qlora_linear(x, weight, lora_a, lora_b, 2.0)
    (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)  # first order works
    with pytest.raises(RuntimeError, match="does not support double backward"):
        dx.sum().backward()


def test_strict_load_state_dict_reports_an_extra_weight_entry():
    layer = QLoRALinear(quantize_nf4(torch.randn(8, 64, device=DEVICE), double_quant=False), r=2, lora_alpha=4)
    sd = layer.state_dict()
    sd["weight.extra"] = torch.zeros(3)
    fresh = QLoRALinear(quantize_nf4(torch.randn(8, 64, device=DEVICE), double_quant=False), r=2, lora_alpha=4)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "weight\.extra"'):
        fresh.load_state_dict(sd)
    result = fresh.load_state_dict(sd, strict=False)  # non-strict loads and reports it, as nn.Module does
    assert result.unexpected_keys == ["weight.extra"] and nf4_equal(fresh.weight, layer.weight)


def test_strict_load_state_dict_reports_nested_entries_next_to_a_plain_weight():
    dq = QLoRALinear(quantize_nf4(torch.randn(8, 64, device=DEVICE)), r=2, lora_alpha=4).state_dict()
    plain = QLoRALinear(quantize_nf4(torch.randn(8, 64, device=DEVICE), double_quant=False), r=2, lora_alpha=4)
    sd = plain.state_dict()
    sd["weight.nested_absmax"] = dq["weight.nested_absmax"]
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "weight\.nested_absmax"'):
        plain.load_state_dict(sd)


def test_save_adapter_refuses_layers_with_different_dropouts(tmp_path):
    model = _two_layer(0)
    model[2].lora_dropout = 0.1
    with pytest.raises(ValueError, match=r"layers differ in lora_dropout \('0': 0\.0, '2': 0\.1\)"):
        save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    model[2].lora_dropout = 0.0
    save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["lora_dropout"] == 0.0


def test_load_adapter_names_lora_bias(tmp_path):
    model = _two_layer(0)
    save_adapter(model, tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["lora_bias"] = True
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"field 'lora_bias' of .* is True; only False is supported"):
        load_adapter(_two_layer(1), tmp_path / "adapter")


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
@pytest.mark.parametrize("in_features, out_features", [(0, 4), (4, 0)])
def test_a_linear_without_weights_is_refused_by_prepare_model(in_features, out_features):
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(in_features, out_features)).to(DEVICE)
    with pytest.raises(ValueError, match=rf"^1 has in_features={in_features} and out_features={out_features}"):
        prepare_model(model, r=2)
    assert type(model[0]) is nn.Linear
    with pytest.raises(ValueError, match="both >= 1"):
        QLoRALinear(quantize_nf4(torch.zeros(out_features, in_features, device=DEVICE)), r=1, lora_alpha=1)


def test_numpy_lora_alpha_is_accepted():
    model = _two_layer(0)
    layer = QLoRALinear(model[0].weight, r=2, lora_alpha=np.float32(8.0))
    assert layer.scaling == 4.0
    prepare_model(nn.Sequential(nn.Linear(16, 8)).to(DEVICE), r=2, lora_alpha=np.float32(8.0))


# --------------------------------------------------------------------------------------------------------------
# Item 8: adapters in a model with more modules than the one that saved them (PEFT on a Hugging Face BERT)
# --------------------------------------------------------------------------------------------------------------

class _Bert(nn.Module):
    """The module names of a Hugging Face BertModel, small: the encoder's linear layers are adapted; the pooler's
    `dense` exists only in the Hugging Face model (the qlora encoder has no pooler)."""

    def __init__(self, pooler: bool) -> None:
        super().__init__()
        layer = nn.Module()
        layer.attention = nn.Module()
        layer.attention.self = nn.ModuleDict({n: nn.Linear(16, 16) for n in ("query", "key", "value")})
        layer.attention.output = nn.ModuleDict({"dense": nn.Linear(16, 16)})
        layer.output = nn.ModuleDict({"dense": nn.Linear(16, 16)})
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([layer])
        if pooler:
            self.pooler = nn.ModuleDict({"dense": nn.Linear(16, 16)})


def _peft_targets(model: nn.Module, target_modules: list[str]) -> list[str]:
    """PEFT's rule for a list of target_modules (peft.tuners.tuners_utils.check_target_module_exists): a module is
    targeted when its name is an entry or ends with "." + an entry."""
    return sorted(name for name, m in model.named_modules() if isinstance(m, nn.Linear) and any(
        name == t or name.endswith("." + t) for t in target_modules))


def test_saved_target_modules_select_exactly_the_adapted_layers_in_a_larger_model(tmp_path):
    torch.manual_seed(0)
    ours = prepare_model(_Bert(pooler=False).to(DEVICE), r=2, lora_alpha=4, lora_dropout=0.0)
    save_adapter(ours, tmp_path / "adapter")
    targets = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    adapted = sorted(name for name, m in ours.named_modules() if isinstance(m, QLoRALinear))
    assert _peft_targets(_Bert(pooler=True), targets) == adapted  # pooler.dense is not picked up
    wrapped = nn.Module()  # the same encoder under a task model's prefix ("bert.") is still found
    wrapped.bert = _Bert(pooler=True)
    assert _peft_targets(wrapped, targets) == [f"bert.{n}" for n in adapted]


def test_load_adapter_strict_false_loads_the_rest_and_says_what_it_skipped(tmp_path):
    torch.manual_seed(0)
    # The adapter PEFT writes for the Hugging Face model: pooler.dense included.
    theirs = prepare_model(_Bert(pooler=True).to(DEVICE), r=2, lora_alpha=4, lora_dropout=0.0)
    for m in theirs.modules():
        if isinstance(m, QLoRALinear):
            nn.init.normal_(m.lora_B)
    save_adapter(theirs, tmp_path / "adapter")
    ours = prepare_model(_Bert(pooler=False).to(DEVICE), r=2, lora_alpha=8, lora_dropout=0.0)
    before = _snapshot(ours)
    with pytest.raises(ValueError, match=r"2 entries with no QLoRALinear layer to go to: "
                                         r"'base_model\.model\.pooler\.dense\.lora_A\.weight'.*strict=False"):
        load_adapter(ours, tmp_path / "adapter")  # strict by default: nothing changed
    _assert_unchanged(ours, before)
    skipped = load_adapter(ours, tmp_path / "adapter", strict=False)
    assert skipped.unexpected_keys == ["base_model.model.pooler.dense.lora_A.weight",
                                       "base_model.model.pooler.dense.lora_B.weight"]
    assert skipped.missing_keys == []
    theirs_layers = dict((n, m) for n, m in theirs.named_modules() if isinstance(m, QLoRALinear))
    for name, layer in ours.named_modules():
        if isinstance(layer, QLoRALinear):
            assert torch.equal(layer.lora_A, theirs_layers[name].lora_A), name
            assert torch.equal(layer.lora_B, theirs_layers[name].lora_B), name
            assert layer.scaling == 2.0  # the adapter's lora_alpha (4) over r (2)


def test_load_adapter_strict_false_keeps_layers_the_adapter_lacks(tmp_path):
    torch.manual_seed(0)
    small = prepare_model(_Bert(pooler=False).to(DEVICE), r=2, lora_alpha=4, lora_dropout=0.0,
                          target_modules=["query", "value"])
    save_adapter(small, tmp_path / "adapter")
    full = prepare_model(_Bert(pooler=False).to(DEVICE), r=2, lora_alpha=4, lora_dropout=0.0)
    key_before = full.encoder.layer[0].attention.self["key"].lora_A.detach().clone()
    with pytest.raises(ValueError, match=r"has no entry 'base_model\.model\.encoder\.layer\.0\.attention\.self\.key"):
        load_adapter(full, tmp_path / "adapter")
    skipped = load_adapter(full, tmp_path / "adapter", strict=False)
    assert skipped.unexpected_keys == [] and "base_model.model.encoder.layer.0.attention.self.key.lora_A.weight" in (
        skipped.missing_keys)
    assert len(skipped.missing_keys) == 6  # key, attention.output.dense, output.dense: A and B each
    assert torch.equal(full.encoder.layer[0].attention.self["key"].lora_A, key_before)
    assert torch.equal(full.encoder.layer[0].attention.self["query"].lora_A,
                       small.encoder.layer[0].attention.self["query"].lora_A)


def test_load_adapter_strict_false_still_refuses_half_pairs_and_foreign_adapters(tmp_path):
    torch.manual_seed(0)
    model = _two_layer(0)
    save_adapter(model, tmp_path / "adapter")
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    del tensors["base_model.model.0.lora_B.weight"]
    save_file(tensors, tmp_path / "adapter" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"has no entry 'base_model\.model\.0\.lora_B\.weight'"):
        load_adapter(_two_layer(1), tmp_path / "adapter", strict=False)
    renamed = {k.replace("model.0.", "model.other.").replace("model.2.", "model.more."): v for k, v in tensors.items()}
    save_file(renamed, tmp_path / "adapter" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="has no entry for any QLoRALinear layer"):
        load_adapter(_two_layer(1), tmp_path / "adapter", strict=False)


@pytest.mark.parametrize("rows", [3, 40], ids=["gemv", "fused"])
def test_a_packed_weight_at_any_byte_address_gives_the_same_layer(rows):
    """A packed weight that is a view into a larger uint8 buffer may start at any byte; the kernels read it as 32- or
    64-bit words. Every start gives the aligned weight's forward and gradients, bit for bit (through the
    functional layer, whose NF4Weight is built from the view, and through the kernel API, which takes the view)."""
    from qlora.kernels import linear as K

    g = torch.Generator().manual_seed(5)
    n, k, r = 48, 128, 4
    weight = quantize_nf4(torch.randn(n, k, generator=g).to(DEVICE))
    lora_a = torch.randn(r, k, generator=g).to(DEVICE)
    lora_b = torch.randn(n, r, generator=g).to(DEVICE)
    x = torch.randn(rows, k, generator=g).to(DEVICE)
    dy = torch.randn(rows, n, generator=g).to(DEVICE)

    def run(packed: torch.Tensor):
        w = dataclasses.replace(weight, packed=packed)
        xs, a, b = (t.clone().requires_grad_(True) for t in (x, lora_a, lora_b))
        y = qlora_linear(xs, w, a, b, 2.0)
        y.backward(dy)
        kernel_y, _ = K.nf4_lora_forward(x, packed, w.absmax, w.code, tuple(w.shape), w.blocksize, lora_a, lora_b,
                                         2.0, absmax2=w.absmax2, offset=w.offset, nested_code=w.nested_code)
        return y.detach(), xs.grad, a.grad, b.grad, kernel_y

    want = run(weight.packed)
    buffer = torch.zeros(weight.packed.numel() + 16, dtype=torch.uint8, device=DEVICE)
    for start in range(1, 8):
        view = buffer[start:start + weight.packed.numel()]
        view.copy_(weight.packed)
        got = run(view)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), start


def test_word_aligned_copies_a_misaligned_packed_view_only_for_compiled_kernels(monkeypatch):
    """Compiled for a GPU, the kernels load W as 32-bit words, and a misaligned word load faults: a packed view that
    does not start on a 4-byte boundary is copied (the same bytes, an aligned start), once when an NF4Weight is
    built; an aligned one, and every one under the interpreter, is used as it is."""
    from qlora.kernels import linear as K

    buffer = torch.arange(64, dtype=torch.uint8)
    aligned, misaligned = buffer[4:36], buffer[1:33]
    assert aligned.data_ptr() % 4 == 0 and misaligned.data_ptr() % 4 == 1
    monkeypatch.setattr(K, "interpreter_active", lambda: True)
    assert K.word_aligned(misaligned) is misaligned
    monkeypatch.setattr(K, "interpreter_active", lambda: False)
    assert K.word_aligned(aligned) is aligned
    copy = K.word_aligned(misaligned)
    assert copy.data_ptr() % 16 == 0 and torch.equal(copy, misaligned)
    assert copy.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
    g = torch.Generator().manual_seed(6)
    weight = quantize_nf4(torch.randn(8, 64, generator=g))
    holder = torch.zeros(weight.packed.numel() + 1, dtype=torch.uint8)
    holder[1:].copy_(weight.packed)
    rebuilt = dataclasses.replace(weight, packed=holder[1:])
    assert rebuilt.packed.data_ptr() % 4 == 0 and torch.equal(rebuilt.packed, weight.packed)
