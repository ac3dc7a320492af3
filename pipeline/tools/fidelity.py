"""`logitcache caches fidelity ID`: how much a cache keeps of its teachers' distributions.

Re-runs the teachers (from the resolved config saved in the cache) on a sample of cached rows and
compares, per row: KL(full || cached as the student sees it, tail spread uniformly), the teacher
probability mass the cache keeps, top-1 agreement, and the bias of the distillation loss a
reference student would get from the cache instead of the full distribution (the student is the
teacher's own log-probs plus unit Gaussian noise: a student near its teacher, where bias matters).
The same full distributions are then encoded every other way (top-k at several k, 16 and 8 bits;
sampled at several draw counts, hybrid heads with sampled tails) to show what each choice would keep.

The teachers' full log-probs stream: at most `logit_rows` rows of them exist at once, and every
encoding is measured on them block by block, so memory never grows with rows x classes (only the
sampled rows' cached targets are held, at their stored width).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.config import load_config
from pipeline.core.errors import CacheError, LogitcacheError
from pipeline.core.io import atomic_write_bytes, atomic_write_json
from pipeline.core.progress import log
from pipeline.format import kl, members
from pipeline.format import reader as fmt
from pipeline.format.encodings import Encoding, encoding_from_params
from pipeline.format.manifest import resolve
from pipeline.format.members import MembersReader, member_names, open_local
from pipeline.run import identity as spec
from pipeline.train.members import blend_of

BLOCK = 256  # rows measured together: the sweep's draws and the reference student's noise come per block


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


def _sample(cfg: Any, reader: fmt.CacheReader, rows: int, seed: int, logit_rows: int | None,
            members: bool = False) -> tuple[Iterator[torch.Tensor], dict[str, np.ndarray]]:
    """A random sample of whole cached chunks: the ensemble's full log-probs of its rows as an
    iterator of (1, <= logit_rows, C) blocks in row order (with `members`, (1 + teachers, ...): each
    teacher's own log-probs after the ensemble's), and the cached targets (decoded) of those rows.

    Classifier teachers run on `logit_rows` inputs at a time (default 1024); language-model trunks
    on 64 sequences and their vocabulary projection on `logit_rows` token rows (default
    cache.logit_rows), so no (rows, C) tensor of the whole sample ever exists."""
    from pipeline.inputs.documents import context_window, window_batches
    from pipeline.inputs.splits import load_splits
    from pipeline.models.ensemble import combine, load_teacher, normalized_weights, teacher_refs, token_logits

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
    at_once = logit_rows or (cfg.cache.logit_rows if lm else 1024)
    mode, weights, temperature = cfg.teachers.ensemble, normalized_weights(cfg), cfg.teachers.temperature

    def combine_all(logits: list[torch.Tensor]) -> torch.Tensor:  # (1 [+ teachers], rows, C)
        ens = combine(logits, mode, weights, temperature)
        if not members:
            return ens[None]
        return torch.stack([ens, *(torch.log_softmax(z.float() / temperature, -1) for z in logits)])
    if reader.keyed_by_document:  # each chunk's rows are every trained position of a range: read as cached
        corpus = splits.corpus
        context, stride = context_window(cfg.cache.context, cfg.cache.stride, cfg.data.seq_len)
        sizes = [c.stop - c.start for c in picked]
        p = corpus.offsets[rows_only["sample_id"]] + rows_only["position"]
        bounds = np.concatenate([[0], np.cumsum(sizes)])

        def document_logp() -> Iterator[torch.Tensor]:
            with torch.no_grad():
                for a, b in itertools.pairwise(bounds):
                    for x, _, select in window_batches(corpus, int(p[a]), int(p[b - 1]) + 1, context, stride, 8):
                        for _, logits in token_logits(teachers, torch.from_numpy(x), at_once, torch.from_numpy(select)):
                            yield combine_all(logits)  # (1, <= at_once, V)

        return document_logp(), cached
    per_item = cfg.data.seq_len if lm else 1
    pos = splits.transfer.positions(rows_only["sample_id"][::per_item])
    x = splits.transfer.x[pos][:, :-1] if lm else splits.transfer.x[pos]

    def full_logp() -> Iterator[torch.Tensor]:
        with torch.no_grad():
            if not lm:
                for b in range(0, len(x), at_once):
                    xb = torch.from_numpy(x[b:b + at_once])
                    yield combine_all([t(xb) for t in teachers])  # (1 [+ teachers], rows, C)
                return
            for b in range(0, len(x), 64):
                for _, logits in token_logits(teachers, torch.from_numpy(x[b:b + 64]), at_once):
                    yield combine(logits, mode, weights, temperature)  # (<= at_once, V)

    return full_logp(), cached


def _blocks(parts: Iterator[torch.Tensor], block: int) -> Iterator[torch.Tensor]:
    """The rows of `parts` (k, n, C), in order, re-cut into blocks of exactly `block` rows (the last
    one shorter): what is measured never depends on how many rows came at once."""
    carry: list[torch.Tensor] = []
    have = 0
    for part in parts:
        carry.append(part)
        have += part.shape[1]
        if have < block:
            continue
        rows = torch.cat(carry, dim=1) if len(carry) > 1 else part
        whole = have - have % block
        yield from rows[:, :whole].split(block, dim=1)
        carry, have = [rows[:, whole:]], have - whole
    if have:
        yield torch.cat(carry, dim=1)


class _Meter:
    """Running fidelity sums of one encoding, fed the full log-probs block by block in row order:
    of the cached rows given with each block, or (`reencode`) of the same rows encoded afresh."""

    def __init__(self, enc: Encoding, reencode: bool, targets_of: Callable[[dict[str, np.ndarray]], Any] | None = None) -> None:
        self.enc = enc
        self.targets_of = targets_of or (lambda cached: enc.targets(cached, "cpu"))  # a read-time ensemble's own
        self.draws = torch.Generator().manual_seed(1) if reencode else None  # the sweep's encodings
        self.noise = torch.Generator().manual_seed(0)  # the same reference student for every encoding
        self.sums = {"kl": 0.0, "mass_kept": 0.0, "top1": 0.0, "loss_cached": 0.0, "loss_full": 0.0}
        self.rows = 0
        self.has_kl = True

    def add(self, full: torch.Tensor, cached: dict[str, np.ndarray]) -> None:
        """full (n, C) log-probs of the next n rows; cached: the cache's decoded targets of them."""
        enc = self.enc
        logp = full.float()
        if self.draws is not None:
            cached = enc.decode(enc.to_host(enc.encode(full, self.draws)))
        targets = self.targets_of(cached)
        logq = torch.log_softmax(logp + torch.randn(logp.shape, generator=self.noise), -1)  # a student near the teacher
        m = enc.fidelity(logp, targets)
        if m["kl"] is None:
            self.has_kl = False
        else:
            self.sums["kl"] += float(m["kl"].sum())
        self.sums["mass_kept"] += float(m["mass_kept"].sum())
        self.sums["top1"] += float((m["top1"] == logp.argmax(-1)).sum())
        self.sums["loss_cached"] += float(enc.divergence(logq, targets, "forward", "uniform").sum())
        self.sums["loss_full"] += float(kl.divergence(logp, logq, "forward").sum())
        self.rows += len(full)

    def result(self) -> dict[str, Any]:
        s, n = self.sums, self.rows
        return {
            "kl": round(s["kl"] / n, 5) if self.has_kl else None,
            "mass_kept": round(s["mass_kept"] / n, 5),
            "top1_agreement": round(s["top1"] / n, 5),
            "loss_bias": round((s["loss_cached"] - s["loss_full"]) / s["loss_full"], 5),
        }


