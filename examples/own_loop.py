"""Train your own torch student from a logitcache cache, in your own loop, with DataLoader workers.

    python examples/own_loop.py [WORKDIR]

A small teacher we run ourselves labels generated data; CacheWriter stores its top-4 soft targets
at T = 2; a student is trained from the cache with kd_loss (10% hard labels) through a DataLoader
with 2 workers, checkpointing its data position every epoch. Prints one line per epoch and the
student's final agreement with the teacher. About 15 s on 2 CPU cores.
"""

from __future__ import annotations

import sys
import tempfile

import numpy as np
import torch
from torch import nn

import pipeline as lc


def main(workdir: str) -> float:
    torch.manual_seed(0)
    x = torch.randn(4096, 20)  # the inputs; sample id = row index
    teacher = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        labels = teacher(x).argmax(-1)

    # 1. Cache the teacher once. The spec names what determines the targets (it becomes the id).
    spec = {"teacher": {"name": "mlp-teacher", "revision": "seed0"}, "dataset": {"fingerprint": "gauss-4096x20-seed0"}}
    with lc.CacheWriter(f"{workdir}/caches", spec=spec, encoding=lc.TopK(10, 4), num_classes=10,
                        temperature=2.0, rows_per_shard=1024, chunk_rows=256) as w, torch.no_grad():
        for s in range(0, len(x), 512):
            w.add(np.arange(s, s + 512), logits=teacher(x[s:s + 512]))

    # 2. Train a student of our own from it.
    cache = lc.open_cache(w.path)
    ds = cache.dataset(batch_size=128, seed=0, inputs=x.numpy())
    loader = ds.loader(num_workers=2)
    student = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    for epoch in range(4):
        ds.set_epoch(epoch)
        total, n = 0.0, 0
        for batch in loader:
            logits = student(batch["inputs"])  # (B, 10)
            loss = lc.kd_loss(logits, batch, temperature=cache.temperature, alpha=0.1,
                              labels=labels[batch["sample_id"]])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item(), n + 1
        checkpoint = {"model": student.state_dict(), "optimizer": opt.state_dict(), "data": loader.state_dict()}
        print(f"epoch {epoch}: {n} batches, mean loss {total / n:.4f}, next data position: epoch "
              f"{checkpoint['data']['epoch']} batch {checkpoint['data']['batches']}")
    with torch.no_grad():
        agreement = float((student(x).argmax(-1) == labels).float().mean())
    print(f"cache {cache.id} ({cache.encoding.label()}, T={cache.temperature}): student agrees with the teacher "
          f"on {agreement:.3f} of inputs")
    return agreement


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="own_loop-"))
