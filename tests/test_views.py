"""Augmented views: counter-based parameters, exact replay in the student, byte-identical reruns,
the per-epoch view choice, refusals, and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import tiny_config, write_config

from pipeline.core.config import AugmentConfig, load_config
from pipeline.core.errors import CacheError, ConfigError
from pipeline.format import reader as fmt
from pipeline.format.columns import Chunk
from pipeline.format.manifest import resolve
from pipeline.format.views import ViewSpec, pad_of
from pipeline.inputs import augment as vw
from pipeline.run import targets
from pipeline.run.identity import context
from pipeline.train.plan import augmentation, epoch_blocks
from stages import cache as cache_stage
from stages import teachers as teachers_stage

AUG = AugmentConfig(crop="resized", scale=(0.5, 1.0), ratio=(0.75, 1.33), translate=1, flip=0.5,
                    mixup_prob=0.3, mixup_alpha=0.4, cutmix_prob=0.3)
AUG_YAML = {"crop": "resized", "scale": [0.5, 1.0], "ratio": [0.75, 1.33], "translate": 1, "flip": 0.5,
            "mixup_prob": 0.3, "mixup_alpha": 0.4, "cutmix_prob": 0.3}


def views_config(tmp_path: Path, views: int = 4, **cache) -> Path:
    cfg = tiny_config(tmp_path / "ws", augment=AUG_YAML,
                      cache={"views": views, "rows_per_shard": 1024, "chunk_rows": 128, "encoding": "topk", "k": 3,
                             "bits": 8, **cache})
    cfg["teachers"]["epochs"] = 2
    return write_config(tmp_path / "v.yaml", cfg)


SPEC = ViewSpec(8, AUG, 7, (8, 8))


def test_parameters_depend_only_on_seed_sample_and_view():
    ids = np.repeat(np.arange(50, 90), 8)
    views = np.tile(np.arange(8), 40)
    pool = np.arange(200)
    full = vw.draw(AUG, 7, ids, views, (8, 8), pool)
    order = np.random.default_rng(0).permutation(len(ids))  # another worker, another order
    shuffled = vw.draw(AUG, 7, ids[order], views[order], (8, 8), pool)
    for k in full:
        assert np.array_equal(full[k][order], shuffled[k]), k
    first4 = views < 4  # a 4-view cache's views are the first 4 of an 8-view cache's
    fewer = vw.draw(AUG, 7, ids[first4], views[first4], (8, 8), pool)
    assert all(np.array_equal(full[k][first4], fewer[k]) for k in full)
    other = vw.draw(AUG, 8, ids, views, (8, 8), pool)
    assert not np.array_equal(full["box"], other["box"])
    assert set(full) == {"box", "flip", "partner", "lam", "cut_size"}
    assert full["box"].dtype == full["cut_size"].dtype == np.uint8 and full["lam"].dtype == np.float16
    assert full["partner"].dtype == np.int32 and vw.draw(AUG, 7, ids, views, (8, 8), pool + 2**31)["partner"].dtype \
        == np.int64  # the narrowest width that holds every transfer id
    p = vw.expand(SPEC, {"sample_id": ids, "view": views, **full})
    expanded_order = vw.expand(SPEC, {"sample_id": ids[order], "view": views[order], **shuffled})
    assert all(np.array_equal(p[k][order], expanded_order[k]) for k in p)
    assert (p["partner"] != ids).all() and (p["lam"][p["partner"] == -1] == 1).all()
    assert 0.15 < (p["partner"] >= 0).mean() < 0.8 and 0.2 < p["flip"].mean() < 0.8
    cut = p["cut"][:, 2] > 0  # cutmix views: lam is the area kept, recomputed from the clipped box
    kept = (1 - p["cut"][cut, 2] * p["cut"][cut, 3] / 64).astype(np.float16)
    assert cut.any() and np.array_equal(p["lam"][cut], kept)
    assert (p["cut"][p["partner"] < 0] == 0).all() and (full["cut_size"][p["partner"] < 0] == 0).all()


def test_render_is_batch_independent_and_matches_interpolate():
    g = torch.Generator().manual_seed(0)
    x, xp = torch.rand(64, 3, 12, 10, generator=g), torch.rand(64, 3, 12, 10, generator=g)
    ids, views = np.arange(64), np.zeros(64, np.int64)
    stored = vw.draw(AUG, 0, ids, views, (12, 10), np.arange(64))
    p = vw.expand(ViewSpec(1, AUG, 0, (12, 10)), {"sample_id": ids, "view": views, **stored})
    whole = vw.render(x, p, AUG, xp)
    parts = [vw.render(x[i:i + 7], {k: v[i:i + 7] for k, v in p.items()}, AUG, xp[i:i + 7]) for i in range(0, 64, 7)]
    assert torch.equal(whole, torch.cat(parts))
    identity = {"box": np.array([[0, 0, 12, 10]], np.uint8), "flip": np.zeros(1, np.uint8)}
    assert torch.equal(vw.render(x[:1], identity, AugmentConfig()), x[:1])
    top, left, h, w = (int(v) for v in p["box"][3])
    pad = pad_of(AUG)
    crop = torch.nn.functional.pad(x[3:4], (pad,) * 4)[..., top:top + h, left:left + w]
    ref = torch.nn.functional.interpolate(crop, size=(12, 10), mode="bilinear", align_corners=False)
    plain = {"box": p["box"][3:4], "flip": np.zeros(1, np.uint8)}
    torch.testing.assert_close(vw.render(x[3:4], plain, AUG), ref, atol=1e-6, rtol=0)


def test_epoch_choice_reads_one_view_per_block_and_every_view_once_per_cycle():
    n, chunk = 8, 16
    shard_rows = [n * 64, n * 64, n * 37]  # the last shard's 37 samples: a tail block of 5
    spec = ViewSpec(n, AUG, 0, (8, 8))
    for seed in (0, 1):
        epochs = [epoch_blocks(spec, shard_rows, chunk, seed, e) for e in range(2 * n)]
        for cycle in (epochs[:n], epochs[n:]):
            covered = [np.zeros(r, int) for r in shard_rows]
            for blocks in cycle:
                for c in blocks:
                    covered[c.shard][c.start:c.stop] += 1
            assert all((cov == 1).all() for cov in covered)  # every (sample, view) once per N epochs
        for blocks in epochs:
            assert sum(c.stop - c.start for c in blocks) == sum(shard_rows) // n  # one view of each sample
            samples = [r // n for r in shard_rows]
            # a block is one view of consecutive samples: within one chunk unless in the tail shard
            assert all(c.start // samples[c.shard] == (c.stop - 1) // samples[c.shard] for c in blocks)
            assert all(c.start % chunk == 0 and c.stop - c.start == chunk for c in blocks if c.shard < 2)
        picks = np.array([[c.start // 64 for c in blocks if c.shard == 0] for blocks in epochs])
        assert (picks[:n] != picks[n:]).any() and len(set(picks[0].tolist())) > 1  # new order per cycle; blocks differ
    assert epoch_blocks(spec, shard_rows, chunk, 0, 3) != epoch_blocks(spec, shard_rows, chunk, 1, 3)


@pytest.mark.parametrize("override, message", [
    (["augment.scale=[0.5, 2.0]"], "augment.scale"),
    (["augment.flip=1.5"], "augment.flip"),
    (["augment.crop=padded"], "augment.padding"),
    (["cache.views=4", "augment.crop=none", "augment.translate=0", "augment.flip=0",
      "augment.mixup_prob=0", "augment.cutmix_prob=0"], "identical copies"),
    (["cache.views=3"], "must be cache.views=3 times a multiple of cache.chunk_rows=128"),
    (["cache.views=4", "cache.chunk_rows=192"], "rows are view-major"),
    (["cache.views=0"], "mixup/cutmix need cache.views"),
    (["augment.mixup_prob=0.7", "augment.cutmix_prob=0.6"], "mixup_prob + cutmix_prob"),
])
def test_bad_augment_settings_refused_in_one_line(tmp_path, cli_run, override, message):
    path = views_config(tmp_path)
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")) as e:
        load_config(path, override)
    assert "\n" not in str(e.value)
    result = cli_run("cache", str(path), *override, expect=1)
    assert message in result.output and len(result.output.strip().splitlines()) == 1


class Recorder(torch.nn.Module):
    """A teacher that records the pixels it is shown."""

    def __init__(self, inner: torch.nn.Module, seen: list[torch.Tensor]) -> None:
        super().__init__()
        self.inner, self.seen = inner, seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return self.inner(x)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A 4-view cache of the digits (6 shards of 256 samples, the last of 67; chunks of 128 rows)."""
    tmp = tmp_path_factory.mktemp("views")
    path = views_config(tmp)
    cfg = load_config(path)
    teachers_stage.main(cfg)
    return tmp, path, cfg, cache_stage.main(cfg)


