"""The soft-target cache: encodings, shard writers and readers for Zarr v3 and Parquet, the manifest.

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

import functools
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import CacheError, ConfigError
from pipeline.core.io import (
    whole_tree_digest,
)
from pipeline.format.columns import ROW_COLUMNS, VIEW_COLUMNS, Chunk, stored_columns, view_column_names
from pipeline.format.encodings import Encoding, encoding_from_spec
from pipeline.format.manifest import READABLE_VERSIONS, read_manifest, shard_problems


@functools.cache
def _decoders() -> dict[str, Any]:
    """The codecs of the fast Zarr path by their zarr.json name; either decodes any frame of its kind."""
    from numcodecs.blosc import Blosc
    from numcodecs.zstd import Zstd

    return {"zstd": Zstd(), "blosc": Blosc()}


@dataclass(frozen=True)
class FastColumn:
    """How to read one column's chunk j of a plain Zarr v3 shard: the file prefix + j + suffix,
    decoded by `codec` into (chunk_rows, *tail) of `dtype`; a chunk with no file holds `fill`."""
    dtype: np.dtype
    tail: tuple[int, ...]
    prefix: str
    suffix: str
    codec: Any
    fill: int | float

    def file(self, j: int) -> str:
        """The path of the column's chunk j."""
        return f"{self.prefix}{j}{self.suffix}"


