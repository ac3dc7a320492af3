"""Dense: every class's log-probability, for small class counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from pipeline.format import kl
from pipeline.format.encodings.base import LOGP_FLOOR, Column, tensor


@dataclass(frozen=True)
class Dense:
    """Every class's log-probability: exact (to float16/32), for small class counts."""

    name: ClassVar[str] = "dense"
    num_classes: int
    dtype: str = "float16"

    @classmethod
    def from_params(cls, p: dict[str, Any], num_classes: int, version: int) -> Dense:
        return cls(num_classes, p.get("dtype", "float16"))

    def problems(self) -> list[str]:
        return [] if self.dtype in ("float16", "float32") else [f"dtype: {self.dtype!r} is not float16 or float32"]

    def columns(self) -> list[Column]:
        return [Column("logp", ("row", "class"), "log-probabilities at the cached temperature, (rows, classes)")]

    def encode(self, logp: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return {"logp": logp.clamp(min=LOGP_FLOOR).to(getattr(torch, self.dtype))}

    def to_host(self, encoded: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {"logp": encoded["logp"].cpu().numpy()}

    def decode(self, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"logp": stored["logp"]}

    def targets(self, decoded: dict[str, np.ndarray], device: torch.device | str,
                tau: float = 1.0) -> dict[str, torch.Tensor]:
        return {"logp": kl.retemper_dense(tensor(decoded["logp"], device), tau)}

    def divergence(self, z: torch.Tensor, targets: dict[str, torch.Tensor], kind: str,
                   tail: str) -> torch.Tensor:
        if kind == "forward":
            return kl.dense_forward_kl(targets["logp"], z.float())
        return kl.divergence(targets["logp"], torch.log_softmax(z.float(), dim=-1), kind)

    def full_logp(self, targets: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The teacher's log-probs over every class, (n, C): what a read-time ensemble combines."""
        return targets["logp"]

    def fidelity(self, full: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        return {"kl": kl.divergence(full, targets["logp"], "forward"), "mass_kept": torch.ones(len(full)),
                "top1": targets["logp"].argmax(-1)}

    def raw_bytes_per_row(self) -> float:
        return self.num_classes * np.dtype(self.dtype).itemsize

    def params(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype}

    def label(self) -> str:
        return f"dense-{self.dtype}"

    @property
    def retemperable(self) -> bool:
        return True

    @property
    def stochastic(self) -> bool:
        return False
