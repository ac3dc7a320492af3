"""Augmentation-aware caches on the bundled digits: students trained with augmentation, distilled
from a cache of plain images (targets of an image the student is not looking at), from 1-, 8- and
32-view caches (targets of exactly the replayed view), and online (the teachers run on every batch's
fresh views); plus bytes per view for each encoding, bytes per view at 1,000 classes with 8-bit
top-10 (generated logits, parameters of 224x224 views), and cache write time per view against per
image, all in one run.

    .venv/bin/python bench/views.py [--seeds 3] [--epochs 15]
    .venv/bin/python bench/views.py --only bytes     # bytes per view and bytes read per epoch only

Teachers and students are configs/views.yaml's (an MLP and a CNN teacher; an MLP student with 100
hidden units, alpha 0.1, T 4). The accuracy comparison uses its geometric augmentation only
(resized crop 60-100% of the area, aspect 4:5-5:4, then a shift of up to 1 pixel): a cache of plain
images cannot serve mixup, which needs the teachers' view of the mixed image. Dense float16 targets.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import epoch_batches, line, record, synthetic_logits, workdir

from pipeline.core.config import AugmentConfig, CacheConfig, load_config
from pipeline.format import reader as fmt
from pipeline.format.columns import Chunk, view_column_names
from pipeline.format.encodings import encoding_from_config
from pipeline.format.kl import divergence
from pipeline.format.shards import write_shard
from pipeline.format.views import column_names, view_dtype
from pipeline.inputs import augment as vw
from pipeline.run.identity import context
from pipeline.run.targets import load_models
from pipeline.train import losses
from stages import cache, student, teachers

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "views.yaml"
GEOMETRIC = ["augment.mixup_prob=0"]
STUDENT = ["student.baseline=false", "cache.encoding=dense", "cache.dtype=float16"]
ENCODINGS = {
    "dense-float16": ["cache.encoding=dense", "cache.dtype=float16"],
    "topk5-16bit": ["cache.encoding=topk", "cache.k=5", "cache.bits=16"],
    "topk5-8bit": ["cache.encoding=topk", "cache.k=5", "cache.bits=8"],
    "sampled16": ["cache.encoding=sampled", "cache.draws=16"],
}
GOALS = {"views_reach_online": "N-view cached student within seed noise (1 sd) of online KD",
         "views_beat_one_view": "N-view cached student above the 1-view cache",
         "bytes_per_view_1000_classes_topk10_8bit": 32.0,
         "write_time_per_view_over_per_image": 1.0}


def mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": round(float(np.mean(values)), 4), "sd": round(float(np.std(values, ddof=1)), 4)
            if len(values) > 1 else 0.0, "n": len(values)}


def students(base: list[str], seeds: list[int]) -> list[float]:
    cfg = load_config(CONFIG, [*base, *STUDENT, f"student.seeds={seeds}"])
    return [r.final_accuracy for r in student.main(cfg)]


def timed_cache(over: list[str]) -> tuple[Path, float]:
    cfg = load_config(CONFIG, over)
    start = time.perf_counter()
    d = cache.main(cfg)
    return d, time.perf_counter() - start


def view_column_bytes(d: Path) -> float:
    """Bytes on disk of the view columns (view, box, flip, ...) per row of a Zarr views cache."""
    manifest = json.loads((d / "manifest.json").read_text())
    names = view_column_names(manifest["spec"])
    total = sum(f.stat().st_size for s in manifest["shards"] for n in names
                for f in (d / s["path"] / n).rglob("*") if f.is_file())
    return total / manifest["rows"]


def chunk_bytes(d: Path, reader: fmt.CacheReader, chunk: Chunk) -> int:
    """Bytes on disk of one Zarr chunk of every stored column."""
    total = 0
    for name in reader.names:
        f = d / reader.shards[chunk.shard]["path"] / name / "c" / str(chunk.index)
        total += f.stat().st_size if f.is_file() else sum(g.stat().st_size for g in f.rglob("*") if g.is_file())
    return total


def epoch_reads(d: Path, epochs: int) -> dict[str, Any]:
    """Chunk bytes the student's loader reads per epoch of a Zarr views cache over the bytes of all its
    chunks, and whether `epochs` (= the view count) epochs train on every (sample, view) once."""
    reader = fmt.CacheReader(d)
    count = reader.manifest["spec"]["views"]["count"]
    read: list[Chunk] = []
    plain = reader.read

    def counted(chunk: Chunk, decode: bool = True) -> dict[str, np.ndarray]:
        read.append(chunk)
        return plain(chunk, decode)

    def counted_joined(chunks: list[Chunk]) -> dict[str, np.ndarray]:
        read.extend(chunks)  # whole chunks of plain Zarr shards are decoded in place, not through read
        return plain_joined(chunks)

    plain_joined = reader.read_joined
    reader.read = counted  # type: ignore[method-assign]
    reader.read_joined = counted_joined  # type: ignore[method-assign]
    everything = sum(chunk_bytes(d, reader, c) for c in reader.chunks())
    fractions, used = [], []
    for epoch in range(epochs):
        read.clear()
        for batch in epoch_batches(reader, 64, 0, 4, epoch):
            used += zip(batch["sample_id"].tolist(), batch["view"].tolist())
        fractions.append(sum(chunk_bytes(d, reader, c) for c in read) / everything)
    return {"views": count, "epochs": epochs, "chunk_bytes_read_per_epoch_over_all": [round(f, 4) for f in fractions],
            "every_sample_view_once": len(used) == len(set(used)) == reader.rows}


def online_kd(cfg_over: list[str], seeds: list[int], epochs: int) -> list[float]:
    """The student of the cached runs, trained with the teachers run on every batch's fresh views
    (drawn per (seed, sample, epoch) like the online augmentation of a plain cache)."""
    cfg = load_config(CONFIG, [*cfg_over, *STUDENT])
    ctx = context(cfg)
    teachers_ = load_models(ctx)
    transfer, test = ctx.splits.transfer, ctx.splits.test
    s = cfg.student
    T, alpha = cfg.teachers.temperature, s.alpha
    from pipeline.models.builders import build_model
    from pipeline.models.ensemble import combine, normalized_weights

    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = build_model(s.models[0], ctx.splits.input_shape, ctx.splits.num_classes, "student")
        opt = torch.optim.Adam(model.parameters(), lr=s.lr)
        rng = np.random.default_rng(seed)
        for epoch in range(epochs):
            for idx in np.array_split(rng.permutation(len(transfer)), -(-len(transfer) // s.batch_size)):
                ids = transfer.ids[idx]
                params = vw.draw(cfg.augment, seed, ids, np.full(len(ids), epoch), transfer.x.shape[2:])
                x = vw.render_rows(lambda i: transfer.x[transfer.positions(i)], {"sample_id": ids, **params},
                                   cfg.augment)
                with torch.no_grad():  # the teachers in the loop
                    logp = combine([t(x) for t in teachers_], cfg.teachers.ensemble, normalized_weights(cfg), T)
                logits = model(x)
                logq = torch.log_softmax(logits / T, -1)
                kd = T**2 * divergence(logp, logq, "forward").mean()
                loss = losses.mix(kd, losses.hard_ce(logits, torch.from_numpy(transfer.y[idx])), alpha)
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            out.append(float((model(torch.from_numpy(test.x)).argmax(-1).numpy() == test.y).mean()))
    return out


def bytes_1000_classes(ws: Path, samples: int, views: int) -> dict[str, Any]:
    """Bytes per view of 8-bit top-10 targets of generated 1,000-class logits plus the parameters
    of 224x224 views (resized crop + flip; and with mixup/cutmix, which add a partner id, lambda and
    the cutmix box), in one Zarr shard laid out as the cache stage writes it: `samples` consecutive
    sample ids of an ImageNet-1k-sized transfer set (partners drawn from all of it), view-major,
    the stored columns as `views.draw` gives them. Also each column's bytes per view."""
    enc = encoding_from_config(CacheConfig(encoding="topk", k=10, bits=8), 1000)
    rows = samples * views
    targets = enc.to_host(enc.encode(torch.log_softmax(synthetic_logits(rows, 1000, seed=1), -1)))
    pool = np.arange(1_281_167)  # ImageNet-1k's training set size
    first = 640_000  # a shard from the middle of the transfer set
    ids = np.tile(pool[first:first + samples], views)
    view = np.repeat(np.arange(views, dtype=view_dtype(views)), samples)
    out = {}
    for name, aug in {"crop+flip": AugmentConfig(crop="resized", flip=0.5),
                      "crop+flip+mixup/cutmix": AugmentConfig(crop="resized", flip=0.5, mixup_prob=0.4,
                                                              cutmix_prob=0.4)}.items():
        arrays = {"sample_id": ids, "view": view, **vw.draw(aug, 0, ids, view, (224, 224), pool), **targets}
        path = ws / f"b1000-{name.replace('/', '-')}.zarr"
        write_shard(path, arrays, {}, enc, 4096, 3)
        columns = {d.name: round(sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / rows, 2)
                   for d in sorted(path.iterdir()) if d.is_dir()}
        total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        out[name] = {"bytes_per_view": round(total / rows, 2),
                     "view_params_bytes_per_view": round(sum(columns[n] for n in column_names(aug)), 2),
                     "columns": columns}
    return out


