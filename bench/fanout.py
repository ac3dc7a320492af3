"""Cache stage fan-out: serial vs a 2-worker Dask LocalCluster, side by side in one run.

    .venv/bin/python bench/fanout.py [--rows 48000] [--rows-per-shard 1000] [--repeats 3]

Prints one JSON line. `speedups`: per repeat, serial time (one process, one torch thread) /
LocalCluster time (2 worker processes, one torch thread each, a fresh cluster each repeat), both
writing the same top-k cache with a compute-heavy teacher, the runs in turn; `speedup` is the
least of them (the goal holds over every run). `speedup_vs_serial_all_threads` compares with one
process using every core through torch's intra-op threads. `overhead_s_per_task` = extra
worker-seconds per shard that Dask spends beyond the serial work: (2 * t_dask - t_serial) /
shards. Cluster start-up is reported separately and not counted. `machine_two_process_gains`:
per repeat, right after its runs, the same single-threaded teacher-like compute in two processes at
once over one alone (no files, no Dask): what the two cores allowed then (2.0: a whole core each;
less when the host's other guests take a share). The last repeat's figures give
the breakdown and the per-task overhead.

`breakdown`, where the Dask run's time goes (of the last repeat) (docs/scaling-out.md "Where the time goes"):
  - `serial_cores_used`: CPU seconds of the serial process (its compute thread and the shard
    writer thread beside it) over its wall time; above 1, the serial run already uses part of the
    second core, and 2 workers can at best gain 2 / that.
  - `dask_cores_used`: the workers' CPU seconds over the Dask run's wall time; `dask_cpu_s` splits
    the CPU seconds of the run between the workers, their nannies, and this process (which runs
    LocalCluster's scheduler).
  - `tasks`, `task_s`: the Dask tasks (groups of shards) and the seconds their compute took, from
    the task stream; `teacher_setup_s`: the context from the files and the teachers loaded, timed
    in a worker (a worker now loads the teachers once per stage, not once per task);
    `idle_worker_s`: worker-seconds of the run with no task computing (scheduling, start and tail
    imbalance), 2 * t_dask - task_s. `task_s` well above the workers' CPU seconds means the workers
    waited for a core: other processes had them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])

from common import heavy_workspace, record
from distributed import get_task_stream

from pipeline.core.config import load_config
from pipeline.run.fanout import open_client
from stages import cache as cache_stage


def _warm() -> int:
    import torch

    import stages.cache  # noqa: F401

    return torch.get_num_threads()


def _setup_seconds(config: str, root: str) -> float:
    """What a task spends before its first shard: the context from the files and the teachers loaded."""
    from pipeline.run.identity import context
    from pipeline.run.targets import load_models

    start = time.perf_counter()
    load_models(context(load_config(config, [f"cache.root={root}"])))
    return time.perf_counter() - start


def _cpu_seconds() -> tuple[float, float]:
    """CPU seconds of this process and of its parent (a worker's nanny)."""
    import psutil

    me, parent = psutil.Process(), psutil.Process().parent()
    return sum(me.cpu_times()[:2]), sum(parent.cpu_times()[:2]) if parent is not None else 0.0


def _cluster_cpu(client) -> dict[str, float]:
    """CPU seconds so far of the workers and their nannies."""
    per_worker = client.run(_cpu_seconds).values()
    return {"workers": sum(w for w, _ in per_worker), "nannies": sum(n for _, n in per_worker)}


SCALING = r"""
import sys, time, torch
torch.set_num_threads(1)
torch.manual_seed(0)
w1, w2, x = torch.randn(64, 2048), torch.randn(2048, 1000), torch.randn(1000, 64)
for _ in range(3):
    torch.log_softmax(torch.relu(x @ w1) @ w2, -1).topk(32)
start = time.perf_counter()
for _ in range(int(sys.argv[1])):
    torch.log_softmax(torch.relu(x @ w1) @ w2, -1).topk(32)
print(time.perf_counter() - start)
"""


def machine_scaling(batches: int = 24) -> float:
    """Throughput of the same single-threaded teacher-like compute (no files, no Dask) in two
    processes at once over one process alone: 2.0 when both cores give a whole core each. What the
    machine allows, to read the Dask speedup against."""
    def run(n: int) -> list[float]:
        procs = [subprocess.Popen([sys.executable, "-c", SCALING, str(batches)], stdout=subprocess.PIPE, text=True)
                 for _ in range(n)]
        return [float(p.communicate()[0]) for p in procs]

    alone = run(1)[0]
    return round(2 * alone / max(run(2)), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=48000)
    ap.add_argument("--rows-per-shard", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3, help="serial and Dask runs, in turn, each Dask run on a fresh cluster")
    args = ap.parse_args()

    ws, _ = heavy_workspace("fanout", args.rows, {"rows_per_shard": args.rows_per_shard, "chunk_rows": 500,
                                                   "batch_size": 1000})
    shards = -(-args.rows // args.rows_per_shard)

    def timed(root: str, client=None, **over) -> float:
        c = load_config(ws / "c.yaml", [f"cache.root={ws / root}", *[f"{k}={v}" for k, v in over.items()]])
        start = time.perf_counter()
        cache_stage.main(c, client=client)
        return time.perf_counter() - start

    def serial(root: str) -> tuple[float, float]:
        """Seconds and CPU seconds of the serial run on one torch thread."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        cpu = time.process_time()
        seconds = timed(root)
        torch.set_num_threads(threads)
        return seconds, time.process_time() - cpu

    def dask(root: str) -> dict[str, float]:
        """The Dask run on a fresh 2-worker LocalCluster: its seconds, start-up and breakdown."""
        dask_cfg = load_config(ws / "c.yaml", ["cluster.kind=local", "cluster.workers=2"])
        start = time.perf_counter()
        with open_client(dask_cfg.cluster) as client:
            client.wait_for_workers(2)
            client.run(_warm)  # imports (torch) are worker start-up, not per-task cost
            startup = time.perf_counter() - start
            setup = min(client.run(_setup_seconds, str(ws / "c.yaml"), str(ws / f"probe-{root}")).values())
            before = _cluster_cpu(client)
            here = time.process_time()
            with get_task_stream(client) as stream:
                seconds = timed(root, client)
            after = _cluster_cpu(client)
            cpu = {k: round(after[k] - before[k], 2) for k in after}
            cpu["scheduler_and_driver"] = round(time.process_time() - here, 2)  # LocalCluster's scheduler runs here
            task_s = sum(ss["stop"] - ss["start"] for t in stream.data for ss in t["startstops"]
                         if ss["action"] == "compute")
            return {"seconds": seconds, "startup": startup, "setup": setup, "cpu": cpu, "task_s": task_s,
                    "tasks": len(stream.data)}

    runs = []
    for r in range(args.repeats):
        t_serial, serial_cpu = serial(f"serial1-{r}")
        runs.append({"serial": t_serial, "serial_cpu": serial_cpu, **dask(f"dask-{r}"), "machine": machine_scaling()})
    threads = torch.get_num_threads()
    t_serial_all = timed("serial_all")

    roots = [f"serial1-{r}" for r in range(args.repeats)] + [f"dask-{r}" for r in range(args.repeats)] + ["serial_all"]
    ids = {p.name for root in roots for p in (ws / root).iterdir()}
    shards_of = [json.loads((ws / r / next(iter(ids)) / "manifest.json").read_text())["shards"] for r in roots]
    same = len(ids) == 1 and all(s == shards_of[0] for s in shards_of)
    speedups = [run["serial"] / run["seconds"] for run in runs]
    last = runs[-1]
    record("fanout", {
        "bench": "fanout", "rows": args.rows, "shards": shards, "cores": os.cpu_count(), "repeats": args.repeats,
        "serial_1thread_s": [round(run["serial"], 3) for run in runs], f"serial_{threads}threads_s": round(t_serial_all, 3),
        "dask_2workers_s": [round(run["seconds"], 3) for run in runs],
        "cluster_startup_s": [round(run["startup"], 3) for run in runs],
        "speedups": [round(x, 3) for x in speedups],
        "speedup": round(min(speedups), 3),  # the goal holds over every run, or it does not hold
        "speedup_vs_serial_all_threads": round(t_serial_all / last["seconds"], 3),
        "overhead_s_per_task": round((2 * last["seconds"] - last["serial"]) / shards, 4),
        "caches_identical": same,
        "machine_two_process_gains": [run["machine"] for run in runs],
        "breakdown": {"serial_cores_used": round(last["serial_cpu"] / last["serial"], 3),
                      "dask_cores_used": round(last["cpu"]["workers"] / last["seconds"], 3), "dask_cpu_s": last["cpu"],
                      "tasks": last["tasks"], "task_s": round(last["task_s"], 2),
                      "teacher_setup_s": round(last["setup"], 3),
                      "idle_worker_s": round(2 * last["seconds"] - last["task_s"], 2)},
    })


if __name__ == "__main__":
    main()
