"""The public API: kd_loss against slow references for every encoding, exact dataset coverage over
ranks x workers, exact resume, CacheWriter byte-identical, resumable and readable by the CLI's reader."""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

import pipeline as lc
from pipeline.core.errors import CacheError
from pipeline.format import reader as fmt
from pipeline.format.manifest import read_manifest
from pipeline.format.shards import shard_name
from pipeline.train.plan import batch_sizes, rank_layout

C = 12
SPEC = {"teacher": {"name": "t", "revision": "1"}, "dataset": {"fingerprint": "data-1"}}


def teacher_logits(n: int, c: int = C, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * 2.0


def write(root, logits, encoding, *, ids=None, step=64, **kw):
    ids = np.arange(len(logits)) if ids is None else ids
    with lc.CacheWriter(root, spec=SPEC, encoding=encoding, num_classes=logits.shape[-1], **kw) as w:
        for s in range(0, len(logits), step):
            w.add(ids[s:s + step], logits=logits[s:s + step])
    return w


def whole_batch(cache, **kw):
    ds = cache.dataset(batch_size=cache.rows, shuffle=False, **kw)
    return next(iter(ds))


def kl_full(teacher, student, T):
    p = F.softmax(teacher / T, -1)
    return T**2 * (p * (p.log() - F.log_softmax(student / T, -1))).sum(-1).mean()


# ---------------------------------------------------------------------------------------------
# kd_loss


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_kd_loss_dense_equals_full_kl(tmp_path, T):
    t = teacher_logits(300)
    cache = lc.open_cache(write(tmp_path, t, lc.Dense(C, "float32"), temperature=T).path)
    batch = whole_batch(cache)
    s = torch.randn(300, C)
    order = batch["sample_id"]
    assert lc.kd_loss(s[order], batch, T).item() == pytest.approx(kl_full(t[order], s[order], T).item(), rel=1e-5)
    labels = torch.randint(0, C, (300,))
    mixed = lc.kd_loss(s[order], batch, T, alpha=0.3, labels=labels)
    ref = 0.3 * F.cross_entropy(s[order], labels) + 0.7 * kl_full(t[order], s[order], T)
    assert mixed.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("tail", ["uniform", "bucket"])
def test_kd_loss_topk_equals_the_reference_with_its_tail_model(tmp_path, tail):
    t = teacher_logits(300)
    cache = lc.open_cache(write(tmp_path, t, lc.TopK(C, 4), temperature=2.0).path)
    batch = whole_batch(cache)
    s = torch.randn(300, C)
    order = batch["sample_id"]
    logp = F.log_softmax(t[order] / 2.0, -1)  # the slow way: exact top-4 and tail from the full teacher
    vals, ids = logp.topk(4, -1)
    residual = 1 - vals.exp().sum(-1)
    ref = fmt_kd_topk(s[order], ids, vals, residual, 2.0, tail)
    got = lc.kd_loss(s[order], batch, 2.0, tail=tail)
    assert got.item() == pytest.approx(ref.item(), rel=2e-3)  # float16 storage


def fmt_kd_topk(s, ids, vals, residual, T, tail):
    from pipeline.train.losses import kd_topk

    return kd_topk(s, ids, vals, residual, T, tail)


def test_kd_loss_topk_8bit_and_retempered_targets(tmp_path):
    t = teacher_logits(200)
    cache = lc.open_cache(write(tmp_path, t, {"name": "topk", "k": C, "bits": 8}, temperature=1.0).path)
    s = torch.randn(200, C)
    batch = whole_batch(cache, temperature=3.0)  # k = C: the whole distribution, re-tempered exactly
    order = batch["sample_id"]
    assert lc.kd_loss(s[order], batch, 3.0).item() == pytest.approx(kl_full(t[order], s[order], 3.0).item(), rel=0.02)
    with pytest.raises(ValueError, match="targets are at T=3.0"):
        lc.kd_loss(s[order], batch, 1.0)


@pytest.mark.parametrize("encoding", [{"name": "sampled", "draws": 32}, {"name": "hybrid", "k": 3, "draws": 16}])
def test_kd_loss_sampled_and_hybrid_are_unbiased_for_the_full_kl(tmp_path, encoding):
    n = 4000  # one teacher distribution repeated: the batch mean estimates its KL
    t = teacher_logits(1).expand(n, C).contiguous()
    s = teacher_logits(1, seed=5).expand(n, C).contiguous()
    cache = lc.open_cache(write(tmp_path, t, encoding, step=1000, rows_per_shard=1000, chunk_rows=500).path)
    batch = whole_batch(cache)
    assert lc.kd_loss(s, batch, 1.0).item() == pytest.approx(kl_full(t[:1], s[:1], 1.0).item(), rel=0.03)
    old = lc.open_cache(write(tmp_path / "old", t[:8], {**encoding, "draw_logp": False}).path)
    with pytest.raises(ValueError, match="without their log-probs and cannot be re-tempered; .* rebuild it"):
        old.dataset(batch_size=8, temperature=2.0)


# ---------------------------------------------------------------------------------------------
# Any temperature: a student at T=2 from caches written at T=1


@pytest.mark.parametrize("encoding", [{"name": "dense"}, {"name": "topk", "k": 16}, {"name": "topk", "k": 16, "bits": 8}])
@pytest.mark.parametrize("T", [0.5, 2.0, 4.0])
def test_dense_and_topk_caches_at_T1_serve_students_at_other_temperatures(tmp_path, encoding, T):
    """Dense re-tempers exactly. Top-k's head keeps its exact ratios and takes its mass at T from
    the tail model (from the tail's mean log-prob, stored): over 1,000 classes its targets are
    within 0.02 (total variation) of the full distribution's top k and residual at T, 4x closer
    than the uniform-tail model of format 2 caches, and so is its loss to the loss of those exact
    targets (the slow way)."""
    V = 1000
    t = teacher_logits(300, V)
    cache = lc.open_cache(write(tmp_path, t, encoding, temperature=1.0).path)
    batch = whole_batch(cache, temperature=T)
    order = batch["sample_id"]
    s = teacher_logits(300, V, seed=9)
    got = lc.kd_loss(s[order], batch, T).item()
    if encoding["name"] == "dense":
        assert got == pytest.approx(kl_full(t[order], s[order], T).item(), rel=2e-3)  # float16 storage
        return
    logp = F.log_softmax(t[order] / T, -1)  # the slow way: the exact top-16 and tail at T
    ids = batch["targets"]["ids"]
    exact, residual = logp.gather(-1, ids), 1 - logp.gather(-1, ids).exp().sum(-1)
    assert torch.equal(ids.sort(-1).values, logp.topk(16, -1)[1].sort(-1).values)
    from pipeline.format.kl import retemper_topk  # the uniform-tail model of format 2 caches
    cached = F.log_softmax(t[order], -1).gather(-1, ids)
    uniform = retemper_topk(cached, 1 - cached.exp().sum(-1), V, T)

    def tv(head, tail):  # total variation from the exact top-k and residual at T, mean over rows
        return 0.5 * ((head.exp() - exact.exp()).abs().sum(-1) + (tail - residual).abs()).mean().item()

    ours = tv(batch["targets"]["logp"], batch["targets"]["residual"])
    assert ours < 0.02 and ours < tv(*uniform) / 4
    ref = fmt_kd_topk(s[order], ids, exact, residual, T, "uniform").item()
    off = fmt_kd_topk(s[order], ids, *uniform, T, "uniform").item()
    assert abs(got - ref) < 0.02 * ref and abs(got - ref) < abs(off - ref) / 4


@pytest.mark.parametrize("encoding", [{"name": "sampled", "draws": 128}, {"name": "hybrid", "k": 3, "draws": 16},
                                      {"name": "hybrid", "k": 3, "draws": 16, "bits": 8}])
@pytest.mark.parametrize("T", [0.5, 2.0])
def test_sampled_and_hybrid_caches_at_T1_serve_students_at_other_temperatures(tmp_path, encoding, T):
    """Importance weights from the stored draws' log-probs: over many rows of one distribution the
    unnormalised weights' sum is unbiased for sum p^(1/T), and the batch's loss and gradient are the
    full KL's at T within the self-normalisation bias, O(1/draws) (a few percent here)."""
    from pipeline.format.kl import retemper_draws

    n = 4000
    t = teacher_logits(1).expand(n, C).contiguous()
    s = teacher_logits(1, seed=5).expand(n, C).contiguous().requires_grad_()
    cache = lc.open_cache(write(tmp_path, t, encoding, step=1000, rows_per_shard=1000, chunk_rows=500).path)
    batch = whole_batch(cache, temperature=T)
    loss = lc.kd_loss(s, batch, T)
    (grad,) = torch.autograd.grad(loss, s)
    s1 = s[:1].detach().requires_grad_()
    exact = kl_full(t[:1], s1, T)
    (exact_grad,) = torch.autograd.grad(exact, s1)
    assert loss.item() == pytest.approx(exact.item(), rel=0.03)
    torch.testing.assert_close(grad.sum(0), exact_grad[0], atol=0.03 * exact_grad.abs().max().item(), rtol=0)
    if encoding["name"] == "sampled":
        mean = retemper_draws(batch["counts"], batch["logp"], T)[1].exp()  # (n,) the stored columns, decoded
        want = (F.log_softmax(t[0], -1) / T).exp().sum().item()
        assert abs(mean.mean().item() - want) < 3 * mean.std().item() / n**0.5


def test_kd_loss_tokens_takes_rows_or_sequences_and_checks_shapes(tmp_path):
    B, L, V = 12, 5, 20
    t = torch.randn(B, L, V, generator=torch.Generator().manual_seed(1))
    with lc.CacheWriter(tmp_path, spec=SPEC, encoding=lc.TopK(V, 6), num_classes=V, seq_len=L,
                        rows_per_shard=4 * L, chunk_rows=2 * L) as w:
        w.add(np.arange(B), logits=t)
    cache = lc.open_cache(w.path)
    batch = next(iter(cache.dataset(batch_size=B, seed=2)))
    seq_ids = batch["sequence_id"]
    assert (batch["sample_id"] == seq_ids[batch["sequence"]]).all()
    s = torch.randn(B, L, V)
    s_batch = s[seq_ids]  # the student's logits for the batch's sequences, (B, L, V)
    rows = s_batch[batch["sequence"], batch["position"]]  # (B * L, V) in row order
    by_seq, by_row = lc.kd_loss(s_batch, batch, 1.0), lc.kd_loss(rows, batch, 1.0)
    logp = F.log_softmax(t[seq_ids][batch["sequence"], batch["position"]], -1)
    vals, ids = logp.topk(6, -1)
    ref = fmt_kd_topk(rows, ids, vals, 1 - vals.exp().sum(-1), 1.0, "uniform")
    assert by_seq.item() == pytest.approx(by_row.item(), rel=1e-6)
    assert by_row.item() == pytest.approx(ref.item(), rel=2e-3)
    labels = torch.randint(0, V, (B, L))
    assert lc.kd_loss(s_batch, batch, 1.0, alpha=0.5, labels=labels).isfinite()
    with pytest.raises(ValueError, match="batch has 12 sequences"):
        lc.kd_loss(s_batch[:3], batch, 1.0)
    with pytest.raises(ValueError, match="rows"):
        lc.kd_loss(rows[:7], batch, 1.0)
    with pytest.raises(ValueError, match="21 classes, the cache 20"):
        lc.kd_loss(torch.randn(B, L, V + 1), batch, 1.0)
    with pytest.raises(ValueError, match="needs labels"):
        lc.kd_loss(rows, batch, 1.0, alpha=0.5)


# ---------------------------------------------------------------------------------------------
# Dataset: partitioning, determinism, resume


@pytest.fixture(scope="module")
def dense_cache(tmp_path_factory):
    t = teacher_logits(1003)
    return lc.open_cache(write(tmp_path_factory.mktemp("c"), t, lc.Dense(C, "float32"), rows_per_shard=300,
                               chunk_rows=64).path), t


def test_batch_sizes_are_full_first_then_share_the_rest():
    assert batch_sizes(100, 4, 32) == [32, 32, 32, 4]
    assert batch_sizes(7, 3, 3) == [3, 3, 1]
    assert batch_sizes(3, 2, 3) == [2, 1]
    for n in range(1, 60):
        for world in (1, 2, 3, 4):
            if n < world:
                continue
            counts = {len(rank_layout(n, 4, world, r, False)[1]) for r in range(world)}
            sizes = [s for r in range(world) for s in rank_layout(n, 4, world, r, False)[1]]
            assert len(counts) == 1 and sum(sizes) == n and min(sizes) >= 1 and max(sizes) <= 4


@pytest.mark.parametrize("drop_last", [False, True])
def test_every_row_once_per_epoch_across_ranks_and_workers(dense_cache, drop_last):
    cache, t = dense_cache
    ds = cache.dataset(batch_size=25, seed=7, drop_last=drop_last)
    for world in (1, 2, 3):
        for workers in (1, 2, 3):
            seen, per_rank = [], []
            for rank in range(world):
                n = 0
                for w in range(workers):
                    for b in ds.worker_batches(0, rank, world, w, workers):
                        seen += b["sample_id"].tolist()
                        assert torch.allclose(b["logp"], F.log_softmax(t[b["sample_id"]], -1), atol=1e-6)
                        n += 1
                per_rank.append(n)
            counts = collections.Counter(seen)
            assert max(counts.values()) == 1  # no duplicates
            if drop_last:
                assert len(seen) == world * (1003 // (world * 25)) * 25 and set(per_rank) == {1003 // (world * 25)}
            else:
                assert sorted(counts) == list(range(1003))  # none missing
                assert len(set(per_rank)) == 1  # DDP ranks step together


def test_order_is_a_function_of_seed_and_epoch(dense_cache):
    cache, _ = dense_cache

    def order(seed, epoch):
        ds = cache.dataset(batch_size=100, seed=seed)
        ds.set_epoch(epoch)
        return torch.cat([b["sample_id"] for b in ds]).tolist()

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1) and order(1, 0) != order(2, 0)
    assert sorted(order(1, 1)) == list(range(1003))


def test_dataloader_workers_and_resume_give_the_same_batches(dense_cache):
    cache, _ = dense_cache
    x = np.arange(1003) * 3
    ds = cache.dataset(batch_size=50, seed=4, inputs=x)
    loader = ds.loader(num_workers=2)
    ds.set_epoch(1)
    full = [b["sample_id"] for b in loader]
    assert len(full) == len(ds) == 21
    assert sorted(torch.cat(full).tolist()) == list(range(1003))
    it = iter(loader)
    head = [next(it) for _ in range(7)]
    state = loader.state_dict()
    del it
    assert state["epoch"] == 1 and state["batches"] == 7
    for workers in (2,):
        ds2 = cache.dataset(batch_size=50, seed=4, inputs=x)
        loader2 = ds2.loader(num_workers=workers)
        loader2.load_state_dict(state)
        ds2.set_epoch(1)  # a resumed loop calls set_epoch(saved epoch): the position is kept
        tail = list(loader2)
        got = [b["sample_id"] for b in head + tail]
        assert len(got) == len(full) and all(torch.equal(a, b) for a, b in zip(got, full))
        assert all((b["inputs"] == b["sample_id"] * 3).all() for b in tail)
        assert loader2.state_dict()["epoch"] == 2 and loader2.state_dict()["batches"] == 0
    in_process = cache.dataset(batch_size=50, seed=4).loader(num_workers=0)  # any worker count resumes alike
    in_process.load_state_dict(state)
    assert all(torch.equal(a, b["sample_id"]) for a, b in zip(full[7:], in_process, strict=True))


def test_in_process_resume_from_the_dataset_state(dense_cache):
    cache, _ = dense_cache
    ds = cache.dataset(batch_size=64, seed=9)
    full = [b["sample_id"] for b in ds]
    it = iter(ds)
    head = [next(it)["sample_id"] for _ in range(5)]
    state = ds.state_dict()
    ds2 = cache.dataset(batch_size=64, seed=9)
    ds2.load_state_dict(state)
    got = head + [b["sample_id"] for b in ds2]
    assert all(torch.equal(a, b) for a, b in zip(got, full)) and len(got) == len(full)
    other = cache.dataset(batch_size=32, seed=9)  # another batch size: the items not yet seen, laid out anew
    other.load_state_dict(state)
    rest = [i for b in other for i in b["sample_id"].tolist()]
    assert sorted(rest + torch.cat(head).tolist()) == list(range(1003))


# ---------------------------------------------------------------------------------------------
# CacheWriter


def shard_hashes(path):
    return [e["sha256"] for e in read_manifest(path)["shards"]]


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_writer_is_byte_identical_resumable_and_read_by_the_cli_reader(tmp_path, backend):
    t = teacher_logits(700)
    kw = {"rows_per_shard": 256, "chunk_rows": 64, "backend": backend, "temperature": 2.0}
    a = write(tmp_path / "a", t, {"name": "hybrid", "k": 3, "draws": 8}, step=50, **kw)
    b = write(tmp_path / "b", t, {"name": "hybrid", "k": 3, "draws": 8}, step=50, **kw)
    assert a.path.name == b.path.name and shard_hashes(a.path) == shard_hashes(b.path)
    assert [p.name for p in sorted((a.path / "shards").iterdir())] == [shard_name(i, backend) for i in range(3)]
    # a crash after two shards: the rerun skips them, encodes only the rest, and gives the same bytes
    import shutil

    shutil.rmtree(b.path / "shards" / shard_name(2, backend)) if backend == "zarr" else \
        (b.path / "shards" / shard_name(2, backend)).unlink()
    (b.path / "manifest.json").unlink()
    with lc.CacheWriter(tmp_path / "b", spec=SPEC, encoding={"name": "hybrid", "k": 3, "draws": 8},
                        num_classes=C, **kw) as w:
        assert w.rows_on_disk == 512
        w.add(np.arange(512))  # rows already on disk: ids only, checked
        for s in range(512, 700, 50):
            w.add(np.arange(s, min(s + 50, 700)), logits=t[s:s + 50])
    assert shard_hashes(b.path) == shard_hashes(a.path)
    reader = fmt.CacheReader(a.path, verify=True)  # what `logitcache student` opens
    assert reader.rows == 700 and reader.temperature == 2.0 and reader.encoding.label() == "hybrid-k3-n8"
    ids = np.concatenate([bt["sample_id"] for bt in lc.open_cache(a.path).dataset(100, seed=0, shuffle_chunks=2)])
    assert sorted(ids.tolist()) == list(range(700))
    head = reader.read_all()
    vals, top = F.log_softmax(t / 2.0, -1).topk(3, -1)
    assert np.array_equal(head["ids"], top.numpy()) and np.allclose(head["logp"], vals.numpy(), atol=2e-3)


def test_writer_refuses_rows_in_another_order_and_writes_no_manifest_on_error(tmp_path):
    t = teacher_logits(300)
    w = write(tmp_path, t, "dense", rows_per_shard=100, chunk_rows=50)
    (w.path / "manifest.json").unlink()
    with pytest.raises(CacheError, match="same order"):
        write(tmp_path, t, "dense", ids=np.arange(300)[::-1].copy(), rows_per_shard=100, chunk_rows=50)
    with pytest.raises(RuntimeError, match="teacher died"):
        with lc.CacheWriter(tmp_path / "x", spec=SPEC, encoding="dense", num_classes=C, rows_per_shard=100) as w2:
            w2.add(np.arange(150), logits=t[:150])
            raise RuntimeError("teacher died")
    assert (w2.path / "shards" / "00000.zarr").is_dir() and not (w2.path / "manifest.json").exists()
    with pytest.raises(ValueError, match="spec: declare"):
        lc.CacheWriter(tmp_path, spec={"teacher": "t"}, encoding="dense", num_classes=C)
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        with lc.CacheWriter(tmp_path / "y", spec=SPEC, encoding="dense", num_classes=C) as w3:
            w3.add(np.arange(4), logits=t[:5])


def test_writer_sizes_an_unset_layout_by_the_row_bytes_as_the_cache_stage_does(tmp_path):
    """Dense float16 over 1,000 classes stores 2,008 B a row with its sample id: 1,024-row chunks
    (2 MiB) in 16-chunk shards. Top-32 16-bit rows (140 B) of 64-token sequences: 16,384-token
    chunks, 131,072-token shards. A set value wins; the old defaults (8,192 and 1,024) keep their id."""
    w = write(tmp_path, teacher_logits(2500, 1000), "dense", step=500)
    assert json.loads((w.path / "spec.json").read_text())["layout"] == {
        "backend": "zarr", "chunk_rows": 1024, "codec": "shuffle-lz4hc", "rows_per_shard": 16384}
    on_disk = json.loads((w.path / "shards" / "00000.zarr" / "logp" / "zarr.json").read_text())
    assert on_disk["shape"][0] == 2500 and on_disk["chunk_grid"]["configuration"]["chunk_shape"][0] == 1024
    assert lc.open_cache(w.path).rows == 2500 and len(read_manifest(w.path)["shards"]) == 1
    tokens = lc.CacheWriter(tmp_path, spec=SPEC, encoding=lc.TopK(32000, 32), num_classes=32000, seq_len=64)
    assert (tokens.chunk_rows, tokens.rows_per_shard) == (16384, 131072)
    old = lc.CacheWriter(tmp_path, spec=SPEC, encoding="dense", num_classes=1000, rows_per_shard=8192, chunk_rows=1024)
    assert (old.chunk_rows, old.rows_per_shard) == (1024, 8192) and old.path != w.path
    small = lc.CacheWriter(tmp_path, spec=SPEC, encoding="dense", num_classes=1000, rows_per_shard=300)
    assert (small.chunk_rows, small.rows_per_shard) == (300, 300)
    with pytest.raises(ValueError, match="chunk_rows"):
        lc.CacheWriter(tmp_path, spec=SPEC, encoding="dense", num_classes=1000, chunk_rows=0)


def test_spec_changes_the_id(tmp_path):
    ids = {lc.CacheWriter(tmp_path, spec=s, encoding=e, num_classes=C, temperature=T).path.name
           for s, e, T in [(SPEC, "dense", 1.0), (SPEC, "dense", 2.0), (SPEC, lc.TopK(C, 4), 1.0),
                           ({**SPEC, "teacher": {"name": "t", "revision": "2"}}, "dense", 1.0),
                           ({**SPEC, "dataset": {"fingerprint": "data-2"}}, "dense", 1.0)]}
    assert len(ids) == 5


def test_token_caches_of_varying_length_keep_sequences_whole(tmp_path):
    V = 30
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=60)
    logits = torch.randn(60, 40, V, generator=torch.Generator().manual_seed(0))
    with lc.CacheWriter(tmp_path, spec=SPEC, encoding=lc.TopK(V, 5), num_classes=V, tokens=True,
                        rows_per_shard=200, chunk_rows=16) as w:
        for s in range(0, 60, 7):
            w.add(np.arange(s, min(s + 7, 60)) + 1000, logits=logits[s:s + 7], lengths=lengths[s:s + 7])
    cache = lc.open_cache(w.path)
    assert cache.token_rows and cache.rows == lengths.sum()
    seqs = {i: np.arange(n) for i, n in enumerate(lengths)}
    ds = cache.dataset(batch_size=4, seed=1, inputs={i + 1000: np.arange(n + 1) for i, n in enumerate(lengths)})
    for world in (1, 2):
        seen = []
        for rank in range(world):
            for w_ in range(2):
                for b in ds.worker_batches(0, rank, world, w_, 2):
                    for j, sid in enumerate(b["sequence_id"].tolist()):
                        rows = b["sequence"] == j
                        assert b["position"][rows].tolist() == seqs[sid - 1000].tolist()
                        top = F.log_softmax(logits[sid - 1000, :lengths[sid - 1000]], -1).topk(5, -1).indices
                        assert torch.equal(b["ids"][rows], top)
                    assert (b["input_lengths"] == torch.tensor([lengths[s - 1000] + 1 for s in
                                                                b["sequence_id"].tolist()])).all()
                    seen += b["sequence_id"].tolist()
        assert sorted(seen) == list(range(1000, 1060))


# ---------------------------------------------------------------------------------------------
# Examples


def example_env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_own_loop_example_trains_a_student_through_two_workers(tmp_path):
    out = subprocess.run([sys.executable, "examples/own_loop.py", str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env=example_env(), check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("epoch")]
    assert len(lines) == 4 and "32 batches" in lines[0] and "next data position: epoch 4 batch 0" in lines[-1]
    agreement = float(out.stdout.strip().split()[-3])
    assert agreement > 0.6


def test_hf_trainer_example_runs_a_few_kd_steps(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # the Trainer needs it
    out = subprocess.run([sys.executable, "examples/hf_trainer.py", str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env=example_env(), check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "KDTrainer: 6 steps" in out.stdout
