"""Whole models: prepare_model on a tiny transformer, the parameter report, and the bitsandbytes / PEFT files of
qlora.interop (round trips, a checkpoint written by bitsandbytes itself, malformed files, bad arguments).

Tolerances. A prepared layer at initialization computes ``x @ W^T + b`` with ``W`` the NF4 weight dequantized in
float32 (one multiply ``code * scale``, the same float32 value ``NF4Weight.dequantize`` returns) and the LoRA
term exactly 0 (``lora_B = 0``). What remains is float32 summation in the kernel's order, bounded per output by
Higham's |error| <= n * u32 * sum |terms| (u32 = 2^-24) for any order of n roundings (see _layer_bound).
"""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from helpers import TinyLM, nf4_equal
from torch import nn

import qlora  # noqa: F401  (interpreter switch before the kernels)
from qlora.interop import load_adapter, load_quantized, save_adapter, save_quantized
from qlora.layers import QLoRALinear
from qlora.model import ParameterReport, _human_bytes, prepare_model, qlora_layers, trainable_parameters_report
from safetensors.torch import load_file, save_file

U32 = 2.0**-24
# The kernels take CPU tensors under the Triton interpreter and CUDA tensors otherwise.
DEVICE = torch.device("cpu" if qlora.interpreter_active() else "cuda")
VOCAB, D, HIDDEN, BLOCKS = 50, 32, 64, 2
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
LINEAR_NAMES = [f"blocks.{i}.{part}" for i in range(BLOCKS)
                for part in [*(f"attn.{p}" for p in ATTN), "mlp.up", "mlp.down"]] + ["lm_head"]


def _tiny(seed: int) -> TinyLM:
    torch.manual_seed(seed)
    model = TinyLM(VOCAB, D, HIDDEN, BLOCKS)
    with torch.no_grad():  # LayerNorm starts at (1, 0); perturb it so a mixed-up norm would show
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.add_(0.1 * torch.randn_like(m.weight))
                m.bias.add_(0.1 * torch.randn_like(m.bias))
    return model.to(DEVICE)


def _prepared(seed: int, **kwargs) -> TinyLM:
    kwargs = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, **kwargs}
    return prepare_model(_tiny(seed), **kwargs)


def _tokens(seed: int, shape=(2, 6)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, shape, generator=g).to(DEVICE)




@pytest.fixture(scope="module")
def prepared():
    """A prepared TinyLM, its dense original, and tokens; tests must not modify the model."""
    dense = _tiny(0)
    model = prepare_model(copy.deepcopy(dense), r=4, lora_alpha=8, lora_dropout=0.0)
    return model, dense, _tokens(0)


# --------------------------------------------------------------------------------------------------------------
# prepare_model
# --------------------------------------------------------------------------------------------------------------

def test_prepare_replaces_every_linear_and_freezes_all_but_lora(prepared):
    model, dense, _ = prepared
    assert [name for name, _ in qlora_layers(model)] == LINEAR_NAMES
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{n}.{p}" for n in LINEAR_NAMES for p in ("lora_A", "lora_B")]
    layer = model.blocks[1].mlp.up
    assert (layer.r, layer.lora_alpha, layer.scaling, layer.weight.blocksize, layer.weight.double_quant) == (
        4, 8, 2.0, 64, True)
    assert torch.count_nonzero(layer.lora_B) == 0
    # The bias is the original one, copied and frozen (PEFT's bias="none").
    assert torch.equal(layer.bias, dense.blocks[1].mlp.up.bias) and not layer.bias.requires_grad


def test_prepare_returns_the_model_in_place():
    model = _tiny(1)
    embed = model.embed
    assert prepare_model(model, r=2, target_modules=["lm_head"]) is model
    assert model.embed is embed and isinstance(model.lm_head, QLoRALinear)


