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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.core.config import Config, dump_yaml
from pipeline.core.errors import CacheError, ConfigError
from pipeline.core.io import atomic_write_text, check_writable, hash_json, remove_dead_tmp
from pipeline.core.progress import log
from pipeline.format import reader as fmt
from pipeline.format.remote import open_reader
from pipeline.inputs.arrays import Splits
from pipeline.inputs.augment import check_images
from pipeline.inputs.splits import load_splits
from pipeline.models.builders import build_model, resolve_device
from pipeline.run.fanout import run_all, task_share
from pipeline.run.jobs import Shard, cache_path, job_name, models, plan, settings
from pipeline.train import metrics
from pipeline.train.dataset import Cache, CacheDataset
from pipeline.train.dataset import open_cache as open_api_cache
from pipeline.train.loop import Job, commit, discard, finished, fit
from pipeline.train.mixture import Mixture, mixture
from pipeline.train.plan import augmentation
from pipeline.train.tasks import Task, held_out_chars, student_splits, task_of


@dataclass(frozen=True)
class ShardResult:
    job: str
    skipped: bool
    final_accuracy: float


def open_cache(cfg: Config, splits: Splits) -> fmt.CacheReader:
    path = cache_path(cfg)
    reader = open_reader(path)
    mine = task_of(cfg).transfer_fingerprint(splits)
    if reader.dataset_fingerprint != mine:
        raise CacheError(f"{path}: cache was made for dataset {reader.dataset_fingerprint}, but this "
                         f"config's transfer set is {mine}; point student.cache "
                         "at a cache of this data or run `logitcache cache CONFIG`")
    theirs = reader.manifest["spec"]["dataset"].get("vocab_fingerprint")
    if splits.vocab and theirs != splits.vocab and cfg.student.tokenizer is None:
        raise CacheError(f"{path}: cache was made with tokenizer vocab {theirs}, this config's is {splits.vocab}; "
                         "use the tokenizer the cache was made with (data.tokenizer), or give the student's own as "
                         "student.tokenizer")
    if reader.num_classes != splits.num_classes and cfg.student.tokenizer is None:
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


def dataset(cfg: Config, shard: Shard, st: dict[str, Any], splits: Splits) -> CacheDataset | Mixture:
    """The job's batches: the public API's dataset over the config's cache (one process, world
    size 1), joined to the transfer set's inputs (and labels) by sample id. A views cache's views
    are replayed from their stored parameters; with an `augment:` section and a cache of plain
    images, a view of each image is drawn per (seed, sample, epoch). `splits` are what the student
    reads: with student.tokenizer, the documents in its own tokens (student_splits)."""
    cache = Cache(cache_path(cfg))
    online = augmentation(cfg, cache.manifest["spec"])[1]
    if online is not None:
        check_images(splits.input_shape, "augment")
    data = task_of(cfg).student_data(cfg, splits)

    def of(c: Cache, **where: Any) -> CacheDataset:
        return c.dataset(st["batch_size"], seed=shard.seed, shuffle_chunks=st["shuffle_chunks"], augment=online,
                         temperature=st["temperature"], rank=0, world_size=1, **{**data, **where})

    if not cfg.student.mixture:
        return of(cache, **st.get("read", {}))  # a cache of per-member targets: the members, weights, combination
    parts = []
    for i, m in enumerate(cfg.student.mixture):
        if m.cache == "self":
            parts.append(of(cache))
            continue
        other = open_api_cache(m.cache, root=cfg.cache_root)
        tokens = m.tokens or Path(cfg.workspace) / "tokens" / other.manifest["spec"]["dataset"].get("tokens", "?")
        if other.num_classes != cache.num_classes:
            raise ConfigError(f"student.mixture.{i}.cache: {other.path} has {other.num_classes} classes, this "
                              f"config's cache {cache.num_classes}; mix caches of one vocabulary")
        parts.append(of(other, tokens=tokens))
    return mixture(parts, [m.weight for m in cfg.student.mixture], seed=shard.seed)