def counting(reader: fmt.CacheReader) -> list[Chunk]:
    """The chunks `reader` reads from now on, recorded as they are read."""
    read: list[Chunk] = []
    plain, plain_many, plain_joined = reader.read, reader.read_many, reader.read_joined

    def read_and_count(chunk: Chunk, decode: bool = True) -> dict[str, np.ndarray]:
        read.append(chunk)
        return plain(chunk, decode)

    def read_many_and_count(chunks: list[Chunk], decode: bool = True) -> list[dict[str, np.ndarray]]:
        read.extend(chunks)
        return plain_many(chunks, decode)

    def read_joined_and_count(chunks: list[Chunk]) -> dict[str, np.ndarray]:
        read.extend(chunks)  # whole chunks of plain Zarr shards: decoded in place, never through read_many
        return plain_joined(chunks)

    reader.read, reader.read_many, reader.read_joined = read_and_count, read_many_and_count, read_joined_and_count
    return read


def test_views_cache_replays_exact_pixels_and_reruns_byte_identical(built):
    import pipeline as lc

    tmp_path, path, cfg, d = built
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["views"]["count"] == 4 and manifest["spec"]["views"]["augment"]["crop"] == "resized"
    ctx = context(cfg)
    transfer = ctx.splits.transfer
    assert manifest["rows"] == 4 * len(transfer)
    group = zarr.open_group(str(d / manifest["shards"][0]["path"]), mode="r")
    for name in ("view", "box", "flip", "partner", "lam", "cut_size"):
        assert group[name].attrs["description"]
    samples = manifest["shards"][0]["rows"] // 4  # view-major: view v of the shard's sample i at row v * S + i
    assert np.array_equal(group["view"][:], np.repeat(np.arange(4), samples))
    assert np.array_equal(group["sample_id"][:], np.tile(transfer.ids[:samples], 4))
    assert group["view"].dtype == np.uint8 and group["partner"].dtype == np.int32

    # the same cache again under another root: byte-identical shards
    again = cache_stage.main(load_config(path, [f"cache.root={tmp_path / 'other'}"]))
    assert [s["sha256"] for s in json.loads((again / "manifest.json").read_text())["shards"]] == \
        [s["sha256"] for s in manifest["shards"]]

    # what the teachers saw, per (sample_id, view), in the cache stage's own batches
    seen: list[torch.Tensor] = []
    models = [Recorder(m, seen) for m in targets.load_models(ctx)][:1] + targets.load_models(ctx)[1:]
    shard = cache_stage.plan(cfg, ctx)[1]
    rows = targets.compute_shard(ctx, shard, models)
    shown = torch.cat(seen)
    key = {(int(s), int(v)): i for i, (s, v) in enumerate(zip(rows["sample_id"], rows["view"]))}

    # the student's path: one view per block of samples, chunk-shuffled, replayed from the cache;
    # each epoch reads the chosen views' chunks only, and 4 epochs use every (sample, view) once
    reader = fmt.CacheReader(d)
    cached, online = augmentation(cfg, reader.manifest["spec"])
    assert cached is not None and online is None
    ds = lc.open_cache(d).dataset(50, seed=3, shuffle_chunks=2, inputs=transfer, labels=transfer)  # as the stage
    ds._reader = reader
    read = counting(reader)
    checked, mixed, used = 0, 0, []
    total_chunks = len(reader.chunks())
    for epoch in range(4):
        read.clear()
        ds.set_epoch(epoch)
        for batch in ds:
            x, labels = batch["inputs"], batch["labels"]
            assert len(batch["sample_id"]) == len(x) <= 50
            used += list(zip(batch["sample_id"].tolist(), batch["view"].tolist()))
            for i, (s, v) in enumerate(zip(batch["sample_id"], batch["view"])):
                if (int(s), int(v)) in key:
                    teacher_saw = shown[key[(int(s), int(v))]]
                    assert x[i].numpy().tobytes() == teacher_saw.numpy().tobytes()
                    checked += 1
            if labels is not None and labels.ndim == 2:
                mixed += 1
                torch.testing.assert_close(labels.sum(-1), torch.ones(len(x)))
        # 5 full shards of 2 blocks each, one chunk per block; the 67-sample tail block's view in <= 2 chunks
        assert 11 <= len(read) == len(set(read)) <= 12 and total_chunks == 5 * 8 + 3
        assert sum(c.stop - c.start for c in read) <= 5 * 256 + 2 * 128
    assert checked > 100 and mixed > 0
    assert sorted(used) == sorted(zip(np.repeat(transfer.ids, 4).tolist(), [0, 1, 2, 3] * len(transfer)))


