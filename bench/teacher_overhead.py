"""Cache stage throughput over a bare teacher forward loop (same model, batch and device, nothing
written), side by side. Writing must hide behind compute.

    .venv/bin/python bench/teacher_overhead.py [--rows 24000] [--device auto]
"""

from __future__ import annotations

from pipeline.core.host import tune_process

tune_process()  # the process settings the CLI's stages run under; before torch loads (libgomp reads them then)

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import Timer, heavy_workspace, line, record
from heavy_teacher import make

from pipeline.core.config import load_config
from pipeline.models.builders import resolve_device
from stages import cache as cache_stage


def overhead(ws: Path, x: np.ndarray, device: torch.device, rows: int, batch: int, repeats: int,
             teacher: dict[str, Any] | None = None) -> dict[str, Any]:
    """Best-of-`repeats` rows/s of a bare forward loop of the workspace's teacher (under bf16
    autocast on a GPU, as the stage runs it) and of the cache stage over the same rows, interleaved."""
    model = make(**(teacher or {})).to(device).eval()
    model.load_state_dict(torch.load(ws / "teacher.pt"))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def bare() -> None:
        with torch.inference_mode(), autocast:
            for b in range(0, rows, batch):
                model(torch.from_numpy(x[b:b + batch]).to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()

    best = {"bare": 0.0, "cache": 0.0}
    for r in range(repeats):
        with Timer() as t:
            bare()
        best["bare"] = max(best["bare"], rows / t.seconds)
        cfg = load_config(ws / "c.yaml", [f"cache.root={ws / f'c{r}'}"])
        with Timer() as t:
            cache_stage.main(cfg)
        best["cache"] = max(best["cache"], rows / t.seconds)
    return {"bare_rows_per_s": round(best["bare"]), "cache_rows_per_s": round(best["cache"]),
            "ratio": round(best["cache"] / best["bare"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=24000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    ws, x = heavy_workspace("overhead", args.rows, {"rows_per_shard": 2000, "chunk_rows": 1000, "batch_size": 500,
                                                     "device": args.device})
    device = resolve_device(args.device)
    try:
        got = overhead(ws, x, device, args.rows, 500, args.repeats)
    finally:
        shutil.rmtree(ws, ignore_errors=True)
    record(f"teacher_overhead-{device.type}", line("teacher_overhead", device=str(device), rows=args.rows,
                                                  encoding="topk32", classes=1000, **got, goal=0.97))


if __name__ == "__main__":
    main()
