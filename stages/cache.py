"""Stage 2: run the teacher ensemble once over the transfer set and write the soft-target cache.

    logitcache cache configs/demo.yaml
    logitcache cache configs/demo.yaml cache.encoding=topk cache.k=3 cache.backend=parquet
    logitcache cache configs/demo.yaml --shard-index $SLURM_ARRAY_TASK_ID --num-shards 8

The cache directory is named by a hash of everything that determines the targets (dataset
fingerprint, each teacher's spec and checkpoint hash, ensemble mode and weights, temperature,
encoding, format version) plus the shard layout. Same inputs, same id: a complete cache is found
and nothing runs. The plan splits the transfer set into fixed row ranges (cache.rows_per_shard),
never by worker count; shards already on disk are skipped, so a rerun after a crash redoes only
the missing ones. On a GPU the teachers run under bf16 autocast and the top-k is taken on the
device; writing a shard overlaps computing the next.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import cache as fmt
from pipeline.config import Config, dump_yaml
from pipeline.data import Splits, load_splits
from pipeline.ensemble import (
    check_finite,
    combine,
    load_teacher,
    normalized_weights,
    teacher_identity,
    teacher_refs,
)
from pipeline.errors import CacheError, ConfigError
from pipeline.fanout import run_all, task_share
from pipeline.io import atomic_write_json, atomic_write_text
from pipeline.models import resolve_device
from pipeline.progress import bar, log


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # first item (sample or sequence) of the transfer set
    stop: int
    rows_per_item: int = 1  # language models: tokens per sequence

    @property
    def rows(self) -> int:
        return (self.stop - self.start) * self.rows_per_item

    @property
    def first_row(self) -> int:
        return self.start * self.rows_per_item


@dataclass(frozen=True)
class ShardResult:
    index: int
    rows: int
    skipped: bool


@dataclass(frozen=True)
class Context:
    splits: Splits
    spec: dict[str, Any]
    dir: Path
    encoding: fmt.Encoding


_contexts: dict[str, Context] = {}
_teachers: dict[tuple[str, str], list[torch.nn.Module]] = {}


def context(cfg: Config) -> Context:
    """Everything derived from the config and the files it names; built once per process."""
    key = repr(cfg)  # frozen and fully determined by its fields; cheaper than YAML per call
    if key in _contexts:
        return _contexts[key]
    splits = load_splits(cfg)
    refs = teacher_refs(cfg, splits)
    c = cfg.cache
    lm = cfg.data.task == "lm"
    if c.encoding == "dense" and splits.num_classes > c.dense_max_classes:
        raise ConfigError(f"cache.encoding: dense needs {splits.num_classes} values per row; above "
                          f"cache.dense_max_classes={c.dense_max_classes} use encoding topk or sampled")
    enc = fmt.Encoding(c.encoding, splits.num_classes, c.dtype, min(c.k, splits.num_classes), c.draws, lm,
                       c.bits if c.encoding == "topk" else 16, c.logp_range)
    spec = {
        "format_version": fmt.FORMAT_VERSION,
        "dataset": {"fingerprint": splits.transfer.fingerprint, "rows": len(splits.transfer),
                    "input_shape": list(splits.input_shape)},
        "num_classes": splits.num_classes,
        "teachers": [teacher_identity(r) for r in refs],
        "ensemble": cfg.teachers.ensemble,
        "weights": normalized_weights(cfg),
        "temperature": cfg.teachers.temperature,
        "encoding": enc.describe(),
        "layout": {"backend": c.backend, "rows_per_shard": c.rows_per_shard, "chunk_rows": c.chunk_rows},
    }
    if lm:
        spec["dataset"].update(seq_len=cfg.data.seq_len, tokens=len(splits.transfer) * cfg.data.seq_len,
                               vocab_fingerprint=splits.vocab)
        spec["sampling_seed"] = cfg.seed if c.encoding == "sampled" else None
    ctx = Context(splits, spec, cfg.cache_root / fmt.cache_id(spec), enc)
    _contexts[key] = ctx
    return ctx


def forget() -> None:
    """Drop this process's memos, so the next call hashes data and teachers as they are on disk."""
    _contexts.clear()
    _teachers.clear()


def cache_dir(cfg: Config) -> Path:
    return context(cfg).dir


def plan(cfg: Config) -> list[Shard]:
    """Fixed ranges of cache.rows_per_shard rows (for language models: whole sequences)."""
    per_item = cfg.data.seq_len if cfg.data.task == "lm" else 1
    n, step = len(context(cfg).splits.transfer), cfg.cache.rows_per_shard // per_item
    return [Shard(i, start, min(start + step, n), per_item) for i, start in enumerate(range(0, n, step))]


def shard_path(cfg: Config, shard: Shard) -> Path:
    return cache_dir(cfg) / "shards" / fmt.shard_name(shard.index, cfg.cache.backend)


