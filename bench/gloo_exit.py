"""How a DDP rank on gloo leaves: of N two-rank jobs, how many abort at exit when each rank returns
after destroy_process_group, and how many when it ends with os._exit(0) as examples/distributed.py's
ranks do. The two kinds of job alternate, so both see the same machine.

    .venv/bin/python bench/gloo_exit.py [--runs 60]

Each job (torch.multiprocessing.spawn): 2 gloo ranks, a DDP nn.Linear stepped 8 times,
all_gather_object, destroy_process_group. DDP keeps the gloo backend alive past
destroy_process_group, so a gloo worker thread may still be dropping the all-gather's tensors when
the interpreter exits: that needs the GIL, the finalizing interpreter ends the thread, and the rank
aborts (SIGABRT, "terminate called without an active exception"). About 3 s a job on 2 cores.
Prints one JSON line: {"bench": "gloo_exit", "runs": N, "aborts": {"return": a, "os_exit": b},
"torch": version}; the aborted ranks' own messages go to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import line, record, workdir


def rank_main(rank: int, world: int, init: str, hard_exit: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.manual_seed(rank)
    model = nn.parallel.DistributedDataParallel(nn.Linear(8, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(8):
        loss = model(torch.randn(37, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    gathered = [None] * world
    dist.all_gather_object(gathered, {"rank": rank})
    dist.destroy_process_group()
    if hard_exit:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def aborted(root: Path, job: int, hard_exit: bool) -> bool:
    """Run one two-rank job; whether a rank died of SIGABRT (any other failure is raised)."""
    try:
        mp.spawn(rank_main, args=(2, str(root / f"init-{job}-{int(hard_exit)}"), hard_exit), nprocs=2, join=True)
    except mp.ProcessExitedException as e:
        if e.signal_name != "SIGABRT":
            raise
        return True
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=60, help="jobs of each kind")
    args = ap.parse_args()
    root = workdir("gloo-exit")
    aborts = {"return": 0, "os_exit": 0}
    for job in range(args.runs):
        for kind, hard_exit in (("return", False), ("os_exit", True)):
            aborts[kind] += aborted(root, job, hard_exit)
    record("gloo_exit", line("gloo_exit", runs=args.runs, aborts=aborts, torch=torch.__version__))


if __name__ == "__main__":
    main()