def _layer_bound(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Bound on |float32 (x @ W^T + b) - exact| for any summation order (split-K partials included): each of the
    K + 1 terms x_k w_k and b goes through at most one product rounding and K additions (K - 1 in the dot product,
    one for the bias; adding the LoRA term 0 is exact), so Higham's gamma_{K+1} = (K+1) u32 / (1 - (K+1) u32)
    times sum |terms| bounds the error. The float64 reference's own error (2^-53 scale) is negligible."""
    n = weight.shape[1] + 1
    gamma = n * U32 / (1 - n * U32)
    return gamma * (x.abs() @ weight.abs().T + bias.abs())


def test_prepared_model_computes_the_dequantized_model(prepared):
    model, dense, tokens = prepared
    # The same model with each Linear's weight replaced by its dequantized NF4 weight (float32, exact).
    reference = copy.deepcopy(dense)
    with torch.no_grad():
        for name, layer in qlora_layers(model):
            reference.get_submodule(name).weight.copy_(layer.weight.dequantize(torch.float32))

    # Layer by layer, on the inputs each prepared layer actually sees: exact float64 vs the rigorous bound.
    seen = {}
    hooks = [layer.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, (args[0], out)))
             for name, layer in qlora_layers(model)]
    try:
        with torch.no_grad():
            logits = model(tokens)
    finally:
        for h in hooks:
            h.remove()
    assert sorted(seen) == sorted(LINEAR_NAMES)
    for name, (x, y) in seen.items():
        lin = reference.get_submodule(name)
        x64, w64, b64 = x.double(), lin.weight.double(), lin.bias.double()
        exact = x64 @ w64.T + b64
        err = (y.double() - exact).abs()
        bound = _layer_bound(x64, w64, b64)
        assert bool((err <= bound).all()), (name, float(err.max()))

    # End to end: torch's own float32 evaluation of the reference sums in another order, so both float32 models
    # approximate the float64 reference with rounding errors of the same kind; ours must stay within 4x torch's
    # (a margin for the different summation orders the per-layer bounds above already allow), plus a floor of
    # 64 u32 of the logits' size for the case where torch's error happens to be tiny.
    with torch.no_grad():
        ref32 = reference(tokens)
        ref64 = copy.deepcopy(reference).double()(tokens)
    torch_err = float((ref32.double() - ref64).abs().max())
    our_err = float((logits.double() - ref64).abs().max())
    assert our_err <= 4 * torch_err + 64 * U32 * float(ref64.abs().max()), (our_err, torch_err)
    # And the quantization is visible: the dense original differs by far more than rounding.
    with torch.no_grad():
        assert float((dense(tokens).double() - ref64).abs().max()) > 1e3 * our_err


@pytest.mark.parametrize("targets, expected", [
    (["q_proj", "v_proj"], ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj", "blocks.1.attn.q_proj",
                            "blocks.1.attn.v_proj"]),
    (["0.attn.q_proj"], ["blocks.0.attn.q_proj"]),
    (("mlp.up", "lm_head"), ["blocks.0.mlp.up", "blocks.1.mlp.up", "lm_head"]),
    (["blocks.1.mlp.down", "attn.o_proj"], ["blocks.0.attn.o_proj", "blocks.1.attn.o_proj", "blocks.1.mlp.down"]),
])
def test_target_modules_select_by_dot_aligned_suffix(targets, expected):
    model = prepare_model(_tiny(2), r=2, lora_alpha=4, target_modules=targets)
    assert [name for name, _ in qlora_layers(model)] == expected
    left = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(left) == sorted(set(LINEAR_NAMES) - set(expected))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n in expected for p in ("lora_A", "lora_B")}


def test_target_modules_matching_nothing_is_refused_with_the_names_available():
    model = _tiny(3)
    before = copy.deepcopy(model.state_dict())
    # "proj" is part of "q_proj" but not a dot-aligned suffix of any name.
    with pytest.raises(ValueError, match=r"target_modules \['proj'\] matched no nn.Linear.*lm_head.*q_proj"):
        prepare_model(model, target_modules=["proj"])
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())


