"""The soft-target cache: encodings, shard writers and readers for Zarr v3 and Parquet, the manifest.

Layout (see README "Cache format"):

    <root>/<cache_id>/
      spec.json           what determines the targets (written first)
      configs/<run>.yaml  resolved configs that produced or used this cache
      shards/00000.zarr   one Zarr v3 group per shard (or shards/00000.parquet)
      manifest.json       written last; the cache exists only once it says "complete"

Every shard is written by one writer under a '.tmp-' name and renamed into place, so a shard is
either whole or absent. Shard bytes hold no times or random names: the same inputs give the same
bytes, and the manifest records each shard's sha256.
"""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.encodings import Column, Encoding, encoding_from_spec
from pipeline.errors import CacheError
from pipeline.io import (
    atomic_write_json,
    hash_json,
    publish_dir,
    remove_dead_tmp,
    sha256_tree,
    tmp_name,
)

FORMAT_VERSION = 2  # 2: encoding objects, ids at the vocabulary's width, hybrid; 1 is still read
READABLE_VERSIONS = (1, 2)

ROW_COLUMNS = {
    "sample_id": Column("sample_id", ("row",), "int64 id of the input row these targets belong to; joins the cache "
                        "to the dataset"),
    "position": Column("position", ("row",), "position of the token within its sequence; rows of a sequence are "
                       "contiguous"),
}
OFFSETS = Column("offsets", ("sequence",), "first row of each sequence in this shard, plus the row count, "
                 "(sequences + 1,)")


def stored_columns(enc: Encoding, token_rows: bool) -> list[Column]:
    """Every per-row column of a shard, in order: sample_id (and position for tokens), then targets."""
    base = [ROW_COLUMNS["sample_id"], ROW_COLUMNS["position"]] if token_rows else [ROW_COLUMNS["sample_id"]]
    return base + enc.columns()


# ---------------------------------------------------------------------------------------------
# Identity


def cache_id(spec: dict[str, Any]) -> str:
    return hash_json(spec)[:16]


def target_id(spec: dict[str, Any]) -> str:
    """Hash of what determines the targets only (not backend or shard layout)."""
    return hash_json({k: v for k, v in spec.items() if k != "layout"})[:16]


# ---------------------------------------------------------------------------------------------
# Writing


