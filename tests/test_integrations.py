"""qlora under transformers, bitsandbytes and PEFT (``qlora.integrations``), on a tiny random Llama.

The model: ``LlamaForCausalLM`` from a ``LlamaConfig`` (hidden 64, MLP 128, one layer, 4 heads of 16, 2 KV heads,
vocabulary 128), built and saved here, loaded 4-bit by transformers through ``BitsAndBytesConfig`` on the kernels'
device (CPU under the Triton interpreter). Every linear layer has in_features 64 or 128, a multiple of the NF4
blocksize: bitsandbytes 0.50.2's CPU ``dequantize_4bit`` decodes weights with in_features 16, 32 or 96 wrongly
(its bytes are right: qlora reads them to the values SPEC section 5 gives), which would make bitsandbytes the
wrong reference there.

Tolerances. A layer's float32 output is compared with the float64 product of the same tensors (the NF4 weight
dequantized exactly), bounded by Higham's gamma_n = n u / (1 - n u), u = 2^-24, times the sum of the magnitudes of
the terms, with n = K + r + 2 roundings on any term's path (the K-term base and LoRA-A dot products, the r-term
LoRA-B dot product, the scaling, the final sum). Two float32 results each within that bound of the exact value are
within twice it of each other. bitsandbytes decodes a double-quantized block scale as nested_code * absmax2 +
offset in float32 in its own order, so its dequantized weight may differ from qlora's by the two roundings of that
decode: |dW| <= |code| * 2u (|nested_code * absmax2| + |absmax|) + 2u |W|, checked elementwise, then carried
through the product as |x| @ |dW|^T.
"""

from __future__ import annotations

import contextlib
import os

# No Hub access in tests: bitsandbytes' CPU backend would otherwise try to download a kernel when it is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import qlora  # noqa: E402
from qlora.integrations import import_hub_kernels_package  # noqa: E402
from qlora.layers import QLoRALinear  # noqa: E402
from qlora.model import prepare_model, qlora_layers  # noqa: E402

import_hub_kernels_package()  # `python -m pytest` puts the repo root, and so its kernels/ folder, on sys.path
transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
pytest.importorskip("accelerate")

from qlora.integrations import peft as qpeft  # noqa: E402
from qlora.integrations.bitsandbytes import nf4_weight_of  # noqa: E402

U32 = 2.0**-24
DEVICE = "cpu" if qlora.interpreter_active() else "cuda"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 4, 8


def _gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


def tiny_llama_config():
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                    max_position_embeddings=64, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A saved random float32 tiny Llama (safetensors + config.json + generation_config.json)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config())
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path


