"""Cache reader throughput over a numpy memmap of the same stored columns, read the same way.

For each encoding (top-32 16-bit and 8-bit over 1,000 classes, dense float16 over 100) and each
layout (`default`: what the cache stage writes when the layout and codec are left unset, the
encoding's default chunk rows and codec: chunks of about 2 MiB of stored rows (16,384 rows of
top-32, 8,192 of dense over 100 classes) of shuffle-lz4hc; `zarr_default_rows_zstd`: the default
chunk rows with zstd where they are not among the next; Zarr 4,096- and 16,384-row chunks with zstd and with
shuffle-lz4hc; Zarr 4,096-row chunks with shuffle-zstd; Parquet 4,096-row row groups),
rows/s of one epoch of the student's dataset (batches of 4,096 rows, buffers of 16,384 rows or 4
chunks, whichever is more, rows shuffled inside) over
  - the cache, through a fresh reader per epoch as every student job opens one. Each reader checks
    every shard against the manifest's sha256; the digest is remembered per machine while the
    shard's files keep their size, mtime and inode, so a reader after the first only stats them
    (the plain layout key), and the first reader on a machine (`_first_read`, a new digest store
    each epoch) reads and hashes every shard. `*_read_threads_4` decodes chunks on 4 threads
    instead of this machine's default (none on 2 cores: on the loader's own thread);
  - `memmap`: the exact stored columns (narrow ids, float16 or 8-bit values) as uncompressed .npy
    files, mapped, cut into the same chunks (joined into the buffer with one copy, as the cache
    decodes each chunk straight into it) and decoded by the same `encoding.decode` to what a batch
    carries (int32 ids; 16-bit values as stored, 8-bit ones dequantized; the targets are made where
    the loss runs, not here), through the same loader.
The comparison is fair: same rows in the same order, same batch size, same decode and dtype
conversions, same loader; what differs is only the storage (file reads, decompression or Parquet
pages, shard handles), which is what the ratio measures. Repeats are interleaved, best of n: the
machine is noisy, so compare within one run. `ratio` is of wall-clock rows/s (what a student sees,
reads overlapping compute on the loader's thread); `cpu_ratio` of rows per CPU second of this
process, steadier when other jobs share the cores.

    .venv/bin/python bench/reader.py [--rows 200000] [--repeats 5]

`codec_only_rows_per_s`: each Zarr layout's codec alone, decoding every chunk file already in memory
on one thread; `codec_ceiling`: that over memmap's rows/s, the most `ratio` can reach when chunks
are decoded on one thread (the default with 2 cores or fewer), however well reading overlaps the
rest of the epoch. `files_only_rows_per_s` and `files_ceiling`: the same for reading the chunk
files alone (open, one read from the page cache, close; no decoding): the cost of a file per chunk
and column, which small chunks multiply. `read_ceiling`: both on one thread, one after the other.

One JSON line per encoding: {"bench": "reader", "encoding": ..., "ratio": {layout: cache/memmap},
"goal": 0.5, ...}; then one line of every codec's bytes per row over more encodings (codec_bytes).
"""

from __future__ import annotations

from pipeline.core.host import tune_process

tune_process()  # the process settings the CLI's stages run under; before torch loads (libgomp reads them then)

import argparse
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timer, epoch_batches, line, record, workdir, write_cache

from pipeline.core.codecs import CODECS, default_codec
from pipeline.core.config import default_layout
from pipeline.format import reader as fmt
from pipeline.format.columns import Chunk
from pipeline.format.encodings import Dense, Encoding, TopK
from pipeline.format.manifest import read_manifest
from pipeline.format.shards import recorded_digest, shard_name, write_shard

