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

from pipeline.core.errors import DataError
from pipeline.core.io import hash_json
from pipeline.core.lock import LeaseLock
from pipeline.format import manifest as fmt
from pipeline.format import members
from pipeline.format.remote import is_published, publish_shard
from pipeline.format.shards import shard_name, write_shard
from pipeline.format.views import view_dtype
from pipeline.inputs.augment import draw, expand, render_rows
from pipeline.inputs.documents import context_window, window_batches
from pipeline.models.ensemble import check_finite, combine, load_teacher, normalized_weights, teacher_refs, token_logits
from pipeline.run.identity import Context, Unit


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
    """A plain cache's shard (its own directory)."""
    return ctx.dir / "shards" / shard_name(shard.index, ctx.cfg.cache.backend)


def unit_path(ctx: Context, unit: Unit, shard: Shard) -> Path:
    """Where `unit` keeps `shard`: the cache's own shards/, or its store, named by the shard's rows."""
    if unit.spec is None:
        return shard_path(ctx, shard)
    return unit.dir / "shards" / members.shard_name(shard.index, ctx.row_digests[shard.index], ctx.cfg.cache.backend)


def load_models(ctx: Context) -> list[torch.nn.Module]:
    return [load_teacher(r, ctx.splits, ctx.device) for r in teacher_refs(ctx.cfg, ctx.splits)]


class Teachers:
    """The teachers by index, each loaded the first time a shard needs it: a cache that reuses three
    teachers' stores never loads them."""

    def __init__(self, ctx: Context) -> None:
        self.ctx, self.refs, self.loaded = ctx, teacher_refs(ctx.cfg, ctx.splits), {}

    def __getitem__(self, i: int) -> torch.nn.Module:
        if i not in self.loaded:
            self.loaded[i] = load_teacher(self.refs[i], self.ctx.splits, self.ctx.device)
        return self.loaded[i]


_KEPT: dict[str, Teachers] = {}  # a Dask worker's teachers, by identity: the last set only


def kept_models(ctx: Context) -> Teachers:
    """The teachers for a process that runs many tasks of one cache stage (a Dask worker): each
    loaded once, kept by their identity (each teacher's spec and checkpoint sha256, as the cache id
    hashes them, the classes and input shape they are built for, and the device), so a retrained
    teacher is loaded afresh. Loading took a third of a second per task for bench/fanout.py's
    teacher (mostly building the model before its weights replace the initial ones): 12% of a
    6-shard task. The worker keeps the last set until it exits."""
    key = hash_json([ctx.spec["teachers"], ctx.spec["num_classes"], ctx.spec["dataset"].get("input_shape"),
                     str(ctx.device)])
    if key not in _KEPT:
        _KEPT.clear()
        _KEPT[key] = Teachers(ctx)
    return _KEPT[key]


def _autocast(ctx: Context) -> Any:
    if ctx.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(ctx.device.type, dtype=torch.bfloat16 if ctx.precision == "bf16" else torch.float16)


def compute_shard(ctx: Context, shard: Shard, models: Any) -> dict[str, np.ndarray]:
    """Run the ensemble over a plain cache's shard rows; returns the stored columns on the host.

    Only the shard's rows are read (from a mapped input, its pages are released as it goes). For
    language models the trunk runs on a batch of sequences and the vocabulary projection, ensemble
    and encoding run cache.logit_rows token rows at a time: memory never holds batch x seq x vocab."""
    return compute_units(ctx, shard, ctx.units[:1], models)[0]


def compute_units(ctx: Context, shard: Shard, units: Sequence[Unit], models: Any) -> list[dict[str, np.ndarray]]:
    """The stored columns of each unit's shard: the rows' own columns and the unit's targets. Each
    teacher the units need runs once over the rows; `models[i]` is teacher i."""
    if ctx.views is not None:
        return _compute_views(ctx, shard, units, models)
    if ctx.token_rows:
        return _compute_documents(ctx, shard, units, models)
    transfer = ctx.splits.transfer
    ids = transfer.ids[shard.start:shard.stop]
    b = _batch_size(ctx)

    def batches() -> Any:
        for i in range(shard.start, shard.stop, b):
            x, _ = transfer.rows(slice(i, min(i + b, shard.stop)))
            yield torch.from_numpy(x), ids[i - shard.start:i - shard.start + len(x)], None, None

    return [{**e, "sample_id": ids} for e in _encode(ctx, shard, units, models, batches())]


