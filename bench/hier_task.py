"""A generated classification task with many classes and similarity structure, for bench/kd_gain.py.

Classes are leaves of a two-level hierarchy: `superclasses` groups of `subclasses` each (class id =
group * subclasses + member). A latent point is its group's centre plus its class's offset plus
noise; the centres are far apart and the offsets close, so most confusions stay inside a group
and a teacher's soft targets carry which classes resemble which (the "dark knowledge" that top-k
may cut). Inputs are a fixed random nonlinear map of the latent point, so no linear model is
enough.

Two files: `train.npz` (x, y: `train_per_class` rows per class, on which the teachers are fitted;
x_test, y_test: held out) and `transfer.npz` (x, y: `transfer_per_class` other rows per class, the
student's small transfer set; y feeds only the hard-label twin and the alpha-weighted CE).

    from hier_task import HierTask, write
    train, transfer = write(HierTask(), workdir)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class HierTask:
    superclasses: int = 16
    subclasses: int = 8  # per superclass
    latent_dim: int = 24
    input_dim: int = 48
    centre_scale: float = 3.0  # spread of the superclass centres
    offset_scale: float = 1.0  # spread of a class's offset from its centre
    noise: float = 0.6  # per-coordinate noise of a row around its class mean
    train_per_class: int = 100  # teachers' labelled data
    transfer_per_class: int = 15  # the student's transfer set
    test_per_class: int = 20  # held out, scored by evaluate
    seed: int = 0

    @property
    def num_classes(self) -> int:
        return self.superclasses * self.subclasses


def generate(task: HierTask) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train", "transfer", "test"}: (x (N, input_dim) float32, y (N,) int64), each class-balanced."""
    rng = np.random.default_rng(task.seed)
    d = task.latent_dim
    centres = rng.normal(0, task.centre_scale, (task.superclasses, 1, d))
    offsets = rng.normal(0, task.offset_scale, (task.superclasses, task.subclasses, d))
    means = (centres + offsets).reshape(task.num_classes, d)  # (C, latent_dim)
    # fixed random two-layer map: latent -> input_dim, tanh in between
    w1 = rng.normal(0, 1 / np.sqrt(d), (d, 2 * task.input_dim))
    w2 = rng.normal(0, 1 / np.sqrt(2 * task.input_dim), (2 * task.input_dim, task.input_dim))

    def draw(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(task.num_classes), per_class)
        z = means[y] + rng.normal(0, task.noise, (len(y), d))  # (N, latent_dim)
        x = np.tanh(z @ w1) @ w2 + 0.1 * z @ w1[:, :task.input_dim]  # (N, input_dim)
        perm = rng.permutation(len(y))
        return x[perm], y[perm].astype(np.int64)

    splits = {"train": draw(task.train_per_class), "transfer": draw(task.transfer_per_class),
              "test": draw(task.test_per_class)}
    mu, sd = splits["train"][0].mean(0), splits["train"][0].std(0)  # one standardization for all splits
    return {k: (((x - mu) / sd).astype(np.float32), y) for k, (x, y) in splits.items()}


def write(task: HierTask, directory: Path) -> tuple[Path, Path]:
    """Write train.npz (with x_test/y_test) and transfer.npz under `directory`; returns both paths."""
    data = generate(task)
    directory.mkdir(parents=True, exist_ok=True)
    train, transfer = directory / "train.npz", directory / "transfer.npz"
    (x, y), (xt, yt) = data["train"], data["test"]
    np.savez(train, x=x, y=y, x_test=xt, y_test=yt)
    np.savez(transfer, x=data["transfer"][0], y=data["transfer"][1])
    return train, transfer


def describe(task: HierTask) -> dict[str, int | float]:
    return {"classes": task.num_classes, **dataclasses.asdict(task)}