def load_4bit(path, double_quant=True, quant_storage=torch.uint8, quant_type="nf4"):
    """``path`` loaded 4-bit by transformers, float32 compute; bitsandbytes' AVX512-BF16 CPU repacking switched off
    so that its own forward stays on the standard NF4 bytes (the repacked path rounds the scales to bfloat16)."""
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=quant_storage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map=DEVICE,
                                                                  dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def bnb_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def decode_bound(nf4) -> torch.Tensor:
    """Elementwise bound on |bitsandbytes' dequantized weight - qlora's| (see the module docstring), float64."""
    w = nf4.dequantize(torch.float32).double()
    if not nf4.double_quant:
        return 2 * U32 * w.abs()  # one float32 product each way; the scales are stored as they are
    n = nf4.numel
    scales_of_blocks = torch.arange(-(-n // nf4.blocksize), device=nf4.device) // nf4.nested_blocksize
    product = (nf4.nested_code[nf4.absmax.long()] * nf4.absmax2[scales_of_blocks]).double().abs()
    absmax = (product + abs(nf4.offset))
    packed = nf4.packed.long()
    codes = nf4.code[torch.stack([packed >> 4, packed & 15], 1).reshape(-1)[:n]].double().abs()
    block = torch.arange(n, device=nf4.device) // nf4.blocksize
    return (codes * 2 * U32 * (product + absmax)[block]).reshape(nf4.shape) + 2 * U32 * w.abs()


def linear_bound(x, w, a=None, b=None, scaling=0.0, bias=None) -> torch.Tensor:
    """gamma_{K+r+2} times the magnitudes of every term of x @ w^T + scaling (x @ a^T) @ b^T + bias (float64)."""
    x, w = x.double().abs(), w.double().abs()
    total = x @ w.T
    r = 0
    if a is not None:
        r = a.shape[0]
        total = total + abs(scaling) * (x @ a.double().abs().T) @ b.double().abs().T
    if bias is not None:
        total = total + bias.double().abs()
    return _gamma(w.shape[1] + r + 2) * total


# ------------------------------------------------------------------------------------------------------------------
# 1. prepare_model adopts bitsandbytes Linear4bit layers in place
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("double_quant, quant_storage", [(True, torch.uint8), (False, torch.bfloat16),
                                                         (True, torch.float32)])
def test_prepare_model_adopts_bnb_layers_without_requantizing(tiny_dir, double_quant, quant_storage):
    model = load_4bit(tiny_dir, double_quant, quant_storage)
    layers = dict(bnb_layers(model))
    assert sorted(n.rsplit(".", 1)[-1] for n in layers) == sorted(TARGETS)
    held = {n: (m.weight.data_ptr(), m.weight.quant_state) for n, m in layers.items()}
    gen = torch.Generator().manual_seed(0)
    inputs = {n: torch.randn(2, 5, m.in_features, generator=gen).to(DEVICE) for n, m in layers.items()}
    with torch.no_grad():
        reference = {n: layers[n](x) for n, x in inputs.items()}  # bitsandbytes' own forward
    bnb_weights = {n: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state) for n, m in layers.items()}

    prepare_model(model, r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)

    assert not bnb_layers(model) and model.is_quantized is False
    for name, layer in qlora_layers(model):
        pointer, state = held[name]
        nf4 = layer.weight
        # The very bytes bitsandbytes holds: the layer's tensors view the same memory (no copy, no requantization).
        assert nf4.packed.data_ptr() == pointer and nf4.absmax.data_ptr() == state.absmax.data_ptr()
        assert nf4.code.data_ptr() == state.code.data_ptr()
        assert nf4.double_quant == double_quant
        if double_quant:
            assert nf4.absmax2.data_ptr() == state.state2.absmax.data_ptr() and nf4.offset == float(state.offset)
        assert layer.lora_A.requires_grad and layer.lora_B.requires_grad and not bool(layer.lora_B.any())
        w = nf4.dequantize(torch.float32)
        dw = decode_bound(nf4)
        assert bool(((bnb_weights[name].double() - w.double()).abs() <= dw).all()), name
        x = inputs[name]
        with torch.no_grad():
            y = layer(x)
        # Both products within gamma_{K+2} of their exact values, plus bitsandbytes' decode difference.
        bound = 2 * linear_bound(x, w) + x.double().abs() @ dw.T
        assert bool(((y.double() - reference[name].double()).abs() <= bound).all()), name
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_prepare_model_refuses_fp4_naming_the_layer(tiny_dir):
    model = load_4bit(tiny_dir, quant_type="fp4")
    with pytest.raises(TypeError, match=r"'model\.layers\.0\.self_attn\.q_proj'.*quant_type='fp4'"):
        prepare_model(model, r=R, lora_alpha=ALPHA, target_modules=TARGETS)
    assert len(bnb_layers(model)) == len(TARGETS)  # nothing replaced


def test_prepare_model_refuses_int8_and_unquantized_layers():
    model = nn.Sequential(nn.Linear(64, 64), bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False))
    with pytest.raises(TypeError, match=r"layer '1' is a bitsandbytes Linear8bitLt \(LLM\.int8"):
        prepare_model(model, r=R, lora_alpha=ALPHA)
    assert isinstance(model[0], nn.Linear) and not isinstance(model[0], QLoRALinear)  # checked before changing
    fresh = nn.Sequential(nn.Linear(64, 64), bnb.nn.Linear4bit(64, 64, quant_type="nf4"))  # never moved: raw
    with pytest.raises(ValueError, match=r"layer '1' .* not quantized yet"):
        prepare_model(fresh, r=R, lora_alpha=ALPHA)


