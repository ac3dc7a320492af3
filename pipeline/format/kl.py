"""Divergences and re-tempering of teacher distributions, shared by the encodings and the losses.

logp/logq are log-probabilities (rows, C) unless noted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def retemper_dense(logp: torch.Tensor, tau: float) -> torch.Tensor:
    """Targets cached at temperature Tc moved to T = tau * Tc: log_softmax(logp / tau), (B, C).

    Exact for one teacher or a mean_logprobs ensemble; for mean_probs an approximation."""
    if tau == 1.0:
        return F.log_softmax(logp.float(), dim=-1)  # renormalize what float16 storage rounded
    return F.log_softmax(logp.float() / tau, dim=-1)


def retemper_topk(logp: torch.Tensor, residual: torch.Tensor, num_classes: int,
                  tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k targets moved to T = tau * Tc under the uniform-tail model; also renormalizes.

    Returns log-probs (B, k) and residual (B,) that sum to one over the C classes."""
    k = logp.shape[-1]
    a = logp.float() / tau  # (B, k)
    r = residual.float().clamp(min=0.0)
    if k < num_classes:
        u = r / (num_classes - k)
        b = torch.where(u > 0, torch.log(u) / tau + math.log(num_classes - k),
                        torch.full_like(u, float("-inf")))  # log of total tail mass, (B,)
    else:
        b = torch.full_like(r, float("-inf"))
    log_z = torch.logsumexp(torch.cat([a, b[:, None]], dim=-1), dim=-1)  # (B,)
    return a - log_z[:, None], (b - log_z).exp()


# ---------------------------------------------------------------------------------------------
# Any encoding: reverse KL and JSD, losses of a chunk of rows, chunked logits for vocabularies


def topk_full_logp(ids: torch.Tensor, logp: torch.Tensor, residual: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Teacher log-probs over all C classes under the uniform-tail model, (n, C).

    Only ever built for one chunk of rows at a time, the size of the student's own logits."""
    k = ids.shape[-1]
    if k < num_classes:
        u = (residual.float().clamp(min=0) / (num_classes - k)).clamp(min=1e-30).log()  # (n,)
    else:
        u = torch.full_like(residual.float(), float("-inf"))
    full = u[:, None].expand(-1, num_classes).clone()
    return full.scatter_(-1, ids.long(), logp.float())  # in place: one (n, C) tensor, not two


def divergence(teacher_logp: torch.Tensor, student_logq: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-row forward KL(p||q), reverse KL(q||p) or Jensen-Shannon divergence, (n,).

    Only the exponentials a divergence uses are taken: for a chunk of token rows each is a
    (rows, vocab) tensor that autograd keeps until the backward pass."""
    if kind == "forward":
        p = teacher_logp.exp()
        return (torch.xlogy(p, p) - p * student_logq).sum(-1)
    if kind == "reverse":
        return (student_logq.exp() * (student_logq - teacher_logp)).sum(-1)
    if kind == "jsd":
        p, q = teacher_logp.exp(), student_logq.exp()
        logm = torch.logaddexp(teacher_logp, student_logq) - math.log(2.0)
        return 0.5 * ((torch.xlogy(p, p) - p * logm).sum(-1) + (q * (student_logq - logm)).sum(-1))
    raise ValueError(f"divergence {kind!r}: use forward, reverse or jsd")

