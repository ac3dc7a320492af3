"""Shared fixtures: tiny configs on the bundled digits or generated data, and CLI runners."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.cli import cli

TESTS = Path(__file__).parent
REPO = TESTS.parent


def tiny_config(workspace: Path, **sections: Any) -> dict[str, Any]:
    """A config that runs every stage in a few seconds; `sections` are merged over it."""
    cfg: dict[str, Any] = {
        "workspace": str(workspace),
        "run_name": "t",
        "data": {"source": "digits"},
        "teachers": {
            "epochs": 8,
            "lr": 0.005,
            "temperature": 2.0,
            "members": [
                {"name": "a", "arch": "mlp", "hidden": [64], "seed": 0},
                {"name": "b", "arch": "mlp", "hidden": [48], "seed": 1},
            ],
        },
        "cache": {"rows_per_shard": 400, "chunk_rows": 128},
        "student": {"epochs": 2, "batch_size": 100, "baseline": False,
                    "models": [{"name": "s", "arch": "mlp", "hidden": [16]}]},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def write_npy_dir(d: Path, rows: int, features: int, held_out: bool = False) -> int:
    """x.npy (rows, features) random float32, written through a memmap, and y.npy (10 classes);
    with `held_out` also a small x_test.npy/y_test.npy. Returns x.npy's size in bytes."""
    rng = np.random.default_rng(0)
    d.mkdir()
    x = np.lib.format.open_memmap(d / "x.npy", mode="w+", dtype=np.float32, shape=(rows, features))
    x[:] = rng.standard_normal((rows, features), dtype=np.float32)
    x.flush()
    del x
    np.save(d / "y.npy", rng.integers(0, 10, rows))
    if held_out:
        np.save(d / "x_test.npy", rng.standard_normal((64, features), dtype=np.float32))
        np.save(d / "y_test.npy", rng.integers(0, 10, 64))
    return (d / "x.npy").stat().st_size


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def cli_run():
    """Invoke the CLI in-process; returns click's Result."""

    def run(*args: str, expect: int | None = 0):
        result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
        if expect is not None:
            assert result.exit_code == expect, result.output
        return result

    return run


def run_subprocess(args: list[str], cwd: Path | None = None, **kw: Any) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False, **kw)


@pytest.fixture(autouse=True, scope="session")
def _own_cache_home(tmp_path_factory) -> Any:
    """The session's own XDG_CACHE_HOME (the local shard cache, input copies and remembered digests
    live under it), and no LOGITCACHE_SHARD_CACHE from outside: two test runs on one machine (CI
    beside a developer's run) never share, evict or lock each other's files. CLI subprocesses
    inherit it."""
    saved = {k: os.environ.get(k) for k in ("XDG_CACHE_HOME", "LOGITCACHE_SHARD_CACHE", "LOGITCACHE_DIGESTS")}
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache-home"))
    os.environ.pop("LOGITCACHE_SHARD_CACHE", None)
    os.environ.pop("LOGITCACHE_DIGESTS", None)
    yield
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


def slow_divergence(p_rows, q_rows, kind):
    """Mean over rows of forward KL, reverse KL or JSD, summed term by term in Python floats."""
    total = 0.0
    for p, q in zip(p_rows, q_rows):
        if kind == "forward":
            total += sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)
        elif kind == "reverse":
            total += sum(b * math.log(b / a) for a, b in zip(p, q) if b > 0)
        else:
            m = [(a + b) / 2 for a, b in zip(p, q)]
            total += 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m) if a > 0)
            total += 0.5 * sum(b * math.log(b / c) for b, c in zip(q, m) if b > 0)
    return total / len(p_rows)