BATCH, BUFFER_ROWS, ROWS_PER_SHARD = 4096, 16_384, 50_000
ENCODINGS: dict[str, Encoding] = {"topk32": TopK(1000, 32), "topk32_q8": TopK(1000, 32, bits=8), "dense100": Dense(100)}
LAYOUTS = {"zarr_4096": ("zarr", 4096, "zstd"), "zarr_4096_shuffle_lz4hc": ("zarr", 4096, "shuffle-lz4hc"),
           "zarr_4096_shuffle_zstd": ("zarr", 4096, "shuffle-zstd"), "zarr_16384": ("zarr", 16384, "zstd"),
           "zarr_16384_shuffle_lz4hc": ("zarr", 16384, "shuffle-lz4hc"), "parquet_4096": ("parquet", 4096, "zstd")}


class MemmapReader:
    """The reader surface the loader uses (rows, chunks, shards, is_whole_chunk, read_joined,
    read_many, decode) over mapped .npy columns."""

    def __init__(self, like: fmt.CacheReader, columns: dict[str, np.ndarray]) -> None:
        self.rows, self.dir, self.token_rows = like.rows, like.dir, like.token_rows
        self.encoding, self.temperature = like.encoding, like.temperature
        self.manifest, self.shards, self.chunk_rows = like.manifest, like.shards, like.chunk_rows
        self._chunks = like.chunks()
        self._first = [e["first_row"] for e in like.shards]
        self.is_whole_chunk = like.is_whole_chunk
        self.columns = columns

    def chunks(self) -> list[Chunk]:
        return self._chunks

    def decode(self, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"sample_id": stored["sample_id"], **self.encoding.decode(stored)}

    def read_joined(self, chunks: list[Chunk]) -> dict[str, np.ndarray]:
        """Whole chunks' stored columns joined: one copy out of the mapping, as the cache's fast
        path decodes each chunk straight into its place."""
        spans = [(self._first[c.shard] + c.start, self._first[c.shard] + c.stop) for c in chunks]
        return {k: np.concatenate([v[a:b] for a, b in spans]) for k, v in self.columns.items()}

    def read_many(self, chunks: list[Chunk], decode: bool = True) -> list[dict[str, np.ndarray]]:
        out = []
        for c in chunks:
            a, b = self._first[c.shard] + c.start, self._first[c.shard] + c.stop
            stored = {k: np.array(v[a:b]) for k, v in self.columns.items()}
            out.append(self.decode(stored) if decode else stored)
        return out


def stored_memmaps(d: Path, ws: Path) -> dict[str, np.ndarray]:
    """The stored columns of a Zarr cache, undecoded, as mapped .npy files under `ws`."""
    import zarr

    reader = fmt.CacheReader(d)
    parts: dict[str, list[np.ndarray]] = {}
    for e in reader.shards:
        group = zarr.open_group(str(d / e["path"]), mode="r")
        for name in reader.names:
            parts.setdefault(name, []).append(group[name][:])
    out = {}
    for name, chunks in parts.items():
        arr = np.concatenate(chunks)
        m = np.lib.format.open_memmap(ws / f"{name}.npy", mode="w+", dtype=arr.dtype, shape=arr.shape)
        m[:] = arr
        m.flush()
        out[name] = np.load(ws / f"{name}.npy", mmap_mode="c")  # writable (copy-on-write): no copy before a cast
    return out


