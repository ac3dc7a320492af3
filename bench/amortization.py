"""Wall time of 4 students trained from one cache (teacher run once, by the cache stage) over 4
online distillations (teacher forward on every batch), side by side; and the break-even number
of students above which caching wins.

    .venv/bin/python bench/amortization.py [--rows 12000] [--epochs 2]
"""

from __future__ import annotations

from pipeline.core.host import tune_process

tune_process()  # the process settings the CLI's stages run under; before torch loads (libgomp reads them then)

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import Timer, epoch_batches, heavy_workspace, line, record
from heavy_teacher import make

from pipeline.core.config import load_config
from pipeline.format import reader as fmt
from pipeline.train import losses
from stages import cache as cache_stage

BATCH, K, T = 256, 32, 2.0


def student(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1000))
    return m, torch.optim.Adam(m.parameters(), 1e-3)


def step(m: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, ids, logp, residual) -> None:
    loss = losses.kd_topk(m(x), ids, logp, residual, T)
    opt.zero_grad()
    loss.backward()
    opt.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=12000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--students", type=int, default=4)
    args = ap.parse_args()
    ws, x = heavy_workspace("amortization", args.rows, {"k": K, "rows_per_shard": 4096, "chunk_rows": 1024,
                                                         "batch_size": 512}, temperature=T)
    teacher = make().eval()
    teacher.load_state_dict(torch.load(ws / "teacher.pt"))
    xt = torch.from_numpy(x)

    with Timer() as t_cache:
        d = cache_stage.main(load_config(ws / "c.yaml"))
    with Timer() as t_students:
        for s in range(args.students):
            m, opt = student(s)
            reader = fmt.CacheReader(d)
            for epoch in range(args.epochs):
                for b in epoch_batches(reader, BATCH, s, 4, epoch):
                    step(m, opt, xt[torch.from_numpy(b["sample_id"])], torch.from_numpy(b["ids"].astype(np.int64)),
                         torch.from_numpy(b["logp"]).float(), torch.from_numpy(b["residual"]).float())
    with Timer() as t_online:
        for s in range(args.students):
            m, opt = student(s)
            g = torch.Generator().manual_seed(s)
            for _ in range(args.epochs):
                for idx in torch.randperm(args.rows, generator=g).split(BATCH):
                    with torch.no_grad():  # the teacher in the loop, every batch, every student
                        logp = torch.log_softmax(teacher(xt[idx]) / T, -1)
                        vals, ids = logp.topk(K, -1)
                        residual = (1 - vals.exp().sum(-1)).clamp(min=0)
                    step(m, opt, xt[idx], ids, vals, residual)
    cached_total = t_cache.seconds + t_students.seconds
    per_cached = t_students.seconds / args.students
    per_online = t_online.seconds / args.students
    break_even = t_cache.seconds / (per_online - per_cached) if per_online > per_cached else None
    record("amortization", line("amortization", rows=args.rows, epochs=args.epochs, students=args.students,
         cache_stage_s=round(t_cache.seconds, 2), cached_students_s=round(t_students.seconds, 2),
         online_students_s=round(t_online.seconds, 2), ratio=round(cached_total / t_online.seconds, 3),
         break_even_students=round(break_even, 2) if break_even else None))


if __name__ == "__main__":
    main()
