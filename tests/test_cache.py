"""The cache: content address, atomic shards, byte-identical reruns, self-describing files."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr
from conftest import tiny_config, write_config

from pipeline.core.codecs import CODECS
from pipeline.core.config import default_layout, load_config
from pipeline.core.errors import CacheError
from pipeline.core.io import OWNER
from pipeline.format import reader as fmt
from pipeline.format.encodings import TopK
from pipeline.format.manifest import read_manifest
from pipeline.format.shards import recorded_digest, write_shard
from pipeline.inputs.splits import load_splits
from pipeline.models.ensemble import load_teacher, teacher_refs
from pipeline.run import identity as spec
from stages import cache as cache_stage
from stages import teachers as teacher_stage


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    path = write_config(ws / "c.yaml", tiny_config(ws))
    teacher_stage.main(load_config(path))
    return ws, path


def test_the_cache_resolves_an_unset_layout_from_its_encodings_row_bytes(workspace):
    """The spec (and so the cache id) holds the layout default_layout gives for the encoding's
    stored bytes per row; a layout that is set is kept as it is."""
    _, path = workspace
    for overrides in (["cache.encoding=topk", "cache.k=4"], ["cache.encoding=dense"]):
        cfg = load_config(path, [*overrides, "cache.chunk_rows=null", "cache.rows_per_shard=null"])
        ctx = spec.context(cfg)
        expected = default_layout("classify", 1, 0, ctx.encoding.raw_bytes_per_row() + 8)
        assert expected == (16384, 65536)  # a few bytes a row: the most rows a chunk holds
        assert (ctx.chunk_rows, ctx.rows_per_shard) == expected
        assert {k: ctx.spec["layout"][k] for k in ("chunk_rows", "rows_per_shard")} == dict(zip(("chunk_rows", "rows_per_shard"), expected))
    ctx = spec.context(load_config(path, ["cache.chunk_rows=64", "cache.rows_per_shard=320"]))
    assert (ctx.chunk_rows, ctx.rows_per_shard) == (64, 320)


def build(path, *overrides):
    cfg = load_config(path, list(overrides))
    return cfg, cache_stage.main(cfg)


def test_dense_cache_equals_ensemble_computed_the_slow_way(workspace):
    _, path = workspace
    cfg, d = build(path, "cache.dtype=float32")
    data = fmt.CacheReader(d, verify=True).read_all()
    splits = load_splits(cfg)
    assert (data["sample_id"] == splits.transfer.ids).all()
    models = [load_teacher(r, splits, torch.device("cpu")) for r in teacher_refs(cfg, splits)]
    x = torch.from_numpy(splits.transfer.x)
    with torch.no_grad():
        probs = sum(torch.softmax(m(x) / 2.0, -1) for m in models) / 2  # mean_probs at T=2
    assert np.allclose(np.exp(data["logp"]), probs.numpy(), atol=1e-5)


def test_rerun_does_nothing_and_rebuild_is_byte_identical(workspace, capsys):
    _, path = workspace
    _, d = build(path)
    manifest = json.loads((d / "manifest.json").read_text())
    capsys.readouterr()
    build(path)
    assert "nothing to do" in capsys.readouterr().err
    shutil.rmtree(d)
    _, d2 = build(path)
    again = json.loads((d2 / "manifest.json").read_text())
    assert d2 == d
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]


def test_crash_leftovers_are_redone_identically(workspace):
    """A killed run leaves some shards, a temp directory, no manifest: the rerun completes it."""
    _, path = workspace
    _cfg, d = build(path, "cache.encoding=topk", "cache.k=3")
    reference = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").unlink()
    shutil.rmtree(d / "shards" / "00001.zarr")
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = d / "shards" / f".tmp-00001.zarr-{OWNER}-{dead.pid}.1-deadbeef"  # a writer killed mid-shard
    leftover.mkdir()
    (leftover / "zarr.json").write_text("{")
    with pytest.raises(Exception, match="incomplete"):
        fmt.CacheReader(d)
    build(path, "cache.encoding=topk", "cache.k=3")
    again = json.loads((d / "manifest.json").read_text())
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in reference["shards"]]
    assert not list((d / "shards").glob(".tmp-*"))


def test_zarr_and_parquet_hold_the_same_targets(workspace):
    _, path = workspace
    for enc in (["cache.encoding=dense"], ["cache.encoding=topk", "cache.k=4"],
                ["cache.encoding=topk", "cache.k=4", "cache.bits=8"]):
        _, dz = build(path, "cache.backend=zarr", *enc)
        _, dp = build(path, "cache.backend=parquet", *enc)
        assert dz != dp
        mz, mp = (json.loads((d / "manifest.json").read_text()) for d in (dz, dp))
        assert mz["target_id"] == mp["target_id"]
        a, b = fmt.CacheReader(dz).read_all(), fmt.CacheReader(dp).read_all()
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_a_cache_of_an_unknown_shard_backend_is_refused_naming_its_manifest(workspace, tmp_path):
    _, path = workspace
    _, d = build(path)
    copy = tmp_path / d.name
    shutil.copytree(d, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["spec"]["layout"]["backend"] = "hdf5"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError) as err:
        fmt.CacheReader(copy)
    assert str(err.value) == (f"{copy / 'manifest.json'}: shard backend 'hdf5' is not one of zarr, parquet; "
                              "the cache was written by another program or version")


@pytest.mark.parametrize("codec", ["shuffle-zstd", "shuffle-lz4", "shuffle-lz4hc"])
def test_shuffle_codecs_hold_the_same_targets(workspace, tmp_path, monkeypatch, codec):
    """cache.codec shuffle-*: the same decoded targets as zstd, read by the fast path (no zarr call)
    and by plain zarr; a zstd cache keeps the id it had before codecs existed (no codec in its
    layout); and at a real chunk size (4,096 rows of top-32 of 1,000 classes) shuffle-zstd takes
    fewer bytes than zstd, shuffle-lz4hc no more, and shuffle-lz4 about as many."""
    import zarr

    _, path = workspace
    for enc in (["cache.encoding=dense"], ["cache.encoding=topk", "cache.k=4"]):
        _, dz = build(path, "cache.codec=zstd", *enc)
        _, ds = build(path, f"cache.codec={codec}", *enc)
        mz, ms = (json.loads((d / "manifest.json").read_text()) for d in (dz, ds))
        assert "codec" not in mz["spec"]["layout"] and ms["spec"]["layout"]["codec"] == codec
        assert ds != dz and ms["target_id"] == mz["target_id"]
        meta = json.loads((ds / "shards" / "00000.zarr" / "logp" / "zarr.json").read_text())
        assert [c["name"] for c in meta["codecs"]] == ["bytes", "blosc"]
        expected = fmt.CacheReader(dz).read_all()
        plain = zarr.open_group(str(ds / "shards" / "00000.zarr"), mode="r")
        assert np.array_equal(plain["logp"][:], fmt.CacheReader(dz).handle(0)["logp"][:])
        with monkeypatch.context() as m:
            m.setattr(zarr, "open_group", lambda *a, **k: pytest.fail("the fast path fell back to zarr"))
            got = fmt.CacheReader(ds).read_all()
        for k in expected:
            assert got[k].dtype == expected[k].dtype and np.array_equal(got[k], expected[k]), k
    enc = TopK(1000, 32)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8192, 1000, generator=g).scatter_add(1, torch.randint(0, 1000, (8192, 4), generator=g),
                                                        torch.full((8192, 4), 6.0))
    arrays = {"sample_id": np.arange(8192), **enc.to_host(enc.encode(torch.log_softmax(z * 1.5, -1)))}
    sizes = {}
    for name in CODECS:
        shard = tmp_path / name / "shards" / "00000.zarr"
        write_shard(shard, arrays, {}, enc, 4096, None, name)
        sizes[name] = recorded_digest(shard)[1]
    assert sizes["shuffle-zstd"] < 0.95 * sizes["zstd"] and sizes["shuffle-lz4hc"] <= sizes["zstd"], sizes
    assert sizes["shuffle-lz4"] < 1.1 * sizes["zstd"], sizes


@pytest.mark.parametrize(("encoding", "backend", "codec"), [
    ("dense", "zarr", "shuffle-lz4hc"), ("sampled", "zarr", "zstd"), ("topk", "zarr", "shuffle-lz4hc"),
    ("hybrid", "zarr", "shuffle-zstd"), ("topk", "parquet", "zstd")])
def test_an_unset_codec_is_the_encodings_default_and_a_set_one_hashes_as_before(workspace, encoding, backend, codec):
    """cache.codec unset: the encoding's default (shuffle-lz4hc for top-k and dense, which decodes
    fastest at about zstd's bytes; shuffle-zstd for hybrid, the smallest; zstd for sampled and for
    Parquet), the same cache as that codec set explicitly. A codec that is set hashes as it always did: zstd adds nothing to the layout, any
    other adds its name, so caches of an explicit codec keep their ids."""
    _, path = workspace
    enc = [f"cache.encoding={encoding}", f"cache.backend={backend}", "cache.k=4", "cache.draws=8"]
    default = load_config(path, enc)
    assert default.cache.codec == codec
    explicit = load_config(path, [*enc, f"cache.codec={codec}"])
    assert spec.cache_dir(default) == spec.cache_dir(explicit)
    layout = spec.context(explicit).spec["layout"]
    assert layout == {"backend": backend, "rows_per_shard": explicit.cache.rows_per_shard,
                      "chunk_rows": explicit.cache.chunk_rows, **({} if codec == "zstd" else {"codec": codec})}
    if backend == "zarr":
        zstd = spec.context(load_config(path, [*enc, "cache.codec=zstd"])).spec["layout"]
        assert "codec" not in zstd


def test_a_complete_cache_of_the_same_targets_in_another_layout_is_pointed_out(workspace, tmp_path, capsys):
    """The teachers do not run again for targets a complete cache already holds in another layout
    without saying so: the log names it and the settings that reuse it."""
    _, path = workspace
    root = f"cache.root={tmp_path}"
    _, old = build(path, root, "cache.codec=zstd", "cache.encoding=topk", "cache.k=3")  # top-k's default before
    capsys.readouterr()
    _, new = build(path, root, "cache.encoding=topk", "cache.k=3")
    assert new != old
    assert (f"{old} holds the same targets complete, with rows_per_shard=400, chunk_rows=128, backend=zarr, "
            "codec=zstd; set those cache settings to use it") in capsys.readouterr().err


def test_any_input_change_gives_a_new_id(workspace):
    _ws, path = workspace
    base = spec.cache_dir(load_config(path))
    for override in ("teachers.temperature=3", "teachers.ensemble=mean_logprobs", "teachers.weights=[2, 1]",
                     "cache.encoding=topk", "cache.dtype=float32", "data.transfer.exclude_classes=[3]",
                     "cache.precision=bf16"):
        assert spec.cache_dir(load_config(path, [override])) != base, override


def test_changed_teacher_weights_change_the_id(workspace, tmp_path):
    _ws, path = workspace
    cfg = load_config(path)
    before = spec.cache_dir(cfg)
    ref = teacher_refs(cfg, load_splits(cfg))[0]
    saved = ref.checkpoint.read_bytes()
    try:
        state = torch.load(ref.checkpoint, weights_only=True)
        state["1.bias"] += 0.01
        torch.save(state, ref.checkpoint)
        assert spec.cache_dir(load_config(path)) != before
    finally:
        ref.checkpoint.write_bytes(saved)


def test_a_worker_refuses_to_write_when_a_teacher_changed_after_planning(workspace):
    """A Dask task carries the driver's cache id: a worker that hashes other weights (a checkpoint
    overwritten in place meanwhile) refuses instead of writing new-weight shards under the old id."""
    _ws, path = workspace
    cfg = load_config(path, ["cache.rows_per_shard=300", "cache.root=" + str(_ws / "racing")])
    ctx = spec.context(cfg)
    (group, *_) = cache_stage._groups(cache_stage.plan(cfg, ctx), 1, ctx.dir.name)
    ref = teacher_refs(cfg, ctx.splits)[0]
    saved = ref.checkpoint.read_bytes()
    try:
        state = torch.load(ref.checkpoint, weights_only=True)
        state["1.bias"] += 0.01
        torch.save(state, ref.checkpoint)
        with pytest.raises(CacheError, match="changed while the cache was being written"):
            cache_stage.run_group(cfg, group)
        assert not list((_ws / "racing").rglob("*.zarr"))  # nothing written under either id
    finally:
        ref.checkpoint.write_bytes(saved)
    assert [r.index for r in cache_stage.run_group(cfg, group)] == [s.index for s in group.shards]


def test_bf16_teachers_give_their_own_cache_close_to_fp32(workspace):
    _ws, path = workspace
    _, d32 = build(path, "cache.dtype=float32")
    _, d16 = build(path, "cache.dtype=float32", "cache.precision=bf16")
    assert d16 != d32 and read_manifest(d16)["spec"]["compute"] == {"device": "cpu", "precision": "bf16"}
    a, b = fmt.CacheReader(d32).read_all()["logp"], fmt.CacheReader(d16).read_all()["logp"]
    assert not np.array_equal(a, b) and np.abs(np.exp(a) - np.exp(b)).max() < 0.05


def test_shards_describe_themselves_in_plain_zarr_and_pyarrow(workspace):
    _, path = workspace
    _, dz = build(path, "cache.encoding=topk", "cache.k=3")
    group = zarr.open_group(str(dz / "shards" / "00000.zarr"), mode="r")
    attrs = group.attrs["logitcache"]
    assert attrs["encoding"]["name"] == "topk" and attrs["num_classes"] == 10 and attrs["temperature"] == 2.0
    assert set(group.keys()) == {"sample_id", "ids", "logp", "residual", "tail_mean_logp"}
    assert "tail" in group["residual"].attrs["description"]
    assert "mean log-prob" in group["tail_mean_logp"].attrs["description"]
    assert group["ids"].dtype == np.uint8 and group["logp"].shape == (400, 3)

    _, dp = build(path, "cache.backend=parquet")
    table = pq.read_table(dp / "shards" / "00000.parquet")
    meta = json.loads(table.schema.metadata[b"logitcache"])
    assert meta["encoding"] == {"name": "dense", "dtype": "float16"} and meta["rows"] == 400
    assert b"description" in table.schema.field("logp").metadata
    assert table.num_rows == 400


def test_batch_mode_finalizes_when_last_task_finishes(workspace, tmp_path):
    _, path = workspace
    cfg = load_config(path, [f"cache.root={tmp_path}"])
    for i in range(3):
        d = cache_stage.main(cfg, shard_index=i, num_shards=4)
        assert not (d / "manifest.json").exists()
    from pipeline.tools.inspect import inspect_cache

    info = inspect_cache(d.name, tmp_path, verify=False)
    assert info["status"] == "partial" and info["shards_missing"] == ["00003.zarr"]  # 1348 rows / 400
    with pytest.raises(Exception, match="incomplete"):
        fmt.CacheReader(d)
    cache_stage.main(cfg, shard_index=3, num_shards=4)
    batch = json.loads((d / "manifest.json").read_text())
    _, whole = build(path)
    assert [s["sha256"] for s in batch["shards"]] == [
        s["sha256"] for s in json.loads((whole / "manifest.json").read_text())["shards"]]
