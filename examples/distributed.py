"""Two torch.distributed processes (gloo) x two DataLoader workers each, reading one cache.

    python examples/distributed.py [WORKDIR]

Proves the partitioning: in each of two epochs every row is seen exactly once across the 2 ranks x
2 workers, every rank yields the same number of batches (a DDP model trains through both epochs
without a hang), and a rank that stops mid-epoch and resumes from loader.state_dict() gets exactly
the remaining batches with the same contents. Prints the coverage figures. About 30 s on 2 cores.
"""

from __future__ import annotations

import collections
import os
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import pipeline as lc

ROWS, CLASSES, BATCH, SEED = 1000, 10, 37, 3


def make_cache(workdir: str) -> tuple[str, np.ndarray]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, 8, generator=g)
    teacher = nn.Linear(8, CLASSES)
    spec = {"teacher": {"name": "linear", "revision": "0"}, "dataset": {"fingerprint": "ddp-example"}}
    with lc.CacheWriter(f"{workdir}/caches", spec=spec, encoding="dense", num_classes=CLASSES, rows_per_shard=256,
                        chunk_rows=64) as w, torch.no_grad():
        w.add(np.arange(ROWS), logits=teacher(x))
    return str(w.path), x.numpy()


def rank_main(rank: int, world: int, init_file: str, cache_dir: str, x: np.ndarray) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    cache = lc.open_cache(cache_dir)
    ds = cache.dataset(batch_size=BATCH, seed=SEED, inputs=x)  # rank and world size from torch.distributed
    # mp.spawn makes "spawn" the default inside the ranks; fork workers as torchrun's ranks would
    loader = ds.loader(num_workers=2, multiprocessing_context="fork")
    model = nn.parallel.DistributedDataParallel(nn.Linear(8, CLASSES))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    epochs = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        ids = []
        for batch in loader:
            loss = lc.kd_loss(model(batch["inputs"]), batch, temperature=cache.temperature)
            opt.zero_grad()
            loss.backward()  # all-reduces: a rank with an extra batch would hang here
            opt.step()
            ids.append(batch["sample_id"].tolist())
        epochs.append(ids)

    # Stop epoch 1 after 3 batches, save the position, resume in a fresh dataset and loader.
    ds.set_epoch(1)
    it = iter(loader)
    head = [next(it)["sample_id"].tolist() for _ in range(3)]
    state = loader.state_dict()
    del it
    ds2 = cache.dataset(batch_size=BATCH, seed=SEED, inputs=x)
    resumed = ds2.loader(num_workers=2, multiprocessing_context="fork")
    resumed.load_state_dict(state)
    tail = [b["sample_id"].tolist() for b in resumed]
    out = [None] * world
    dist.all_gather_object(out, {"rank": rank, "epochs": epochs, "resume_equal": head + tail == epochs[1],
                                 "resumed_batches": len(tail), "state": state})
    if rank == 0:
        report(out)
    dist.destroy_process_group()


def report(results: list[dict]) -> None:
    for epoch in range(2):
        seen = [i for r in results for b in r["epochs"][epoch] for i in b]
        counts = collections.Counter(seen)
        dup = sum(c - 1 for c in counts.values() if c > 1)
        missing = ROWS - len(counts)
        per_rank = [len(r["epochs"][epoch]) for r in results]
        print(f"epoch {epoch}: rows {ROWS}, seen {len(seen)}, distinct {len(counts)}, duplicates {dup}, "
              f"missing {missing}, batches per rank {per_rank}")
    same_order = results[0]["epochs"][0] == results[0]["epochs"][1]
    print(f"epoch order differs between epochs: {not same_order}")
    for r in results:
        print(f"resume rank {r['rank']}: stopped after 3 batches of epoch 1, resumed {r['resumed_batches']} batches, "
              f"equal to the uninterrupted epoch: {r['resume_equal']}")


def main(workdir: str) -> None:
    cache_dir, x = make_cache(workdir)
    init_file = os.path.join(workdir, "dist-init")
    mp.spawn(rank_main, args=(2, init_file, cache_dir, x), nprocs=2, join=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="distributed-"))
