"""Reading a complete cache: shards checked once against the manifest, chunks read through the backend.

Layout (docs/cache-format.md):

    <root>/<cache_id>/
      spec.json           what determines the targets (written first)
      configs/<run>.yaml  resolved configs that produced or used this cache
      shards/00000.zarr   one Zarr v3 group per shard (or shards/00000.parquet)
      manifest.json       written last; the cache exists only once it says "complete"

Every shard is written by one writer under a '.tmp-' name, hashed and fsynced in one pass, and
published without replacing (a late duplicate writer discards its own), so a shard is either whole
or absent and never changes once there. Its writer records the sha256 and size in a sidecar
(digests/00000.zarr.json): finalize builds the manifest from these and a stat of each shard,
never re-reading shard data. Shard bytes hold no times or random names: the same inputs give the
same bytes. Readers check every shard against the manifest's sha256 the first time they open it;
the digest is remembered per machine while the shard's files keep their size, mtime and inode.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import CacheError, ConfigError
from pipeline.core.io import out_of_handles, whole_tree_digest
from pipeline.core.validate import env
from pipeline.format.backends import Backend, Reads, backend
from pipeline.format.columns import (
    ALIGN_COLUMNS,
    ROW_COLUMNS,
    VIEW_COLUMNS,
    Chunk,
    aligned,
    stored_columns,
    view_column_names,
)
from pipeline.format.encodings import Encoding, encoding_from_spec
from pipeline.format.lru import HandleLRU
from pipeline.format.manifest import READABLE_VERSIONS, read_manifest, shard_problems
from pipeline.format.shards import mismatch


def default_max_open() -> int:
    return int(env("LOGITCACHE_MAX_OPEN_SHARDS"))


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (a Slurm allocation or a cpuset, not the whole
    machine; a CPU quota such as `docker --cpus` does not show here)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_read_threads() -> int:
    """Threads that read and decode chunks concurrently, besides the caller's (0 or 1: chunks are
    read in the calling thread). One core is left to the consumer (the training step, or the loader's
    batch decoding), at most 4. On 2 cores that leaves none worth a pool: there 4 read threads
    cost more CPU for the same chunks than reading on the loader's background thread, and the epoch
    was no faster (bench/reader.py, `read_threads_4`). LOGITCACHE_READ_THREADS overrides it."""
    spare = min(4, usable_cores() - 1)
    threads = env("LOGITCACHE_READ_THREADS")
    return int(threads) if threads is not None else spare if spare >= 2 else 0


class CacheReader:
    """Read a complete cache chunk by chunk; chunks are the unit of shuffling and I/O.

    Every shard listed must exist (a stat each, on open), and each shard is checked against the
    manifest's sha256 the first time this reader opens it (`verify_shard`; `checksums=False` skips
    that); `verify=True` checks every shard up front. At most `max_open` shard files are open
    at once (LOGITCACHE_MAX_OPEN_SHARDS, default 64). Chunks are read through the cache's shard
    backend (pipeline/format/backends), on `read_threads` threads (default_read_threads: none on
    2 cores)."""

    def __init__(self, cache_dir: Path, verify: bool = False, checksums: bool = True,
                 max_open: int | None = None, read_threads: int | None = None, remote: Any = None,
                 manifest: dict[str, Any] | None = None, base: Path | None = None, alignment: bool = False,
                 columns: Sequence[str] | None = None) -> None:
        """`manifest` and `base`: read those shards (paths under `base`, the directory of a member
        store) as cache `cache_dir` (pipeline/format/members.py); by default the cache's own.
        `alignment`: read the alignment columns too (a cache that stores them; a student with the
        teachers' own tokenizer never needs them). `columns`: read only these of the stored columns
        (then read with decode=False)."""
        manifest = manifest if manifest is not None else read_manifest(cache_dir)
        if manifest is None or manifest.get("status") != "complete":
            raise CacheError(f"{cache_dir}: cache is incomplete (no complete manifest.json); "
                             "rerun `logitcache cache CONFIG` to finish it")
        if manifest.get("format_version") not in READABLE_VERSIONS:
            raise CacheError(f"{cache_dir}: cache format {manifest.get('format_version')} is not one of "
                             f"{READABLE_VERSIONS}; rebuild it with this version of logitcache")
        self.dir = cache_dir
        self.base = base if base is not None else cache_dir  # where the shards' paths lie
        self.manifest = manifest
        spec = manifest["spec"]
        self.encoding: Encoding = encoding_from_spec(spec)
        self.token_rows = "seq_len" in spec["dataset"] or spec["dataset"].get("keyed") == "document"
        self.keyed_by_document = spec["dataset"].get("keyed") == "document"
        views = view_column_names(spec, cache_dir)
        self.aligned = aligned(spec)  # stores what a student with another tokenizer aligns by
        if alignment and not self.aligned:
            raise CacheError(f"{cache_dir}: cache holds no token spans (made from pre-tokenized or chat data, or "
                             "before logitcache stored them); a student with another tokenizer needs a cache of a text "
                             "corpus made by this version: `logitcache cache CONFIG`")
        self.names = [c.name for c in stored_columns(self.encoding, self.token_rows, views, alignment)]
        if columns is not None:
            self.names = [n for n in self.names if n in columns]
        self.chunk_rows: int = spec["layout"]["chunk_rows"]
        self.shards = manifest["shards"]
        self.backend: str = spec["layout"]["backend"]
        self._store: Backend = backend(self.backend, cache_dir / "manifest.json")
        self._handles = HandleLRU(max_open if max_open is not None else default_max_open())
        self._pools: dict[int, Any] = {}  # by size: reads use read_threads, verify() up to 4
        self.read_threads = default_read_threads() if read_threads is None else read_threads
        self._lock = threading.Lock()
        self._checksums = checksums
        self._verified: set[int] = set()
        self._verifying: dict[int, threading.Lock] = {}
        self.remote = remote  # a cache in object storage: its ShardCache (pipeline/format/remote.py)
        gone = [] if remote is not None else shard_problems(self.base, self.shards, hash_them=False)["missing"]
        if gone:
            raise CacheError(f"{self.base / gone[0]}: shard listed in the manifest is missing ({len(gone)} of "
                             f"{len(self.shards)} missing); rerun `logitcache cache CONFIG` to recompute it")
        self._reads: Reads = self._store.reads(self)
        if verify:
            self.verify()

    @property
    def num_classes(self) -> int:
        return self.encoding.num_classes

    @property
    def temperature(self) -> float:
        return float(self.manifest["spec"]["temperature"])

    @property
    def dataset_fingerprint(self) -> str:
        return self.manifest["spec"]["dataset"]["fingerprint"]

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    def shard_path(self, i: int) -> Path:
        return self.base / self.shards[i]["path"]

    def verify(self) -> None:
        """Check every shard now (on the read threads: hashing releases the GIL); the first problem
        in manifest order is raised. A cache in object storage is checked shard by shard as each is
        downloaded, so the shard cache's size limit holds."""
        if self.remote is not None:
            for i in range(len(self.shards)):
                self._present([i], read=True)
                self._verify_once(i)
            self.remote.release()
            return
        self.map(self._verify_once, list(range(len(self.shards))), min(4, usable_cores()))

    def verify_shard(self, i: int) -> None:
        """Check shard i before it is first read, unless the reader was opened with checksums=False."""
        self._present([i])
        if self._checksums:
            self._verify_once(i)

    def _present(self, shards: Any, read: bool = False) -> None:
        """A remote cache's shards on the local disk and pinned (kept from eviction) until the next
        read starts; a shard just downloaded was checked on the way."""
        if self.remote is not None:
            if read:
                self.remote.release()
            for i in sorted(set(shards)):
                if self.remote.fetch(i):
                    self._verified.add(i)

    def _verify_once(self, i: int) -> None:
        """Check shard i against the manifest's sha256, once per reader. The digest is remembered per
        machine while every file of the shard keeps its size, mtime and inode (pipeline/core/io.py),
        so the first reader on a machine reads the shard to hash it and later ones only stat it: a
        shard replaced, truncated, copied over or rewritten is hashed again."""
        if i in self._verified:
            return
        with self._lock:  # one lock per shard: shards are hashed concurrently (hashlib releases the GIL)
            mine = self._verifying.setdefault(i, threading.Lock())
        with mine:
            if i not in self._verified:
                self._verify(i)

    def _verify(self, i: int) -> None:
        path = self.shard_path(i)
        if not path.exists():
            raise CacheError(f"{path}: shard listed in the manifest is missing; rerun `logitcache cache CONFIG` "
                             "to recompute it")
        try:
            digest = whole_tree_digest(path)
        except OSError as err:
            self._refuse_out_of_handles(err, path)
            raise CacheError(f"{path}: cannot read the shard ({err.strerror}); rerun `logitcache cache CONFIG` "
                             "to recompute it") from None
        if digest != self.shards[i]["sha256"]:
            raise CacheError(mismatch(path, self.shards[i]["sha256"], digest))
        self._verified.add(i)

    def chunks(self) -> list[Chunk]:
        out = []
        for s, e in enumerate(self.shards):
            for j, start in enumerate(range(0, e["rows"], self.chunk_rows)):
                out.append(Chunk(s, j, start, min(start + self.chunk_rows, e["rows"])))
        return out

    def read(self, chunk: Chunk, decode: bool = True) -> dict[str, np.ndarray]:
        """One chunk's rows: sample_id (position) and the targets decoded to the encoding's natural
        form, or with decode=False the stored columns as stored (narrow; `decode` them later)."""
        return self.read_many([chunk], decode)[0]

    def read_many(self, chunks: list[Chunk], decode: bool = True) -> list[dict[str, np.ndarray]]:
        """Several chunks in order, on the read threads when there are (zstd and pyarrow's decoding
        release the GIL); how they are split between threads is the backend's."""
        self._present((c.shard for c in chunks), read=True)
        try:
            return self._reads.read_many(chunks, decode)
        except OSError as err:
            self._refuse_out_of_handles(err, self.shard_path(chunks[0].shard))
            raise

    def is_whole_chunk(self, r: Chunk) -> bool:
        """Whether rows [r.start, r.stop) of shard r.shard are exactly one of its chunks."""
        return r.start % self.chunk_rows == 0 and r.stop == min(r.start + self.chunk_rows, self.shards[r.shard]["rows"])

    def read_joined(self, chunks: list[Chunk]) -> dict[str, np.ndarray]:
        """The stored columns of whole chunks, joined in order into one array per column: what a
        shuffle buffer holds. A backend that can decodes each chunk straight into its rows (no
        per-chunk arrays, no second copy to join them); otherwise chunks are read, then joined."""
        if not chunks or not all(map(self.is_whole_chunk, chunks)):
            raise ValueError("read_joined reads one or more whole chunks; read_rows reads any ranges")
        chunks = [Chunk(c.shard, c.start // self.chunk_rows, c.start, c.stop) for c in chunks]  # index from the rows
        self._present((c.shard for c in chunks), read=True)
        try:
            joined = self._reads.read_joined(chunks)
        except OSError as err:
            self._refuse_out_of_handles(err, self.shard_path(chunks[0].shard))
            raise
        if joined is not None:
            return joined
        parts = self.read_many(chunks, decode=False)
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def decode(self, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows of stored columns (any rows: every stored column is per row) in the encoding's
        natural form, row and view columns unchanged."""
        rows = {name: stored[name] for name in (*ROW_COLUMNS, *ALIGN_COLUMNS, *VIEW_COLUMNS) if name in stored}
        return {**rows, **self.encoding.decode(stored)}

    def map(self, fn: Any, items: list[Any], threads: int | None = None) -> list[Any]:
        """fn over items in order, on exactly `threads` pool threads (default: the reader's
        read_threads; 0 or 1: in this thread)."""
        threads = self.read_threads if threads is None else threads
        if threads < 2 or len(items) < 2:
            return [fn(item) for item in items]
        with self._lock:
            pool = self._pools.get(threads)
            if pool is None:
                from concurrent.futures import ThreadPoolExecutor

                pool = self._pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="logitcache-read")
        return list(pool.map(fn, items))

    def read_all(self) -> dict[str, np.ndarray]:
        parts = self.read_many(self.chunks())
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _refuse_out_of_handles(self, err: OSError, path: Path) -> None:
        """Running out of file handles is said as such: the shard is not damaged, recomputing it helps nothing."""
        why = out_of_handles(err)
        if why is not None:
            raise ConfigError(f"{path}: cannot open the shard: {why}; this reader keeps up to {self._handles.capacity} "
                              "shard files open, so lower LOGITCACHE_MAX_OPEN_SHARDS or raise the limit (ulimit -n); "
                              "the shard itself is fine") from None

    def handle(self, i: int) -> Any:
        """Shard i opened by its backend (checked first), kept among the `max_open` most recent."""
        self.verify_shard(i)
        with self._lock:
            if i not in self._handles:
                self._handles[i] = self._store.open(self.shard_path(i), self.names)
            return self._handles[i]


def read_ranges(reader: CacheReader, ranges: list[Chunk], decode: bool = True) -> list[dict[str, np.ndarray]]:
    """Rows [start, stop) of each range (within its shard), reading every chunk that covers them once;
    a range that is a whole chunk is read as that chunk. decode=False keeps the stored columns."""
    cr = reader.chunk_rows
    wanted: dict[tuple[int, int], Chunk] = {}
    for r in ranges:
        rows = reader.shards[r.shard]["rows"]
        for j in range(r.start // cr, (r.stop - 1) // cr + 1):
            wanted.setdefault((r.shard, j), Chunk(r.shard, j, j * cr, min((j + 1) * cr, rows)))
    got = dict(zip(wanted, reader.read_many(list(wanted.values()), decode)))
    out = []
    for r in ranges:
        first = r.start // cr
        parts = [got[(r.shard, j)] for j in range(first, (r.stop - 1) // cr + 1)]
        data = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        lo = r.start - first * cr
        out.append({k: v[lo:lo + r.stop - r.start] for k, v in data.items()})
    return out


def read_rows(reader: CacheReader, ranges: list[Chunk], decode: bool = True) -> dict[str, np.ndarray]:
    """The rows of the ranges, joined in order into one array per column. When every range is a
    whole chunk (a plain epoch's buffer) the reader decodes them straight into place; otherwise
    the chunks that cover the ranges are read once, cut and joined. decode=False keeps the stored
    columns."""
    if all(map(reader.is_whole_chunk, ranges)):
        rows = reader.read_joined(ranges)
    else:
        parts = read_ranges(reader, ranges, False)
        rows = {k: np.concatenate([p.pop(k) for p in parts]) for k in list(parts[0])}  # parts freed as joined
    return reader.decode(rows) if decode else rows



def read_global(reader: CacheReader, ranges: list[tuple[int, int]], decode: bool = True) -> dict[str, np.ndarray]:
    """Rows [lo, hi) of the whole cache (rows numbered across shards in shard order) for each
    range, joined in order; a range may span shards."""
    firsts = np.cumsum([0] + [e["rows"] for e in reader.shards])
    chunks = []
    for lo, hi in ranges:
        s = int(np.searchsorted(firsts, lo, side="right")) - 1
        while lo < hi:
            end = min(hi, int(firsts[s + 1]))
            a = lo - int(firsts[s])
            chunks.append(Chunk(s, a // reader.chunk_rows, a, end - int(firsts[s])))
            lo, s = end, s + 1
    return read_rows(reader, chunks, decode)
