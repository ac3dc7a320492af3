"""`logitcache caches fidelity ID`: how much a cache keeps of its teachers' distributions.

Re-runs the teachers (from the resolved config saved in the cache) on a sample of cached rows and
compares, per row: KL(full || cached as the student sees it, tail spread uniformly), the teacher
probability mass the cache keeps, top-1 agreement, and the bias of the distillation loss a
reference student would get from the cache instead of the full distribution (the student is the
teacher's own log-probs plus unit Gaussian noise: a student near its teacher, where bias matters).
The same full distributions are then encoded every other way (top-k at several k, 16 and 8 bits;
sampled at several draw counts for vocabularies) to show what each choice would keep.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import cache as fmt
from pipeline import losses
from pipeline.config import load_config
from pipeline.errors import CacheError, LogitcacheError
from pipeline.io import atomic_write_bytes, atomic_write_json
from pipeline.progress import log


def _config_for(cache_dir: Path) -> Any:
    from stages import cache as cache_stage

    cache_stage.forget()  # hash the teachers as they are on disk now
    for path in sorted((cache_dir / "configs").glob("*.yaml")):
        try:
            cfg = load_config(path)
            if cache_stage.cache_dir(cfg).resolve() == cache_dir.resolve():
                return cfg
        except (LogitcacheError, OSError):  # its data or teachers are gone or changed
            continue
    raise CacheError(f"{cache_dir}: no saved config reproduces this cache (teachers or data changed since); "
                     "fidelity needs the exact teachers that made it")


def _full_logp(cfg: Any, reader: fmt.CacheReader, rows: int, seed: int) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """The ensemble's full log-probs (n, C) for a random sample of whole cached chunks, and the
    cached (decoded) rows they correspond to."""
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
    splits = load_splits(cfg)
    teachers = [load_teacher(r, splits, torch.device("cpu")) for r in teacher_refs(cfg, splits)]
    lm = reader.encoding.token_rows
    per_item = cfg.data.seq_len if lm else 1
    pos = splits.transfer.positions(cached["sample_id"][::per_item])
    x = splits.transfer.x[pos][:, :-1] if lm else splits.transfer.x[pos]
    out = []
    with torch.no_grad():
        for b in range(0, len(x), 64 if lm else 1024):
            logits = [t(torch.from_numpy(x[b:b + (64 if lm else 1024)])) for t in teachers]
            logp = combine(logits, cfg.teachers.ensemble, normalized_weights(cfg), cfg.teachers.temperature)
            out.append(logp.reshape(-1, logp.shape[-1]))
    return torch.cat(out), cached


def _measure(full: torch.Tensor, cached: dict[str, np.ndarray], enc: fmt.Encoding, block: int = 256) -> dict[str, Any]:
    """Fidelity of `cached` (decoded rows) against `full` (n, C) log-probs, in blocks of rows."""
    sums = {"kl": 0.0, "mass_kept": 0.0, "top1": 0.0, "loss_cached": 0.0, "loss_full": 0.0}
    g = torch.Generator().manual_seed(0)
    n, C = full.shape
    for s in range(0, n, block):
        logp = full[s:s + block].float()
        part = {k: torch.from_numpy(v[s:s + block]) for k, v in cached.items()}
        student = logp + torch.randn(logp.shape, generator=g)  # logits of a student near the teacher
        loss_full = losses.kd_dense(student, logp, 1.0) * len(logp)
        if enc.name == "sampled":
            ids, counts = part["ids"].long(), part["counts"].float()
            kept = (logp.exp().gather(-1, ids) * (counts > 0)).sum(-1)
            top1 = ids.gather(-1, counts.argmax(-1, keepdim=True)).squeeze(-1)
            loss_cached = losses.kd_sampled(student, ids, counts, enc.draws, part["entropy"].float(), 1.0) * len(logp)
            kl = torch.full((len(logp),), float("nan"))
        else:
            if enc.name == "dense":
                cached_logp = torch.log_softmax(part["logp"].float(), -1)
                kept = torch.ones(len(logp))
                top1 = cached_logp.argmax(-1)
            else:
                ids = part["ids"].long()
                logp_k, residual = losses.retemper_topk(part["logp"].float(), part["residual"].float(), C, 1.0)
                cached_logp = losses.topk_full_logp(ids, logp_k, residual, C)
                kept = logp.exp().gather(-1, ids).sum(-1)
                top1 = ids.gather(-1, logp_k.argmax(-1, keepdim=True)).squeeze(-1)
            kl = losses.divergence(logp, cached_logp, "forward")
            loss_cached = losses.kd_dense(student, cached_logp, 1.0) * len(logp)
        sums["kl"] += float(kl.sum())
        sums["mass_kept"] += float(kept.sum())
        sums["top1"] += float((top1 == logp.argmax(-1)).sum())
        sums["loss_cached"] += float(loss_cached)
        sums["loss_full"] += float(loss_full)
    kl = sums["kl"] / n
    return {
        "kl": None if math.isnan(kl) else round(kl, 5),
        "mass_kept": round(sums["mass_kept"] / n, 5),
        "top1_agreement": round(sums["top1"] / n, 5),
        "loss_bias": round((sums["loss_cached"] - sums["loss_full"]) / sums["loss_full"], 5),
    }


def _encode_all(full: torch.Tensor, enc: fmt.Encoding, block: int = 256) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(1)
    parts = [fmt.decode(fmt.to_host(fmt.encode(full[s:s + block], enc, g), enc), enc) for s in range(0, len(full), block)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def fidelity(ref: str, root: Path, rows: int, out: Path | None) -> dict[str, Any]:
    cache_dir = fmt.resolve(ref, root)
    reader = fmt.CacheReader(cache_dir)
    cfg = _config_for(cache_dir)
    full, cached = _full_logp(cfg, reader, rows, seed=0)
    enc = reader.encoding
    C = enc.num_classes
    result: dict[str, Any] = {"cache_id": cache_dir.name, "rows": len(full), "classes": C,
                              "encoding": enc.describe(), "bytes_per_row": reader.manifest["bytes_per_row"],
                              "cache": _measure(full, cached, enc)}
    sweep = []
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k < C]
    for k in ks:
        for bits in (16, 8):
            e = fmt.Encoding("topk", C, k=k, bits=bits, token_rows=enc.token_rows)
            sweep.append({"encoding": f"topk-k{k}" + ("-q8" if bits == 8 else ""), "k": k, "bits": bits,
                          **_measure(full, _encode_all(full, e), e)})
    if enc.token_rows:
        for draws in (8, 16, 32, 64):
            e = fmt.Encoding("sampled", C, draws=draws, token_rows=True)
            sweep.append({"encoding": f"sampled-n{draws}", "draws": draws, **_measure(full, _encode_all(full, e), e)})
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