class HandleLRU:
    """At most `capacity` open shard handles, least recently used dropped first (a dropped handle
    closes its file once no reader still holds it), so a cache of any shard count reads under the
    common `ulimit -n`. Callers hold the reader's lock."""

    def __init__(self, capacity: int) -> None:
        from collections import OrderedDict

        self.capacity = max(1, capacity)
        self._items: OrderedDict[int, Any] = OrderedDict()

    def __contains__(self, key: int) -> bool:
        return key in self._items

    def __getitem__(self, key: int) -> Any:
        self._items.move_to_end(key)
        return self._items[key]

    def __setitem__(self, key: int, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def env_count(name: str, default: int) -> int:
    """A whole number >= 0 from the environment variable `name`, or `default` when it is unset."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit():
        raise ConfigError(f"{name}={value!r}: set it to a whole number >= 0, or unset it")
    return int(value)


def default_max_open() -> int:
    return env_count("LOGITCACHE_MAX_OPEN_SHARDS", 64)


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
    return env_count("LOGITCACHE_READ_THREADS", spare if spare >= 2 else 0)


class CacheReader:
    """Read a complete cache chunk by chunk; chunks are the unit of shuffling and I/O.

    Every shard listed must exist (a stat each, on open), and each shard is checked against the
    manifest's sha256 the first time this reader opens it (`_verify_once`; `checksums=False` skips
    that); `verify=True` checks every shard up front. At most `max_open` shard files are open
    at once (LOGITCACHE_MAX_OPEN_SHARDS, default 64). `read_many` and `read_joined` decode chunks
    on `read_threads` threads (default_read_threads: none on 2 cores)."""

    def __init__(self, cache_dir: Path, verify: bool = False, checksums: bool = True,
                 max_open: int | None = None, read_threads: int | None = None) -> None:
        manifest = read_manifest(cache_dir)
        if manifest is None or manifest.get("status") != "complete":
            raise CacheError(f"{cache_dir}: cache is incomplete (no complete manifest.json); "
                             "rerun `logitcache cache CONFIG` to finish it")
        if manifest.get("format_version") not in READABLE_VERSIONS:
            raise CacheError(f"{cache_dir}: cache format {manifest.get('format_version')} is not one of "
                             f"{READABLE_VERSIONS}; rebuild it with this version of logitcache")
        self.dir = cache_dir
        self.manifest = manifest
        spec = manifest["spec"]
        self.encoding: Encoding = encoding_from_spec(spec)
        self.token_rows = "seq_len" in spec["dataset"]
        views = view_column_names(spec, cache_dir)
        self.names = [c.name for c in stored_columns(self.encoding, self.token_rows, views)]
        self.chunk_rows: int = spec["layout"]["chunk_rows"]
        self.shards = manifest["shards"]
        self._handles = HandleLRU(max_open if max_open is not None else default_max_open())
        self._layouts = HandleLRU(4096)  # per Zarr shard: how to read its chunk files directly, or None
        self._pools: dict[int, Any] = {}  # by size: reads use read_threads, verify() up to 4
        self.read_threads = default_read_threads() if read_threads is None else read_threads
        self._lock = threading.Lock()
        self.backend = spec["layout"]["backend"]
        self._checksums = checksums
        self._verified: set[int] = set()
        self._verifying: dict[int, threading.Lock] = {}
        gone = shard_problems(cache_dir, self.shards, hash_them=False)["missing"]
        if gone:
            raise CacheError(f"{cache_dir / gone[0]}: shard listed in the manifest is missing ({len(gone)} of "
                             f"{len(self.shards)} missing); rerun `logitcache cache CONFIG` to recompute it")
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

    def verify(self) -> None:
        """Check every shard now (on the read threads: hashing releases the GIL); the first problem
        in manifest order is raised."""
        self._map(self._verify_once, list(range(len(self.shards))), min(4, usable_cores()))

    def _verify_once(self, i: int) -> None:
        """Check shard i against the manifest's sha256, once per reader. The digest is remembered per
        machine while every file of the shard keeps its size, mtime and inode (pipeline/io.py), so
        the first reader on a machine reads the shard to hash it and later ones only stat it: a
        shard replaced, truncated, copied over or rewritten is hashed again."""
        if i in self._verified:
            return
        with self._lock:  # one lock per shard: shards are hashed concurrently (hashlib releases the GIL)
            mine = self._verifying.setdefault(i, threading.Lock())
        with mine:
            if i not in self._verified:
                self._verify(i)

    def _verify(self, i: int) -> None:
        e = self.shards[i]
        path = self.dir / e["path"]
        try:
            digest = whole_tree_digest(path)
        except OSError as err:
            raise CacheError(f"{path}: cannot read the shard ({err.strerror}); rerun `logitcache cache CONFIG` "
                             "to recompute it") from None
        if digest != e["sha256"]:
            raise CacheError(f"{path}: checksum mismatch, the shard is corrupt; delete it and rerun "
                             "`logitcache cache CONFIG`")
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
        entry = self.shards[chunk.shard]
        path = self.dir / entry["path"]
        if path.suffix == ".zarr":
            stored = self._read_chunk_fast(chunk, path)
            if stored is None:  # anything unusual (sharding, other codecs, missing chunk files): zarr
                arrays = self._handle(chunk.shard, path)
                stored = {name: arrays[name][chunk.start:chunk.stop] for name in self.names}
            return self.decode(stored) if decode else stored
        return self._read_parquet([chunk], decode)[0]

    def _read_parquet(self, chunks: list[Chunk], decode: bool = True) -> list[dict[str, np.ndarray]]:
        """Parquet chunks (row groups) in order: each shard's row groups in one read_row_groups call
        of all columns, on pyarrow's threads when there are several (a single small row group
        costs more in handoff than it saves), then cut into chunks without copying."""
        import pyarrow as pa

        by_shard: dict[int, list[Chunk]] = {}
        for c in chunks:
            by_shard.setdefault(c.shard, []).append(c)
        got: dict[Chunk, dict[str, np.ndarray]] = {}
        for s, group in by_shard.items():
            handle = self._handle(s, self.dir / self.shards[s]["path"])
            table = handle.read_row_groups([c.index for c in group], columns=self.names, use_threads=len(group) > 1)
            first = 0
            for c in group:
                out = {}
                for name, col in zip(self.names, table.slice(first, c.stop - c.start).columns):
                    arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
                    if pa.types.is_fixed_size_list(arr.type):  # flatten: the slice's values, not the whole page's
                        out[name] = arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)
                    else:
                        out[name] = arr.to_numpy(zero_copy_only=False)
                got[c] = self.decode(out) if decode else out
                first += c.stop - c.start
        return [got[c] for c in chunks]

    def _read_chunk_fast(self, chunk: Chunk, path: Path) -> dict[str, np.ndarray] | None:
        """One chunk of every column of a plain Zarr v3 shard (regular chunks of the reader's rows,
        bytes + zstd or blosc codecs), read file by file with the codec directly, bypassing zarr's
        async machinery (~1 ms per array read against ~0.2 ms of decoding). None when the shard is
        anything else; the caller then reads through zarr."""
        layout = self._fast_layout(chunk.shard, path)
        if layout is None or chunk.start % self.chunk_rows:
            return None
        out = {name: np.empty((chunk.stop - chunk.start, *col.tail), col.dtype) for name, col in layout.items()}
        self._decode_into(chunk, layout, out, 0)
        return out

    def _decode_into(self, chunk: Chunk, layout: dict[str, FastColumn], out: dict[str, np.ndarray], at: int) -> None:
        """Decode every column of a whole chunk into out[name][at:at + rows], each chunk file with one
        read."""
        j = chunk.start // self.chunk_rows
        rows = chunk.stop - chunk.start
        for name, col in layout.items():
            try:
                with open(col.file(j), "rb", buffering=0) as f:
                    raw = f.read()
            except FileNotFoundError:  # zarr writes no chunk that is all fill value
                out[name][at:at + rows] = col.fill
                continue
            if rows == self.chunk_rows:
                col.codec.decode(raw, out=out[name][at:at + rows])
            else:  # a shard's last chunk is stored full size
                full = np.empty((self.chunk_rows, *col.tail), dtype=col.dtype)
                col.codec.decode(raw, out=full)
                out[name][at:at + rows] = full[:rows]

    def is_whole_chunk(self, r: Chunk) -> bool:
        """Whether rows [r.start, r.stop) of shard r.shard are exactly one of its chunks."""
        return r.start % self.chunk_rows == 0 and r.stop == min(r.start + self.chunk_rows, self.shards[r.shard]["rows"])

    def read_joined(self, chunks: list[Chunk]) -> dict[str, np.ndarray]:
        """The stored columns of whole chunks, joined in order into one array per column: what a
        shuffle buffer holds. On the fast Zarr path each chunk is decoded straight into its rows:
        no per-chunk arrays, and no second copy to join them."""
        if not chunks or not all(map(self.is_whole_chunk, chunks)):
            raise ValueError("read_joined reads one or more whole chunks; read_rows reads any ranges")
        chunks = [Chunk(c.shard, c.start // self.chunk_rows, c.start, c.stop) for c in chunks]  # index from the rows
        shards = sorted({c.shard for c in chunks})
        found = self._map(lambda s: self._fast_layout(s, self.dir / self.shards[s]["path"]) if self.backend == "zarr"
                          else None, shards)  # hashes shards met for the first time, on the read threads
        layouts = dict(zip(shards, found))

        def shape(lay: dict[str, FastColumn] | None) -> list[tuple[str, np.dtype, tuple[int, ...]]] | None:
            return None if lay is None else [(n, c.dtype, c.tail) for n, c in lay.items()]

        first = layouts[chunks[0].shard]
        if first is None or any(shape(lay) != shape(first) for lay in found):
            parts = self.read_many(chunks, decode=False)
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        at = np.concatenate([[0], np.cumsum([c.stop - c.start for c in chunks])]).tolist()
        out = {name: np.empty((at[-1], *col.tail), col.dtype) for name, col in first.items()}
        self._map(lambda i: self._decode_into(chunks[i], layouts[chunks[i].shard], out, at[i]),
                  list(range(len(chunks))))
        return out

    def _fast_layout(self, i: int, path: Path) -> dict[str, FastColumn] | None:
        with self._lock:
            if i in self._layouts:
                return self._layouts[i]
        if self._checksums:
            self._verify_once(i)
        layout: dict[str, FastColumn] | None = {}
        for name in self.names:
            try:
                meta = json.loads((path / name / "zarr.json").read_text())
                codecs = meta["codecs"]
                dtype = np.dtype(meta["data_type"])
                plain = (meta.get("zarr_format") == 3 and meta["chunk_grid"]["name"] == "regular"
                         and meta["chunk_key_encoding"]["name"] == "default" and not meta.get("storage_transformers")
                         and [c["name"] for c in codecs] in (["bytes", "zstd"], ["bytes", "blosc"])
                         and codecs[0].get("configuration", {}).get("endian", "little") == "little"
                         and dtype.kind in "biuf")
                plain = plain and type(meta.get("fill_value")) in (int, float)  # not NaN, Infinity or bytes
                chunk_shape = meta["chunk_grid"]["configuration"]["chunk_shape"]
                plain = plain and chunk_shape[0] == self.chunk_rows and chunk_shape[1:] == meta["shape"][1:]
            except (OSError, KeyError, TypeError, ValueError, IndexError):
                plain = False
            if not plain:
                layout = None
                break
            sep = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
            tail = tuple(meta["shape"][1:])
            layout[name] = FastColumn(dtype.newbyteorder("<"), tail, f"{path / name}/c{sep}", f"{sep}0" * len(tail),
                                      _decoders()[codecs[1]["name"]], meta["fill_value"])
        with self._lock:
            self._layouts[i] = layout
        return layout

    def decode(self, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows of stored columns (any rows: every stored column is per row) in the encoding's
        natural form, row and view columns unchanged."""
        rows = {name: stored[name] for name in (*ROW_COLUMNS, *VIEW_COLUMNS) if name in stored}
        return {**rows, **self.encoding.decode(stored)}

    def read_many(self, chunks: list[Chunk], decode: bool = True) -> list[dict[str, np.ndarray]]:
        """Read several chunks in order, on the read threads when there are (zstd and pyarrow's
        decoding release the GIL): Zarr chunk by chunk; Parquet shard by shard, since a pyarrow
        ParquetFile is not safe to share between threads (each shard's row groups in one call)."""
        if self.backend != "zarr":
            groups: dict[int, list[Chunk]] = {}
            for c in chunks:
                groups.setdefault(c.shard, []).append(c)
            if len(groups) <= 1:
                return self._read_parquet(chunks, decode)
            parts = self._map(lambda g: self._read_parquet(g, decode), list(groups.values()))
            got = {c: part for g, ps in zip(groups.values(), parts) for c, part in zip(g, ps)}
            return [got[c] for c in chunks]
        return self._map(lambda c: self.read(c, decode), chunks)

    def _map(self, fn: Any, items: list[Any], threads: int | None = None) -> list[Any]:
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

    def _handle(self, i: int, path: Path) -> Any:
        if self._checksums:
            self._verify_once(i)
        with self._lock:
            return self._open(i, path)

    def _open(self, i: int, path: Path) -> Any:
        if i not in self._handles:
            if path.suffix == ".zarr":
                import zarr

                group = zarr.open_group(str(path), mode="r")  # array handles kept: opening one reads metadata
                self._handles[i] = {name: group[name] for name in self.names}
            else:
                import pyarrow.parquet as pq

                self._handles[i] = pq.ParquetFile(path)
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

