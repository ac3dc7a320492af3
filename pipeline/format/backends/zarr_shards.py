"""Zarr v3 shards: one group per shard, one array per column, chunks of `chunk_rows` rows.

Reading has a fast path for plain arrays (regular chunks of the reader's rows, bytes + zstd or
blosc codecs): each chunk file is read with one system call into a buffer kept per thread and
decompressed by the codec's C function straight into the rows it fills, bypassing zarr's async
machinery (~1 ms per array read against ~0.2 ms of decoding) and numcodecs' Python wrappers (per
chunk file they cost about what LZ4 takes to decode it: bench/reader.py). Anything else (sharding,
other codecs) is read through zarr.
"""

from __future__ import annotations

import functools
import json
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipeline.core.codecs import CODECS
from pipeline.core.errors import CacheError
from pipeline.core.io import publish_dir
from pipeline.format.columns import OFFSETS, Chunk
from pipeline.format.encodings import Column
from pipeline.format.lru import HandleLRU


@functools.cache
def _decompressors() -> dict[str, Callable[[Any, np.ndarray], Any]]:
    """The fast path's decompress(frame, dest) by the codec's zarr.json name; each decodes any frame
    of its kind into `dest` (contiguous, exactly the frame's decoded size) with the GIL released."""
    from numcodecs import blosc, zstd

    return {"zstd": zstd.decompress, "blosc": blosc.decompress}


_buffers = threading.local()  # each reading thread's buffer for compressed chunk files


