"""Caches of per-member targets (cache.members): read-time ensembles equal to the stored one,
students weighing and dropping teachers, and a cache that grows by a teacher or by rows while
computing only what is new, byte-identical to a cache made in one go."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_config, write_config

import pipeline as lc
from pipeline.core.config import load_config
from pipeline.core.errors import CacheError, ConfigError
from pipeline.format import members as mb
from pipeline.format.manifest import read_manifest
from pipeline.format.reader import CacheReader
from pipeline.run import targets
from pipeline.tools.fidelity import fidelity
from pipeline.tools.inspect import inspect_cache, list_caches
from stages import cache as cache_stage
from stages import student as student_stage
from stages import teachers as teacher_stage

TEACHERS = [{"name": "a", "arch": "mlp", "hidden": [64], "seed": 0},
            {"name": "b", "arch": "mlp", "hidden": [48], "seed": 1},
            {"name": "c", "arch": "mlp", "hidden": [32], "seed": 2}]
AB = "teachers.members=[{name: a, arch: mlp, hidden: [64], seed: 0}, {name: b, arch: mlp, hidden: [48], seed: 1}]"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    cfg = tiny_config(ws, teachers={"members": TEACHERS},
                      cache={"rows_per_shard": 400, "chunk_rows": 128, "members": "separate"},
                      student={"epochs": 3, "batch_size": 100, "baseline": False, "seeds": [0, 1],
                               "models": [{"name": "s", "arch": "mlp", "hidden": [32]}]})
    path = write_config(ws / "c.yaml", cfg)
    teacher_stage.main(load_config(path))
    rng = np.random.default_rng(5)  # more transfer rows: noisy copies of digits
    np.savez(ws / "more.npz", x=rng.random((200, 1, 8, 8)).astype(np.float32), y=rng.integers(0, 10, 200))
    return ws, path


def build(path, *overrides):
    return cache_stage.main(load_config(path, list(overrides)))


def first_batch(cache, **read):
    return next(iter(cache.dataset(5000, seed=0, shuffle=False, **read)))


def test_read_time_ensemble_of_members_equals_the_combined_cache(workspace, capsys):
    _, path = workspace
    separate, combined, both = build(path), build(path, "cache.members=combined"), build(path, "cache.members=both")
    assert len({separate.name, combined.name, both.name}) == 3
    cached = {name: lc.open_cache(d) for name, d in (("separate", separate), ("combined", combined), ("both", both))}
    assert cached["separate"].members == cached["both"].members == ["a", "b", "c"] and cached["combined"].members == []
    ref = first_batch(cached["combined"])
    mine = first_batch(cached["separate"])  # default: the cache's teachers, weights and mean_probs
    assert torch.equal(mine["sample_id"], ref["sample_id"])
    # the same ensemble, from three float16 members instead of one float16 ensemble
    assert torch.allclose(mine["targets"]["logp"].exp(), ref["targets"]["logp"].exp(), atol=1e-3)
    stored = first_batch(cached["both"])  # a `both` cache reads its stored ensemble unless asked otherwise
    assert torch.equal(stored["targets"]["logp"], ref["targets"]["logp"])
    again = first_batch(cached["both"], combine="mean_probs")  # ... or its members
    assert torch.allclose(again["targets"]["logp"], mine["targets"]["logp"])
    rates = {name: read_manifest(d)["bytes_per_row"] for name, d in (("separate", separate), ("combined", combined),
                                                                     ("both", both))}
    print(f"bytes per row (dense float16, 10 classes): {rates}")
    assert rates["combined"] < rates["separate"] < rates["both"]
    lines = list_caches(separate.parent)
    assert "complete, separate" in lines and "members " not in lines.split("\n", 1)[1][:8]


def test_weights_subsets_and_mean_logprobs_at_read_time(workspace):
    _, path = workspace
    cache = lc.open_cache(build(path))
    single = first_batch(cache, members=["b"])
    b_alone = first_batch(cache, combine="mean_probs", members=["a", "b", "c"], weights=[0, 1, 0])
    assert torch.allclose(single["targets"]["logp"], b_alone["targets"]["logp"], atol=1e-6)
    geo = first_batch(cache, combine="mean_logprobs", weights=[2, 1, 1])
    logps = [first_batch(cache, members=[n])["targets"]["logp"] for n in ("a", "b", "c")]
    expected = torch.log_softmax(0.5 * logps[0] + 0.25 * logps[1] + 0.25 * logps[2], -1)
    assert torch.allclose(geo["targets"]["logp"], expected, atol=1e-5)
    per = first_batch(cache, combine="per_member", weights=[2, 1, 1])
    assert list(per["members"]) == ["a", "b", "c"] and per["members"]["a"]["weight"] == pytest.approx(0.5)
    logits = torch.randn(len(per["sample_id"]), 10, requires_grad=True)
    loss = lc.kd_loss(logits, per, temperature=2.0)
    slow = sum(w * lc.kd_loss(logits, first_batch(cache, members=[n]), temperature=2.0)
               for n, w in (("a", 0.5), ("b", 0.25), ("c", 0.25)))
    assert torch.allclose(loss, slow, atol=1e-5)
    # forward KL: per_member has the gradient of the mean_probs ensemble's
    g_per = torch.autograd.grad(loss, logits)[0]
    g_ens = torch.autograd.grad(lc.kd_loss(logits, first_batch(cache, weights=[2, 1, 1]), temperature=2.0), logits)[0]
    assert torch.allclose(g_per, g_ens, atol=1e-5)
    with pytest.raises(ValueError, match="'z' is not a teacher of this cache"):
        cache.dataset(10, members=["z"])
    with pytest.raises(ValueError, match="2 weights for 3 members"):
        cache.dataset(10, weights=[1, 1])
    with pytest.raises(ValueError, match="combined ensemble only"):
        lc.open_cache(build(path, "cache.members=combined")).dataset(10, members=["a"])


def test_students_from_members_match_the_combined_cache_and_a_cache_without_the_dropped_one(workspace):
    """Equal weights and mean_probs: the student of the combined cache, within float16 rounding of
    the targets; one member dropped: bit for bit the student of a cache made without it."""
    ws, path = workspace

    def students(run, *overrides):
        build(path, *(o for o in overrides if not o.startswith("student.")))
        results = student_stage.main(load_config(path, [f"run_name={run}", *overrides]))
        weights = [torch.load(ws / "runs" / run / "students" / r.job / "model.pt") for r in results]
        return [r.final_accuracy for r in results], weights

    comb, _ = students("comb", "cache.members=combined")
    sep, _ = students("sep")
    print(f"test accuracy, seeds 0 and 1: combined {comb}, members {sep}")
    assert all(abs(a - b) <= 0.01 for a, b in zip(comb, sep))
    dropped, w_dropped = students("dropped", "student.members=[a, b]")
    without, w_without = students("without", AB)
    without_combined, _ = students("without-comb", AB, "cache.members=combined")
    print(f"c dropped {dropped}, cache without c {without}, combined cache without c {without_combined}")
    assert dropped == without
    assert all(torch.equal(x[k], y[k]) for x, y in zip(w_dropped, w_without) for k in x)
    assert all(abs(a - b) <= 0.01 for a, b in zip(dropped, without_combined))


def test_the_grid_sweeps_members_and_combinations(workspace):
    _, path = workspace
    build(path)
    grid = "student.grid={members: [[a, b, c], [a]], combine: [mean_probs, per_member]}"
    results = student_stage.main(load_config(path, ["run_name=grid", "student.seeds=[0]", "student.epochs=1", grid]))
    names = [r.job for r in results]
    assert names == ["s-ma+b+c-cmean_probs-kd-s0", "s-ma+b+c-cper_member-kd-s0", "s-ma-cmean_probs-kd-s0",
                     "s-ma-cper_member-kd-s0"]
    acc = {r.job: r.final_accuracy for r in results}
    assert abs(acc[names[2]] - acc[names[3]]) <= 0.01  # one teacher: the same loss either way
    with pytest.raises(ConfigError, match="student.members: reads per-member targets, but cache.members is combined"):
        load_config(path, ["cache.members=combined", "student.members=[a]"])
    with pytest.raises(ConfigError, match=r"student.grid.members.0: 'z' is not a teacher"):
        load_config(path, ["student.grid={members: [[z]]}"])


def test_adding_a_teacher_runs_only_that_teacher(workspace, monkeypatch, capsys, tmp_path):
    _, path = workspace
    root = f"cache.root={tmp_path / 'grow'}"
    two = build(path, AB, root)
    loaded, computed = [], []
    real_load, real_compute = targets.load_teacher, targets.compute_units
    monkeypatch.setattr(targets, "load_teacher", lambda ref, *a: loaded.append(ref.spec.name) or real_load(ref, *a))
    monkeypatch.setattr(targets, "compute_units", lambda ctx, shard, units, models: computed.append(
        (shard.index, [u.name for u in units])) or real_compute(ctx, shard, units, models))
    capsys.readouterr()
    three = build(path, root)
    err = capsys.readouterr().err
    assert f"cache {three.name}: reusing 2 members' targets from {two.name}; computing 1 (c)" in err
    assert loaded == ["c"] and computed == [(i, ["c"]) for i in range(4)]
    small, big = read_manifest(two), read_manifest(three)
    assert small["units"][:2] == [{k: v for k, v in u.items()} for u in big["units"][:2]]  # the same shards, reused
    assert big["reuse"] == {"reused": {"a": 4, "b": 4, "c": 0}, "computed": {"a": 0, "b": 0, "c": 4},
                            "from": [two.name]}
    assert inspect_cache(three.name, three.parent, verify=True)["reuse"]["computed"]["c"] == 4
    # the id and the bytes of a cache made in one go
    monkeypatch.undo()
    fresh = build(path, f"cache.root={tmp_path / 'fresh'}")
    assert fresh.name == three.name
    assert [[e["sha256"] for e in u["shards"]] for u in read_manifest(fresh)["units"]] == \
        [[e["sha256"] for e in u["shards"]] for u in big["units"]]


def test_adding_rows_computes_only_the_new_shards(workspace, monkeypatch, capsys, tmp_path):
    ws, path = workspace
    root = f"cache.root={tmp_path / 'grow'}"
    old = build(path, root)
    before = (old / "manifest.json").read_bytes()
    computed = []
    real = targets.compute_units
    monkeypatch.setattr(targets, "compute_units", lambda ctx, shard, units, models: computed.append(
        (shard.index, [u.name for u in units])) or real(ctx, shard, units, models))
    capsys.readouterr()
    grown = build(path, f"data.transfer.append=[{ws / 'more.npz'}]", root)
    err = capsys.readouterr().err
    # 1348 rows in shards of 400, then 1548: the last shard's rows changed, the first three did not
    assert f"reusing 3 members' targets for 3 of 4 shards from {old.name}; computing 1 shard of 3 members" in err
    assert computed == [(3, ["a", "b", "c"])]
    assert (old / "manifest.json").read_bytes() == before
    CacheReader(old, verify=True)
    small, big = read_manifest(old), read_manifest(grown)
    assert big["rows"] == small["rows"] + 200
    for u, v in zip(small["units"], big["units"]):
        assert v["shards"][:3] == u["shards"][:3] and v["shards"][3]["path"] != u["shards"][3]["path"]
    ids = first_batch(lc.open_cache(grown))["sample_id"]
    assert len(ids) == 1548 and len(set(ids.tolist())) == 1548
    monkeypatch.undo()
    fresh = build(path, f"data.transfer.append=[{ws / 'more.npz'}]", f"cache.root={tmp_path / 'fresh'}")
    assert fresh.name == grown.name
    assert [[e["sha256"] for e in u["shards"]] for u in read_manifest(fresh)["units"]] == \
        [[e["sha256"] for e in u["shards"]] for u in big["units"]]


def test_fidelity_of_a_topk_member_cache_reports_the_read_time_error(workspace, tmp_path):
    _, path = workspace
    d = build(path, "cache.encoding=topk", "cache.k=2", "cache.members=both")
    result = fidelity(d.name, d.parent, 300, tmp_path)
    m = result["members"]
    assert set(m["each"]) == {"a", "b", "c"} and m["combine"] == "mean_probs"
    # the union of top-2 ids with uniform tails is an approximation of the exact ensemble
    assert 0 < m["read_time"]["kl"] < 0.5 and result["cache"]["kl"] > 0
    assert all(0 < e["kl"] < 1 for e in m["each"].values())
    assert set(m["bytes_per_row"]) == {"a", "b", "c", "ensemble"}


def test_refusals(workspace, tmp_path):
    _, path = workspace
    with pytest.raises(ConfigError, match="cache.members: per-member targets apply to data.task classify"):
        load_config(path, ["data.task=lm", "data.source=python-docs", "teachers.members=[{name: g, arch: gpt}]",
                           "student.models=[{name: s, arch: gpt}]"])
    with pytest.raises(ConfigError, match="cache.members: per-member targets apply to caches without views"):
        load_config(path, ["cache.views=2", "augment.flip=0.5", "cache.rows_per_shard=256"])
    with pytest.raises(ConfigError, match="cache.members: member stores live under a local cache.root"):
        load_config(path, ["cache.root=s3://bucket/caches"])
    d = build(path)
    from pipeline.format.remote import push

    with pytest.raises(CacheError, match="not published"):
        push(d, "s3://bucket/caches")
    manifest = json.loads((d / "manifest.json").read_text())
    shard = d.parent / mb.STORES / manifest["units"][1]["store"] / manifest["units"][1]["shards"][0]["path"]
    moved = shard.with_name("moved")
    shard.rename(moved)
    try:
        with pytest.raises(CacheError, match="shard listed in the manifest is missing"):
            lc.open_cache(d)
        assert inspect_cache(d.name, d.parent, verify=False)["status"] == "damaged"
    finally:
        moved.rename(shard)


def test_a_deleted_member_shard_is_recomputed_identically(workspace, tmp_path, capsys):
    _, path = workspace
    root = f"cache.root={tmp_path}"
    d = build(path, root)
    manifest = read_manifest(d)
    unit = manifest["units"][2]
    shard = tmp_path / mb.STORES / unit["store"] / unit["shards"][1]["path"]
    shutil.rmtree(shard)
    capsys.readouterr()
    assert build(path, root) == d
    assert "1 shards listed in the manifest are missing; recomputing them" in capsys.readouterr().err
    assert read_manifest(d)["units"] == manifest["units"]
    lc.open_cache(d, verify=True)
