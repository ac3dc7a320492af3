"""Run a stage's shards in-process or on Dask: a LocalCluster, an existing scheduler, or Slurm.

    with open_client(cfg.cluster) as client:
        results = run_all(client, cfg, run_shard, shards, rows=..., desc="cache", gpu=True)

The project never schedules anything itself: Dask maps the pending shards over its workers and
reruns a task whose worker died (`cluster.retries`). Shards are idempotent (each is written under a
temporary name and renamed), so a rerun can never duplicate rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from pipeline.core.config import ClusterConfig, Config
from pipeline.core.errors import ConfigError, LogitcacheError
from pipeline.core.host import worker_environ
from pipeline.core.progress import bar, log


@contextlib.contextmanager
def open_client(cluster: ClusterConfig, array_task: bool = False) -> Iterator[Any]:
    """Yield a dask.distributed Client whose workers have started, or None for in-process runs.

    An array task (--shard-index) is itself one of many Slurm jobs: it runs in-process and never
    opens the cluster, which would submit worker jobs from every task of the array."""
    if cluster.kind == "none" or array_task:
        if array_task and cluster.kind != "none":
            log(f"array task: cluster.kind={cluster.kind} ignored, running this task's share in-process")
        yield None
        return
    from distributed import Client, LocalCluster

    resources = {"GPU": cluster.gpus_per_worker} if cluster.gpus_per_worker else None
    if cluster.kind == "local":
        with _worker_environ(cluster.threads_per_worker), LocalCluster(n_workers=cluster.workers, threads_per_worker=cluster.threads_per_worker,
                          processes=True, resources=resources, dashboard_address=":0",
                          silence_logs=40) as lc, Client(lc) as client:
            _wait_for_workers(client, cluster, f"LocalCluster with {cluster.workers} workers")
            yield client
    elif cluster.kind == "address":
        try:
            client = Client(cluster.address, timeout="30s")
        except (OSError, TimeoutError) as e:
            raise ConfigError(f"cluster.address: cannot reach Dask scheduler {cluster.address} ({e}); "
                              "check the address and that the scheduler is running") from None
        with client:
            _wait_for_workers(client, cluster, f"scheduler {cluster.address}")
            yield client
    else:
        with slurm_cluster(cluster) as sc, Client(sc) as client:
            sc.scale(jobs=cluster.slurm.jobs)
            _wait_for_workers(client, cluster, f"SLURMCluster, {cluster.slurm.jobs} jobs x "
                                               f"{cluster.slurm.processes} workers")
            yield client


def expected_workers(cluster: ClusterConfig, client: Any = None) -> int:
    """Workers a stage should plan for: slurm jobs x processes, local workers, or (an existing
    scheduler) the workers connected now; never fewer than are connected, at least 1."""
    if cluster.kind == "slurm":
        n = cluster.slurm.jobs * cluster.slurm.processes
    elif cluster.kind == "local":
        n = cluster.workers
    else:
        n = 1
    if client is not None:
        n = max(n, len(client.scheduler_info().get("workers", {})))
    return n


def _wait_for_workers(client: Any, cluster: ClusterConfig, what: str) -> None:
    """Block until every expected worker has joined (an existing scheduler: at least one), up to
    cluster.worker_timeout seconds. Some workers after the timeout: go on, late ones join as they
    start; none: one line that says what to check."""
    want = 1 if cluster.kind == "address" else expected_workers(cluster)
    try:
        client.wait_for_workers(n_workers=want, timeout=cluster.worker_timeout)
    except TimeoutError:
        have = len(client.scheduler_info().get("workers", {}))
        if have == 0:
            hint = {"slurm": "check `squeue` (queued? wrong cluster.slurm.queue or account?) and the worker "
                             "jobs' logs", "address": "start workers with `dask worker ADDRESS`"}.get(
                cluster.kind, "check the worker logs")
            raise LogitcacheError(f"cluster: no Dask worker started within cluster.worker_timeout="
                                  f"{cluster.worker_timeout:g}s ({what}); {hint}") from None
        log(f"dask: {have} of {want} workers after {cluster.worker_timeout:g}s; starting, the rest join when they start")
    _announce(client, what)


# A LocalCluster's housekeeping, set for batch jobs of compute-bound tasks. Every event loop (the
# scheduler's, each nanny's and worker's) ticked every 20 ms to check its own health, the nannies polled
# their worker's memory every 100 ms and the system every 500 ms, and workers sampled their tasks' stacks
# every 10 ms: on 2 cores the nannies and the scheduler took 0.15 of a core (6-8% of the machine) from 2
# compute-bound workers; with these, 0.03 (bench/fanout.py's breakdown, docs/scaling-out.md). Only the
# dashboard's system and profile pages and the tick's warnings about a blocked event loop are lost.
LOCAL_DASK = {"distributed.admin.tick.interval": "1s", "distributed.admin.system-monitor.interval": "5s",
              "distributed.worker.memory.monitor-interval": "1s", "distributed.worker.profile.enabled": False}


def _worker_environ(threads: int) -> Any:
    """Dask settings of a LocalCluster: its housekeeping (LOCAL_DASK), and the environment of
    spawned workers. Dask's default sets MALLOC_TRIM_THRESHOLD_, which also pins glibc's mmap
    threshold at 128 KB, so every large tensor allocation becomes an mmap plus page faults:
    measured 12% slower teacher forward passes here. Workers get the CLI's settings instead (an
    8 MB mmap threshold, a 16 MB trim threshold: pipeline.core.host). Thread counts stay pinned."""
    import dask

    n = str(threads)
    return dask.config.set({**LOCAL_DASK, "distributed.nanny.pre-spawn-environ": {
        "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, **worker_environ()}})


def slurm_cluster(cluster: ClusterConfig) -> Any:
    """A dask-jobqueue SLURMCluster from the config; `.job_script()` shows the #SBATCH script."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ConfigError("cluster.kind: slurm needs dask-jobqueue; pip install 'logitcache[slurm]'") from None
    s = cluster.slurm
    extra = ["--resources", f"GPU={cluster.gpus_per_worker}"] if cluster.gpus_per_worker else []
    heap = [f"export {k}={v}" for k, v in worker_environ().items()]  # the job's workers inherit them
    return SLURMCluster(
        cores=s.cores, memory=s.memory, processes=s.processes, walltime=s.walltime, queue=s.queue,
        account=s.account, job_extra_directives=list(s.job_extra_directives),
        job_script_prologue=[*heap, *s.job_script_prologue], worker_extra_args=extra,
    )


