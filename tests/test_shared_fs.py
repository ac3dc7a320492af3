"""Shared filesystems: one of several processes builds what they all need while the others wait for
it, a lock whose holder is gone is taken over, and temporary files of dead writers are swept
without touching a live writer's, even one in another container with the same hostname."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, TESTS

from pipeline.core import io
from pipeline.core.lock import build_lock

CONCURRENT_TOKENIZE = """
import os, sys, time
from pipeline.core.config import load_config
from pipeline.inputs import tokens
real = tokens._write
def slow_write(*args, **kw):  # long enough that the three processes overlap
    with open(sys.argv[2], "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(1.5)
    return real(*args, **kw)
tokens._write = slow_write
with open(sys.argv[3]) as f:  # start together
    pass
cfg = load_config(None, sys.argv[4:])
print(tokens.tokenize(cfg.data, sys.argv[1]))
"""


def test_three_processes_that_need_the_same_tokens_build_them_once(tmp_path):
    source = tmp_path / "c.txt"
    source.write_text("\n\n".join(f"document {i} says hello to document {i + 1}" for i in range(300)))
    args = ["data.task=lm", f"data.source={source}", "data.vocab_size=300", f"workspace={tmp_path}",
            "teachers.members=[{name: g, arch: gpt}]", "student.models=[{name: s, arch: gpt}]"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]), "LOGITCACHE_LOCK_LEASE": "5"}
    builds, go = tmp_path / "builds.txt", tmp_path / "go"
    go.write_text("")
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_TOKENIZE, str(tmp_path), str(builds), str(go), *args],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    dirs = {out.strip() for out, _ in outs}
    assert len(dirs) == 1 and Path(dirs.pop()).is_dir()
    assert len(builds.read_text().split()) == 1  # one process tokenized; two waited and reused its files
    assert sum("another process is building it" in err for _, err in outs) == 2
    assert sorted(p.name.startswith(".") for p in (tmp_path / "tokens").iterdir()) == [False]  # no lock left


def test_a_lock_of_a_dead_process_is_taken_over_at_once(tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = tmp_path / ".lock-x"
    lock.write_text(json.dumps({"owner": io.OWNER, "pid": dead.pid, "started": "", "what": "x"}))
    with build_lock(lock, "x"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()
    assert "taking over a lock whose holder is gone" in capsys.readouterr().err


def test_a_silent_lock_of_another_host_is_taken_over_after_a_lease(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOGITCACHE_LOCK_LEASE", "0.5")
    lock = tmp_path / ".lock-x"
    lock.write_text(json.dumps({"owner": "elsewhere.1", "pid": os.getpid(), "started": "", "what": "x"}))
    with build_lock(lock, "x"):  # its holder cannot be asked; nothing touched the lock for a lease
        assert json.loads(lock.read_text())["owner"] == io.OWNER
    err = capsys.readouterr().err
    assert "another process is building it (elsewhere.1 pid" in err and "taking over" in err


def test_a_live_holder_keeps_its_lock_past_the_lease_and_the_waiter_follows_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LOGITCACHE_LOCK_LEASE", "0.4")  # heartbeats every 0.1 s
    lock, events = tmp_path / ".lock-x", []
    held = threading.Event()

    def holder() -> None:
        with build_lock(lock, "x"):
            held.set()
            time.sleep(1.5)  # over three leases: only the heartbeat keeps the lock fresh
            events.append("holder done")

    t = threading.Thread(target=holder)
    t.start()
    held.wait()
    monkeypatch.setattr(io, "OWNER", "another-container.7")  # the waiter cannot ask the holder's process table
    monkeypatch.setattr("pipeline.core.lock.OWNER", "another-container.7")
    with build_lock(lock, "x", poll=0.05):
        events.append("waiter in")
    t.join()
    assert events == ["holder done", "waiter in"]


def _tmp(directory: Path, owner: str, proc: str, age: float = 0.0, is_dir: bool = False) -> Path:
    p = directory / f".tmp-00001.zarr-{owner}-{proc}-cafe{len(list(directory.iterdir())):04d}"
    if is_dir:
        p.mkdir()
        (p / "zarr.json").write_text("{")
    else:
        p.write_bytes(b"partial")
    if age:
        t = time.time() - age
        for q in [*p.rglob("*"), p]:
            os.utime(q, (t, t))
    return p


def test_dead_writers_temp_files_are_swept_and_live_ones_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("LOGITCACHE_TMP_GRACE", "600")
    dead = subprocess.Popen(["true"])
    dead.wait()
    me = f"{os.getpid()}.{io.process_start_time(os.getpid())}"
    d = tmp_path / "runs" / "demo" / "students" / "s0"
    d.mkdir(parents=True)
    keep = [
        _tmp(d, io.OWNER, me),  # this process: alive
        _tmp(d, "samehost.99999", "1.1"),  # another container with the same hostname, fresh
        _tmp(d, "otherhost.1", "1.1", is_dir=True),  # another host, fresh
    ]
    old_dir_fresh_file = _tmp(d, "otherhost.1", "2.1", age=3600, is_dir=True)
    (old_dir_fresh_file / "c0").write_bytes(b"being written")  # its writer is still at work
    keep.append(old_dir_fresh_file)
    gone = [
        _tmp(d, io.OWNER, f"{dead.pid}.1"),  # this host and namespace: dead
        _tmp(d, io.OWNER, f"{os.getpid()}.1", is_dir=True),  # our pid, but another process's start time
        _tmp(d, "samehost.99999", "1.1", age=3600),  # another container, silent for an hour
        _tmp(d, "legacy", "x", age=3600),  # a name of an older version, old
    ]
    assert io.remove_dead_tmp(tmp_path / "runs") == 0  # not recursive: nothing at the top
    assert io.remove_dead_tmp(tmp_path / "runs", recursive=True) == len(gone)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in gone)


def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def full_disk(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        io.atomic_write_json(tmp_path / "runs" / "x.json", {"a": 1})
    assert list((tmp_path / "runs").iterdir()) == []


CONCURRENT_CACHE = """
import os, sys, time
from pipeline.core.config import load_config
from pipeline.run import targets
from stages import cache as cache_stage
real = targets.compute_shard
def counted(ctx, shard, models):  # slow enough that the three processes overlap
    with open(sys.argv[2], "a") as f:
        f.write(f"{shard.index}\\n")
    time.sleep(0.5)
    return real(ctx, shard, models)
targets.compute_shard = counted
print(cache_stage.main(load_config(sys.argv[1])))
"""


def test_three_processes_that_need_the_same_cache_compute_each_shard_once(tmp_path):
    from conftest import tiny_config, write_config

    from pipeline.core.config import load_config
    from pipeline.format.manifest import read_manifest
    from stages import cache as cache_stage
    from stages import teachers as teachers_stage

    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "ws", cache={"rows_per_shard": 256,
                                                                              "chunk_rows": 128}))
    teachers_stage.main(load_config(path))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    computed = tmp_path / "computed.txt"
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_CACHE, str(path), str(computed)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    (d,) = {Path(out.strip()) for out, _ in outs}
    manifest = read_manifest(d)
    indices = [int(i) for i in computed.read_text().split()]
    assert sorted(indices) == list(range(len(manifest["shards"])))  # every shard computed once, by one of them
    assert len(manifest["shards"]) >= 4 and not list((d / ".locks").iterdir())
    serial = cache_stage.main(load_config(path, [f"cache.root={tmp_path / 'serial'}"]))
    assert [e["sha256"] for e in manifest["shards"]] == [e["sha256"] for e in read_manifest(serial)["shards"]]


def test_a_failed_shard_leaves_no_lock_held(tmp_path, monkeypatch):
    from conftest import tiny_config, write_config

    from pipeline.core.config import load_config
    from pipeline.run import targets
    from stages import cache as cache_stage
    from stages import teachers as teachers_stage

    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "ws", cache={"rows_per_shard": 256,
                                                                              "chunk_rows": 128}))
    teachers_stage.main(load_config(path))
    real, calls = targets.compute_shard, []

    def second_fails(ctx, shard, models):
        calls.append(shard.index)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(ctx, shard, models)

    monkeypatch.setattr(targets, "compute_shard", second_fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        cache_stage.main(load_config(path))
    (d,) = (tmp_path / "ws" / "caches").iterdir()
    assert list((d / ".locks").iterdir()) == []  # the written shard's lock and the failed one's: released
    assert not any(t.name == "logitcache-lock" for t in threading.enumerate())
    monkeypatch.undo()
    cache_stage.main(load_config(path))  # and the next run is not kept waiting
