"""Dask fan-out on a real LocalCluster with worker processes: same bytes as a serial run, a killed
worker's task is retried without duplicating rows, student sweeps run in parallel and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import userzoo
from conftest import REPO, TESTS, tiny_config, write_config

from pipeline.core.config import load_config
from pipeline.run.fanout import open_client
from stages import cache as cache_stage
from stages import student as student_stage
from stages import teachers as teacher_stage


@pytest.fixture(scope="module")
def cluster_env():
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(TESTS)  # workers import the user models in tests/userzoo.py
    yield
    if old is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = old


def shard_hashes(d):
    return [s["sha256"] for s in json.loads((d / "manifest.json").read_text())["shards"]]


def test_cache_on_local_cluster_survives_a_killed_worker(cluster_env, tmp_path):
    marker = tmp_path / "died"
    ckpt = tmp_path / "t.pt"
    torch.save(userzoo.dies_once(marker=str(marker)).state_dict(), ckpt)
    teacher = {"name": "fragile", "arch": "import", "factory": "userzoo:dies_once", "checkpoint": str(ckpt),
               "kwargs": {"marker": str(marker)}}
    cfg_dict = tiny_config(tmp_path, teachers={"members": [teacher]}, cache={"rows_per_shard": 200})
    path = write_config(tmp_path / "c.yaml", cfg_dict)

    marker.touch()  # the serial reference run must not die
    serial = cache_stage.main(load_config(path, [f"cache.root={tmp_path / 'serial'}"]))
    marker.unlink()

    cfg = load_config(path, ["cluster.kind=local", "cluster.workers=2", f"cache.root={tmp_path / 'dask'}"])
    with open_client(cfg.cluster) as client:
        d = cache_stage.main(cfg, client=client)
    assert marker.exists()  # a worker really died mid-task
    assert d.name == serial.name
    assert shard_hashes(d) == shard_hashes(serial)
    assert json.loads((d / "manifest.json").read_text())["rows"] == 1348
    assert not list((d / "shards").glob(".tmp-*"))


def test_student_sweep_runs_in_parallel_and_matches_serial(cluster_env, tmp_path):
    cfg_dict = tiny_config(tmp_path, student={
        "epochs": 3, "batch_size": 100, "baseline": True, "grid": {"temperature": [1.0, 4.0], "alpha": [0.0, 0.5]},
        "models": [{"name": "s", "arch": "mlp", "hidden": [16]}]})
    path = write_config(tmp_path / "c.yaml", cfg_dict)
    cfg = load_config(path)
    teacher_stage.main(cfg)
    cache_stage.main(cfg)
    serial = student_stage.main(load_config(path, ["run_name=serial"]))
    dask_cfg = load_config(path, ["run_name=dask", "cluster.kind=local", "cluster.workers=2"])
    with open_client(dask_cfg.cluster) as client:
        parallel = student_stage.main(dask_cfg, client)
    names = [r.job for r in parallel]
    assert names == [r.job for r in serial]
    assert sorted(names) == sorted([f"s-T{t:g}-a{a:g}-kd-s0" for t in (1, 4) for a in (0, 0.5)] + ["s-hard-s0"])
    for name in names:
        a = json.loads((tmp_path / "runs/serial/students" / name / "history.json").read_text())["losses"]
        b = json.loads((tmp_path / "runs/dask/students" / name / "history.json").read_text())["losses"]
        assert b == pytest.approx(a, rel=1e-4)  # 1 torch thread per worker vs 2 in-process


def test_killed_dask_student_run_resumes_with_identical_losses(cluster_env, tmp_path):
    cfg_dict = tiny_config(tmp_path, student={"epochs": 30, "batch_size": 100, "checkpoint_every": 1,
                                              "seeds": [0, 1], "models": [{"name": "s", "arch": "mlp", "hidden": [16]}]},
                           cluster={"kind": "local", "workers": 2})
    path = write_config(tmp_path / "c.yaml", cfg_dict)
    cfg = load_config(path)
    teacher_stage.main(cfg)
    cache_stage.main(cfg)
    env = {**os.environ, "PYTHONPATH": str(TESTS)}

    def student(run_name):
        return subprocess.Popen([sys.executable, "-m", "pipeline", "student", str(path), f"run_name={run_name}"],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    straight = student("straight")
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    ckpt = tmp_path / "runs/killed/students/s-kd-s1/checkpoint.pt"
    p = student("killed")
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)
    time.sleep(0.2)
    assert p.poll() is None, "finished before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)  # the CLI, its scheduler and its workers
    p.wait()
    assert not (tmp_path / "runs/killed/students/s-kd-s1/done.json").exists()
    again = student("killed")
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    for seed in (0, 1):
        a = json.loads((tmp_path / f"runs/straight/students/s-kd-s{seed}/history.json").read_text())["losses"]
        b = json.loads((tmp_path / f"runs/killed/students/s-kd-s{seed}/history.json").read_text())["losses"]
        assert a == b


def test_array_tasks_split_students_without_overlap(tmp_path, cli_run):
    cfg_dict = tiny_config(tmp_path, student={"epochs": 1, "batch_size": 200, "seeds": [0, 1, 2], "baseline": True,
                                              "models": [{"name": "s", "arch": "mlp", "hidden": [8]}]})
    path = str(write_config(tmp_path / "c.yaml", cfg_dict))
    for i in range(2):
        cli_run("teachers", path, "--shard-index", str(i), "--num-shards", "2")
    cli_run("cache", path)
    outputs = [cli_run("student", path, "--shard-index", str(i), "--num-shards", "2").output for i in range(2)]
    trained = [[line.split()[1].rstrip(":") for line in out.splitlines() if ": trained" in line] for out in outputs]
    assert trained == [["s-kd-s0", "s-kd-s1", "s-kd-s2"], ["s-hard-s0", "s-hard-s1", "s-hard-s2"]]
    bad = cli_run("student", path, "--shard-index", "2", "--num-shards", "2", expect=1)
    assert "0 <= shard-index < num-shards" in bad.output


def test_job_script_for_slurm(cli_run):
    out = cli_run("job-script", str(REPO / "examples/slurm/cluster.yaml")).output
    assert "#SBATCH -p gpu" in out and "#SBATCH --gres=gpu:1" in out
    assert "--resources GPU=1" in out and "source .venv/bin/activate" in out


def test_a_worker_keeps_its_teachers_until_one_is_retrained(tmp_path):
    """kept_models (a Dask worker's teachers across the tasks of a cache stage) loads them once for
    one identity and afresh when a checkpoint changes, keeping the last set only."""
    from pipeline.run import targets
    from pipeline.run.identity import context

    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    teacher_stage.main(load_config(path))
    cfg = load_config(path)
    first = targets.kept_models(context(cfg))
    assert targets.kept_models(context(cfg)) is first  # the next task of the same stage
    ckpt = next((tmp_path / "teachers").rglob("*.pt"))
    state = torch.load(ckpt)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, ckpt)  # retrained
    again = targets.kept_models(context(cfg))
    assert again is not first and len(targets._KEPT) == 1
