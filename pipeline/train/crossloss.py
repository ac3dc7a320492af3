"""The losses of a student with another tokenizer (pipeline/train/crosstok.py says how its
positions meet the teacher rows, and what each method assumes).

The teacher's targets are read in their compact form as (ids, probs, rest): the listed teacher ids
and their probabilities at the training temperature and the mass not listed (top-k's tail; none for
dense, sampled or hybrid rows). Nothing of (positions, teacher vocabulary) is built but what the
encoding itself stores; a student-vocabulary tensor is built per logit chunk, as the student's own
logits are.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pipeline.train.crosstok import METHODS


def sparse_teacher(targets: Any, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (n, K) int64, probs (n, K), rest (n,)) of a batch's made targets (`Targets`), by encoding."""
    if name == "dense":
        logp = targets["logp"].float()
        ids = torch.arange(logp.shape[1], device=logp.device).expand(logp.shape[0], -1)
        return ids, logp.exp(), logp.new_zeros(logp.shape[0])
    if name == "topk":
        return targets["ids"].long(), targets["logp"].float().exp(), targets["residual"].float().clamp(min=0)
    if name == "sampled":
        w = targets["weights"].float()
        return targets["ids"].long(), w, w.new_zeros(w.shape[0])
    if name == "hybrid":
        ids = torch.cat([targets["ids"].long(), targets["tail_ids"].long()], dim=1)
        probs = torch.cat([targets["logp"].float().exp(), targets["tail_weights"].float()], dim=1)
        return ids, probs, probs.new_zeros(probs.shape[0])
    raise ValueError(f"cross-tokenizer distillation reads dense, topk, sampled or hybrid caches, not {name!r}")


def uld(p: torch.Tensor, rest: torch.Tensor | None, q: torch.Tensor, listed: torch.Tensor | None = None) -> torch.Tensor:
    """Universal logit distillation, per row: the L1 distance between the teacher's listed
    probabilities `p` (n, K) sorted and the student's `q` (n, V) sorted, over the largest, plus the
    difference of what lies beyond them (the teacher's unlisted `rest` against the student's mass
    beyond its largest): the distance of the full sorted vectors when the teacher's unlisted mass is
    one entry, which is all a cache says of it. `listed` (n,): how many entries of each row of `p`
    are listed (the rest of the row is padding); default all K. `q` need not sum to one (the part of
    a distribution the teacher's listed and unlisted mass stands for). `rest` None: the listed part
    only (the unlisted mass is matched otherwise)."""
    k = min(p.shape[1], q.shape[1])
    top_p = p.sort(dim=1, descending=True).values
    top_q = q.topk(k, dim=1).values
    if listed is not None:  # the student's entries past a row's listed count join its remainder
        top_q = torch.where(torch.arange(k, device=q.device) < listed[:, None], top_q, 0)
    head = (top_p[:, :k] - top_q).abs().sum(1) + top_p[:, k:].sum(1)
    return head if rest is None else head + (rest - (q.sum(1) - top_q.sum(1))).abs()


