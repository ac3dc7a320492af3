"""Scale: the real `cache` and `student` stages, each a fresh subprocess, on generated data at 1x,
10x and 100x; peak RSS (os.wait4's ru_maxrss of that process) and rows/s of each stage.

    .venv/bin/python bench/scale.py [--rows 40000] [--sizes 1,10,100]

Inputs are a directory of .npy arrays written block by block through np.memmap (never whole in
RAM): rows of 64 float32 features, 1,000 classes; at 100x of 40,000 rows that is 4M rows, 1.02 GB
of inputs. The teacher is a small imported MLP; the cache is top-10, 8-bit; the student trains one
epoch. rows/s is net of the stage's fixed cost (interpreter, imports, model and checkpoint I/O),
measured by running the same stage on a 1,000-row input first; the raw wall-clock figures are
printed too. One JSON line per stage:
{"bench": "scale", "task": "classify", "stage": ..., "rss_ratio": RSS(100x)/RSS(1x),
 "speed_ratio": rows/s(100x)/rows/s(1x), ...}. Goals: rss_ratio <= 1.25, speed_ratio >= 0.9.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from common import emit, workdir

FEATURES, CLASSES = 64, 1000


def mlp() -> torch.nn.Module:
    """The teacher: a small MLP, imported by the cache stage (factory `scale:mlp`)."""
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 128), torch.nn.ReLU(), torch.nn.Linear(128, CLASSES))


def make_inputs(d: Path, rows: int, block: int = 1 << 18) -> None:
    """x.npy, y.npy (and a small held-out x_test/y_test) written block by block through a memmap."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x = np.lib.format.open_memmap(d / "x.npy", mode="w+", dtype=np.float32, shape=(rows, FEATURES))
    y = np.lib.format.open_memmap(d / "y.npy", mode="w+", dtype=np.int64, shape=(rows,))
    for i in range(0, rows, block):
        n = min(block, rows - i)
        x[i:i + n] = rng.standard_normal((n, FEATURES), dtype=np.float32)
        y[i:i + n] = rng.integers(0, CLASSES, n)
        x.flush()
        y.flush()
    del x, y
    np.save(d / "x_test.npy", rng.standard_normal((2000, FEATURES), dtype=np.float32))
    np.save(d / "y_test.npy", rng.integers(0, CLASSES, 2000))


def config(ws: Path, teacher: Path) -> Path:
    cfg = {
        "workspace": str(ws), "run_name": "scale",
        "data": {"source": str(ws / "inputs"), "num_classes": CLASSES},
        "teachers": {"temperature": 2.0, "members": [{"name": "mlp", "arch": "import", "factory": "scale:mlp",
                                                      "checkpoint": str(teacher)}]},
        "cache": {"encoding": "topk", "k": 10, "bits": 8, "rows_per_shard": 65536, "chunk_rows": 4096,
                  "batch_size": 4096},
        "student": {"epochs": 1, "batch_size": 256, "baseline": False, "checkpoint_every": 1000,
                    "models": [{"name": "s", "arch": "mlp", "hidden": [64]}]},
    }
    path = ws / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_stage(stage: str, cfg: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of `python -m pipeline STAGE CONFIG` in a fresh process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)]),
           "LOGITCACHE_PROGRESS_INTERVAL": "3600"}
    start = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "pipeline", stage, str(cfg)], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = p.stdout.read() if p.stdout else b""
    _, status, usage = os.wait4(p.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{stage} failed:\n{out.decode()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=40_000, help="rows at 1x")
    ap.add_argument("--sizes", default="1,10,100")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    root = workdir("scale")
    torch.manual_seed(0)
    teacher = root / "teacher.pt"
    torch.save(mlp().state_dict(), teacher)
    stages = ("cache", "student")
    figures: dict[str, dict[str, dict[str, float]]] = {s: {} for s in stages}
    overhead = {}
    try:
        for label, rows in [("overhead", 1000)] + [(f"{s}x", s * args.rows) for s in sizes]:
            ws = root / label
            make_inputs(ws / "inputs", rows)
            cfg = config(ws, teacher)
            for stage in stages:
                seconds, rss = run_stage(stage, cfg)
                if label == "overhead":
                    overhead[stage] = seconds
                    continue
                net = max(seconds - overhead[stage], 1e-3)
                figures[stage][label] = {"rows": rows, "seconds": round(seconds, 2), "peak_rss_mb": round(rss, 1),
                                         "rows_per_s": round(rows / net), "raw_rows_per_s": round(rows / seconds)}
            shutil.rmtree(ws)  # the next size's inputs need the disk
    finally:
        shutil.rmtree(root, ignore_errors=True)
    lo, hi = f"{sizes[0]}x", f"{sizes[-1]}x"
    for stage in stages:
        f = figures[stage]
        rss_ratio = f[hi]["peak_rss_mb"] / f[lo]["peak_rss_mb"]
        speed_ratio = f[hi]["rows_per_s"] / f[lo]["rows_per_s"]
        unmet = [k for k, ok in (("rss_ratio", rss_ratio <= 1.25), ("speed_ratio", speed_ratio >= 0.9)) if not ok]
        emit("scale", task="classify", stage=stage, rss_ratio=round(rss_ratio, 3), speed_ratio=round(speed_ratio, 3),
             goals={"rss_ratio": "<= 1.25", "speed_ratio": ">= 0.9"}, unmet=unmet,
             input_gb=round(sizes[-1] * args.rows * (FEATURES * 4 + 8) / 1e9, 2),
             overhead_s=round(overhead[stage], 2), sizes=f)


if __name__ == "__main__":
    main()
