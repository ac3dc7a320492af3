"""Cache stage fan-out: serial vs a 2-worker Dask LocalCluster, side by side in one run.

    .venv/bin/python bench/fanout.py [--rows 48000] [--rows-per-shard 1000]

Prints one JSON line. `speedup` = serial time (one process, one torch thread) / LocalCluster time
(2 worker processes, one torch thread each), both writing the same top-k cache with a
compute-heavy teacher; `speedup_vs_serial_all_threads` compares with one process using every
core through torch's intra-op threads. `overhead_s_per_task` = extra worker-seconds per shard
that Dask spends beyond the serial work: (2 * t_dask - t_serial) / shards. Cluster start-up is
reported separately and not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])

from common import heavy_workspace, record

from pipeline.core.config import load_config
from pipeline.run.fanout import open_client
from stages import cache as cache_stage


def _warm() -> int:
    import torch

    import stages.cache  # noqa: F401

    return torch.get_num_threads()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=48000)
    ap.add_argument("--rows-per-shard", type=int, default=1000)
    args = ap.parse_args()

    ws, _ = heavy_workspace("fanout", args.rows, {"rows_per_shard": args.rows_per_shard, "chunk_rows": 500,
                                                   "batch_size": 1000})
    shards = -(-args.rows // args.rows_per_shard)

    def timed(root: str, client=None, **over) -> float:
        c = load_config(ws / "c.yaml", [f"cache.root={ws / root}", *[f"{k}={v}" for k, v in over.items()]])
        start = time.perf_counter()
        cache_stage.main(c, client=client)
        return time.perf_counter() - start

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t_serial = timed("serial1")
    torch.set_num_threads(threads)
    t_serial_all = timed("serial_all")

    dask_cfg = load_config(ws / "c.yaml", ["cluster.kind=local", "cluster.workers=2"])
    start = time.perf_counter()
    with open_client(dask_cfg.cluster) as client:
        client.wait_for_workers(2)
        client.run(_warm)  # imports (torch) are worker start-up, not per-task cost
        startup = time.perf_counter() - start
        t_dask = timed("dask", client)

    ids = {p.name for root in ("serial1", "serial_all", "dask") for p in (ws / root).iterdir()}
    same = len(ids) == 1 and all(
        json.loads((ws / r / next(iter(ids)) / "manifest.json").read_text())["shards"]
        == json.loads((ws / "serial1" / next(iter(ids)) / "manifest.json").read_text())["shards"]
        for r in ("serial_all", "dask"))
    record("fanout", {
        "bench": "fanout", "rows": args.rows, "shards": shards, "cores": os.cpu_count(),
        "serial_1thread_s": round(t_serial, 3), f"serial_{threads}threads_s": round(t_serial_all, 3),
        "dask_2workers_s": round(t_dask, 3), "cluster_startup_s": round(startup, 3),
        "speedup": round(t_serial / t_dask, 3),
        "speedup_vs_serial_all_threads": round(t_serial_all / t_dask, 3),
        "overhead_s_per_task": round((2 * t_dask - t_serial) / shards, 4),
        "caches_identical": same,
    })


if __name__ == "__main__":
    main()
