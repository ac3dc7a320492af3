"""Parquet shards: one file per shard, one row group per chunk; per-row pairs of values as
fixed-size lists, written without dictionary encoding (it halves read speed on float data)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipeline.core.codecs import CODECS
from pipeline.core.io import publish_file
from pipeline.format.columns import Chunk
from pipeline.format.encodings import Column


class ParquetShards:
    name: ClassVar[str] = "parquet"
    suffix: ClassVar[str] = ".parquet"

    def write(self, tmp: Path, arrays: dict[str, np.ndarray], attrs: dict[str, Any], columns: list[Column],
              chunk_rows: int, level: int | None, codec: str) -> None:
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
        pq.write_table(table, tmp, row_group_size=chunk_rows, compression="zstd",
                       compression_level=CODECS["zstd"].default_level if level is None else level,
                       use_dictionary=False, column_encoding=encodings, write_statistics=False)

    def publish(self, tmp: Path, path: Path) -> bool:
        return publish_file(tmp, path)

    def open(self, path: Path, names: list[str]) -> Any:
        import pyarrow.parquet as pq

        return pq.ParquetFile(path)

    def sample_ids(self, path: Path) -> np.ndarray:
        import pyarrow.parquet as pq

        return pq.read_table(path, columns=["sample_id"]).column(0).to_numpy()

    def reads(self, reader: Any) -> ParquetReads:
        return ParquetReads(reader)


class ParquetReads:
    def __init__(self, reader: Any) -> None:
        self.reader = reader

    def read_many(self, chunks: list[Chunk], decode: bool) -> list[dict[str, np.ndarray]]:
        """Shard by shard, on the reader's threads when there are several shards: a pyarrow
        ParquetFile is not safe to share between threads (each shard's row groups in one call)."""
        groups: dict[int, list[Chunk]] = {}
        for c in chunks:
            groups.setdefault(c.shard, []).append(c)
        parts = self.reader.map(lambda g: self._read_shard(g, decode), list(groups.values()))
        got = {c: part for g, ps in zip(groups.values(), parts) for c, part in zip(g, ps)}
        return [got[c] for c in chunks]

    def read_joined(self, chunks: list[Chunk]) -> dict[str, np.ndarray] | None:
        return None  # row groups are read, then joined by the reader

    def _read_shard(self, chunks: list[Chunk], decode: bool) -> list[dict[str, np.ndarray]]:
        """Chunks (row groups) of one shard in one read_row_groups call of all columns, on pyarrow's
        threads when there are several (a single small row group costs more in handoff than it
        saves), then cut into chunks without copying."""
        import pyarrow as pa

        r = self.reader
        table = r.handle(chunks[0].shard).read_row_groups([c.index for c in chunks], columns=r.names,
                                                          use_threads=len(chunks) > 1)
        out, first = [], 0
        for c in chunks:
            cols = {}
            for name, col in zip(r.names, table.slice(first, c.stop - c.start).columns):
                arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
                if pa.types.is_fixed_size_list(arr.type):  # flatten: the slice's values, not the whole page's
                    cols[name] = arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)
                else:
                    cols[name] = arr.to_numpy(zero_copy_only=False)
            out.append(r.decode(cols) if decode else cols)
            first += c.stop - c.start
        return out