def _sweep(C: int) -> list[tuple[Encoding, dict[str, Any]]]:
    """Every other way of encoding the same distributions, with the parameters that name each."""
    grid = [{"name": "topk", "k": k, "bits": bits} for k in (1, 2, 4, 8, 16, 32, 64, 128) if k < C for bits in (16, 8)]
    grid += [{"name": "sampled", "draws": draws} for draws in (8, 16, 32, 64)]
    grid += [{"name": "hybrid", "k": k, "draws": draws} for k, draws in ((4, 16), (8, 16), (16, 32)) if k < C]
    return [(encoding_from_params(p, C), {k: v for k, v in p.items() if k != "name"}) for p in grid]


def fidelity(ref: str, root: Path, rows: int, out: Path | None, logit_rows: int | None = None) -> dict[str, Any]:
    """Measure the cache and the sweep on about `rows` sampled rows; `logit_rows` bounds the rows of
    full log-probs held at once (see _sample), which never changes the result.

    A cache of per-member targets is measured three ways against its teachers: each member's
    targets against that teacher alone, the ensemble a student forms from them at read time (the
    cache's mode and weights, pipeline/train/members.py) against the exact ensemble, and, with
    cache.members both, the stored ensemble (`cache`)."""
    cache_dir = resolve(ref, root)
    reader = open_local(cache_dir)
    if "views" in reader.manifest["spec"]:
        raise CacheError(f"{cache_dir}: a cache of augmented views; fidelity compares cached rows with the "
                         "teachers on plain inputs, which these rows are not, so it does not apply")
    names = member_names(reader.manifest)
    blend = blend_of(reader.manifest, combine=reader.manifest["ensemble"]) if names else None
    if blend is not None:  # every unit's rows, side by side
        reader = MembersReader(cache_dir, reader.manifest, [u["name"] for u in reader.manifest["units"]])
    cfg = _config_for(cache_dir)
    full, cached = _sample(cfg, reader, rows, 0, logit_rows, members=blend is not None)
    enc = reader.encoding
    C = enc.num_classes
    sweep = _sweep(C)
    meters = [_Meter(e, reencode=True) for e, _ in sweep]
    own: list[tuple[Any, _Meter]] = []  # (which rows of a block it measures, meter) of the cache's own targets
    if blend is None:
        own.append((0, _Meter(enc, reencode=False)))
    else:
        split = reader.split
        own.append((0, _Meter(blend.encoding, False, lambda c: {"logp": blend.combined(
            [e.targets(split(c)[n], "cpu") for n, e in zip(blend.names, blend.encodings)])})))
        own += [(1 + i, _Meter(e, False, lambda c, n=n, e=e: e.targets(split(c)[n], "cpu")))
                for i, (n, e) in enumerate(zip(blend.names, blend.encodings))]
        if members.ENSEMBLE in reader.names:
            e = reader.encodings[members.ENSEMBLE]
            own.append((0, _Meter(e, False, lambda c: e.targets(split(c)[members.ENSEMBLE], "cpu"))))
    first = 0
    for block in _blocks(full, BLOCK):
        n = block.shape[1]
        rows_cached = {k: v[first:first + n] for k, v in cached.items()}
        for meter in meters:
            meter.add(block[0], rows_cached)
        for which, meter in own:
            meter.add(block[which], rows_cached)
        first += n
    result: dict[str, Any] = {"cache_id": cache_dir.name, "rows": first, "classes": C,
                              "encoding": enc.params(), "bytes_per_row": reader.manifest["bytes_per_row"],
                              "cache": own[-1][1].result() if blend is None or members.ENSEMBLE in reader.names
                              else own[0][1].result(),
                              "sweep": [{"encoding": e.label(), **fields, **m.result()}
                                        for (e, fields), m in zip(sweep, meters)]}
    if blend is not None:
        result["members"] = {"combine": blend.combine, "weights": list(blend.weights),
                             "read_time": own[0][1].result(),
                             "each": {n: m.result() for n, (_, m) in zip(blend.names, own[1:])},
                             "bytes_per_row": {u["name"]: u["bytes_per_row"] for u in reader.manifest["units"]}}
    out = out or Path(cfg.workspace) / "fidelity" / cache_dir.name
    atomic_write_json(out / "fidelity.json", result)
    _plot(result["sweep"], out / "fidelity.png", cache_dir.name)
    log(f"fidelity: wrote {out / 'fidelity.json'} and {out / 'fidelity.png'}")
    return result


def table(result: dict[str, Any]) -> str:
    head = f"{'encoding':<24} {'KL(full||cached)':>17} {'mass kept':>10} {'top-1 agree':>12} {'loss bias':>10}"
    lines = [(f"cache {result['cache_id']} ({result['rows']} rows sampled, {result['classes']} classes, "
             f"{result['bytes_per_row']} B/row stored)"), head, "-" * len(head)]

    def line(name: str, m: dict[str, Any]) -> str:
        kl = "-" if m["kl"] is None else f"{m['kl']:.5f}"
        return f"{name:<24} {kl:>17} {m['mass_kept']:>10.4f} {m['top1_agreement']:>12.4f} {m['loss_bias']:>+10.4f}"

    m = result.get("members")
    if m is None or "ensemble" in m["bytes_per_row"]:
        lines.append(line("this cache", result["cache"]))
    if m is not None:  # each member against its teacher; the read-time ensemble against the exact one
        lines.append(line(f"read-time {m['combine']}", m["read_time"]))
        lines += [line(f"member {name}", each) for name, each in m["each"].items()]
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

