"""Stage 1: fit the demo teacher ensemble (users normally bring trained teachers).

    logitcache teachers configs/demo.yaml
    logitcache teachers configs/demo.yaml teachers.epochs=50

One shard per built-in teacher. A teacher's checkpoint lives under <workspace>/teachers/ in a
directory named by the hash of its spec, training settings and training data, so a changed spec
trains a new teacher and an unchanged one is never trained twice. Teachers given by import path
and checkpoint are only checked here.

Training (a seeded permutation of the training rows, in batches of teachers.batch_size) and the
train-accuracy pass gather each batch's rows from the mapped or lazily read inputs
(`Dataset.rows`), as students do: the training set is never loaded whole.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.core.config import Config, dump_yaml
from pipeline.core.io import atomic_write_bytes, atomic_write_json, atomic_write_text, check_writable
from pipeline.core.progress import log
from pipeline.inputs.arrays import Dataset
from pipeline.inputs.splits import load_splits
from pipeline.models.builders import build_model
from pipeline.models.ensemble import TeacherRef, load_teacher, teacher_refs, training_settings
from pipeline.run.fanout import run_all, task_share


@dataclass(frozen=True)
class Shard:
    index: int  # position in teachers.members


@dataclass(frozen=True)
class ShardResult:
    index: int
    name: str
    train_accuracy: float


def plan(cfg: Config) -> list[Shard]:
    return [Shard(r.index) for r in teacher_refs(cfg, load_splits(cfg)) if r.trained_here]


def pending(cfg: Config) -> list[Shard]:
    refs = teacher_refs(cfg, load_splits(cfg))
    return [s for s in plan(cfg) if not refs[s.index].checkpoint.is_file()]


def _batch(train: Dataset, index: np.ndarray, lm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of the training rows at positions `index` (any order: the batch keeps it)."""
    x, y = train.rows(index)
    if lm:  # next-token prediction: read tokens[:-1], predict tokens[1:]
        seq = torch.from_numpy(x)  # (B, seq_len + 1)
        return seq[:, :-1], seq[:, 1:]
    assert y is not None  # load_splits refuses unlabelled training data
    return torch.from_numpy(x), torch.from_numpy(y)


def run_shard(cfg: Config, shard: Shard) -> ShardResult:
    splits = load_splits(cfg)
    ref = teacher_refs(cfg, splits)[shard.index]
    fit = training_settings(cfg, ref.spec)
    torch.manual_seed(fit["seed"])
    model = build_model(ref.spec, splits.input_shape, splits.num_classes, ref.where)
    opt = torch.optim.Adam(model.parameters(), lr=fit["lr"], weight_decay=fit["weight_decay"])
    train, lm = splits.train, cfg.data.task == "lm"
    gen = torch.Generator().manual_seed(fit["seed"])
    model.train()
    for _ in range(fit["epochs"]):
        for idx in torch.randperm(len(train), generator=gen).split(fit["batch_size"]):
            x, y = _batch(train, idx.numpy(), lm)
            logits = model(x)
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    correct, count = 0.0, 0
    # scored in batches whose (rows, classes) logits stay bounded: for LMs cache.logit_rows tokens
    per_batch = max(1, cfg.cache.logit_rows // cfg.data.seq_len) if lm else 256
    with torch.no_grad():
        for idx in torch.arange(len(train)).split(per_batch):
            x, y = _batch(train, idx.numpy(), lm)
            correct += float((model(x).argmax(-1) == y).float().sum())
            count += y.numel()
    acc = correct / count
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    out = ref.checkpoint.parent
    atomic_write_json(out / "teacher.json", {"name": ref.spec.name, "fit": fit, "train_accuracy": acc,
                                             "train_fingerprint": splits.train.fingerprint})
    atomic_write_bytes(ref.checkpoint, buf.getvalue())  # last: its presence means "trained"
    return ShardResult(shard.index, ref.spec.name, acc)


def main(cfg: Config, client: Any = None, shard_index: int | None = None,
         num_shards: int | None = None) -> list[TeacherRef]:
    check_writable(cfg.teacher_dir, "workspace")  # before any data is read or teacher trained
    splits = load_splits(cfg)
    refs = teacher_refs(cfg, splits)
    for ref in refs:  # user checkpoints are loaded once here so a bad one fails before caching
        if not ref.trained_here:
            load_teacher(ref, splits, torch.device("cpu"))
    todo = [s for s in task_share(plan(cfg), shard_index, num_shards) if s in pending(cfg)]
    if not todo:
        log(f"teachers: all {len(refs)} ready, nothing to do")
    if todo:
        for r in sorted(run_all(client, cfg, run_shard, todo, rows=lambda s: 1, desc="teachers", unit="teachers"),
                        key=lambda r: r.index):
            log(f"teachers: trained {r.name} (train accuracy {r.train_accuracy:.4f})")
    atomic_write_text(cfg.run_dir / "config.yaml", dump_yaml(cfg))
    return refs
