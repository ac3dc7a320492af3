"""The cache stage killed with SIGKILL at random moments, then rerun, is byte-identical to an
uninterrupted run; two processes writing the same cache at once do not corrupt it."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import userzoo
from conftest import REPO, TESTS, tiny_config, write_config

from pipeline.core.config import load_config
from pipeline.core.errors import CacheError
from pipeline.format import reader as fmt
from stages import cache as cache_stage


@pytest.fixture(scope="module")
def heavy(tmp_path_factory):
    """A config whose cache stage takes a few seconds: 12k rows, 48 shards, a wide MLP teacher."""
    ws = tmp_path_factory.mktemp("crash")
    rng = np.random.default_rng(0)
    np.savez(ws / "d.npz", x=rng.normal(size=(12000, 64)).astype(np.float32), y=rng.integers(0, 10, 12000))
    torch.manual_seed(0)
    torch.save(userzoo.heavy(width=768, depth=3).state_dict(), ws / "heavy.pt")
    teacher = {"name": "heavy", "arch": "import", "factory": "userzoo:heavy", "checkpoint": str(ws / "heavy.pt"),
               "kwargs": {"width": 768, "depth": 3}}
    cfg = tiny_config(ws, data={"source": str(ws / "d.npz")}, teachers={"members": [teacher]},
                      cache={"rows_per_shard": 250, "chunk_rows": 125, "batch_size": 125, "encoding": "topk", "k": 4})
    path = write_config(ws / "c.yaml", cfg)
    start = time.time()
    ref = _cache(path, "reference")
    assert ref.wait(timeout=600) == 0, ref.stderr.read()
    duration = time.time() - start
    reference = next((ws / "reference").iterdir())
    return path, ws, duration, reference


def _cache(path, root, *extra):
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    return subprocess.Popen([sys.executable, "-m", "pipeline", "cache", str(path), f"cache.root={path.parent / root}",
                             *extra], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _hashes(d):
    return [s["sha256"] for s in json.loads((d / "manifest.json").read_text())["shards"]]


def _kill_and_finish(path, ws, duration, reference, trials: int, seed: int) -> int:
    rng = random.Random(seed)
    root = f"killed-{seed}"
    interrupted = 0
    for _ in range(trials):
        p = _cache(path, root)
        time.sleep(rng.uniform(1.0, duration))  # past interpreter start-up
        if p.poll() is None:
            p.kill()  # SIGKILL
            interrupted += 1
        p.wait()
        d = ws / root / reference.name
        if d.exists() and not (d / "manifest.json").exists():
            with pytest.raises(CacheError, match="incomplete"):
                fmt.CacheReader(d)  # a killed run is never served as a cache
    final = _cache(path, root)
    assert final.wait(timeout=600) == 0, final.stderr.read()
    d = ws / root / reference.name
    assert _hashes(d) == _hashes(reference)
    assert not list((d / "shards").glob(".tmp-*"))
    return interrupted


def test_sigkill_at_random_moments_then_rerun_is_byte_identical(heavy):
    path, ws, duration, reference = heavy
    assert _kill_and_finish(path, ws, duration, reference, trials=3, seed=1) >= 1


@pytest.mark.slow
def test_sigkill_many_times(heavy):
    path, ws, duration, reference = heavy
    interrupted = _kill_and_finish(path, ws, duration, reference, trials=25, seed=2)
    print(f"reference run {duration:.1f} s, {interrupted} of 25 runs killed mid-way")
    assert interrupted >= 10


def test_two_processes_writing_one_cache_at_once(heavy):
    path, ws, _, reference = heavy
    a, b = _cache(path, "shared"), _cache(path, "shared")
    assert a.wait(timeout=600) == 0, a.stderr.read()
    assert b.wait(timeout=600) == 0, b.stderr.read()
    d = ws / "shared" / reference.name
    assert _hashes(d) == _hashes(reference)
    fmt.CacheReader(d, verify=True)


def test_changing_the_shard_plan_of_a_partial_cache_is_refused(heavy, tmp_path):
    path, _ws, _, _ = heavy
    cfg = load_config(path, [f"cache.root={tmp_path}"])
    d = cache_stage.main(cfg, shard_index=0, num_shards=40)
    assert not (d / "manifest.json").exists()
    with pytest.raises(CacheError, match="rows_per_shard=250.*rerun with those settings"):
        cache_stage.main(load_config(path, [f"cache.root={tmp_path}", "cache.rows_per_shard=300"]))
