"""Caches of per-member targets (cache.members separate or both): member stores, and reading them.

    <cache root>/members/<store id>/          one teacher's targets (or the ensemble's), shared by caches
      store.json                              what determines them: teacher, classes, temperature, encoding,
                                              compute, layout (and the seed of drawn encodings)
      shards/00003-<rows digest>.zarr         shard 3 of rows whose inputs and sample ids have that digest
      digests/00003-<rows digest>.zarr.json   its sha256 and size, recorded by its writer
    <cache root>/<cache id>/manifest.json     format 4: "units" lists each store and the shards it reads

A store's id hashes what determines its targets but the rows; a shard's name adds its index and a
digest of its rows. A cache with one more teacher finds the other teachers' stores complete; a cache
of more rows (appended) finds every shard whose rows are unchanged. Each shard is computed once and
read, byte for byte, by every cache that lists it; shards are published without replacing and never
change, so a cache being grown never touches what a complete cache reads.

    reader = open_local(cache_dir)               # a plain cache, or the ensemble of a `both` cache:
                                                 # CacheReader; else a MembersReader of every member
    reader = open_local(cache_dir, units=["a", "b"])   # those members' targets, read side by side
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import CacheError
from pipeline.core.io import sha256_tree
from pipeline.format.backends import BACKENDS
from pipeline.format.columns import Chunk
from pipeline.format.encodings import Encoding
from pipeline.format.manifest import MEMBERS_FORMAT, read_manifest
from pipeline.format.reader import CacheReader

STORES = "members"  # <cache root>/members/<store id>/
ENSEMBLE = "ensemble"  # the unit of a `both` cache that holds the combined targets

__all__ = ["ENSEMBLE", "MEMBERS_FORMAT", "STORES", "MembersReader", "cache_shards", "member_names", "open_local",
           "shard_name", "shard_problems", "store_dir", "unit_manifest"]


def shard_name(index: int, digest: str, backend: str) -> str:
    """A store's shard: its index in the plan and the digest of its rows (Dataset.range_digests)."""
    return f"{index:05d}-{digest}{BACKENDS[backend].suffix}"


def store_dir(cache_dir: Path, store: str) -> Path:
    """Where a member store lies: beside the caches that use it."""
    return cache_dir.parent / STORES / store


def is_members(manifest: dict[str, Any]) -> bool:
    return manifest.get("format_version") == MEMBERS_FORMAT


def member_names(manifest: dict[str, Any]) -> list[str]:
    """The teachers whose own targets a cache holds ([] for a cache of the combined ensemble only)."""
    return [u["name"] for u in manifest.get("units", []) if u.get("kind") != ENSEMBLE] if is_members(manifest) else []


def unit_manifest(manifest: dict[str, Any], unit: dict[str, Any]) -> dict[str, Any]:
    """The cache's manifest with one unit's shards in place of its own: what a CacheReader of that
    unit reads (its paths lie under the unit's store)."""
    return {**manifest, "shards": unit["shards"], "spec": {**manifest["spec"], "encoding": unit["encoding"]}}


def cache_shards(cache_dir: Path, manifest: dict[str, Any]) -> list[tuple[Path, dict[str, Any]]]:
    """(directory the path lies under, entry) of every shard a complete cache reads."""
    out = [(cache_dir, e) for e in manifest["shards"]]
    for u in manifest.get("units", []) if is_members(manifest) else []:
        out.extend((store_dir(cache_dir, u["store"]), e) for e in u["shards"])
    return out


def shard_problems(cache_dir: Path, manifest: dict[str, Any], hash_them: bool) -> dict[str, list[str]]:
    """Shards a complete cache lists that are missing (a stat each) and, with hash_them, corrupt;
    a member store's shard is named by its path from the cache root (members/<store>/shards/...)."""
    missing, corrupt = [], []
    for base, e in cache_shards(cache_dir, manifest):
        path = base / e["path"]
        shown = e["path"] if base == cache_dir else f"{STORES}/{base.name}/{e['path']}"
        if not path.exists():
            missing.append(shown)
        elif hash_them and sha256_tree(path)[0] != e["sha256"]:
            corrupt.append(shown)
    return {"missing": missing, "corrupt": corrupt}


