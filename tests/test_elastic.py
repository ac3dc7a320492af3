"""Elastic resume: the epoch's stream does not depend on world size or workers, a run stopped on R
ranks resumes on R' with every unseen item exactly once, every rank yields as many batches as the
others (batch size 1 included), and a saved position is refused by another cache or order."""

from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest
import torch
from test_api import C, teacher_logits, write

import pipeline as lc
from pipeline.train.plan import rank_layout, remaining, span_items, take


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    t = teacher_logits(1003)
    return lc.open_cache(write(tmp_path_factory.mktemp("c"), t, lc.Dense(C, "float32"), rows_per_shard=300,
                               chunk_rows=64).path)


def run(cache, world, batches=None, state=None, batch_size=25, workers=1, **kw):
    """Every rank of `world` (explicit ranks, as DDP ranks would resolve them) from `state`, each for
    `batches` batches (None: to the end of the epoch); (ids per rank, batch counts, rank 0's state)."""
    ids, counts, states = [], [], []
    for rank in range(world):
        ds = cache.dataset(batch_size=batch_size, seed=5, rank=rank, world_size=world, **kw)
        ds.set_epoch(2)
        if state is not None:
            ds.load_state_dict(state)
        loader = ds.loader(num_workers=workers, multiprocessing_context="fork") if workers > 1 else ds
        got = list(itertools.islice(iter(loader), batches))
        ids.append([i for b in got if not b["padding"] for i in b["sample_id"].tolist()])
        counts.append(len(got) if batches is not None else len(ds))
        states.append(loader.state_dict() if workers > 1 else ds.state_dict())
    return ids, counts, states[0]


def test_the_stream_is_the_same_for_any_world_size(cache):
    streams = {w: [i for rank in run(cache, w)[0] for i in rank] for w in (1, 2, 3, 4)}
    assert sorted(streams[1]) == list(range(1003))
    assert streams[2] == streams[1] and streams[3] == streams[1] and streams[4] == streams[1]


@pytest.mark.parametrize("after", [(2,), (3,), (3, 2)])
def test_four_ranks_stopped_mid_epoch_resume_on_fewer_with_every_item_once(cache, after):
    seen, counts, state = run(cache, 4, batches=4)
    assert counts == [4, 4, 4, 4]
    for world in after:
        more, counts, state = run(cache, world, batches=3 if world != after[-1] else None, state=state)
        assert len(set(counts)) == 1  # DDP ranks step together after the resume too
        seen += more
    got = collections.Counter(i for rank in seen for i in rank)
    assert max(got.values()) == 1 and sorted(got) == list(range(1003))


def test_a_resume_on_another_batch_size_or_worker_count_sees_the_rest(cache):
    head, _, state = run(cache, 2, batches=5, batch_size=25)
    tail, counts, _ = run(cache, 2, state=state, batch_size=40, workers=2)
    got = collections.Counter(i for part in head + tail for i in part)
    assert max(got.values()) == 1 and sorted(got) == list(range(1003)) and len(set(counts)) == 1


def test_the_same_layout_with_other_workers_resumes_batch_for_batch(cache):
    ds = cache.dataset(batch_size=50, seed=4)
    ds.set_epoch(1)
    full = [b["sample_id"] for b in ds.loader(num_workers=2, multiprocessing_context="fork")]
    loader = cache.dataset(batch_size=50, seed=4).loader(num_workers=2, multiprocessing_context="fork")
    loader.dataset.set_epoch(1)
    it = iter(loader)
    head = [next(it)["sample_id"] for _ in range(7)]
    state = loader.state_dict()
    del it
    for workers in (0, 3):
        again = cache.dataset(batch_size=50, seed=4)
        again.load_state_dict(state)
        tail = [b["sample_id"] for b in (again.loader(num_workers=workers, multiprocessing_context="fork")
                                         if workers else again)]
        assert len(head + tail) == len(full) and all(torch.equal(a, b) for a, b in zip(head + tail, full))


