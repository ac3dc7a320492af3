"""Shard storage formats: a Zarr v3 group or a Parquet file per shard, behind one interface.

    backend = BACKENDS[spec["layout"]["backend"]]     # looked up once, where a cache is opened
    backend.write(tmp, arrays, attrs, columns, chunk_rows, level, codec)
    reads = backend.reads(cache_reader)               # per reader: open handles, fast paths

A backend owns its shard's file name, writing a shard's columns and attributes to a temporary path
with its codec, publishing it (a directory or a file, never replacing), opening it for reading,
reading chunks of it into numpy columns, and a shard's stored sample ids. Verification, the bound on
open handles, thread pools and decoding through the encoding stay in the reader. Backends take
the paths they are given and compute no cache locations. Adding one is a module here and one entry
in BACKENDS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from pipeline.core.errors import CacheError
from pipeline.format.backends.parquet_shards import ParquetShards
from pipeline.format.backends.zarr_shards import ZarrShards
from pipeline.format.encodings import Column


class Reads(Protocol):
    """A cache reader's reads through one backend (`Backend.reads`)."""

    def read_many(self, chunks: list[Any], decode: bool) -> list[dict[str, np.ndarray]]: ...
    def read_joined(self, chunks: list[Any]) -> dict[str, np.ndarray] | None: ...


class Backend(Protocol):
    name: ClassVar[str]
    suffix: ClassVar[str]  # of a shard's name: 00000.zarr, 00000.parquet

    def write(self, tmp: Path, arrays: dict[str, np.ndarray], attrs: dict[str, Any], columns: list[Column],
              chunk_rows: int, level: int | None, codec: str) -> None: ...
    def publish(self, tmp: Path, path: Path) -> bool: ...
    def open(self, path: Path, names: list[str]) -> Any: ...
    def reads(self, reader: Any) -> Reads: ...
    def sample_ids(self, path: Path) -> np.ndarray: ...


BACKENDS: dict[str, Backend] = {"zarr": ZarrShards(), "parquet": ParquetShards()}


def backend(name: Any, where: str | Path) -> Backend:
    """The backend `name`; an unknown one is one CacheError naming where it was found."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise CacheError(f"{where}: shard backend {name!r} is not one of {', '.join(BACKENDS)}; "
                         "the cache was written by another program or version")
    return BACKENDS[name]


def shard_backend(path: Path) -> Backend:
    """The backend of a shard, from the suffix its backend gave its name."""
    for b in BACKENDS.values():
        if path.suffix == b.suffix:
            return b
    raise CacheError(f"{path}: not a shard name ({', '.join('*' + b.suffix for b in BACKENDS.values())})")


def shard_name(index: int, name: str) -> str:
    return f"{index:05d}{BACKENDS[name].suffix}"
