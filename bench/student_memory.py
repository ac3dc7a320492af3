"""Peak RSS of a student streaming one epoch from a cache 10x larger over 1x, each in a fresh
process (same model, batch, shuffle buffer). Memory must not grow with the cache.

    .venv/bin/python bench/student_memory.py [--rows 40000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import emit, workdir, write_cache
from student_streaming import train

from pipeline import cache as fmt
from pipeline.encodings import TopK
from pipeline.loader import ChunkShuffleLoader


def child(cache_dir: str) -> None:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 1000))
    loader = ChunkShuffleLoader(fmt.CacheReader(Path(cache_dir)), 512, seed=0, shuffle_chunks=4)
    steps = train(loader.batches(0), m, torch.optim.Adam(m.parameters(), 1e-3))
    print(json.dumps({"steps": steps, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=40_000)
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    ws = workdir("memory")
    enc = TopK(1000, 32)
    small = write_cache(ws / "1x", args.rows, 1000, enc, 20_000, 4096)
    large = write_cache(ws / "10x", 10 * args.rows, 1000, enc, 20_000, 4096)
    rss = {}
    for name, d in (("1x", small), ("10x", large)):
        out = subprocess.run([sys.executable, __file__, "--child", str(d)], capture_output=True, text=True, check=True)
        rss[name] = json.loads(out.stdout.strip().splitlines()[-1])["maxrss_kb"]
    emit("student_memory", rows_1x=args.rows, rows_10x=10 * args.rows, peak_rss_mb_1x=round(rss["1x"] / 1024, 1),
         peak_rss_mb_10x=round(rss["10x"] / 1024, 1), ratio=round(rss["10x"] / rss["1x"], 3), goal=1.10,
         cache_mb_10x=round(fmt.read_manifest(large)["bytes"] / 2**20, 1))


if __name__ == "__main__":
    main()