def _read_file(path: str, at_least: int) -> memoryview | None:
    """The whole file at `path`, read with one system call into this thread's buffer (grown to
    `at_least` bytes and kept), or None when there is no such file. Valid until the thread's next read."""
    buf = getattr(_buffers, "buf", None)
    if buf is None or len(buf) < at_least:
        buf = _buffers.buf = bytearray(at_least)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        n = os.readv(fd, [buf])
        if n == len(buf):  # a file longer than any frame of this chunk could be: read all of it
            return memoryview(bytes(buf) + os.read(fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)
    return memoryview(buf)[:n]


@dataclass(frozen=True)
class FastColumn:
    """How to read one column's chunk j of a plain Zarr v3 shard: the file prefix + j + suffix,
    decoded by `decompress` into (chunk_rows, *tail) of `dtype`; a chunk with no file holds `fill`."""
    dtype: np.dtype
    tail: tuple[int, ...]
    prefix: str
    suffix: str
    decompress: Callable[[Any, np.ndarray], Any]
    fill: int | float

    def file(self, j: int) -> str:
        return f"{self.prefix}{j}{self.suffix}"


class ZarrShards:
    name: ClassVar[str] = "zarr"
    suffix: ClassVar[str] = ".zarr"

    def write(self, tmp: Path, arrays: dict[str, np.ndarray], attrs: dict[str, Any], columns: list[Column],
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

    def publish(self, tmp: Path, path: Path) -> bool:
        return publish_dir(tmp, path)

    def open(self, path: Path, names: list[str]) -> Any:
        import zarr

        group = zarr.open_group(str(path), mode="r")  # array handles kept: opening one reads metadata
        return {name: group[name] for name in names}

    def sample_ids(self, path: Path) -> np.ndarray:
        import zarr

        return np.asarray(zarr.open_group(str(path), mode="r")["sample_id"][...])

    def reads(self, reader: Any) -> ZarrReads:
        return ZarrReads(reader)


class ZarrReads:
    """One cache reader's Zarr reads: the fast layout of each shard met, found once."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader
        self._layouts = HandleLRU(4096)  # per shard met: its fast layout, or None (read it through zarr)
        self._lock = threading.Lock()

    def read_many(self, chunks: list[Chunk], decode: bool) -> list[dict[str, np.ndarray]]:
        """Chunk by chunk, on the reader's threads (zstd decoding releases the GIL)."""
        return self.reader.map(lambda c: self._read(c, decode), chunks)

    def _read(self, chunk: Chunk, decode: bool) -> dict[str, np.ndarray]:
        r = self.reader
        layout = self.layout(chunk.shard)
        if layout is not None and chunk.start % r.chunk_rows == 0:
            stored = {name: np.empty((chunk.stop - chunk.start, *col.tail), col.dtype) for name, col in layout.items()}
            self._decode_into(chunk, layout, stored, 0)
        else:  # anything unusual (sharding, other codecs, a range that is not a chunk): through zarr
            arrays = r.handle(chunk.shard)
            stored = {name: arrays[name][chunk.start:chunk.stop] for name in r.names}
        return r.decode(stored) if decode else stored

    def read_joined(self, chunks: list[Chunk]) -> dict[str, np.ndarray] | None:
        """Whole chunks decoded straight into their rows of one array per column: no per-chunk
        arrays, and no second copy to join them. None when a shard has no fast layout."""
        shards = sorted({c.shard for c in chunks})
        found = self.reader.map(self.layout, shards)  # hashes shards met for the first time, on the read threads
        layouts = dict(zip(shards, found))

        def shape(lay: dict[str, FastColumn] | None) -> list[tuple[str, np.dtype, tuple[int, ...]]] | None:
            return None if lay is None else [(n, c.dtype, c.tail) for n, c in lay.items()]

        first = layouts[chunks[0].shard]
        if first is None or any(shape(lay) != shape(first) for lay in found):
            return None
        at = np.concatenate([[0], np.cumsum([c.stop - c.start for c in chunks])]).tolist()
        out = {name: np.empty((at[-1], *col.tail), col.dtype) for name, col in first.items()}
        self.reader.map(lambda i: self._decode_into(chunks[i], layouts[chunks[i].shard], out, at[i]),
                        list(range(len(chunks))))
        return out

    def _decode_into(self, chunk: Chunk, layout: dict[str, FastColumn], out: dict[str, np.ndarray], at: int) -> None:
        """Decode every column of a whole chunk into out[name][at:at + rows], each chunk file with one read."""
        chunk_rows = self.reader.chunk_rows
        j = chunk.start // chunk_rows
        rows = chunk.stop - chunk.start
        for name, col in layout.items():
            dest = out[name][at:at + rows]
            nbytes = chunk_rows * col.dtype.itemsize * math.prod(col.tail)
            raw = _read_file(col.file(j), nbytes + nbytes // 64 + 1024)  # above any frame's size: zstd's, blosc's
            if raw is None:  # zarr writes no chunk that is all fill value
                column = col.prefix.rsplit("/c", 1)[0]
                if not os.path.isfile(os.path.join(column, "zarr.json")):  # not that: the shard itself is gone
                    raise CacheError(f"{os.path.dirname(column)}: the shard was removed while being read; rerun "
                                     "(a shard cache evicted it, or the cache was deleted)") from None
                dest[...] = col.fill
            elif rows == chunk_rows:
                col.decompress(raw, dest)
            else:  # a shard's last chunk is stored full size
                full = np.empty((chunk_rows, *col.tail), dtype=col.dtype)
                col.decompress(raw, full)
                dest[...] = full[:rows]

    def layout(self, i: int) -> dict[str, FastColumn] | None:
        """How to read shard i's chunk files directly, or None (read it through zarr). Checks the
        shard first, as opening it would."""
        with self._lock:
            if i in self._layouts:
                return self._layouts[i]
        r = self.reader
        r.verify_shard(i)
        path = r.shard_path(i)
        layout: dict[str, FastColumn] | None = {}
        for name in r.names:
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
                plain = plain and chunk_shape[0] == r.chunk_rows and chunk_shape[1:] == meta["shape"][1:]
            except (OSError, KeyError, TypeError, ValueError, IndexError):
                plain = False
            if not plain:
                layout = None
                break
            sep = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
            tail = tuple(meta["shape"][1:])
            layout[name] = FastColumn(dtype.newbyteorder("<"), tail, f"{path / name}/c{sep}", f"{sep}0" * len(tail),
                                      _decompressors()[codecs[1]["name"]], meta["fill_value"])
        with self._lock:
            self._layouts[i] = layout
        return layout
