"""Scale: bounded open files, a global shuffle, and batch-job progress lines."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import numpy as np
import torch

from conftest import REPO
from pipeline import cache as fmt
from pipeline.encodings import TopK


def _many_shard_cache(d, shards: int, rows: int, backend: str = "parquet", distinct: int = 50):
    enc = TopK(10, 2, 16)
    spec = {"layout": {"chunk_rows": rows, "backend": backend, "rows_per_shard": rows}, "num_classes": 10,
            "encoding": enc.params(), "temperature": 1.0, "dataset": {"fingerprint": "x", "rows": shards * rows}}
    entries = []
    logp = np.log(np.full((rows, 10), 0.1, dtype=np.float32))
    stored = enc.to_host(enc.encode(torch.from_numpy(logp), None))
    for i in range(shards):
        path = d / "shards" / fmt.shard_name(i, backend)
        if i < distinct:
            ids = np.arange(i * rows, (i + 1) * rows, dtype=np.int64)
            fmt.write_shard(path, {"sample_id": ids, **stored}, {}, enc, rows, 1)
        else:  # copies of the first shard: writing thousands of real ones is slow and tests nothing more
            shutil.copyfile(d / "shards" / fmt.shard_name(i % distinct, backend), path)
        entries.append({"index": i, "path": f"shards/{fmt.shard_name(i, backend)}", "first_row": i * rows,
                        "rows": rows, "sha256": "-", "bytes": 0})
    fmt.write_manifest(d, spec, entries, {})
    return d


def test_a_5000_shard_cache_reads_under_ulimit_256(tmp_path):
    d = _many_shard_cache(tmp_path / "c", 5000, 2)
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        from pathlib import Path
        from pipeline.cache import CacheReader
        from pipeline.loader import ChunkShuffleLoader
        r = CacheReader(Path({str(d)!r}))
        n = sum(len(b["sample_id"]) for b in ChunkShuffleLoader(r, 64, 0, 4).batches(0))
        again = sum(len(r.read(c)["sample_id"]) for c in r.chunks()[::-7])
        assert len(r._handles) <= 64, len(r._handles)
        print(n, again)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "10000"


def test_handle_lru_keeps_at_most_max_open(tmp_path):
    d = _many_shard_cache(tmp_path / "c", 12, 3)
    r = fmt.CacheReader(d, max_open=5)
    rows = [r.read(c)["sample_id"] for c in r.chunks()]
    assert len(r._handles) == 5
    assert np.array_equal(np.concatenate(rows), np.arange(36))
    assert np.array_equal(np.concatenate([r.read(c)["sample_id"] for c in r.chunks()[::-1]]),
                          np.arange(36).reshape(12, 3)[::-1].reshape(-1))
