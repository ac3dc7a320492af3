"""Caches in object storage, against a real S3-compatible server on localhost (moto's server mode,
which s3fs and zarr test against): published with conditional puts and the manifest last, a kill -9
mid-upload leaves nothing a reader takes as complete and a rerun completes it, read through a
bounded local shard cache that checks every download, inspected and verified where they lie."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TESTS
from test_api import C, teacher_logits, write

import pipeline as lc
from pipeline.core.errors import CacheError
from pipeline.core.io import tree_size
from pipeline.format import remote

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A bucket on a local S3 server; the environment points s3fs and boto at it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs, _ = remote.filesystem("s3://bucket")
    fs.mkdir("bucket")
    yield env
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    server.stop()


@pytest.fixture
def shard_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOGITCACHE_SHARD_CACHE", str(tmp_path / "shard-cache"))
    return tmp_path / "shard-cache"


def test_the_test_session_keeps_its_shards_and_digests_apart_from_the_users():
    """conftest gives the session its own XDG_CACHE_HOME: the shard cache and input copies of a
    test run are never those of another run or of the user's home."""
    home = os.environ["XDG_CACHE_HOME"]
    assert remote.shard_cache_dir() == Path(home) / "logitcache" / "shards"
    assert Path.home() / ".cache" not in remote.shard_cache_dir().parents


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    t = teacher_logits(1000)
    return write(tmp_path_factory.mktemp("local"), t, lc.Dense(C, "float16"), rows_per_shard=256, chunk_rows=64).path


def ids_of(cache, **kw):
    return [b["sample_id"] for b in cache.dataset(batch_size=100, seed=3, **kw)]


def test_a_published_cache_reads_the_same_batches_as_the_local_one(s3, local, shard_cache):
    url = remote.push(local, "s3://bucket/caches")
    assert url == f"s3://bucket/caches/{local.name}"
    mine, theirs = lc.open_cache(local), lc.open_cache(url)
    assert theirs.id == mine.id and theirs.rows == 1000
    a, b = list(mine.dataset(batch_size=100, seed=3)), list(theirs.dataset(batch_size=100, seed=3))
    assert all(torch.equal(x["sample_id"], y["sample_id"]) and torch.equal(x["logp"], y["logp"]) for x, y in zip(a, b))
    assert len(list((shard_cache / local.name / "shards").iterdir())) == 4  # every shard downloaded once
    again = lc.open_cache(local.name[:6], root="s3://bucket/caches")  # an id prefix under a root URL
    assert again.reader.remote.downloads == 0 and len(ids_of(again)) == 10  # warm: nothing downloaded


def test_the_shard_cache_stays_under_its_limit(s3, shard_cache, monkeypatch, tmp_path):
    small = write(tmp_path / "small", teacher_logits(1000, seed=2), lc.Dense(C, "float16"), rows_per_shard=64,
                  chunk_rows=64).path  # 16 shards of one chunk
    remote.push(small, "s3://bucket/small")
    one = max(e["bytes"] for e in json.loads((small / "manifest.json").read_text())["shards"])
    monkeypatch.setenv("LOGITCACHE_SHARD_CACHE_BYTES", str(4 * one))
    monkeypatch.setattr(remote.ShardCache, "RECENT_S", 0.0)  # no other process: evict as soon as unpinned
    cache = lc.open_cache(f"s3://bucket/small/{small.name}")
    for epoch in range(2):
        ds = cache.dataset(batch_size=100, seed=3, shuffle_chunks=2)  # a buffer spans at most 2 shards
        ds.set_epoch(epoch)
        got = torch.cat([b["sample_id"] for b in ds])
        assert sorted(got.tolist()) == list(range(1000))  # nothing lost to an eviction
        held = list((shard_cache / small.name / "shards").iterdir())
        assert len(held) <= 4 and sum(tree_size(p) for p in held) <= 4 * one
    assert cache.reader.remote.downloads > 16  # evicted shards were downloaded again in epoch 1


def test_a_corrupt_object_is_refused_on_download(s3, local, shard_cache, tmp_path):
    fs, _ = remote.filesystem("s3://bucket")
    copy = tmp_path / local.name
    import shutil

    shutil.copytree(local, copy)
    url = remote.push(copy, "s3://bucket/corrupt")
    shard = json.loads((copy / "manifest.json").read_text())["shards"][1]["path"]
    victim = max(fs.find(f"bucket/corrupt/{local.name}/{shard}"))
    data = bytearray(fs.cat_file(victim))
    data[-1] ^= 0xFF
    fs.pipe_file(victim, bytes(data))
    cache = lc.open_cache(url)
    with pytest.raises(CacheError, match=f"{shard}: checksum mismatch after download"):
        list(cache.dataset(batch_size=1000, shuffle=False))
    bad = remote.verify_remote(url)
    assert bad == {"missing": [], "corrupt": [shard]}


