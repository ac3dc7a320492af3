"""Distillation losses as plain functions over student logits and decoded cache targets.

Conventions: student logits (B, C); dense teacher log-probs (B, C); top-k teacher ids and
log-probs (B, k) with the residual mass outside the top k (B,). Teacher targets are at the
student's temperature T already (see `retemper_*`). Every KD term is multiplied by T**2 so its
gradient scale does not change with T (Hinton et al. 2015), and reduced by the batch mean.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from pipeline.encodings import Encoding


def kd_dense(student_logits: torch.Tensor, teacher_logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(p_teacher || q_student) at temperature T, with the full teacher distribution."""
    logq = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, C)
    p = teacher_logp.exp()
    kl = (torch.xlogy(p, p) - p * logq).sum(-1)  # (B,)
    return temperature**2 * kl.mean()


def kd_topk(student_logits: torch.Tensor, ids: torch.Tensor, teacher_logp: torch.Tensor,
            residual: torch.Tensor, temperature: float, tail: str = "uniform") -> torch.Tensor:
    """T^2 * KL from top-k targets; the residual mass is modelled, never dropped.

    tail="uniform": the residual is spread evenly over the C-k classes outside the top k.
    tail="bucket": the C-k classes form one extra bucket whose student mass is their sum.
    """
    logq = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, C)
    num_classes, k = logq.shape[-1], ids.shape[-1]
    ids = ids.long()
    p = teacher_logp.float().exp()  # (B, k)
    r = residual.float()  # (B,)
    logq_top = logq.gather(-1, ids)  # (B, k)
    kl = (torch.xlogy(p, p) - p * logq_top).sum(-1)  # (B,)
    if k < num_classes:
        if tail == "uniform":
            u = r / (num_classes - k)  # each tail class's teacher probability
            logq_tail_sum = logq.sum(-1) - logq_top.sum(-1)  # sum of log q over the tail classes
            kl = kl + (num_classes - k) * torch.xlogy(u, u) - u * logq_tail_sum
        elif tail == "bucket":
            logq_tail = torch.logsumexp(logq.scatter(-1, ids, float("-inf")), dim=-1)  # log Q_tail
            kl = kl + torch.xlogy(r, r) - r * logq_tail
        else:
            raise ValueError(f"tail={tail!r}: use 'uniform' or 'bucket'")
    return temperature**2 * kl.mean()


def hard_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(student_logits.float(), labels)


def mix(kd: torch.Tensor, ce: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """alpha * CE(hard labels) + (1 - alpha) * KD; without labels alpha must be 0."""
    if alpha == 0.0 or ce is None:
        return kd
    if alpha == 1.0:
        return ce
    return alpha * ce + (1.0 - alpha) * kd


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


def kd_loss(student_logits: torch.Tensor, targets: dict[str, torch.Tensor], encoding: Encoding,
            temperature: float, divergence: str = "forward", tail: str = "uniform") -> torch.Tensor:
    """T^2 * mean over rows of D(teacher || student) for targets of any encoding (see
    `Encoding.targets`); student logits (n, C)."""
    logq = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (n, C)
    return temperature**2 * encoding.divergence(logq, targets, divergence, tail).mean()


def row_losses(logits: torch.Tensor, targets: dict[str, torch.Tensor], labels: torch.Tensor | None,
               settings: dict, encoding: Encoding) -> torch.Tensor:
    """Summed loss of a chunk of rows (student logits (n, V)): alpha * CE + (1 - alpha) * T^2 * D."""
    alpha, T = settings["alpha"], settings["temperature"]
    total = logits.new_zeros(())
    if labels is not None and alpha > 0:
        total = total + alpha * F.cross_entropy(logits.float(), labels, reduction="sum")
    if alpha == 1.0:
        return total
    logq = F.log_softmax(logits.float() / T, dim=-1)
    kd = T**2 * encoding.divergence(logq, targets, settings["divergence"], settings["tail"]).sum()
    return total + (1.0 - alpha) * kd


def chunked_loss(hidden: torch.Tensor, head: torch.nn.Module, targets: dict[str, torch.Tensor],
                 labels: torch.Tensor | None, settings: dict, encoding: Encoding, chunk: int) -> torch.Tensor:
    """Mean loss over rows of hidden states (n, d), computing (chunk, V) logits at a time.

    Each chunk is checkpointed, so the (n, V) logits are never held for the backward pass."""
    from torch.utils.checkpoint import checkpoint

    n = hidden.shape[0]
    total = hidden.new_zeros(())
    for s in range(0, n, chunk):
        part = {k: v[s:s + chunk] for k, v in targets.items()}
        lab = labels[s:s + chunk] if labels is not None else None

        def f(h: torch.Tensor, part=part, lab=lab) -> torch.Tensor:
            return row_losses(head(h), part, lab, settings, encoding)

        total = total + (checkpoint(f, hidden[s:s + chunk], use_reentrant=False) if hidden.requires_grad
                         else f(hidden[s:s + chunk]))
    return total / n