@pytest.mark.skipif(DEVICE != "cpu", reason="bitsandbytes repacks weights only for its CPU inference path")
def test_prepare_model_refuses_bytes_bitsandbytes_repacked_for_cpu(tiny_dir):
    if not bnb.nn.Linear4bit(64, 64).support_avx512bf16_for_cpu:  # bitsandbytes' own probe of the CPU
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    model = load_4bit(tiny_dir)
    layer = model.model.layers[0].mlp.down_proj
    layer.support_avx512bf16_for_cpu = True
    with torch.no_grad():
        layer.eval()(torch.randn(1, layer.in_features))  # bitsandbytes repacks on this call
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.down_proj'.*repacked"):
        prepare_model(model, r=R, lora_alpha=ALPHA, target_modules=TARGETS)


def test_prepare_model_does_not_import_bitsandbytes():
    code = ("import sys, torch, qlora; qlora.prepare_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), r=2, "
            "lora_alpha=4); import qlora.integrations.bitsandbytes; print('bitsandbytes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------------------------------
# 2. PEFT on qlora's kernels (and 3. rsLoRA through PEFT)
# ------------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _count_qlora_ops(calls: list):
    """Records the fused layer's launches ("forward", "backward") while active: the launch bodies of
    qlora.kernels.linear that the eager path and the custom operators both end in."""
    from qlora.kernels import linear as kernels_linear

    originals = {name: getattr(kernels_linear, f"_{name}") for name in ("forward", "backward")}

    def counting(name):
        def run(*args, **kwargs):
            calls.append(name)
            return originals[name](*args, **kwargs)
        return run

    for name in originals:
        setattr(kernels_linear, f"_{name}", counting(name))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(kernels_linear, f"_{name}", fn)


def peft_pair(tiny_dir, use_rslora, lora_dropout=0.0):
    """(plain PEFT model, PEFT model on qlora's layers), same 4-bit weights, same LoRA A (same seed), and the same
    random LoRA B (so the adapters contribute)."""
    def config():
        return peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=lora_dropout, target_modules=TARGETS,
                               use_rslora=use_rslora)

    torch.manual_seed(1)
    plain = peft.get_peft_model(load_4bit(tiny_dir), config())
    torch.manual_seed(1)
    ours = peft.get_peft_model(load_4bit(tiny_dir), qpeft.enable(config()))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for (name, p), (name2, q) in zip(plain.named_parameters(), ours.named_parameters()):
            assert name == name2
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
                q.copy_(p)
            assert torch.equal(p, q), name
    return plain, ours


def peft_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_layers_run_qlora_kernels_and_match_plain_peft(tiny_dir, use_rslora):
    plain, ours = peft_pair(tiny_dir, use_rslora)
    plain_layers, our_layers = peft_layers(plain), peft_layers(ours)
    assert set(plain_layers) == set(our_layers) and len(our_layers) == len(TARGETS)
    calls = []
    gen = torch.Generator().manual_seed(3)
    for name, layer in our_layers.items():
        assert isinstance(layer, qpeft.QLoRAPeftLinear), name
        base = plain_layers[name]
        scaling = ALPHA / (R**0.5 if use_rslora else R)
        assert layer.scaling["default"] == base.scaling["default"] == scaling
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        w = nf4_weight_of(layer.get_base_layer()).dequantize(torch.float32)
        x = torch.randn(2, 3, layer.in_features, generator=gen).to(DEVICE).requires_grad_(True)
        dy = torch.randn(2, 3, layer.out_features, generator=gen).to(DEVICE)
        with _count_qlora_ops(calls):
            y = layer(x)
            y.backward(dy)
        assert calls == ["forward", "backward"], calls  # qlora's kernels ran, forward and backward
        calls.clear()
        y_plain = base(x)
        y_plain.backward(dy)
        xd = x.detach().double()
        exact = xd @ w.double().T + scaling * (xd @ a.double().T) @ b.double().T
        bound = linear_bound(x.detach(), w, a.detach(), b.detach(), scaling)
        assert bool(((y.detach().double() - exact).abs() <= bound).all()), name
        dw = decode_bound(nf4_weight_of(base.get_base_layer()))
        assert bool(((y_plain.detach().double() - exact).abs() <= bound + xd.abs() @ dw.T).all()), name
        # Gradients of both adapters against float64: dB = s dy^T (x A^T), dA = s (dy B)^T x, each a chain of two
        # dot products (K, or out_features, then the 6 rows) and the scaling.
        dyd = dy.double().reshape(-1, dy.shape[-1])
        x2 = xd.reshape(-1, xd.shape[-1])
        exact_db = scaling * dyd.T @ (x2 @ a.double().T)
        exact_da = scaling * (dyd @ b.double()).T @ x2
        bound_db = _gamma(x2.shape[1] + x2.shape[0] + 2) * scaling * dyd.abs().T @ (x2.abs() @ a.double().abs().T)
        bound_da = _gamma(dyd.shape[1] + x2.shape[0] + 2) * scaling * (dyd.abs() @ b.double().abs()).T @ x2.abs()
        for grads in (layer, base):
            assert bool(((grads.lora_B["default"].weight.grad.double() - exact_db).abs() <= bound_db).all()), name
            assert bool(((grads.lora_A["default"].weight.grad.double() - exact_da).abs() <= bound_da).all()), name


