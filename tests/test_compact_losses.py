"""Divergences from the compact format (ids, values, tail model) against the same divergence of the
full teacher distribution built the slow way, in float64: values and gradients, for every
divergence and head encoding; and the loss builds no (rows, vocab) teacher tensor."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from pipeline.format import kl
from pipeline.format.encodings import Hybrid, TopK
from pipeline.train import losses

ENCODINGS = {"topk16": lambda C: TopK(C, 6), "topk8": lambda C: TopK(C, 6, bits=8),
             "hybrid": lambda C: Hybrid(C, 6, 8)}


def _targets(enc, logp: torch.Tensor) -> dict[str, torch.Tensor]:
    return enc.targets(enc.decode(enc.to_host(enc.encode(logp, torch.Generator().manual_seed(0)))), "cpu")


def _full_teacher(t: dict[str, torch.Tensor], C: int) -> torch.Tensor:
    """The teacher as the student's loss models it, over all C classes, in float64: the head exact,
    the residual spread evenly over the other classes (log u floored at log 1e-30, as topk_full_logp)."""
    ids, k = t["ids"].long(), t["ids"].shape[-1]
    u = (t["residual"].double().clamp(min=0) / (C - k)).clamp(min=1e-30)
    full = u[:, None].log().expand(-1, C).clone()
    return full.scatter(-1, ids, t["logp"].double())


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("name", list(ENCODINGS))
def test_uniform_tail_divergences_equal_the_full_teacher_with_their_gradients(kind, name):
    g = torch.Generator().manual_seed(3)
    C, T = 300, 2.0
    z = torch.randn(7, C, generator=g) * 3
    enc = ENCODINGS[name](C)
    t = _targets(enc, torch.log_softmax(z / T, -1))
    if name == "hybrid" and kind == "forward":
        pytest.skip("hybrid's forward KL uses its sampled tail, not the uniform model")
    student = (torch.randn(7, C, generator=g) * 2).requires_grad_()
    settings = {"alpha": 0.0, "temperature": T, "divergence": kind, "tail": "uniform"}
    got = losses.row_losses(student, t, None, settings, enc) / 7
    (g_got,) = torch.autograd.grad(got, student)

    ref_student = student.detach().double().requires_grad_()
    logq = torch.log_softmax(ref_student / T, -1)
    ref = T**2 * kl.divergence(_full_teacher(t, C), logq, kind).mean()
    (g_ref,) = torch.autograd.grad(ref, ref_student)
    assert float(got.detach()) == pytest.approx(float(ref), rel=1e-4, abs=1e-6)
    assert torch.allclose(g_got.double(), g_ref, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_a_head_of_every_class_is_the_dense_divergence(kind):
    g = torch.Generator().manual_seed(4)
    C = 12
    logp = torch.log_softmax(torch.randn(5, C, generator=g) * 2, -1)
    enc = TopK(C, C)
    t = _targets(enc, logp)
    logq = torch.log_softmax(torch.randn(5, C, generator=g), -1)
    got = enc.divergence(logq, t, kind, "uniform")
    dense = torch.full((5, C), float("-inf")).scatter(-1, t["ids"].long(), t["logp"])
    assert torch.allclose(got, kl.divergence(dense, logq, kind), rtol=1e-5, atol=1e-6)


def test_a_tail_of_no_mass_is_the_floor_the_full_teacher_uses():
    """residual 0: the tail's teacher log-prob is log 1e-30, as topk_full_logp has it (reverse KL
    then charges the student's tail mass at -log 1e-30 per unit, never infinity or NaN)."""
    C, k = 50, 4
    logq = torch.log_softmax(torch.randn(3, C), -1)
    ids = torch.arange(k).expand(3, k)
    logp = torch.log_softmax(torch.randn(3, k), -1)
    residual = torch.zeros(3)
    for kind in ("forward", "reverse", "jsd"):
        got = kl.uniform_tail_divergence(logq, ids, logp, residual, kind)
        want = kl.divergence(kl.topk_full_logp(ids, logp, residual, C), logq, kind)
        assert torch.isfinite(got).all()
        assert torch.allclose(got, want, rtol=1e-4), kind


