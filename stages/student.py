"""Stage 3: train students from the cache (the teachers are never run again).

    logitcache student configs/demo.yaml
    logitcache student configs/demo.yaml student.temperature=2 student.alpha=0.5
    logitcache student configs/demo.yaml student.cache=3f9a2c     # any cache id or directory

One shard per (model, seed, kind): kind "kd" learns from the cached soft targets mixed with hard
labels by alpha; kind "hard" (student.baseline) is the same model on hard labels only, fed the same
batches in the same order, for comparison. Each job writes <run>/students/<job>/: checkpoint.pt
while training (model, optimizer, RNG and loader position, so a killed job resumes mid-epoch with
the same batches and losses), then model.pt, history.json and done.json (written last).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline import cache as fmt
from pipeline import losses, metrics
from pipeline.config import Config, dump_yaml, non_default
from pipeline.data import Splits, load_splits
from pipeline.errors import CacheError, ConfigError
from pipeline.fanout import run_all, task_share
from pipeline.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    hash_json,
)
from pipeline.jobs import Shard, cache_path, job_name, models, plan
from pipeline.lm import hidden_and_head
from pipeline.loader import ChunkShuffleLoader
from pipeline.models import build_model, resolve_device
from pipeline.progress import log


@dataclass(frozen=True)
class ShardResult:
    job: str
    skipped: bool
    final_accuracy: float


def settings(cfg: Config, shard: Shard, reader: fmt.CacheReader) -> dict[str, Any]:
    """Everything that determines a job's result; its hash decides whether a rerun is needed."""
    s, m = cfg.student, models(cfg)[shard.model]
    temperature = m.temperature or s.temperature or reader.temperature
    return {
        "model": non_default(m), "seed": shard.seed, "kind": shard.kind, "cache_id": reader.dir.name,
        "epochs": m.epochs or s.epochs, "lr": m.lr or s.lr, "batch_size": s.batch_size,
        "optimizer": s.optimizer, "momentum": s.momentum, "weight_decay": s.weight_decay,
        "temperature": temperature, "alpha": 1.0 if shard.kind == "hard" else (m.alpha if m.alpha is not None else s.alpha),
        "tail": s.tail, "divergence": s.divergence, "shuffle_chunks": s.shuffle_chunks,
        **({"logit_chunk": s.logit_chunk} if cfg.data.task == "lm" else {}),
    }


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