def test_peft_adapter_saved_on_qlora_layers_loads_in_plain_peft_and_back(tiny_dir, tmp_path):
    plain, ours = peft_pair(tiny_dir, use_rslora=True)
    ours.save_pretrained(tmp_path / "adapter")
    saved = transformers.modeling_utils.load_state_dict(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == 2 * len(TARGETS)
    own = {n: p for n, p in ours.named_parameters() if "lora_" in n}
    for key, value in saved.items():  # PEFT's standard keys, bit-identical tensors
        assert torch.equal(value, own[key.replace(".weight", ".default.weight")]), key
    reloaded_plain = peft.PeftModel.from_pretrained(load_4bit(tiny_dir), str(tmp_path / "adapter"))
    reloaded_ours = qpeft.from_pretrained(load_4bit(tiny_dir), str(tmp_path / "adapter"))
    assert all(isinstance(m, qpeft.QLoRAPeftLinear) for m in peft_layers(reloaded_ours).values())
    for model in (reloaded_plain, reloaded_ours):
        for name, layer in peft_layers(model).items():
            assert layer.scaling["default"] == ALPHA / R**0.5
            mine = peft_layers(ours)[name]
            assert torch.equal(layer.lora_A["default"].weight, mine.lora_A["default"].weight)
            assert torch.equal(layer.lora_B["default"].weight, mine.lora_B["default"].weight)
    # The reloaded qlora model computes what the saved one does: same bytes, same adapters, same kernels.
    tokens = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    ours.eval(), reloaded_ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(tokens).logits, reloaded_ours(tokens).logits)


def test_peft_contract_disable_set_adapter_mixed_batch_merge(tiny_dir):
    _, model = peft_pair(tiny_dir, use_rslora=False)
    model.eval()
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    base = layer.get_base_layer()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, layer.in_features, generator=gen).to(DEVICE)
    w = nf4_weight_of(base).dequantize(torch.float32)

    def lora_exact(adapter, rows=slice(None)):
        a, b = layer.lora_A[adapter].weight.double(), layer.lora_B[adapter].weight.double()
        xd = x[rows].double()
        return xd @ w.double().T + layer.scaling[adapter] * (xd @ a.T) @ b.T, linear_bound(
            x[rows], w, a, b, layer.scaling[adapter])

    def close(y, exact_and_bound):
        exact, bound = exact_and_bound
        return bool(((y.double() - exact).abs() <= bound).all())

    with torch.no_grad():
        assert close(layer(x), lora_exact("default"))
        with model.disable_adapter():  # the base layer alone (bitsandbytes' forward)
            assert close(layer(x), (x.double() @ w.double().T, 2 * linear_bound(x, w) + x.double().abs() @
                                    decode_bound(nf4_weight_of(base)).T))
        # A second adapter, keyed by name; set_adapter switches, mixed batches route rows by name.
        model.add_adapter("other", qpeft.enable(peft.LoraConfig(r=2, lora_alpha=6, target_modules=TARGETS)))
        layer.lora_B["other"].weight.copy_(torch.randn(layer.out_features, 2, generator=gen).to(DEVICE))
        assert isinstance(layer, qpeft.QLoRAPeftLinear) and set(layer.lora_A) == {"default", "other"}
        model.set_adapter("other")
        assert layer.active_adapters == ["other"]
        assert close(layer(x), lora_exact("other"))
        y = layer(x, adapter_names=["default", "__base__", "other"])
        assert close(y[0:1], lora_exact("default", slice(0, 1)))
        assert close(y[2:3], lora_exact("other", slice(2, 3)))
        model.set_adapter("default")

        # Merging folds the adapter into the 4-bit weight: the new bytes are the NF4 quantization of
        # dequantize(W) + delta, computed in float32 (qlora's quantizer is bit-exact with bitsandbytes').
        before = nf4_weight_of(base)
        delta = layer.get_delta_weight("default").float()
        with pytest.warns(UserWarning, match="Merge lora module to 4-bit"):
            layer.merge()
        assert layer.merged and layer.merged_adapters == ["default"]
        expected = qlora.quantize_nf4(before.dequantize(torch.float32) + delta, blocksize=before.blocksize,
                                      double_quant=before.double_quant)
        after = nf4_weight_of(layer.get_base_layer())
        assert torch.equal(after.packed, expected.packed) and torch.equal(after.absmax, expected.absmax)
        merged_w = after.dequantize(torch.float32)
        assert close(layer(x), (x.double() @ merged_w.double().T, 2 * linear_bound(x, merged_w) +
                                x.double().abs() @ decode_bound(after).T))
        with pytest.warns(UserWarning, match="Unmerge lora module to 4-bit"):
            layer.unmerge()
        assert not layer.merged
        restored = nf4_weight_of(layer.get_base_layer())
        expected = qlora.quantize_nf4(merged_w - delta, blocksize=before.blocksize, double_quant=True)
        assert torch.equal(restored.packed, expected.packed)


