"""How a student reads a cache of per-member targets (cache.members separate or both): which
teachers, their weights, and how their targets meet the student.

    blend = blend_of(cache.manifest, members=["mlp-wide", "cnn"], weights=[2, 1], combine="mean_probs")
    blend.batch(per_member_decoded, "cpu", tau)     # {"targets", "encoding"} or {"members"}

- `mean_probs`, `mean_logprobs`: the ensemble formed at read time, as the cache stage forms it
  (pipeline/models/ensemble.combine) from each member's distribution at the student's temperature.
  Exact for dense members. A top-k member describes its distribution up to its tail, which is
  spread uniformly over the classes outside its top k; the mean over members then covers the
  union of their top-k ids, each member's tail filling the classes it does not hold. The error of
  that against the exact ensemble is what `logitcache caches fidelity` reports for such a cache.
  Drawn encodings (sampled, hybrid) do not describe a distribution and are not combined: use
  per_member.
- `per_member`: one loss per member, weighted (`losses.multi_teacher_loss`): the weighted mean of
  each member's divergence from the student. For the forward KL this has the gradient of the
  forward KL from the mean_probs ensemble (their difference does not depend on the student); for
  the reverse KL and JSD it is a different, per-teacher objective.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.core.config import COMBINE
from pipeline.format.encodings import Dense, Encoding, encoding_from_params
from pipeline.format.members import member_names
from pipeline.models.ensemble import combine as ensemble


@dataclass(frozen=True)
class Blend:
    names: tuple[str, ...]  # the members read, in the cache's order of teachers
    weights: tuple[float, ...]  # one per member, summing to 1
    combine: str  # mean_probs | mean_logprobs | per_member
    encodings: tuple[Encoding, ...]  # each member's stored encoding

    def to_json(self) -> dict[str, Any]:
        return {"members": list(self.names), "weights": [round(w, 12) for w in self.weights], "combine": self.combine}

    @property
    def encoding(self) -> Encoding:
        """The encoding of the targets a batch carries: dense for a read-time ensemble (over every
        class), else the members' own."""
        if self.combine == "per_member":
            return self.encodings[0]
        return Dense(self.encodings[0].num_classes, "float32")

    def combined(self, targets: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
        """The read-time ensemble's log-probs (n, C) from each member's targets."""
        full = [enc.full_logp(t) for enc, t in zip(self.encodings, targets)]
        return ensemble(full, self.combine, list(self.weights), 1.0)  # members' log-probs: T = 1

    def batch(self, decoded: dict[str, dict[str, np.ndarray]], device: torch.device | str,
              tau: float) -> dict[str, Any]:
        """A batch's targets from each member's decoded rows, re-tempered by `tau` member by member
        (so a read-time ensemble at the student's T is the ensemble of the members at that T):
        {"targets": {"logp": (n, C)}, "encoding": Dense} for an ensemble; {"members": {name:
        {"targets", "weight", "encoding"}}} for per_member (what kd_loss needs)."""
        per = [enc.targets(decoded[n], device, tau) for n, enc in zip(self.names, self.encodings)]
        if self.combine == "per_member":
            return {"members": {n: {"targets": t, "weight": w, "encoding": enc}
                                for n, t, w, enc in zip(self.names, per, self.weights, self.encodings)}}
        return {"targets": {"logp": self.combined(per)}, "encoding": self.encoding}


def blend_of(manifest: dict[str, Any], members: Sequence[str] | None = None, weights: Sequence[float] | None = None,
             combine: str | None = None) -> Blend | None:
    """How to read a cache: None for its own targets (a plain cache, or the ensemble a `both`
    cache stores, when nothing is asked); else its `members` (default all) with `weights` (default
    the cache's, renormalized over them) combined by `combine` (default the cache's ensemble mode).
    Raises ValueError("field: why; what to do")."""
    names_all = member_names(manifest)
    if not names_all:
        if members or weights is not None or combine is not None:
            raise ValueError("members: this cache holds the combined ensemble only (cache.members combined); "
                             "per-member reading needs a cache made with cache.members separate or both")
        return None
    if not members and weights is None and combine is None and manifest.get("members") == "both":
        return None
    names = tuple(members) if members else tuple(names_all)
    unknown = [n for n in names if n not in names_all]
    if unknown:
        raise ValueError(f"members: {unknown[0]!r} is not a teacher of this cache; give some of {', '.join(names_all)}")
    if len(set(names)) != len(names):
        raise ValueError("members: a name repeats; give each teacher once")
    names = tuple(n for n in names_all if n in names)  # the cache's order: the same ensemble for any order
    if weights is None:
        mine = dict(zip(manifest["teachers"], manifest["spec"]["weights"]))
        raw = [mine[n] for n in names]
    else:
        if len(weights) != len(names):
            raise ValueError(f"weights: {len(weights)} weights for {len(names)} members ({', '.join(names)})")
        given = dict(zip(members or names_all, weights))
        raw = [float(given[n]) for n in names]
    if any(w < 0 for w in raw) or sum(raw) <= 0:
        raise ValueError("weights: must be non-negative with a positive sum")
    mode = combine if combine is not None else manifest["ensemble"]
    if mode not in COMBINE:
        raise ValueError(f"combine: {mode!r} is not one of {', '.join(COMBINE)}")
    units = {u["name"]: u for u in manifest["units"]}
    C = int(manifest["spec"]["num_classes"])
    encodings = tuple(encoding_from_params(units[n]["encoding"], C) for n in names)
    if mode != "per_member" and not all(_describes(enc) for enc in encodings):
        raise ValueError(f"combine: {encodings[0].label()} targets are draws, which do not describe a distribution "
                         "to ensemble at read time; use combine per_member (its forward KL has the mean_probs "
                         "ensemble's gradient)")
    total = sum(raw)
    return Blend(names, tuple(w / total for w in raw), mode, encodings)


def _describes(enc: Encoding) -> bool:
    """Whether `enc` gives a distribution over every class (Encoding.full_logp), tried on one row."""
    logp = torch.log_softmax(torch.zeros(1, enc.num_classes), -1)
    stored = enc.to_host(enc.encode(logp, torch.Generator().manual_seed(0)))
    return enc.full_logp(enc.targets(enc.decode(stored), "cpu")) is not None
