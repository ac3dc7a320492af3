"""Student steps/s reading targets from the cache on disk, over the same student with every target
already in RAM (same batches, same loss), side by side.

    .venv/bin/python bench/student_streaming.py [--rows 100000]
"""

from __future__ import annotations

from pipeline.core.host import tune_process

tune_process()  # the process settings the CLI's stages run under; before torch loads (libgomp reads them then)

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timer, epoch_batches, line, record, workdir, write_cache

from pipeline.format import reader as fmt
from pipeline.format.encodings import TopK
from pipeline.train import losses


def inputs_for(ids: np.ndarray) -> torch.Tensor:
    """Deterministic features per sample id, made on the fly: no input array in memory."""
    freq = np.arange(1, 65, dtype=np.float32) * np.float32(1e-3)
    return torch.from_numpy(np.sin(ids[:, None].astype(np.float32) * freq))


def train(batches, student: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    steps = 0
    for b in batches:
        logits = student(inputs_for(b["sample_id"]))
        loss = losses.kd_topk(logits, torch.from_numpy(b["ids"].astype(np.int64)), torch.from_numpy(b["logp"]),
                              torch.from_numpy(b["residual"]), 2.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    return steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    d = write_cache(workdir("streaming"), args.rows, 1000, TopK(1000, 32), 25_000, 4096)
    reader = fmt.CacheReader(d)
    in_ram = list(epoch_batches(reader, args.batch, 0, 4, 0))  # the same batches, decoded once

    def student() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 1000))
        return m, torch.optim.Adam(m.parameters(), 1e-3)

    best = {"disk": 0.0, "ram": 0.0}
    for _ in range(args.repeats):
        for name in ("disk", "ram"):
            m, opt = student()
            with Timer() as t:
                steps = train(epoch_batches(reader, args.batch, 0, 4, 0) if name == "disk" else in_ram, m, opt)
            best[name] = max(best[name], steps / t.seconds)
    record("student_streaming", line("student_streaming", rows=args.rows, batch=args.batch, encoding="topk32",
                                     classes=1000,
         disk_steps_per_s=round(best["disk"], 2), ram_steps_per_s=round(best["ram"], 2),
         ratio=round(best["disk"] / best["ram"], 3), goal=0.95))


if __name__ == "__main__":
    main()
