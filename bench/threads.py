"""Torch's OpenMP threads on a shared machine: libgomp's default spin-wait against the short spin
(GOMP_SPINCOUNT=1000) that the CLI sets (`pipeline.tune_process`), side by side, idle and with one other busy process.

    .venv/bin/python bench/threads.py

Two workloads, each in a fresh process per setting (libgomp reads its settings when torch loads):
a small student's training step (MLP 128-64-1000, batch 256, Adam) and a teacher's inference
(MLP 512-2048-1000 on 4,096 rows, log-softmax and top-10). The other process is a plain Python loop
at normal priority, as another user's job on the same cores would be. Prints one JSON line:
{"bench": "threads", "idle": {...}, "busy": {...}} with ms per step for each setting and
`short_over_default` (ms with the short spin / ms with libgomp's default; < 1 is faster).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import line, record

WORK = r"""
import json, sys, time, torch
torch.manual_seed(0)
small = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1000))
opt = torch.optim.Adam(small.parameters())
x, y = torch.randn(256, 128), torch.randint(0, 1000, (256,))
big = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 1000))
xb = torch.randn(4096, 512)

def step():
    loss = torch.nn.functional.cross_entropy(small(x), y)
    opt.zero_grad(); loss.backward(); opt.step()

def infer():
    with torch.no_grad():
        big(xb).log_softmax(-1).topk(10)

out = {}
for name, f, n in (("student_step_ms", step, 100), ("teacher_batch_ms", infer, 8)):  # make bench fits in 20 min
    for _ in range(5):
        f()
    best = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            f()
        best.append((time.perf_counter() - t) / n * 1e3)
    out[name] = round(sorted(best)[1], 2)  # the median of 3 runs
print(json.dumps(out))
"""


def measure(spin: str | None) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    if spin is not None:
        env["GOMP_SPINCOUNT"] = spin
    p = subprocess.run([sys.executable, "-c", WORK], env=env, capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


@contextmanager
def busy() -> Iterator[None]:
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        p.kill()
        p.wait()


def compare() -> dict[str, dict[str, float]]:
    default, short = measure(None), measure("1000")
    return {"default": default, "short_spin": short,
            "short_over_default": {k: round(short[k] / default[k], 3) for k in default}}


def main() -> None:
    idle = compare()
    with busy():
        loaded = compare()
    record("threads", line("threads", torch_threads=os.cpu_count(), idle=idle, busy=loaded))


if __name__ == "__main__":
    main()
