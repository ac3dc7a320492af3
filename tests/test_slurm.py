"""The Slurm paths, end to end, without a Slurm cluster: a fake `sbatch`/`squeue`/`scancel` on PATH
starts each submitted job script locally in the background, so the real dask-jobqueue
SLURMCluster code submits, waits for and cancels its worker jobs."""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_subprocess, tiny_config, write_config

from pipeline.core.config import load_config

FAKE_SBATCH = """#!/usr/bin/env bash
# fake sbatch: copy the job script (dask-jobqueue deletes it), start it in its own session
set -eu
jobs="{jobs}"
id=$$
script="${{@: -1}}"
cp "$script" "$jobs/$id.sh"
echo "$*" >> "$jobs/sbatch.calls"
SLURM_JOB_ID=$id setsid bash "$jobs/$id.sh" > "$jobs/$id.log" 2>&1 < /dev/null &
echo $! > "$jobs/$id.pid"
echo "Submitted batch job $id"
"""

FAKE_SCANCEL = """#!/usr/bin/env bash
jobs="{jobs}"
for id in "$@"; do
  echo "$id" >> "$jobs/scancel.calls"
  [ -f "$jobs/$id.pid" ] && kill -TERM -- -"$(cat "$jobs/$id.pid")" 2>/dev/null || true
done
"""

FAKE_SQUEUE = """#!/usr/bin/env bash
echo "JOBID PARTITION NAME USER ST TIME NODES NODELIST(REASON)"
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """A directory of fake Slurm commands first on PATH; yields the directory jobs are recorded in."""
    bin_dir, jobs = tmp_path / "bin", tmp_path / "jobs"
    bin_dir.mkdir()
    jobs.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("scancel", FAKE_SCANCEL), ("squeue", FAKE_SQUEUE)):
        f = bin_dir / name
        f.write_text(text.format(jobs=jobs))
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    yield jobs
    for pid_file in jobs.glob("*.pid"):  # workers outlive a failed test otherwise
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError, PermissionError):
            pass


def _slurm_config(tmp_path, jobs: int = 2) -> Path:
    cfg = tiny_config(tmp_path, teachers={**tiny_config(tmp_path)["teachers"], "epochs": 2}, cluster={
        "kind": "slurm", "worker_timeout": 60, "retries": 0,
        "slurm": {"jobs": jobs, "cores": 1, "processes": 1, "memory": "2GB", "walltime": "00:10:00"}})
    return write_config(tmp_path / "c.yaml", cfg)


def test_array_task_never_opens_the_cluster(fake_slurm, cli_run, tmp_path):
    """Every task of `sbatch array.sbatch cluster.yaml` used to build a SLURMCluster and submit
    worker jobs of its own; an array task runs its share in-process."""
    path = _slurm_config(tmp_path)
    cli_run("teachers", str(path), "--shard-index", "0", "--num-shards", "1")
    cli_run("cache", str(path), "--shard-index", "0", "--num-shards", "2")
    assert not (fake_slurm / "sbatch.calls").exists()
    shards = list((tmp_path / "caches").glob("*/shards/*"))
    assert len(shards) == 2  # 1348 rows / 400 per shard = 4 shards; task 0 of 2 computes 0 and 2


def test_array_task_refuses_explicit_fanout(cli_run, tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    result = cli_run("cache", str(path), "--shard-index", "0", "--num-shards", "2", "--workers", "2", expect=None)
    assert result.exit_code != 0 and "drop --workers/--scheduler" in result.output


def test_expected_workers_from_config(tmp_path):
    from pipeline.run.fanout import expected_workers

    slurm = load_config(_slurm_config(tmp_path, jobs=3), ["cluster.slurm.processes=2"]).cluster
    assert expected_workers(slurm) == 6
    assert expected_workers(load_config(None, ["cluster.kind=local", "cluster.workers=5"]).cluster) == 5
    assert expected_workers(load_config(None).cluster) == 1


def test_worker_jobs_get_the_heap_pin_unless_it_is_off(tmp_path, monkeypatch):
    """The job script exports the CLI's mmap threshold for the workers it starts, before the user's
    prologue; not with LOGITCACHE_STEADY_HEAP=0, nor over a threshold the user set (the job
    inherits that one)."""
    from pipeline.core.host import MMAP_THRESHOLD
    from pipeline.run.fanout import slurm_cluster

    cluster = load_config(_slurm_config(tmp_path), ["cluster.slurm.job_script_prologue=[source env.sh]"]).cluster
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("LOGITCACHE_STEADY_HEAP", raising=False)
    script = slurm_cluster(cluster).job_script()
    export = f"export MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}"
    assert export in script and script.index(export) < script.index("source env.sh")
    monkeypatch.setenv("LOGITCACHE_STEADY_HEAP", "0")
    assert "MALLOC_MMAP_THRESHOLD_" not in slurm_cluster(cluster).job_script()
    monkeypatch.delenv("LOGITCACHE_STEADY_HEAP")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert "MALLOC_MMAP_THRESHOLD_" not in slurm_cluster(cluster).job_script()


def test_cache_on_fake_slurm_end_to_end(fake_slurm, cli_run, tmp_path, monkeypatch):
    """The real SLURMCluster submits 2 worker jobs through sbatch, the driver waits for both, maps
    the shards over them, and cancels the jobs at the end; the cache equals a serial run's."""
    # distributed's Nanny leaves its pre-spawn environment in the starting process: an earlier
    # in-process LocalCluster test would otherwise hand the driver a threshold "of the user's"
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("LOGITCACHE_STEADY_HEAP", raising=False)
    path = _slurm_config(tmp_path)
    serial_root = tmp_path / "serial"
    cli_run("teachers", str(path), "cluster.kind=none")
    cli_run("cache", str(path), "cluster.kind=none", f"cache.root={serial_root}")

    proc = run_subprocess(["cache", str(path)], cwd=REPO)
    logs = "\n".join(p.read_text() for p in fake_slurm.glob("*.log"))
    assert proc.returncode == 0, proc.stderr + logs
    submitted = (fake_slurm / "sbatch.calls").read_text().splitlines()
    assert len(submitted) == 2
    assert "SLURMCluster, 2 jobs x 1 workers" in proc.stderr
    script = next(fake_slurm.glob("*.sh")).read_text()
    assert "#SBATCH" in script and "distributed.cli.dask_worker" in script
    assert "export MALLOC_MMAP_THRESHOLD_=8388608" in script  # the CLI's heap pin reaches the job's workers
    cancelled = (fake_slurm / "scancel.calls").read_text().split()
    assert sorted(cancelled) == sorted(p.stem for p in fake_slurm.glob("*.pid"))

    def shard_hashes(root):
        manifest = next(root.glob("*/manifest.json"))
        return manifest.parent.name, [s["sha256"] for s in json.loads(manifest.read_text())["shards"]]

    assert shard_hashes(tmp_path / "caches") == shard_hashes(serial_root)


def test_no_worker_within_timeout_is_one_line(tmp_path, monkeypatch):
    """sbatch accepts the jobs but nothing ever starts (a full queue): a clear line, not a hang."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", 'echo "Submitted batch job 42"\n'), ("scancel", "true\n")):
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    path = _slurm_config(tmp_path)
    proc = run_subprocess(["cache", str(path), "cluster.worker_timeout=3"])
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: cluster: no Dask worker started within cluster.worker_timeout=3s"), proc.stderr
    assert "squeue" in last