def compute_shard(cfg: Config, shard: Shard) -> dict[str, np.ndarray]:
    """Run the ensemble over the shard's rows; returns the encoded targets on the host."""
    ctx = context(cfg)
    device = resolve_device(cfg.cache.device)
    models = _models(cfg, device)
    names = [m.name for m in cfg.teachers.members]
    weights = normalized_weights(cfg)
    x = ctx.splits.transfer.x[shard.start:shard.stop]
    ids = torch.from_numpy(ctx.splits.transfer.ids[shard.start:shard.stop])
    lm = ctx.encoding.token_rows
    if lm:
        x = x[:, :-1]  # read seq_len tokens, predict the next at each position
    gen = None
    if ctx.encoding.name == "sampled":  # seeded per shard: reruns draw the same ids, byte for byte
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + shard.index)
    parts: list[dict[str, np.ndarray]] = []
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    with torch.inference_mode():
        for b in range(0, len(x), cfg.cache.batch_size):
            xb = torch.from_numpy(x[b:b + cfg.cache.batch_size]).to(device, non_blocking=True)
            with autocast:
                logits = [m(xb) for m in models]  # each (B, C), or (B, L, V) for language models
            for name, z in zip(names, logits):
                check_finite(z.reshape(len(xb), -1), name, ids[b:b + len(xb)])
            logp = combine(logits, cfg.teachers.ensemble, weights, cfg.teachers.temperature)  # fp32
            logp = logp.reshape(-1, logp.shape[-1])  # token rows (B * L, V), sequence-major
            parts.append(fmt.to_host(fmt.encode(logp, ctx.encoding, gen), ctx.encoding))
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if lm:
        L = x.shape[1]
        out["sample_id"] = np.repeat(ids.numpy(), L)
        out["position"] = np.tile(np.arange(L, dtype=np.int16), len(x))
        out["offsets"] = np.arange(0, (len(x) + 1) * L, L, dtype=np.int64)
    else:
        out["sample_id"] = ids.numpy()
    return out


def write(cfg: Config, shard: Shard, arrays: dict[str, np.ndarray]) -> ShardResult:
    ctx = context(cfg)
    attrs = {
        "format_version": fmt.FORMAT_VERSION, "cache_id": ctx.dir.name, "shard": shard.index,
        "first_row": shard.first_row, "rows": shard.rows, "num_classes": ctx.encoding.num_classes,
        "temperature": cfg.teachers.temperature, "encoding": ctx.encoding.describe(),
        "teachers": [t["name"] for t in ctx.spec["teachers"]], "ensemble": cfg.teachers.ensemble,
    }
    if ctx.encoding.token_rows:
        attrs.update(seq_len=cfg.data.seq_len, vocab_fingerprint=ctx.splits.vocab)
    fmt.write_shard(shard_path(cfg, shard), arrays, attrs, ctx.encoding, cfg.cache.chunk_rows,
                    cfg.cache.compression_level)
    return ShardResult(shard.index, shard.rows, skipped=False)


def run_shard(cfg: Config, shard: Shard) -> ShardResult:
    return run_shards(cfg, [shard])[0]


def _models(cfg: Config, device: torch.device) -> list[torch.nn.Module]:
    key = (cache_dir(cfg).name, str(device))
    if key not in _teachers:  # loaded once per process (per Dask worker), not once per shard
        ctx = context(cfg)
        _teachers[key] = [load_teacher(r, ctx.splits, device) for r in teacher_refs(cfg, ctx.splits)]
    return _teachers[key]


def missing(cfg: Config) -> list[Shard]:
    return [s for s in plan(cfg) if not shard_path(cfg, s).exists()]


def finalize(cfg: Config) -> dict[str, Any]:
    ctx = context(cfg)
    entries = [fmt.shard_entry(ctx.dir, s.index, cfg.cache.backend, s.first_row, s.rows) for s in plan(cfg)]
    extra = {
        "backend": cfg.cache.backend, "encoding": ctx.encoding.describe(), "num_classes": ctx.encoding.num_classes,
        "temperature": cfg.teachers.temperature, "teachers": [t["name"] for t in ctx.spec["teachers"]],
        "ensemble": cfg.teachers.ensemble, "dataset": ctx.spec["dataset"],
    }
    if ctx.encoding.token_rows:  # a row is a token
        extra["bytes_per_token"] = round(sum(e["bytes"] for e in entries) / max(sum(e["rows"] for e in entries), 1), 2)
    return fmt.write_manifest(ctx.dir, ctx.spec, entries, extra)


