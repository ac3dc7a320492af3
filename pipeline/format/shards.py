"""Writing one shard atomically through its backend and recording its digest beside it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.codecs import codec_problems, default_codec
from pipeline.core.errors import CacheError
from pipeline.core.io import atomic_write_json, fsync_dir, sha256_tree, tmp_name, tree_size
from pipeline.format.backends import shard_backend, shard_name
from pipeline.format.columns import VIEW_COLUMNS, stored_columns
from pipeline.format.encodings import Encoding

__all__ = ["digest_path", "recorded_digest", "shard_entry", "shard_name", "write_shard"]


def digest_path(shard: Path) -> Path:
    """The sidecar where a shard's writer records its sha256 and size: <cache>/digests/<shard>.json
    (beside shards/, which holds shards only)."""
    return shard.parent.parent / "digests" / f"{shard.name}.json"


def write_shard(path: Path, arrays: dict[str, np.ndarray], attrs: dict[str, Any], enc: Encoding,
                chunk_rows: int, level: int | None = None, codec: str | None = None) -> bool:
    """Write one shard to a temporary name, hash and fsync it, publish it at `path` without
    replacing, then record its digest beside it. False if another writer published it first: that
    shard is kept untouched and this one discarded.

    `arrays` holds the stored columns: sample_id (and position, offsets for tokens) and the
    encoding's columns as `enc.to_host` returns them. `codec`: one of CODECS (Zarr; Parquet takes
    zstd; None: the encoding's default, `default_codec`), at `level` (None: the codec's default).
    The backend is the one that names its shards with `path`'s suffix."""
    store = shard_backend(path)
    codec = default_codec(enc.name, store.name) if codec is None else codec
    problems = codec_problems(codec, level, store.name)
    if problems:
        raise ValueError(f"{path}: {problems[0]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = stored_columns(enc, "position" in arrays, [n for n in VIEW_COLUMNS if n in arrays])
    tmp = tmp_name(path)
    try:
        store.write(tmp, arrays, attrs, columns, chunk_rows, level, codec)
        digest, nbytes = sha256_tree(tmp, fsync=True)  # read back from the page cache
        published = store.publish(tmp, path)
        if published:
            fsync_dir(path.parent)
            atomic_write_json(digest_path(path), {"sha256": digest, "bytes": nbytes})
        return published
    finally:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


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