def _compute_documents(ctx: Context, shard: Shard, units: Sequence[Unit], models: Any) -> list[dict[str, np.ndarray]]:
    """The targets of the trained positions in [shard.start, shard.stop): each document read in
    windows of cache.context tokens (pipeline/inputs/documents.py), and only the kept positions
    projected to the vocabulary. Rows are (document, offset), in position order. A corpus with
    character spans (text) adds what a student with another tokenizer aligns by (ALIGN_COLUMNS):
    the predicted token's span, its id and its log-prob under the targets."""
    corpus = ctx.splits.corpus
    context, stride = context_window(ctx.cfg.cache.context, ctx.cfg.cache.stride, ctx.cfg.data.seq_len)
    positions: list[np.ndarray] = []
    aligned = corpus.spans is not None

    def batches() -> Any:
        for x, p, select in window_batches(corpus, shard.start, shard.stop, context, stride, _batch_size(ctx)):
            positions.append(p)
            labels = torch.from_numpy(corpus.tokens[p + 1].astype(np.int64)) if aligned else None
            yield torch.from_numpy(x), corpus.document_of(p), torch.from_numpy(select), labels

    encoded = _encode(ctx, shard, units, models, batches())
    p = np.concatenate(positions)
    docs = corpus.document_of(p)
    rows = {"sample_id": docs, "position": (p - corpus.offsets[docs]).astype(np.int32),
            "offsets": np.append(np.flatnonzero(np.diff(docs, prepend=-1)), len(docs)).astype(np.int64)}
    if aligned:
        rows.update(align_columns(corpus, p + 1))
    return [{**e, **rows} for e in encoded]