def main(cfg: Config, client: Any = None, shard_index: int | None = None, num_shards: int | None = None) -> Path:
    """Plan, skip finished shards, compute the rest, finalize the manifest.

    In-process, writing a shard overlaps computing the next; with a Dask client, the pending
    shards are mapped over the workers (teachers loaded once per worker)."""
    forget()  # files may have changed since an earlier call in this process
    task_share([], shard_index, num_shards)  # reject a bad --shard-index before any work
    ctx = context(cfg)
    manifest = fmt.read_manifest(ctx.dir)
    if manifest is not None and manifest.get("status") == "complete":
        _record_config(cfg, ctx.dir)
        log(f"cache {ctx.dir.name}: complete ({manifest['rows']} rows), nothing to do")
        return ctx.dir
    _refuse_other_layout(cfg, ctx)
    _record_config(cfg, ctx.dir)
    atomic_write_json(ctx.dir / "spec.json", ctx.spec)
    shards = plan(cfg)
    shards = task_share(shards, shard_index, num_shards)
    todo = [s for s in shards if not shard_path(cfg, s).exists()]
    done_rows = sum(s.rows for s in shards) - sum(s.rows for s in todo)
    log(f"cache {ctx.dir.name}: {len(todo)} of {len(plan(cfg))} shards to compute "
        f"({ctx.encoding.name}, {cfg.cache.backend}, device {resolve_device(cfg.cache.device)})")
    progress_desc = f"cache {ctx.dir.name[:8]}"
    if client is not None:
        groups = _groups(todo, len(client.scheduler_info()["workers"]))
        run_all(client, cfg, run_group, groups, rows=lambda g: g.rows, desc=progress_desc, gpu=True)
    else:
        progress = bar(sum(s.rows for s in shards), progress_desc)
        progress.update(done_rows)
        run_shards(cfg, todo, on_done=lambda s: progress.update(s.rows))
        progress.close()
    return _finish(cfg, ctx)


@dataclass(frozen=True)
class Group:
    """Consecutive shards run by one Dask task: fewer, larger tasks, and writes overlap compute."""

    shards: tuple[Shard, ...]

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)


def _groups(todo: list[Shard], workers: int) -> list[Group]:
    size = max(1, -(-len(todo) // (4 * max(workers, 1))))  # about four tasks per worker
    return [Group(tuple(todo[i:i + size])) for i in range(0, len(todo), size)]


def run_group(cfg: Config, group: Group) -> list[ShardResult]:
    return run_shards(cfg, group.shards)


def run_shards(cfg: Config, shards: Sequence[Shard], on_done: Callable[[Shard], Any] | None = None) -> list[ShardResult]:
    """Compute and write shards in order; writing one shard overlaps computing the next."""
    results = []
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending: list[tuple[Shard, Future]] = []

        def drain(keep: int) -> None:
            while len(pending) > keep:  # bound host memory: at most two shards waiting to be written
                shard, future = pending.pop(0)
                results.append(future.result())
                if on_done:
                    on_done(shard)

        for shard in shards:
            if shard_path(cfg, shard).exists():  # another task or process finished it
                results.append(ShardResult(shard.index, shard.rows, skipped=True))
                continue
            arrays = compute_shard(cfg, shard)
            drain(1)
            pending.append((shard, writer.submit(write, cfg, shard, arrays)))
        drain(0)
    return results


def _finish(cfg: Config, ctx: Context) -> Path:
    still_missing = missing(cfg)
    if still_missing:
        log(f"cache {ctx.dir.name}: {len(still_missing)} shards still missing; the manifest is "
            "written by the call that finds every shard present")
        return ctx.dir
    manifest = finalize(cfg)
    log(f"cache {ctx.dir.name}: complete, {manifest['rows']} rows, {manifest['bytes']} bytes "
        f"({manifest['bytes_per_row']} B/row)")
    return ctx.dir


def _refuse_other_layout(cfg: Config, ctx: Context) -> None:
    """A partly written cache of the same targets with another shard plan must be finished or deleted
    first: array tasks that disagree on cache.rows_per_shard would otherwise fill two caches."""
    mine = fmt.target_id(ctx.spec)
    for spec_file in cfg.cache_root.glob("*/spec.json"):
        other = spec_file.parent
        if other == ctx.dir or (other / "manifest.json").is_file():
            continue
        spec = json.loads(spec_file.read_text())
        if fmt.target_id(spec) == mine and spec.get("layout") != ctx.spec["layout"]:
            lay = spec["layout"]
            raise CacheError(
                f"{other}: a partly written cache of the same targets uses rows_per_shard="
                f"{lay['rows_per_shard']}, chunk_rows={lay['chunk_rows']}, backend={lay['backend']}; rerun with "
                "those settings to finish it, or delete that directory to start over with the new ones")


def _record_config(cfg: Config, directory: Path) -> None:
    atomic_write_text(directory / "configs" / f"{cfg.run_name}.yaml", dump_yaml(cfg))

