"""The architecture table: each spec class of pipeline/core/specs.py and what the pipeline needs
from it, looked up once by `architecture(spec)`.

    model = build_model(spec, input_shape, num_classes, "student.models.0")

Adding an architecture is a spec class in pipeline/core/specs.py, a module here with its `build`,
and one entry in ARCHITECTURES.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.config import DEVICE_FORMS, valid_device
from pipeline.core.errors import ConfigError, ModelError
from pipeline.core.specs import CNNSpec, GPTSpec, HFSpec, ImportSpec, MLPSpec, ModelSpec
from pipeline.models import cnn, gpt, hf, imported, mlp


def _no_identity(spec: Any, weights: Path, num_classes: int, where: str) -> dict[str, Any]:
    return {}


def _no_files(spec: Any) -> list[Path]:
    return []


def _no_check(spec: Any, weights: Path, vocab: str | None, where: str) -> None:
    return None


@dataclass(frozen=True)
class Architecture:
    # (spec, input_shape without the batch dim, classes or vocabulary size, config field) -> model;
    # language models get input_shape (seq_len + 1,)
    build: Callable[[Any, tuple[int, ...], int, str], nn.Module]
    builds_weights: bool = False  # build reads the teacher's weights itself (from_pretrained)
    # (spec, weights path, classes, field) -> what a loaded teacher's identity holds beyond its
    # spec and the hash of its weights
    identity: Callable[[Any, Path, int, str], dict[str, Any]] = _no_identity
    code_files: Callable[[Any], list[Path]] = _no_files  # source files the identity depends on
    check_weights: Callable[[Any, Path, str | None, str], None] = _no_check  # (spec, weights, vocab, field)


ARCHITECTURES: dict[type[ModelSpec], Architecture] = {
    MLPSpec: Architecture(mlp.build),
    CNNSpec: Architecture(cnn.build),
    ImportSpec: Architecture(imported.build, identity=imported.identity, code_files=imported.code_files),
    GPTSpec: Architecture(gpt.build),
    HFSpec: Architecture(hf.build, builds_weights=True, identity=hf.identity, check_weights=hf.check_tokenizer),
}


def architecture(spec: ModelSpec) -> Architecture:
    return ARCHITECTURES[type(spec)]


def build_model(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int, where: str) -> nn.Module:
    """Build `spec` for inputs of `input_shape` (no batch dim) and `num_classes` outputs.

    Language models (gpt, hf) get input_shape (seq_len + 1,) and the vocabulary size."""
    return architecture(spec).build(spec, input_shape, num_classes, where)


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

