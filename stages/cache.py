"""Stage 2: run the teacher ensemble once over the transfer set and write the soft-target cache.

    logitcache cache configs/demo.yaml
    logitcache cache configs/demo.yaml cache.encoding=topk cache.k=3 cache.backend=parquet
    logitcache cache configs/demo.yaml --shard-index $SLURM_ARRAY_TASK_ID --num-shards 8

The cache directory is named by a hash of everything that determines the targets (dataset
fingerprint, each teacher's spec and checkpoint hash, ensemble mode and weights, temperature,
encoding, the teachers' device type and precision, format version) plus the shard layout. Same inputs, same id: a complete cache is found
and nothing runs. The plan splits the transfer set into fixed row ranges (cache.rows_per_shard),
never by worker count; shards already on disk are skipped, so a rerun after a crash redoes only
the missing ones. With cache.views = N a row is one augmented view: a shard holds all N views of
its samples, view-major (all of its samples' view 0, then view 1, ...: a chunk holds one view),
their parameters drawn per (seed, sample_id, view) and stored beside the targets, the teachers run
on the rendered views (pipeline/views.py). On a GPU the teachers run under bf16 autocast by
default (cache.precision) and the encoding runs on the device; writing a shard overlaps computing
the next.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.config import Config, dump_yaml
from pipeline.core.errors import CacheError
from pipeline.core.io import atomic_write_json, atomic_write_text, check_writable
from pipeline.core.progress import bar, log
from pipeline.format import manifest as fmt
from pipeline.format.shards import recorded_digest, shard_entry, shard_name, write_shard
from pipeline.format.views import view_dtype
from pipeline.inputs.augment import draw, expand, render_rows
from pipeline.models.ensemble import check_finite, combine, load_teacher, normalized_weights, teacher_refs, token_logits
from pipeline.run.fanout import expected_workers, run_all, task_share
from pipeline.run.identity import Context, context, record


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


def plan(cfg: Config, ctx: Context | None = None) -> list[Shard]:
    """Fixed ranges of cache.rows_per_shard rows (for language models: whole sequences; with views:
    whole samples, each with all its views)."""
    ctx = ctx or context(cfg)
    per_item = cfg.data.seq_len if ctx.token_rows else ctx.views.count if ctx.views else 1
    n, step = len(ctx.splits.transfer), cfg.cache.rows_per_shard // per_item
    return [Shard(i, start, min(start + step, n), per_item) for i, start in enumerate(range(0, n, step))]


def shard_path(ctx: Context, shard: Shard) -> Path:
    return ctx.dir / "shards" / shard_name(shard.index, ctx.cfg.cache.backend)


def _autocast(ctx: Context) -> Any:
    if ctx.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(ctx.device.type, dtype=torch.bfloat16 if ctx.precision == "bf16" else torch.float16)


def compute_shard(ctx: Context, shard: Shard, models: list[torch.nn.Module]) -> dict[str, np.ndarray]:
    """Run the ensemble over the shard's rows; returns the stored columns on the host.

    Only the shard's rows are read (from a mapped input, its pages are released as it goes). For
    language models the trunk runs on a batch of sequences and the vocabulary projection, ensemble
    and encoding run cache.logit_rows token rows at a time: memory never holds batch x seq x vocab."""
    if ctx.views is not None:
        return _compute_views(ctx, shard, models)
    transfer = ctx.splits.transfer
    ids = transfer.ids[shard.start:shard.stop]
    b = _batch_size(ctx)

    def batches() -> Any:
        for i in range(shard.start, shard.stop, b):
            x, _ = transfer.rows(slice(i, min(i + b, shard.stop)))
            if ctx.token_rows:
                x = x[:, :-1]  # read seq_len tokens, predict the next at each position
            yield torch.from_numpy(x), ids[i - shard.start:i - shard.start + len(x)]

    out = _encode(ctx, shard, models, batches())
    if ctx.token_rows:
        L, n = ctx.cfg.data.seq_len, len(ids)
        out["sample_id"] = np.repeat(ids, L)
        out["position"] = np.tile(np.arange(L, dtype=np.int16), n)
        out["offsets"] = np.arange(0, (n + 1) * L, L, dtype=np.int64)
    else:
        out["sample_id"] = ids
    return out


def _batch_size(ctx: Context) -> int:
    return ctx.cfg.cache.batch_size or (8 if ctx.token_rows else 512)


def _compute_views(ctx: Context, shard: Shard, models: list[torch.nn.Module]) -> dict[str, np.ndarray]:
    """Every view of the shard's samples, view-major (row = view * samples + sample): parameters
    drawn per (seed, sample_id, view), pixels rendered on the host from the stored columns as the
    student expands them (the exact function it replays), teachers batched across views."""
    transfer, v = ctx.splits.transfer, ctx.views
    assert v is not None
    ids = transfer.ids[shard.start:shard.stop]
    view = np.repeat(np.arange(v.count, dtype=view_dtype(v.count)), len(ids))
    rows = {"sample_id": np.tile(ids, v.count), "view": view}
    rows.update(draw(v.augment, v.seed, rows["sample_id"], rows["view"], v.hw, transfer.ids))
    b = _batch_size(ctx)

    def images(sample_ids: np.ndarray) -> np.ndarray:
        return transfer.x[transfer.positions(sample_ids)]

    def batches() -> Any:
        for i in range(0, len(rows["sample_id"]), b):
            part = expand(v, {k: a[i:i + b] for k, a in rows.items()})
            yield render_rows(images, part, v.augment), part["sample_id"]

    return {**rows, **_encode(ctx, shard, models, batches())}


def _encode(ctx: Context, shard: Shard, models: list[torch.nn.Module], batches: Any) -> dict[str, np.ndarray]:
    """The encoded ensemble targets of (inputs, sample ids) batches, concatenated on the host."""
    cfg = ctx.cfg
    names = [m.name for m in cfg.teachers.members]
    weights = normalized_weights(cfg)
    gen = None
    if not ctx.encoding.retemperable:  # seeded per shard: reruns draw the same ids, byte for byte
        gen = torch.Generator(device=ctx.device).manual_seed(cfg.seed * 1_000_003 + shard.index)
    parts: list[dict[str, np.ndarray]] = []
    with torch.inference_mode():
        for xb, ids in batches:
            xb = xb.to(ctx.device, non_blocking=True)
            row_ids = torch.from_numpy(np.repeat(ids, xb.shape[1] if ctx.token_rows else 1))
            with _autocast(ctx):
                chunks = (token_logits(models, xb, cfg.cache.logit_rows) if ctx.token_rows
                          else iter([(slice(0, len(xb)), [m(xb) for m in models])]))  # each (rows, C)
            while True:
                with _autocast(ctx):  # the teachers' projection under autocast; ensemble and encoding in fp32
                    item = next(chunks, None)
                if item is None:
                    break
                rows, logits = item
                for name, z in zip(names, logits):
                    check_finite(z, name, row_ids[rows])
                logp = combine(logits, cfg.teachers.ensemble, weights, cfg.teachers.temperature)  # (rows, V)
                parts.append(ctx.encoding.to_host(ctx.encoding.encode(logp, gen)))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def write(ctx: Context, shard: Shard, arrays: dict[str, np.ndarray]) -> ShardResult:
    cfg = ctx.cfg
    attrs = {
        "format_version": fmt.FORMAT_VERSION, "cache_id": ctx.dir.name, "shard": shard.index,
        "first_row": shard.first_row, "rows": shard.rows, "num_classes": ctx.encoding.num_classes,
        "temperature": cfg.teachers.temperature, "encoding": ctx.encoding.params(),
        "teachers": [t["name"] for t in ctx.spec["teachers"]], "ensemble": cfg.teachers.ensemble,
    }
    if ctx.token_rows:
        attrs.update(seq_len=cfg.data.seq_len, vocab_fingerprint=ctx.splits.vocab)
    if ctx.views is not None:
        attrs["views"] = ctx.spec["views"]
    write_shard(shard_path(ctx, shard), arrays, attrs, ctx.encoding, cfg.cache.chunk_rows,
                    cfg.cache.compression_level, cfg.cache.codec)
    return ShardResult(shard.index, shard.rows, skipped=False)


def run_shard(cfg: Config, shard: Shard) -> ShardResult:
    ctx = context(cfg)
    return run_shards(ctx, [shard], load_models(ctx))[0]


def load_models(ctx: Context) -> list[torch.nn.Module]:
    return [load_teacher(r, ctx.splits, ctx.device) for r in teacher_refs(ctx.cfg, ctx.splits)]


def missing(ctx: Context) -> list[Shard]:
    return [s for s in plan(ctx.cfg, ctx) if not shard_path(ctx, s).exists()]


def _lost(ctx: Context, manifest: dict[str, Any]) -> list[Shard]:
    """Shards a complete manifest lists that are gone from disk (a stat each)."""
    gone = set(fmt.shard_problems(ctx.dir, manifest["shards"], hash_them=False)["missing"])
    return [s for s in plan(ctx.cfg, ctx) if f"shards/{shard_path(ctx, s).name}" in gone]


def _repair(ctx: Context, manifest: dict[str, Any], lost: list[Shard]) -> None:
    """Recompute shards deleted from a complete cache; shard bytes are deterministic, so each must
    match the manifest's sha256 again, or the cache is refused."""
    run_shards(ctx, lost, load_models(ctx))
    listed = {e["path"]: e["sha256"] for e in manifest["shards"]}
    for s in lost:
        path = shard_path(ctx, s)
        if recorded_digest(path)[0] != listed[f"shards/{path.name}"]:
            raise CacheError(f"{path}: recomputed, but its sha256 differs from the manifest's (the teachers' "
                             f"numerics differ from the run that made it); delete {ctx.dir} and rerun "
                             "`logitcache cache CONFIG`")
    log(f"cache {ctx.dir.name}: {len(lost)} shards recomputed, identical to the manifest's")


