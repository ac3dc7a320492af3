"""Divergences and re-tempering of teacher distributions, shared by the encodings and the losses.

logp/logq are log-probabilities (rows, C) unless noted.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


def retemper_dense(logp: torch.Tensor, tau: float) -> torch.Tensor:
    """Targets cached at temperature Tc moved to T = tau * Tc: log_softmax(logp / tau), (B, C).

    Exact for one teacher or a mean_logprobs ensemble; for mean_probs an approximation."""
    if tau == 1.0:
        return F.log_softmax(logp.float(), dim=-1)  # renormalize what float16 storage rounded
    return F.log_softmax(logp.float() / tau, dim=-1)


def retemper_topk(logp: torch.Tensor, residual: torch.Tensor, num_classes: int, tau: float,
                  tail_mean: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k targets moved to T = tau * Tc; also renormalizes. The head's ratios are exact; its mass
    at T needs the tail's sum of p^(1/tau), which `log_tail_power` models (uniform without
    `tail_mean`).

    Returns log-probs (B, k) and residual (B,) that sum to one over the C classes."""
    k, beta = logp.shape[-1], 1.0 / tau
    lp, r = logp.float(), residual.float().clamp(min=0.0)  # (B, k), (B,)
    if beta == 1.0:  # the cache's own temperature: renormalized only (log-probs <= 0: no overflow)
        r = r if k < num_classes else torch.zeros_like(r)  # the head is every class: no tail
        z = lp.exp().sum(-1) + r  # (B,)
        return lp - z.log()[:, None], r / z
    a = lp * beta  # (B, k)
    if k < num_classes:
        b = log_tail_power(r.log(), tail_mean, lp.min(-1).values, num_classes - k, beta)  # (B,)
    else:
        b = torch.full_like(r, float("-inf"))
    log_z = torch.logsumexp(torch.cat([a, b[:, None]], dim=-1), dim=-1)  # (B,)
    return a - log_z[:, None], (b - log_z).exp()


def log_tail_power(log_r: torch.Tensor, tail_mean: torch.Tensor | None, head_min: torch.Tensor, n: int,
                   beta: float) -> torch.Tensor:
    """log of sum over the n tail classes of p^beta, (B,), from the tail's mass R = exp(log_r), its
    probability-weighted mean log-prob m = sum p log p / R (`tail_mean`; None or NaN: unknown) and
    the smallest head log-prob (every tail log-prob lies below it).

    The tail model (docs/encodings.md#re-tempering): f(beta) = log sum p^beta is convex with
    f(0) = log n, f(1) = log R, f'(1) = m. Colder (beta > 1): the tail's mass falls off
    exponentially below the head's smallest log-prob a, f = log R + (beta - 1) a
    - log(1 + (beta - 1)(a - m)), the shape of a Zipf tail. Hotter (beta < 1): the tail's
    log-probs are normal over its n classes (a log-normal tail), f quadratic through f(0), f(1) and
    f'(1). Both are clamped to the bounds every tail obeys: between the uniform tail of mass R and
    R * exp((beta - 1) a). Without m: the uniform tail."""
    log_n = math.log(n)
    uniform = (1.0 - beta) * log_n + beta * log_r  # the largest sum for beta < 1, the smallest for beta > 1
    if tail_mean is None or beta == 1.0:
        return uniform
    m, a = tail_mean.float(), head_min.float()
    edge = log_r + (beta - 1.0) * a  # R * a^(beta - 1): the other bound
    if beta > 1.0:
        model = torch.maximum(edge - torch.log1p((beta - 1.0) * (a - m).clamp(min=0.0)), uniform)
    else:
        c = (m - (log_r - log_n)).clamp(min=0.0)  # curvature: >= 0 as f is convex
        model = torch.minimum(torch.maximum(log_n + (log_r - log_n - c) * beta + c * beta * beta, edge), uniform)
    return torch.where(torch.isfinite(m) & (log_r > float("-inf")), model, uniform)