def test_shared_layer_is_replaced_everywhere_and_attention_out_proj_is_left_alone():
    torch.manual_seed(4)
    shared = nn.Linear(D, D)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)}).to(DEVICE)
    prepare_model(model, r=2, target_modules=["a"])  # matched under one of its names, replaced under both
    assert isinstance(model["a"], QLoRALinear) and model["b"][0] is model["a"]
    model = nn.ModuleDict({"mha": nn.MultiheadAttention(D, 2), "head": nn.Linear(D, 3)}).to(DEVICE)
    prepare_model(model, r=2)
    assert isinstance(model["head"], QLoRALinear)
    # MultiheadAttention reads out_proj.weight as a dense tensor; it stays a (frozen) nn.Linear and still works.
    assert type(model["mha"].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert not any(p.requires_grad for p in model["mha"].parameters())
    x = torch.randn(3, 1, D, device=DEVICE)
    assert model["mha"](x, x, x)[0].shape == (3, 1, D)


def test_progress_bar_on_request(capsys):
    prepare_model(_tiny(5), r=2, target_modules=["lm_head"], progress=True)
    assert "qlora: quantizing" in capsys.readouterr().err
    prepare_model(_tiny(5), r=2, target_modules=["lm_head"], progress=False)
    # progress=None with 13 layers would show one only on a terminal, which pytest's captured stderr is not.
    prepare_model(_tiny(5), r=2, target_modules=["lm_head"])
    assert capsys.readouterr().err == ""


def test_training_moves_only_the_adapters_and_reduces_the_loss():
    torch.manual_seed(6)
    model = prepare_model(_tiny(6), r=4, lora_alpha=8, lora_dropout=0.05)  # dropout kernels on, seeded above
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    tokens = _tokens(6, (2, 8))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2, weight_decay=0.0)

    def loss_fn():
        logits = model(tokens[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))

    model.eval()
    with torch.no_grad():
        loss0 = float(loss_fn())
    model.train()
    for _ in range(4):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        loss1 = float(loss_fn())
    # Four steps on one fixed batch: the adapters of 13 layers start memorizing it (measured: 4.20 -> 2.49). A
    # no-op would leave the eval loss exactly unchanged; 10% is far from both.
    assert loss1 < 0.9 * loss0, (loss0, loss1)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())  # NF4 entries, biases, embedding, norms


# --------------------------------------------------------------------------------------------------------------
# trainable_parameters_report
# --------------------------------------------------------------------------------------------------------------

def test_report_counts_and_bytes_by_hand(prepared):
    model, _, _ = prepared
    report = trainable_parameters_report(model)
    assert isinstance(report, ParameterReport)
    r = 4
    # Linear layers as (in, out): per block q, k, v, o (D, D), up (D, HIDDEN), down (HIDDEN, D); then the LM head.
    shapes = [(D, D)] * 4 + [(D, HIDDEN), (HIDDEN, D)]
    shapes = shapes * BLOCKS + [(D, VOCAB)]
    weights = sum(i * o for i, o in shapes)                       # 2 * (4*1024 + 2*2048) + 1600 = 17984
    biases = sum(o for _, o in shapes)                            # 2 * (4*32 + 64 + 32) + 50 = 498
    lora = sum(r * (i + o) for i, o in shapes)                    # 2 * (4*256 + 2*384) + 328 = 3912
    norms = (2 * BLOCKS + 1) * 2 * D                              # 5 LayerNorms (weight, bias): 320
    embed = VOCAB * D                                             # 1600
    assert (weights, biases, lora, norms, embed) == (17984, 498, 3912, 320, 1600)
    assert report.trainable == lora
    assert report.total == weights + biases + lora + norms + embed == 24314
    assert report.weight_4bit_bytes == weights // 2               # two codes a byte (every numel is even)
    # Blocksize 64, double quantization: one uint8 code per 64 weights, one float32 absmax2 per 256 blocks,
    # and each layer's own codebooks (16 + 256 float32).
    nblocks = [math.ceil(i * o / 64) for i, o in shapes]
    assert sum(nblocks) == 2 * (4 * 16 + 2 * 32) + 25
    scales = sum(nblocks) + sum(4 * math.ceil(b / 256) for b in nblocks) + len(shapes) * (16 + 256) * 4
    assert report.scale_bytes == scales == 281 + 52 + 14144
    assert report.lora_bytes == 4 * lora                          # float32 adapters
    assert report.other_bytes == 4 * (biases + norms + embed)     # float32, no buffers in this model
    assert report.total_bytes == report.weight_4bit_bytes + scales + 4 * (lora + biases + norms + embed)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32])
