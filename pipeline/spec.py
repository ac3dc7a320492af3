"""A cache's identity: the spec of everything that determines its targets, and its directory.

    ctx = context(cfg)      # hashes the transfer set and each teacher's checkpoint
    ctx.dir                 # <cache root>/<cache_id>

Shared by the cache stage (which writes it), the student stage (which reads the cache its config
makes) and `caches fidelity`. Built fresh on every call and passed explicitly: nothing outlives the
files it was computed from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import cache as fmt
from pipeline.config import Config
from pipeline.data import Splits, load_splits
from pipeline.encodings import Encoding, encoding_from_config
from pipeline.ensemble import TeacherRef, normalized_weights, teacher_identity, teacher_refs
from pipeline.lm import output_width
from pipeline.models import resolve_device
from pipeline.views import ViewSpec, check_images


@dataclass(frozen=True)
class Context:
    """Everything derived from the config and the files it names, built once per call and passed
    explicitly: nothing outlives the files it was computed from."""

    cfg: Config
    splits: Splits
    spec: dict[str, Any]
    dir: Path
    encoding: Encoding
    device: torch.device
    precision: str  # fp32 | bf16 | fp16: the teachers' compute dtype
    views: ViewSpec | None = None  # cache.views > 0: each row is one augmented view

    @property
    def token_rows(self) -> bool:
        return self.cfg.data.task == "lm"


def context(cfg: Config) -> Context:
    splits = load_splits(cfg)
    refs = teacher_refs(cfg, splits)
    c = cfg.cache
    enc = encoding_from_config(c, splits.num_classes)
    device = resolve_device(c.device, "cache.device")
    precision = c.precision if c.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    spec = {
        "format_version": fmt.FORMAT_VERSION,
        "dataset": {"fingerprint": splits.transfer.fingerprint, "rows": len(splits.transfer),
                    "input_shape": list(splits.input_shape)},
        "num_classes": splits.num_classes,
        "teachers": [_identity(r, splits.num_classes) for r in refs],
        "ensemble": cfg.teachers.ensemble,
        "weights": normalized_weights(cfg),
        "temperature": cfg.teachers.temperature,
        "encoding": enc.params(),
        "compute": {"device": device.type, "precision": precision},  # bf16 targets differ from fp32 ones
        "layout": {"backend": c.backend, "rows_per_shard": c.rows_per_shard, "chunk_rows": c.chunk_rows},
    }
    if cfg.data.task == "lm":
        spec["dataset"].update(seq_len=cfg.data.seq_len, tokens=len(splits.transfer) * cfg.data.seq_len,
                               vocab_fingerprint=splits.vocab)
    if not enc.retemperable:  # drawn ids: the seed determines the targets
        spec["sampling_seed"] = cfg.seed
    views = None
    if c.views > 0:  # only then: caches without views keep their ids
        check_images(splits.input_shape, "cache.views")
        views = ViewSpec(c.views, cfg.augment, cfg.seed)
        spec["views"] = views.to_json()
    return Context(cfg, splits, spec, cfg.cache_root / fmt.cache_id(spec), enc, device, precision, views)


def _identity(ref: TeacherRef, num_classes: int) -> dict[str, Any]:
    """A teacher's identity; a Hugging Face model whose output layer is padded past the tokenizer
    also records both sizes (its padded logits are dropped before the softmax)."""
    identity = teacher_identity(ref)
    if ref.spec.arch == "hf":
        width = output_width(ref.checkpoint)
        if width is not None and width != num_classes:
            identity["output_width"] = width
            identity["vocab_size"] = num_classes
    return identity


def cache_dir(cfg: Config) -> Path:
    return context(cfg).dir


def _identity(ref: TeacherRef, num_classes: int) -> dict[str, Any]:
    """A teacher's identity; a Hugging Face model whose output layer is padded past the tokenizer
    also records both sizes (its padded logits are dropped before the softmax)."""
    identity = teacher_identity(ref)
    if ref.spec.arch == "hf":
        width = output_width(ref.checkpoint)
        if width is not None and width != num_classes:
            identity["output_width"] = width
            identity["vocab_size"] = num_classes
    return identity


def cache_dir(cfg: Config) -> Path:
    return context(cfg).dir
