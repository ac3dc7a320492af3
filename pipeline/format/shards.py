"""Writing one shard atomically (Zarr v3 group or Parquet file) and recording its digest beside it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.codecs import CODECS, codec_problems
from pipeline.core.errors import CacheError
from pipeline.core.io import (
    atomic_write_json,
    fsync_dir,
    publish_dir,
    publish_file,
    sha256_tree,
    tmp_name,
    tree_size,
)
from pipeline.format.columns import OFFSETS, VIEW_COLUMNS, stored_columns
from pipeline.format.encodings import Column, Encoding


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