def _announce(client: Any, what: str) -> None:
    client.register_plugin(_TorchThreads())
    log(f"dask: {what}; dashboard {client.dashboard_link}")


class _TorchThreads(WorkerPlugin):
    """One torch thread per Dask thread, so workers on one machine do not oversubscribe its cores;
    and, on a multi-GPU node, LocalCluster worker k uses GPU k (one worker per GPU)."""

    name = "logitcache-torch-threads"

    def setup(self, worker: Any) -> None:
        import torch

        torch.set_num_threads(worker.state.nthreads)
        if torch.cuda.is_available() and str(worker.name).isdigit():
            torch.cuda.set_device(int(worker.name) % torch.cuda.device_count())


def task_share(items: Sequence[Any], shard_index: int | None, num_shards: int | None) -> list[Any]:
    """Items i with i % num_shards == shard_index: one array task's share of a fixed plan."""
    if num_shards is None and shard_index is None:
        return list(items)
    if num_shards is None or shard_index is None or num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ConfigError(f"--shard-index {shard_index} --num-shards {num_shards}: give both, with "
                          "0 <= shard-index < num-shards (Slurm: $SLURM_ARRAY_TASK_ID, $SLURM_ARRAY_TASK_COUNT)")
    return [item for i, item in enumerate(items) if i % num_shards == shard_index]


def run_all(client: Any, cfg: Config, fn: Callable[[Config, Any], Any], shards: Sequence[Any],
            rows: Callable[[Any], int], desc: str, unit: str = "rows", gpu: bool = False) -> list[Any]:
    """Run fn(cfg, shard) for every shard with one progress bar; results in completion order."""
    progress = bar(sum(rows(s) for s in shards), desc, unit)
    results = []
    if client is None:
        for shard in shards:
            results.append(fn(cfg, shard))
            progress.update(rows(shard))
        progress.close()
        return results
    from distributed import as_completed

    resources = {"GPU": 1} if gpu and cfg.cluster.gpus_per_worker else None
    futures = client.map(fn, [cfg] * len(shards), list(shards), pure=False, retries=cfg.cluster.retries,
                         resources=resources)
    by_key = {f.key: s for f, s in zip(futures, shards)}
    try:
        for future in as_completed(futures):
            results.append(_result(future))
            progress.update(rows(by_key[future.key]))
    finally:
        progress.close()
        for f in futures:
            f.cancel()
    return results


def _result(future: Any) -> Any:
    try:
        return future.result()
    except LogitcacheError:
        raise  # the worker's one-line message travels back unchanged
    except Exception as e:
        if type(e).__name__ == "KilledWorker":
            raise LogitcacheError(f"a Dask worker died {future.key!r} too many times ({e}); "
                                  "check the worker logs (out of memory?) and rerun: finished shards are kept") from None
        raise

