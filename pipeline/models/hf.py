"""A Hugging Face causal LM from a local directory (`save_pretrained`), behind the same
tokens -> logits interface as the built-in GPT, over the tokenizer's tokens even when its output
layer is padded wider (Pythia: 50,304 outputs for 50,277 tokens)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.errors import ModelError
from pipeline.core.specs import HFSpec


class Sliced(nn.Module):
    """An output layer padded past the tokenizer (Pythia 50,304 for 50,277 tokens): keep the first
    `vocab` logits, so the padded ones never enter a softmax."""

    def __init__(self, head: nn.Module, vocab: int) -> None:
        super().__init__()
        self.inner, self.vocab = head, vocab

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.inner(hidden)[..., :self.vocab]


class HFCausalLM(nn.Module):
    """A transformers causal LM behind the same tokens -> logits interface, over the tokenizer's
    `vocab` tokens even when its output layer is padded wider."""

    def __init__(self, model: nn.Module, vocab: int) -> None:
        super().__init__()
        self.model, self.vocab = model, vocab
        self.output_width = model.get_output_embeddings().weight.shape[0]

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.base_model(input_ids=tokens).last_hidden_state

    @property
    def head(self) -> nn.Module:
        head = self.model.get_output_embeddings()
        return head if self.output_width == self.vocab else Sliced(head, self.vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens).logits[..., :self.vocab]


def build(spec: HFSpec, input_shape: tuple[int, ...], num_classes: int, where: str) -> nn.Module:
    """The model in spec.path with its weights (from_pretrained loads them)."""
    from transformers import AutoModelForCausalLM

    path = Path(spec.path or "")
    model_config(path, where)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        lines = str(e).strip().splitlines()
        raise ModelError(f"{where}.path: {path}: transformers cannot load the model ({type(e).__name__}: "
                         f"{lines[0] if lines else ''}); save it again with model.save_pretrained(dir)") from None
    width = model.get_output_embeddings().weight.shape[0]
    if width < num_classes:
        raise ModelError(f"{where} ({spec.name}): output width {width} but the tokenizer has {num_classes} "
                         "tokens; every model must use the tokenizer in data.tokenizer")
    return HFCausalLM(model, num_classes)  # a wider output layer is padding: sliced off


def model_config(path: Path, where: str) -> dict[str, Any]:
    """A model directory's config.json: a JSON object naming its model_type, with a whole vocab_size
    if it has one. Checked where the teacher's identity is made, before a cache writes anything."""
    file = path / "config.json"
    fix = "save the model again with model.save_pretrained(dir)"
    if not file.is_file():
        raise ModelError(f"{where}.path: {path} is not a local model directory with config.json; {fix}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise ModelError(f"{where}.path: {file} is not valid JSON ({type(e).__name__}); {fix}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelError(f"{where}.path: {file} is not a transformers model config (no model_type); {fix}")
    vocab = config.get("vocab_size")
    if vocab is not None and (isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1):
        raise ModelError(f"{where}.path: {file}: vocab_size {vocab!r} is not a whole number >= 1; {fix}")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ModelError(f"{where}.path: {path} holds no weights ({', '.join(WEIGHT_FILES)}); {fix}")
    from transformers import AutoConfig

    try:  # parses the config as from_pretrained will (an unknown model_type, a bad value), weights unread
        AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        lines = str(e).strip().splitlines()
        raise ModelError(f"{where}.path: {file}: transformers cannot read it ({type(e).__name__}: "
                         f"{lines[0] if lines else ''}); {fix}") from None
    return config


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def output_width(path: str | Path) -> int | None:
    """The output width a Hugging Face model directory declares (vocab_size in config.json)."""
    try:
        return int(json.loads((Path(path) / "config.json").read_text())["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def identity(spec: HFSpec, weights: Path, num_classes: int, where: str) -> dict[str, Any]:
    """An output layer padded past the tokenizer records both sizes (its padded logits are dropped
    before the softmax). The model's config.json is checked here, before a cache writes anything."""
    model_config(Path(weights), where)
    width = output_width(weights)
    return {"output_width": width, "vocab_size": num_classes} if width is not None and width != num_classes else {}


def check_tokenizer(spec: HFSpec, weights: Path, vocab: str | None, where: str) -> None:
    """A teacher that ships its own tokenizer must share data.tokenizer's vocabulary."""
    if not vocab or not (weights / "tokenizer.json").is_file():
        return
    from pipeline.inputs.text import Tokenizer

    theirs = Tokenizer(weights).fingerprint
    if theirs != vocab:
        raise ModelError(f"{where} ({spec.name}): its tokenizer (vocab {theirs}) differs from "
                         f"data.tokenizer (vocab {vocab}); an ensemble of language models must "
                         "share one tokenizer")
