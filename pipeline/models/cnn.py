"""The built-in small CNN for image inputs (channels, height, width)."""

from __future__ import annotations

from torch import nn

from pipeline.core.errors import ModelError
from pipeline.core.specs import CNNSpec
from pipeline.models.common import check_output_width
from pipeline.models.mlp import head


def build(spec: CNNSpec, input_shape: tuple[int, ...], num_classes: int, where: str) -> nn.Module:
    if len(input_shape) != 3:
        raise ModelError(f"{where}.arch: cnn needs image inputs (channels, height, width), "
                         f"the data has shape {input_shape}; use arch: mlp")
    in_ch, size = input_shape[0], min(input_shape[1:])
    layers: list[nn.Module] = []
    for ch in spec.channels:
        layers += [nn.Conv2d(in_ch, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU()]
        if size >= 4:  # pool while the feature map is big enough to keep some layout
            layers.append(nn.MaxPool2d(2))
            size //= 2
        in_ch = ch
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten()]
    model = nn.Sequential(*layers, *head(spec.hidden, spec.dropout, in_ch * 4, num_classes))
    return check_output_width(model, input_shape, num_classes, where, spec.name)
