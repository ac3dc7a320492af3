"""Models: built-in MLP and small CNN, or a user model given as `package.module:function`.

Teachers and students share these builders; a model's output width is checked against the class
count before it is used, so a mismatch fails with a clear message instead of a shape error.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.config import DEVICE_FORMS, ModelSpec, valid_device
from pipeline.core.errors import ConfigError, ModelError


def build_model(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int, where: str) -> nn.Module:
    """Build `spec` for inputs of `input_shape` (no batch dim) and `num_classes` outputs.

    Language models (gpt, hf) get input_shape (seq_len + 1,) and the vocabulary size."""
    if spec.arch in ("gpt", "hf"):
        from pipeline.models.lm import build_lm

        return build_lm(spec, num_classes, input_shape[0] - 1, where)
    if spec.arch == "mlp":
        model = _mlp(spec, input_shape, num_classes)
    elif spec.arch == "cnn":
        model = _cnn(spec, input_shape, num_classes, where)
    else:
        model = _imported(spec, where)
    check_output_width(model, input_shape, num_classes, where, spec.name)
    return model


def _mlp(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    width = 1
    for d in input_shape:
        width *= d
    return nn.Sequential(nn.Flatten(), *_head(spec, width, num_classes))


def _head(spec: ModelSpec, width: int, num_classes: int) -> list[nn.Module]:
    """Hidden Linear-ReLU(-Dropout) layers of sizes spec.hidden, then the output layer."""
    layers: list[nn.Module] = []
    for h in spec.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if spec.dropout > 0:
            layers.append(nn.Dropout(spec.dropout))
        width = h
    return [*layers, nn.Linear(width, num_classes)]


def _cnn(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int, where: str) -> nn.Module:
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
    return nn.Sequential(*layers, *_head(spec, in_ch * 4, num_classes))


def import_factory(spec: ModelSpec, where: str) -> Callable[..., Any]:
    """The function named by spec.factory; any failure of the user's module is one ModelError."""
    assert spec.factory is not None
    module_name, _, fn_name = spec.factory.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelError(f"{where}: cannot import {spec.factory!r} ({e}); "
                         "check the module is on PYTHONPATH") from None
    except SyntaxError as e:
        raise ModelError(f"{where}: {e.filename}:{e.lineno}: SyntaxError in {module_name}: {e.msg}") from None
    except Exception as e:  # the module itself raised while being imported
        raise ModelError(f"{where}: importing {module_name} raised {first_line(e)}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ModelError(f"{where}: module {module_name} has no function {fn_name!r}; "
                         "give 'package.module:function'")
    return fn


def first_line(e: BaseException) -> str:
    """`TypeName: first line of the message`, for one-line errors about user code."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _imported(spec: ModelSpec, where: str) -> nn.Module:
    fn = import_factory(spec, f"{where}.factory")
    try:
        model = fn(**spec.kwargs)
    except TypeError as e:
        if "argument" in str(e):  # unexpected / missing keyword arguments
            raise ModelError(f"{where}.kwargs: {spec.factory}(**{spec.kwargs}) failed: {first_line(e)}; "
                             "pass only the factory's parameters") from None
        raise ModelError(f"{where}.factory: {spec.factory} raised {first_line(e)}") from None
    except Exception as e:
        raise ModelError(f"{where}.factory: {spec.factory} raised {first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{where}.factory: {spec.factory} returned {type(model).__name__}, not a torch nn.Module")
    return model


def check_output_width(model: nn.Module, input_shape: tuple[int, ...], num_classes: int,
                       where: str, name: str) -> None:
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


def load_state(model: nn.Module, path: Path, where: str) -> None:
    if path.is_dir():
        raise ModelError(f"{where}.checkpoint: {path} is a directory; give a state_dict file saved with torch.save")
    if not path.is_file():
        raise ModelError(f"{where}.checkpoint: {path} does not exist; give a state_dict saved with torch.save")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # random bytes raise UnpicklingError, BadZipFile, RuntimeError, EOFError, ...
        raise ModelError(f"{where}.checkpoint: cannot load {path} ({type(e).__name__}); "
                         "save it with torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ModelError(f"{where}.checkpoint: {path} holds a {type(state).__name__}, not a state_dict; "
                         "save it with torch.save(model.state_dict(), path)")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError, KeyError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"{where}.checkpoint: {path} does not fit the model ({first})") from None


def resolve_device(name: str, where: str = "device") -> torch.device:
    """auto, cpu, cuda or cuda:N as a torch.device; a CUDA device this machine lacks is one line."""
    if not valid_device(name):
        raise ConfigError(f"{where}: {name!r} is not a device; use {DEVICE_FORMS}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{where}: {name} requested but CUDA is not available on this machine "
                              f"({_host()}); use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{where}: {name} requested but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s); use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


def _host() -> str:
    import socket

    return socket.gethostname()