def test_report_is_the_same_when_the_nf4_weight_is_held_as_parameters(prepared, storage):
    # With quant_storage (FSDP), the NF4 bytes live in frozen nf4_* parameters/buffers: counted once, as NF4.
    model = copy.deepcopy(prepared[0])
    before = trainable_parameters_report(model)
    for _, layer in qlora_layers(model):
        layer.set_quant_storage(storage)
    assert trainable_parameters_report(model) == before


def test_report_summary_line(prepared):
    text = str(trainable_parameters_report(prepared[0]))
    first, second = text.splitlines()
    assert first == f"trainable params: 3,912 || all params: 24,314 || trainable%: {100 * 3912 / 24314:.4f}"
    # Bytes from test_report_counts_and_bytes_by_hand: 8992, 14477, 4 * 3912, 4 * 2418; 48789 in all.
    assert second == ("memory: 4-bit weights 8.78 KiB | scales 14.14 KiB | LoRA 15.28 KiB | rest 9.45 KiB | "
                      "total 47.65 KiB")
    assert _human_bytes(1023) == "1023 B" and _human_bytes(3 * 2**29) == "1.50 GiB"
    assert _human_bytes(5 * 2**40) == "5,120.00 GiB"


def test_report_of_a_plain_model_counts_every_parameter():
    report = trainable_parameters_report(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    # Linear 12 + 4, BatchNorm 4 + 4 parameters, all trainable; buffers: running mean and var (float32) and
    # num_batches_tracked (int64).
    assert (report.trainable, report.total, report.lora_bytes, report.weight_4bit_bytes) == (24, 24, 0, 0)
    assert report.other_bytes == 24 * 4 + 8 * 4 + 8


# --------------------------------------------------------------------------------------------------------------
# save_quantized / load_quantized
# --------------------------------------------------------------------------------------------------------------

NF4_SUFFIXES = ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                ".quant_state.bitsandbytes__nf4")


