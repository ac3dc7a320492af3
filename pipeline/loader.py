"""Stream a cache in a shuffled but reproducible order, with memory bounded by one shuffle buffer.

Random row reads from a compressed store are ~1000x slower than chunk reads, so the order is: a
seeded permutation of every chunk of the cache (across all shards: shards are contiguous row
ranges of the source, so a source sorted by class would otherwise give one-class batches), cut
into buffers of `shuffle_chunks` whole chunks, rows shuffled within each buffer. The order is a
pure function of (seed, epoch), so a resumed run replays it exactly; resuming at batch b reads
nothing before the buffer that holds it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from pipeline.cache import CacheReader, Chunk


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
        return math.ceil(self.reader.rows / self.batch_size)

    def _buffers(self, rng: np.random.Generator) -> list[list[Chunk]]:
        chunks = self.reader.chunks()
        order = [chunks[int(j)] for j in rng.permutation(len(chunks))]
        n = self.shuffle_chunks
        return [order[i:i + n] for i in range(0, len(order), n)]

    def batches(self, epoch: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yield batches `start`, `start + 1`, ... of `epoch`; each a dict of column arrays."""
        rng = np.random.default_rng([self.seed, epoch])
        skip = start * self.batch_size  # rows of the epoch's stream already consumed
        buffers = self._buffers(rng)
        perms, seen = [], 0
        for buffer in buffers:  # every permutation drawn, skipped or not, so the order is fixed
            rows = sum(c.stop - c.start for c in buffer)
            items = rng.permutation(rows // self.per_item)
            perms.append(((items[:, None] * self.per_item + np.arange(self.per_item)).reshape(-1), rows))
        first = 0
        while first < len(buffers) and seen + perms[first][1] <= skip:
            seen += perms[first][1]
            first += 1
        # Once the consumer takes a buffer's first batch, the next buffer is read on a background
        # thread (memory: at most two buffers). Every read happens on that one thread, so a Parquet
        # file is never read by two threads at once.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="logitcache-prefetch") as ahead:
            yield from self._emit(buffers, perms, first, seen, skip, ahead)

    def _emit(self, buffers: list[list[Chunk]], perms: list[tuple[np.ndarray, int]], first: int, seen: int,
              skip: int, ahead: ThreadPoolExecutor) -> Iterator[dict[str, np.ndarray]]:
        carry: dict[str, np.ndarray] | None = None
        pending: Future | None = None
        for b in range(first, len(buffers)):
            parts = (pending or ahead.submit(self.reader.read_many, buffers[b])).result()
            pending = None
            perm, rows = perms[b]
            data = {k: np.concatenate([p[k] for p in parts])[perm] for k in parts[0]}
            if seen < skip:
                data = {k: v[skip - seen:] for k, v in data.items()}
            seen += rows
            if carry is not None:
                data = {k: np.concatenate([carry[k], v]) for k, v in data.items()}
            n = len(data["sample_id"])
            full = n - n % self.batch_size
            for i in range(0, full, self.batch_size):
                yield {k: v[i:i + self.batch_size] for k, v in data.items()}
                if pending is None and b + 1 < len(buffers):
                    pending = ahead.submit(self.reader.read_many, buffers[b + 1])
            carry = {k: v[full:] for k, v in data.items()} if full < n else None
        if carry is not None:
            yield carry
