"""Hybrid: an exact top-k head plus ids drawn from the renormalized tail."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from pipeline.format import kl
from pipeline.format.encodings.base import (
    Column,
    distinct_counts,
    draw_logp,
    draws_problems,
    head_divergence,
    head_problems,
    head_targets,
    id_bytes,
    id_columns,
    id_store,
    in_blocks,
    need_draw_logp,
    pack_ids,
    tensor,
    unpack_ids,
)
from pipeline.format.encodings.topk import TopK


@dataclass(frozen=True)
class Hybrid:
    """An exact top-k head plus `draws` ids drawn from the renormalized tail, with the exact tail
    mass R and the tail's entropy term: the forward KL is exact on the head and unbiased on the
    tail, since R * count / draws is unbiased for each tail probability.

        KL = sum_head p (log p - log q) - H_tail - R * sum_j (count_j / draws) log q_j
    where H_tail = -sum_tail p log p. Reverse KL and JSD use the head and the tail model.

    With `draw_logp` (format 3) each distinct tail draw's log-prob is kept too (float16). At
    another temperature the head is re-tempered exactly up to the head/tail split, which takes the
    tail's mass at T from the draws (R * mean of p^(Tc/T - 1), unbiased), and the draws are
    re-weighted by self-normalised importance weights (kl.retemper_draws)."""

    name: ClassVar[str] = "hybrid"
    num_classes: int
    k: int
    draws: int
    bits: int = 16
    logp_range: float = 16.0
    ids: str = ""
    draw_logp: bool = True  # the tail_logp column (format 3): other temperatures by importance weights
    head: TopK = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.ids:
            object.__setattr__(self, "ids", id_store(self.num_classes))
        object.__setattr__(self, "head", TopK(self.num_classes, self.k, self.bits, self.logp_range, self.ids,
                                                  tail_mean=False))

    @classmethod
    def from_params(cls, p: dict[str, Any], num_classes: int, version: int) -> Hybrid:
        if version == 1:
            raise ValueError("name: hybrid did not exist in format 1")
        return cls(num_classes, int(p["k"]), int(p["draws"]), int(p.get("bits", 16)),
                   float(p.get("logp_range", 16.0)), p.get("ids", ""), version >= 3 and bool(p.get("draw_logp", True)))

    def problems(self) -> list[str]:
        problems = head_problems(self.k, self.bits, self.logp_range, self.num_classes, self.num_classes - 1)
        return [*(p + " (hybrid needs a tail to sample)" if p.startswith("k:") else p for p in problems),
                *draws_problems(self.draws)]

    def columns(self) -> list[Column]:
        head = [c if c.name != "residual" else Column("residual", ("row",), "exact probability mass outside the "
                                                      "top k (float16 at any `bits`: the tail estimate scales with it)")
                for c in self.head.columns()]
        return [*head,
                *id_columns(self.ids, "tail_ids", "draw", "distinct ids drawn from the tail renormalized to one, "
                             "ascending, delta-coded, padding repeats the last id"),
                Column("tail_counts", ("row", "draw"), "times each tail id was drawn (uint8); "
                       "residual * count / draws is unbiased for its probability; 0 on padding"),
                Column("tail_entropy", ("row",), "-sum of p log p over the tail classes (float16)"),
                *([Column("tail_logp", ("row", "draw"), "log-probability of each distinct tail id drawn at the "
                          "cached temperature (float16; 0 on padding): importance weights for other temperatures")]
                  if self.draw_logp else [])]

    def encode(self, logp: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return in_blocks(lambda rows: self._encode_rows(rows, generator), logp)

    def _encode_rows(self, logp: torch.Tensor, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        vals, head_ids = logp.topk(self.k, dim=-1)
        out = self.head.encode_head(logp, vals, head_ids)
        p_tail = logp.float().exp().scatter(-1, head_ids, 0.0)  # (B, C), zero on the head
        mass = p_tail.sum(-1, keepdim=True)
        if self.bits == 8:  # the tail's weights are R * count / draws: R in float16 (5e-4), not 8-bit steps (3%)
            out["residual"] = mass.squeeze(-1).half()
        uniform = torch.ones_like(p_tail).scatter(-1, head_ids, 0.0)  # rows whose tail underflowed: weight 0 anyway
        drawn = torch.multinomial(torch.where(mass > 0, p_tail, uniform), self.draws, replacement=True,
                                  generator=generator)
        ids, counts = distinct_counts(drawn, delta=True)
        out = {**out, "tail_ids": ids, "tail_counts": counts.to(torch.uint8),
               "tail_entropy": (-torch.xlogy(p_tail, p_tail).sum(-1)).half()}
        if self.draw_logp:
            out["tail_logp"] = draw_logp(logp, ids, counts, delta=True)
        return out

    def to_host(self, encoded: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        head = self.head.to_host({k: encoded[k] for k in ("ids", "logp", "residual")})  # residual: float16
        return {**head, **pack_ids(encoded["tail_ids"].cpu().numpy(), self.ids, "tail_ids"),
                **{k: encoded[k].cpu().numpy() for k in ("tail_counts", "tail_entropy", "tail_logp") if k in encoded}}

    def decode(self, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        residual = stored["residual"]  # float16 at any bits
        head = self.head.decode({**stored, "residual": np.zeros(len(residual), np.uint8)})
        out = {**head, "residual": residual, "tail_ids": unpack_ids(stored, self.ids, "tail_ids", delta=True),
               "tail_counts": stored["tail_counts"], "tail_entropy": stored["tail_entropy"]}
        return {**out, "tail_logp": stored["tail_logp"]} if self.draw_logp else out

    def targets(self, decoded: dict[str, np.ndarray], device: torch.device | str,
                tau: float = 1.0) -> dict[str, torch.Tensor]:
        tail_ids = tensor(decoded["tail_ids"], device)
        counts = tensor(decoded["tail_counts"], device)
        if tau == 1.0:
            t = head_targets(decoded, self.num_classes, device, 1.0)
            return {**t, "tail_ids": tail_ids, "tail_weights": t["residual"][:, None] * counts.float() / self.draws,
                    "tail_entropy": tensor(decoded["tail_entropy"], device).float()}
        need_draw_logp(self, tau)
        head = tensor(decoded["logp"], device).float() / tau  # (n, k): log p^beta
        tail_logp = tensor(decoded["tail_logp"], device).float()  # (n, S) at Tc
        weights, log_mean = kl.retemper_draws(counts, tail_logp, tau)
        log_tail = tensor(decoded["residual"], device).float().clamp(min=0).log() + log_mean
        log_z = torch.logsumexp(torch.cat([head, log_tail[:, None]], dim=-1), dim=-1)  # (n,)
        residual = (log_tail - log_z).exp()  # the tail's mass at T
        tail_weights = residual[:, None] * weights
        return {"ids": tensor(decoded["ids"], device), "logp": head - log_z[:, None],
                "residual": residual, "tail_ids": tail_ids, "tail_weights": tail_weights,
                "tail_entropy": -(tail_weights * (tail_logp / tau - log_z[:, None])).sum(-1)}

    def divergence(self, z: torch.Tensor, targets: dict[str, torch.Tensor], kind: str,
                   tail: str) -> torch.Tensor:
        if kind != "forward":
            return head_divergence(z, targets, kind, tail)
        logp = targets["logp"].float()
        p = logp.exp()
        ids = torch.cat([targets["ids"].long(), targets["tail_ids"].long()], dim=-1)  # disjoint: tail ids are drawn
        cross = kl.sparse_cross_entropy(z, ids, torch.cat([p, targets["tail_weights"]], dim=-1))  # off the head
        return (p * logp).sum(-1) + cross - targets["tail_entropy"]

    def full_logp(self, targets: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """None: the tail is drawn, not described (no read-time ensemble)."""
        return None

    def fidelity(self, full: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        head = self.head.fidelity(full, targets)
        tail = (full.exp().gather(-1, targets["tail_ids"]) * (targets["tail_weights"] > 0)).sum(-1)
        return {"kl": None, "mass_kept": head["mass_kept"] + tail, "top1": head["top1"]}

    def raw_bytes_per_row(self) -> float:
        residual_extra = 1 if self.bits == 8 else 0  # float16 residual even at 8 bits
        return (self.head.raw_bytes_per_row() + residual_extra + id_bytes(self.ids, self.draws) + self.draws + 2
                + 2 * self.draws * self.draw_logp)

    def params(self) -> dict[str, Any]:
        head = {k: v for k, v in self.head.params().items() if k != "tail_mean"}
        return {**head, "name": self.name, "draws": self.draws, "draw_logp": self.draw_logp}

    def label(self) -> str:
        return f"hybrid-k{self.k}-n{self.draws}" + ("-q8" if self.bits == 8 else "")

    @property
    def retemperable(self) -> bool:
        return self.draw_logp

    @property
    def stochastic(self) -> bool:
        return True
