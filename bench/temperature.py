"""Students at another temperature than the cache's: the bias and variance of each encoding's
re-tempered targets, against the full teacher distribution at that temperature.

The teacher: next-token-like distributions over a 32k vocabulary (bench/common.py lm_logits: Zipf
over a per-row shuffled vocabulary plus Gaussian noise; top-1 mass ~0.4), cached at T = 1. The
student: the teacher's log-probs plus unit Gaussian noise, a softmax away (as in bytes.py). Each
encoding stores the rows once per seed (`--seeds` independent draws for sampled and hybrid; once for
the deterministic ones), then serves them at T = 0.5, 1, 2 and 4 (`Encoding.targets`, as a student's
dataset does). Per row r, the loss is the student's KD term T^2 * D(teacher || student) at T
(forward KL; top-k with the uniform tail, `student.tail`'s default), L_r exactly from the full
distribution, L^_r from the cache; g_r and g^_r its gradients with respect to the student's logits.
Over rows and seeds:
  - bias_rel = (mean_r E[L^_r] - mean_r L_r) / mean_r L_r: the relative bias of the batch loss;
  - var_rel = mean_r Var[L^_r] / mean_r L_r^2: the per-row variance across draws, relative;
  - grad_bias_rel = sqrt(sum_r |E[g^_r] - g_r|^2 / sum_r |g_r|^2): the gradient's relative bias
    (its square less the noise the finite seeds leave in the mean, sum_r tr Var[g^_r] / seeds);
  - grad_var_rel = sum_r E|g^_r - E[g^_r]|^2 / sum_r |g_r|^2: its relative variance per row;
  - bias_se: the standard error of bias_rel from the finite seeds (0 for deterministic encodings).
E and Var are over the seeds. One JSON line per encoding; `topk-k32-uniform-tail` is top-k as
format 2 stored it (no tail mean: the uniform-tail model at other temperatures). `bytes_per_row`:
the compressed chunk bytes per row of the rows written as one Zarr shard (zstd, as bytes.py
measures), in format 3 and without what it adds for re-tempering (format 2's columns).

    .venv/bin/python bench/temperature.py [--rows 256] [--seeds 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bytes import stored_bytes
from common import line, lm_logits, record, workdir

from pipeline.format.encodings import Dense, Hybrid, Sampled, TopK

VOCAB = 32_000
TEMPERATURES = (0.5, 1.0, 2.0, 4.0)


def encodings() -> dict[str, object]:
    return {"dense-float16": Dense(VOCAB), "topk-k32": TopK(VOCAB, 32), "topk-k32-q8": TopK(VOCAB, 32, 8),
            "topk-k32-uniform-tail": TopK(VOCAB, 32, tail_mean=False), "sampled-n64": Sampled(VOCAB, 64),
            "hybrid-k8-n32": Hybrid(VOCAB, 8, 32), "hybrid-k8-n32-q8": Hybrid(VOCAB, 8, 32, 8)}


def loss_and_grad(enc, targets: dict[str, torch.Tensor], student: torch.Tensor,
                  T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row T^2 * D(teacher || student) (n,) and its gradient w.r.t. the student's logits (n, V)."""
    s = student.detach().requires_grad_()
    logq = torch.log_softmax(s / T, dim=-1)
    loss = T**2 * enc.divergence(logq, targets, "forward", "uniform")
    (grad,) = torch.autograd.grad(loss.sum(), s)  # rows are independent: row r's gradient is its own loss's
    return loss.detach(), grad


def measure(enc, logp: torch.Tensor, student: torch.Tensor, exact: dict[float, tuple[torch.Tensor, torch.Tensor]],
            seeds: int) -> list[dict[str, float]]:
    runs = seeds if enc.stochastic else 1
    sums = {T: [torch.zeros(len(logp), dtype=torch.float64), torch.zeros(len(logp), dtype=torch.float64),
                torch.zeros_like(student, dtype=torch.float64), torch.zeros_like(student, dtype=torch.float64)]
            for T in TEMPERATURES}
    for seed in range(runs):
        decoded = enc.decode(enc.to_host(enc.encode(logp, torch.Generator().manual_seed(seed))))
        for T in TEMPERATURES:
            loss, grad = loss_and_grad(enc, enc.targets(decoded, "cpu", T), student, T)
            acc = sums[T]
            acc[0] += loss
            acc[1] += loss.double() ** 2
            acc[2] += grad
            acc[3] += grad.double() ** 2
    rows = []
    for T in TEMPERATURES:
        L, g = exact[T][0].double(), exact[T][1].double()
        s1, s2, g1, g2 = sums[T]
        mean, gmean = s1 / runs, g1 / runs
        var = (s2 / runs - mean**2).clamp(min=0) * runs / max(runs - 1, 1)  # per row, across seeds
        gvar = ((g2 / runs - gmean**2).clamp(min=0) * runs / max(runs - 1, 1)).sum(-1)
        bias2 = ((gmean - g).pow(2).sum() - gvar.sum() / runs).clamp(min=0)  # less the mean's own noise
        rows.append({"T": T,
                     "bias_rel": (mean.mean() - L.mean()).item() / L.mean().item(),
                     "var_rel": var.mean().item() / (L**2).mean().item(),
                     "grad_bias_rel": (bias2 / g.pow(2).sum()).sqrt().item(),
                     "grad_var_rel": gvar.sum().item() / g.pow(2).sum().item(),
                     "bias_se": (var.mean().item() / runs / len(L)) ** 0.5 / L.mean().item()})
    return [{k: v if k == "T" else float(f"{v:.4g}") for k, v in r.items()} for r in rows]


def format2(enc):
    """The encoding without the columns format 3 added for re-tempering."""
    if isinstance(enc, TopK):
        return dataclasses.replace(enc, tail_mean=False)
    return dataclasses.replace(enc, draw_logp=False) if isinstance(enc, (Sampled, Hybrid)) else enc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256, help="teacher distributions (token rows)")
    ap.add_argument("--seeds", type=int, default=8, help="independent draws of sampled and hybrid caches")
    args = ap.parse_args()
    z = lm_logits(args.rows, VOCAB)  # teacher logits, cached at T = 1
    logp = torch.log_softmax(z, -1)
    student = logp + torch.randn(logp.shape, generator=torch.Generator().manual_seed(99))
    exact = {T: loss_and_grad(Dense(VOCAB, "float32"), {"logp": torch.log_softmax(z / T, -1)}, student, T)
             for T in TEMPERATURES}  # the full distribution at T
    d = workdir("temperature")
    for label, enc in encodings().items():
        rows = measure(enc, logp, student, exact, args.seeds)
        stored = {"format3": round(stored_bytes(enc, logp, d / "shards" / f"{label}-3.zarr"), 1),
                  "format2": round(stored_bytes(format2(enc), logp, d / "shards" / f"{label}-2.zarr"), 1)}
        shutil.rmtree(d)
        record(f"temperature-{label}", line("temperature", encoding=label, bytes_per_row=stored,
                                            raw_bytes_per_row=enc.raw_bytes_per_row(), rows_cached=args.rows,
                                            seeds=args.seeds if enc.stochastic else 1, rows=rows))


if __name__ == "__main__":
    main()
