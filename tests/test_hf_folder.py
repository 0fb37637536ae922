"""`qlora quantize MODEL_DIR OUT_DIR` (qlora/hf_folder.py) without transformers: the files it writes for a
hand-made model folder (two shards and an index, a tokenizer file), and every refusal, with the exit status 2 and
a message naming the path or option. tests/test_integrations.py loads such an output with transformers itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import qlora  # noqa: F401  (interpreter switch before the kernels)
from qlora import cli
from qlora.nf4 import NF4Weight, quantize_nf4

D = 64
LINEAR = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"]


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A model folder in Hugging Face's layout: config.json, two shards with an index, a tokenizer file."""
    gen = torch.Generator().manual_seed(0)
    src = tmp_path / "model"
    src.mkdir()
    shards = {
        "model-00001-of-00002.safetensors": {"model.embed_tokens.weight": torch.randn(32, D, generator=gen),
                                             LINEAR[0]: torch.randn(D, D, generator=gen)},
        "model-00002-of-00002.safetensors": {LINEAR[1]: torch.randn(D, 2 * D, generator=gen),
                                             "model.norm.weight": torch.ones(D),
                                             "lm_head.weight": torch.randn(32, D, generator=gen)},
    }
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, src / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": D, "dtype": "float32"}))
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    return src


def test_model_folder_output_layout(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["quantize", str(model_dir), str(out), "--no-double-quant"]) == 0
    assert "2 safetensors files" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in model_dir.iterdir())
    assert (out / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == D
    qc = config["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] is True and qc["load_in_8bit"] is False
    assert qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"] is False
    assert qc["bnb_4bit_compute_dtype"] == "float32" and qc["bnb_4bit_quant_storage"] == "uint8"
    assert qc["llm_int8_skip_modules"] == ["lm_head", "model.embed_tokens"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    total = 0
    for name in sorted(set(index["weight_map"].values())):
        with safe_open(str(out / name), framework="pt") as f:
            keys = set(f.keys())
            total += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys)
        assert keys == {k for k, v in index["weight_map"].items() if v == name}
    assert index["metadata"]["total_size"] == total
    source = {**load_file(model_dir / "model-00001-of-00002.safetensors"),
              **load_file(model_dir / "model-00002-of-00002.safetensors")}
    written = {**load_file(out / "model-00001-of-00002.safetensors"),
               **load_file(out / "model-00002-of-00002.safetensors")}
    for key in LINEAR:  # the entries qlora's quantizer (bit-exact with bitsandbytes) gives, in the input's shard
        expected = quantize_nf4(source[key], double_quant=False).to_bnb_state_dict(key)
        assert all(torch.equal(written[k], v) for k, v in expected.items()), key
        assert index["weight_map"][key] == index["weight_map"][key + ".absmax"]
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(written[key], source[key])


def test_model_folder_quant_storage_and_compute_dtype(model_dir, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["quantize", str(model_dir), str(out), "--quant-storage", "bfloat16", "--compute-dtype",
                     "bfloat16"]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_quant_storage"] == "bfloat16" and qc["bnb_4bit_compute_dtype"] == "bfloat16"
    written = load_file(out / "model-00001-of-00002.safetensors")
    key = LINEAR[0]
    assert written[key].dtype == torch.bfloat16 and tuple(written[key].shape) == (D * D // 4, 1)
    weight = NF4Weight.from_bnb_state_dict(written, key)  # the bytes read back through the bfloat16 view
    source = load_file(model_dir / "model-00001-of-00002.safetensors")[key]
    assert torch.equal(weight.packed, quantize_nf4(source).packed)


@pytest.mark.parametrize("change, args, message", [
    (lambda src, out: (out.mkdir(), (out / "x").write_text("")), [], "exists and is not an empty folder"),
    (lambda src, out: None, ["--same"], "is the input folder"),
    (lambda src, out: [p.unlink() for p in src.glob("*.safetensors*")] + [(src / "pytorch_model.bin").write_bytes(
        b"")], [], "without \\*.safetensors weights \\(it has pytorch_model.bin"),
    (lambda src, out: (src / "config.json").write_text('{"quantization_config": {"load_in_4bit": true}}'), [],
     "already has a quantization_config"),
    (lambda src, out: (src / "config.json").write_text("{"), [], "config.*not readable JSON"),
    (lambda src, out: None, ["--target", "nothing_here"], "--target nothing_here"),
    (lambda src, out: None, ["--target", "attention..query"], "'attention..query' is not a module name suffix"),
])
def test_model_folder_refusals(model_dir, tmp_path, capsys, change, args, message):
    out = tmp_path / "out"
    change(model_dir, out)
    if args == ["--same"]:
        out, args = model_dir, []
    before = sorted(p.name for p in model_dir.iterdir())
    assert cli.main(["quantize", str(model_dir), str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qlora quantize: error:")
    assert __import__("re").search(message, err), err
    assert sorted(p.name for p in model_dir.iterdir()) == before
    assert not list(tmp_path.glob(".out.qlora-tmp-*"))  # nothing half-written left behind


def test_model_folder_options_are_refused_for_a_single_file(model_dir, tmp_path, capsys):
    single = model_dir / "model-00001-of-00002.safetensors"
    assert cli.main(["quantize", str(single), str(tmp_path / "o.safetensors"), "--quant-storage", "bfloat16"]) == 2
    assert "--quant-storage applies to a model folder" in capsys.readouterr().err
    # A model folder with OUT ending in .safetensors keeps the single-file behaviour.
    assert cli.main(["quantize", str(model_dir), str(tmp_path / "one.safetensors")]) == 0
    assert (tmp_path / "one.safetensors").is_file()
