"""Writing one shard atomically through its backend and recording its digest beside it, and the
one diagnosis of a shard whose digest differs from its manifest's (used by every reader and check).

A shard's record (<cache>/digests/<shard>.json) holds its sha256, its bytes and a seal over both and
the shard's name: finalize takes the digest from a record only when its seal holds, and hashes the
shard again otherwise, so an edited or damaged record never enters a manifest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.codecs import codec_problems, default_codec
from pipeline.core.errors import CacheError
from pipeline.core.io import atomic_write_json, fsync_dir, hash_json, sha256_tree, tmp_name, tree_size
from pipeline.core.progress import log
from pipeline.format.backends import shard_backend, shard_name
from pipeline.format.columns import VIEW_COLUMNS, stored_columns
from pipeline.format.encodings import Encoding

__all__ = ["digest_path", "mismatch", "record_of", "recorded_digest", "sealed_record", "shard_entry", "shard_name",
           "write_shard"]


def digest_path(shard: Path) -> Path:
    """The sidecar where a shard's writer records its sha256 and size: <cache>/digests/<shard>.json
    (beside shards/, which holds shards only)."""
    return shard.parent.parent / "digests" / f"{shard.name}.json"


def write_shard(path: Path, arrays: dict[str, np.ndarray], attrs: dict[str, Any], enc: Encoding,
                chunk_rows: int, level: int | None = None, codec: str | None = None) -> bool:
    """Write one shard to a temporary name, hash and fsync it, publish it at `path` without
    replacing, then record its digest beside it. False if another writer published it first: that
    shard is kept untouched and this one discarded.

    `arrays` holds the stored columns: sample_id (and position, offsets for tokens, and the
    alignment columns of text), the view columns and the encoding's columns as `enc.to_host` returns them. `codec`: one of CODECS (Zarr; Parquet takes
    zstd; None: the encoding's default, `default_codec`), at `level` (None: the codec's default).
    The backend is the one that names its shards with `path`'s suffix."""
    store = shard_backend(path)
    codec = default_codec(enc.name, store.name) if codec is None else codec
    problems = codec_problems(codec, level, store.name)
    if problems:
        raise ValueError(f"{path}: {problems[0]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = stored_columns(enc, "position" in arrays, [n for n in VIEW_COLUMNS if n in arrays], "span_start" in arrays)
    tmp = tmp_name(path)
    try:
        store.write(tmp, arrays, attrs, columns, chunk_rows, level, codec)
        digest, nbytes = sha256_tree(tmp, fsync=True)  # read back from the page cache
        published = store.publish(tmp, path)
        if published:
            fsync_dir(path.parent)
            atomic_write_json(digest_path(path), sealed_record(path.name, digest, nbytes))
        return published
    finally:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


def shard_entry(cache_dir: Path, index: int, backend: str, first_row: int, rows: int) -> dict[str, Any]:
    """A shard's manifest entry from its writer's sidecar and a stat: the shard is not re-read."""
    rel = f"shards/{shard_name(index, backend)}"
    digest, nbytes = recorded_digest(cache_dir / rel)
    return {"index": index, "path": rel, "first_row": first_row, "rows": rows, "sha256": digest, "bytes": nbytes}


def sealed_record(name: str, digest: str, nbytes: int) -> dict[str, Any]:
    return {"sha256": digest, "bytes": nbytes, "seal": hash_json([name, digest, nbytes])[:16]}


def record_of(name: str, recorded: Any) -> tuple[str, int] | None:
    """(sha256, bytes) of a shard's record whose seal holds; None for one edited, damaged or unsealed."""
    if not isinstance(recorded, dict):
        return None
    digest, nbytes = recorded.get("sha256"), recorded.get("bytes")
    if not isinstance(digest, str) or isinstance(nbytes, bool) or not isinstance(nbytes, int):
        return None
    return (digest, nbytes) if recorded == sealed_record(name, digest, nbytes) else None


def _read_record(shard: Path) -> tuple[str, int] | None:
    try:
        return record_of(shard.name, json.loads(digest_path(shard).read_text()))
    except (OSError, ValueError):
        return None


def recorded_digest(shard: Path) -> tuple[str, int]:
    """(sha256, bytes) its writer recorded beside a shard, checked against the shard's size on disk.

    A shard without a record whose seal holds (its writer was killed between publishing the shard
    and writing the record, or the record was edited or damaged since) is hashed here and the
    record written again."""
    side = digest_path(shard)
    size = tree_size(shard)
    record = _read_record(shard)
    if record is not None:
        digest, nbytes = record
    else:
        if side.exists():
            log(f"{side}: the record of {shard.name} was edited or damaged (its seal does not hold); "
                "hashing the shard again")
        digest, nbytes = sha256_tree(shard)
        atomic_write_json(side, sealed_record(shard.name, digest, nbytes))
    if nbytes != size:
        raise CacheError(f"{shard}: holds {size} bytes but its writer wrote {nbytes}; the shard is corrupt, "
                         "delete it and rerun `logitcache cache CONFIG`")
    return digest, nbytes


def mismatch(shard: Path, listed: str, actual: str) -> str:
    """The one message for a shard whose sha256 (`actual`) differs from the manifest's (`listed`):
    which of the two is wrong, by the writer's sealed record, and what to do about it."""
    record = _read_record(shard)
    manifest = shard.parent.parent / "manifest.json"
    if record is not None and record[0] == actual:
        return (f"{shard}: checksum mismatch with {manifest}, but the shard matches its writer's sealed record "
                f"{digest_path(shard)}: the manifest was edited, not the shard; delete {manifest} and rerun "
                "`logitcache cache CONFIG` to write it again from the records (nothing is recomputed)")
    return f"{shard}: checksum mismatch, the shard is corrupt; delete it and rerun `logitcache cache CONFIG`"

