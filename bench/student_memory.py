"""Peak RSS of the real student stage streaming a cache `--scale` times larger (default 10x) over
the same stage on the 1x cache, the baseline: `python -m pipeline student CONFIG`, each run a fresh
process, peak RSS its own VmHWM (bench/common.py run_stage; a child's ru_maxrss would carry
the parent's peak over). Same config, model, batch and shuffle buffer; only the
number of rows differs. A streaming student's memory must not grow with the cache: goal ratio <= 1.10.
The peaks of the anonymous and file-backed parts of RSS (/proc/PID/status, sampled every 50 ms) are
printed too: mapped input pages the student has gathered rows from count in RSS but are page cache
the kernel can drop, heap that grows with the cache is not.

    .venv/bin/python bench/student_memory.py [--rows 40000] [--scale 10]

Inputs, teacher and cache are bench/scale.py's: rows of 128 float32 features in mapped .npy files,
1,000 classes, a small imported MLP teacher, a top-10 8-bit cache in 4096-row chunks made by the
real cache stage first (not measured); the student trains one epoch. One JSON line:
{"bench": "student_memory", "ratio": RSS(scale x) / RSS(1x), "goal": 1.10, ...}.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import line, record, workdir
from scale import FEATURES, config, make_inputs, mlp, stage

from pipeline.format import manifest as fmt


def run_student(cfg: Path) -> dict[str, float]:
    """The student stage's own peak RSS in MB, the peaks of its anonymous and file-backed parts, and
    its seconds (common.run_stage)."""
    run = stage("student", cfg)
    return {"peak_rss_mb": round(run.peak_mb, 1), "peak_anon_mb": round(run.peak_anon_mb, 1),
            "peak_file_mb": round(run.peak_file_mb, 1), "seconds": round(run.seconds, 1)}


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
            stage("cache", cfg)
            (cache_dir,) = (ws / "caches").iterdir()
            figures[label] = {"rows": rows, **run_student(cfg), "inputs_mb": round(rows * (FEATURES * 4 + 8) / 2**20, 1),
                              "cache_mb": round(fmt.read_manifest(cache_dir)["bytes"] / 2**20, 1)}
            shutil.rmtree(ws)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    big = figures[f"{args.scale}x"]
    small = figures["1x"]
    ratio = big["peak_rss_mb"] / small["peak_rss_mb"]
    record("student_memory", line("student_memory", stage="student", ratio=round(ratio, 3), goal=1.10,
                                  met=ratio <= 1.10,
         anon_ratio=round(big["peak_anon_mb"] / small["peak_anon_mb"], 3),
         growth_mb={k: round(big[k] - small[k], 1) for k in ("peak_rss_mb", "peak_anon_mb", "peak_file_mb")},
         sizes=figures))


if __name__ == "__main__":
    main()
