"""torch.distributed (gloo) ranks x two DataLoader workers each, reading one cache, then resumed on
fewer ranks.

    python examples/distributed.py [WORKDIR]

Proves the partitioning and the elastic resume:
- 4 ranks, 2 epochs: every row is seen exactly once per epoch, every rank yields the same number of
  batches (a DDP model trains through both epochs without a hang). Epoch 0 runs a plain DataLoader
  over a dataset built before init_process_group, without set_epoch: each worker resolves its rank
  when iteration starts.
- Epoch 1 stopped after 3 batches; the saved position resumed on 2 ranks and on 3 ranks sees
  exactly the rows the 4 ranks had not seen.
- Batch size 1 on 1,001 rows over 4 ranks: every rank steps 251 times (3 padding batches, weighed
  0 by kd_loss), every row once.
Prints the figures. About a minute on 2 cores.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import pipeline as lc

ROWS, UNEVEN, CLASSES, BATCH, SEED, STOP = 1000, 1001, 10, 37, 3, 3


def make_cache(workdir: str, rows: int) -> str:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 8, generator=g)
    teacher = nn.Linear(8, CLASSES)
    spec = {"teacher": {"name": "linear", "revision": "0"}, "dataset": {"fingerprint": f"ddp-example-{rows}"}}
    with lc.CacheWriter(f"{workdir}/caches", spec=spec, encoding="dense", num_classes=CLASSES, rows_per_shard=256,
                        chunk_rows=64) as w, torch.no_grad():
        w.add(np.arange(rows), logits=teacher(x))
    np.save(f"{workdir}/x-{rows}.npy", x.numpy())
    return str(w.path)


def train(model: nn.Module, opt: torch.optim.Optimizer, batches, temperature: float) -> list[list[int]]:
    """DDP steps over `batches`; the sample ids of each batch that is not padding."""
    ids = []
    for batch in batches:
        loss = lc.kd_loss(model(batch["inputs"]), batch, temperature=temperature)
        opt.zero_grad()
        loss.backward()  # all-reduces: a rank with an extra batch would hang here
        opt.step()
        ids.append([] if batch["padding"] else batch["sample_id"].tolist())
    return ids


def rank_main(rank: int, world: int, workdir: str, job: str) -> None:
    cache = lc.open_cache(Path(f"{workdir}/cache-{ROWS}.path").read_text())
    x = np.load(f"{workdir}/x-{ROWS}.npy")
    early = cache.dataset(batch_size=BATCH, seed=SEED, inputs=x)  # before the process group exists
    dist.init_process_group("gloo", init_method=f"file://{workdir}/init-{job}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(8, CLASSES))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # mp.spawn makes "spawn" the default inside the ranks; fork workers as torchrun's ranks would
    fork = {"num_workers": 2, "multiprocessing_context": "fork"}
    out: dict = {"rank": rank}
    if job == "start":
        plain = torch.utils.data.DataLoader(early, batch_size=None, **fork)  # no set_epoch, no .loader()
        out["epochs"] = [train(model, opt, plain, cache.temperature)]
        ds = cache.dataset(batch_size=BATCH, seed=SEED, inputs=x)
        loader = ds.loader(**fork)
        ds.set_epoch(1)
        out["epochs"].append(train(model, opt, loader, cache.temperature))
        it = iter(loader)
        out["head"] = [next(it)["sample_id"].tolist() for _ in range(STOP)]
        state = loader.state_dict()
        del it
        if rank == 0:
            with open(f"{workdir}/state.json", "w") as f:
                json.dump(state, f)
        uneven = lc.open_cache(Path(f"{workdir}/cache-{UNEVEN}.path").read_text())
        xu = np.load(f"{workdir}/x-{UNEVEN}.npy")
        out["uneven"] = train(model, opt, uneven.dataset(batch_size=1, seed=SEED, inputs=xu).loader(**fork),
                              cache.temperature)
    else:
        ds = cache.dataset(batch_size=BATCH, seed=SEED, inputs=x)
        loader = ds.loader(**fork)
        with open(f"{workdir}/state.json") as f:
            loader.load_state_dict(json.load(f))
        out["tail"] = train(model, opt, loader, cache.temperature)
    gathered = [None] * world
    dist.all_gather_object(gathered, out)
    if rank == 0:
        with open(f"{workdir}/{job}.json", "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()
    # DDP keeps the gloo backend alive past destroy_process_group, so its worker thread may still be
    # dropping the last collective's tensors when the interpreter exits; that needs the GIL, a finalizing
    # interpreter ends the thread instead, and the process aborts (SIGABRT, "terminate called without an
    # active exception"). Everything this rank owes is written: leave without the teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def coverage(parts: list[list[int]], rows: int) -> str:
    seen = [i for part in parts for i in part]
    counts = collections.Counter(seen)
    return (f"rows {rows}, seen {len(seen)}, distinct {len(counts)}, duplicates {sum(c - 1 for c in counts.values())}, "
            f"missing {len(set(range(rows)) - set(counts))}")


def main(workdir: str) -> None:
    for rows in (ROWS, UNEVEN):
        with open(f"{workdir}/cache-{rows}.path", "w") as f:
            f.write(make_cache(workdir, rows))
    mp.spawn(rank_main, args=(4, workdir, "start"), nprocs=4, join=True)
    start = json.loads(Path(f"{workdir}/start.json").read_text())
    for epoch in range(2):
        per_rank = [len(r["epochs"][epoch]) for r in start]
        print(f"epoch {epoch} on 4 ranks: {coverage([b for r in start for b in r['epochs'][epoch]], ROWS)}, "
              f"batches per rank {per_rank}")
    print(f"epoch order differs between epochs: {start[0]['epochs'][0] != start[0]['epochs'][1]}")
    head = [b for r in start for b in r["head"]]
    for world in (2, 3):
        mp.spawn(rank_main, args=(world, workdir, f"resume{world}"), nprocs=world, join=True)
        tail = json.loads(Path(f"{workdir}/resume{world}.json").read_text())
        print(f"epoch 1 stopped after {STOP} batches on 4 ranks, resumed on {world} ranks: "
              f"{coverage(head + [b for r in tail for b in r['tail']], ROWS)}, "
              f"batches per rank {[len(r['tail']) for r in tail]}")
    per_rank = [len(r["uneven"]) for r in start]
    pads = sum(1 for r in start for b in r["uneven"] if not b)
    print(f"batch size 1 on 4 ranks: {coverage([b for r in start for b in r['uneven']], UNEVEN)}, "
          f"batches per rank {per_rank}, padding batches {pads}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="distributed-"))
