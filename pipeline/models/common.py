"""What the architecture modules share: one-line messages about user code, and the check that a
classifier returns (batch, classes) logits."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.core.errors import ModelError


def first_line(e: BaseException) -> str:
    """`TypeName: first line of the message`, for one-line errors about user code."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def check_output_width(model: nn.Module, input_shape: tuple[int, ...], num_classes: int,
                       where: str, name: str) -> nn.Module:
    """`model`, once a forward pass on zeros has returned (2, num_classes) logits."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        try:
            out = model(torch.zeros((2, *input_shape)))
        except Exception as e:  # user forwards raise anything: shape, type or their own errors
            raise ModelError(f"{where} ({name}): forward pass on inputs of shape {input_shape} failed: "
                             f"{first_line(e)}") from None
    model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"{where} ({name}): forward returned {type(out).__name__}; the model must return "
                         f"a (batch, {num_classes}) logits tensor")
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise ModelError(f"{where} ({name}): output width {tuple(out.shape[1:])} but the data has "
                         f"{num_classes} classes; the model must return (batch, {num_classes}) logits")
    return model
