"""The training loop students and built-in teachers share: steps, progress lines, checkpoints that
resume mid-epoch, the per-step loss log, and the completion record.

    fitted = fit(Job(name, out, key, epochs, checkpoint_every), fresh, batches, step_loss, rows_of)
    commit(out, {"model.pt": ..., "history.json": ...}, {"job": name, "settings_hash": key, ...})

While it trains, `out` holds checkpoint.pt (model, optimizer, RNG states and the position in the
epoch: so a killed run resumes with the same batches and losses) and losses.f64 (the per-step
losses, appended at each checkpoint, so checkpoints stay small). A checkpoint of other settings
(another `key`) or one that cannot be read is reported and training starts over.

`commit` is the completion protocol: done.json is removed before the files it describes are
replaced, and written last with their sha256s, so a run that fails or is killed never leaves a
marker that describes other files. `read_done` checks a marker against those files.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from pipeline.core.errors import LogitcacheError, ModelError
from pipeline.core.io import atomic_write_bytes, atomic_write_json, fsync_dir, read_json, sha256_bytes, sha256_file
from pipeline.core.progress import bar, log


class Batches(Protocol):
    """A resumable epoch of batches: CacheDataset for students, Permutations for teachers."""

    epoch_rows: int  # rows an epoch yields, for progress

    def set_epoch(self, epoch: int) -> None: ...
    def seek(self, epoch: int, batch: int) -> None: ...
    def __iter__(self) -> Any: ...


@dataclass(frozen=True)
class Job:
    name: str  # in log lines: "student mlp-30-kd-s0", "teacher cnn"
    out: Path  # checkpoint.pt and losses.f64 live here while it trains
    key: str  # hash of the settings: a checkpoint of other settings is never resumed
    epochs: int
    checkpoint_every: int  # steps between mid-epoch checkpoints
    unit: str = "rows"  # of the progress lines
    rows_per_batch: int = 1  # rows of a full batch: how far a resumed epoch's progress starts
    # also a checkpoint at each epoch's end (students: it holds the epoch's held-out scores); a big
    # model's checkpoint is tens of MB, so teachers checkpoint every `checkpoint_every` steps only
    epoch_checkpoints: bool = True

    @property
    def checkpoint(self) -> Path:
        return self.out / "checkpoint.pt"

    @property
    def losses_file(self) -> Path:
        return self.out / "losses.f64"


@dataclass
class Fitted:
    model: nn.Module
    losses: list[float]  # every step's loss, from the first step of the first epoch
    history: list[dict[str, Any]] = field(default_factory=list)  # per epoch: train_loss and `evaluate`'s scores


def fit(job: Job, fresh: Callable[[], tuple[nn.Module, torch.optim.Optimizer]], batches: Batches,
        step_loss: Callable[[nn.Module, Any], torch.Tensor], rows_of: Callable[[Any], int],
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None) -> Fitted:
    """Train `job.epochs` epochs of `batches` from a checkpoint in job.out, or from `fresh()` (which
    seeds and builds the model and its optimizer). Each step: zero_grad, step_loss(model, batch)
    backward, optimizer step. After each epoch `evaluate(model)` (in train mode; it switches as it
    needs) adds its scores to the epoch's history. Leaves the checkpoint and losses in job.out for
    the caller to remove once it has committed its results."""
    model, opt = fresh()
    state: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "history": []}
    saved = _resume(job)
    if saved is not None:
        try:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            torch.set_rng_state(saved["rng"])
            if saved.get("cuda_rng") is not None:
                torch.cuda.set_rng_state_all(saved["cuda_rng"])
            state = saved["state"]
            batches.seek(state["epoch"], state["batch"])
            log(f"{job.name}: resuming at epoch {state['epoch']} batch {state['batch']}")
        except Exception as e:  # a state_dict of another shape raises RuntimeError, KeyError, ValueError, ...
            log(f"{job.name}: {job.checkpoint} does not fit this model ({type(e).__name__}); starting this job over")
            model, opt = fresh()
            state = {"epoch": 0, "batch": 0, "step": 0, "history": []}
    job.out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    pending: list[float] = []  # losses of the steps since the last checkpoint

    def flush_losses() -> None:
        """Write the pending losses at their offset in losses.f64 (anything past them is from a
        killed run that got further than its last checkpoint, and is cut off)."""
        with open(job.losses_file, "r+b" if job.losses_file.exists() else "wb") as f:
            f.seek(8 * (state["step"] - len(pending)))
            f.write(np.asarray(pending, dtype=np.float64).tobytes())
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
        pending.clear()

    def save_checkpoint() -> None:
        flush_losses()  # first: the checkpoint's step never points past the losses on disk
        buf = io.BytesIO()
        cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
                    "cuda_rng": cuda_rng, "state": state, "settings_hash": job.key}, buf)
        atomic_write_bytes(job.checkpoint, buf.getvalue())

    def epoch_losses() -> np.ndarray:
        first = state["step"] - state["batch"]  # the epoch's first step
        flushed = state["step"] - len(pending)
        on_disk = np.fromfile(job.losses_file, np.float64, count=flushed - first, offset=8 * first) \
            if flushed > first else np.zeros(0)
        return np.concatenate([on_disk, np.asarray(pending[max(0, first - flushed):], np.float64)])

    model.train()
    while state["epoch"] < job.epochs:
        batches.set_epoch(state["epoch"])
        # a line every LOGITCACHE_PROGRESS_INTERVAL seconds in a batch job's log (a bar on a terminal)
        progress = bar(batches.epoch_rows, f"{job.name} epoch {state['epoch'] + 1}/{job.epochs}", job.unit)
        if state["batch"]:  # resumed mid-epoch: the epoch's first batches are not in the rate
            progress.update(min(state["batch"] * job.rows_per_batch, batches.epoch_rows))
        for batch in batches:
            loss = step_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            pending.append(float(loss.detach()))
            progress.update(rows_of(batch))
            state["batch"] += 1
            state["step"] += 1
            if state["step"] % job.checkpoint_every == 0:
                save_checkpoint()
        progress.close()
        this_epoch = epoch_losses()
        record = {"epoch": state["epoch"] + 1,
                  "train_loss": float(np.mean(this_epoch)) if len(this_epoch) else float("nan")}
        if evaluate is not None:
            record.update(evaluate(model))
        state["history"].append(record)
        state["epoch"] += 1
        state["batch"] = 0
        if job.epoch_checkpoints:
            save_checkpoint()
    flush_losses()
    losses = np.fromfile(job.losses_file, np.float64, count=state["step"]).tolist()
    return Fitted(model, losses, state["history"])


def _resume(job: Job) -> dict[str, Any] | None:
    """The saved checkpoint if it belongs to these settings and is whole; an unreadable one (a
    damaged disk, random bytes) is reported and training starts over, as for a missing one."""
    if not job.checkpoint.is_file():
        return None
    try:
        saved = torch.load(job.checkpoint, map_location="cpu", weights_only=False)
        state = saved["state"] if isinstance(saved, dict) else None
        if not (isinstance(state, dict) and {"model", "optimizer", "rng", "settings_hash"} <= saved.keys()
                and {"epoch", "batch", "step", "history"} <= state.keys() and "losses" not in state):
            raise ValueError("not a checkpoint of this version")
        if job.losses_file.stat().st_size < 8 * state["step"]:
            raise ValueError(f"{job.losses_file.name} holds fewer losses than the checkpoint's step")
    except Exception as e:  # whatever torch.load raises on a damaged file
        first = str(e).splitlines()[0] if str(e) else ""
        log(f"{job.name}: {job.checkpoint} cannot be resumed ({type(e).__name__}: {first}); starting this job over")
        return None
    return saved if saved["settings_hash"] == job.key else None


def discard(job: Job) -> None:
    """Remove the checkpoint and losses once the results they led to are committed."""
    job.checkpoint.unlink(missing_ok=True)
    job.losses_file.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# The completion record


def commit(out: Path, files: dict[str, bytes], record: dict[str, Any], also: dict[str, bytes] | None = None) -> None:
    """Write `files` (and `also`, which done.json does not vouch for) into `out`, then done.json:
    `record` plus the files' sha256s. The old done.json goes first, so it never describes files
    that were replaced after it."""
    done = out / "done.json"
    done.unlink(missing_ok=True)
    fsync_dir(out)
    for name, data in {**files, **(also or {})}.items():
        atomic_write_bytes(out / name, data)
    atomic_write_json(done, {**record, "files": {name: sha256_bytes(data) for name, data in files.items()}})


def read_done(out: Path, checked: Iterable[str] = ("model.pt", "history.json")) -> dict[str, Any] | None:
    """A finished job's done.json, None if the job has not finished. It holds the sha256 of the files
    it was written with, so a marker never vouches for files another run overwrote. ModelError
    (one line) if damaged."""
    path = out / "done.json"
    if not path.is_file():
        return None
    fix = "rerun `logitcache student CONFIG` to retrain it"
    done = read_json(path, ModelError, fix)
    if not (isinstance(done, dict) and isinstance(done.get("settings_hash"), str)
            and isinstance(done.get("final"), dict) and isinstance(done["final"].get("accuracy"), float)
            and isinstance(done.get("files"), dict)):
        raise ModelError(f"{path}: not a completion record of this version (no settings_hash, final or files); {fix}")
    for name in checked:
        file = out / name
        if not file.is_file() or sha256_file(file) != done["files"].get(name):
            raise ModelError(f"{file}: {'missing' if not file.is_file() else 'differs from the one done.json records'}"
                             f" (overwritten by a run that did not finish); {fix}")
    return done


def finished(out: Path, key: str, name: str) -> dict[str, Any] | None:
    """done.json if it records these settings and the files beside it; a damaged one means retrain."""
    try:
        done = read_done(out)
    except LogitcacheError as e:
        log(f"{name}: {e}; retraining")
        return None
    return done if done is not None and done["settings_hash"] == key else None
