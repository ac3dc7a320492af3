"""Computing the soft targets of cache shards: the teacher ensemble's forward pass (under autocast
on a GPU), the ensemble, the encoding on the device, and writing each shard while the next is
computed. `logitcache cache` (stages/cache.py) plans the shards and finalizes the manifest.

For language models the trunk runs on a batch of sequences and the vocabulary projection, ensemble
and encoding run cache.logit_rows token rows at a time: memory never holds batch x seq x vocab.
With cache.views = N a shard holds all N views of its samples, view-major, their parameters drawn
per (seed, sample_id, view) and stored beside the targets.
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

from pipeline.core.lock import LeaseLock
from pipeline.format import manifest as fmt
from pipeline.format.remote import is_published, publish_shard
from pipeline.format.shards import shard_name, write_shard
from pipeline.format.views import view_dtype
from pipeline.inputs.augment import draw, expand, render_rows
from pipeline.inputs.documents import context_window, window_batches
from pipeline.models.ensemble import check_finite, combine, load_teacher, normalized_weights, teacher_refs, token_logits
from pipeline.run.identity import Context


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # first item (sample) of the transfer set; language models: first position
    stop: int
    rows_per_item: int = 1  # views: views per sample
    count: int | None = None  # language models: the trained positions in [start, stop)
    first: int | None = None  # language models: cache rows before start

    @property
    def rows(self) -> int:
        return self.count if self.count is not None else (self.stop - self.start) * self.rows_per_item

    @property
    def first_row(self) -> int:
        return self.first if self.first is not None else self.start * self.rows_per_item


@dataclass(frozen=True)
class ShardResult:
    index: int
    rows: int
    skipped: bool


def shard_path(ctx: Context, shard: Shard) -> Path:
    return ctx.dir / "shards" / shard_name(shard.index, ctx.cfg.cache.backend)


def load_models(ctx: Context) -> list[torch.nn.Module]:
    return [load_teacher(r, ctx.splits, ctx.device) for r in teacher_refs(ctx.cfg, ctx.splits)]


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
    if ctx.token_rows:
        return _compute_documents(ctx, shard, models)
    transfer = ctx.splits.transfer
    ids = transfer.ids[shard.start:shard.stop]
    b = _batch_size(ctx)

    def batches() -> Any:
        for i in range(shard.start, shard.stop, b):
            x, _ = transfer.rows(slice(i, min(i + b, shard.stop)))
            yield torch.from_numpy(x), ids[i - shard.start:i - shard.start + len(x)], None

    return {**_encode(ctx, shard, models, batches()), "sample_id": ids}


def _compute_documents(ctx: Context, shard: Shard, models: list[torch.nn.Module]) -> dict[str, np.ndarray]:
    """The targets of the trained positions in [shard.start, shard.stop): each document read in
    windows of cache.context tokens (pipeline/inputs/documents.py), and only the kept positions
    projected to the vocabulary. Rows are (document, offset), in position order."""
    corpus = ctx.splits.corpus
    context, stride = context_window(ctx.cfg.cache.context, ctx.cfg.cache.stride, ctx.cfg.data.seq_len)
    positions: list[np.ndarray] = []

    def batches() -> Any:
        for x, p, select in window_batches(corpus, shard.start, shard.stop, context, stride, _batch_size(ctx)):
            positions.append(p)
            yield torch.from_numpy(x), corpus.document_of(p), torch.from_numpy(select)

    out = _encode(ctx, shard, models, batches())
    p = np.concatenate(positions)
    docs = corpus.document_of(p)
    out["sample_id"] = docs
    out["position"] = (p - corpus.offsets[docs]).astype(np.int32)
    out["offsets"] = np.append(np.flatnonzero(np.diff(docs, prepend=-1)), len(docs)).astype(np.int64)
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
            yield render_rows(images, part, v.augment), part["sample_id"], None

    return {**rows, **_encode(ctx, shard, models, batches())}


def _encode(ctx: Context, shard: Shard, models: list[torch.nn.Module], batches: Any) -> dict[str, np.ndarray]:
    """The encoded ensemble targets of (inputs, row ids, select) batches, concatenated on the host;
    for language models `select` picks the token rows (of inputs' B x L) that get targets."""
    cfg = ctx.cfg
    names = [m.name for m in cfg.teachers.members]
    weights = normalized_weights(cfg)
    gen = None
    if ctx.encoding.stochastic:  # seeded per shard: reruns draw the same ids, byte for byte
        gen = torch.Generator(device=ctx.device).manual_seed(cfg.seed * 1_000_003 + shard.index)
    parts: list[dict[str, np.ndarray]] = []
    with torch.inference_mode():
        for xb, ids, select in batches:
            xb = xb.to(ctx.device, non_blocking=True)
            row_ids = torch.from_numpy(np.asarray(ids))
            with _autocast(ctx):
                chunks = (token_logits(models, xb, cfg.cache.logit_rows, select.to(ctx.device)) if ctx.token_rows
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
        attrs.update(keyed="document", vocab_fingerprint=ctx.splits.vocab)
    if ctx.views is not None:
        attrs["views"] = ctx.spec["views"]
    path = shard_path(ctx, shard)
    write_shard(path, arrays, attrs, ctx.encoding, cfg.cache.chunk_rows, cfg.cache.compression_level, cfg.cache.codec)
    if ctx.url is not None:  # staged here, published to the store as soon as it is whole
        publish_shard(ctx.dir, path.name, ctx.url)
    return ShardResult(shard.index, shard.rows, skipped=False)


def run_shards(ctx: Context, shards: Sequence[Shard], models: list[torch.nn.Module],
               on_done: Callable[[Shard], Any] | None = None) -> list[ShardResult]:
    """Compute and write shards in order; writing one shard overlaps computing the next.

    Each shard is computed under a lock (<cache>/.locks/, pipeline/core/lock.py), so processes that
    run the same shards at once (a stage started twice, array tasks without --shard-index) share
    them out: a shard another live process is computing is passed over, and waited for at the end
    (computed here after all if that process died)."""
    results: list[ShardResult] = []
    later: list[Shard] = []

    def in_store(shard: Shard) -> bool:  # published by a machine that does not share this staging directory
        return ctx.url is not None and is_published(ctx.url, shard_path(ctx, shard).name)

    with ThreadPoolExecutor(max_workers=1) as writer:
        pending: list[tuple[Shard, Future, LeaseLock]] = []

        def drain(keep: int) -> None:
            while len(pending) > keep:  # bound host memory: at most two shards waiting to be written
                shard, future, lock = pending.pop(0)
                try:
                    results.append(future.result())
                finally:
                    lock.release()
                if on_done:
                    on_done(shard)

        def run(shard: Shard, wait: bool) -> bool:
            """Compute and write `shard` unless it is there; False if another process holds it (wait=False)."""
            if shard_path(ctx, shard).exists() or in_store(shard):  # another task or process finished it
                results.append(ShardResult(shard.index, shard.rows, skipped=True))
                return True
            lock = LeaseLock(ctx.dir / ".locks" / f"{shard_path(ctx, shard).name}.lock",
                             f"cache {ctx.dir.name[:8]} shard {shard.index}")
            if not lock.acquire(wait=wait):
                return False
            if shard_path(ctx, shard).exists():  # finished while this process waited for the lock
                lock.release()
                results.append(ShardResult(shard.index, shard.rows, skipped=True))
                return True
            try:
                arrays = compute_shard(ctx, shard, models)
                drain(1)
            except BaseException:
                lock.release()
                raise
            pending.append((shard, writer.submit(write, ctx, shard, arrays), lock))
            return True

        try:
            for shard in shards:
                if not run(shard, wait=False):
                    later.append(shard)
            drain(0)
            for shard in later:  # computed by another process meanwhile, or here if it died
                run(shard, wait=True)
                drain(0)
        finally:  # a failed compute or write: no lock may outlive this call (its heartbeat would hold it)
            for _, future, lock in pending:
                future.cancel()
                with contextlib.suppress(BaseException):
                    future.result()
                lock.release()
    return sorted(results, key=lambda r: r.index)
