"""User models loaded by import path in tests (factory: 'userzoo:<name>')."""

import torch
from torch import nn


def mlp(inputs: int = 64, classes: int = 10, hidden: int = 32) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes))


class NaNAfter(nn.Module):
    """Returns NaN logits for every row whose first feature is above `threshold`."""

    def __init__(self, inputs: int = 64, classes: int = 10, threshold: float = 0.5) -> None:
        super().__init__()
        self.net = mlp(inputs, classes)
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        bad = x.flatten(1).sum(1) > self.threshold * x[0].numel()
        return torch.where(bad[:, None], torch.full_like(out, float("nan")), out)


def nan_model(**kw) -> nn.Module:
    return NaNAfter(**kw)
