"""Held-out metrics: accuracy, NLL, expected calibration error, agreement with a reference model.

Everything is computed from per-example summaries (predicted class, its probability, and the
log-probability of the true class), so token-level evaluation never holds (tokens, vocab) arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.models.ensemble import combine, token_logits


@dataclass(frozen=True)
class Summary:
    pred: np.ndarray  # (N,) argmax class
    conf: np.ndarray  # (N,) its probability
    logp_true: np.ndarray  # (N,) log-probability of the true class

    @staticmethod
    def of(logp: torch.Tensor, y: torch.Tensor) -> Summary:
        """From log-probabilities (..., C) and labels (...)."""
        logp = logp.reshape(-1, logp.shape[-1]).float()
        conf, pred = logp.max(-1)
        return Summary(pred.numpy(), conf.exp().numpy(), logp.gather(-1, y.reshape(-1, 1)).squeeze(-1).numpy())

    @staticmethod
    def concat(parts: list[Summary]) -> Summary:
        return Summary(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("pred", "conf", "logp_true")))


def summaries(models: list[torch.nn.Module], x: np.ndarray, y: np.ndarray, batch: int,
              ensemble: tuple[str, list[float]] | None = None, logit_rows: int = 2048) -> list[Summary]:
    """Per-example (or per-token) summaries of each model (in eval mode), plus the ensemble's last
    when asked as (mode, weights). x (N, ...) inputs, y (N,) or (N, L) labels. Language models
    (y (N, L)) get their logits `logit_rows` token rows at a time, never (batch, L, V) at once."""
    parts: list[list[Summary]] = [[] for _ in range(len(models) + (ensemble is not None))]
    with torch.no_grad():
        for b in range(0, len(x), batch):
            # np.array: rows of a read-only mapped input are copied, never aliased by a tensor
            xb, yb = torch.from_numpy(np.array(x[b:b + batch])), torch.from_numpy(np.array(y[b:b + batch]))
            if yb.ndim == 2:  # tokens: per chunk of rows, sequence-major like yb.reshape(-1)
                dev = next(models[0].parameters()).device
                chunks = token_logits(models, xb.to(dev), logit_rows)
                labels = yb.reshape(-1)
            else:
                chunks = iter([(slice(None), [m(xb.to(next(m.parameters()).device)) for m in models])])
                labels = yb
            for rows, logits in chunks:
                logits = [z.float().cpu() for z in logits]  # each (rows, C)
                for i, z in enumerate(logits):
                    parts[i].append(Summary.of(torch.log_softmax(z, -1), labels[rows]))
                if ensemble is not None:
                    parts[-1].append(Summary.of(combine(logits, ensemble[0], ensemble[1], 1.0), labels[rows]))
    return [Summary.concat(p) for p in parts]


def reliability(conf: np.ndarray, correct: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per confidence bin: mean confidence, accuracy and count (equal-width bins over (0, 1])."""
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins).astype(np.float64)
    safe = np.maximum(count, 1)
    return (np.bincount(which, conf, bins) / safe, np.bincount(which, correct.astype(np.float64), bins) / safe, count)


def ece(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: sum over bins of |accuracy - confidence| weighted by bin size."""
    c, acc, count = reliability(conf, correct, bins)
    return float((np.abs(acc - c) * count).sum() / count.sum())


def all_metrics(s: Summary, y: np.ndarray, reference: Summary, bins: int) -> dict[str, float]:
    correct = s.pred == y.reshape(-1)
    nll = float(-np.clip(s.logp_true, -1e9, None).mean())
    return {"accuracy": float(correct.mean()), "nll": nll, "ece": ece(s.conf, correct, bins),
            "agreement": float((s.pred == reference.pred).mean())}

