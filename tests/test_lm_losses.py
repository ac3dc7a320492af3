"""Token-level losses against the same quantity computed from the full teacher distribution."""

from __future__ import annotations

import pytest
import torch
from conftest import slow_divergence

from pipeline.format.encodings import Dense, Sampled, TopK
from pipeline.train import losses


@pytest.fixture
def dists():
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 40, generator=g) * 2.5, torch.randn(5, 40, generator=g)  # teacher, student logits


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_divergences_over_topk_support_with_uniform_tail(dists, kind):
    z, s = dists
    T, k, V = 2.0, 6, 40
    logp = torch.log_softmax(z / T, -1)
    vals, ids = logp.topk(k, -1)
    residual = 1 - vals.exp().sum(-1)
    full = []  # the teacher as the student sees it: top-k exact, the tail spread evenly
    for prow, irow, r in zip(vals.exp().double().tolist(), ids.tolist(), residual.double().tolist()):
        row = [r / (V - k)] * V
        for i, pv in zip(irow, prow):
            row[i] = pv
        full.append(row)
    q = torch.softmax(s.double() / T, -1).tolist()
    st = {"alpha": 0.0, "temperature": T, "divergence": kind, "tail": "uniform"}
    got = losses.row_losses(s, {"ids": ids, "logp": vals, "residual": residual}, None, st, TopK(V, k)) / 5
    assert float(got) == pytest.approx(T**2 * slow_divergence(full, q, kind), rel=1e-4)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_dense_divergences_are_exact(dists, kind):
    z, s = dists
    T = 1.5
    p = torch.softmax(z.double() / T, -1).tolist()
    q = torch.softmax(s.double() / T, -1).tolist()
    st = {"alpha": 0.0, "temperature": T, "divergence": kind, "tail": "uniform"}
    got = losses.row_losses(s, {"logp": torch.log_softmax(z / T, -1)}, None, st, Dense(40)) / 5
    assert float(got) == pytest.approx(T**2 * slow_divergence(p, q, kind), rel=1e-4)


def test_sampled_encoding_counts_and_unbiased_kl(dists):
    z, s = dists
    T = 1.0
    logp = torch.log_softmax(z, -1)
    enc = Sampled(40, 24)
    g = torch.Generator().manual_seed(0)
    one = enc.decode(enc.to_host(enc.encode(logp, g)))
    counts, ids = torch.from_numpy(one["counts"]).long(), torch.from_numpy(one["ids"])
    assert (counts.sum(-1) == 24).all()
    for row_ids, row_counts in zip(ids.tolist(), counts.tolist()):
        kept = [i for i, c in zip(row_ids, row_counts) if c > 0]
        assert len(kept) == len(set(kept))  # distinct ids, padding has count 0
    assert torch.allclose(torch.from_numpy(one["entropy"]).float(), -(logp.exp() * logp).sum(-1), atol=1e-2)

    exact = float(losses.kd_dense(s, logp, T))
    estimates = []
    for _ in range(400):  # the mean over many independent caches converges to the full KL
        targets = enc.targets(enc.decode(enc.to_host(enc.encode(logp, g))), "cpu")
        estimates.append(float(losses.encoding_loss(s, targets, enc, T)))
    mean = sum(estimates) / len(estimates)
    sd = (sum((x - mean) ** 2 for x in estimates) / (len(estimates) - 1)) ** 0.5
    assert abs(mean - exact) < 4 * sd / len(estimates) ** 0.5 + 2e-3  # entropy is stored as float16


def test_chunked_loss_equals_unchunked_with_same_gradients(dists):
    z, _ = dists
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 40, bias=False)
    hidden = torch.randn(5, 8, requires_grad=True)
    logp = torch.log_softmax(z / 2, -1)
    vals, ids = logp.topk(4, -1)
    targets = {"ids": ids, "logp": vals, "residual": 1 - vals.exp().sum(-1)}
    labels = torch.tensor([1, 2, 3, 4, 5])
    st = {"alpha": 0.3, "temperature": 2.0, "divergence": "jsd", "tail": "uniform"}
    whole = losses.chunked_loss(hidden, head, targets, labels, st, TopK(40, 4), chunk=100)
    (g_whole,) = torch.autograd.grad(whole, hidden)
    parts = losses.chunked_loss(hidden, head, targets, labels, st, TopK(40, 4), chunk=2)
    (g_parts,) = torch.autograd.grad(parts, hidden)
    assert float(parts.detach()) == pytest.approx(float(whole.detach()), rel=1e-6)
    assert torch.allclose(g_parts, g_whole, atol=1e-6)


def test_a_token_batch_loss_holds_seven_chunks_of_logits_at_most(tmp_path):
    """Forward KL (top-k, uniform tail) over 2,048 token rows of a 2,048-token vocabulary, forward
    and backward at the default logit_chunk: the tensors alive at once never exceed seven
    (logit_chunk, V) float32 tensors, 28 MB, whatever the batch's rows. Each step's loss
    temporaries are freed into the allocator's heap, whose height then varies from step to step:
    the larger they are, the higher the peak resident size of a long run drifts."""
    import json

    from torch.profiler import ProfilerActivity, profile

    from pipeline.core.config import StudentConfig

    V, n, d, k = 2048, 2048, 32, 8
    chunk = StudentConfig().logit_chunk
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    head = torch.nn.Linear(d, V)
    logp, ids = torch.log_softmax(torch.randn(n, V, generator=g), -1).topk(k, -1)
    targets = {"ids": ids, "logp": logp, "residual": 1 - logp.exp().sum(-1)}
    st = {"alpha": 0.0, "temperature": 1.0, "divergence": "forward", "tail": "uniform"}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        losses.chunked_loss(hidden, head, targets, None, st, TopK(V, k), chunk).backward()
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    peak = max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")  # bytes since start
    assert peak <= 7 * chunk * V * 4 + (1 << 20)  # before: 2,048-row chunks, eight tensors: 128 MB
    assert peak <= 29 << 20


def test_a_language_model_teacher_fits_on_chunks_of_logits_never_batch_by_seq_by_vocab():
    """The fit loss of a built-in GPT teacher equals cross-entropy over full (B, L, V) logits, value
    and gradients, while its output layer only ever sees logit_rows rows at a time."""
    from pipeline.core.specs import GPTSpec
    from pipeline.models.builders import build_model
    from pipeline.train.tasks import TASKS

    torch.manual_seed(0)
    model = build_model(GPTSpec(name="g", arch="gpt", d_model=32, layers=1, heads=2), (17,), 50, "t")
    x, y = torch.randint(0, 50, (6, 16)), torch.randint(0, 50, (6, 16))
    seen = []
    hook = model.head.register_forward_hook(lambda m, inp, out: seen.append(out.shape[0] if out.dim() == 2
                                                                            else out.shape[0] * out.shape[1]))
    loss = TASKS["lm"].fit_loss(model, x, y, logit_rows=40)
    loss.backward()
    hook.remove()
    grads = [p.grad.clone() for p in model.parameters()]
    assert max(seen) <= 40 and sum(seen) >= 6 * 16  # chunks (and their recompute in backward), never all 96 rows
    model.zero_grad()
    full = torch.nn.functional.cross_entropy(model(x).reshape(-1, 50), y.reshape(-1))
    full.backward()
    assert loss.item() == pytest.approx(full.item(), rel=1e-5)
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(grads, model.parameters()))