def planned(spec: dict[str, Any]) -> tuple[int, int]:
    """(shards, rows) of a cache's plan; language-model rows are tokens, shards hold whole sequences."""
    per_item = spec["dataset"].get("seq_len", 1)
    items, per_shard = spec["dataset"]["rows"], spec["layout"]["rows_per_shard"] // per_item
    return -(-items // per_shard), items * per_item


def shard_name(index: int, backend: str) -> str:
    return f"{index:05d}.{'zarr' if backend == 'zarr' else 'parquet'}"


def write_shard(path: Path, arrays: dict[str, np.ndarray], attrs: dict[str, Any], enc: Encoding,
                chunk_rows: int, level: int) -> None:
    """Write one shard to a temporary name and rename it to `path` (one writer per shard).

    `arrays` holds the stored columns: sample_id (and position, offsets for tokens) and the
    encoding's columns as `enc.to_host` returns them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = stored_columns(enc, "position" in arrays)
    tmp = tmp_name(path)
    try:
        if path.suffix == ".zarr":
            _write_zarr(tmp, arrays, attrs, columns, chunk_rows, level)
            publish_dir(tmp, path)
        else:
            _write_parquet(tmp, arrays, attrs, columns, chunk_rows, level)
            tmp.replace(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


def _write_zarr(tmp: Path, arrays: dict[str, np.ndarray], attrs: dict[str, Any], columns: list[Column],
                chunk_rows: int, level: int) -> None:
    import zarr
    from zarr.codecs import ZstdCodec

    group = zarr.open_group(str(tmp), mode="w", zarr_format=3, attributes={"logitcache": attrs})
    for col in columns + ([OFFSETS] if "offsets" in arrays else []):
        data = arrays[col.name]
        arr = group.create_array(
            col.name, shape=data.shape, dtype=data.dtype, chunks=(chunk_rows, *data.shape[1:]),
            compressors=ZstdCodec(level=level), dimension_names=col.dims,
            attributes={"description": col.description},
        )
        arr[...] = data


def _write_parquet(tmp: Path, arrays: dict[str, np.ndarray], attrs: dict[str, Any], columns: list[Column],
                   chunk_rows: int, level: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols, fields, encodings = [], [], {}
    for c in columns:
        name, data = c.name, arrays[c.name]
        if data.ndim == 2:
            col = pa.FixedSizeListArray.from_arrays(pa.array(data.ravel()), data.shape[1])
            encodings[name] = "BYTE_STREAM_SPLIT" if data.dtype.kind == "f" else "PLAIN"
        else:
            col = pa.array(data)
            encodings[name] = "DELTA_BINARY_PACKED" if data.dtype.kind in "iu" else "BYTE_STREAM_SPLIT"
        cols.append(col)
        fields.append(pa.field(name, col.type, nullable=False, metadata={"description": c.description}))
    if "offsets" in arrays:  # per sequence, not per row: kept in the metadata
        attrs = {**attrs, "offsets": arrays["offsets"].tolist()}
    schema = pa.schema(fields, metadata={"logitcache": json.dumps(attrs, sort_keys=True)})
    table = pa.Table.from_arrays(cols, schema=schema)
    # dictionary encoding halves read speed on float data (measured); statistics are useless here
    pq.write_table(table, tmp, row_group_size=chunk_rows, compression="zstd", compression_level=level,
                   use_dictionary=False, column_encoding=encodings, write_statistics=False)


def shard_entry(cache_dir: Path, index: int, backend: str, first_row: int, rows: int) -> dict[str, Any]:
    rel = f"shards/{shard_name(index, backend)}"
    digest, nbytes = sha256_tree(cache_dir / rel)
    return {"index": index, "path": rel, "first_row": first_row, "rows": rows, "sha256": digest, "bytes": nbytes}


def write_manifest(cache_dir: Path, spec: dict[str, Any], entries: list[dict[str, Any]], extra: dict[str, Any]) -> dict:
    import datetime

    rows = sum(e["rows"] for e in entries)
    nbytes = sum(e["bytes"] for e in entries)
    manifest = {
        "status": "complete",
        "format_version": FORMAT_VERSION,
        "cache_id": cache_dir.name,
        "target_id": target_id(spec),
        "created_by": f"logitcache {__version__}",
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
        "bytes": nbytes,
        "bytes_per_row": round(nbytes / max(rows, 1), 2),
        "shards": entries,
        "spec": spec,
        **extra,
    }
    remove_dead_tmp(cache_dir / "shards")  # from killed writers; never read as data
    atomic_write_json(cache_dir / "manifest.json", manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# Reading


def resolve(ref: str | Path, root: Path) -> Path:
    """A cache directory from a path, an id, or a unique id prefix under `root`."""
    p = Path(ref)
    if (p / "spec.json").is_file() or (p / "manifest.json").is_file():
        return p
    if (root / str(ref)).is_dir():
        return root / str(ref)
    matches = sorted(d for d in root.glob(f"{ref}*") if d.is_dir()) if root.is_dir() else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise CacheError(f"cache {ref!r} matches {len(matches)} caches under {root}; give more of the id")
    raise CacheError(f"cache {ref!r}: no such cache directory or id under {root}; "
                     "list caches with `logitcache caches ls`")


def read_manifest(cache_dir: Path) -> dict[str, Any] | None:
    path = cache_dir / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CacheError(f"{path}: not valid JSON; delete the cache directory and rerun `logitcache cache`") from None


@dataclass(frozen=True)
class Chunk:
    shard: int  # position in the manifest's shard list
    index: int  # chunk within the shard
    start: int  # first row within the shard
    stop: int


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


def default_max_open() -> int:
    import os

    return int(os.environ.get("LOGITCACHE_MAX_OPEN_SHARDS", "64"))


class CacheReader:
    """Read a complete cache chunk by chunk; chunks are the unit of shuffling and I/O.

    At most `max_open` shard files are open at once (LOGITCACHE_MAX_OPEN_SHARDS, default 64)."""

    def __init__(self, cache_dir: Path, verify: bool = False, max_open: int | None = None) -> None:
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
        self.names = [c.name for c in stored_columns(self.encoding, self.token_rows)]
        self.chunk_rows: int = spec["layout"]["chunk_rows"]
        self.shards = manifest["shards"]
        self._handles = HandleLRU(max_open if max_open is not None else default_max_open())
        self._layouts = HandleLRU(4096)  # per Zarr shard: how to read its chunk files directly, or None
        self._pool: Any = None
        self._lock = threading.Lock()
        self.backend = spec["layout"]["backend"]
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
        for e in self.shards:
            digest, _ = sha256_tree(self.dir / e["path"])
            if digest != e["sha256"]:
                raise CacheError(f"{self.dir / e['path']}: checksum mismatch, the shard is corrupt; "
                                 "delete it and rerun `logitcache cache CONFIG`")

    def chunks(self) -> list[Chunk]:
        out = []
        for s, e in enumerate(self.shards):
            for j, start in enumerate(range(0, e["rows"], self.chunk_rows)):
                out.append(Chunk(s, j, start, min(start + self.chunk_rows, e["rows"])))
        return out

    def read(self, chunk: Chunk) -> dict[str, np.ndarray]:
        """One chunk's rows: sample_id (position) and the targets decoded to the encoding's natural form."""
        entry = self.shards[chunk.shard]
        path = self.dir / entry["path"]
        if path.suffix == ".zarr":
            stored = self._read_chunk_fast(chunk, path)
            if stored is None:  # anything unusual (sharding, other codecs, missing chunk files): zarr
                arrays = self._handle(chunk.shard, path)
                stored = {name: arrays[name][chunk.start:chunk.stop] for name in self.names}
            return self._decode(stored)
        import pyarrow as pa

        # all columns of the row group in one call, single-threaded: the loader reads ahead on its
        # own thread, and pyarrow's thread pool costs more than it saves on one small row group
        table = self._handle(chunk.shard, path).read_row_group(chunk.index, columns=self.names, use_threads=False)
        out = {}
        for name, col in zip(self.names, table.columns):
            arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
            if pa.types.is_fixed_size_list(arr.type):
                out[name] = arr.values.to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)
            else:
                out[name] = arr.to_numpy(zero_copy_only=False)
        return self._decode(out)

    def _read_chunk_fast(self, chunk: Chunk, path: Path) -> dict[str, np.ndarray] | None:
        """One chunk of every column of a plain Zarr v3 shard (regular chunks of the reader's rows,
        bytes + zstd codecs): each chunk file read with one read and decoded by zstd straight into
        its array, bypassing zarr's async machinery (~1 ms per array read against ~0.2 ms of
        decoding). None when the shard is anything else; the caller then reads through zarr."""
        layout = self._fast_layout(chunk.shard, path)
        if layout is None or chunk.start % self.chunk_rows:
            return None
        from numcodecs.zstd import Zstd

        codec = Zstd()
        j = chunk.start // self.chunk_rows
        out = {}
        for name, (dtype, tail, sep) in layout.items():
            key = sep.join(["c", str(j), *("0" * len(tail))])
            try:
                with open(path / name / key, "rb", buffering=0) as f:
                    raw = f.read()
            except FileNotFoundError:  # never written: zarr fills it with the fill value
                return None
            full = np.empty((self.chunk_rows, *tail), dtype=dtype)  # edge chunks are stored full size
            codec.decode(raw, out=full)
            out[name] = full[: chunk.stop - chunk.start]
        return out

    def _fast_layout(self, i: int, path: Path) -> dict[str, tuple[np.dtype, tuple[int, ...], str]] | None:
        with self._lock:
            if i in self._layouts:
                return self._layouts[i]
        self._handle(i, path)  # the first open goes through zarr (and whatever _open checks)
        layout: dict[str, tuple[np.dtype, tuple[int, ...], str]] | None = {}
        for name in self.names:
            try:
                meta = json.loads((path / name / "zarr.json").read_text())
                codecs = meta["codecs"]
                dtype = np.dtype(meta["data_type"])
                plain = (meta.get("zarr_format") == 3 and meta["chunk_grid"]["name"] == "regular"
                         and meta["chunk_key_encoding"]["name"] == "default" and not meta.get("storage_transformers")
                         and [c["name"] for c in codecs] == ["bytes", "zstd"]
                         and codecs[0].get("configuration", {}).get("endian", "little") == "little"
                         and dtype.kind in "biuf")
                chunk_shape = meta["chunk_grid"]["configuration"]["chunk_shape"]
                plain = plain and chunk_shape[0] == self.chunk_rows and chunk_shape[1:] == meta["shape"][1:]
            except (OSError, KeyError, TypeError, ValueError, IndexError):
                plain = False
            if not plain:
                layout = None
                break
            sep = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
            layout[name] = (dtype.newbyteorder("<"), tuple(meta["shape"][1:]), sep)
        with self._lock:
            self._layouts[i] = layout
        return layout

    def _decode(self, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = {name: stored[name] for name in ROW_COLUMNS if name in stored}
        return {**rows, **self.encoding.decode(stored)}

    def read_many(self, chunks: list[Chunk]) -> list[dict[str, np.ndarray]]:
        """Read several chunks in order; Zarr chunks concurrently (zarr's per-read overhead and zstd
        release the GIL). A pyarrow ParquetFile is not safe to share between threads, and its reads
        are multi-threaded already, so Parquet reads stay sequential."""
        if len(chunks) <= 1 or self.backend != "zarr":
            return [self.read(c) for c in chunks]
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="logitcache-read")
        return list(self._pool.map(self.read, chunks))

    def read_all(self) -> dict[str, np.ndarray]:
        parts = self.read_many(self.chunks())
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _handle(self, i: int, path: Path) -> Any:
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
