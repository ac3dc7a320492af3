"""Stage 1: fit the demo teacher ensemble (users normally bring trained teachers).

    logitcache teachers configs/demo.yaml
    logitcache teachers configs/demo.yaml teachers.epochs=50

One shard per built-in teacher. A teacher's checkpoint lives under <workspace>/teachers/ in a
directory named by the hash of its spec, training settings and training data, so a changed spec
trains a new teacher and an unchanged one is never trained twice. Teachers given by import path
and checkpoint are only checked here.

Fitting runs the students' loop (pipeline/train/teachers.py): progress lines, a checkpoint every
teachers.checkpoint_every steps beside the teacher's model.pt, so a killed
fit resumes where it was and ends with the same weights. model.pt is written last.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.core.config import Config, dump_yaml
from pipeline.core.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_writable,
    remove_dead_tmp,
)
from pipeline.core.progress import log
from pipeline.inputs.splits import load_splits
from pipeline.models.ensemble import TeacherRef, load_teacher, teacher_refs
from pipeline.run.fanout import run_all, task_share
from pipeline.train.loop import discard
from pipeline.train.teachers import fit_teacher, teacher_job


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


def run_shard(cfg: Config, shard: Shard) -> ShardResult:
    splits = load_splits(cfg)
    ref = teacher_refs(cfg, splits)[shard.index]
    model, report = fit_teacher(cfg, ref, splits)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_json(ref.checkpoint.parent / "teacher.json", report)
    atomic_write_bytes(ref.checkpoint, buf.getvalue())  # last: its presence means "trained"
    discard(teacher_job(cfg, ref))
    return ShardResult(shard.index, ref.spec.name, report["train_accuracy"])


def main(cfg: Config, client: Any = None, shard_index: int | None = None,
         num_shards: int | None = None) -> list[TeacherRef]:
    check_writable(cfg.teacher_dir, "workspace")  # before any data is read or teacher trained
    remove_dead_tmp(cfg.teacher_dir, recursive=True)  # left by killed writers of earlier runs
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
