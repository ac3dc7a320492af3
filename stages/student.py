"""Stage 3: train students from the cache (the teachers are never run again).

    logitcache student configs/demo.yaml
    logitcache student configs/demo.yaml student.temperature=2 student.alpha=0.5
    logitcache student configs/demo.yaml student.cache=3f9a2c     # any cache id or directory

With a views cache (cache.views > 0) every epoch trains on one view per sample, a seeded choice
per block of samples that cycles through all N views every N epochs, and reads only the chunks of
the chosen views (1/N of the cache); the view's pixels are rebuilt from the parameters stored in
the cache (the function the cache stage rendered them with) and its targets are that view's. With
a cache of plain images and an `augment:` section, views are drawn online per
(seed, sample, epoch) and the targets are the plain image's.

One shard per (model, seed, kind): kind "kd" learns from the cached soft targets mixed with hard
labels by alpha; kind "hard" (student.baseline) is the same model on hard labels only, fed the same
batches in the same order, for comparison. Each job writes <run>/students/<job>/: checkpoint.pt
while training (model, optimizer, RNG and loader position, so a killed job resumes mid-epoch with
the same batches and losses) and losses.f64 (the per-step losses, appended at each checkpoint, so
checkpoints stay small); then model.pt, history.json, config.yaml and done.json. done.json is
removed before the others are replaced and written last with their sha256s: a run that fails or is
killed never leaves a marker that describes other files.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.config import Config, dump_yaml
from pipeline.core.errors import CacheError, ConfigError, LogitcacheError
from pipeline.core.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_writable,
    fsync_dir,
    hash_json,
    sha256_bytes,
)
from pipeline.core.progress import bar, log
from pipeline.format import reader as fmt
from pipeline.inputs.arrays import Splits
from pipeline.inputs.augment import check_images
from pipeline.inputs.splits import load_splits
from pipeline.models.builders import build_model, resolve_device
from pipeline.models.lm import hidden_and_head
from pipeline.run.fanout import run_all, task_share
from pipeline.run.jobs import Shard, cache_path, job_name, models, plan, read_done, settings
from pipeline.train import metrics
from pipeline.train.dataset import Cache, CacheDataset
from pipeline.train.losses import chunked_kd_loss, kd_loss
from pipeline.train.plan import augmentation


@dataclass(frozen=True)
class ShardResult:
    job: str
    skipped: bool
    final_accuracy: float


def open_cache(cfg: Config, splits: Splits) -> fmt.CacheReader:
    path = cache_path(cfg)
    reader = fmt.CacheReader(path)
    if reader.dataset_fingerprint != splits.transfer.fingerprint:
        raise CacheError(f"{path}: cache was made for dataset {reader.dataset_fingerprint}, but this "
                         f"config's transfer set is {splits.transfer.fingerprint}; point student.cache "
                         "at a cache of this data or run `logitcache cache CONFIG`")
    theirs = reader.manifest["spec"]["dataset"].get("vocab_fingerprint")
    if splits.vocab and theirs != splits.vocab:
        raise CacheError(f"{path}: cache was made with tokenizer vocab {theirs}, this config's is {splits.vocab}; "
                         "use the tokenizer the cache was made with (data.tokenizer)")
    if reader.num_classes != splits.num_classes:
        raise CacheError(f"{path}: cache has {reader.num_classes} classes, the data has "
                         f"{splits.num_classes}; rebuild the cache for this data")
    return reader


def _optimizer(cfg: Config, params: Any, lr: float) -> torch.optim.Optimizer:
    s = cfg.student
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=s.momentum, weight_decay=s.weight_decay)
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=s.weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=s.weight_decay)


def dataset(cfg: Config, shard: Shard, st: dict[str, Any], splits: Splits) -> CacheDataset:
    """The job's batches: the public API's dataset over the config's cache (one process, world
    size 1), joined to the transfer set's inputs (and labels) by sample id. A views cache's views
    are replayed from their stored parameters; with an `augment:` section and a cache of plain
    images, a view of each image is drawn per (seed, sample, epoch)."""
    cache = Cache(cache_path(cfg))
    cached, online = augmentation(cfg, cache.manifest["spec"])
    if online is not None:
        check_images(splits.input_shape, "augment")
    lm = cfg.data.task == "lm"
    labels = splits.transfer if not lm and splits.transfer.y is not None else None
    return cache.dataset(st["batch_size"], seed=shard.seed, shuffle_chunks=st["shuffle_chunks"],
                         inputs=splits.transfer, labels=labels, augment=online, temperature=st["temperature"],
                         rank=0, world_size=1)


def batch_loss(model: torch.nn.Module, batch: dict[str, Any], st: dict[str, Any], lm: bool,
               dev: torch.device) -> torch.Tensor:
    """One batch's loss through the public loss: alpha * CE + (1 - alpha) * T^2 D(teacher || student).
    A token batch's (rows, vocab) logits are computed in chunks from the hidden states."""
    kw = {"temperature": st["temperature"], "alpha": st["alpha"], "divergence": st["divergence"],
          "tail": st["tail"]}
    x = batch["inputs"].to(dev, non_blocking=True)
    if not lm:
        labels = batch.get("labels")
        return kd_loss(model(x), batch, labels=labels.to(dev) if labels is not None else None, **kw)
    # x (B, L + 1): each sequence's tokens and the next one; the batch's rows are (sequence, position)
    seq, pos = batch["sequence"].to(dev), batch["position"].to(dev)
    hidden, head = hidden_and_head(model, x[:, :-1])  # (B, L, d)
    return chunked_kd_loss(hidden[seq, pos], head, batch, labels=x[:, 1:][seq, pos], logit_chunk=st["logit_chunk"],
                           **kw)