def align_columns(corpus: Any, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """The alignment columns (format/columns.ALIGN_COLUMNS) but label_logp of the predicted tokens
    at flat positions `tokens`: where each starts, how many characters it spans, its id."""
    spans = np.asarray(corpus.spans[tokens], dtype=np.int64)
    length = spans[:, 1] - spans[:, 0]
    if len(length) and length.max() > np.iinfo(np.uint16).max:
        raise DataError(f"{corpus.directory}: a token spans {int(length.max())} characters; spans are stored as "
                        "uint16 lengths, split such text before tokenizing")
    ids = np.uint16 if corpus.tokens.dtype.itemsize <= 2 else np.uint32
    return {"span_start": spans[:, 0].astype(np.int32), "span_length": length.astype(np.uint16),
            "label": np.asarray(corpus.tokens[tokens]).astype(ids)}


def _batch_size(ctx: Context) -> int:
    return ctx.cfg.cache.batch_size or (8 if ctx.token_rows else 512)


def _compute_views(ctx: Context, shard: Shard, units: Sequence[Unit], models: Any) -> list[dict[str, np.ndarray]]:
    """A shard of views: every view of each of the shard's samples, view-major, its parameters drawn
    per (seed, sample_id, view) and its pixels rendered by pipeline/inputs/augment.py's render_rows
    (the exact function it replays), teachers batched across views."""
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
            yield render_rows(images, part, v.augment), part["sample_id"], None, None

    return [{**rows, **e} for e in _encode(ctx, shard, units, models, batches())]


def _encode(ctx: Context, shard: Shard, units: Sequence[Unit], models: Any, batches: Any) -> list[dict[str, np.ndarray]]:
    """Each unit's encoded targets of (inputs, row ids, select) batches, concatenated on the host;
    for language models `select` picks the token rows (of inputs' B x L) that get targets. A unit of
    several teachers is their ensemble; of one, that teacher's distribution at the cache's T."""
    cfg = ctx.cfg
    names = [m.name for m in cfg.teachers.members]
    weights = normalized_weights(cfg)
    run = sorted({t for u in units for t in u.teachers})  # the teachers the units need, each run once
    nets = [models[t] for t in run]
    gens: list[torch.Generator | None] = [None] * len(units)
    if ctx.encoding.stochastic:  # seeded per shard (and unit): reruns draw the same ids, byte for byte
        gens = [torch.Generator(device=ctx.device).manual_seed(cfg.seed * 1_000_003 + shard.index) for _ in units]
    parts: list[list[dict[str, np.ndarray]]] = [[] for _ in units]
    with torch.inference_mode():
        for xb, ids, select, labels in batches:
            xb = xb.to(ctx.device, non_blocking=True)
            row_ids = torch.from_numpy(np.asarray(ids))
            with _autocast(ctx):
                chunks = (token_logits(nets, xb, cfg.cache.logit_rows, select.to(ctx.device)) if ctx.token_rows
                          else iter([(slice(0, len(xb)), [m(xb) for m in nets])]))  # each (rows, C)
            while True:
                with _autocast(ctx):  # the teachers' projection under autocast; ensemble and encoding in fp32
                    item = next(chunks, None)
                if item is None:
                    break
                rows, logits = item
                for t, z in zip(run, logits):
                    check_finite(z, names[t], row_ids[rows])
                for unit, gen, out in zip(units, gens, parts):
                    mine = [logits[run.index(t)] for t in unit.teachers]
                    logp = combine(mine, cfg.teachers.ensemble, weights, cfg.teachers.temperature)  # (rows, V)
                    encoded = ctx.encoding.to_host(ctx.encoding.encode(logp, gen))
                    if labels is not None:  # the log-prob of the token that follows, at the cache's T
                        label = labels[rows].to(logp.device)[:, None]
                        encoded["label_logp"] = logp.gather(1, label)[:, 0].to(torch.float16).cpu().numpy()
                    out.append(encoded)
    return [{k: np.concatenate([p[k] for p in out]) for k in out[0]} for out in parts]


def write(ctx: Context, shard: Shard, arrays: dict[str, np.ndarray], unit: Unit | None = None) -> ShardResult:
    """Write one shard of the cache's own (or of `unit`'s store: attributes that name the store, the
    teachers and the rows' digest, never a cache, so that every cache reads the same bytes)."""
    cfg = ctx.cfg
    unit = unit if unit is not None else ctx.units[0]
    attrs: dict[str, Any] = {"format_version": fmt.FORMAT_VERSION}
    attrs.update({"cache_id": ctx.dir.name} if unit.spec is None else
                 {"store": unit.store, "unit": unit.name, "rows_digest": ctx.row_digests[shard.index]})
    attrs.update({
        "shard": shard.index, "first_row": shard.first_row, "rows": shard.rows,
        "num_classes": ctx.encoding.num_classes, "temperature": cfg.teachers.temperature,
        "encoding": ctx.encoding.params(), "teachers": [ctx.spec["teachers"][t]["name"] for t in unit.teachers],
    })
    if len(unit.teachers) > 1 or unit.spec is None:
        attrs["ensemble"] = cfg.teachers.ensemble
    if ctx.token_rows:
        attrs.update(keyed="document", vocab_fingerprint=ctx.splits.vocab)
    if ctx.views is not None:
        attrs["views"] = ctx.spec["views"]
    path = unit_path(ctx, unit, shard)
    write_shard(path, arrays, attrs, ctx.encoding, ctx.chunk_rows, cfg.cache.compression_level, cfg.cache.codec)
    if ctx.url is not None and unit.spec is None:  # staged here, published to the store as soon as it is whole
        publish_shard(ctx.dir, path.name, ctx.url)
    return ShardResult(shard.index, shard.rows, skipped=False)


def _write_units(ctx: Context, shard: Shard, units: Sequence[Unit], arrays: list[dict[str, np.ndarray]]) -> ShardResult:
    for unit, a in zip(units, arrays):
        write(ctx, shard, a, unit)
    return ShardResult(shard.index, shard.rows, skipped=False)


def pending_units(ctx: Context, shard: Shard) -> list[Unit]:
    """The units whose shard `shard` is not written yet (in the store, for a cache published there)."""
    return [u for u in ctx.units if not unit_path(ctx, u, shard).exists()
            and not (u.spec is None and ctx.url is not None and is_published(ctx.url, shard_path(ctx, shard).name))]


def run_shards(ctx: Context, shards: Sequence[Shard], models: Any,
               on_done: Callable[[Shard], Any] | None = None) -> list[ShardResult]:
    """Compute and write shards in order; writing one shard overlaps computing the next. `models[i]`
    is teacher i (a list, or `Teachers`, which loads only those that run).

    A shard is computed for the units that lack it (with cache.members, the members whose stores
    do not hold its rows yet), under a lock (the unit's .locks/, pipeline/core/lock.py), so
    processes that run the same shards at once (a stage started twice, array tasks without
    --shard-index, two caches that need one member's rows) share them out: a shard another live
    process is computing is passed over, and waited for at the end (computed here after all if that
    process died)."""
    results: list[ShardResult] = []
    later: list[Shard] = []

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
            units = pending_units(ctx, shard)
            if not units:  # another task or process finished it
                results.append(ShardResult(shard.index, shard.rows, skipped=True))
                return True
            first = unit_path(ctx, units[0], shard)
            lock = LeaseLock(units[0].dir / ".locks" / f"{first.name}.lock", f"cache {ctx.dir.name[:8]} shard {shard.index}")
            if not lock.acquire(wait=wait):
                return False
            units = pending_units(ctx, shard)
            if not units:  # finished while this process waited for the lock
                lock.release()
                results.append(ShardResult(shard.index, shard.rows, skipped=True))
                return True
            try:
                arrays = ([compute_shard(ctx, shard, models)] if units[0].spec is None
                          else compute_units(ctx, shard, units, models))
                drain(1)
            except BaseException:
                lock.release()
                raise
            pending.append((shard, writer.submit(_write_units, ctx, shard, units, arrays), lock))
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
