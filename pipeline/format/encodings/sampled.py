"""Sampled: ids drawn from the teacher distribution, as distinct ids with counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from pipeline.format.encodings.base import (
    Column,
    distinct_counts,
    draws_problems,
    float32,
    forward_only,
    id_bytes,
    id_columns,
    id_store,
    in_blocks,
    legacy_ids,
    need_t1,
    pack_ids,
    unpack_ids,
)


@dataclass(frozen=True)
class Sampled:
    """`draws` ids drawn from the teacher distribution, kept as distinct ids with counts, plus the
    exact entropy: count / draws is unbiased for each probability, so the forward KL estimate is
    unbiased (Sparse Logit Sampling). Noisy on the head, where most of the mass is."""

    name: ClassVar[str] = "sampled"
    num_classes: int
    draws: int
    ids: str = ""
    delta: bool = True  # format 1: zero-padded ids, not delta-coded

    def __post_init__(self) -> None:
        if not self.ids:
            object.__setattr__(self, "ids", id_store(self.num_classes))

    @classmethod
    def from_params(cls, p: dict[str, Any], num_classes: int, version: int) -> Sampled:
        if version == 1:  # zero-padded ids
            return cls(num_classes, int(p["draws"]), legacy_ids(num_classes), delta=False)
        return cls(num_classes, int(p["draws"]), p.get("ids", ""), bool(p.get("delta", True)))

    def problems(self) -> list[str]:
        return draws_problems(self.draws)

    def columns(self) -> list[Column]:
        coding = "delta-coded, padding repeats the last id" if self.delta else "zero-padded"
        return [*id_columns(self.ids, "ids", "draw", f"distinct ids drawn from the distribution, ascending, {coding}"),
                Column("counts", ("row", "draw"), "times each id was drawn (uint8); count / draws is unbiased for "
                       "its probability; 0 on padding"),
                Column("entropy", ("row",), "entropy of the distribution at the cached temperature (float16)")]

    def encode(self, logp: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return in_blocks(lambda rows: self._encode_rows(rows, generator), logp)

    def _encode_rows(self, logp: torch.Tensor, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        p = logp.float().exp()
        drawn = torch.multinomial(p, self.draws, replacement=True, generator=generator)  # (B, S)
        ids, counts = distinct_counts(drawn, self.delta)
        return {"ids": ids, "counts": counts.to(torch.uint8), "entropy": (-torch.xlogy(p, p).sum(-1)).half()}

    def to_host(self, encoded: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {**pack_ids(encoded["ids"].cpu().numpy(), self.ids, "ids"),
                "counts": encoded["counts"].cpu().numpy(), "entropy": encoded["entropy"].cpu().numpy()}

    def decode(self, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = unpack_ids(stored, self.ids, "ids")
        return {"ids": np.cumsum(ids, axis=-1) if self.delta else ids, "counts": stored["counts"],
                "entropy": float32(stored["entropy"])}

    def targets(self, decoded: dict[str, np.ndarray], device: torch.device | str,
                tau: float = 1.0) -> dict[str, torch.Tensor]:
        need_t1(self, tau)
        return {"ids": torch.from_numpy(decoded["ids"]).to(device),
                "weights": torch.from_numpy(decoded["counts"]).to(device).float() / self.draws,
                "entropy": torch.from_numpy(decoded["entropy"]).to(device)}

    def divergence(self, logq: torch.Tensor, targets: dict[str, torch.Tensor], kind: str,
                   tail: str) -> torch.Tensor:
        forward_only(self, kind)
        return -(targets["weights"] * logq.gather(-1, targets["ids"])).sum(-1) - targets["entropy"]

    def full_logp(self, targets: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """None: draws estimate the distribution, they do not describe it (no read-time ensemble)."""
        return None

    def fidelity(self, full: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        ids, w = targets["ids"], targets["weights"]
        return {"kl": None, "mass_kept": (full.exp().gather(-1, ids) * (w > 0)).sum(-1),
                "top1": ids.gather(-1, w.argmax(-1, keepdim=True)).squeeze(-1)}

    def raw_bytes_per_row(self) -> float:
        return id_bytes(self.ids, self.draws) + self.draws + 2

    def params(self) -> dict[str, Any]:
        return {"name": self.name, "draws": self.draws, "ids": self.ids, "delta": self.delta}

    def label(self) -> str:
        return f"sampled-n{self.draws}"

    @property
    def retemperable(self) -> bool:
        return False
