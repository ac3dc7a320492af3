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


class DiesOnce(nn.Module):
    """An MLP teacher that kills its own process the first time it runs a real batch, unless
    `marker` exists: simulates a worker lost mid-task (out of memory, preemption)."""

    def __init__(self, marker: str, inputs: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.net = mlp(inputs, classes)
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import os

        if x.shape[0] > 2 and not os.path.exists(self.marker):  # not the 2-row shape check
            open(self.marker, "w").close()
            os._exit(1)
        return self.net(x)


def dies_once(**kw) -> nn.Module:
    return DiesOnce(**kw)


def heavy(inputs: int = 64, classes: int = 10, width: int = 1024, depth: int = 4) -> nn.Module:
    """A compute-heavy teacher for timing fan-out and killing runs mid-way."""
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(inputs, width), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))