def held_out(model: torch.nn.Module, splits: Splits, task: Task) -> dict[str, float]:
    """Held-out accuracy and NLL per example (per next token for language models)."""
    x, y = task.held_out(splits)
    model.eval()
    (sm,) = metrics.summaries([model], x, y, task.eval_batch)
    model.train()
    out = {"test_accuracy": float((sm.pred == y.reshape(-1)).mean()), "test_nll": float(-sm.logp_true.mean())}
    chars = held_out_chars(splits, y.shape)
    if chars is not None:  # text: NLL per character, comparable across tokenizers
        out["test_nll_per_char"] = float(-sm.logp_true.sum() / max(int(chars.sum()), 1))
    return out


def run_shard(cfg: Config, shard: Shard) -> ShardResult:
    splits = load_splits(cfg)
    reader = open_cache(cfg, splits)
    name = job_name(cfg, shard)
    out = cfg.run_dir / "students" / name
    st = settings(cfg, shard, reader)
    key = hash_json(st)
    done = finished(out, key, f"student {name}")
    if done is not None:
        return ShardResult(name, True, done["final"]["accuracy"])
    task = task_of(cfg)
    if not reader.encoding.retemperable and st["temperature"] != reader.temperature and st["alpha"] < 1:
        raise ConfigError(f"student.temperature: {st['temperature']} differs from the cache's {reader.temperature}; "
                          f"this {reader.encoding.label()} cache holds draws without their log-probs (format "
                          f"{reader.manifest['format_version']}, or cache.draw_logp false) and cannot be re-tempered; "
                          "train at the cache's temperature, or rebuild the cache with cache.draw_logp true")
    if st["alpha"] > 0 and task.student_labels(splits) is None and not task.labels_in_inputs:
        raise ConfigError(f"student.alpha: {st['alpha']} needs labels, but the transfer set "
                          f"{splits.transfer.source} has none; set student.alpha=0 and student.baseline=false")

    spec = models(cfg)[shard.model]
    dev = resolve_device(cfg.student.device, "student.device")
    own = student_splits(cfg) if cfg.student.tokenizer is not None else splits  # what the student reads

    def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(shard.seed)
        m = build_model(spec, task.student_shape(cfg, own), own.num_classes,
                        f"student.models.{shard.model}").to(dev)
        return m, _optimizer(cfg, m.parameters(), st["lr"])

    loss_settings = {"temperature": st["temperature"], "alpha": st["alpha"], "divergence": st["divergence"],
                     "tail": st["tail"], **task.student_settings(cfg)}
    job = Job(f"student {name}", out, key, st["epochs"], cfg.student.checkpoint_every, task.row_unit,
              st["batch_size"] * task.rows_per_example(cfg))
    fitted = fit(job, fresh, dataset(cfg, shard, st, own),
                 lambda model, batch: task.student_loss(model, batch, dev, **loss_settings),
                 rows_of=lambda batch: len(batch["sample_id"]), evaluate=lambda model: held_out(model, own, task))
    buf = io.BytesIO()
    torch.save({k: v.cpu() for k, v in fitted.model.state_dict().items()}, buf)
    history = json.dumps({"job": name, "settings": st, "losses": fitted.losses, "epochs": fitted.history},
                         indent=2, sort_keys=True) + "\n"
    final = fitted.history[-1]
    commit(out, {"model.pt": buf.getvalue(), "history.json": history.encode()},
           {"job": name, "settings_hash": key, "final": {"accuracy": final["test_accuracy"], "nll": final["test_nll"]}},
           also={"config.yaml": dump_yaml(cfg).encode()})
    discard(job)
    return ShardResult(name, False, final["test_accuracy"])


def main(cfg: Config, client: Any = None, shard_index: int | None = None,
         num_shards: int | None = None) -> list[ShardResult]:
    check_writable(cfg.run_dir, "workspace")  # before anything is trained
    remove_dead_tmp(cfg.run_dir, recursive=True)  # left by killed writers of earlier runs
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
