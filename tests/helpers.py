"""Helpers shared by several test modules (imported as ``helpers``: pytest puts tests/ on sys.path, and the FSDP
worker script runs from this folder)."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn


@contextlib.contextmanager
def interpreted_launches():
    """Within the block, the name of every kernel the Triton interpreter launches is appended to the yielded list
    (in launch order); the kernels run as usual."""
    from triton.runtime import interpreter

    names: list[str] = []
    original = interpreter.InterpretedFunction.run

    def run(self, *args, **kwargs):
        names.append(self.fn.__name__)
        return original(self, *args, **kwargs)

    interpreter.InterpretedFunction.run = run
    try:
        yield names
    finally:
        interpreter.InterpretedFunction.run = original


def nf4_equal(a, b) -> bool:
    """Two NF4 weights hold the same bits: shape, dtype, blocksizes, offset and every tensor (dtype and values)."""
    if (tuple(a.shape), a.dtype, a.blocksize, a.offset, a.nested_blocksize) != (
            tuple(b.shape), b.dtype, b.blocksize, b.offset, b.nested_blocksize):
        return False
    for name in ("packed", "absmax", "code", "absmax2", "nested_code"):
        x, y = getattr(a, name), getattr(b, name)
        if (x is None) != (y is None) or (x is not None and not (x.dtype == y.dtype and torch.equal(x, y))):
            return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# The tiny transformer of tests/test_model.py and tests/test_fsdp.py
# ----------------------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Single-head causal self-attention in plain torch; x (batch, seq, d) -> (batch, seq, d)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.d = d
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, nn.Linear(d, d))

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.d)
        future = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
        return self.o_proj(scores.masked_fill(future, float("-inf")).softmax(-1) @ v)


class MLP(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.down(nn.functional.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = nn.LayerNorm(d), Attention(d), nn.LayerNorm(d), MLP(d, hidden)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Tokens (batch, seq) int64 -> logits (batch, seq, vocab) float32: an embedding, ``blocks`` pre-norm blocks
    (``blocks.<i>.attn.{q,k,v,o}_proj`` (d, d), ``blocks.<i>.mlp.up`` (d -> hidden), ``.mlp.down``), a final
    LayerNorm and ``lm_head`` (d -> vocab); every nn.Linear has a bias. Parameters are drawn from torch's global
    generator in that order."""

    def __init__(self, vocab: int, d: int, hidden: int, blocks: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, hidden) for _ in range(blocks))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))
