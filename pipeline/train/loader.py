"""Stream a cache in a shuffled but reproducible order, with memory bounded by one shuffle buffer.

Random row reads from a compressed store are ~1000x slower than chunk reads, so the order is: a
seeded permutation of every chunk of the cache (across all shards: shards are contiguous row
ranges of the source, so a source sorted by class would otherwise give one-class batches), cut
into buffers of `shuffle_chunks` whole chunks, rows shuffled within each buffer. The order is a
pure function of (seed, epoch), so a resumed run replays it exactly; resuming at batch b reads
nothing before the buffer that holds it.

A views cache is read one view per block of samples per epoch (pipeline/views.py, epoch_blocks):
the permuted units are those blocks' chunks, 1/N of the cache, and a row is one sample's view.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from pipeline.format.columns import Chunk
from pipeline.format.reader import CacheReader, read_joined
from pipeline.format.views import ViewSpec
from pipeline.train.plan import epoch_blocks


def epoch_chunks(reader: CacheReader, seed: int, epoch: int) -> list[Chunk]:
    """The row ranges an epoch reads: every chunk, or of a views cache one view of each block."""
    spec = reader.manifest["spec"]
    if "views" not in spec:
        return reader.chunks()
    return epoch_blocks(ViewSpec.of(spec, reader.dir), [e["rows"] for e in reader.shards], reader.chunk_rows, seed,
                        epoch)


def epoch_rows(reader: CacheReader) -> int:
    """Rows an epoch reads: all, or one view of each sample of a views cache."""
    views = reader.manifest["spec"].get("views")
    return reader.rows // views["count"] if views else reader.rows


class ChunkShuffleLoader:
    def __init__(self, reader: CacheReader, batch_size: int, seed: int, shuffle_chunks: int,
                 rows_per_item: int = 1) -> None:
        """batch_size counts items; an item is one row, or for token caches one sequence of
        `rows_per_item` contiguous rows that stay together and in order."""
        self.reader = reader
        self.batch_size = batch_size * rows_per_item
        self.seed = seed
        self.shuffle_chunks = shuffle_chunks
        self.per_item = rows_per_item

    def __len__(self) -> int:
        return math.ceil(epoch_rows(self.reader) / self.batch_size)

    def _buffers(self, rng: np.random.Generator, epoch: int) -> list[list[Chunk]]:
        chunks = epoch_chunks(self.reader, self.seed, epoch)
        order = [chunks[int(j)] for j in rng.permutation(len(chunks))]
        n = self.shuffle_chunks
        return [order[i:i + n] for i in range(0, len(order), n)]

    def batches(self, epoch: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yield batches `start`, `start + 1`, ... of `epoch`; each a dict of column arrays."""
        rng = np.random.default_rng([self.seed, epoch])
        skip = start * self.batch_size  # rows of the epoch's stream already consumed
        plan = self._plan(rng, epoch)
        seen, ahead_of = 0, None
        for chunks, perm in plan:  # skipped buffers' permutations are drawn too, so the order is fixed
            if seen + len(perm) > skip:
                ahead_of = (chunks, perm[skip - seen:])  # the rest of the buffer that holds batch `start`
                break
            seen += len(perm)
        if ahead_of is None:
            return
        # Buffers are prepared (read, concatenated, shuffled) on one background thread while the
        # consumer works through the previous one, so storage costs overlap the training step.
        # Every read happens on that thread, so a Parquet file is never read by two threads at once.
        # Memory: the buffer being yielded plus the one being prepared. Buffers hold the stored
        # (narrow) columns, and each batch is decoded as it is yielded: a buffer of 8-bit top-10 rows
        # takes ~16 B/row, not the ~130 B/row of int64 ids and float32 log-probs, and shuffling
        # moves fewer bytes. Each buffer's permutation is drawn when it is prepared: the epoch's
        # order never exists whole, whatever the cache's size.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="logitcache-prefetch") as ahead:
            yield from self._emit(itertools.chain([ahead_of], plan), ahead)

    def _plan(self, rng: np.random.Generator, epoch: int) -> Iterator[tuple[list[Chunk], np.ndarray]]:
        """Each buffer's chunks and its row permutation, in order, drawn from `rng` one at a time."""
        for chunks in self._buffers(rng, epoch):
            rows = sum(c.stop - c.start for c in chunks)
            items = rng.permutation(rows // self.per_item)
            yield chunks, (items[:, None] * self.per_item + np.arange(self.per_item)).reshape(-1)

    def _prepare(self, chunks: list[Chunk], perm: np.ndarray) -> dict[str, np.ndarray]:
        """The rows of a buffer's chunks in the order `perm` (row positions within the buffer)."""
        joined = read_joined(self.reader, chunks, False)
        # take() copies whole rows: several times faster than fancy indexing on (rows, k) columns
        return {k: np.take(v, perm, axis=0) if v.ndim > 1 else v[perm] for k, v in joined.items()}

    def _emit(self, plan: Iterator[tuple[list[Chunk], np.ndarray]],
              ahead: ThreadPoolExecutor) -> Iterator[dict[str, np.ndarray]]:
        carry: dict[str, np.ndarray] | None = None
        pending: Future | None = ahead.submit(self._prepare, *next(plan))
        while pending is not None:
            data = pending.result()
            following = next(plan, None)
            pending = ahead.submit(self._prepare, *following) if following is not None else None
            n, i = len(data["sample_id"]), 0
            if carry is not None:  # the rows a buffer left over start the next one's first batch
                i = min(self.batch_size - len(carry["sample_id"]), n)
                carry = {k: np.concatenate([carry[k], v[:i]]) for k, v in data.items()}
                if len(carry["sample_id"]) == self.batch_size:
                    yield self.reader.decode(carry)
                    carry = None
            full = i + (n - i) // self.batch_size * self.batch_size
            for j in range(i, full, self.batch_size):
                yield self.reader.decode({k: v[j:j + self.batch_size] for k, v in data.items()})
            if full < n:  # a copy, so that the rest of the buffer is freed
                carry = {k: np.concatenate([carry[k], v[full:]]) if carry is not None else v[full:].copy()
                         for k, v in data.items()}
        if carry is not None:
            yield self.reader.decode(carry)