def held_out(model: torch.nn.Module, splits: Splits, lm: bool) -> dict[str, float]:
    """Held-out accuracy and NLL per example (per next token for language models)."""
    x, y = (splits.test.x[:, :-1], splits.test.x[:, 1:]) if lm else (splits.test.x, splits.test.y)
    model.eval()
    (sm,) = metrics.summaries([model], x, y, 16 if lm else 512)
    model.train()
    return {"accuracy": float((sm.pred == y.reshape(-1)).mean()), "nll": float(-sm.logp_true.mean())}


def _finished(out: Path, key: str) -> dict[str, Any] | None:
    """done.json if it records these settings and the files beside it; a damaged one means retrain."""
    try:
        done = read_done(out)
    except LogitcacheError as e:
        log(f"student {out.name}: {e}; retraining")
        return None
    return done if done is not None and done["settings_hash"] == key else None


def _resume(ckpt: Path, losses_file: Path, key: str, name: str) -> dict[str, Any] | None:
    """The saved checkpoint if it belongs to these settings and is whole; an unreadable one (a
    damaged disk, random bytes) is reported and training starts over, as for a missing one."""
    if not ckpt.is_file():
        return None
    try:
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        state = saved["state"] if isinstance(saved, dict) else None
        if not (isinstance(state, dict) and {"model", "optimizer", "rng", "settings_hash"} <= saved.keys()
                and {"epoch", "batch", "step", "history"} <= state.keys() and "losses" not in state):
            raise ValueError("not a checkpoint of this version")
        if losses_file.stat().st_size < 8 * state["step"]:
            raise ValueError(f"{losses_file.name} holds fewer losses than the checkpoint's step")
    except Exception as e:  # whatever torch.load raises on a damaged file
        log(f"student {name}: {ckpt} cannot be resumed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "starting this job over")
        return None
    return saved if saved["settings_hash"] == key else None


def run_shard(cfg: Config, shard: Shard) -> ShardResult:
    splits = load_splits(cfg)
    reader = open_cache(cfg, splits)
    name = job_name(cfg, shard)
    out = cfg.run_dir / "students" / name
    st = settings(cfg, shard, reader)
    key = hash_json(st)
    done = out / "done.json"
    finished = _finished(out, key)
    if finished is not None:
        return ShardResult(name, True, finished["final"]["accuracy"])
    lm = cfg.data.task == "lm"
    if not reader.encoding.retemperable and st["temperature"] != reader.temperature and st["alpha"] < 1:
        raise ConfigError(f"student.temperature: {st['temperature']} differs from the cache's {reader.temperature}; "
                          f"{reader.encoding.label()} targets are draws and cannot be re-tempered, train at the "
                          "cache's temperature")
    if st["alpha"] > 0 and splits.transfer.y is None and not lm:
        raise ConfigError(f"student.alpha: {st['alpha']} needs labels, but the transfer set "
                          f"{splits.transfer.source} has none; set student.alpha=0 and student.baseline=false")

    spec = models(cfg)[shard.model]
    dev = resolve_device(cfg.student.device, "student.device")

    def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(shard.seed)
        m = build_model(spec, splits.input_shape, reader.num_classes, f"student.models.{shard.model}").to(dev)
        return m, _optimizer(cfg, m.parameters(), st["lr"])

    model, opt = fresh()
    ds = dataset(cfg, shard, st, splits)
    state: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "history": []}
    ckpt, losses_file = out / "checkpoint.pt", out / "losses.f64"
    saved = _resume(ckpt, losses_file, key, name)
    if saved is not None:
        try:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            torch.set_rng_state(saved["rng"])
            if saved.get("cuda_rng") is not None:
                torch.cuda.set_rng_state_all(saved["cuda_rng"])
            state = saved["state"]
            ds.seek(state["epoch"], state["batch"])
            log(f"student {name}: resuming at epoch {state['epoch']} batch {state['batch']}")
        except Exception as e:
            log(f"student {name}: {ckpt} does not fit this model ({type(e).__name__}); starting this job over")
            model, opt = fresh()
    out.mkdir(parents=True, exist_ok=True)
    pending: list[float] = []  # losses of the steps since the last checkpoint

    def flush_losses() -> None:
        """Write the pending losses at their offset in losses.f64 (anything past them is from a
        killed run that got further than its last checkpoint, and is cut off)."""
        with open(losses_file, "r+b" if losses_file.exists() else "wb") as f:
            f.seek(8 * (state["step"] - len(pending)))
            f.write(np.asarray(pending, dtype=np.float64).tobytes())
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
        pending.clear()

    def save_checkpoint() -> None:
        flush_losses()  # first: the checkpoint's step never points past the losses on disk
        buf = io.BytesIO()
        cuda_rng = torch.cuda.get_rng_state_all() if dev.type == "cuda" else None
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
                    "cuda_rng": cuda_rng, "state": state, "settings_hash": key}, buf)
        atomic_write_bytes(ckpt, buf.getvalue())

    def epoch_losses() -> np.ndarray:
        first = state["step"] - state["batch"]  # the epoch's first step
        flushed = state["step"] - len(pending)
        on_disk = np.fromfile(losses_file, np.float64, count=flushed - first, offset=8 * first) \
            if flushed > first else np.zeros(0)
        return np.concatenate([on_disk, np.asarray(pending, np.float64)])

    model.train()
    unit = "tokens" if lm else "rows"
    while state["epoch"] < st["epochs"]:
        ds.set_epoch(state["epoch"])
        # a line every LOGITCACHE_PROGRESS_INTERVAL seconds in a batch job's log (a bar on a terminal)
        progress = bar(ds.epoch_rows, f"student {name} epoch {state['epoch'] + 1}/{st['epochs']}", unit)
        done_rows = 0
        for batch in ds:
            if done_rows == 0 and state["batch"]:  # resumed: the epoch's first batches are not in the rate
                progress.update(min(state["batch"] * st["batch_size"] * (cfg.data.seq_len if lm else 1),
                                    ds.epoch_rows))
            loss = batch_loss(model, batch, st, lm, dev)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            pending.append(float(loss.detach()))
            done_rows += len(batch["sample_id"])
            progress.update(len(batch["sample_id"]))
            state["batch"] += 1
            state["step"] += 1
            if state["step"] % cfg.student.checkpoint_every == 0:
                save_checkpoint()
        progress.close()
        scores = held_out(model, splits, lm)
        this_epoch = epoch_losses()
        state["history"].append({"epoch": state["epoch"] + 1,
                                 "train_loss": float(np.mean(this_epoch)) if len(this_epoch) else float("nan"),
                                 "test_accuracy": scores["accuracy"], "test_nll": scores["nll"]})
        state["epoch"] += 1
        state["batch"] = 0
        save_checkpoint()

    flush_losses()
    all_losses = np.fromfile(losses_file, np.float64, count=state["step"]).tolist()
    buf = io.BytesIO()
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buf)
    model_bytes = buf.getvalue()
    history = json.dumps({"job": name, "settings": st, "losses": all_losses, "epochs": state["history"]},
                         indent=2, sort_keys=True) + "\n"
    final = state["history"][-1]
    done.unlink(missing_ok=True)  # first: an old marker must never describe the files written next
    fsync_dir(out)
    atomic_write_bytes(out / "model.pt", model_bytes)
    atomic_write_text(out / "history.json", history)
    atomic_write_text(out / "config.yaml", dump_yaml(cfg))
    atomic_write_json(done, {"job": name, "settings_hash": key,
                             "final": {"accuracy": final["test_accuracy"], "nll": final["test_nll"]},
                             "files": {"model.pt": sha256_bytes(model_bytes),
                                       "history.json": sha256_bytes(history.encode())}})
    ckpt.unlink(missing_ok=True)
    losses_file.unlink(missing_ok=True)
    return ShardResult(name, False, final["test_accuracy"])


def main(cfg: Config, client: Any = None, shard_index: int | None = None,
         num_shards: int | None = None) -> list[ShardResult]:
    check_writable(cfg.run_dir, "workspace")  # before anything is trained
    splits = load_splits(cfg)
    reader = open_cache(cfg, splits)
    jobs = task_share(plan(cfg), shard_index, num_shards)
    log(f"student: {len(jobs)} jobs from cache {reader.dir.name} ({reader.rows} rows, "
        f"{reader.encoding.name}, T={reader.temperature})")
    order = {job_name(cfg, s): i for i, s in enumerate(jobs)}
    results = sorted(run_all(client, cfg, run_shard, jobs, rows=lambda s: 1, desc="students", unit="jobs"),
                     key=lambda r: order[r.job])
    for r in results:
        verb = "up to date" if r.skipped else "trained"
        log(f"student {r.job}: {verb}, test accuracy {r.final_accuracy:.4f}")
    atomic_write_text(cfg.run_dir / "config.yaml", dump_yaml(cfg))
    return results