def bytes_and_reads(ws: Path, common: list[str]) -> dict[str, Any]:
    """Bytes per view of 8-view digits caches in each encoding, the chunk bytes an epoch of the 8-view
    top-5 8-bit one reads, and the 1,000-class bytes per view."""
    encodings, reads = {}, {}
    for name, over in ENCODINGS.items():
        d, _ = timed_cache([*common, "cache.views=8", *over])
        manifest = json.loads((d / "manifest.json").read_text())
        encodings[name] = {"bytes_per_view": manifest["bytes_per_view"],
                           "view_params_bytes_per_view": round(view_column_bytes(d), 2)}
        if name == "topk5-8bit":
            reads = epoch_reads(d, 8)
    return {"bytes_per_view_digits_8_views": encodings, "student_epoch_reads_digits_topk5_8bit": reads,
            "bytes_per_view_1000_classes_topk10_8bit": bytes_1000_classes(ws, 2500, 8)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--only", choices=["bytes"], help="bytes: only bytes per view and bytes read per epoch "
                    "(teachers and four 8-view caches: a few minutes)")
    args = ap.parse_args()
    started = time.perf_counter()
    ws = workdir("views")
    seeds = list(range(args.seeds))
    common = [f"workspace={ws}", f"student.epochs={args.epochs}", *GEOMETRIC]
    teachers.main(load_config(CONFIG, common))
    if args.only == "bytes":
        sizes = bytes_and_reads(ws, common)
        record("views-bytes", line("views", **sizes, goals_met={"bytes_per_view_1000_classes_topk10_8bit": all(
            v["bytes_per_view"] <= 32.0 for v in sizes["bytes_per_view_1000_classes_topk10_8bit"].values())},
             seconds=round(time.perf_counter() - started, 1)))
        return

    # cache write time: plain images vs views, same teachers and encoding, side by side
    write = {}
    for n in (0, 1, 8, 32):
        d, seconds = timed_cache([*common, *STUDENT, f"cache.views={n}", "cache.chunk_rows=256",
                                  "cache.rows_per_shard=8192"])
        rows = json.loads((d / "manifest.json").read_text())["rows"]
        write[f"views={n}"] = {"seconds": round(seconds, 2), "rows": rows, "us_per_row": round(1e6 * seconds / rows, 1)}
    per_image = write["views=0"]["us_per_row"]

    accuracy = {
        "plain cache, online augmentation": students([*common, "cache.views=0", "run_name=plain"], seeds),
        **{f"{n}-view cache": students([*common, f"cache.views={n}", f"run_name=v{n}"], seeds) for n in (1, 8, 32)},
        "online KD (teachers every step)": online_kd(common, seeds, args.epochs),
    }
    summary = {k: mean_sd(v) for k, v in accuracy.items()}

    sizes = bytes_and_reads(ws, common)
    b1000 = sizes["bytes_per_view_1000_classes_topk10_8bit"]

    online = summary["online KD (teachers every step)"]
    best_views = max((summary[f"{n}-view cache"] for n in (8, 32)), key=lambda s: s["mean"])
    one = summary["1-view cache"]
    goals_met = {
        "views_reach_online": best_views["mean"] >= online["mean"] - max(online["sd"], best_views["sd"]),
        "views_beat_one_view": best_views["mean"] > one["mean"],
        "bytes_per_view_1000_classes_topk10_8bit": all(v["bytes_per_view"] <= 32.0 for v in b1000.values()),
        "write_time_per_view_over_per_image": all(write[f"views={n}"]["us_per_row"] <= per_image for n in (1, 8, 32)),
    }
    record("views", line("views", seeds=args.seeds, epochs=args.epochs, transfer_rows=write["views=0"]["rows"],
         accuracy=summary, accuracy_per_seed={k: [round(a, 4) for a in v] for k, v in accuracy.items()},
         write_time=write, write_time_per_view_over_per_image={
             n: round(write[n]["us_per_row"] / per_image, 3) for n in ("views=1", "views=8", "views=32")},
         **sizes,
         goals=GOALS, goals_met=goals_met, unmet=[k for k, v in goals_met.items() if not v],
         seconds=round(time.perf_counter() - started, 1)))


if __name__ == "__main__":
    main()
