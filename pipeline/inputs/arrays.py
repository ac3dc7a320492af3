"""Datasets: the bundled example (scikit-learn's digits), .npz files, Parquet files, Zarr groups and
directories of .npy arrays.

A Dataset carries `ids` (int64 sample ids) so that cached targets join back to their inputs, and
a content fingerprint so that a cache made for other data is refused.

A directory of .npy arrays (x.npy, y.npy, optional ids.npy, x_test.npy, y_test.npy, ids_test.npy)
is the scalable format: its arrays are memory-mapped, never loaded whole; a stage touches only the
rows it uses (`Dataset.rows`), and pages it has read are handed back to the OS every
`PAGE_BUDGET` bytes, so resident memory stays flat however large the file. Fingerprints of files are
computed in one streamed pass and remembered per machine (`pipeline.core.io.remembered`).

Parquet files (by row group) and Zarr groups (by chunk) are read on demand too (`pipeline.inputs.rows`):
only labels and ids, one column each, are read whole. A subset (the train/test split, excluded
classes) of such an input is a `Selection` of its rows, never a copy.
"""

from __future__ import annotations

import functools
import hashlib
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import DataError
from pipeline.core.io import is_url, remembered
from pipeline.inputs.rows import Selection, index_rows, row_positions

PAGE_BUDGET = 16 << 20  # bytes of mapped input made resident before its pages are released


FAULT_AROUND = 64 << 10  # Linux maps up to 16 cached pages around a faulting one (fault_around_bytes)


PAGE_SIZE = mmap.PAGESIZE


SCAN_ROWS_BYTES = 16 << 20  # block size of streamed passes over mapped inputs


def gather(m: np.memmap, pos: np.ndarray) -> np.ndarray:
    """Rows `pos` of a C-ordered memory-mapped file read with one pread per run of adjacent rows,
    not by faulting its pages into this process: a fault maps the page's whole folio (up to 2 MB
    with large folios), so a batch gathered from a mapping made ~100 MB resident at a time."""
    pos = np.asarray(pos, dtype=np.int64)
    out = np.empty((len(pos), *m.shape[1:]), dtype=m.dtype)
    if len(pos) == 0:
        return out
    if pos.min() < 0 or pos.max() >= len(m):
        raise IndexError(f"row positions outside [0, {len(m)}) of {m.filename}")
    row = out[:1].nbytes
    order = np.argsort(pos, kind="stable")
    sorted_pos = pos[order]
    staged = np.empty_like(out)  # rows in file order, then put back in the asked order
    view = memoryview(staged.reshape(-1).view(np.uint8))
    breaks = np.flatnonzero(np.diff(sorted_pos) != 1) + 1  # runs of adjacent rows
    first = np.concatenate([[0], breaks])
    ends = (np.concatenate([breaks, [len(pos)]]) * row).tolist()
    starts = (first * row).tolist()
    offsets = (m.offset + sorted_pos[first] * row).tolist()
    fd = os.open(m.filename, os.O_RDONLY)
    try:
        for a, b, off in zip(starts, ends, offsets):
            if os.preadv(fd, [view[a:b]], off) != b - a:
                raise DataError(f"{m.filename}: shorter than its header says (byte {off}); "
                                "the file was truncated, write it again with numpy.save")
    finally:
        os.close(fd)
    out[order] = staged
    return out


def whole_file(a: Any) -> bool:
    """True for a C-ordered memmap of a whole .npy array (np.load's), which `gather` can read."""
    return isinstance(a, np.memmap) and isinstance(a.base, mmap.mmap) and a.offset is not None \
        and a.filename is not None and a.flags.c_contiguous