@pytest.mark.parametrize(("n", "world"), [(5, 4), (1001, 8), (3, 4)])
def test_batch_size_one_on_an_uneven_split_pads_so_every_rank_steps_together(tmp_path, n, world):
    c = lc.open_cache(write(tmp_path, teacher_logits(n), lc.Dense(C, "float32"), rows_per_shard=64,
                            chunk_rows=16).path)
    per_rank, real, pads = [], [], []
    for rank in range(world):
        batches = list(c.dataset(batch_size=1, seed=0, rank=rank, world_size=world))
        per_rank.append(len(batches))
        real += [int(b["sample_id"]) for b in batches if not b["padding"]]
        pads += [b for b in batches if b["padding"]]
    assert len(set(per_rank)) == 1 and per_rank[0] == -(-n // world)
    assert sorted(real) == list(range(n))  # every item once; padding is on top
    assert len(pads) == world * per_rank[0] - n
    s = torch.randn(1, C, requires_grad=True)
    for b in pads:  # a padding batch trains nothing, and still has a graph for DDP's all-reduce
        loss = lc.kd_loss(s, b, temperature=1.0)
        loss.backward()
        assert loss.item() == 0.0 and s.grad is not None and not s.grad.any()
    if pads:  # even from a student whose output overflowed
        bad = torch.full((1, C), float("inf"), requires_grad=True)
        loss = lc.kd_loss(bad, pads[0], temperature=1.0)
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(bad.grad, torch.zeros(1, C))


def test_remaining_is_exactly_what_no_rank_consumed():
    for n, world, bs, drop_last in itertools.product((1, 7, 50, 103), (1, 2, 3, 4), (1, 4, 9), (False, True)):
        spans = [(0, n)]
        layouts = [rank_layout(n, bs, world, r, drop_last) for r in range(world)]
        for k in range(max(len(s) for _, s in layouts) + 1):
            consumed = {i for start, sizes in layouts for i in range(start, start + sum(sizes[:k]))}
            laid_out = {i for start, sizes in layouts for i in range(start, start + sum(sizes))}
            rest = remaining(spans, bs, world, drop_last, k)
            left = [i for a, b in rest for i in range(a, b)]
            assert left == sorted(laid_out - consumed), (n, world, bs, drop_last, k)
            assert span_items(rest) == len(left)
    assert take([(0, 5), (10, 20), (30, 31)], 3, 14) == [(3, 5), (10, 19)]
    assert take([(0, 5), (10, 20), (30, 31)], 3, 16) == [(3, 5), (10, 20), (30, 31)]


def test_a_state_of_another_order_or_cache_is_refused(cache, tmp_path):
    _, _, state = run(cache, 1, batches=3)
    for key, value, kw in (("shuffle_chunks", 4, {"shuffle_chunks": 8}), ("seed", 5, {"seed": 6}),
                           ("shuffle", True, {"shuffle": False})):
        ds = cache.dataset(batch_size=25, **{"seed": 5, **kw})
        with pytest.raises(ValueError, match=f"the state has {key}={value!r} but this dataset"):
            ds.load_state_dict(state)
    other = lc.open_cache(write(tmp_path, teacher_logits(1003, seed=1), lc.Dense(C, "float32"),
                                rows_per_shard=300, chunk_rows=64, temperature=3.0).path)
    with pytest.raises(ValueError, match=f"the state has cache='{cache.id}'"):
        other.dataset(batch_size=25, seed=5).load_state_dict(state)


def test_rank_is_resolved_when_iteration_starts_not_when_the_dataset_is_built(cache, monkeypatch):
    ds = cache.dataset(batch_size=100, seed=0)  # built before the process group exists
    assert (ds.rank, ds.world_size) == (0, 1)
    rank1 = [i for b in cache.dataset(batch_size=100, seed=0, rank=1, world_size=2) for i in b["sample_id"].tolist()]
    assert len(rank1) == 1003 // 2
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # forked workers inherit the group
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    plain = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork")
    assert [i for b in plain for i in b["sample_id"].tolist()] == rank1  # no set_epoch, no ds.loader()
    assert [i for b in ds for i in b["sample_id"].tolist()] == rank1  # in the process too


def test_state_dict_of_a_dataset_iterated_by_plain_dataloader_workers_is_refused(cache):
    ds = cache.dataset(batch_size=100, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork")
    it = iter(loader)
    next(it)
    next(it)
    with pytest.raises(ValueError, match=r"use ds.loader\(\) and its state_dict\(\), or pass state_dict\(batches=N\)"):
        ds.state_dict()
    assert ds.state_dict(batches=2)["batches"] == 2
    del it
    np.testing.assert_equal(ds.state_dict(batches=0)["batches"], 0)
