"""The cache stage's peak RSS over repeated identical runs, with glibc's mmap threshold pinned at
8 MB (the CLI's default, `pipeline.steady_heap`), left to glibc's own adjustment
(LOGITCACHE_STEADY_HEAP=0), and pinned at 1, 4 and 16 MB (MALLOC_MMAP_THRESHOLD_).

    .venv/bin/python bench/heap.py [--task classify|lm] [--rows 200000] [--words 200000] [--runs 3]
                                   [--settings pinned_8mb,glibc_adjusting,...]

classify: `bench/scale.py`'s classification cache stage (128 float32 features, an MLP teacher over
1,000 classes, top-10 8-bit, 4,096-row teacher batches: 16 MB of logits per batch). lm: its LM
cache stage (the 1-layer GPT teacher over a 2,048-token BPE, batches of 32 sequences of 64 tokens:
2,048 x 2,048 float32 logits, just over 16 MB with the allocator's header) on a generated corpus of
--words words (about 1.2 tokens each), tokenized once before the runs. A fresh process per run,
its own VmHWM at exit (bench/common.py run_stage); settings are interleaved run by run. One JSON
line: {"bench": "heap", "task": ..., "peak_mb": {setting: [per run]}, "rows_per_s": {...},
"spread_mb": {setting: max - min}}; for lm a row is a token.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import scale
from common import line, record, run_stage, workdir

SETTINGS = {"pinned_8mb": {}, "glibc_adjusting": {"LOGITCACHE_STEADY_HEAP": "0"},
            "pinned_1mb": {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)},
            "pinned_4mb": {"MALLOC_MMAP_THRESHOLD_": str(4 << 20)},
            "pinned_16mb": {"MALLOC_MMAP_THRESHOLD_": str(16 << 20)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=("classify", "lm"), default="classify")
    ap.add_argument("--rows", type=int, default=200_000, help="classify: rows")
    ap.add_argument("--words", type=int, default=200_000, help="lm: words of the cached corpus")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated: " + ", ".join(SETTINGS))
    args = ap.parse_args()
    unknown = sorted(set(args.settings.split(",")) - set(SETTINGS))
    if unknown:
        ap.error(f"--settings: unknown {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    chosen = {k: SETTINGS[k] for k in args.settings.split(",")}
    ws = workdir("heap")
    try:
        if args.task == "lm":
            scale.make_corpus(ws / "source.txt", scale.LM_SOURCE_WORDS, seed=1)
            scale.make_corpus(ws / "transfer.txt", args.words, seed=2)
            cfg = scale.lm_config(ws, ws / "transfer.txt")
            scale.stage("teachers", cfg)
            scale.stage("tokenize", cfg)
        else:
            torch.manual_seed(0)
            teacher = ws / "teacher.pt"
            torch.save(scale.mlp().state_dict(), teacher)
            scale.make_inputs(ws / "inputs", args.rows)
            cfg = scale.config(ws, teacher)
        peaks: dict[str, list[float]] = {k: [] for k in chosen}
        rates: dict[str, list[float]] = {k: [] for k in chosen}
        for _ in range(args.runs):
            for name, env in chosen.items():
                shutil.rmtree(ws / "caches", ignore_errors=True)
                r = run_stage(["cache", str(cfg)], env={"PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)]),
                                                       **env}, cwd=HERE.parent)
                peaks[name].append(round(r.peak_mb, 1))
                rates[name].append(round(r.rate or 0))
    finally:
        shutil.rmtree(ws, ignore_errors=True)
    size = {"words": args.words} if args.task == "lm" else {"rows": args.rows}
    record(f"heap-{args.task}", line("heap", task=args.task, **size, peak_mb=peaks, rows_per_s=rates,
         spread_mb={k: round(max(v) - min(v), 1) for k, v in peaks.items()}))


if __name__ == "__main__":
    main()
