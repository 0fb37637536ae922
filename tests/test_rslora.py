"""Rank-stabilized LoRA (rsLoRA, PEFT's ``use_rslora``): ``scaling = lora_alpha / sqrt(r)`` in ``QLoRALinear``,
``prepare_model`` and the PEFT adapter files of ``save_adapter`` / ``load_adapter``.

r = 4 and lora_alpha = 8 give scaling 4 with rsLoRA against 2 without, so a layer that ignored the flag is off by
the whole LoRA term. Tolerance: the float32 output against a float64 reference of the same tensors, bounded by
Higham's gamma_n (n = K + r + 2 roundings on any path of a term: K-term and r-term dot products, the scaling, the
final sum) times the sum of the terms' magnitudes.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import qlora
from qlora.interop import load_adapter, save_adapter
from qlora.layers import QLoRALinear
from qlora.model import prepare_model, qlora_layers

U32 = 2.0**-24
DEVICE = torch.device("cpu" if qlora.interpreter_active() else "cuda")
R, ALPHA, K, N = 4, 8, 64, 32


def _gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(K, N), nn.GELU(), nn.Linear(N, K)).to(DEVICE)


def _randomize_b(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in qlora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)


def test_rslora_layer_scales_by_alpha_over_sqrt_r_and_computes_it():
    torch.manual_seed(0)
    linear = nn.Linear(K, N).to(DEVICE)
    layer = QLoRALinear.from_linear(linear, R, ALPHA, use_rslora=True)
    assert layer.use_rslora is True and layer.scaling == ALPHA / math.sqrt(R) == 4.0
    assert "use_rslora=True" in repr(layer)
    assert QLoRALinear.from_linear(linear, R, ALPHA).scaling == ALPHA / R
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, K, device=DEVICE)
    y = layer(x).double()
    w = layer.weight.dequantize(torch.float32).double()
    a, b, bias = layer.lora_A.double(), layer.lora_B.double(), layer.bias.double()
    xd = x.double()
    exact = xd @ w.T + 4.0 * (xd @ a.T) @ b.T + bias
    bound = _gamma(K + R + 2) * (xd.abs() @ w.abs().T + 4.0 * (xd.abs() @ a.abs().T) @ b.abs().T + bias.abs())
    assert bool(((y - exact).abs() <= bound).all())
    # Without rsLoRA the LoRA term is half as large: far outside the bound, so the check above can fail.
    plain = exact - 2.0 * (xd @ a.T) @ b.T
    assert bool(((y - plain).abs() > bound).any())


def test_rslora_rejects_a_non_bool():
    linear = nn.Linear(K, N).to(DEVICE)
    with pytest.raises(TypeError, match="use_rslora"):
        QLoRALinear.from_linear(linear, R, ALPHA, use_rslora=1)
    with pytest.raises(TypeError, match="use_rslora"):
        prepare_model(_model(), r=R, lora_alpha=ALPHA, use_rslora="yes")


def test_prepare_model_with_rslora_and_adapter_files_round_trip(tmp_path):
    model = prepare_model(_model(), r=R, lora_alpha=ALPHA, lora_dropout=0.0, use_rslora=True)
    assert all(layer.use_rslora and layer.scaling == 4.0 for _, layer in qlora_layers(model))
    _randomize_b(model)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["r"] == R and config["lora_alpha"] == ALPHA

    # A model prepared without rsLoRA takes the flag (and the scaling) from the file.
    fresh = prepare_model(_model(), r=R, lora_alpha=ALPHA, lora_dropout=0.0)
    assert all(layer.scaling == 2.0 for _, layer in qlora_layers(fresh))
    load_adapter(fresh, tmp_path / "adapter")
    assert all(layer.use_rslora and layer.scaling == 4.0 for _, layer in qlora_layers(fresh))
    x = torch.randn(2, K, device=DEVICE)
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))  # same NF4 bytes (same seed), same adapters, same scaling

    # And back: a plain-LoRA adapter file clears the flag.
    plain = prepare_model(_model(), r=R, lora_alpha=ALPHA, lora_dropout=0.0)
    save_adapter(plain, tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["use_rslora"] is False
    load_adapter(fresh, tmp_path / "plain")
    assert all(not layer.use_rslora and layer.scaling == 2.0 for _, layer in qlora_layers(fresh))


def test_save_adapter_refuses_mixed_rslora(tmp_path):
    model = prepare_model(_model(), r=R, lora_alpha=ALPHA)
    model[0].use_rslora = True
    with pytest.raises(ValueError, match="use_rslora"):
        save_adapter(model, tmp_path / "adapter")


def test_load_adapter_refuses_a_malformed_use_rslora(tmp_path):
    model = prepare_model(_model(), r=R, lora_alpha=ALPHA)
    save_adapter(model, tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["use_rslora"] = "yes"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'use_rslora'"):
        load_adapter(model, tmp_path / "adapter")
