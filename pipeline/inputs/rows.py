"""Inputs read by blocks on demand: Parquet row groups and Zarr chunks, never loaded whole.

A block source (`ParquetBlocks`, `ZarrBlocks`) describes a file and decodes one block into float32
rows; `LazyRows` turns it into an array-like (`len`, `.shape`, `x[slice]`, `x[positions]`) that
decodes each block a call needs once and keeps a few recently decoded blocks (at most
LAZY_CACHE_BYTES, and always the last one). `Selection` is rows of such an array (or of a
memory-mapped one) picked by position, read only when indexed: a train/test split or an excluded
class never copies the inputs.

Opened files are not pickled: a copy sent to another process reopens its file on first read.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.core.errors import DataError

LAZY_CACHE_BYTES = 32 << 20  # decoded blocks kept per input for the next reads


class Blocks(Protocol):
    shape: tuple[int, ...]  # (N, *features)
    bounds: tuple[int, ...]  # first row of each block, then N

    def open(self) -> Any: ...

    def read(self, handle: Any, block: int) -> np.ndarray: ...  # (rows of the block, *features) float32


def index_rows(key: Any, read: Callable[[Any], np.ndarray]) -> np.ndarray:
    """`read(rows)` for `x[rows, rest...]`: rows are selected first, then the rest of the key."""
    rest: tuple = ()
    if isinstance(key, tuple):
        key, rest = key[0], key[1:]
    out = read(key)
    if not rest:
        return out
    return out[rest] if np.ndim(key) == 0 and not isinstance(key, slice) else out[(slice(None), *rest)]


def row_positions(key: Any, n: int) -> np.ndarray | slice:
    """A row key as a step-1 slice (kept: read contiguously) or as positions in [0, n)."""
    if isinstance(key, slice):
        r = range(n)[key]
        return slice(r.start, r.stop) if r.step == 1 else np.arange(r.start, r.stop, r.step, dtype=np.int64)
    key = np.asarray(key)
    if key.dtype == bool:
        if key.shape != (n,):
            raise IndexError(f"boolean index of shape {key.shape} for {n} rows")
        return np.flatnonzero(key)
    pos = key.astype(np.int64)
    pos = np.where(pos < 0, pos + n, pos)
    if pos.size and (pos.min() < 0 or pos.max() >= n):
        raise IndexError(f"row index out of range for {n} rows")
    return pos


class LazyRows:
    """float32 rows (N, *features) of a block source, decoded on demand; indexing returns in-memory
    arrays. Thread-safe: Dask threads of one worker share it."""

    dtype = np.dtype(np.float32)

    def __init__(self, blocks: Blocks, cache_bytes: int = LAZY_CACHE_BYTES) -> None:
        self.blocks = blocks
        self.cache_bytes = cache_bytes
        self._bounds = np.asarray(blocks.bounds, dtype=np.int64)
        self._fresh()

    def _fresh(self) -> None:
        self._handle: Any = None
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"blocks": self.blocks, "cache_bytes": self.cache_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["blocks"], state["cache_bytes"])  # type: ignore[misc]

    def __len__(self) -> int:
        return self.blocks.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.blocks.shape)

    @property
    def ndim(self) -> int:
        return len(self.blocks.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        return index_rows(key, self._rows)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self[:], dtype=dtype or self.dtype)

    def _rows(self, key: Any) -> np.ndarray:
        if np.ndim(key) == 0 and not isinstance(key, slice):
            return self._rows(np.asarray([key]))[0]
        where = row_positions(key, len(self))
        if isinstance(where, slice):
            return self._slice(where.start, where.stop)
        return self._gather(where)

    def _slice(self, lo: int, hi: int) -> np.ndarray:
        out = np.empty((max(hi - lo, 0), *self.shape[1:]), dtype=np.float32)
        if hi <= lo:
            return out
        first, last = (int(b) for b in np.searchsorted(self._bounds, [lo, hi - 1], side="right") - 1)
        for b in range(first, last + 1):
            start, stop = self._bounds[b], self._bounds[b + 1]
            a, z = max(lo, start), min(hi, stop)
            out[a - lo:z - lo] = self._block(b)[a - start:z - start]
        return out

    def _gather(self, pos: np.ndarray) -> np.ndarray:
        """Rows at `pos` (any order, repeats allowed): grouped by block, each block decoded once."""
        out = np.empty((len(pos), *self.shape[1:]), dtype=np.float32)
        which = np.searchsorted(self._bounds, pos, side="right") - 1
        order = np.argsort(which, kind="stable")
        cuts = np.flatnonzero(np.diff(which[order])) + 1
        for group in np.split(order, cuts):
            if len(group):
                b = int(which[group[0]])
                out[group] = self._block(b)[pos[group] - self._bounds[b]]
        return out

    def _block(self, b: int) -> np.ndarray:
        with self._lock:
            hit = self._cache.get(b)
            if hit is not None:
                self._cache.move_to_end(b)
                return hit
            if self._handle is None:
                self._handle = self.blocks.open()
            block = self.blocks.read(self._handle, b)
            self._cache[b] = block
            held = sum(a.nbytes for a in self._cache.values())
            while held > self.cache_bytes and len(self._cache) > 1:
                held -= self._cache.popitem(last=False)[1].nbytes
            return block


class Selection:
    """Rows `index` (positions, sorted for locality) of a lazily read or memory-mapped array, read
    only when indexed; a selection of a selection indexes the original array."""

    def __init__(self, base: Any, index: np.ndarray) -> None:
        if isinstance(base, Selection):
            base, index = base.base, base.index[index]
        self.base = base
        self.index = np.asarray(index, dtype=np.int64)

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.base.shape[1:])

    @property
    def ndim(self) -> int:
        return self.base.ndim

    def __getitem__(self, key: Any) -> np.ndarray:
        return index_rows(key, lambda rows: np.asarray(self.base[self.index[rows]]))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self.base[self.index], dtype=dtype or self.dtype)


def _why(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# ---------------------------------------------------------------------------------------------
# Parquet: one block per row group; features are scalar columns or one list column.


@dataclass(frozen=True)
class ParquetBlocks:
    path: str
    key: str  # the config field naming the file, for messages
    columns: tuple[str, ...]  # feature columns, or the one list column
    listed: bool  # one list column of `shape[1]` numbers per row
    shape: tuple[int, ...]
    bounds: tuple[int, ...]

    def open(self) -> Any:
        import pyarrow.parquet as pq

        return pq.ParquetFile(self.path, buffer_size=1 << 20)  # pages streamed, not whole column chunks

    def read(self, handle: Any, block: int) -> np.ndarray:
        import pyarrow as pa

        try:
            table = handle.read_row_group(block, columns=list(self.columns))
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{self.key}: {self.path}: cannot read row group {block} as Parquet ({_why(e)}); "
                            "is it truncated? write it again") from None
        if not self.listed:  # nulls become NaN, refused by the fingerprint's pass
            return np.stack([np.asarray(table.column(c).to_numpy(), dtype=np.float32) for c in self.columns],
                            axis=1)
        chunks = table.column(0).chunks
        col = chunks[0] if len(chunks) == 1 else table.column(0).combine_chunks()
        width = self.shape[1]
        if pa.types.is_fixed_size_list(col.type):
            lengths = np.full(len(col), col.type.list_size)
        else:
            lengths = np.diff(col.offsets.to_numpy())
        valid = ~col.is_null().to_numpy(zero_copy_only=False)
        if not valid.all() or (lengths != width).any():
            seen = sorted({width, *lengths[valid].tolist()})
            raise DataError(f"{self.key}: {self.path}: list column {self.columns[0]!r} is ragged or has nulls "
                            f"(lengths {seen[:4]}); every row needs the same number of features")
        values = col.flatten().to_numpy(zero_copy_only=False)
        return np.asarray(values, dtype=np.float32).reshape(len(col), width)


def _numeric(t: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)


def open_parquet(p: Path, key: str, label_column: str, feature_columns: tuple[str, ...] | None,
                 labelled: bool) -> dict[str, Any]:
    """A Parquet file's features as LazyRows ('x'), and its labels ('y') and 'sample_id's ('ids')
    read whole, one column each. Only the schema and footer are read here (and, for a variable
    list column, the first row group to learn its width)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{key}: {p}: cannot read as Parquet ({_why(e)})") from None
    names = schema.names

    def column(name: str) -> np.ndarray:
        try:
            return pf.read(columns=[name]).column(0).to_numpy()
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{key}: {p}: cannot read column {name!r} as Parquet ({_why(e)})") from None

    out: dict[str, Any] = {}
    if label_column in names:
        out["y"] = column(label_column)
    elif labelled:
        raise DataError(f"{key}: {p} has no label column {label_column!r} (data.label_column); "
                        f"columns are {', '.join(names)}")
    if "sample_id" in names:
        out["ids"] = column("sample_id")
    if feature_columns:
        missing = [c for c in feature_columns if c not in names]
        if missing:
            raise DataError(f"{p}: no column {missing[0]!r} (data.feature_columns); columns are {', '.join(names)}")
        features = list(feature_columns)
    else:
        features = [c for c in names if c not in (label_column, "sample_id")]
    if not features:
        raise DataError(f"{p}: no feature columns besides {label_column!r}; set data.feature_columns")
    types = [schema.field(c).type for c in features]
    listed = [c for c, t in zip(features, types) if pa.types.is_list(t) or pa.types.is_large_list(t)
              or pa.types.is_fixed_size_list(t)]
    meta = pf.metadata
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    bounds = tuple(int(b) for b in np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]))
    n = bounds[-1]
    if listed:
        if len(features) != 1:
            raise DataError(f"{p}: list column {listed[0]!r} mixed with other features; "
                            "use one list column or scalar columns (data.feature_columns)")
        if not _numeric(types[0].value_type):
            raise DataError(f"{key}: {p}: list column {features[0]!r} must hold numbers")
        if pa.types.is_fixed_size_list(types[0]):
            width = types[0].list_size
        elif n:  # the first row's length; every row group is checked against it when read
            first = pf.read_row_group(0, columns=features).column(0).combine_chunks()
            width = int(first.offsets[1].as_py() - first.offsets[0].as_py())
        else:
            width = 0
        shape: tuple[int, ...] = (n, width)
    else:
        if not all(_numeric(t) for t in types):
            raise DataError(f"{p}: feature columns must be numeric; set data.feature_columns")
        shape = (n, len(features))
    out["x"] = LazyRows(ParquetBlocks(str(p), key, tuple(features), bool(listed), shape, bounds))
    out["_files"] = {"x": (str(p),)}
    out["_names"] = {"x": f"feature columns {features}", "y": f"column {label_column!r} (data.label_column)",
                     "ids": "column 'sample_id'"}
    out["_tag"] = f"|columns:{features}"  # other feature columns are other inputs
    return out