def mapped_resident() -> int | None:
    """Bytes of file-backed pages this process holds resident (Linux's /proc/self/statm "shared"),
    or None where that is not available. Measured rather than estimated: a fault on a cached page
    maps its whole folio and fault-around window, which depend on the kernel and filesystem."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[2]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


def touched_bytes(index: Any, n: int, row_bytes: int) -> int:
    """Where resident pages cannot be read: bytes of a mapping that reading `n` rows at `index`
    makes resident, counting each 64 KB fault-around window a gather touches."""
    if isinstance(index, slice) or n == 0:
        return n * row_bytes
    windows = np.unique(np.asarray(index, dtype=np.int64) * row_bytes // FAULT_AROUND)
    return len(windows) * max(FAULT_AROUND, row_bytes)


class IdRange:
    """Sample ids 0..n-1, without storing them: a plain range costs nothing at any size."""

    dtype = np.dtype(np.int64)
    ndim = 1

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple[int]:
        return (self.n,)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            r = range(self.n)[key]
            return np.arange(r.start, r.stop, r.step, dtype=np.int64)
        key = np.asarray(key)
        if key.dtype == bool:
            return np.flatnonzero(key).astype(np.int64)
        return np.arange(self.n, dtype=np.int64)[key] if key.ndim == 0 else np.where(key < 0, key + self.n, key).astype(np.int64)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.arange(self.n, dtype=dtype or np.int64)


class MappedRows:
    """Rows of a memory-mapped array read as `dtype` (token ids stored as uint16/uint32, used as int64).

    Indexing returns in-memory arrays; `x[rows, cols]` indexes rows first."""

    def __init__(self, base: np.ndarray, dtype: Any) -> None:
        self.base = base
        self.dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return len(self.base)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def ndim(self) -> int:
        return self.base.ndim

    def __getitem__(self, key: Any) -> np.ndarray:
        return index_rows(key, lambda rows: np.array(self.base[rows], dtype=self.dtype))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.array(self.base, dtype=dtype or self.dtype)


def _storage(arr: Any) -> Any:
    """The array that holds the rows of `arr` (through selections and dtype views)."""
    while isinstance(arr, (Selection, MappedRows)):
        arr = arr.base
    return arr


def release(arr: Any) -> None:
    """Hand a memory-mapped array's resident pages back to the OS (they are re-read from the page
    cache if touched again); a no-op for in-memory arrays."""
    if isinstance(arr, ConcatRows):
        for part in arr.parts:
            release(part)
        return
    a = _storage(arr)
    while a is not None:
        m = a if isinstance(a, mmap.mmap) else getattr(a, "_mmap", None)
        if isinstance(m, mmap.mmap):
            try:
                m.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError, AttributeError):
                pass
            return
        a = getattr(a, "base", None)


def is_mapped(arr: Any) -> bool:
    if isinstance(arr, ConcatRows):
        return any(is_mapped(part) for part in arr.parts)
    a = _storage(arr)
    while a is not None:
        if isinstance(a, (mmap.mmap, np.memmap)):
            return True
        a = getattr(a, "base", None)
    return False


@dataclass(frozen=True)
class Dataset:
    x: Any  # (N, *input_shape) float32: an ndarray, a memmap, MappedRows, LazyRows or a Selection of them
    y: np.ndarray | None  # (N,) int64, or None for unlabelled transfer data
    ids: Any  # (N,) int64, unique: an ndarray, or IdRange when the ids are 0..N-1
    source: str  # where it came from, for messages
    origin: tuple[tuple[str, ...], str] | None = None  # (files, which rows): keys the remembered fingerprint
    _touched: list = field(default_factory=lambda: [0], compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Content hash of inputs and ids (labels do not change the teachers' targets); for data
        read from files, computed in one streamed pass and remembered per machine."""
        if self.origin is None:
            return self._scan()
        files, which = self.origin
        return remembered([Path(f) for f in files], f"fingerprint:{which}", self._scan)

    def _scan(self) -> str:
        h = hashlib.sha256()
        x = self.x
        h.update(repr((tuple(x.shape), str(x.dtype))).encode())
        row_bytes = max(1, int(np.prod(x.shape[1:])) * x.dtype.itemsize)
        step = max(1, SCAN_ROWS_BYTES // row_bytes)
        mapped = is_mapped(x)
        checked = isinstance(x, np.ndarray) and not mapped  # in memory: checked when loaded
        for i in range(0, len(x), step):
            block = np.ascontiguousarray(x[i:i + step], dtype=x.dtype)
            if not checked and block.dtype.kind == "f" and not np.isfinite(block).all():
                raise DataError(f"{self.source}: inputs hold NaN or infinite values (row "
                                f"{i + int(np.flatnonzero(~np.isfinite(block.reshape(len(block), -1)).all(1))[0])}); "
                                "clean the inputs")
            h.update(block)  # contiguous: hashed in place, not copied to bytes
            if mapped:
                release(x)
        for i in range(0, len(self.ids), 1 << 20):
            h.update(np.ascontiguousarray(self.ids[i:i + (1 << 20)], dtype=np.int64).tobytes())
        release(self.ids)
        return h.hexdigest()[:16]

    def range_digests(self, step: int) -> tuple[str, ...]:
        """A digest of the inputs and ids of each run of `step` rows (rows [0, step), [step, 2 step),
        ...): what a cache shard of those rows is computed from, so a shard whose rows are unchanged
        (rows appended after them) is found by content. One streamed pass, remembered per machine
        for data read from files."""
        def scan() -> str:
            x, out = self.x, []
            head = repr((tuple(x.shape[1:]), str(x.dtype))).encode()
            row_bytes = max(1, int(np.prod(x.shape[1:])) * x.dtype.itemsize)
            block = max(1, min(step, SCAN_ROWS_BYTES // row_bytes))
            for a in range(0, len(x), step):
                b = min(a + step, len(x))
                h = hashlib.sha256(head)
                for i in range(a, b, block):
                    h.update(np.ascontiguousarray(x[i:min(i + block, b)], dtype=x.dtype))
                    if is_mapped(x):
                        release(x)
                h.update(np.ascontiguousarray(self.ids[a:b], dtype=np.int64).tobytes())
                out.append(h.hexdigest()[:16])
            return " ".join(out)

        if self.origin is None:
            return tuple(scan().split())
        files, which = self.origin
        return tuple(remembered([Path(f) for f in files], f"ranges:{step}:{which}", scan).split())

    @functools.cached_property
    def _order(self) -> np.ndarray:
        return np.argsort(self.ids, kind="stable")

    def positions(self, sample_ids: np.ndarray) -> np.ndarray:
        """Row positions of `sample_ids`; raises if any id is not in this dataset."""
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        if isinstance(self.ids, IdRange):  # ids are row numbers: no index to build
            bad = (sample_ids < 0) | (sample_ids >= len(self.ids))
            if bad.any():
                self._missing(sample_ids[bad])
            return sample_ids
        order = self._order
        pos = np.searchsorted(self.ids, sample_ids, sorter=order)
        pos = np.clip(pos, 0, len(order) - 1)
        rows = order[pos]
        if not np.array_equal(self.ids[rows], sample_ids):
            self._missing(sample_ids[self.ids[rows] != sample_ids])
        return rows

    def _missing(self, missing: np.ndarray) -> None:
        raise DataError(
            f"{self.source}: sample ids {missing[:3].tolist()} of the cache are not in this dataset; "
            "the cache was made for other data, rerun `logitcache cache`"
        )

    def rows(self, index: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """Inputs (and labels) of the rows at `index` (a slice or positions) as in-memory arrays;
        a mapped file's pages are released once PAGE_BUDGET bytes more are resident, so memory stays flat.
        Positions are best grouped by region (a batch of a chunk-shuffled cache is): a lazily read
        input decodes each block a call needs once."""
        if not isinstance(index, slice) and whole_file(self.x):
            x = gather(self.x, index)  # positions: read, never mapped
            y = None if self.y is None else (gather(self.y, index) if whole_file(self.y)
                                             else np.asarray(self.y[index])).astype(np.int64, copy=False)
            return x, y
        if isinstance(self.x, Selection) and whole_file(self.x.base):  # a split: scattered rows of the file
            x = gather(self.x.base, self.x.index[index])
            return x, None if self.y is None else np.array(self.y[index], dtype=np.int64)
        x = self.x[index]
        x = np.array(x) if isinstance(self.x, np.ndarray) else x  # an ndarray's slice is a view
        y = None if self.y is None else np.array(self.y[index], dtype=np.int64)
        if is_mapped(self.x):
            resident = mapped_resident()
            if resident is None:
                self._touched[0] += touched_bytes(index, len(x), x[:1].nbytes)
            if (self._touched[0] if resident is None else resident - self._touched[0]) >= PAGE_BUDGET:
                release(self.x)
                if self.y is not None:
                    release(self.y)
                release(self.ids)
                after = mapped_resident()
                self._touched[0] = 0 if after is None else after  # the next release is relative to this
        return x, y

    def subset(self, mask: np.ndarray, which: str | None = None) -> Dataset:
        """The rows where `mask` is true: copied if in memory, else a Selection read on demand;
        `which` names the selection for the remembered fingerprint."""
        origin = None if self.origin is None or which is None else (self.origin[0], f"{self.origin[1]}|{which}")
        idx = np.flatnonzero(mask)
        in_memory = isinstance(self.x, np.ndarray) and not is_mapped(self.x)
        x = self.x[idx] if in_memory else Selection(self.x, idx)
        ids = self.ids[idx]
        return Dataset(x, None if self.y is None else np.asarray(self.y[idx]), ids, self.source, origin)


class ConcatRows:
    """Rows of several arrays of one row shape and dtype, one after the other, read on demand (each
    an ndarray, a memmap, MappedRows, LazyRows or a Selection); indexing returns in-memory arrays."""

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts
        self.bounds = np.cumsum([0] + [len(p) for p in parts])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.parts[0].dtype)

    def __len__(self) -> int:
        return int(self.bounds[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.parts[0].shape[1:])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        return index_rows(key, self._rows)

    def _rows(self, key: Any) -> np.ndarray:
        pos = row_positions(key, len(self))
        if isinstance(pos, slice):
            pos = np.arange(pos.start, pos.stop, dtype=np.int64)
        scalar = np.ndim(pos) == 0
        pos = np.atleast_1d(pos)
        part = np.searchsorted(self.bounds, pos, side="right") - 1
        out = np.empty((len(pos), *self.shape[1:]), dtype=self.dtype)
        for i in np.unique(part):
            mine = part == i
            local = pos[mine] - self.bounds[i]
            run = len(local) and local[-1] - local[0] == len(local) - 1 and bool((np.diff(local) == 1).all())
            out[mine] = self.parts[i][int(local[0]):int(local[-1]) + 1] if run else self.parts[i][local]
        return out[0] if scalar else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.concatenate([np.asarray(p) for p in self.parts]).astype(dtype or self.dtype, copy=False)


def concat(parts: list[Dataset], source: str) -> Dataset:
    """The rows of `parts` one after the other. Sample ids are kept where a part has its own; a part
    numbered 0..n-1 by default continues after the largest id before it. Labels are kept when every
    part has them. Inputs read from files stay on disk (ConcatRows)."""
    if all(isinstance(p.ids, IdRange) for p in parts):
        all_ids: Any = IdRange(sum(len(p) for p in parts))  # each part continues the numbering: 0..N-1
    else:
        ids, end = [], 0  # end: one past the largest id so far
        for p in parts:
            own = np.arange(end, end + len(p), dtype=np.int64) if isinstance(p.ids, IdRange) \
                else np.asarray(p.ids, dtype=np.int64)
            ids.append(own)
            end = max(end, int(own.max()) + 1) if len(own) else end
        all_ids = np.concatenate(ids)
        if len(np.unique(all_ids)) != len(all_ids):
            raise DataError(f"{source}: the sample ids of the appended rows repeat ids of the rows before them; "
                            "give each appended file ids of its own (an 'ids' array) or none")
    in_memory = all(isinstance(p.x, np.ndarray) and not is_mapped(p.x) for p in parts)
    x = np.concatenate([p.x for p in parts]) if in_memory else ConcatRows([p.x for p in parts])
    y = np.concatenate([np.asarray(p.y) for p in parts]) if all(p.y is not None for p in parts) else None
    origin = None
    if all(p.origin is not None for p in parts):
        origin = (tuple(f for p in parts for f in p.origin[0]), "+".join(p.origin[1] for p in parts))
    return Dataset(x, y, all_ids, source, origin)


@dataclass(frozen=True)
class Splits:
    train: Dataset  # labelled; teachers are fitted on it
    test: Dataset  # labelled, held out; evaluation only
    transfer: Dataset  # inputs the teachers label with soft targets; students train on it
    num_classes: int  # classes, or the vocabulary size for language models
    vocab: str | None = None  # language models: fingerprint of the tokenizer's vocabulary
    corpus: Any = None  # language models: the transfer split as documents (inputs/documents.Corpus)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


def check_file(path: str, key: str, what: str) -> Path:
    """`path` as a Path if it is a readable file; else one DataError naming `key` and the problem. A
    URL (s3://bucket/x.parquet) is fetched to a local copy, which is returned (format/remote.py)."""
    if is_url(path):
        from pipeline.format.remote import fetch_input

        return fetch_input(path, key, what)
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{key}: {path} is a directory; give {what}")
    if not p.exists():
        raise DataError(f"{key}: {path} does not exist; give {what}")
    if not p.is_file():
        raise DataError(f"{key}: {path} is not a regular file; give {what}")
    return p

