"""Peak RSS of the real student stage streaming a cache `--scale` times larger (default 10x) over
the same stage on the 1x cache, the baseline: `python -m pipeline student CONFIG`, each run a fresh
process, peak RSS from os.wait4's ru_maxrss. Same config, model, batch and shuffle buffer; only the
number of rows differs. A streaming student's memory must not grow with the cache: goal ratio <= 1.10.
The peaks of the anonymous and file-backed parts of RSS (/proc/PID/status, sampled every 50 ms) are
printed too: mapped input pages the student has gathered rows from count in RSS but are page cache
the kernel can drop, heap that grows with the cache is not.

    .venv/bin/python bench/student_memory.py [--rows 40000] [--scale 10]

Inputs, teacher and cache are bench/scale.py's: rows of 64 float32 features in mapped .npy files,
1,000 classes, a small imported MLP teacher, a top-10 8-bit cache in 4096-row chunks made by the
real cache stage first (not measured); the student trains one epoch. One JSON line:
{"bench": "student_memory", "ratio": RSS(scale x) / RSS(1x), "goal": 1.10, ...}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import emit, workdir
from scale import config, make_inputs, mlp, run_stage

from pipeline import cache as fmt

REPO = HERE.parent


def run_student(cfg: Path) -> dict[str, float]:
    """Peak RSS in MB (os.wait4's ru_maxrss) of `python -m pipeline student CONFIG` in a fresh
    process, the peaks of its anonymous and file-backed parts, and its seconds."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)]),
           "LOGITCACHE_PROGRESS_INTERVAL": "3600"}
    peaks = {"RssAnon": 0, "RssFile": 0}  # KiB
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        p = subprocess.Popen([sys.executable, "-m", "pipeline", "student", str(cfg)], cwd=REPO, env=env,
                             stdout=out, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            try:
                lines = Path(f"/proc/{p.pid}/status").read_text().splitlines()
            except OSError:
                lines = []
            for line in lines:
                key, _, value = line.partition(":")
                if key in peaks:
                    peaks[key] = max(peaks[key], int(value.split()[0]))
            time.sleep(0.05)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            out.seek(0)
            raise SystemExit(f"student failed:\n{out.read().decode()[-3000:]}")
    return {"peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "peak_anon_mb": round(peaks["RssAnon"] / 1024, 1),
            "peak_file_mb": round(peaks["RssFile"] / 1024, 1), "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=40_000, help="rows of the 1x cache")
    ap.add_argument("--scale", type=int, default=10, help="the larger cache holds this many times the rows")
    args = ap.parse_args()
    root = workdir("memory")
    torch.manual_seed(0)
    teacher = root / "teacher.pt"
    torch.save(mlp().state_dict(), teacher)
    figures = {}
    try:
        for label, rows in (("1x", args.rows), (f"{args.scale}x", args.scale * args.rows)):
            ws = root / label
            make_inputs(ws / "inputs", rows)
            cfg = config(ws, teacher)
            run_stage("cache", cfg)
            (cache_dir,) = (ws / "caches").iterdir()
            figures[label] = {"rows": rows, **run_student(cfg), "inputs_mb": round(rows * (64 * 4 + 8) / 2**20, 1),
                              "cache_mb": round(fmt.read_manifest(cache_dir)["bytes"] / 2**20, 1)}
            shutil.rmtree(ws)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    big = figures[f"{args.scale}x"]
    small = figures["1x"]
    ratio = big["peak_rss_mb"] / small["peak_rss_mb"]
    emit("student_memory", stage="student", ratio=round(ratio, 3), goal=1.10, met=ratio <= 1.10,
         anon_ratio=round(big["peak_anon_mb"] / small["peak_anon_mb"], 3),
         growth_mb={k: round(big[k] - small[k], 1) for k in ("peak_rss_mb", "peak_anon_mb", "peak_file_mb")},
         sizes=figures)


if __name__ == "__main__":
    main()