def open_local(cache_dir: Path, verify: bool = False, units: Sequence[str] | None = None, **kw: Any) -> Any:
    """A reader of a local cache: a CacheReader of a plain cache, or of the ensemble of a `both`
    cache when no units are asked for; else a MembersReader of `units` (default: every member)."""
    manifest = read_manifest(cache_dir)
    if manifest is None or manifest.get("status") != "complete" or not is_members(manifest):
        if units is not None:
            raise CacheError(f"{cache_dir}: holds the combined ensemble only (made with cache.members combined); "
                             "reading members needs a cache made with cache.members separate or both")
        return CacheReader(cache_dir, verify=verify, **kw)
    listed = {u["name"]: u for u in manifest["units"]}
    if units is None and ENSEMBLE in listed:
        u = listed[ENSEMBLE]
        return CacheReader(cache_dir, verify=verify, manifest=unit_manifest(manifest, u),
                           base=store_dir(cache_dir, u["store"]), **kw)
    return MembersReader(cache_dir, manifest, list(units) if units is not None else member_names(manifest),
                         verify=verify, **kw)


class MembersReader:
    """Several units of a cache read side by side: the same chunks of each, their stored columns
    joined as '<member>/<column>' beside one sample_id (checked equal across members). It has the
    surface of a CacheReader that the dataset, the epoch planner and `read_rows` use; `split` gives
    each member's columns back."""

    def __init__(self, cache_dir: Path, manifest: dict[str, Any], names: list[str], verify: bool = False,
                 **kw: Any) -> None:
        listed = {u["name"]: u for u in manifest["units"]}
        unknown = [n for n in names if n not in listed]
        if unknown or not names:
            raise CacheError(f"{cache_dir}: {f'no member {unknown[0]!r}' if unknown else 'no members asked for'}; "
                             f"its members are {', '.join(member_names(manifest))}")
        self.dir, self.manifest, self.names = cache_dir, manifest, list(names)
        self.readers = {n: CacheReader(cache_dir, verify=verify, manifest=unit_manifest(manifest, listed[n]),
                                       base=store_dir(cache_dir, listed[n]["store"]), **kw) for n in self.names}
        first = self.readers[self.names[0]]
        for n, r in self.readers.items():
            if [e["rows"] for e in r.shards] != [e["rows"] for e in first.shards] or r.chunk_rows != first.chunk_rows:
                raise CacheError(f"{cache_dir}: member {n}'s shards do not hold the rows of {self.names[0]}'s; the "
                                 "manifest is damaged, rerun `logitcache cache CONFIG`")
        self.shards, self.chunk_rows, self.backend = first.shards, first.chunk_rows, first.backend
        self.encoding: Encoding = first.encoding
        self.encodings: dict[str, Encoding] = {n: r.encoding for n, r in self.readers.items()}
        self.token_rows = self.keyed_by_document = False
        self.remote = None

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
        for r in self.readers.values():
            r.verify()

    def chunks(self) -> list[Chunk]:
        return self.readers[self.names[0]].chunks()

    def is_whole_chunk(self, r: Chunk) -> bool:
        return self.readers[self.names[0]].is_whole_chunk(r)

    def _join(self, parts: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        ids = parts[self.names[0]]["sample_id"]
        out = {"sample_id": ids}
        for n, cols in parts.items():
            if not np.array_equal(cols["sample_id"], ids):
                raise CacheError(f"{self.dir}: member {n}'s rows are not {self.names[0]}'s (other sample ids); the "
                                 "member stores are damaged, delete the cache and its members/ and rerun")
            out.update({f"{n}/{k}": v for k, v in cols.items() if k != "sample_id"})
        return out

    def read_joined(self, chunks: list[Chunk]) -> dict[str, np.ndarray]:
        return self._join({n: r.read_joined(chunks) for n, r in self.readers.items()})

    def read_many(self, chunks: list[Chunk], decode: bool = True) -> list[dict[str, np.ndarray]]:
        parts = {n: r.read_many(chunks, decode) for n, r in self.readers.items()}
        return [self._join({n: p[i] for n, p in parts.items()}) for i in range(len(chunks))]

    def read(self, chunk: Chunk, decode: bool = True) -> dict[str, np.ndarray]:
        return self.read_many([chunk], decode)[0]

    def decode(self, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {"sample_id": stored["sample_id"]}
        for n, cols in self.split(stored).items():
            out.update({f"{n}/{k}": v for k, v in self.encodings[n].decode(cols).items()})
        return out

    def split(self, joined: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
        """Each member's columns of joined rows (stored or decoded), without the prefix."""
        out: dict[str, dict[str, np.ndarray]] = {n: {} for n in self.names}
        for key, value in joined.items():
            name, sep, column = key.rpartition("/")
            if sep and name in out:
                out[name][column] = value
        return out
