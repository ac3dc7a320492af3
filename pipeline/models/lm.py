"""The language-model interface: tokens (B, L) -> logits (B, L, V), split into hidden states and
the output projection so a loss can compute logits a chunk of positions at a time."""

from __future__ import annotations

import torch
from torch import nn


def hidden_and_head(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, nn.Module]:
    return model.hidden(tokens), model.head