KILLED_AT_PUT = """
import os, signal, sys
from pathlib import Path
from pipeline.core.config import load_config
from pipeline.format import remote
from stages import cache as cache_stage
real, n = remote._put, [0]
def put_then_die(fs, local, target, replace=False):  # SIGKILL before the Nth object is put
    n[0] += 1
    if n[0] == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    real(fs, local, target, replace)
remote._put = put_then_die
"""
KILL_MID_UPLOAD = KILLED_AT_PUT + "remote.push(Path(sys.argv[2]), sys.argv[3])\n"  # N, CACHE_DIR, ROOT_URL
KILL_MID_PUBLISH = KILLED_AT_PUT + "cache_stage.main(load_config(sys.argv[2], sys.argv[3:]))\n"  # N, CONFIG, OVERRIDES


def test_a_kill_mid_upload_leaves_no_complete_cache_and_a_rerun_completes_it(s3, local, shard_cache):
    env = {**os.environ, **s3, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    root = "s3://bucket/killed"
    p = subprocess.run([sys.executable, "-c", KILL_MID_UPLOAD, "5", str(local), root], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    url = f"{root}/{local.name}"
    with pytest.raises(CacheError, match="cache is incomplete \\(no manifest.json\\)"):
        lc.open_cache(url)
    assert remote.push(local, root) == url  # the rerun uploads what is missing, manifest last
    assert remote.verify_remote(url) == {"missing": [], "corrupt": []}
    assert len(ids_of(lc.open_cache(url))) == 10


def test_an_object_is_never_replaced(s3, local):
    fs, _ = remote.filesystem("s3://bucket")
    remote.push(local, "s3://bucket/twice")
    target = f"bucket/twice/{local.name}/spec.json"
    before = fs.info(target)["ETag"]
    fs.rm(f"bucket/twice/{local.name}/manifest.json")
    remote.push(local, "s3://bucket/twice")  # a second publisher: its puts are refused, nothing changes
    assert fs.info(target)["ETag"] == before


def test_caches_ls_and_inspect_verify_work_on_a_bucket(s3, local, cli_run):
    remote.push(local, "s3://bucket/listed")
    out = cli_run("caches", "ls", "--root", "s3://bucket/listed").output
    assert local.name in out and "complete" in out and "1000" in out
    inspected = json.loads(cli_run("caches", "inspect", local.name[:8], "--root", "s3://bucket/listed",
                                   "--verify").output)
    assert inspected["verified"] is True and inspected["rows"] == 1000


def test_the_cli_publishes_a_cache(s3, local, cli_run):
    out = cli_run("caches", "push", str(local), "s3://bucket/pushed").output
    assert f"s3://bucket/pushed/{local.name}" in out
    assert np.array_equal(lc.open_cache(f"s3://bucket/pushed/{local.name}").reader.read_all()["sample_id"],
                          lc.open_cache(local).reader.read_all()["sample_id"])


@pytest.mark.parametrize("kill_at", [4, 25])  # inside the first shard; after a shard and its sidecar
def test_the_stages_run_with_the_cache_root_in_a_bucket(s3, shard_cache, tmp_path, kill_at):
    """cache.root=s3://...: the cache stage stages shards here and publishes each as it is whole; killed
    while publishing it leaves no complete cache in the store, and a rerun completes it with the bytes
    of a local run. A student on a machine without the staged copy trains from the bucket."""
    from conftest import tiny_config, write_config

    from pipeline.core.config import load_config
    from stages import cache as cache_stage
    from stages import evaluate as evaluate_stage
    from stages import student as student_stage
    from stages import teachers as teachers_stage

    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "ws"))
    in_bucket = [f"cache.root=s3://bucket/stages{kill_at}"]
    teachers_stage.main(load_config(path))
    staged = cache_stage.main(load_config(path, ["cache.root=" + str(tmp_path / "plain")]))  # a local run
    url = f"s3://bucket/stages{kill_at}/{staged.name}"
    env = {**os.environ, **s3, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    p = subprocess.run([sys.executable, "-c", KILL_MID_PUBLISH, str(kill_at), str(path), *in_bucket], env=env,
                       cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert bool(remote.published(url)) == (kill_at == 25)  # killed mid-shard, or after one was whole
    with pytest.raises(CacheError, match="cache is incomplete"):
        lc.open_cache(url)
    cache_stage.main(load_config(path, in_bucket))  # the rerun publishes what is missing, the manifest last
    theirs = remote.remote_manifest(url)
    assert [e["sha256"] for e in theirs["shards"]] == [e["sha256"] for e in lc.open_cache(staged).manifest["shards"]]
    assert remote.verify_remote(url) == {"missing": [], "corrupt": []}
    import shutil

    shutil.rmtree(tmp_path / "ws" / "caches")  # another machine: no staged copy, only the bucket
    cfg = load_config(path, in_bucket)
    student_stage.main(cfg)
    report = evaluate_stage.main(cfg)
    assert (shard_cache / staged.name / "shards").is_dir() and report is not None


def test_an_input_at_a_url_gives_the_cache_of_the_same_local_file(s3, shard_cache, tmp_path):
    from conftest import tiny_config, write_config
    from sklearn.datasets import load_digits

    from pipeline.core.config import load_config
    from stages import cache as cache_stage
    from stages import teachers as teachers_stage

    x, y = load_digits(return_X_y=True)
    np.savez(tmp_path / "digits.npz", x=x.astype(np.float32), y=y.astype(np.int64))
    fs, _ = remote.filesystem("s3://bucket")
    fs.put_file(str(tmp_path / "digits.npz"), "bucket/inputs/digits.npz")
    ids = []
    for source in (str(tmp_path / "digits.npz"), "s3://bucket/inputs/digits.npz"):
        path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "ws", data={"source": source}))
        teachers_stage.main(load_config(path))
        ids.append(cache_stage.main(load_config(path)).name)
    assert ids[0] == ids[1]  # the same bytes: the same teachers' inputs, the same cache
    copies = list((shard_cache.parent / "inputs").rglob("digits.npz"))
    assert len(copies) == 1 and copies[0].read_bytes() == (tmp_path / "digits.npz").read_bytes()
    with pytest.raises(Exception, match="data.source: s3://bucket/inputs/nope.npz does not exist"):
        from pipeline.inputs.splits import load_splits

        load_splits(load_config(path, ["data.source=s3://bucket/inputs/nope.npz"]))


