"""TopK: the k most probable classes exactly, plus the mass outside them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from pipeline.format import kl
from pipeline.format.encodings.base import (
    LOGP_FLOOR,
    Column,
    delta_code,
    dequantize_logp,
    dequantize_mass,
    float16_or_nan,
    head_divergence,
    head_problems,
    head_targets,
    id_bytes,
    id_columns,
    id_store,
    legacy_ids,
    pack_ids,
    quantize,
    tail_summary,
    unpack_ids,
)


@dataclass(frozen=True)
class TopK:
    """The k most probable classes exactly, plus the mass outside them; the student models the tail.

    bits=16: ids most probable first, float16 log-probs and residual. bits=8: ids ascending and
    delta-coded, log-probs and the residual's log as uint8 steps of logp_range / 255 below zero.
    Both keep the tail's probability-weighted mean log-prob (float16), which sizes the tail at
    another temperature (kl.log_tail_power); format 2 caches have none (`tail_mean` False) and
    re-temper under the uniform-tail model."""

    name: ClassVar[str] = "topk"
    num_classes: int
    k: int
    bits: int = 16
    logp_range: float = 16.0
    ids: str = ""  # id storage; "" means the vocabulary's width (id_store)
    tail_mean: bool = True  # the tail_mean_logp column (format 3); hybrid's head has none

    def __post_init__(self) -> None:
        if not self.ids:
            object.__setattr__(self, "ids", id_store(self.num_classes))

    @classmethod
    def from_params(cls, p: dict[str, Any], num_classes: int, version: int) -> TopK:
        ids = legacy_ids(num_classes) if version == 1 else p.get("ids", "")
        return cls(num_classes, int(p["k"]), int(p.get("bits", 16)), float(p.get("logp_range", 16.0)), ids,
                   version >= 3 and bool(p.get("tail_mean", True)))

    def problems(self) -> list[str]:
        return head_problems(self.k, self.bits, self.logp_range, self.num_classes, self.num_classes)

    def columns(self) -> list[Column]:
        order = "ascending, delta-coded" if self.bits == 8 else "most probable first"
        logp = "uint8 q, logp = -q * logp_range / 255" if self.bits == 8 else "float16"
        cols = [*id_columns(self.ids, "ids", "rank", f"class ids of the k most probable classes, {order}, (rows, k)"),
                Column("logp", ("row", "rank"), f"log-probabilities of those classes at the cached temperature ({logp})"),
                Column("residual", ("row",), "probability mass outside the top k (the tail), (rows,)"
                       + (" as uint8 q, mass = exp(-q * logp_range / 255), 255 = none" if self.bits == 8 else ""))]
        if self.tail_mean:
            cols.append(Column("tail_mean_logp", ("row",), "sum of p log p over the tail over its mass: the tail's "
                               "mean log-prob at the cached temperature (float16; NaN when unknown, 0 without a "
                               "tail); sizes the tail at other temperatures"))
        return cols

    def encode(self, logp: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return self.encode_head(logp, *logp.topk(self.k, dim=-1))

    def encode_head(self, logp: torch.Tensor, vals: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored head from the top-k values and ids (B, k), most probable first."""
        if self.k < logp.shape[-1]:
            residual, tail_mean = tail_summary(logp, ids)
        else:
            residual = tail_mean = torch.zeros(logp.shape[0], device=logp.device)
        extra = {"tail_mean_logp": tail_mean.half()} if self.tail_mean else {}
        if self.bits == 8:  # quantized on the device: a quarter of the bytes cross to the host
            ids, order = ids.sort(dim=-1)
            vals = vals.gather(-1, order)
            return {"ids": delta_code(ids), "logp": quantize(-vals, self.logp_range),
                    "residual": quantize(-residual.clamp(min=1e-30).log(), self.logp_range), **extra}
        return {"ids": ids, "logp": vals.clamp(min=LOGP_FLOOR).half(), "residual": residual.half(), **extra}

    def to_host(self, encoded: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        out = {k: v.cpu().numpy() for k, v in encoded.items() if k != "ids"}
        if self.tail_mean:  # top-k given without the distribution (CacheWriter.add(topk=...)): unknown
            out["tail_mean_logp"] = float16_or_nan(out.get("tail_mean_logp"), len(out["residual"]))
        return {**pack_ids(encoded["ids"].cpu().numpy(), self.ids, "ids"), **out}

    def decode(self, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """ids int32; 16-bit values as stored (float16: `targets` widens them where the loss runs),
        8-bit ones dequantized to float32."""
        ids = unpack_ids(stored, self.ids, "ids", delta=self.bits == 8)
        extra = {"tail_mean_logp": stored["tail_mean_logp"]} if self.tail_mean else {}
        if self.bits != 8:
            return {"ids": ids, "logp": stored["logp"], "residual": stored["residual"], **extra}
        return {"ids": ids, "logp": dequantize_logp(stored["logp"], self.logp_range),
                "residual": dequantize_mass(stored["residual"], self.logp_range), **extra}

    def targets(self, decoded: dict[str, np.ndarray], device: torch.device | str,
                tau: float = 1.0) -> dict[str, torch.Tensor]:
        return head_targets(decoded, self.num_classes, device, tau)

    def divergence(self, z: torch.Tensor, targets: dict[str, torch.Tensor], kind: str,
                   tail: str) -> torch.Tensor:
        return head_divergence(z, targets, kind, tail)

    def full_logp(self, targets: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Log-probs over every class, (n, C), the residual spread uniformly over the tail."""
        return kl.topk_full_logp(targets["ids"], targets["logp"], targets["residual"], self.num_classes)

    def fidelity(self, full: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        ids = targets["ids"]
        cached = kl.topk_full_logp(ids, targets["logp"], targets["residual"], self.num_classes)
        return {"kl": kl.divergence(full, cached, "forward"), "mass_kept": full.exp().gather(-1, ids).sum(-1),
                "top1": ids.gather(-1, targets["logp"].argmax(-1, keepdim=True)).squeeze(-1)}

    def raw_bytes_per_row(self) -> float:
        return id_bytes(self.ids, self.k) + (self.k + 1) * (1 if self.bits == 8 else 2) + 2 * self.tail_mean

    def params(self) -> dict[str, Any]:
        p: dict[str, Any] = {"name": self.name, "k": self.k, "bits": self.bits, "ids": self.ids}
        if not self.tail_mean:
            p["tail_mean"] = False
        return {**p, "logp_range": self.logp_range} if self.bits == 8 else p

    def label(self) -> str:
        return f"topk-k{self.k}" + ("-q8" if self.bits == 8 else "")

    @property
    def retemperable(self) -> bool:
        return True

    @property
    def stochastic(self) -> bool:
        return False
