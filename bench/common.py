"""Shared helpers for the benchmark scripts: synthetic caches and one-line JSON output."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from typing_extensions import Self

from pipeline.core.codecs import layout_codec
from pipeline.format import manifest as fmt
from pipeline.format.encodings import Encoding
from pipeline.format.shards import shard_entry, shard_name, write_shard


def emit(name: str, **fields: Any) -> None:
    print(json.dumps({"bench": name, "cores": os.cpu_count(), "machine": platform.machine(), **fields}), flush=True)


def workdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"logitcache-{prefix}-"))


def synthetic_logits(rows: int, classes: int, seed: int = 0) -> torch.Tensor:
    """Peaked, realistic-looking classifier logits (rows, classes): a few plausible classes each."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, classes, generator=g)
    hot = torch.randint(0, classes, (rows, 4), generator=g)
    return z.scatter_add(1, hot, torch.full((rows, 4), 6.0)) * 1.5


def lm_logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Next-token-like logits (rows, vocab): Zipf-shaped over a per-row shuffled vocabulary."""
    g = torch.Generator().manual_seed(seed)
    zipf = -1.1 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    perm = torch.randperm(vocab, generator=g)
    shift = torch.randint(0, vocab, (rows, 1), generator=g)
    ranks = (perm[None, :] + shift) % vocab  # (rows, vocab): each row its own ranking
    # scale 1.4: top-1 mass ~0.4, top-32 ~0.9, like a trained LM on ordinary text
    return zipf[ranks] * 1.4 + 0.5 * torch.randn(rows, vocab, generator=g)


def write_cache(root: Path, rows: int, classes: int, enc: Encoding, rows_per_shard: int, chunk_rows: int,
                backend: str = "zarr", seed: int = 0, codec: str = "zstd") -> Path:
    """A complete cache of `rows` synthetic rows, written shard by shard like the cache stage."""
    d = root / f"synthetic-{enc.name}-{rows}"
    entries = []
    for i, start in enumerate(range(0, rows, rows_per_shard)):
        n = min(rows_per_shard, rows - start)
        logp = torch.log_softmax(synthetic_logits(n, classes, seed + i), -1)
        arrays = enc.to_host(enc.encode(logp))
        arrays["sample_id"] = np.arange(start, start + n, dtype=np.int64)
        write_shard(d / "shards" / shard_name(i, backend), arrays, {}, enc, chunk_rows, None, codec)
        entries.append(shard_entry(d, i, backend, start, n))
    spec = {"format_version": fmt.FORMAT_VERSION, "num_classes": classes, "encoding": enc.params(),
            "temperature": 1.0, "dataset": {"fingerprint": "synthetic", "rows": rows},
            "layout": {"backend": backend, "rows_per_shard": rows_per_shard, "chunk_rows": chunk_rows,
                       **layout_codec(codec)}}
    fmt.write_manifest(d, spec, entries, {"backend": backend, "encoding": enc.params(), "num_classes": classes})
    return d


def heavy_workspace(prefix: str, rows: int, cache: dict[str, Any], temperature: float = 1.0) -> tuple[Path, np.ndarray]:
    """A workspace with `rows` random inputs (all in the transfer set), the compute-heavy teacher of
    heavy_teacher.py saved as a checkpoint, and c.yaml caching its top-k targets."""
    import yaml
    from heavy_teacher import make

    ws = workdir(prefix)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 64)).astype(np.float32)
    np.savez(ws / "d.npz", x=x, y=rng.integers(0, 1000, rows), x_test=x[:10], y_test=np.arange(10))
    torch.manual_seed(0)
    torch.save(make().state_dict(), ws / "teacher.pt")
    (ws / "c.yaml").write_text(yaml.safe_dump({
        "workspace": str(ws), "data": {"source": str(ws / "d.npz"), "num_classes": 1000},
        "teachers": {"temperature": temperature, "members": [{"name": "heavy", "arch": "import",
                     "factory": "heavy_teacher:make", "checkpoint": str(ws / "teacher.pt")}]},
        "cache": {"encoding": "topk", "k": 32, **cache},
    }))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    return ws, x


class Timer:
    def __enter__(self) -> Self:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


# Runs the CLI in this very process and reports its own peak resident size (VmHWM) at exit. A
# child's ru_maxrss (os.wait4) is no measure of the stage: Linux carries the parent's peak over
# through fork/exec, so a bench that wrote 1 GB of inputs saw every stage at that size.
_MEASURED = """
import atexit, re, runpy, sys
def _peak():
    kib = re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)
    sys.stderr.write(f"\\nLOGITCACHE_PEAK_KIB {kib}\\n")
    sys.stderr.flush()
atexit.register(_peak)
sys.argv = ["logitcache", *sys.argv[1:]]
runpy.run_module("pipeline", run_name="__main__")
"""


@dataclass(frozen=True)
class StageRun:
    seconds: float  # wall clock of the whole process
    peak_mb: float  # the stage process's own peak resident size (VmHWM)
    peak_anon_mb: float  # peaks of RSS's anonymous (heap) and file-backed (mapped inputs: page cache
    peak_file_mb: float  # the kernel can drop) parts, sampled every 50 ms
    rate: float | None  # the stage's own rows/s (or tokens/s) from its last "done" progress line
    output: str


def run_stage(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> StageRun:
    """`logitcache ARGS...` as a fresh process: wall time, its own peak RSS, and the rate its progress
    line reports for the stage's main loop (imports, model loading and the held-out pass excluded)."""
    env = {**os.environ, "LOGITCACHE_PROGRESS_INTERVAL": "3600", **(env or {})}
    peaks = {"RssAnon": 0, "RssFile": 0}  # KiB
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        p = subprocess.Popen([sys.executable, "-c", _MEASURED, *args], cwd=cwd, env=env, stdout=log,
                             stderr=subprocess.STDOUT, text=True)
        while p.poll() is None:
            try:
                status = Path(f"/proc/{p.pid}/status").read_text()
            except OSError:
                status = ""
            for key, value in re.findall(r"^(RssAnon|RssFile):\s+(\d+) kB", status, re.M):
                peaks[key] = max(peaks[key], int(value))
            time.sleep(0.05)
        seconds = time.perf_counter() - start
        log.seek(0)
        out = log.read()
    if p.returncode != 0:
        raise SystemExit(f"logitcache {' '.join(args)} failed:\n{out[-3000:]}")
    peak = re.findall(r"LOGITCACHE_PEAK_KIB (\d+)", out)
    rates = re.findall(r", ([\d.]+)([kM]?) (?:rows|tokens)/s, done", out)
    rate = None
    if rates:
        value, scale = rates[-1]
        rate = float(value) * {"": 1, "k": 1e3, "M": 1e6}[scale]
    return StageRun(seconds, int(peak[-1]) / 1024, peaks["RssAnon"] / 1024, peaks["RssFile"] / 1024, rate, out)