def batch_targets(batch: dict[str, np.ndarray], st: dict[str, Any], reader: fmt.CacheReader,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's cached targets as tensors at the student's temperature."""
    return reader.encoding.targets(batch, device, st["temperature"] / reader.temperature)


def batch_loss(logits: torch.Tensor, batch: dict[str, np.ndarray], labels: torch.Tensor | None,
               st: dict[str, Any], reader: fmt.CacheReader) -> torch.Tensor:
    """Loss of one batch: alpha * CE + (1 - alpha) * T^2 D(teacher || student), targets at T."""
    alpha = st["alpha"]
    if alpha == 1.0:
        assert labels is not None
        return losses.hard_ce(logits, labels)
    targets = batch_targets(batch, st, reader, logits.device)
    return losses.row_losses(logits, targets, labels, st, reader.encoding) / len(logits)


def lm_batch_loss(model: torch.nn.Module, batch: dict[str, np.ndarray], tokens: np.ndarray, st: dict[str, Any],
                  reader: fmt.CacheReader, seq_len: int) -> torch.Tensor:
    """Loss of a batch of whole sequences; the (rows, vocab) logits are computed in chunks."""
    rows = len(batch["sample_id"])
    seq_ids = batch["sample_id"].reshape(-1, seq_len)
    if (seq_ids != seq_ids[:, :1]).any() or (batch["position"].reshape(-1, seq_len) != np.arange(seq_len)).any():
        raise CacheError(f"{reader.dir}: token rows are not whole sequences in order; the cache is corrupt, rebuild it")
    dev = next(model.parameters()).device
    seq = torch.from_numpy(tokens).to(dev)  # (B, seq_len + 1)
    labels = seq[:, 1:].reshape(-1)  # (B * L,)
    hidden, head = hidden_and_head(model, seq[:, :-1])  # (B, L, d)
    targets = batch_targets(batch, st, reader, dev) if st["alpha"] < 1 else {}
    return losses.chunked_loss(hidden.reshape(rows, -1), head, targets, labels, st, reader.encoding,
                               st["logit_chunk"])


def held_out(model: torch.nn.Module, splits: Splits, lm: bool) -> dict[str, float]:
    """Held-out accuracy and NLL per example (per next token for language models)."""
    x, y = (splits.test.x[:, :-1], splits.test.x[:, 1:]) if lm else (splits.test.x, splits.test.y)
    model.eval()
    (sm,) = metrics.summaries([model], x, y, 16 if lm else 512)
    model.train()
    return {"accuracy": float((sm.pred == y.reshape(-1)).mean()), "nll": float(-sm.logp_true.mean())}


def run_shard(cfg: Config, shard: Shard) -> ShardResult:
    splits = load_splits(cfg)
    reader = open_cache(cfg, splits)
    name = job_name(cfg, shard)
    out = cfg.run_dir / "students" / name
    st = settings(cfg, shard, reader)
    key = hash_json(st)
    done = out / "done.json"
    if done.is_file() and json.loads(done.read_text()).get("settings_hash") == key:
        return ShardResult(name, True, json.loads(done.read_text())["final"]["accuracy"])
    lm = cfg.data.task == "lm"
    if not reader.encoding.retemperable and st["temperature"] != reader.temperature and st["alpha"] < 1:
        raise ConfigError(f"student.temperature: {st['temperature']} differs from the cache's {reader.temperature}; "
                          f"{reader.encoding.label()} targets are draws and cannot be re-tempered, train at the "
                          "cache's temperature")
    if st["alpha"] > 0 and splits.transfer.y is None and not lm:
        raise ConfigError(f"student.alpha: {st['alpha']} needs labels, but the transfer set "
                          f"{splits.transfer.source} has none; set student.alpha=0 and student.baseline=false")

    spec = models(cfg)[shard.model]
    torch.manual_seed(shard.seed)
    dev = resolve_device(cfg.student.device, "student.device")
    model = build_model(spec, splits.input_shape, reader.num_classes, f"student.models.{shard.model}").to(dev)
    opt = _optimizer(cfg, model.parameters(), st["lr"])
    per_item = cfg.data.seq_len if lm else 1
    loader = ChunkShuffleLoader(reader, st["batch_size"], shard.seed, st["shuffle_chunks"], per_item)
    transfer = splits.transfer
    state: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "losses": [], "history": []}
    ckpt = out / "checkpoint.pt"
    if ckpt.is_file():
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        if saved.get("settings_hash") == key:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            torch.set_rng_state(saved["rng"])
            if saved.get("cuda_rng") is not None:
                torch.cuda.set_rng_state_all(saved["cuda_rng"])
            state = saved["state"]
            log(f"student {name}: resuming at epoch {state['epoch']} batch {state['batch']}")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_yaml(cfg))

    def save_checkpoint() -> None:
        buf = io.BytesIO()
        cuda_rng = torch.cuda.get_rng_state_all() if dev.type == "cuda" else None
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
                    "cuda_rng": cuda_rng, "state": state, "settings_hash": key}, buf)
        atomic_write_bytes(ckpt, buf.getvalue())

    model.train()
    while state["epoch"] < st["epochs"]:
        for batch in loader.batches(state["epoch"], start=state["batch"]):
            pos = transfer.positions(batch["sample_id"][::per_item])
            xb, yb = transfer.rows(pos)  # gathered from the (possibly mapped) inputs by sample id
            if lm:
                loss = lm_batch_loss(model, batch, xb, st, reader, per_item)
            else:
                x = torch.from_numpy(xb).to(dev)
                labels = torch.from_numpy(yb).to(dev) if yb is not None else None
                loss = batch_loss(model(x), batch, labels, st, reader)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            state["losses"].append(float(loss.detach()))
            state["batch"] += 1
            state["step"] += 1
            if state["step"] % cfg.student.checkpoint_every == 0:
                save_checkpoint()
        scores = held_out(model, splits, lm)
        epoch_losses = state["losses"][-state["batch"]:] if state["batch"] else []
        state["history"].append({"epoch": state["epoch"] + 1, "train_loss": float(np.mean(epoch_losses)),
                                 "test_accuracy": scores["accuracy"], "test_nll": scores["nll"]})
        state["epoch"] += 1
        state["batch"] = 0
        save_checkpoint()

    buf = io.BytesIO()
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buf)
    atomic_write_bytes(out / "model.pt", buf.getvalue())
    final = state["history"][-1]
    atomic_write_json(out / "history.json", {"job": name, "settings": st, "losses": state["losses"],
                                             "epochs": state["history"]})
    atomic_write_json(done, {"job": name, "settings_hash": key, "final": {"accuracy": final["test_accuracy"],
                                                                           "nll": final["test_nll"]}})
    ckpt.unlink(missing_ok=True)
    return ShardResult(name, False, final["test_accuracy"])


def main(cfg: Config, client: Any = None, shard_index: int | None = None,
         num_shards: int | None = None) -> list[ShardResult]:
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