def finalize(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    entries = [shard_entry(ctx.dir, s.index, cfg.cache.backend, s.first_row, s.rows) for s in plan(cfg, ctx)]
    extra = {
        "backend": cfg.cache.backend, "encoding": ctx.encoding.params(), "num_classes": ctx.encoding.num_classes,
        "temperature": cfg.teachers.temperature, "teachers": [t["name"] for t in ctx.spec["teachers"]],
        "ensemble": cfg.teachers.ensemble, "dataset": ctx.spec["dataset"],
    }
    if ctx.views is not None:  # a row is a view
        extra["views"] = ctx.spec["views"]
        extra["bytes_per_view"] = round(sum(e["bytes"] for e in entries) / max(sum(e["rows"] for e in entries), 1), 2)
    if ctx.token_rows:  # a row is a token
        extra["bytes_per_token"] = round(sum(e["bytes"] for e in entries) / max(sum(e["rows"] for e in entries), 1), 2)
    return fmt.write_manifest(ctx.dir, ctx.spec, entries, extra)


def main(cfg: Config, client: Any = None, shard_index: int | None = None, num_shards: int | None = None) -> Path:
    """Plan, skip finished shards, compute the rest, finalize the manifest.

    In-process, writing a shard overlaps computing the next; with a Dask client, the pending
    shards are mapped over the workers in groups that carry this call's cache id: a worker that
    finds other inputs (a checkpoint overwritten meanwhile) refuses instead of writing into it."""
    task_share([], shard_index, num_shards)  # reject a bad --shard-index before any work
    check_writable(cfg.cache_root, "cache.root" if cfg.cache.root else "workspace")
    ctx = context(cfg)
    manifest = fmt.read_manifest(ctx.dir)
    if manifest is not None and manifest.get("status") == "complete":
        _record_config(cfg, ctx.dir)
        record(ctx)
        lost = _lost(ctx, manifest)
        if not lost:
            log(f"cache {ctx.dir.name}: complete ({manifest['rows']} rows), nothing to do")
            return ctx.dir
        log(f"cache {ctx.dir.name}: {len(lost)} shards listed in the manifest are missing; recomputing them")
        _repair(ctx, manifest, lost)
        return ctx.dir
    _refuse_other_layout(cfg, ctx)
    _record_config(cfg, ctx.dir)
    record(ctx)
    atomic_write_json(ctx.dir / "spec.json", ctx.spec)
    planned = plan(cfg, ctx)
    shards = task_share(planned, shard_index, num_shards)
    todo = [s for s in shards if not shard_path(ctx, s).exists()]
    done_rows = sum(s.rows for s in shards) - sum(s.rows for s in todo)
    log(f"cache {ctx.dir.name}: {len(todo)} of {len(planned)} shards to compute "
        f"({ctx.encoding.label()}, {cfg.cache.backend}, device {ctx.device}, {ctx.precision})")
    progress_desc = f"cache {ctx.dir.name[:8]}"
    if client is not None:
        groups = _groups(todo, expected_workers(cfg.cluster, client), ctx.dir.name)
        run_all(client, cfg, run_group, groups, rows=lambda g: g.rows, desc=progress_desc, gpu=True)
    else:
        progress = bar(sum(s.rows for s in shards), progress_desc)
        progress.update(done_rows)
        if todo:
            run_shards(ctx, todo, load_models(ctx), on_done=lambda s: progress.update(s.rows))
        progress.close()
    return _finish(ctx)


@dataclass(frozen=True)
class Group:
    """Consecutive shards run by one Dask task: fewer, larger tasks, and writes overlap compute."""

    shards: tuple[Shard, ...]
    cache_id: str  # the driver's: the task recomputes it from the files and refuses a mismatch

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)