def test_enable_refuses_what_the_kernels_do_not_compute():
    with pytest.raises(TypeError, match="lora_config must be a peft.LoraConfig"):
        qpeft.enable({"r": 8})
    for field in ("use_dora", "lora_bias", "fan_in_fan_out"):
        with pytest.raises(ValueError, match=f"lora_config.{field}=True"):
            qpeft.enable(peft.LoraConfig(r=4, target_modules=TARGETS, **{field: True}))
    config = peft.LoraConfig(r=4, target_modules=TARGETS)
    assert qpeft.enable(config) is config and config._custom_modules == {bnb.nn.Linear4bit: qpeft.QLoRAPeftLinear}


def test_peft_refuses_fp4_layers_naming_them(tiny_dir):
    model = load_4bit(tiny_dir, quant_type="fp4")
    with pytest.raises(TypeError, match=r"'model\.layers\.0\.self_attn\.q_proj'.*quant_type='fp4'"):
        peft.get_peft_model(model, qpeft.enable(peft.LoraConfig(r=R, target_modules=TARGETS)))


# ------------------------------------------------------------------------------------------------------------------
# 4. qlora quantize MODEL_DIR OUT_DIR: transformers loads the output with no extra argument
# ------------------------------------------------------------------------------------------------------------------

def test_quantized_model_folder_loads_in_transformers_as_4bit(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from qlora import cli

    torch.manual_seed(0)
    config = tiny_llama_config()
    config.num_hidden_layers = 2
    src, out = tmp_path / "model", tmp_path / "model-nf4"
    dense = transformers.LlamaForCausalLM(config)
    dense.save_pretrained(src, max_shard_size="60KB")  # several shards and an index
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0").save_pretrained(src)
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) > 1

    assert cli.main(["quantize", str(src), str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out)  # no quantization argument
    assert transformers.AutoTokenizer.from_pretrained(out)("w5 w7")["input_ids"] == [5, 7]
    assert loaded.is_loaded_in_4bit
    layers = dict(bnb_layers(loaded))
    assert len(layers) == 2 * len(TARGETS) and not isinstance(loaded.lm_head, bnb.nn.Linear4bit)
    state = dense.state_dict()
    for name, layer in layers.items():  # the bytes qlora wrote, read back by bitsandbytes' loader
        expected = qlora.quantize_nf4(state[name + ".weight"])
        got = nf4_weight_of(layer, name)
        assert torch.equal(got.packed, expected.packed) and torch.equal(got.absmax, expected.absmax), name
        assert torch.equal(got.absmax2, expected.absmax2) and got.offset == expected.offset, name
    assert torch.equal(loaded.lm_head.weight, dense.lm_head.weight)

    # End to end: the loaded model adopted by prepare_model computes exactly what prepare_model makes of the dense
    # model (same NF4 bytes, same dense embeddings/norms/lm_head, same kernels; LoRA B = 0). (Not compared with
    # bitsandbytes quantizing at load time: its CPU double quantization can round the scales' mean one ulp apart.)
    prepare_model(loaded, r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)
    prepare_model(dense.to(DEVICE), r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)
    loaded.eval(), dense.eval()
    tokens = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, dense(tokens).logits)