def mapped_distribution(ids: torch.Tensor, probs: torch.Tensor, rest: torch.Tensor, target: torch.Tensor,
                        vocab: int, chain: torch.Tensor | None = None, chain_first: torch.Tensor | None = None,
                        label: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's distribution on the student's vocabulary, (n, vocab), and the mass that could
    not be mapped (n,): each listed teacher id's probability goes to target[id] (-1: unmapped); the
    unlisted `rest` is unmapped. Where `chain` (n,) is finite, the student token `label` read as
    several teacher tokens has that probability under the teacher (the product of the chain's
    cached rows): it is moved to `label` from where the chain's first teacher token `chain_first`
    put it (or from the unmapped mass, where that token is not listed). Mapped plus unmapped sum to
    the teacher's mass, one."""
    m = target[ids.clamp(min=0)]
    m = torch.where(ids >= 0, m, torch.full_like(m, -1))
    ok = m >= 0
    q = probs.new_zeros(ids.shape[0], vocab).scatter_add_(1, m.clamp(min=0), torch.where(ok, probs, 0))
    unmapped = rest + torch.where(ok, 0, probs).sum(1)
    if chain is not None:
        assert chain_first is not None and label is not None
        has = torch.isfinite(chain)
        c = torch.where(has, chain, 0)
        listed = (ids == chain_first[:, None]) & (chain_first[:, None] >= 0)
        from_id = torch.where(listed.any(1), target[chain_first.clamp(min=0)], -1)
        src = q.gather(1, from_id.clamp(min=0)[:, None])[:, 0]
        take_mapped = torch.where(has & (from_id >= 0), torch.minimum(c, src), 0)
        take_rest = torch.where(has & (from_id < 0), torch.minimum(c, unmapped), 0)
        q = q.scatter_add(1, from_id.clamp(min=0)[:, None], -take_mapped[:, None])
        q = q.scatter_add(1, label[:, None], (take_mapped + take_rest)[:, None])
        unmapped = unmapped - take_rest
    return q, unmapped


def position_losses(z: torch.Tensor, temperature: float, align: str, ids: torch.Tensor, probs: torch.Tensor,
                    rest: torch.Tensor, aligned: torch.Tensor, target: torch.Tensor | None, chain: torch.Tensor,
                    chain_first: torch.Tensor, label: torch.Tensor, tail: str = "uniform") -> torch.Tensor:
    """The distillation term of each position owning a teacher row, from its student logits z (n, V):
    ULD; for "exact" at aligned positions, T^2 forward KL from the mapped distribution (its unlisted
    tail spread uniformly over the student tokens no mapped mass reached, or with `tail` "bucket"
    one outcome against their total), plus ULD between listed teacher tokens without a student
    counterpart and the student's largest probabilities outside the mapped tokens."""
    logq = torch.log_softmax(z.float() / temperature, dim=-1)
    q = logq.exp()
    out = uld(probs, rest, q)
    if align != "exact" or not bool(aligned.any()):
        return out
    assert target is not None
    a = aligned
    pm, un = mapped_distribution(ids[a], probs[a], rest[a], target, z.shape[1], chain[a], chain_first[a], label[a])
    no_map = (target[ids[a].clamp(min=0)] < 0) & (ids[a] >= 0)  # listed teacher ids without a student token
    unlisted = torch.where(no_map, probs[a], 0)
    unknown = (un - unlisted.sum(1)).clamp(min=0)  # the teacher's unlisted mass (a top-k tail), after the chain
    free = pm <= 0  # student tokens no mapped mass reached
    if tail == "uniform":
        pm = pm + torch.where(free, (unknown / free.sum(1).clamp(min=1))[:, None], 0)
        kl = torch.where(pm > 0, pm * (pm.clamp(min=1e-30).log() - logq[a]), 0).sum(1)
    else:
        log_free = torch.logsumexp(torch.where(free, logq[a], -torch.inf), dim=1)
        kl = torch.where(pm > 0, pm * (pm.clamp(min=1e-30).log() - logq[a]), 0).sum(1) + \
            torch.where(unknown > 0, unknown * (unknown.clamp(min=1e-30).log() - log_free), 0)
    kl = kl * temperature ** 2 + uld(unlisted, None, torch.where(free, q[a], 0), no_map.sum(1))
    return out.index_put((a.nonzero()[:, 0],), kl)


def cross_kd_loss(hidden: torch.Tensor, head: torch.nn.Module, batch: dict[str, Any], temperature: float,
                  align: str = "exact", alpha: float = 0.0, vocab_map: torch.Tensor | None = None,
                  logit_chunk: int = 1024, tail: str = "uniform") -> torch.Tensor:
    """alpha * CE + (1 - alpha) * the `align` method's distillation term, per student target position
    of a cross-tokenizer batch (`Cache.dataset(..., tokens=<student corpus>)` with another
    tokenizer): `hidden` (B, L, d) the student's hidden states of batch["inputs"][:, :-1], `head` its
    output layer, `vocab_map` teacher id -> student id (default the batch's: the dataset's map),
    `tail` how "exact" models a top-k cache's unlisted mass on the student's vocabulary (uniform or
    bucket, as student.tail).
    Logits are made `logit_chunk` positions at a time, each chunk recomputed in backward (activation
    checkpointing), so (positions, vocabulary) logits never live at once. Mean over the batch's
    target positions."""
    if align not in METHODS:
        raise ValueError(f"align={align!r}: use one of {', '.join(METHODS)}")
    if tail not in ("uniform", "bucket"):
        raise ValueError(f"tail={tail!r}: use uniform or bucket")
    vocab_map = vocab_map if vocab_map is not None else batch.get("vocab_map")
    if align == "exact" and vocab_map is None:
        raise ValueError("align='exact' maps teacher ids to the student's vocabulary: pass vocab_map=dataset.vocab_map")
    dev = hidden.device
    seq, pos = batch["x_sequence"].to(dev), batch["x_position"].to(dev)
    n = int(seq.shape[0])
    if n == 0 or batch.get("padding"):
        return hidden.sum() * 0
    h = hidden[seq, pos]  # (n, d)
    label = batch["inputs"].to(dev)[:, 1:][seq, pos]
    row, aligned = batch["x_row"].to(dev), batch["x_aligned"].to(dev)
    chunk, chunk_size = batch["x_chunk"].to(dev), batch["chunk_size"].to(dev)
    teacher_logp = batch["chunk_teacher_logp"].to(dev)
    targets = batch["targets"].to(dev)
    ids, probs, rest = sparse_teacher(targets, batch["encoding"].name)
    label_ids = batch["label"].to(dev).long()
    # the chain: a chunk of one student token has its probability under the teacher (several teacher
    # tokens' rows, or one), moved from where its first teacher token's mass went
    chain = torch.full((n,), torch.nan, device=dev)
    chain_first = torch.full((n,), -1, device=dev, dtype=torch.long)
    if len(teacher_logp):
        c = chunk.clamp(min=0)
        single = (chunk >= 0) & (chunk_size[c] == 1)
        chain = torch.where(single, teacher_logp[c].float().exp(), chain)
        chain_first = torch.where(single, label_ids[batch["chunk_first"].to(dev)[c]], chain_first)
    target = vocab_map.to(dev) if vocab_map is not None else None

    def chunk_terms(h_chunk: torch.Tensor, a: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(CE sum, distillation sum, the student's log-prob of each label at T) of positions
        [a, a + len(h_chunk)): recomputed in backward, so one chunk's logits live at a time."""
        b = a + len(h_chunk)
        z = head(h_chunk).float()
        ce = F.cross_entropy(z, label[a:b], reduction="sum") if alpha > 0 else z.new_zeros(())
        if align == "span":
            return ce, z.new_zeros(()), torch.log_softmax(z / temperature, dim=-1).gather(1, label[a:b, None])[:, 0]
        has = row[a:b] >= 0
        kd = z.new_zeros(())
        if alpha < 1 and bool(has.any()):
            r = row[a:b][has]
            kd = position_losses(z[has], temperature, align, ids[r], probs[r], rest[r], aligned[a:b][has], target,
                                 chain[a:b][has], chain_first[a:b][has], label[a:b][has], tail).sum()
        return ce, kd, z.new_zeros(0)

    ce = kd = hidden.new_zeros((), dtype=torch.float32)
    student_logp = []
    for a in range(0, n, logit_chunk):
        c_ce, c_kd, c_logp = checkpoint(chunk_terms, h[a:a + logit_chunk], a, use_reentrant=False)
        ce, kd = ce + c_ce, kd + c_kd
        student_logp.append(c_logp)
    if align == "span" and alpha < 1 and len(teacher_logp):
        s = torch.cat(student_logp)
        ok = chunk >= 0
        log_ps = torch.zeros(len(teacher_logp), device=dev).index_add(0, chunk[ok], s[ok])
        kd = span_kl(teacher_logp.float(), log_ps).sum()
    return (alpha * ce + (1 - alpha) * kd) / n


def span_kl(log_pt: torch.Tensor, log_ps: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of two-outcome distributions (the chunk, or any other text), from
    each side's log-probability of the chunk; stable for probabilities near 0 and 1."""
    log_pt, log_ps = log_pt.clamp(max=0), log_ps.clamp(max=-1e-7)
    pt = log_pt.exp()
    return pt * (log_pt - log_ps) + (1 - pt) * (_log1mexp(log_pt) - _log1mexp(log_ps))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
