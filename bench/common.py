"""Shared helpers for the benchmark scripts: synthetic caches, and each run's figures printed as one
JSON line and kept, stamped, under bench/results/ (`record`)."""

from __future__ import annotations

import atexit
import functools
import json
import os
import platform
import re
import shutil
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

from pipeline.core.codecs import default_codec, layout_codec
from pipeline.format import manifest as fmt
from pipeline.format.encodings import Encoding
from pipeline.format.shards import shard_entry, shard_name, write_shard
from pipeline.train.dataset import Cache, CacheDataset

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"  # LOGITCACHE_BENCH_RESULTS points elsewhere (the tests use it)


def line(bench: str, **fields: Any) -> dict[str, Any]:
    """A benchmark's figures as its one JSON line prints them: {"bench": NAME, "cores", "machine", ...}."""
    return {"bench": bench, "cores": os.cpu_count(), "machine": platform.machine(), **fields}


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def _commit() -> str:
    """HEAD, with "-dirty" when the tree has changes (bench/results/ left out: a run writes there)."""
    try:
        head = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--", ".", ":(exclude)bench/results")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    memory_gib = None
    try:
        cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE).group(1).strip()
    except (OSError, AttributeError):
        pass
    try:
        kib = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE).group(1)
        memory_gib = round(int(kib) / 2**20, 1)
    except (OSError, AttributeError):
        pass
    return {"hostname": platform.node(), "cpu": cpu, "cores": len(os.sched_getaffinity(0)),
            "memory_gib": memory_gib, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def stamp() -> dict[str, Any]:
    """Which code ran where and when: commit, UTC time, the machine, and the command line."""
    script = Path(sys.argv[0]).resolve()
    shown = str(script.relative_to(REPO)) if script.is_relative_to(REPO) else sys.argv[0]
    return {"commit": _commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": _machine(), "command": " ".join([shown, *sys.argv[1:]])}


def record(name: str, figures: dict[str, Any], results: Path | None = None) -> Path:
    """Print `figures` as the benchmark's one JSON line and keep it, stamped, as RESULTS/NAME.json
    (written whole to a temporary file, then renamed over the old one). `name` is the results file:
    the script's name, or SCRIPT-PART for a script that prints several lines. bench/render.py turns
    bench/results/ into docs/performance.md."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise ValueError(f"results name {name!r}: letters, digits, '_', '.' and '-' only")
    print(json.dumps(figures), flush=True)
    d = Path(results or os.environ.get("LOGITCACHE_BENCH_RESULTS") or RESULTS)
    d.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"name": name, "stamp": stamp(), "figures": figures}, indent=1) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=d)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would follow the file through the rename
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, d / f"{name}.json")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return d / f"{name}.json"


def workdir(prefix: str) -> Path:
    """A fresh temporary directory, removed when this process exits (LOGITCACHE_BENCH_KEEP=1 keeps
    it): a benchmark's inputs and caches are tens to hundreds of MB a run."""
    path = Path(tempfile.mkdtemp(prefix=f"logitcache-{prefix}-"))
    if os.environ.get("LOGITCACHE_BENCH_KEEP") != "1":
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


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


@functools.lru_cache(maxsize=8)
def encoded_rows(rows: int, classes: int, enc: Encoding, seed: int) -> dict[str, np.ndarray]:
    """`enc`'s stored columns of `rows` synthetic rows (seed `seed`), kept for the next caches of the
    same rows: bench/reader.py writes one cache per layout, and encoding took most of its time."""
    return enc.to_host(enc.encode(torch.log_softmax(synthetic_logits(rows, classes, seed), -1)))


def write_cache(root: Path, rows: int, classes: int, enc: Encoding, rows_per_shard: int, chunk_rows: int,
                backend: str = "zarr", seed: int = 0, codec: str | None = None) -> Path:
    """A complete cache of `rows` synthetic rows, written shard by shard like the cache stage (codec
    None: the encoding's default, as the cache stage has it)."""
    codec = default_codec(enc.name, backend) if codec is None else codec
    d = root / f"synthetic-{enc.name}-{rows}"
    entries = []
    for i, start in enumerate(range(0, rows, rows_per_shard)):
        n = min(rows_per_shard, rows - start)
        arrays = {**encoded_rows(n, classes, enc, seed + i), "sample_id": np.arange(start, start + n, dtype=np.int64)}
        write_shard(d / "shards" / shard_name(i, backend), arrays, {}, enc, chunk_rows, None, codec)
        entries.append(shard_entry(d, i, backend, start, n))
    spec = {"format_version": fmt.FORMAT_VERSION, "num_classes": classes, "encoding": enc.params(),
            "temperature": 1.0, "dataset": {"fingerprint": "synthetic", "rows": rows},
            "layout": {"backend": backend, "rows_per_shard": rows_per_shard, "chunk_rows": chunk_rows,
                       **layout_codec(codec)}}
    fmt.write_manifest(d, spec, entries, {"backend": backend, "encoding": enc.params(), "num_classes": classes})
    return d


def heavy_workspace(prefix: str, rows: int, cache: dict[str, Any], temperature: float = 1.0, classes: int = 1000,
                    teacher: dict[str, Any] | None = None) -> tuple[Path, np.ndarray]:
    """A workspace with `rows` random inputs (all in the transfer set), the compute-heavy teacher of
    heavy_teacher.py (`classes` outputs, `teacher` its other factory arguments) saved as a
    checkpoint, and c.yaml caching its top-k targets."""
    import yaml
    from heavy_teacher import make

    ws = workdir(prefix)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 64)).astype(np.float32)
    np.savez(ws / "d.npz", x=x, y=rng.integers(0, classes, rows), x_test=x[:10], y_test=np.arange(10))
    kwargs = {"classes": classes, **(teacher or {})} if classes != 1000 or teacher else {}
    torch.manual_seed(0)
    torch.save(make(**kwargs).state_dict(), ws / "teacher.pt")
    member = {"name": "heavy", "arch": "import", "factory": "heavy_teacher:make", "checkpoint": str(ws / "teacher.pt")}
    (ws / "c.yaml").write_text(yaml.safe_dump({
        "workspace": str(ws), "data": {"source": str(ws / "d.npz"), "num_classes": classes},
        "teachers": {"temperature": temperature, "members": [{**member, "kwargs": kwargs} if kwargs else member]},
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
            for key, value in re.findall(r"^(RssAnon|RssFile):\s+(\d+) kB", status, re.MULTILINE):
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


def epoch_batches(reader: Any, batch_size: int, seed: int, shuffle_chunks: int, epoch: int) -> Any:
    """One epoch's batches as the student stage reads them (pipeline.train.dataset, world size 1),
    over `reader`: a cache's CacheReader, or any object with its surface (a memmap stand-in). Each
    batch a dict of numpy columns: sample_id, the decoded targets, view parameters."""
    views = "views" in reader.manifest["spec"]
    shell = Cache(reader.dir) if views else _ReaderCache(reader)
    shell.reader = reader
    ds = CacheDataset(shell, batch_size, seed, True, shuffle_chunks, None, False, None, 0, 1, 0)
    ds._reader = reader
    ds.set_epoch(epoch)
    for b in ds:
        yield {k: v.numpy() for k, v in b.items() if isinstance(v, torch.Tensor)}


class _ReaderCache:
    """What CacheDataset takes from a Cache, over any reader."""

    def __init__(self, reader: Any) -> None:
        self.reader, self.path, self.source, self.encoding = reader, reader.dir, reader.dir, reader.encoding
        self.id = reader.dir.name
        self.temperature, self.token_rows, self.views = reader.temperature, reader.token_rows, None