def test_quantized_checkpoint_keys_and_exact_round_trip(prepared, tmp_path):
    model, _, tokens = prepared
    path = tmp_path / "model.safetensors"
    save_quantized(model, path)
    saved = load_file(path)
    dense_keys = [k for k in _tiny(0).state_dict() if not any(k == f"{n}.weight" for n in LINEAR_NAMES)]
    assert set(saved) == {f"{n}.weight{s}" for n in LINEAR_NAMES for s in NF4_SUFFIXES} | set(dense_keys)
    assert saved["lm_head.weight"].dtype == torch.uint8 and saved["lm_head.weight"].shape == (VOCAB * D // 2, 1)
    meta = json.loads(bytes(saved["lm_head.weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["shape"] == [VOCAB, D] and meta["blocksize"] == 64 and meta["dtype"] == "float32"

    fresh = _prepared(7)  # other random weights: every NF4 tensor differs before loading
    assert not nf4_equal(fresh.lm_head.weight, model.lm_head.weight)
    assert load_quantized(fresh, path) is fresh
    for (name, ours), (_, theirs) in zip(qlora_layers(model), qlora_layers(fresh)):
        assert nf4_equal(ours.weight, theirs.weight), name
    fresh_state = fresh.state_dict()
    for key, value in model.state_dict().items():
        if "lora_" not in key:
            assert fresh_state[key].dtype == value.dtype and torch.equal(fresh_state[key], value), key
    # lora_B is 0 in both models, so their different lora_A contribute exactly nothing: identical outputs.
    with torch.no_grad():
        assert torch.equal(fresh(tokens), model(tokens))


def test_quantized_round_trip_without_double_quant(tmp_path):
    model = prepare_model(_tiny(8), r=2, target_modules=["lm_head"], blocksize=128, double_quant=False)
    save_quantized(model, tmp_path / "m.safetensors")
    assert "lm_head.weight.nested_absmax" not in load_file(tmp_path / "m.safetensors")
    fresh = prepare_model(_tiny(9), r=2, target_modules=["lm_head"])  # blocksize 64, double quant: replaced
    load_quantized(fresh, tmp_path / "m.safetensors")
    assert nf4_equal(fresh.lm_head.weight, model.lm_head.weight)
    assert torch.equal(fresh.blocks[0].attn.q_proj.weight, model.blocks[0].attn.q_proj.weight)  # dense, loaded


# A checkpoint written by bitsandbytes 0.50.2 itself (tests/data/make_bnb_checkpoint.py): layer names, shapes,
# dtypes, blocksizes and double quantization as there.
_BNB = torch.load(os.path.join(os.path.dirname(__file__), "data", "bnb_nf4_checkpoint.pt"), weights_only=True)
_BNB_LAYERS = {  # name: (in, out, dtype)
    "model.layers.0.self_attn.q_proj": (96, 64, torch.bfloat16),
    "model.layers.0.mlp.up_proj": (33, 40, torch.float16),
    "model.layers.1.mlp.down_proj": (45, 7, torch.float32),
    "lm_head": (32, 300, torch.bfloat16),
}


def _bnb_shaped_model() -> nn.Module:
    torch.manual_seed(10)
    root = nn.Module()
    for name, (fan_in, fan_out, dtype) in _BNB_LAYERS.items():
        *parents, leaf = name.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.add_module(leaf, nn.Linear(fan_in, fan_out, bias=False, dtype=dtype))
    return root.to(DEVICE)


def test_loads_a_checkpoint_written_by_bitsandbytes(tmp_path):
    sd = _BNB["state_dict"]
    path = tmp_path / "bnb.safetensors"
    save_file({k: v.contiguous().clone() for k, v in sd.items()}, path)
    model = prepare_model(_bnb_shaped_model(), r=4)
    load_quantized(model, path)
    for name, layer in qlora_layers(model):
        # bitsandbytes' own bytes dequantize to bitsandbytes' own dense weight, bit for bit.
        assert torch.equal(layer.weight.dequantize().cpu(), _BNB["bnb_dequantized"][f"{name}.weight"]), name
    # And saving writes back exactly what bitsandbytes wrote, JSON bytes included.
    save_quantized(model, tmp_path / "again.safetensors")
    again = load_file(tmp_path / "again.safetensors")
    assert set(again) == set(sd)
    for key, value in sd.items():
        assert again[key].dtype == value.dtype and torch.equal(again[key], value), key


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A prepared model with two NF4 layers and its saved file's entries."""
    model = prepare_model(_tiny(11), r=2, target_modules=["lm_head", "blocks.0.mlp.up"])
    path = tmp_path_factory.mktemp("ckpt") / "m.safetensors"
    save_quantized(model, path)
    return model, load_file(path)


def _json_tensor(meta: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)


_STATE = "lm_head.weight.quant_state.bitsandbytes__nf4"
_META = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [VOCAB, D], "nested_blocksize": 256,
         "nested_dtype": "float32", "nested_offset": 0.5}


@pytest.mark.parametrize("change, key", [
    (lambda sd: sd.pop("lm_head.weight.absmax"), "lm_head.weight.absmax"),
    (lambda sd: sd.pop("lm_head.weight.nested_quant_map"), "lm_head.weight.nested_quant_map"),
    (lambda sd: sd.pop(_STATE), _STATE),
    (lambda sd: sd.pop("ln_f.weight"), "ln_f.weight"),
    (lambda sd: sd.pop("lm_head.bias"), "lm_head.bias"),
    (lambda sd: sd.__setitem__("lm_head.weight.absmax", sd["lm_head.weight.absmax"].float()),
     "lm_head.weight.absmax"),
    (lambda sd: sd.__setitem__("lm_head.weight.quant_map", torch.zeros(15)), "lm_head.weight.quant_map"),
    (lambda sd: sd.__setitem__("lm_head.weight.nested_absmax", torch.zeros(2)), "lm_head.weight.nested_absmax"),
    (lambda sd: sd.__setitem__("lm_head.weight", sd["lm_head.weight"][:-1].clone()), "lm_head.weight"),
    (lambda sd: sd.__setitem__(_STATE, torch.tensor(list(b"{not json"), dtype=torch.uint8)), _STATE),
    (lambda sd: sd.__setitem__(_STATE, _json_tensor({**_META, "shape": [D, VOCAB]})), _STATE),
    (lambda sd: sd.__setitem__(_STATE, _json_tensor({**_META, "blocksize": 48})), _STATE),
    (lambda sd: sd.__setitem__(_STATE, _json_tensor({**_META, "quant_type": "fp4"})), _STATE),
    (lambda sd: sd.__setitem__(_STATE, _json_tensor({k: v for k, v in _META.items() if k != "dtype"})), _STATE),
    (lambda sd: sd.__setitem__("embed.weight", torch.zeros(VOCAB, D + 1)), "embed.weight"),
    (lambda sd: sd.__setitem__("ln_f.bias", torch.zeros(D, dtype=torch.int32)), "ln_f.bias"),
    (lambda sd: sd.__setitem__("blocks.0.attn.q_proj.weight.absmax", torch.zeros(16)),
     "blocks.0.attn.q_proj.weight.absmax"),  # an NF4 entry for a layer the model keeps dense
    (lambda sd: sd.__setitem__("lm_head.lora_A", torch.zeros(2, D)), "lm_head.lora_A"),
])
def test_load_quantized_refuses_malformed_files_naming_the_key(small_checkpoint, tmp_path, change, key):
    model, entries = small_checkpoint
    sd = dict(entries)
    change(sd)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    target = prepare_model(_tiny(12), r=2, target_modules=["lm_head", "blocks.0.mlp.up"])
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=repr(key).replace(".", r"\.")):
        load_quantized(target, path)
    after = target.state_dict()  # refused before anything changed
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_load_quantized_non_strict_ignores_extra_entries(small_checkpoint, tmp_path):
    model, entries = small_checkpoint
    save_file({**entries, "rotary.inv_freq": torch.ones(4)}, tmp_path / "m.safetensors")
    target = prepare_model(_tiny(13), r=2, target_modules=["lm_head", "blocks.0.mlp.up"])
    with pytest.raises(ValueError, match="'rotary.inv_freq'.*strict=False"):
        load_quantized(target, tmp_path / "m.safetensors")
    load_quantized(target, tmp_path / "m.safetensors", strict=False)
    assert nf4_equal(target.lm_head.weight, model.lm_head.weight)


def test_load_quantized_names_a_dense_weight_where_an_nf4_one_is_needed(tmp_path):
    dense = _tiny(14)
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, tmp_path / "dense.safetensors")
    model = prepare_model(_tiny(14), r=2, target_modules=["lm_head"])
    with pytest.raises(ValueError, match=r"'lm_head\.weight\.quant_state\.bitsandbytes__nf4'.*not stored as an NF4"):
        load_quantized(model, tmp_path / "dense.safetensors")


# --------------------------------------------------------------------------------------------------------------
# save_adapter / load_adapter
# --------------------------------------------------------------------------------------------------------------

def _train_like(model: nn.Module, seed: int) -> None:
    """Give every adapter nonzero, non-trivial values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in qlora_layers(model):
            layer.lora_B.copy_(0.05 * torch.randn(layer.lora_B.shape, generator=g))
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))


def test_adapter_files_are_peft_format_and_round_trip_exactly(tmp_path):
    source = _prepared(15, lora_dropout=0.05)
    _train_like(source, 15)
    save_quantized(source, tmp_path / "base.safetensors")
    save_adapter(source, tmp_path / "adapter", base_model_name_or_path="tiny-lm")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    expected = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "bias": "none",
                "task_type": None, "fan_in_fan_out": False, "inference_mode": True,
                "base_model_name_or_path": "tiny-lm", "rank_pattern": {}, "alpha_pattern": {},
                "target_modules": sorted(LINEAR_NAMES)}  # full paths: PEFT then adapts exactly these
    assert {k: config[k] for k in expected} == expected
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert set(tensors) == {f"base_model.model.{n}.lora_{ab}.weight" for n in LINEAR_NAMES for ab in "AB"}
    assert tensors["base_model.model.blocks.0.mlp.up.lora_A.weight"].shape == (4, D)
    assert tensors["base_model.model.blocks.0.mlp.up.lora_B.weight"].shape == (HIDDEN, 4)

    fresh = _prepared(16, lora_alpha=2)  # other base weights, adapters and alpha: all replaced by loading
    load_quantized(fresh, tmp_path / "base.safetensors")
    assert load_adapter(fresh, tmp_path / "adapter") is fresh
    for (name, a), (_, b) in zip(qlora_layers(source), qlora_layers(fresh)):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B), name
        assert (a.lora_alpha, a.scaling, a.lora_dropout) == (b.lora_alpha, b.scaling, b.lora_dropout), name
    source.eval()
    fresh.eval()
    tokens = _tokens(15)
    with torch.no_grad():
        assert torch.equal(fresh(tokens), source(tokens))


def test_adapter_with_mixed_ranks_uses_rank_pattern(tmp_path):
    source = prepare_model(_tiny(17), r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "lm_head"])
    prepare_model(source, r=8, lora_alpha=16, target_modules=["blocks.1.mlp.down"])
    _train_like(source, 17)
    save_adapter(source, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (2, 4)
    assert config["rank_pattern"] == {"blocks.1.mlp.down": 8}
    assert config["alpha_pattern"] == {"blocks.1.mlp.down": 16}
    # "down" alone would also select blocks.0.mlp.down, which is not adapted: the full path is written.
    assert config["target_modules"] == sorted(["blocks.1.mlp.down", "lm_head"] + [
        f"blocks.{i}.attn.{p}" for i in range(BLOCKS) for p in ("q_proj", "v_proj")])
    target = prepare_model(_tiny(18), r=2, lora_alpha=1, target_modules=["q_proj", "v_proj", "lm_head"])
    prepare_model(target, r=8, lora_alpha=1, target_modules=["blocks.1.mlp.down"])
    load_adapter(target, tmp_path)
    assert target.blocks[1].mlp.down.scaling == 2.0 and target.lm_head.scaling == 2.0
    assert torch.equal(target.blocks[1].mlp.down.lora_B, source.blocks[1].mlp.down.lora_B)


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    model = prepare_model(_tiny(19), r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"])
    _train_like(model, 19)
    directory = tmp_path_factory.mktemp("adapter")
    save_adapter(model, directory)
    return (load_file(directory / "adapter_model.safetensors"),
            json.loads((directory / "adapter_config.json").read_text()))


_A = "base_model.model.lm_head.lora_A.weight"
_B = "base_model.model.blocks.1.attn.q_proj.lora_B.weight"


@pytest.mark.parametrize("change_tensors, change_config, pattern", [
    (lambda t: t.pop(_A), None, repr(_A)),
    (lambda t: t.pop(_B), None, repr(_B)),
    (lambda t: t.__setitem__(_A, torch.zeros(3, D)), None, repr(_A) + r" has shape \(3, 32\).*expects \(2, 32\)"),
    (lambda t: t.__setitem__(_B, torch.zeros(D, 2, dtype=torch.int32)), None, repr(_B) + " must be floating"),
    (lambda t: t.__setitem__("base_model.model.lm_head.lora_E.weight", torch.zeros(2)), None,
     "'base_model.model.lm_head.lora_E.weight'"),
    (lambda t: t.__setitem__("base_model.model.blocks.0.attn.k_proj.lora_A.weight", torch.zeros(2, D)), None,
     "'base_model.model.blocks.0.attn.k_proj.lora_A.weight'"),  # a layer the model did not adapt
    (None, lambda c: c.__setitem__("r", 4), r"r=4 for 'blocks\.0\.attn\.q_proj'"),
    (None, lambda c: c.__setitem__("peft_type", "IA3"), "'peft_type'"),
    (None, lambda c: c.__setitem__("use_dora", True), "'use_dora'"),
    (None, lambda c: c.__setitem__("bias", "all"), "'bias'"),
    (None, lambda c: c.__setitem__("lora_dropout", 1.5), "'lora_dropout'"),
    (None, lambda c: c.__setitem__("rank_pattern", {"lm_head": 0}), "'rank_pattern'"),
])
def test_load_adapter_refuses_mismatches_naming_the_key(saved_adapter, tmp_path, change_tensors, change_config,
                                                       pattern):
    tensors, config = dict(saved_adapter[0]), dict(saved_adapter[1])
    if change_tensors:
        change_tensors(tensors)
    if change_config:
        change_config(config)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model = prepare_model(_tiny(20), r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=pattern):
        load_adapter(model, tmp_path)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_load_adapter_needs_both_files(saved_adapter, tmp_path):
    model = prepare_model(_tiny(21), r=2, target_modules=["lm_head"])
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{broken")
    save_file(saved_adapter[0], tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="adapter_config.json.*not valid UTF-8 JSON"):
        load_adapter(model, tmp_path)


# --------------------------------------------------------------------------------------------------------------
# Bad arguments
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    (dict(r=0), ValueError, "r must be an int >= 1"),
    (dict(r=-3), ValueError, "r must be an int >= 1"),
    (dict(r=2.0), TypeError, "r must be an int"),
    (dict(r=True), TypeError, "r must be an int"),
    (dict(lora_alpha="8"), TypeError, "lora_alpha"),
    (dict(lora_alpha=math.inf), TypeError, "lora_alpha"),
    (dict(lora_dropout=1.0), ValueError, "lora_dropout"),
    (dict(lora_dropout=-0.1), ValueError, "lora_dropout"),
    (dict(target_modules="q_proj"), TypeError, r"target_modules must be None or a list.*\['q_proj'\]"),
    (dict(target_modules=[1]), TypeError, "target_modules must hold strings"),
    (dict(target_modules={"q_proj": 1}), TypeError, "target_modules must be None or a list"),
    (dict(target_modules=[]), ValueError, "target_modules must name at least one"),
    (dict(target_modules=["attn..q_proj"]), ValueError, "target_modules entries"),
    (dict(blocksize=48), ValueError, "blocksize must be one of"),
    (dict(double_quant=1), TypeError, "double_quant must be a bool"),
    (dict(progress="yes"), TypeError, "progress must be None, True or False"),
])
def test_prepare_model_rejects_bad_arguments_before_changing_anything(kwargs, error, message):
    model = _tiny(22)
    with pytest.raises(error, match=message):
        prepare_model(model, **kwargs)
    assert not any(isinstance(m, QLoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_prepare_model_rejects_bad_models_and_weights():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        prepare_model({"lm_head": nn.Linear(2, 2)})
    with pytest.raises(TypeError, match="QLoRALinear.from_linear"):
        prepare_model(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        prepare_model(nn.Sequential(nn.ReLU()))
    model = nn.Sequential(nn.Linear(D, D), nn.Linear(D, D)).to(DEVICE)
    with torch.no_grad():
        model[1].weight[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"1\.weight contains NaN"):
        prepare_model(model)
    assert isinstance(model[0], nn.Linear)  # checked before the first layer was replaced
    wide = nn.Sequential(nn.Linear(4, 4).to(torch.float64))
    with pytest.raises(TypeError, match=r"0\.weight must be float32, float16 or bfloat16"):
        prepare_model(wide)


def test_interop_rejects_bad_arguments(prepared, tmp_path):
    model = prepared[0]
    plain = _tiny(23)
    for fn in (save_quantized, load_quantized, save_adapter, load_adapter):
        with pytest.raises(ValueError, match="no QLoRALinear layer; prepare it first"):
            fn(plain, tmp_path / "x")
        with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
            fn("model", tmp_path / "x")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        save_quantized(model, 3)
    with pytest.raises(TypeError, match="directory must be a str or os.PathLike"):
        save_adapter(model, None)
    with pytest.raises(TypeError, match="base_model_name_or_path"):
        save_adapter(model, tmp_path, base_model_name_or_path=1)
    with pytest.raises(TypeError, match="strict must be a bool"):
        load_quantized(model, tmp_path / "x", strict="yes")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_quantized(model, tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_quantized(model, tmp_path / "junk.safetensors")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        save_adapter(model, tmp_path / "file")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        trainable_parameters_report([1])