# ------------------------------------------------------------------------------------------------------------------
# 5. transformers.Trainer end to end, both routes
# ------------------------------------------------------------------------------------------------------------------

class _Sequences(torch.utils.data.Dataset):
    """4 token sequences of length 16, each repeating a 4-token motif: one batch of 4, seen on every step, which
    the adapters memorize within a few steps."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        motifs = torch.randint(0, 128, (4, 4), generator=gen)
        self.rows = motifs.repeat(1, 4)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def _prepared(tiny_dir, route):
    """The 4-bit tiny Llama with LoRA (r=8, alpha=16, rsLoRA off, no dropout) by route 1 or 2; same A init."""
    model = load_4bit(tiny_dir)
    torch.manual_seed(5)
    if route == "prepare_model":
        return prepare_model(model, r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    config = qpeft.enable(peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    return peft.get_peft_model(model, config)


def _lora_grads(model, tokens) -> dict:
    model.zero_grad(set_to_none=True)
    model(input_ids=tokens, labels=tokens).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("route", ["prepare_model", "peft"])
def test_trainer_trains_reloads_in_plain_peft_and_checkpoints(tiny_dir, tmp_path, route):
    model = _prepared(tiny_dir, route)
    tokens = _Sequences().rows.to(DEVICE)

    # Gradient checkpointing recomputes the same kernels on the same inputs: the same gradients, bit for bit.
    model.train()
    plain_grads = _lora_grads(model, tokens)
    model.gradient_checkpointing_enable()
    transformers_model = model if route == "prepare_model" else model.base_model.model
    assert transformers_model.is_gradient_checkpointing
    checkpointed = _lora_grads(model, tokens)
    assert plain_grads.keys() == checkpointed.keys() and len(plain_grads) == 2 * len(TARGETS)
    for name, grad in plain_grads.items():
        assert torch.equal(grad, checkpointed[name]), name
    model.gradient_checkpointing_disable()
    model.zero_grad(set_to_none=True)

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=10, per_device_train_batch_size=4, learning_rate=3e-2,
        lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no", seed=0,
        use_cpu=DEVICE == "cpu", disable_tqdm=True, dataloader_num_workers=0)
    optimizer = qlora.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Sequences(), optimizers=(optimizer, None))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 10
    # 10 deterministic steps at lr 3e-2 on one batch (ln 128 = 4.85 at random): measured 4.85 -> 4.18. Frozen
    # adapters or a dead optimizer keep the loss where it starts.
    assert losses[-1] < losses[0] - 0.4 and sum(losses[-3:]) < sum(losses[:3]), losses

    # The trained adapter, saved in PEFT's format, reloads in plain PEFT on a freshly loaded 4-bit model.
    adapter = tmp_path / "adapter"
    if route == "prepare_model":
        qlora.save_adapter(model, adapter)
    else:
        model.save_pretrained(adapter)
    fresh = peft.PeftModel.from_pretrained(load_4bit(tiny_dir), str(adapter))
    assert not any(isinstance(m, qpeft.QLoRAPeftLinear) for m in fresh.modules())
    model.eval(), fresh.eval()
    probe = _Sequences().rows.to(DEVICE)
    with torch.no_grad():
        ours, theirs = model(probe).logits, fresh(probe).logits
        with fresh.disable_adapter():
            untrained = fresh(probe).logits
    # Same NF4 bytes, same adapter tensors; what remains is float32 rounding in two summation orders, each layer
    # within gamma_{K+r+2} ~ 1e-5 relative of exact (see above) on logits of magnitude < 10, through one decoder
    # layer: 1e-4 absolute leaves a wide margin. The adapter itself moves the logits by orders of magnitude more.
    assert float((ours - theirs).abs().max()) < 1e-4
    assert float((ours - untrained).abs().max()) > 1e-1
