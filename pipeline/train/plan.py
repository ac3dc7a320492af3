"""The epoch planner: which rows an epoch reads, in which order, and which rows each rank and
DataLoader worker takes. Every order is a pure function of (seed, epoch); the student stage and a
user's loop (`Cache.dataset`) both read through it.

An epoch's order: the cache's pieces (the rows a chunk owns, the unit of reads) in a seeded
permutation across all shards, cut into buffers of `shuffle_chunks` consecutive pieces, items (a
row, or a token cache's whole sequence) shuffled inside each buffer by a generator keyed on
(seed, epoch, buffer). That stream of N items is cut into world-size contiguous ranges, one per
rank, and each rank's range into batches; rank-local batch b is made by DataLoader worker
b % num_workers (docs/python-api.md, "Partitioning"). The stream does not depend on the world size
or the worker count (concatenating the ranks' items in rank order gives it back), and a rank's
batches do not depend on the worker count. A run resumed on another world size lays out what the epoch has not
yet seen (`remaining`, a list of stream intervals) over its ranks.

A views cache is read one view per block of samples per epoch (`epoch_blocks`): the pieces are
those blocks' chunks, 1/N of the cache, and an item is one sample's view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.core.config import AugmentConfig
from pipeline.core.errors import CacheError
from pipeline.format.columns import Chunk
from pipeline.format.reader import CacheReader
from pipeline.format.views import ViewSpec
from pipeline.inputs.augment import hash_keys


@dataclass(frozen=True)
class Piece:
    """The rows a chunk owns: its rows, or for token caches the sequences that start in it."""

    shard: int
    start: int  # owned rows [start, stop) within the shard (layouts: of the whole cache)
    stop: int
    items: int
    first_item: int = -1  # layouts: the piece's first row of the layout (pipeline/inputs/documents.py)

    def chunk(self, chunk_rows: int) -> Chunk:
        return Chunk(self.shard, self.start // chunk_rows, self.start, self.stop)


def pieces(reader: CacheReader) -> list[Piece]:
    """Every chunk's owned rows, in cache order (a plain or token cache; views caches use epoch_pieces)."""
    if not reader.token_rows:
        return [Piece(c.shard, c.start, c.stop, c.stop - c.start) for c in reader.chunks()]
    seq_len = reader.manifest["spec"]["dataset"].get("seq_len")
    out = []
    for c in reader.chunks():
        entry = reader.shards[c.shard]
        if "chunk_items" in entry:  # variable-length sequences may straddle chunks (CacheWriter, imports)
            ext = entry["chunk_extent"]
            start = max(c.start, ext[c.index - 1] if c.index else 0)
            out.append(Piece(c.shard, start, max(start, ext[c.index]), int(entry["chunk_items"][c.index])))
        elif seq_len and (c.stop - c.start) % seq_len == 0:
            out.append(Piece(c.shard, c.start, c.stop, (c.stop - c.start) // seq_len))
        else:
            raise CacheError(f"{reader.dir}: chunk {c.index} of shard {c.shard} does not hold whole sequences of "
                             f"{seq_len} tokens; rebuild the cache with chunk_rows a multiple of seq_len")
    return out


def layout_pieces(lo: np.ndarray, hi: np.ndarray, chunk_rows: int) -> list[Piece]:
    """A layout's rows (student rows of a document-keyed cache, owning cache rows [lo, hi), in
    cache order) grouped by the chunk_rows-row block their first cache row is in: the unit of reads
    and of the shuffle, as a chunk is for other caches."""
    if not len(lo):
        return []
    block = lo // chunk_rows
    firsts = np.flatnonzero(np.diff(block, prepend=-1))
    lasts = np.append(firsts[1:], len(lo)) - 1
    return [Piece(-1, int(lo[a]), int(hi[b]), int(b - a + 1), int(a)) for a, b in zip(firsts, lasts)]


def epoch_pieces(reader: CacheReader, views: ViewSpec | None, seed: int, epoch: int,
                 plain: list[Piece]) -> list[Piece]:
    """The pieces of `epoch`: every chunk's (`plain`), or of a views cache the chosen view of each block."""
    if views is None:
        return plain
    blocks = epoch_blocks(views, [e["rows"] for e in reader.shards], reader.chunk_rows, seed, epoch)
    return [Piece(c.shard, c.start, c.stop, c.stop - c.start) for c in blocks]


def buffers(epoch_pieces: list[Piece], seed: int, epoch: int, shuffle: bool, shuffle_chunks: int) -> list[list[Piece]]:
    """The epoch's pieces in their seeded order, cut into buffers of `shuffle_chunks`."""
    idx = np.random.default_rng([seed, epoch]).permutation(len(epoch_pieces)) if shuffle \
        else np.arange(len(epoch_pieces))
    order = [epoch_pieces[int(i)] for i in idx]
    return [order[i:i + shuffle_chunks] for i in range(0, len(order), shuffle_chunks)]


def item_order(seed: int, epoch: int, buffer: int, items: int, shuffle: bool) -> np.ndarray:
    """The order of a buffer's items: a permutation keyed on (seed, epoch, buffer)."""
    return np.random.default_rng([seed, epoch, buffer]).permutation(items) if shuffle else np.arange(items)


def batch_sizes(items: int, batches: int, batch_size: int) -> list[int]:
    """`items` in `batches` batches of at most batch_size: full ones first, the rest shared evenly.
    With fewer items than batches (batch_size 1 on an uneven split) the last batches are 0: the
    dataset yields them as padding, so every rank steps as often as the others."""
    if batches <= 0 or items <= 0:
        return [0] * max(batches, 0)
    if batch_size == 1 or items <= batches:
        return [1] * min(items, batches) + [0] * (batches - items)
    full = min(batches, (items - batches) // (batch_size - 1))
    q, r = divmod(items - full * batch_size, batches - full) if batches > full else (0, 0)
    return [batch_size] * full + [q + 1] * r + [q] * (batches - full - r)


def rank_layout(n_items: int, batch_size: int, world: int, rank: int, drop_last: bool) -> tuple[int, list[int]]:
    """(first item of this rank's range in the epoch's stream, its batch sizes). Without drop_last
    every rank has the same number of batches; a batch of size 0 (batch_size 1 on an uneven split,
    or fewer items than ranks) is yielded as padding."""
    if drop_last:
        per_rank = n_items // (world * batch_size)
        return rank * per_rank * batch_size, [batch_size] * per_rank
    if n_items == 0:
        return 0, []
    base, extra = divmod(n_items, world)
    start = rank * base + min(rank, extra)
    batches = math.ceil(math.ceil(n_items / world) / batch_size)
    return start, batch_sizes(base + (rank < extra), batches, batch_size)


Spans = list[tuple[int, int]]  # intervals [lo, hi) of an epoch's stream of items, in stream order


def span_items(spans: Spans) -> int:
    return sum(hi - lo for lo, hi in spans)


def take(spans: Spans, lo: int, hi: int) -> Spans:
    """The stream intervals that hold items [lo, hi) of the sequence `spans` lists, in order."""
    out, seen = [], 0
    for a, b in spans:
        n = b - a
        if seen + n > lo and seen < hi:
            out.append((a + max(lo - seen, 0), a + min(hi - seen, n)))
        seen += n
        if seen >= hi:
            break
    return out


def remaining(spans: Spans, batch_size: int, world: int, drop_last: bool, batches: int) -> Spans:
    """What an epoch has not yet seen once every rank of `world` consumed `batches` batches of the
    layout over `spans`: each rank's range minus the prefix it read, as stream intervals. Items a
    drop_last layout skips stay skipped. Resuming on another world size (or batch size) lays these
    out afresh (`rank_layout` over their count), so no item is seen twice and none is missed; with
    drop_last the new layout again makes only full batches and skips up to world * batch_size - 1
    more of them."""
    n, out = span_items(spans), []
    for r in range(world):
        start, sizes = rank_layout(n, batch_size, world, r, drop_last)
        out += take(spans, start + sum(sizes[:batches]), start + sum(sizes))
    return merged(out)


def worker_batches(start: int, batches: int, worker: int, num_workers: int) -> range:
    """The rank-local batches DataLoader worker `worker` makes when the rank resumes at batch `start`:
    start + worker, start + worker + K, ... (a DataLoader's round-robin begins at worker 0, so it
    hands them out in order). A batch's items do not depend on K."""
    return range(start + worker, batches, num_workers)


def merged(spans: Spans) -> Spans:
    """Sorted, disjoint intervals joined where they touch."""
    out: Spans = []
    for a, b in sorted(spans):
        if out and out[-1][1] >= a:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        elif b > a:
            out.append((a, b))
    return out


# ---------------------------------------------------------------------------------------------
# The student's choice of view


def chosen_views(seed: int, epoch: int, shard: int, blocks: np.ndarray, count: int) -> np.ndarray:
    """The view each block of samples of a shard trains on in `epoch`: position epoch mod N of a
    per-block permutation of the N views, drawn afresh every N epochs. Every view of every sample is
    used once per N epochs, and the order differs between blocks, cycles and seeds. (blocks,) int64.

    Choosing per block rather than per sample is the same augmentation in distribution: each
    (sample, view)'s parameters are independent draws, so which samples share a view index says
    nothing about their pixels."""
    cycle, step = divmod(epoch, count)
    keys = hash_keys(seed, cycle, shard, np.asarray(blocks, np.int64)[:, None], np.arange(count)[None, :])
    return np.argsort(keys, axis=1, kind="stable")[:, step]


def epoch_blocks(spec: ViewSpec, shard_rows: list[int], chunk_rows: int, seed: int, epoch: int) -> list[Chunk]:
    """The row ranges a student reads in `epoch`: for each block of `chunk_rows` consecutive samples
    of each shard, the rows of its chosen view. A shard of S samples holds view v of its sample i at
    row v * S + i; S is a multiple of chunk_rows except in the last shard, so a block's view is one
    whole chunk (a range of the last shard may straddle two). Chunk.index: the chunk of its first row."""
    out = []
    for s, rows in enumerate(shard_rows):
        samples = rows // spec.count
        blocks = np.arange(-(-samples // chunk_rows))
        for j, v in zip(blocks.tolist(), chosen_views(seed, epoch, s, blocks, spec.count).tolist()):
            start = v * samples + j * chunk_rows
            out.append(Chunk(s, start // chunk_rows, start, v * samples + min((j + 1) * chunk_rows, samples)))
    return out


def augmentation(cfg: Any, spec: dict[str, Any]) -> tuple[ViewSpec | None, AugmentConfig | None]:
    """What a student trains on, given a cache's spec: (the cache's views, replayed), or (None, the
    config's augmentation, drawn online for a cache of plain images), or (None, None)."""
    if "views" in spec:
        return ViewSpec.of(spec, "student.cache"), None
    if cfg.data.task == "classify" and cfg.augment.active:
        return None, cfg.augment
    return None, None