def codec_only(d: Path, repeats: int) -> tuple[float, float]:
    """Rows/s over a Zarr cache of (the codec alone: every chunk file of every column, already in
    memory, decoded into a preallocated array on one thread; the files alone: every chunk file read
    from the page cache as the reader reads it, one system call into a kept buffer, not decoded),
    each the best of `repeats`. A reader that decodes this layout on one thread cannot beat either."""
    from pipeline.format.backends.zarr_shards import _read_file

    reader = fmt.CacheReader(d)
    jobs = []
    for c in reader.chunks():
        layout = reader._reads.layout(c.shard)
        assert layout is not None, d
        for col in layout.values():
            path = Path(col.file(c.start // reader.chunk_rows))
            if path.exists():  # zarr writes no chunk that is all fill value
                out = np.empty((reader.chunk_rows, *col.tail), col.dtype)
                jobs.append((col.decompress, str(path), path.read_bytes(), out))
    best = {"codec": math.inf, "files": math.inf}
    for _ in range(repeats):
        with Timer() as t:
            for decompress, _, raw, out in jobs:
                decompress(raw, out)
        best["codec"] = min(best["codec"], t.seconds)
        with Timer() as t:
            for _, path, raw, _ in jobs:
                _read_file(path, len(raw) + 1)
        best["files"] = min(best["files"], t.seconds)
    return reader.rows / best["codec"], reader.rows / best["files"]


def epoch_reader(make: Callable[[], Any], chunk_rows: int) -> Callable[[int], int]:
    """One epoch of the loader over a fresh reader from `make`, buffers of BUFFER_ROWS rows or 4
    chunks, whichever is more; returns the rows read."""
    def run(epoch: int) -> int:
        return sum(len(b["sample_id"]) for b in epoch_batches(make(), BATCH, 0, max(4, BUFFER_ROWS // chunk_rows), epoch))
    return run


def layouts(enc: Encoding) -> dict[str, tuple[str, int, str]]:
    """LAYOUTS, `default` (what the cache stage writes for `enc` when layout and codec are unset) and
    `zarr_default_rows_zstd` (the default chunk rows with zstd) where that is not among LAYOUTS."""
    chunk_rows, _ = default_layout("classify", 1, 0, enc.raw_bytes_per_row() + 8)  # + sample_id
    extra = {} if chunk_rows in (4096, 16384) else {"zarr_default_rows_zstd": ("zarr", chunk_rows, "zstd")}
    return {"default": ("zarr", chunk_rows, default_codec(enc.name, "zarr")), **extra, **LAYOUTS}


def bench(name: str, enc: Encoding, rows: int, repeats: int) -> None:
    lays = layouts(enc)
    ws = workdir(f"reader-{name}")
    try:
        dirs = {lay: write_cache(ws / lay, rows, enc.num_classes, enc, ROWS_PER_SHARD, c, backend=b, codec=codec)
                for lay, (b, c, codec) in lays.items()}
        (ws / "npy").mkdir()
        columns = stored_memmaps(dirs["zarr_4096"], ws / "npy")
        readers: dict[str, Callable[[int], int]] = {}
        stores = iter(range(1 << 30))

        def with_store(d: Path, fresh: bool, threads: int | None = None) -> fmt.CacheReader:
            store = f"{next(stores)}.sqlite" if fresh else "kept.sqlite"
            os.environ["LOGITCACHE_DIGESTS"] = str(ws / "digests" / store)
            return fmt.CacheReader(d, read_threads=threads)

        for lay, d in dirs.items():
            readers[lay] = epoch_reader(lambda d=d: with_store(d, fresh=False), lays[lay][1])
            readers[f"{lay}_first_read"] = epoch_reader(lambda d=d: with_store(d, fresh=True), lays[lay][1])
        for lay in ("zarr_4096", "zarr_4096_shuffle_lz4hc"):
            readers[f"{lay}_read_threads_4"] = epoch_reader(lambda d=dirs[lay]: with_store(d, False, threads=4),
                                                            lays[lay][1])
        for chunk_rows in sorted({c for _, c, _ in lays.values()}):
            like = dirs[next(lay for lay, (b, c, _) in lays.items() if b == "zarr" and c == chunk_rows)]
            readers[f"memmap_{chunk_rows}"] = epoch_reader(lambda like=like: MemmapReader(fmt.CacheReader(like), columns),
                                                           chunk_rows)
        best = dict.fromkeys(readers, 0.0)
        best_cpu = dict.fromkeys(readers, 0.0)
        for r in range(repeats):
            for key, fn in readers.items():
                cpu = time.process_time()
                with Timer() as t:
                    n = fn(r)
                cpu = time.process_time() - cpu
                assert n == rows, (key, n)
                best[key] = max(best[key], n / t.seconds)
                best_cpu[key] = max(best_cpu[key], n / cpu)

        alone = {lay: codec_only(dirs[lay], repeats) for lay, (b, _, _) in lays.items() if b == "zarr"}
        codec, files = {k: v[0] for k, v in alone.items()}, {k: v[1] for k, v in alone.items()}

        def over_memmap(key: str, figures: dict[str, float]) -> float:
            layout = key.removesuffix("_first_read").removesuffix("_read_threads_4")
            return round(figures[key] / figures[f"memmap_{lays[layout][1]}"], 3)

        record(f"reader-{name}", line("reader", encoding=name, label=enc.label(), classes=enc.num_classes, rows=rows,
                                       batch=BATCH,
             goal=0.5, ratio={k: over_memmap(k, best) for k in readers if not k.startswith("memmap")},
             cpu_ratio={k: over_memmap(k, best_cpu) for k in readers if not k.startswith("memmap")},
             rows_per_s={k: round(v) for k, v in best.items()},
             rows_per_cpu_s={k: round(v) for k, v in best_cpu.items()},
             codec_only_rows_per_s={k: round(v) for k, v in codec.items()},
             codec_ceiling={k: round(v / best[f"memmap_{lays[k][1]}"], 3) for k, v in codec.items()},
             files_only_rows_per_s={k: round(v) for k, v in files.items()},
             files_ceiling={k: round(v / best[f"memmap_{lays[k][1]}"], 3) for k, v in files.items()},
             read_ceiling={k: round(1 / (1 / codec[k] + 1 / files[k]) / best[f"memmap_{lays[k][1]}"], 3)
                           for k in codec},
             first_read_over_later={k: round(best[f"{k}_first_read"] / best[k], 3) for k in dirs},
             bytes_per_row={k: read_manifest(d)["bytes_per_row"] for k, d in dirs.items()}))
    finally:
        shutil.rmtree(ws, ignore_errors=True)


def codec_bytes(rows: int = 8192) -> None:
    """Bytes per row of every codec for more encodings and chunk sizes than the timed ones (the
    demo's dense over 10 classes at 256-row chunks, dense over 100 at the default 512; LM-sized top-k
    and hybrid; sampled): one JSON
    line, {"bench": "reader_codec_bytes", "bytes_per_row": {"label/chunk_rows": {codec: B/row}}}."""
    import torch
    from common import synthetic_logits

    from pipeline.format.encodings import Hybrid, Sampled

    cases = [(Dense(10), 256), (Dense(100), 512), (TopK(10, 3), 256), (TopK(1000, 10, bits=8), 4096),
             (Sampled(1000, 16), 256),
             (TopK(32_000, 8), 2048), (Hybrid(32_000, 8, 16, 8), 2048)]
    ws = workdir("reader-codecs")
    try:
        out: dict[str, dict[str, float]] = {}
        for enc, chunk_rows in cases:
            logits = (synthetic_logits(rows, enc.num_classes) if enc.num_classes <= 1000
                      else torch.randn(rows, enc.num_classes, generator=torch.Generator().manual_seed(0)) * 3)
            arrays = enc.to_host(enc.encode(torch.log_softmax(logits, -1), torch.Generator().manual_seed(1)))
            arrays["sample_id"] = np.arange(rows, dtype=np.int64)
            sizes = {}
            for codec in CODECS:
                shard = ws / f"{enc.label()}-{chunk_rows}-{codec}" / "shards" / shard_name(0, "zarr")
                write_shard(shard, arrays, {}, enc, chunk_rows, None, codec)
                sizes[codec] = round(recorded_digest(shard)[1] / rows, 1)
            out[f"{enc.label()}/{chunk_rows}"] = sizes
        record("reader-codec_bytes", line("reader_codec_bytes", rows=rows, bytes_per_row=out))
    finally:
        shutil.rmtree(ws, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default=",".join(ENCODINGS), help="comma-separated: " + ", ".join(ENCODINGS))
    args = ap.parse_args()
    for name in args.only.split(","):
        bench(name, ENCODINGS[name], args.rows, args.repeats)
    codec_bytes()


if __name__ == "__main__":
    main()
