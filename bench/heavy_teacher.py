"""A compute-heavy teacher for the benchmarks (factory 'heavy_teacher:make', bench/ on PYTHONPATH)."""

from torch import nn


def make(inputs: int = 64, classes: int = 1000, width: int = 1536, depth: int = 4) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(inputs, width), nn.GELU()]
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))
