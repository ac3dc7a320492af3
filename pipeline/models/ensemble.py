"""The teacher ensemble: where each teacher's weights live, loading them, and combining outputs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.core import specs
from pipeline.core.config import Config
from pipeline.core.errors import ModelError
from pipeline.core.io import file_digest, hash_json, tree_digest
from pipeline.core.specs import ModelSpec
from pipeline.inputs.arrays import Splits
from pipeline.models.builders import architecture, build_model, load_state

TEACHER_FORMAT = 1


@dataclass(frozen=True)
class TeacherRef:
    index: int
    spec: ModelSpec
    checkpoint: Path
    trained_here: bool  # built-in teachers are fitted by the `teachers` stage

    @property
    def where(self) -> str:
        return f"teachers.members.{self.index}"


def teacher_refs(cfg: Config, splits: Splits) -> list[TeacherRef]:
    refs = []
    for i, spec in enumerate(cfg.teachers.members):
        if not spec.trained_here:
            assert spec.weights is not None  # validated with the config
            refs.append(TeacherRef(i, spec, Path(spec.weights), trained_here=False))
        else:
            identity = {"format": TEACHER_FORMAT, "spec": _spec_dict(spec), "train": splits.train.fingerprint,
                        "classes": splits.num_classes, "fit": training_settings(cfg, spec)}
            if splits.vocab:
                identity["vocab"] = splits.vocab
            key = hash_json(identity)[:12]
            path = cfg.teacher_dir / f"{spec.name}-{key}" / "model.pt"
            refs.append(TeacherRef(i, spec, path, trained_here=True))
    return refs


def training_settings(cfg: Config, spec: ModelSpec) -> dict:
    t = cfg.teachers
    return {"epochs": t.epochs if spec.epochs is None else spec.epochs,
            "lr": t.lr if spec.lr is None else spec.lr, "batch_size": t.batch_size,
            "weight_decay": t.weight_decay, "seed": spec.seed}


def _spec_dict(spec: ModelSpec) -> dict:
    """The spec's identity without the student-only fields."""
    d = specs.identity(spec)
    for k in ("temperature", "alpha"):  # student-only fields never change a teacher
        d.pop(k, None)
    return d


def load_teacher(ref: TeacherRef, splits: Splits, device: torch.device) -> nn.Module:
    if ref.trained_here and not ref.checkpoint.is_file():
        raise ModelError(f"{ref.where} ({ref.spec.name}): not trained yet ({ref.checkpoint} missing); "
                         "run `logitcache teachers CONFIG` first")
    arch = architecture(ref.spec)
    if not ref.trained_here:
        arch.check_weights(ref.spec, ref.checkpoint, splits.vocab, ref.where)
    model = build_model(ref.spec, splits.input_shape, splits.num_classes, ref.where)
    if not arch.builds_weights:
        load_state(model, ref.checkpoint, ref.where)
    return model.to(device).eval()


def teacher_identity(ref: TeacherRef, num_classes: int) -> dict:
    """What the cache id needs from a teacher: its spec, the hash of its exact weights and what its
    architecture adds (an imported model's source hash, a padded output layer's width)."""
    if not ref.checkpoint.exists():
        field = ref.spec.weights_field or "checkpoint"
        if ref.trained_here:
            raise ModelError(f"{ref.where} ({ref.spec.name}): not trained yet ({ref.checkpoint} missing); "
                             "run `logitcache teachers CONFIG` first")
        raise ModelError(f"{ref.where}.{field}: {ref.checkpoint} does not exist; give the teacher's "
                         + ("model directory" if field == "path" else "state_dict file (torch.save)"))
    digest = tree_digest(ref.checkpoint)[0] if ref.checkpoint.is_dir() else file_digest(ref.checkpoint)
    return {"name": ref.spec.name, "spec": _spec_dict(ref.spec), "checkpoint_sha256": digest,
            **architecture(ref.spec).identity(ref.spec, ref.checkpoint, num_classes, ref.where)}


def normalized_weights(cfg: Config) -> list[float]:
    w = cfg.teachers.weights or tuple(1.0 for _ in cfg.teachers.members)
    total = sum(w)
    return [x / total for x in w]


def combine(logits: list[torch.Tensor], mode: str, weights: list[float], temperature: float) -> torch.Tensor:
    """Ensemble log-probabilities at `temperature` from each teacher's logits (B, C) -> (B, C).

    mean_probs: log of the weighted mean of softmax(z/T) (Hinton et al.);
    mean_logprobs: the renormalized weighted geometric mean.
    """
    if len(logits) == 1:
        return torch.log_softmax(logits[0].float() / temperature, dim=-1)
    logp = torch.stack([torch.log_softmax(z.float() / temperature, dim=-1) for z in logits])  # (M, B, C)
    w = torch.tensor(weights, dtype=logp.dtype, device=logp.device).view(-1, 1, 1)
    if mode == "mean_probs":
        return torch.logsumexp(logp + torch.log(w), dim=0)
    return torch.log_softmax((logp * w).sum(0), dim=-1)


def token_logits(models: list[nn.Module], tokens: torch.Tensor, rows: int,
                 select: torch.Tensor | None = None) -> Iterator[tuple[slice, list[torch.Tensor]]]:
    """Each language model's logits for `tokens` (B, L), `rows` token rows at a time: the trunk runs
    once per batch, the output projection per chunk, so memory is bounded by rows x vocab, never
    B x L x vocab. `select` (flat indices into B x L) keeps only those token rows, in its order.
    Yields (token rows, sequence-major; each model's logits (rows, V))."""
    trunks = []
    for m in models:
        if callable(getattr(m, "hidden", None)) and isinstance(getattr(m, "head", None), nn.Module):
            h = m.hidden(tokens)  # (B, L, d)
            h = h.reshape(-1, h.shape[-1])
            trunks.append((h if select is None else h[select], m.head))
        else:  # no trunk/head split: the whole batch's logits at once (keep its batch small)
            z = m(tokens)  # (B, L, V)
            z = z.reshape(-1, z.shape[-1])
            trunks.append((z if select is None else z[select], None))
    n = trunks[0][0].shape[0]
    for r in range(0, n, rows):
        yield slice(r, min(r + rows, n)), [h[r:r + rows] if head is None else head(h[r:r + rows]) for h, head in trunks]


def check_finite(z: torch.Tensor, name: str, sample_ids: torch.Tensor) -> None:
    lo, hi = torch.aminmax(z, dim=-1)  # NaN propagates to both; no (rows, C) mask is made
    bad = ~(torch.isfinite(lo) & torch.isfinite(hi))
    if bool(bad.any()):
        ids = sample_ids[bad.cpu()][:3].tolist()
        raise ModelError(f"teacher {name}: NaN or infinite outputs for sample ids {ids}; "
                         "check the checkpoint and inputs (nothing was written for this shard)")

