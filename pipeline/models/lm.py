"""Causal language models: a built-in small GPT, and Hugging Face models from a local directory.

Both map tokens (B, L) to logits (B, L, V); `hidden_and_head` splits that into hidden states and the
output projection so a loss can compute logits a chunk of positions at a time.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.config import ModelSpec
from pipeline.core.errors import ModelError


class Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, L, d)
        B, L, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             dropout_p=self.dropout if self.training else 0.0)  # (B, H, L, d/H)
        x = x + F.dropout(self.proj(att.transpose(1, 2).reshape(B, L, d)), self.dropout, self.training)
        return x + F.dropout(self.mlp(self.ln2(x)), self.dropout, self.training)


class GPT(nn.Module):
    def __init__(self, vocab: int, context: int, d: int, layers: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens (B, L) -> (B, L, d)
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.ln(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, L) -> logits (B, L, V)
        return self.head(self.hidden(tokens))


class Sliced(nn.Module):
    """An output layer padded past the tokenizer (Pythia 50,304 for 50,277 tokens): keep the first
    `vocab` logits, so the padded ones never enter a softmax."""

    def __init__(self, head: nn.Module, vocab: int) -> None:
        super().__init__()
        self.inner, self.vocab = head, vocab

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.inner(hidden)[..., :self.vocab]


class HFCausalLM(nn.Module):
    """A transformers causal LM behind the same tokens -> logits interface, over the tokenizer's
    `vocab` tokens even when its output layer is padded wider."""

    def __init__(self, model: nn.Module, vocab: int) -> None:
        super().__init__()
        self.model, self.vocab = model, vocab
        self.output_width = model.get_output_embeddings().weight.shape[0]

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.base_model(input_ids=tokens).last_hidden_state

    @property
    def head(self) -> nn.Module:
        head = self.model.get_output_embeddings()
        return head if self.output_width == self.vocab else Sliced(head, self.vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens).logits[..., :self.vocab]


def build_lm(spec: ModelSpec, vocab: int, context: int, where: str) -> nn.Module:
    if spec.arch == "gpt":
        if spec.d_model % spec.heads:
            raise ModelError(f"{where}.d_model: {spec.d_model} is not a multiple of heads={spec.heads}")
        return GPT(vocab, context, spec.d_model, spec.layers, spec.heads, spec.dropout)
    if spec.arch == "hf":
        from transformers import AutoModelForCausalLM

        path = Path(spec.path or "")
        if not (path / "config.json").is_file():
            raise ModelError(f"{where}.path: {spec.path} is not a local model directory with config.json; "
                             "save one with model.save_pretrained(dir)")
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        width = model.get_output_embeddings().weight.shape[0]
        if width < vocab:
            raise ModelError(f"{where} ({spec.name}): output width {width} but the tokenizer has {vocab} "
                             "tokens; every model must use the tokenizer in data.tokenizer")
        return HFCausalLM(model, vocab)  # a wider output layer is padding: sliced off
    raise ModelError(f"{where}.arch: {spec.arch} is not a language model; use gpt or hf with data.task: lm")


def output_width(path: str | Path) -> int | None:
    """The output width a Hugging Face model directory declares (vocab_size in config.json)."""
    import json

    try:
        return int(json.loads((Path(path) / "config.json").read_text())["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def hidden_and_head(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, nn.Module]:
    return model.hidden(tokens), model.head

