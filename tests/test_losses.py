"""Each loss against the same quantity computed the slow way from full teacher outputs."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.format.encodings import TopK
from pipeline.format.kl import retemper_dense, retemper_topk
from pipeline.train import losses


def slow_kl(p_rows: list[list[float]], q_rows: list[list[float]]) -> float:
    """Mean over rows of sum_c p log(p / q), in float64 Python loops."""
    total = 0.0
    for p, q in zip(p_rows, q_rows):
        total += sum(pc * math.log(pc / qc) for pc, qc in zip(p, q) if pc > 0)
    return total / len(p_rows)


def softmax_rows(z: torch.Tensor, T: float) -> list[list[float]]:
    out = []
    for row in z.double().tolist():
        m = max(v / T for v in row)
        e = [math.exp(v / T - m) for v in row]
        s = sum(e)
        out.append([v / s for v in e])
    return out


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 10, generator=g) * 3, torch.randn(6, 10, generator=g)  # teacher, student


@pytest.mark.parametrize("T", [1.0, 2.5, 4.0])
def test_kd_dense_matches_slow_reference(logits, T):
    z, s = logits
    p = softmax_rows(z, T)
    q = softmax_rows(s, T)
    expected = T**2 * slow_kl(p, q)
    got = losses.kd_dense(s, torch.log_softmax(z / T, -1), T)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def _topk_reference(z: torch.Tensor, s: torch.Tensor, k: int, T: float, tail: str) -> float:
    p = softmax_rows(z, T)
    q = softmax_rows(s, T)
    C = z.shape[1]
    ps, qs = [], []
    for prow, qrow in zip(p, q):
        top = sorted(range(C), key=lambda c: -prow[c])[:k]
        rest = [c for c in range(C) if c not in top]
        r = sum(prow[c] for c in rest)
        if tail == "uniform":  # the tail spread evenly: a full C-class distribution
            ps.append([prow[c] if c in top else r / len(rest) for c in range(C)])
            qs.append(qrow)
        else:  # k + 1 buckets
            ps.append([prow[c] for c in top] + [r])
            qs.append([qrow[c] for c in top] + [sum(qrow[c] for c in rest)])
    return T**2 * slow_kl(ps, qs)


@pytest.mark.parametrize("tail", ["uniform", "bucket"])
@pytest.mark.parametrize("k", [1, 3, 9])
def test_kd_topk_models_the_tail_like_the_slow_reference(logits, tail, k):
    z, s = logits
    T = 2.0
    logp = torch.log_softmax(z / T, -1)
    vals, ids = logp.topk(k, -1)
    residual = 1 - vals.exp().sum(-1)
    got = losses.kd_topk(s, ids, vals, residual, T, tail)
    assert float(got) == pytest.approx(_topk_reference(z, s, k, T, tail), rel=1e-5)


def test_kd_topk_with_every_class_equals_dense(logits):
    z, s = logits
    logp = torch.log_softmax(z / 3, -1)
    vals, ids = logp.topk(10, -1)
    got = losses.kd_topk(s, ids, vals, torch.zeros(6), 3.0)
    assert float(got) == pytest.approx(float(losses.kd_dense(s, logp, 3.0)), rel=1e-6)


def test_kd_topk_gradient_pushes_tail_mass_not_to_zero(logits):
    """Dropping the tail would let q's tail go to 0; modelling it keeps a finite optimum there."""
    z, _ = logits
    T = 1.0
    logp = torch.log_softmax(z, -1)
    vals, ids = logp.topk(3, -1)
    residual = 1 - vals.exp().sum(-1)
    s = torch.zeros(6, 10, requires_grad=True)
    opt = torch.optim.SGD([s], lr=2.0)
    for _ in range(3000):
        opt.zero_grad()
        losses.kd_topk(s, ids, vals, residual, T, "bucket").backward()
        opt.step()
    q = torch.softmax(s.detach(), -1)
    tail_q = 1 - q.gather(-1, ids).sum(-1)
    assert torch.allclose(tail_q, residual, atol=1e-3)


def test_mix_weights_hard_and_soft(logits):
    z, s = logits
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    kd = losses.kd_dense(s, torch.log_softmax(z / 2, -1), 2.0)
    ce = losses.hard_ce(s, y)
    slow_ce = -sum(math.log(row[c]) for row, c in zip(softmax_rows(s, 1.0), y.tolist())) / 6
    assert float(ce) == pytest.approx(slow_ce, rel=1e-5)
    assert float(losses.mix(kd, ce, 0.3)) == pytest.approx(0.3 * float(ce) + 0.7 * float(kd), rel=1e-6)
    assert float(losses.mix(kd, ce, 0.0)) == float(kd)


def test_retemper_dense_is_exact_for_one_teacher(logits):
    z, _ = logits
    cached = torch.log_softmax(z / 2.0, -1)  # cached at Tc = 2
    moved = retemper_dense(cached, 4.0 / 2.0)  # student wants T = 4
    assert torch.allclose(moved, torch.log_softmax(z / 4.0, -1), atol=1e-6)


@pytest.mark.parametrize("tau,k,scale", [(1.7, 4, 1.0), (1.0, 4, 1.0), (1.0, 4, 1.03), (1.0, 10, 1.03)])
def test_retemper_topk_matches_uniform_tail_distribution(logits, tau, k, scale):
    """Moved to tau and renormalized, against the full uniform-tail distribution the slow way; at the
    cache's own temperature (tau 1) only renormalized: a head and residual summing to 1.03 (8-bit
    rounding, say) come back summing to 1, and a head of every class has no tail."""
    z, _ = logits
    C = 10
    logp = torch.log_softmax(z, -1)
    vals, ids = logp.topk(k, -1)
    residual = (1 - vals.exp().sum(-1)).clamp(min=0) * scale
    vals = vals + math.log(scale)
    # full distribution under the uniform-tail model, tempered and renormalized the slow way
    full = torch.full((6, C), 0.0, dtype=torch.float64)
    full += (residual.double() / (C - k))[:, None]
    full.scatter_(-1, ids, vals.exp().double())
    tempered = full ** (1 / tau)
    tempered /= tempered.sum(-1, keepdim=True)
    new_logp, new_res = retemper_topk(vals, residual, C, tau)
    assert torch.allclose(new_logp.exp().double(), tempered.gather(-1, ids), atol=1e-6)
    tail = 1 - tempered.gather(-1, ids).sum(-1)
    assert torch.allclose(new_res.double(), tail, atol=1e-6)


def test_topk_encoding_stores_exact_tail_mass(logits):
    z, _ = logits
    logp = torch.log_softmax(z * 3, -1)  # peaked: tail mass is tiny, where 1 - sum would lose it
    enc = TopK(10, 4)
    out = enc.to_host(enc.encode(logp))
    assert out["ids"].dtype.name == "uint8" and out["logp"].dtype.name == "float16"
    vals, ids = logp.double().topk(4, -1)
    exact_tail = 1 - vals.exp().sum(-1)
    assert (out["ids"] == ids.numpy()).all()
    assert torch.allclose(torch.from_numpy(out["residual"]).double(), exact_tail, rtol=2e-3, atol=1e-7)
