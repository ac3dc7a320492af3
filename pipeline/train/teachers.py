"""Fitting a built-in teacher (mlp, cnn, gpt) with the students' loop: progress lines, mid-epoch
checkpoints beside its model.pt, and a resume that gives the same weights as an uninterrupted fit.

    model, report = fit_teacher(cfg, ref, splits)

Each epoch is a permutation of the training rows drawn from a generator seeded with the fit seed
(one permutation per epoch, in sequence), in batches of teachers.batch_size, with Adam on the
cross-entropy of the next token (cache.logit_rows logits at a time) or the label. The rows of a batch are gathered from the mapped or
lazily read inputs (`Dataset.rows`): the training set is never loaded whole.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.core.config import Config
from pipeline.core.io import hash_json
from pipeline.inputs.arrays import Dataset, Splits
from pipeline.models.builders import build_model
from pipeline.models.ensemble import TeacherRef, training_settings
from pipeline.train.loop import Job, fit
from pipeline.train.tasks import Task, task_of


class Permutations:
    """Epoch e's batches: the e-th permutation of the rows drawn from one generator seeded with
    `seed`, split into batches of `batch_size`; (inputs, targets) as the task reads them."""

    def __init__(self, data: Dataset, task: Task, batch_size: int, seed: int) -> None:
        self.data, self.task, self.batch_size, self.seed = data, task, batch_size, seed
        self.epoch_rows = len(data)
        self._gen = torch.Generator().manual_seed(seed)
        self._drawn = -1  # the epoch whose permutation is in self._order
        self._order = torch.zeros(0, dtype=torch.int64)
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch < self._drawn:  # back in time: draw again from the start
            self._gen, self._drawn = torch.Generator().manual_seed(self.seed), -1
        while self._drawn < epoch:
            self._order = torch.randperm(len(self.data), generator=self._gen)
            self._drawn += 1

    def seek(self, epoch: int, batch: int) -> None:
        """The next epoch iterated is `epoch`, from its batch `batch` on (a resumed fit)."""
        self.set_epoch(epoch)
        self._skip = batch

    def __iter__(self) -> Any:
        skip, self._skip = self._skip, 0
        for idx in self._order.split(self.batch_size)[skip:]:
            yield self.task.examples(self.data, idx.numpy())


def fit_teacher(cfg: Config, ref: TeacherRef, splits: Splits) -> tuple[nn.Module, dict[str, Any]]:
    """Train `ref` (a teacher built here) from scratch or from its checkpoint; returns the model (in
    eval mode) and what teacher.json records: the fit settings, per-epoch losses, train accuracy."""
    settings = training_settings(cfg, ref.spec)
    task = task_of(cfg)

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(settings["seed"])
        model = build_model(ref.spec, splits.input_shape, splits.num_classes, ref.where)
        return model, torch.optim.Adam(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])

    def step_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return task.fit_loss(model, *batch, cfg.cache.logit_rows)

    job = teacher_job(cfg, ref)
    batches = Permutations(splits.train, task, settings["batch_size"], settings["seed"])
    fitted = fit(job, fresh, batches, step_loss, rows_of=lambda batch: len(batch[0]))
    model = fitted.model.eval()
    report = {"name": ref.spec.name, "fit": settings, "epochs": fitted.history,
              "train_accuracy": train_accuracy(cfg, model, splits.train, task),
              "train_fingerprint": splits.train.fingerprint}
    return model, report


def teacher_job(cfg: Config, ref: TeacherRef) -> Job:
    """The fit's checkpoint and losses live beside its model.pt, keyed by the fit settings."""
    settings = training_settings(cfg, ref.spec)
    return Job(f"teacher {ref.spec.name}", ref.checkpoint.parent, hash_json({"fit": settings, "dir": ref.checkpoint.parent.name}),
               settings["epochs"], cfg.teachers.checkpoint_every, "examples", settings["batch_size"],
               epoch_checkpoints=False)


def train_accuracy(cfg: Config, model: nn.Module, train: Dataset, task: Task) -> float:
    """Accuracy on the training rows (per token for language models), scored in batches whose
    (rows, classes) logits stay bounded: for language models cache.logit_rows tokens at a time."""
    correct, count = 0.0, 0
    with torch.no_grad():
        for idx in torch.arange(len(train)).split(task.score_batch(cfg)):
            x, y = task.examples(train, idx.numpy())
            correct += float((model(x).argmax(-1) == y).float().sum())
            count += y.numel()
    return correct / count
