"""The soft-target cache: encodings, shard writers and readers for Zarr v3 and Parquet, the manifest.

Layout (see README "Cache format"):

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
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.codecs import CODECS, codec_problems
from pipeline.encodings import Column, Encoding, encoding_from_spec
from pipeline.errors import CacheError, ConfigError
from pipeline.io import (
    atomic_write_json,
    fsync_dir,
    hash_json,
    publish_dir,
    publish_file,
    read_json,
    remove_dead_tmp,
    sha256_tree,
    tmp_name,
    tree_size,
    whole_tree_digest,
)

FORMAT_VERSION = 2  # 2: encoding objects, ids at the vocabulary's width, hybrid; 1 is still read
READABLE_VERSIONS = (1, 2)

ROW_COLUMNS = {
    "sample_id": Column("sample_id", ("row",), "int64 id of the input row these targets belong to; joins the cache "
                        "to the dataset"),
    "position": Column("position", ("row",), "position of the token within its sequence; rows of a sequence are "
                       "contiguous"),
}
# augmented views (cache.views > 0; pipeline/views.py draws and replays them); a cache stores the
# ones its augmentation uses, after sample_id
VIEW_COLUMNS = {
    "view": Column("view", ("row",), "index of this augmented view of the sample (uint8, uint16 above 256 views); "
                   "rows are view-major in a shard: view v of its sample i is row v * samples + i"),
    "box": Column("box", ("row", "box"), "top, left, height, width of the source region in the image zero-padded "
                  "by the spec's pad, resized bilinearly to the image size, (rows, 4)"),
    "flip": Column("flip", ("row",), "1 when the view is flipped horizontally (after the crop)"),
    "partner": Column("partner", ("row",), "sample id mixed into this view by mixup/cutmix, -1 when none (int32 "
                      "when every transfer id fits, else int64)"),
    "lam": Column("lam", ("row",), "float16 weight of a mixup view's own image and label (1 on other rows; a "
                  "cutmix view's is recomputed from its box)"),
    "cut_size": Column("cut_size", ("row", "side"), "cutmix: height and width of the pasted box before clipping "
                       "(0 when none); its centre is recomputed from the view's draws, (rows, 2)"),
}
OFFSETS = Column("offsets", ("sequence",), "first row of each sequence in this shard, plus the row count, "
                 "(sequences + 1,)")


def stored_columns(enc: Encoding, token_rows: bool, view_names: list[str] | tuple[str, ...] = ()) -> list[Column]:
    """Every per-row column of a shard, in order: sample_id (and position for tokens), the view
    columns named, then targets."""
    base = [ROW_COLUMNS["sample_id"], ROW_COLUMNS["position"]] if token_rows else [ROW_COLUMNS["sample_id"]]
    return base + [VIEW_COLUMNS[n] for n in view_names] + enc.columns()


def view_column_names(spec: dict[str, Any], where: Any = "cache") -> list[str]:
    """The view columns of a cache with this spec (none without views)."""
    if "views" not in spec:
        return []
    from pipeline.views import ViewSpec, column_names

    return column_names(ViewSpec.of(spec, where).augment)


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
    per_item = spec["dataset"].get("seq_len") or spec.get("views", {}).get("count", 1)
    items, per_shard = spec["dataset"]["rows"], spec["layout"]["rows_per_shard"] // per_item
    return -(-items // per_shard), items * per_item


def shard_name(index: int, backend: str) -> str:
    return f"{index:05d}.{'zarr' if backend == 'zarr' else 'parquet'}"


def digest_path(shard: Path) -> Path:
    """The sidecar where a shard's writer records its sha256 and size: <cache>/digests/<shard>.json
    (beside shards/, which holds shards only)."""
    return shard.parent.parent / "digests" / f"{shard.name}.json"


def write_shard(path: Path, arrays: dict[str, np.ndarray], attrs: dict[str, Any], enc: Encoding,
                chunk_rows: int, level: int | None = None, codec: str = "zstd") -> bool:
    """Write one shard to a temporary name, hash and fsync it, publish it at `path` without
    replacing, then record its digest beside it. False if another writer published it first: that
    shard is kept untouched and this one discarded.

    `arrays` holds the stored columns: sample_id (and position, offsets for tokens) and the
    encoding's columns as `enc.to_host` returns them. `codec`: one of CODECS (Zarr; Parquet takes
    zstd), at `level` (None: the codec's default)."""
    problems = codec_problems(codec, level, "zarr" if path.suffix == ".zarr" else "parquet")
    if problems:
        raise ValueError(f"{path}: {problems[0]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = stored_columns(enc, "position" in arrays, [n for n in VIEW_COLUMNS if n in arrays])
    tmp = tmp_name(path)
    try:
        if path.suffix == ".zarr":
            _write_zarr(tmp, arrays, attrs, columns, chunk_rows, level, codec)
        else:
            _write_parquet(tmp, arrays, attrs, columns, chunk_rows, level or CODECS["zstd"].default_level)
        digest, nbytes = sha256_tree(tmp, fsync=True)  # read back from the page cache
        published = publish_dir(tmp, path) if path.suffix == ".zarr" else publish_file(tmp, path)
        if published:
            fsync_dir(path.parent)
            atomic_write_json(digest_path(path), {"sha256": digest, "bytes": nbytes})
        return published
    finally:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


def _write_zarr(tmp: Path, arrays: dict[str, np.ndarray], attrs: dict[str, Any], columns: list[Column],
                chunk_rows: int, level: int | None, codec: str) -> None:
    import zarr

    spec = CODECS[codec]
    level = spec.default_level if level is None else level
    group = zarr.open_group(str(tmp), mode="w", zarr_format=3, attributes={"logitcache": attrs})
    for col in columns + ([OFFSETS] if "offsets" in arrays else []):
        data = arrays[col.name]
        arr = group.create_array(
            col.name, shape=data.shape, dtype=data.dtype, chunks=(chunk_rows, *data.shape[1:]),
            compressors=spec.compressor(data.dtype.itemsize, level), dimension_names=col.dims,
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
    """A shard's manifest entry from its writer's sidecar and a stat: the shard is not re-read."""
    rel = f"shards/{shard_name(index, backend)}"
    digest, nbytes = recorded_digest(cache_dir / rel)
    return {"index": index, "path": rel, "first_row": first_row, "rows": rows, "sha256": digest, "bytes": nbytes}


def recorded_digest(shard: Path) -> tuple[str, int]:
    """(sha256, bytes) its writer recorded beside a shard, checked against the shard's size on disk.

    A shard without a readable sidecar (its writer was killed between publishing the shard and
    writing the sidecar) is hashed once here and the sidecar written."""
    side = digest_path(shard)
    size = tree_size(shard)
    try:
        recorded = json.loads(side.read_text())
        digest, nbytes = recorded["sha256"], recorded["bytes"]
        if not isinstance(digest, str) or not isinstance(nbytes, int):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        digest, nbytes = sha256_tree(shard)
        atomic_write_json(side, {"sha256": digest, "bytes": nbytes})
    if nbytes != size:
        raise CacheError(f"{shard}: holds {size} bytes but its writer wrote {nbytes}; the shard is corrupt, "
                         "delete it and rerun `logitcache cache CONFIG`")
    return digest, nbytes


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
    if (cache_dir / "digests").is_dir():
        remove_dead_tmp(cache_dir / "digests")
    fsync_dir(cache_dir)  # shards were fsynced when published; now the entries above them
    atomic_write_json(cache_dir / "manifest.json", manifest)  # fsynced, and its directory entry
    return manifest


# ---------------------------------------------------------------------------------------------
# Reading


def resolve(ref: str | Path, root: Path) -> Path:
    """A cache directory from a path, an id, or a unique id prefix under `root`."""
    p = Path(ref)
    if (p / "spec.json").is_file() or (p / "manifest.json").is_file():
        return p
    if p.is_absolute() or len(p.parts) > 1:  # a path, never an id prefix
        what = "is not a cache directory (no spec.json or manifest.json)" if p.exists() else "does not exist"
        raise CacheError(f"cache {ref}: {what}; give a cache directory, an id or an id prefix "
                         "(list caches with `logitcache caches ls`)")
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
    """The manifest, or None if there is none yet; a malformed one is refused in one line."""
    path = cache_dir / "manifest.json"
    if not path.is_file():
        return None
    fix = "delete the cache directory and rerun `logitcache cache CONFIG`"
    manifest = read_json(path, CacheError, fix)
    problem = _manifest_problem(manifest)
    if problem:
        raise CacheError(f"{path}: not a logitcache manifest ({problem}); {fix}")
    return manifest


def _manifest_problem(m: Any) -> str | None:
    """What is wrong with a manifest's shape, or None: a complete one must hold everything readers use."""
    if not isinstance(m, dict):
        return f"a JSON {type(m).__name__}, not an object"
    if m.get("status") != "complete":
        return None
    for key, kind in (("spec", dict), ("shards", list), ("rows", int), ("bytes", int), ("format_version", int)):
        if not isinstance(m.get(key), kind):
            return f"'{key}' is missing or not a {kind.__name__}"
    for i, e in enumerate(m["shards"]):
        if not (isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("sha256"), str)
                and isinstance(e.get("rows"), int) and Path(e["path"]).parts[:1] == ("shards",)
                and ".." not in Path(e["path"]).parts):
            return f"shards[{i}] is not an entry with path under shards/, rows and sha256"
    spec = m["spec"]
    if not (isinstance(spec.get("layout"), dict) and isinstance(spec["layout"].get("chunk_rows"), int)
            and isinstance(spec.get("dataset"), dict) and isinstance(spec.get("encoding"), dict)):
        return "'spec' lacks layout.chunk_rows, dataset or encoding"
    return None


def read_spec(path: Path) -> dict[str, Any]:
    """A cache's spec.json; a malformed one is refused in one line naming it."""
    try:
        spec = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        spec, why = None, type(e).__name__
    else:
        why = "not an object with a layout"
    if not (isinstance(spec, dict) and isinstance(spec.get("layout"), dict)
            and isinstance(spec.get("dataset"), dict)):
        raise CacheError(f"{path}: not a valid cache spec ({why}); delete the directory {path.parent} "
                         "(a cache with a damaged spec cannot be finished) and rerun `logitcache cache CONFIG`")
    return spec


@dataclass(frozen=True)
class Chunk:
    shard: int  # position in the manifest's shard list
    index: int  # chunk within the shard
    start: int  # first row within the shard
    stop: int


def shard_problems(cache_dir: Path, shards: list[dict[str, Any]], hash_them: bool) -> dict[str, list[str]]:
    """The manifest's shards that are missing (a stat each) and, with hash_them, corrupt."""
    missing, corrupt = [], []
    for e in shards:
        path = cache_dir / e["path"]
        if not path.exists():
            missing.append(e["path"])
        elif hash_them and sha256_tree(path)[0] != e["sha256"]:
            corrupt.append(e["path"])
    return {"missing": missing, "corrupt": corrupt}


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
            raise ValueError("read_joined reads one or more whole chunks; pipeline.loader.read_joined reads ranges")
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