def _groups(todo: list[Shard], workers: int, cache_id: str) -> list[Group]:
    size = max(1, -(-len(todo) // (4 * max(workers, 1))))  # about four tasks per worker
    return [Group(tuple(todo[i:i + size]), cache_id) for i in range(0, len(todo), size)]


def run_group(cfg: Config, group: Group) -> list[ShardResult]:
    ctx = context(cfg)
    if ctx.dir.name != group.cache_id:
        raise CacheError(f"cache {group.cache_id}: this worker computes id {ctx.dir.name} from the same config, so "
                         "the data or a teacher checkpoint changed while the cache was being written; rerun "
                         "`logitcache cache CONFIG` once the files are final")
    return run_shards(ctx, group.shards, load_models(ctx))


def run_shards(ctx: Context, shards: Sequence[Shard], models: list[torch.nn.Module],
               on_done: Callable[[Shard], Any] | None = None) -> list[ShardResult]:
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
            if shard_path(ctx, shard).exists():  # another task or process finished it
                results.append(ShardResult(shard.index, shard.rows, skipped=True))
                continue
            arrays = compute_shard(ctx, shard, models)
            drain(1)
            pending.append((shard, writer.submit(write, ctx, shard, arrays)))
        drain(0)
    return results


def _finish(ctx: Context) -> Path:
    still_missing = missing(ctx)
    if still_missing:
        log(f"cache {ctx.dir.name}: {len(still_missing)} shards still missing; the manifest is "
            "written by the call that finds every shard present")
        return ctx.dir
    manifest = finalize(ctx)
    log(f"cache {ctx.dir.name}: complete, {manifest['rows']} rows, {manifest['bytes']} bytes "
        f"({manifest['bytes_per_row']} B/row)")
    return ctx.dir


def _refuse_other_layout(cfg: Config, ctx: Context) -> None:
    """A partly written cache of the same targets with another shard plan must be finished or deleted
    first: array tasks that disagree on cache.rows_per_shard would otherwise fill two caches. A
    complete one is only pointed out, since its layout can be set to reuse it instead of running
    the teachers again; one whose spec.json cannot be read is another cache's problem, not this one's."""
    mine = fmt.target_id(ctx.spec)
    for spec_file in sorted(cfg.cache_root.glob("*/spec.json")):
        other = spec_file.parent
        if other == ctx.dir:
            continue
        complete = (other / "manifest.json").is_file()
        try:
            spec = fmt.read_spec(spec_file)
        except CacheError:
            if complete:
                continue
            raise
        if fmt.target_id(spec) != mine or spec.get("layout") == ctx.spec["layout"]:
            continue
        lay = spec["layout"]
        settings = (f"rows_per_shard={lay['rows_per_shard']}, chunk_rows={lay['chunk_rows']}, "
                    f"backend={lay['backend']}, codec={lay.get('codec', 'zstd')}")
        if complete:
            log(f"cache {ctx.dir.name}: {other} holds the same targets complete, with {settings}; set those "
                "cache settings to use it instead of computing this one")
            continue
        raise CacheError(f"{other}: a partly written cache of the same targets uses {settings}; rerun with "
                         "those settings to finish it, or delete that directory to start over with the new ones")


def _record_config(cfg: Config, directory: Path) -> None:
    atomic_write_text(directory / "configs" / f"{cfg.run_name}.yaml", dump_yaml(cfg))

