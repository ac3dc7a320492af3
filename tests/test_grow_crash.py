"""A cache of per-member targets grown by a teacher or by rows, killed with SIGKILL at random
moments: the cache it grows from stays readable and unchanged, and a rerun finishes the new one
byte-identical to an uninterrupted run."""

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

from pipeline.core.errors import CacheError
from pipeline.format import reader as fmt
from pipeline.format.members import open_local


def _teacher(ws, i):
    torch.manual_seed(i)
    torch.save(userzoo.heavy(width=512, depth=3).state_dict(), ws / f"h{i}.pt")
    return {"name": f"h{i}", "arch": "import", "factory": "userzoo:heavy", "checkpoint": str(ws / f"h{i}.pt"),
            "kwargs": {"width": 512, "depth": 3}}


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """Two teachers over 6k rows, and the same grown by a third teacher or by 1.5k appended rows,
    each made uninterrupted in root `reference`."""
    ws = tmp_path_factory.mktemp("grow")
    rng = np.random.default_rng(0)
    np.savez(ws / "d.npz", x=rng.normal(size=(8000, 64)).astype(np.float32), y=rng.integers(0, 10, 8000))
    np.savez(ws / "more.npz", x=rng.normal(size=(1500, 64)).astype(np.float32), y=rng.integers(0, 10, 1500))
    teachers = [_teacher(ws, i) for i in range(3)]
    base = {"rows_per_shard": 250, "chunk_rows": 125, "batch_size": 125, "encoding": "topk", "k": 4,
            "members": "separate"}
    configs = {
        "old": tiny_config(ws, data={"source": str(ws / "d.npz")}, teachers={"members": teachers[:2]}, cache=base),
        "teacher": tiny_config(ws, data={"source": str(ws / "d.npz")}, teachers={"members": teachers}, cache=base),
        "rows": tiny_config(ws, data={"source": str(ws / "d.npz"), "transfer": {"append": [str(ws / "more.npz")]}},
                            teachers={"members": teachers[:2]}, cache=base),
    }
    paths = {k: write_config(ws / f"{k}.yaml", c) for k, c in configs.items()}
    durations, reference = {}, {}
    for name in ("old", "teacher", "rows"):
        start = time.time()
        p = _cache(paths[name], "reference")
        assert p.wait(timeout=600) == 0, p.stderr.read()
        durations[name] = time.time() - start
        reference[name] = json.loads(p.stdout.read().strip().splitlines()[-1])
    return ws, paths, durations, reference


_MAIN = "import json, sys; from pipeline.core.config import load_config; from stages import cache; " \
        "print(json.dumps(str(cache.main(load_config(sys.argv[1], sys.argv[2:])))))"


def _cache(path, root):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    return subprocess.Popen([sys.executable, "-c", _MAIN, str(path), f"cache.root={path.parent / root}"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _shards(d):
    """Every unit's shard paths and sha256s, as the manifest lists them."""
    m = json.loads((d / "manifest.json").read_text())
    return [(u["store"], [(e["path"], e["sha256"]) for e in u["shards"]]) for u in m["units"]]


@pytest.mark.parametrize("growth", ["teacher", "rows"])
def test_sigkill_while_growing_keeps_the_old_cache_and_a_rerun_is_byte_identical(grown, growth):
    ws, paths, durations, reference = grown
    root = f"killed-{growth}"
    first = _cache(paths["old"], root)
    assert first.wait(timeout=600) == 0, first.stderr.read()
    old = ws / root / os.path.basename(reference["old"])
    before = (old / "manifest.json").read_bytes()
    rng = random.Random(3)
    interrupted = 0
    for _ in range(3):
        p = _cache(paths[growth], root)
        time.sleep(rng.uniform(1.0, durations[growth]))  # past interpreter start-up
        if p.poll() is None:
            p.kill()  # SIGKILL
            interrupted += 1
        p.wait()
        assert (old / "manifest.json").read_bytes() == before  # the cache it grows from: untouched, readable
        open_local(old, verify=True)
        new = ws / root / os.path.basename(reference[growth])
        if new.exists() and not (new / "manifest.json").exists():
            with pytest.raises(CacheError, match="incomplete"):
                fmt.CacheReader(new)  # a killed run is never served as a cache
    assert interrupted >= 1
    final = _cache(paths[growth], root)
    assert final.wait(timeout=600) == 0, final.stderr.read()
    new = ws / root / os.path.basename(reference[growth])
    assert _shards(new) == _shards(ws / "reference" / os.path.basename(reference[growth]))
    assert not list((ws / root / "members").glob("*/shards/.tmp-*"))
    open_local(new, verify=True)