def retemper_draws(counts: torch.Tensor, logp: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-normalised importance weights that move draws x ~ p (at Tc) to q = p^beta / Z, beta =
    1 / tau: w_j = c_j p_j^(beta - 1) / sum c p^(beta - 1) over the distinct draws (counts c, log-probs
    `logp`, (B, S); padding has count 0). Also log of sum c p^(beta - 1) / sum c, (B,): unbiased (in
    its exp) for E_p[p^(beta - 1)] = sum over the drawn-from classes of p^beta.

    Self-normalising makes sum w q-estimates biased by O(1/draws) (a ratio of two unbiased sums),
    with the bias and variance growing as p and q part: for beta < 1 (hotter) the draws seldom
    reach the classes q weighs up."""
    c = counts.float()
    lw = (1.0 / tau - 1.0) * logp.float() + c.log()  # (B, S), -inf on padding
    lse = torch.logsumexp(lw, dim=-1)  # (B,)
    return (lw - lse[:, None]).exp(), lse - c.sum(-1).log()


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The student's logits at temperature T in float32, (n, C): what an encoding's `divergence`
    takes (softmax of it is the student's distribution); at T = 1 (and float32) the logits
    themselves, with no (n, C) copy."""
    z = logits.float()
    return z if temperature == 1.0 else z / temperature


class _SparseCrossEntropy(torch.autograd.Function):
    """-sum_j p_j log q_j per row for q = softmax(z) (n, C) and a teacher given compactly: u (n,)
    on every class plus w (n, m) at ids (n, m) (w may be negative: a head's p - u). Saves only z;
    the forward pass reads log q from one fused log-softmax (a temporary), the backward pass makes
    the gradient, (sum_j p_j) q - p, as one (n, C) tensor from one fused softmax, as cross-entropy's
    own. (With a logsumexp and row sums instead: 2.25 ms forward and backward at 512 rows of 1,000
    classes on one thread, against 1.75 this way and cross-entropy's 1.34.)"""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        logq = F.log_softmax(z.float(), dim=-1)  # (n, C), freed on return
        ce = -(w * logq.gather(-1, ids)).sum(-1) - u * logq.sum(-1)
        ctx.save_for_backward(z, ids, w, u)
        return ce

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        z, ids, w, u = ctx.saved_tensors
        mass = w.sum(-1) + u * z.shape[-1]  # the teacher's total, 1 up to rounding
        grad = F.softmax(z.float(), dim=-1)  # q, (n, C): the one full-size tensor
        grad.mul_((g * mass)[:, None]).sub_((g * u)[:, None])
        grad.scatter_add_(-1, ids, -(w * g[:, None]))
        return grad.to(z.dtype), None, None, None


def sparse_cross_entropy(z: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
                         u: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy H(p, softmax(z)) per row (n,) of a teacher p that is u (n,) on every class
    (none when u is None) plus w (n, m) at ids (n, m), from the student's logits z (n, C): the
    forward KL of every compact encoding is this minus the teacher's entropy. Keeps no (n, C)
    tensor beside z for the backward pass, which builds one, the gradient."""
    u = torch.zeros(len(z), device=z.device) if u is None else u.float()
    return _SparseCrossEntropy.apply(z, ids.long(), w.float(), u)


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


def uniform_tail_divergence(z: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor, residual: torch.Tensor,
                            kind: str) -> torch.Tensor:
    """Per-row D(teacher, student) (n,) for a teacher that is exact on the head `ids` (n, k) with
    log-probs `logp` (n, k) and spreads `residual` (n,) evenly over the other C - k classes, from the
    student's logits z (n, C) (log q = log_softmax(z); log-probs do as well): equal to
    `divergence(topk_full_logp(...), log_softmax(z), kind)` without building that (n, C) teacher. The tail's teacher log-prob is one number per row (log u), so a sum over the
    tail is the student-side sum over all classes minus the head's:

        forward  sum_H p (log p - log q) + (C-k) u log u - u (sum_C log q - sum_H log q)
        reverse  sum_C q log q - sum_H q log p - log u (sum_C q - sum_H q)
        jsd      1/2 [sum_H p log p + (C-k) u log u + sum_C q log q
                      - 2 sum_C m~ log m~ + 2 sum_H m~ log m~ - 2 sum_H m log m]
    with m = (p + q) / 2 on the head and m~ = (u + q) / 2 (the tail model's mixture, taken over all
    C classes, then its head terms swapped for the exact ones). Forward KL is one fused
    cross-entropy (`sparse_cross_entropy`); the others hold student-side (n, C) tensors only: log q,
    q, and for JSD m~ and its log."""
    C, k = z.shape[-1], ids.shape[-1]
    u = (residual.float().clamp(min=0) / max(C - k, 1)).clamp(min=1e-30)  # (n,) as topk_full_logp
    logu = u.log()
    logp = logp.float()
    p = logp.exp()
    if kind == "forward":  # the head's p - u at its ids, u everywhere: one fused cross-entropy
        return torch.xlogy(p, p).sum(-1) + (C - k) * u * logu + sparse_cross_entropy(z, ids, p - u[:, None], u)
    logq = F.log_softmax(z.float(), dim=-1)  # (n, C)
    logq_head = logq.gather(-1, ids)  # (n, k)
    q = logq.exp()  # (n, C)
    q_head = logq_head.exp()
    if kind == "reverse":
        q_tail = (q.sum(-1) - q_head.sum(-1)).clamp(min=0)
        return _rowdot(q, logq) - (q_head * logp).sum(-1) - logu * q_tail
    if kind == "jsd":
        m_tilde = 0.5 * (q + u[:, None])  # (n, C)
        m_tilde_head = 0.5 * (q_head + u[:, None])
        m_head = 0.5 * (q_head + p)
        tail_part = (C - k) * u * logu + _rowdot(q, logq) - 2 * _rowdot(m_tilde, m_tilde.log())
        head_part = (torch.xlogy(p, p) + 2 * torch.xlogy(m_tilde_head, m_tilde_head)
                     - 2 * torch.xlogy(m_head, m_head)).sum(-1)
        return 0.5 * (tail_part + head_part)
    raise ValueError(f"divergence {kind!r}: use forward, reverse or jsd")


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) of (n, C) tensors as a batched dot product: no (n, C) product, before or in backward."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).reshape(a.shape[:-1])


def dense_forward_kl(teacher_logp: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || softmax(z)) (n,) of a teacher given over every class (log-probs (n, C)),
    from the student's logits z (n, C): the teacher's negative entropy, a batched dot product, plus
    one soft-label cross-entropy (torch's fused log-softmax). Equal to `divergence(teacher_logp,
    log_softmax(z), "forward")` without its xlogy and (n, C) products (torch.profiler over
    bench/kd_overhead.py's 1,000-class step: xlogy alone took 4.5 ms a step, about cross-entropy's
    whole loss phase; one thread, 512 rows: 5.4 ms forward and backward that way, 3.5 this way)."""
    p = teacher_logp.exp()  # (n, C)
    finite = teacher_logp.clamp(min=torch.finfo(teacher_logp.dtype).min)  # log 0 -> finite: 0 * it stays 0
    return _rowdot(p, finite) + F.cross_entropy(z, p.to(z.dtype), reduction="none")


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

