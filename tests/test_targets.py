"""A batch's targets are made where the loss reads them: not in the loader, equal to the
encoding's targets of the decoded rows, through a DataLoader's workers too."""

from __future__ import annotations

import pickle

import numpy as np
import torch

import pipeline as lc
from pipeline.format.encodings import Targets, TopK


def _cache(tmp_path):
    g = torch.Generator().manual_seed(0)
    with lc.CacheWriter(tmp_path, spec={"teacher": "t", "dataset": "d"}, encoding=TopK(50, 4, bits=8),
                        num_classes=50, rows_per_shard=64, chunk_rows=32) as w:
        w.add(np.arange(128), logits=torch.randn(128, 50, generator=g) * 3)
    return lc.open_cache(w.path)


def test_targets_are_made_when_read_and_equal_the_encodings(tmp_path):
    cache = _cache(tmp_path)
    ds = cache.dataset(batch_size=16, temperature=2.0)
    batch = next(iter(ds))
    t = batch["targets"]
    assert isinstance(t, Targets) and t._made is None  # the loader only decoded
    decoded = {k: batch[k].numpy() for k in t.decoded}  # the decoded columns the batch carries (format 3: tail_mean_logp too)
    want = cache.encoding.targets(decoded, "cpu", 2.0 / cache.temperature)
    assert sorted(t.keys()) == sorted(want) and all(torch.equal(t[k], want[k]) for k in want)
    assert t.to("cpu") is t
    again = pickle.loads(pickle.dumps(next(iter(ds))["targets"]))
    assert all(torch.equal(again[k], want[k]) for k in want)

    logits = torch.randn(16, 50, requires_grad=True)
    loss = lc.kd_loss(logits, batch, temperature=2.0)
    plain = dict(batch, targets={k: v.clone() for k, v in want.items()})
    assert torch.equal(loss, lc.kd_loss(logits, plain, temperature=2.0))


def test_targets_pass_through_dataloader_workers(tmp_path):
    cache = _cache(tmp_path)
    ds = cache.dataset(batch_size=16)
    direct = [lc.kd_loss(torch.zeros(len(b["sample_id"]), 50), b, temperature=1.0) for b in ds]
    through = [lc.kd_loss(torch.zeros(len(b["sample_id"]), 50), b, temperature=1.0)
               for b in ds.loader(num_workers=1, pin_memory=False)]
    assert isinstance(next(iter(ds.loader(num_workers=1)))["targets"], Targets)
    assert torch.equal(torch.stack(direct), torch.stack(through))
