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

from pipeline import cache as fmt
from pipeline import views as vw
from pipeline.config import AugmentConfig, load_config
from pipeline.errors import ConfigError
from pipeline.loader import ChunkShuffleLoader
from pipeline.spec import context
from stages import cache as cache_stage
from stages import student as student_stage
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
    assert full["box"].dtype == np.uint8 and full["lam"].dtype == np.float16 and full["partner"].dtype == np.int64
    assert (full["partner"] != ids).all() and (full["lam"][full["partner"] == -1] == 1).all()
    assert 0.15 < (full["partner"] >= 0).mean() < 0.8 and 0.2 < full["flip"].mean() < 0.8


def test_render_is_batch_independent_and_matches_interpolate():
    g = torch.Generator().manual_seed(0)
    x, xp = torch.rand(64, 3, 12, 10, generator=g), torch.rand(64, 3, 12, 10, generator=g)
    p = vw.draw(AUG, 0, np.arange(64), np.zeros(64, np.int64), (12, 10), np.arange(64))
    whole = vw.render(x, p, AUG, xp)
    parts = [vw.render(x[i:i + 7], {k: v[i:i + 7] for k, v in p.items()}, AUG, xp[i:i + 7]) for i in range(0, 64, 7)]
    assert torch.equal(whole, torch.cat(parts))
    identity = {"box": np.array([[0, 0, 12, 10]], np.uint8), "flip": np.zeros(1, np.uint8)}
    assert torch.equal(vw.render(x[:1], identity, AugmentConfig()), x[:1])
    top, left, h, w = (int(v) for v in p["box"][3])
    pad = vw.pad_of(AUG)
    crop = torch.nn.functional.pad(x[3:4], (pad,) * 4)[..., top:top + h, left:left + w]
    ref = torch.nn.functional.interpolate(crop, size=(12, 10), mode="bilinear", align_corners=False)
    plain = {"box": p["box"][3:4], "flip": np.zeros(1, np.uint8)}
    torch.testing.assert_close(vw.render(x[3:4], plain, AUG), ref, atol=1e-6, rtol=0)


def test_epoch_choice_uses_every_view_once_per_cycle():
    ids = np.arange(100, 300)
    n = 8
    for seed in (0, 1):
        picks = np.stack([vw.chosen_views(seed, e, ids, n) for e in range(2 * n)])  # (epochs, samples)
        for cycle in (picks[:n], picks[n:]):
            assert (np.sort(cycle, axis=0) == np.arange(n)[:, None]).all()  # each view once per N epochs
        assert (picks[:n] != picks[n:]).any()  # a new order every cycle
        assert len({tuple(p) for p in picks[0:1].T.tolist()}) > 1  # samples differ within an epoch
    assert not np.array_equal(vw.chosen_views(0, 3, ids, n), vw.chosen_views(1, 3, ids, n))


@pytest.mark.parametrize("override, message", [
    (["augment.scale=[0.5, 2.0]"], "augment.scale"),
    (["augment.flip=1.5"], "augment.flip"),
    (["augment.crop=padded"], "augment.padding"),
    (["cache.views=4", "augment.crop=none", "augment.translate=0", "augment.flip=0",
      "augment.mixup_prob=0", "augment.cutmix_prob=0"], "identical copies"),
    (["cache.views=3"], "multiple of cache.views"),
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


def test_views_cache_replays_exact_pixels_and_reruns_byte_identical(tmp_path):
    path = views_config(tmp_path)
    cfg = load_config(path)
    teachers_stage.main(cfg)
    d = cache_stage.main(cfg)
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["views"]["count"] == 4 and manifest["spec"]["views"]["augment"]["crop"] == "resized"
    ctx = context(cfg)
    transfer = ctx.splits.transfer
    assert manifest["rows"] == 4 * len(transfer)
    group = zarr.open_group(str(d / manifest["shards"][0]["path"]), mode="r")
    for name in ("view", "box", "flip", "partner", "lam", "cut"):
        assert group[name].attrs["description"]

    # the same cache again under another root: byte-identical shards
    again = cache_stage.main(load_config(path, [f"cache.root={tmp_path / 'other'}"]))
    assert [s["sha256"] for s in json.loads((again / "manifest.json").read_text())["shards"]] == \
        [s["sha256"] for s in manifest["shards"]]

    # what the teachers saw, per (sample_id, view), in the cache stage's own batches
    seen: list[torch.Tensor] = []
    models = [Recorder(m, seen) for m in cache_stage.load_models(ctx)][:1] + cache_stage.load_models(ctx)[1:]
    shard = cache_stage.plan(cfg, ctx)[1]
    rows = cache_stage.compute_shard(ctx, shard, models)
    shown = torch.cat(seen)
    key = {(int(s), int(v)): i for i, (s, v) in enumerate(zip(rows["sample_id"], rows["view"]))}

    # the student's path: chunk-shuffled whole samples, one chosen view each, replayed from the cache
    reader = fmt.CacheReader(d)
    cached, online = vw.augmentation(cfg, reader.manifest["spec"])
    assert cached is not None and online is None
    loader = ChunkShuffleLoader(reader, 50, seed=3, shuffle_chunks=2, rows_per_item=cached.count)
    checked, mixed = 0, 0
    for epoch in range(2):
        for batch in loader.batches(epoch):
            batch, x, labels = student_stage.classify_inputs(batch, transfer, cached, None, 3, epoch,
                                                             reader.num_classes, d)
            assert len(batch["sample_id"]) == len(x) <= 50
            for i, (s, v) in enumerate(zip(batch["sample_id"], batch["view"])):
                if (int(s), int(v)) in key:
                    teacher_saw = shown[key[(int(s), int(v))]]
                    assert x[i].numpy().tobytes() == teacher_saw.numpy().tobytes()
                    checked += 1
            if labels is not None and labels.ndim == 2:
                mixed += 1
                torch.testing.assert_close(labels.sum(-1), torch.ones(len(x)))
    assert checked > 100 and mixed > 0


def test_end_to_end_views_run_and_online_augmentation(cli_run, tmp_path):
    path = views_config(tmp_path, views=2, backend="parquet")
    cli_run("run", str(path))
    run = tmp_path / "ws" / "runs" / "t"
    report = json.loads((run / "report.json").read_text())
    assert report
    history = json.loads(next((run / "students").glob("s-kd-*/history.json")).read_text())
    assert len(history["epochs"]) == 2 and np.isfinite(history["losses"]).all()
    reader = fmt.CacheReader(fmt.resolve(history["settings"]["cache_id"], tmp_path / "ws" / "caches"))
    assert {"view", "box", "flip", "partner", "lam", "cut"} <= set(reader.read(reader.chunks()[0]))
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
