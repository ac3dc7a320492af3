"""Held-out metrics from predicted probabilities: accuracy, NLL, ECE, agreement with a reference."""

from __future__ import annotations

import numpy as np


def accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    return float((probs.argmax(-1) == y).mean())


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    p = probs[np.arange(len(y)), y]
    return float(-np.log(np.clip(p, 1e-12, None)).mean())


def reliability(probs: np.ndarray, y: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per confidence bin: mean confidence, accuracy and count (equal-width bins over (0, 1])."""
    conf = probs.max(-1)
    correct = (probs.argmax(-1) == y).astype(np.float64)
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins).astype(np.float64)
    safe = np.maximum(count, 1)
    return (np.bincount(which, conf, bins) / safe, np.bincount(which, correct, bins) / safe, count)


def ece(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: sum over bins of |accuracy - confidence| weighted by bin size."""
    conf, acc, count = reliability(probs, y, bins)
    return float((np.abs(acc - conf) * count).sum() / count.sum())


def agreement(probs: np.ndarray, reference: np.ndarray) -> float:
    return float((probs.argmax(-1) == reference.argmax(-1)).mean())


def all_metrics(probs: np.ndarray, y: np.ndarray, reference: np.ndarray, bins: int) -> dict[str, float]:
    return {"accuracy": accuracy(probs, y), "nll": nll(probs, y), "ece": ece(probs, y, bins),
            "agreement": agreement(probs, reference)}
