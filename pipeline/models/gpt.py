"""The built-in small GPT: tokens (B, L) -> logits (B, L, V), with `hidden` and `head` split so a
loss can compute logits a chunk of positions at a time."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.specs import GPTSpec


class Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # x (B, L, d)
        B, L, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
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

    takes_segments = True

    def hidden(self, tokens: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, L) -> (B, L, d). With `segments` (B, L) (documents packed in a row, numbered
        from 0; -1 is padding) a token attends only to earlier tokens of its own document and its
        position counts from that document's start, as if the document began the row."""
        L = tokens.shape[1]
        at = torch.arange(L, device=tokens.device)
        mask = None
        if segments is None:
            pos = at
        else:
            same = segments[:, :, None] == segments[:, None, :]  # (B, L, L)
            mask = (same & (at[:, None] >= at[None, :]))[:, None]  # (B, 1, L, L): causal, in-document
            starts = torch.where(torch.diff(segments, prepend=segments[:, :1] - 1) != 0, at, 0)
            pos = at - torch.cummax(starts, dim=1).values  # (B, L) positions from each document's start
        x = self.tok(tokens) + self.pos(pos)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, L) -> logits (B, L, V)
        return self.head(self.hidden(tokens))


def build(spec: GPTSpec, input_shape: tuple[int, ...], num_classes: int, where: str) -> nn.Module:
    """A GPT over `num_classes` tokens; input_shape is (seq_len + 1,): it reads seq_len of them."""
    return GPT(num_classes, input_shape[0] - 1, spec.d_model, spec.layers, spec.heads, spec.dropout)
