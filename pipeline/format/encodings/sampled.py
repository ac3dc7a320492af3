"""Sampled: ids drawn from the teacher distribution, as distinct ids with counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from pipeline.format import kl
from pipeline.format.encodings.base import (
    Column,
    distinct_counts,
    draw_logp,
    draws_problems,
    forward_only,
    id_bytes,
    id_columns,
    id_store,
    in_blocks,
    legacy_ids,
    need_draw_logp,
    pack_ids,
    tensor,
    unpack_ids,
)


@dataclass(frozen=True)
class Sampled:
    """`draws` ids drawn from the teacher distribution, kept as distinct ids with counts, plus the
    exact entropy: count / draws is unbiased for each probability, so the forward KL estimate is
    unbiased (Sparse Logit Sampling). Noisy on the head, where most of the mass is.

    With `draw_logp` (format 3) each distinct draw's log-prob is kept too (float16), and another
    temperature re-weights the draws: self-normalised importance weights toward p^(Tc/T)
    (kl.retemper_draws), with the entropy estimated from the same draws."""

    name: ClassVar[str] = "sampled"
    num_classes: int
    draws: int
    ids: str = ""
    delta: bool = True  # format 1: zero-padded ids, not delta-coded
    draw_logp: bool = True  # the logp column (format 3): other temperatures by importance weights

    def __post_init__(self) -> None:
        if not self.ids:
            object.__setattr__(self, "ids", id_store(self.num_classes))

    @classmethod
    def from_params(cls, p: dict[str, Any], num_classes: int, version: int) -> Sampled:
        if version == 1:  # zero-padded ids
            return cls(num_classes, int(p["draws"]), legacy_ids(num_classes), delta=False, draw_logp=False)
        return cls(num_classes, int(p["draws"]), p.get("ids", ""), bool(p.get("delta", True)),
                   version >= 3 and bool(p.get("draw_logp", True)))

    def problems(self) -> list[str]:
        return draws_problems(self.draws)

    def columns(self) -> list[Column]:
        coding = "delta-coded, padding repeats the last id" if self.delta else "zero-padded"
        return [*id_columns(self.ids, "ids", "draw", f"distinct ids drawn from the distribution, ascending, {coding}"),
                Column("counts", ("row", "draw"), "times each id was drawn (uint8); count / draws is unbiased for "
                       "its probability; 0 on padding"),
                Column("entropy", ("row",), "entropy of the distribution at the cached temperature (float16)"),
                *([Column("logp", ("row", "draw"), "log-probability of each distinct drawn id at the cached "
                          "temperature (float16; 0 on padding): importance weights for other temperatures")]
                  if self.draw_logp else [])]

    def encode(self, logp: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return in_blocks(lambda rows: self._encode_rows(rows, generator), logp)

    def _encode_rows(self, logp: torch.Tensor, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        p = logp.float().exp()
        drawn = torch.multinomial(p, self.draws, replacement=True, generator=generator)  # (B, S)
        ids, counts = distinct_counts(drawn, self.delta)
        out = {"ids": ids, "counts": counts.to(torch.uint8), "entropy": (-torch.xlogy(p, p).sum(-1)).half()}
        if self.draw_logp:
            out["logp"] = draw_logp(logp, ids, counts, self.delta)
        return out

    def to_host(self, encoded: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {**pack_ids(encoded["ids"].cpu().numpy(), self.ids, "ids"),
                **{k: encoded[k].cpu().numpy() for k in ("counts", "entropy", "logp") if k in encoded}}

    def decode(self, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {"ids": unpack_ids(stored, self.ids, "ids", delta=self.delta), "counts": stored["counts"],
               "entropy": stored["entropy"]}
        return {**out, "logp": stored["logp"]} if self.draw_logp else out

    def targets(self, decoded: dict[str, np.ndarray], device: torch.device | str,
                tau: float = 1.0) -> dict[str, torch.Tensor]:
        ids = tensor(decoded["ids"], device)
        counts = tensor(decoded["counts"], device)
        if tau == 1.0:
            return {"ids": ids, "weights": counts.float() / self.draws,
                    "entropy": tensor(decoded["entropy"], device).float()}
        need_draw_logp(self, tau)
        logp = tensor(decoded["logp"], device).float()  # (n, S) at Tc
        weights, log_z = kl.retemper_draws(counts, logp, tau)  # q = p^beta / Z, Z estimated by exp(log_z)
        entropy = log_z - (weights * logp).sum(-1) / tau  # H(q) = log Z - beta E_q[log p], from the draws
        return {"ids": ids, "weights": weights, "entropy": entropy}

    def divergence(self, z: torch.Tensor, targets: dict[str, torch.Tensor], kind: str,
                   tail: str) -> torch.Tensor:
        forward_only(self, kind)
        return kl.sparse_cross_entropy(z, targets["ids"], targets["weights"]) - targets["entropy"]

    def full_logp(self, targets: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """None: draws estimate the distribution, they do not describe it (no read-time ensemble)."""
        return None

    def fidelity(self, full: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        ids, w = targets["ids"], targets["weights"]
        return {"kl": None, "mass_kept": (full.exp().gather(-1, ids) * (w > 0)).sum(-1),
                "top1": ids.gather(-1, w.argmax(-1, keepdim=True)).squeeze(-1)}

    def raw_bytes_per_row(self) -> float:
        return id_bytes(self.ids, self.draws) + self.draws + 2 + 2 * self.draws * self.draw_logp

    def params(self) -> dict[str, Any]:
        return {"name": self.name, "draws": self.draws, "ids": self.ids, "delta": self.delta,
                "draw_logp": self.draw_logp}

    def label(self) -> str:
        return f"sampled-n{self.draws}"

    @property
    def retemperable(self) -> bool:
        return self.draw_logp

    @property
    def stochastic(self) -> bool:
        return True