# ---------------------------------------------------------------------------------------------
# Zarr: arrays x (N, *features), y, ids, x_test, y_test, ids_test of a group; one block per chunk
# (per shard, for a sharded array) along the rows.


@dataclass(frozen=True)
class ZarrBlocks:
    path: str
    name: str
    shape: tuple[int, ...]
    bounds: tuple[int, ...]
    key: str = "data.source"  # the config field naming the group, for messages

    def open(self) -> Any:
        import zarr

        return zarr.open_group(self.path, mode="r")[self.name]

    def read(self, handle: Any, block: int) -> np.ndarray:
        return zarr_read(handle, slice(self.bounds[block], self.bounds[block + 1]), Path(self.path), self.name,
                         self.key, np.float32)


def zarr_read(a: Any, rows: slice, p: Path, name: str, key: str, dtype: Any = None) -> np.ndarray:
    """Rows of Zarr array `a`; a chunk that cannot be decoded (truncated, overwritten) is one DataError
    naming the group, the array, the chunk's rows and, where it can be found, its file."""
    try:
        return np.asarray(a[rows], dtype=dtype)
    except Exception as e:  # noqa: BLE001  codecs raise RuntimeError, ValueError, zarr's own types, ...
        error = e
    lo, hi = rows.start or 0, a.shape[0] if rows.stop is None else rows.stop
    step = max((a.shards or a.chunks)[0], 1)
    for start in range(lo - lo % step, hi, step):  # the failing chunk: looked for only once one failed
        try:
            a[max(start, lo):min(start + step, hi)]
        except Exception as e:  # noqa: BLE001
            error, lo, hi = e, max(start, lo), min(start + step, hi)
            break
    top = p / name / "c" / str(lo // step)  # zarr v3's default chunk keys: c/<row block>/<column block>...
    files = [top] if top.is_file() else sorted(f for f in top.rglob("*") if f.is_file()) if top.is_dir() else []
    where = f"chunk file {files[0]}" if len(files) == 1 else f"a chunk file under {top}" if files \
        else f"the chunk of rows {lo}..{hi}"
    raise DataError(f"{key}: {p}: array {name!r} cannot be read at rows {lo}..{hi} ({type(error).__name__}: "
                    f"{_why(error)}); {where} is damaged or truncated, write the array again")


def is_zarr_group(p: Path) -> bool:
    return p.is_dir() and ((p / "zarr.json").is_file() or (p / ".zgroup").is_file())


def open_zarr(p: Path, key: str, names: tuple[str, ...]) -> dict[str, Any]:
    """The arrays `names` of a Zarr group: inputs (x, x_test) as LazyRows, labels and ids read whole."""
    import zarr

    try:
        group = zarr.open_group(p, mode="r")
    except Exception as e:  # noqa: BLE001  zarr raises many types for a damaged group
        raise DataError(f"{key}: {p}: cannot open as a Zarr group ({type(e).__name__}: {_why(e)}); "
                        "write it with zarr.open_group(path, mode='w')") from None
    out: dict[str, Any] = {"_files": {}}
    for name in names:
        if not (p / name / "zarr.json").is_file() and not (p / name / ".zarray").is_file():
            continue
        try:
            a = group[name]
        except Exception as e:  # noqa: BLE001  a damaged zarr.json: zarr raises many types
            raise DataError(f"{key}: {p}: array {name!r} cannot be opened ({type(e).__name__}: {_why(e)}); its "
                            f"metadata {p / name} is damaged, write the array again") from None
        if not name.startswith("x"):
            out[name] = zarr_read(a, slice(0, a.shape[0] if a.ndim else None), p, name, key)
        elif a.ndim < 2 or not np.issubdtype(a.dtype, np.number):
            raise DataError(f"{p}: {name!r} must be a numeric array of shape (N, features...), got {a.dtype} {a.shape}")
        else:
            step = max(1, (a.shards or a.chunks)[0])
            n = a.shape[0]
            bounds = (*range(0, n, step), n)
            out[name] = LazyRows(ZarrBlocks(str(p), name, tuple(a.shape), bounds, key))
        out["_files"][name] = tuple(sorted(str(f) for f in (p / name).rglob("*") if f.is_file()))
    return out