def test_verifying_a_cache_in_the_store_downloads_and_checks_each_shard(s3, local, shard_cache, cli_run, tmp_path):
    url = remote.push(local, "s3://bucket/verified")
    cache = lc.open_cache(url, verify=True)  # every shard fetched and checked, none mistaken for missing
    assert cache.reader.remote.downloads == 4
    cache.verify()  # again: from the shard cache, each checked against the manifest
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cache:\n  root: s3://bucket/verified\n")
    assert local.name in cli_run("caches", "ls", "--config", str(cfg)).output  # the config's root is the bucket


def test_two_writers_of_one_shard_with_different_bytes_never_mix_it(s3, tmp_path, monkeypatch):
    """Two machines whose teachers' numerics differ publish the same shard at once: one claims it and
    uploads it, the other leaves it; the store's shard is whole and matches its sidecar."""
    import threading

    a = write(tmp_path / "a", teacher_logits(300, seed=1), lc.Dense(C, "float32"), rows_per_shard=300, chunk_rows=32)
    b = write(tmp_path / "b", teacher_logits(300, seed=2), lc.Dense(C, "float32"), rows_per_shard=300, chunk_rows=32)
    assert a.path.name == b.path.name  # the same targets' id, other bytes
    url = f"s3://bucket/mixed/{a.path.name}"
    real = remote._put

    def slow(fs, local, target, replace=False):  # long enough that the two uploads overlap
        time.sleep(0.02)
        real(fs, local, target, replace)

    monkeypatch.setattr(remote, "_put", slow)
    won = []
    threads = [threading.Thread(target=lambda d=d: won.append(remote.publish_shard(d, "00000.zarr", url)))
               for d in (a.path, b.path)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fs, base = remote.filesystem(url)
    side = json.loads(fs.cat_file(f"{base}/digests/00000.zarr.json"))
    assert sorted(won) == [False, True]
    assert remote.remote_tree_digest(fs, f"{base}/shards/00000.zarr")[0] == side["sha256"]
    assert not fs.exists(f"{base}/claims/00000.zarr.json")


def test_a_claim_not_renewed_for_a_lease_is_taken_over(s3, local, monkeypatch):
    monkeypatch.setenv("LOGITCACHE_LOCK_LEASE", "1")
    url = f"s3://bucket/abandoned/{local.name}"
    fs, base = remote.filesystem(url)
    fs.pipe_file(f"{base}/claims/00000.zarr.json", json.dumps({"token": "x", "writer": "elsewhere.1", "pid": 1,
                                                                "time": time.time()}).encode())
    assert remote.publish_shard(local, "00000.zarr", url) is False  # a live writer elsewhere holds it
    time.sleep(1.5)  # its writer renewed nothing for a lease: gone
    assert remote.publish_shard(local, "00000.zarr", url) is True
    assert "00000.zarr" in remote.published(url)