def test_student_loader_resumes_mid_epoch_with_the_same_batches(built):
    *_, d = built
    import pipeline as lc

    ds = lc.open_cache(d).dataset(64, seed=5, shuffle_chunks=3)
    for epoch in (0, 2):
        ds.set_epoch(epoch)
        whole = list(ds)
        assert len(whole) == len(ds) == -(-fmt.CacheReader(d).rows // 4 // 64)
        for start in (1, 7, len(whole) - 1):
            ds.seek(epoch, start)
            resumed = list(ds)
            assert len(resumed) == len(whole) - start
            assert all(torch.equal(a[k], b[k]) for a, b in zip(resumed, whole[start:]) for k in a
                       if isinstance(a[k], torch.Tensor))


def test_api_yields_view_parameters_and_replays_the_students_pixels(built):
    import pipeline as lc

    _, _, cfg, d = built
    transfer = context(cfg).splits.transfer
    by_id = np.zeros((int(transfer.ids.max()) + 1, *transfer.x.shape[1:]), np.float32)
    by_id[transfer.ids] = transfer.x  # the user's images, indexed by sample id
    cache = lc.open_cache(d)
    assert cache.views == augmentation(cfg, cache.manifest["spec"])[0]
    ds = cache.dataset(batch_size=40, seed=1, inputs=by_id)
    read = counting(cache.reader)
    seen = []
    for batch in ds:
        assert {"view", "box", "flip", "partner", "lam", "cut"} <= set(batch)
        assert batch["partner"].dtype == torch.int64 and batch["lam"].dtype == torch.float16
        x = lc.replay_views(batch, by_id, cache.views)  # a user's own loop
        assert torch.equal(x, batch["inputs"])
        seen += list(zip(batch["sample_id"].tolist(), batch["view"].tolist()))
    assert len(seen) == len(set(seen)) == len(transfer) == ds.items  # one view of every sample
    assert 11 <= len(read) <= 12  # the chosen views' chunks only

    # two ranks, or two DataLoader workers, split the epoch's views; a resumed rank goes on with the same batches
    halves = [list(cache.dataset(batch_size=40, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    ranked = [(int(s), int(v)) for h in halves for b in h for s, v in zip(b["sample_id"], b["view"])]
    assert sorted(ranked) == sorted(seen)
    workers = [(int(s), int(v)) for b in cache.dataset(batch_size=40, seed=1).loader(num_workers=2)
               for s, v in zip(b["sample_id"], b["view"])]
    assert sorted(workers) == sorted(seen)
    again = cache.dataset(batch_size=40, seed=1, rank=1, world_size=2)
    again.load_state_dict({**again.state_dict(batches=3), "num_workers": None})
    assert all(torch.equal(a["box"], b["box"]) for a, b in zip(again, halves[1][3:]))


def test_views_cache_of_an_earlier_format_is_refused_in_one_line(built, tmp_path):
    import shutil

    *_, d = built
    old = tmp_path / d.name
    shutil.copytree(d, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["spec"]["views"]["format"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="earlier format") as e:
        fmt.CacheReader(old)
    assert "\n" not in str(e.value) and str(old) in str(e.value)


def test_end_to_end_views_run_and_online_augmentation(cli_run, tmp_path):
    path = views_config(tmp_path, views=2, backend="parquet")
    cli_run("run", str(path))
    run = tmp_path / "ws" / "runs" / "t"
    report = json.loads((run / "report.json").read_text())
    assert report
    history = json.loads(next((run / "students").glob("s-kd-*/history.json")).read_text())
    assert len(history["epochs"]) == 2 and np.isfinite(history["losses"]).all()
    reader = fmt.CacheReader(resolve(history["settings"]["cache_id"], tmp_path / "ws" / "caches"))
    assert {"view", "box", "flip", "partner", "lam", "cut_size"} <= set(reader.read(reader.chunks()[0]))
    # fidelity re-runs the teachers on plain inputs: meaningless for views, refused in one line
    result = cli_run("caches", "fidelity", str(reader.dir), expect=1)
    assert "views" in result.output and len(result.output.strip().splitlines()) == 1

    # a cache of plain images with an augment section: the student augments online, the id is unchanged
    plain = ["cache.views=0", "augment.mixup_prob=0", "augment.cutmix_prob=0", "run_name=online"]
    base = load_config(path, ["cache.views=0"] + plain[1:3] + ["augment.crop=none", "augment.translate=0",
                                                               "augment.flip=0"])
    assert "views" not in context(base).spec
    assert context(load_config(path, plain)).dir == context(base).dir
    cli_run("run", str(path), *plain)
    settings = json.loads(next((tmp_path / "ws" / "runs" / "online" / "students").glob(
        "s-kd-*/history.json")).read_text())["settings"]
    assert settings["augment"]["crop"] == "resized"
