"""The language-model interface: tokens (B, L) -> logits (B, L, V), split into hidden states and
the output projection so a loss can compute logits a chunk of positions at a time."""

from __future__ import annotations

import torch
from torch import nn


def hidden_and_head(model: nn.Module, tokens: torch.Tensor,
                    segments: torch.Tensor | None = None) -> tuple[torch.Tensor, nn.Module]:
    """`segments` (B, L): each token's document within its row (-1: padding); a model whose
    `hidden` takes them keeps attention inside each document, others attend across (causally)."""
    if segments is not None and getattr(model, "takes_segments", False):
        return model.hidden(tokens, segments), model.head
    return model.hidden(tokens), model.head