def _allocated_peak(fn) -> int:
    """Peak bytes torch allocates while `fn` runs, above what was allocated before (the profiler's
    running total of CPU tensor allocations)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        prof.export_chrome_trace(f"{d}/trace.json")
        events = json.loads(Path(f"{d}/trace.json").read_text())["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]"]
    if not memory:
        return 0
    base = memory[0]["Total Allocated"] - memory[0]["Bytes"]  # the running total carries over between profiles
    return max(m["Total Allocated"] for m in memory) - base


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_the_loss_builds_no_rows_by_vocab_teacher(kind):
    """Top-8 of 64 rows over a 32k vocabulary, student log-probs given: the loss's forward pass
    allocates at most the student-side (rows, V) tensors its divergence needs, 8 MB each: for
    forward KL one fused cross-entropy, whose only one is logsumexp's passing temporary (its
    gradient is made in backward); log q and q for reverse; those and the mixture and its log for
    JSD. Through the full teacher (the teacher, its
    exponentials, the products) it took 5, 5 and 9 beside log q."""
    n, V, k = 64, 32_000, 8
    g = torch.Generator().manual_seed(0)
    enc = TopK(V, k)
    t = _targets(enc, torch.log_softmax(torch.randn(n, V, generator=g) * 3, -1))
    logq = torch.log_softmax(torch.randn(n, V, generator=g), -1)
    full = n * V * 4
    budget = {"forward": 1.1, "reverse": 2.1, "jsd": 4.1}[kind]
    peak = _allocated_peak(lambda: enc.divergence(logq, t, kind, "uniform"))
    assert peak < budget * full + (1 << 20), (kind, peak / full)


@pytest.mark.parametrize("uniform", [True, False])
def test_sparse_cross_entropy_equals_the_dense_teachers_with_its_gradient(uniform):
    """The fused cross-entropy of a teacher given as u on every class plus w at ids equals
    -sum p log softmax(z) of that teacher written out, values and gradients, with repeated ids
    (sampled padding, weight 0) and negative weights (a head's p - u)."""
    g = torch.Generator().manual_seed(5)
    n, C, m = 6, 97, 9
    z = (torch.randn(n, C, generator=g, dtype=torch.float64) * 3).float().requires_grad_()
    ids = torch.randint(0, C, (n, m), generator=g)
    ids[:, -2:] = ids[:, -3:-2]  # padding repeats an id
    w = torch.rand(n, m, generator=g) * 0.1
    w[:, -2:] = 0.0
    u = torch.rand(n, generator=g) * 1e-3 if uniform else None
    if uniform:
        w[:, :3] -= u[:, None]
    got = kl.sparse_cross_entropy(z, ids, w, u)
    (g_got,) = torch.autograd.grad(got.sum() * 1.7, z)

    zd = z.detach().double().requires_grad_()
    p = torch.zeros(n, C, dtype=torch.float64).scatter_add(-1, ids, w.double())
    if uniform:
        p = p + u.double()[:, None]
    ref = -(p * torch.log_softmax(zd, -1)).sum(-1)
    (g_ref,) = torch.autograd.grad(ref.sum() * 1.7, zd)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(g_got.double(), g_ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["sampled", "hybrid"])
def test_drawn_encodings_forward_kl_and_gradient_equal_the_slow_way(name):
    """Sampled and hybrid forward KL through the fused cross-entropy against the same estimate
    summed from log_softmax in float64 (head exact, drawn ids weighted), values and gradients."""
    from pipeline.format.encodings import Sampled

    g = torch.Generator().manual_seed(6)
    C = 500
    logp = torch.log_softmax(torch.randn(8, C, generator=g) * 3, -1)
    enc = Sampled(C, 24) if name == "sampled" else Hybrid(C, 6, 16, bits=8)
    t = _targets(enc, logp)
    z = torch.randn(8, C, generator=g).requires_grad_()
    got = enc.divergence(z, t, "forward", "uniform")
    (g_got,) = torch.autograd.grad(got.sum(), z)

    zd = z.detach().double().requires_grad_()
    logq = torch.log_softmax(zd, -1)
    if name == "sampled":
        ref = -(t["weights"].double() * logq.gather(-1, t["ids"])).sum(-1) - t["entropy"].double()
    else:
        lp = t["logp"].double()
        ref = ((lp.exp() * (lp - logq.gather(-1, t["ids"]))).sum(-1)
               - (t["tail_weights"].double() * logq.gather(-1, t["tail_ids"])).sum(-1) - t["tail_entropy"].double())
    (g_ref,) = torch.autograd.grad(ref.sum(), zd)
    assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-5)
    assert torch.allclose(g_got.double(), g_ref, rtol=1e-4, atol=1e-6)


def test_dense_forward_kl_equals_the_divergence_with_its_gradient():
    """A dense teacher's forward KL from the soft-label cross-entropy and the teacher's entropy equals
    sum p (log p - log q) in float64, values and gradients, with classes the teacher gives no mass
    (log p = -inf: they add nothing, never NaN); through Dense's divergence in float32 too."""
    from pipeline.format.encodings import Dense

    g = torch.Generator().manual_seed(7)
    n, C = 9, 211
    teacher = torch.randn(n, C, generator=g, dtype=torch.float64) * 3
    teacher[:3, :20] = float("-inf")
    logp = torch.log_softmax(teacher, -1)
    z = (torch.randn(n, C, generator=g, dtype=torch.float64) * 2).requires_grad_()
    got = kl.dense_forward_kl(logp, z)
    (g_got,) = torch.autograd.grad(got.sum() * 1.3, z)
    zd = z.detach().clone().requires_grad_()
    ref = kl.divergence(logp, torch.log_softmax(zd, -1), "forward")
    (g_ref,) = torch.autograd.grad(ref.sum() * 1.3, zd)
    assert torch.isfinite(got).all() and float(got.min()) > 0
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12) and torch.allclose(g_got, g_ref, rtol=1e-10, atol=1e-12)

    enc = Dense(C, "float32")
    t = enc.targets({"logp": logp.float().numpy()}, "cpu")
    z32 = z.detach().float().requires_grad_()
    dense = enc.divergence(z32, t, "forward", "uniform")
    (g_dense,) = torch.autograd.grad(dense.sum(), z32)
    assert torch.allclose(dense.double(), ref, rtol=1e-4, atol=1e-5)
    assert torch.allclose(g_dense.double(), g_ref / 1.3, rtol=1e-4, atol=1e-6)
