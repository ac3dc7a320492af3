"""Reading a cache from object storage: a student's epoch of batches from an S3-compatible server on
localhost (moto's server mode) through the local shard cache, cold (every shard downloaded and
checked) and warm (every shard already local), each as a ratio of rows/s to reading the same cache
from local disk. Measured side by side: local and warm take turns in every repeat, then the cold
reads (each after clearing the shard cache), each a freshly opened cache (as a student run opens it: the first read of each shard checks it against
the manifest, a stat per file once its digest is remembered), and the median of each is kept.

    .venv/bin/python bench/object_storage.py [--rows 262144] [--repeats 5]

The cache: rows of 1,000 classes, top-10 8-bit, 16,384 rows a shard in 4,096-row chunks, written
by CacheWriter and published with `remote.push`. The epoch: `Cache.dataset(batch_size=256)`, the
API and student stage's read path (reading, decoding, re-tempering), no model. Goal: warm >= 0.9
of local (a warm read is a local read plus a stat and a touch per shard); the cold figure is the
price of the first epoch on a machine and depends on the store. One JSON line:
{"bench": "object_storage", "ratio": {"warm": ..., "cold": ...}, "rows_per_s": {...}, ...}.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import line, record, synthetic_logits, workdir

import pipeline as lc
from pipeline.format import remote


def epoch_rows_per_s(cache: lc.Cache) -> float:
    ds = cache.dataset(batch_size=256, seed=0)
    start, rows = time.perf_counter(), 0
    for batch in ds:
        rows += int(batch["sample_id"].shape[0])
    return rows / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=262_144)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from moto.server import ThreadedMotoServer

    root = workdir("object-storage")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}")
    os.environ["LOGITCACHE_SHARD_CACHE"] = str(root / "shard-cache")
    try:
        spec = {"teacher": {"name": "synthetic", "revision": "0"}, "dataset": {"fingerprint": "bench-object-storage"}}
        with lc.CacheWriter(root / "caches", spec=spec, encoding={"name": "topk", "k": 10, "bits": 8},
                            num_classes=1000, rows_per_shard=16_384, chunk_rows=4096) as w:
            for s in range(0, args.rows, 8192):
                n = min(8192, args.rows - s)
                w.add(list(range(s, s + n)), logits=synthetic_logits(n, 1000, seed=s))
        fs, _ = remote.filesystem("s3://bench")
        fs.mkdir("bench")
        url = remote.push(w.path, "s3://bench/caches")
        local = lc.open_cache(w.path)
        time.sleep(2.5)  # past the memo's freshness window: the local shards' digests are remembered
        epoch_rows_per_s(local)  # page cache warm for the local reads
        figures: dict[str, list[float]] = {"local": [], "cold": [], "warm": []}
        epoch_rows_per_s(lc.open_cache(url))  # fills the shard cache for the warm reads
        time.sleep(2.5)
        for _ in range(args.repeats):
            gc.collect()
            figures["local"].append(epoch_rows_per_s(lc.open_cache(w.path)))
            gc.collect()
            figures["warm"].append(epoch_rows_per_s(lc.open_cache(url)))
        for _ in range(args.repeats):
            shutil.rmtree(root / "shard-cache", ignore_errors=True)
            gc.collect()
            figures["cold"].append(epoch_rows_per_s(lc.open_cache(url)))
        med = {k: statistics.median(v) for k, v in figures.items()}
        warm, cold = med["warm"] / med["local"], med["cold"] / med["local"]
        record("object_storage", line(
            "object_storage", ratio={"warm": round(warm, 3), "cold": round(cold, 3)}, goal={"warm": 0.9},
            met=warm >= 0.9, rows_per_s={k: round(v) for k, v in med.items()},
            runs={k: [round(x) for x in v] for k, v in figures.items()}, rows=args.rows,
            cache_mb=round(local.manifest["bytes"] / 2**20, 1), shards=len(local.manifest["shards"]),
            store="moto server on localhost"))
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
