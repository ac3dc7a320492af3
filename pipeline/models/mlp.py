"""Built-in classifiers: a multilayer perceptron, and the hidden-layer head the CNN shares."""

from __future__ import annotations

import math

from torch import nn

from pipeline.core.specs import MLPSpec
from pipeline.models.common import check_output_width


def head(hidden: tuple[int, ...], dropout: float, width: int, num_classes: int) -> list[nn.Module]:
    """Hidden Linear-ReLU(-Dropout) layers of sizes `hidden`, then the output layer."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    return [*layers, nn.Linear(width, num_classes)]


def build(spec: MLPSpec, input_shape: tuple[int, ...], num_classes: int, where: str) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), *head(spec.hidden, spec.dropout, math.prod(input_shape), num_classes))
    return check_output_width(model, input_shape, num_classes, where, spec.name)
