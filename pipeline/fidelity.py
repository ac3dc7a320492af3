"""`logitcache caches fidelity ID`: how much a cache keeps of its teachers' distributions.

Re-runs the teachers (from the resolved config saved in the cache) on a sample of cached rows and
compares, per row: KL(full || cached as the student sees it, tail spread uniformly), the teacher
probability mass the cache keeps, top-1 agreement, and the bias of the distillation loss a
reference student would get from the cache instead of the full distribution (the student is the
teacher's own log-probs plus unit Gaussian noise: a student near its teacher, where bias matters).
The same full distributions are then encoded every other way (top-k at several k, 16 and 8 bits;
sampled at several draw counts, hybrid heads with sampled tails) to show what each choice would keep.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import cache as fmt
from pipeline import losses, spec
from pipeline.encodings import Encoding, Hybrid, Sampled, TopK
from pipeline.config import load_config
from pipeline.errors import CacheError, LogitcacheError
from pipeline.io import atomic_write_bytes, atomic_write_json
from pipeline.progress import log


def _config_for(cache_dir: Path) -> Any:
    for path in sorted((cache_dir / "configs").glob("*.yaml")):
        try:
            cfg = load_config(path)
            if spec.cache_dir(cfg).resolve() == cache_dir.resolve():  # the teachers as they are on disk now
                return cfg
        except (LogitcacheError, OSError):  # its data or teachers are gone or changed
            continue
    raise CacheError(f"{cache_dir}: no saved config reproduces this cache (teachers or data changed since); "
                     "fidelity needs the exact teachers that made it")


def _full_logp(cfg: Any, reader: fmt.CacheReader, rows: int, seed: int) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """The ensemble's full log-probs (n, C) for a random sample of whole cached chunks, and the
    cached targets (decoded) of those rows."""
    from pipeline.data import load_splits
    from pipeline.ensemble import (
        combine,
        load_teacher,
        normalized_weights,
        teacher_refs,
    )

    rng = np.random.default_rng(seed)
    chunks = reader.chunks()
    picked, total = [], 0
    for i in rng.permutation(len(chunks)):
        picked.append(chunks[int(i)])
        total += chunks[int(i)].stop - chunks[int(i)].start
        if total >= rows:
            break
    parts = reader.read_many(picked)
    cached = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    rows_only = {k: cached.pop(k) for k in ("sample_id", "position") if k in cached}
    splits = load_splits(cfg)
    teachers = [load_teacher(r, splits, torch.device("cpu")) for r in teacher_refs(cfg, splits)]
    lm = reader.token_rows
    per_item = cfg.data.seq_len if lm else 1
    pos = splits.transfer.positions(rows_only["sample_id"][::per_item])
    x = splits.transfer.x[pos][:, :-1] if lm else splits.transfer.x[pos]
    out = []
    with torch.no_grad():
        for b in range(0, len(x), 64 if lm else 1024):
            logits = [t(torch.from_numpy(x[b:b + (64 if lm else 1024)])) for t in teachers]
            logp = combine(logits, cfg.teachers.ensemble, normalized_weights(cfg), cfg.teachers.temperature)
            out.append(logp.reshape(-1, logp.shape[-1]))
    return torch.cat(out), cached


def _measure(full: torch.Tensor, cached: dict[str, np.ndarray], enc: Encoding, block: int = 256) -> dict[str, Any]:
    """Fidelity of `cached` (decoded rows) against `full` (n, C) log-probs, in blocks of rows."""
    sums = {"kl": 0.0, "mass_kept": 0.0, "top1": 0.0, "loss_cached": 0.0, "loss_full": 0.0}
    g = torch.Generator().manual_seed(0)
    n = len(full)
    has_kl = True
    for s in range(0, n, block):
        logp = full[s:s + block].float()
        targets = enc.targets({k: v[s:s + block] for k, v in cached.items()}, "cpu")
        logq = torch.log_softmax(logp + torch.randn(logp.shape, generator=g), -1)  # a student near the teacher
        m = enc.fidelity(logp, targets)
        if m["kl"] is None:
            has_kl = False
        else:
            sums["kl"] += float(m["kl"].sum())
        sums["mass_kept"] += float(m["mass_kept"].sum())
        sums["top1"] += float((m["top1"] == logp.argmax(-1)).sum())
        sums["loss_cached"] += float(enc.divergence(logq, targets, "forward", "uniform").sum())
        sums["loss_full"] += float(losses.divergence(logp, logq, "forward").sum())
    return {
        "kl": round(sums["kl"] / n, 5) if has_kl else None,
        "mass_kept": round(sums["mass_kept"] / n, 5),
        "top1_agreement": round(sums["top1"] / n, 5),
        "loss_bias": round((sums["loss_cached"] - sums["loss_full"]) / sums["loss_full"], 5),
    }


def _encode_all(full: torch.Tensor, enc: Encoding, block: int = 256) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(1)
    parts = [enc.decode(enc.to_host(enc.encode(full[s:s + block], g))) for s in range(0, len(full), block)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def fidelity(ref: str, root: Path, rows: int, out: Path | None) -> dict[str, Any]:
    cache_dir = fmt.resolve(ref, root)
    reader = fmt.CacheReader(cache_dir)
    if "views" in reader.manifest["spec"]:
        raise CacheError(f"{cache_dir}: a cache of augmented views; fidelity compares cached rows with the "
                         "teachers on plain inputs, which these rows are not, so it does not apply")
    cfg = _config_for(cache_dir)
    full, cached = _full_logp(cfg, reader, rows, seed=0)
    enc = reader.encoding
    C = enc.num_classes
    result: dict[str, Any] = {"cache_id": cache_dir.name, "rows": len(full), "classes": C,
                              "encoding": enc.params(), "bytes_per_row": reader.manifest["bytes_per_row"],
                              "cache": _measure(full, cached, enc)}
    sweep = []
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k < C]
    for k in ks:
        for bits in (16, 8):
            e = TopK(C, k, bits)
            sweep.append({"encoding": e.label(), "k": k, "bits": bits, **_measure(full, _encode_all(full, e), e)})
    for draws in (8, 16, 32, 64):
        e = Sampled(C, draws)
        sweep.append({"encoding": e.label(), "draws": draws, **_measure(full, _encode_all(full, e), e)})
    for k, draws in ((4, 16), (8, 16), (16, 32)):
        if k < C:
            e = Hybrid(C, k, draws)
            sweep.append({"encoding": e.label(), "k": k, "draws": draws, **_measure(full, _encode_all(full, e), e)})
    result["sweep"] = sweep
    out = out or Path(cfg.workspace) / "fidelity" / cache_dir.name
    atomic_write_json(out / "fidelity.json", result)
    _plot(sweep, out / "fidelity.png", cache_dir.name)
    log(f"fidelity: wrote {out / 'fidelity.json'} and {out / 'fidelity.png'}")
    return result


def table(result: dict[str, Any]) -> str:
    head = f"{'encoding':<16} {'KL(full||cached)':>17} {'mass kept':>10} {'top-1 agree':>12} {'loss bias':>10}"
    lines = [(f"cache {result['cache_id']} ({result['rows']} rows sampled, {result['classes']} classes, "
             f"{result['bytes_per_row']} B/row stored)"), head, "-" * len(head)]

    def line(name: str, m: dict[str, Any]) -> str:
        kl = "-" if m["kl"] is None else f"{m['kl']:.5f}"
        return f"{name:<16} {kl:>17} {m['mass_kept']:>10.4f} {m['top1_agreement']:>12.4f} {m['loss_bias']:>+10.4f}"

    lines.append(line("this cache", result["cache"]))
    lines += [line(s["encoding"], s) for s in result["sweep"]]
    return "\n".join(lines)


def _plot(sweep: list[dict[str, Any]], path: Path, name: str) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for bits, style in ((16, "o-"), (8, "s--")):
        pts = [s for s in sweep if s.get("bits") == bits]
        ks = [s["k"] for s in pts]
        a1.plot(ks, [s["kl"] for s in pts], style, label=f"top-k, {bits}-bit")
        a2.plot(ks, [s["mass_kept"] for s in pts], style, label=f"top-k, {bits}-bit")
    for ax, label in ((a1, "KL(full || cached)"), (a2, "teacher mass kept")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Cache fidelity against k ({name})")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())

