"""A student with another tokenizer: span alignment on hand-built documents (a merge split in the
other tokenizer, unicode split into bytes, whitespace), the mapped distribution and the losses
against slow references, and the student stage and API training from an existing cache."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_config
from test_documents import teacher_at
from test_lm import lm_config

import pipeline as lc
from pipeline.core.config import load_config
from pipeline.core.errors import CacheError
from pipeline.inputs import tokens
from pipeline.inputs.documents import Corpus, Layout
from pipeline.inputs.splits import load_splits
from pipeline.inputs.text import python_docs, train_tokenizer
from pipeline.models.lm import hidden_and_head
from pipeline.train.crossloss import cross_kd_loss, mapped_distribution, span_kl, uld
from pipeline.train.crosstok import CrossRows, align_batch
from stages import cache as cache_stage
from stages import teachers as teacher_stage


def corpus(spans: list[tuple[int, int]]) -> Corpus:
    """One document whose tokens (the last an eos) have these character spans."""
    n = len(spans)
    return Corpus(Path("/nonexistent"), "train", np.arange(n, dtype=np.int64), np.array([0, n]), None, n - 1, "x",
                  spans=np.asarray(spans, dtype=np.int32))


def teacher_rows(spans: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """The cache rows of a one-document teacher corpus with these token spans: row r predicts token
    r + 1; its label_logp is -(r + 1) so sums name the rows."""
    r = len(spans) - 1
    return {"sample_id": np.zeros(r, np.int64), "position": np.arange(r, dtype=np.int32),
            "span_start": np.asarray(spans[1:], dtype=np.int32)[:, 0],
            "span_length": np.diff(np.asarray(spans[1:], dtype=np.int32), axis=1)[:, 0].astype(np.uint16),
            "label": np.arange(1, r + 1, dtype=np.int32),
            "label_logp": -np.arange(1, r + 1, dtype=np.float32)}


def align(student: list[tuple[int, int]], teacher: list[tuple[int, int]]) -> dict[str, list]:
    c = corpus(student)
    t = teacher_rows(teacher)
    rows = CrossRows(np.array([0]), np.array([len(student)]), np.array([len(student) - 1]), np.array([0]),
                     np.array([len(t["label"])]))
    out = align_batch(c, rows, np.array([0]), t, np.array([len(t["label"])]))
    return {k: v.tolist() for k, v in out.items()}


def test_a_merge_in_the_teacher_split_in_the_student():
    # "hello world": teacher "hello" " world" <eos>; student "hel" "lo" " wor" "ld" <eos>
    teacher = [(0, 5), (5, 11), (11, 11)]
    student = [(0, 3), (3, 5), (5, 9), (9, 11), (11, 11)]
    a = align(student, teacher)
    # positions predict "lo", " wor", "ld", <eos>: " wor" and <eos> start where a teacher token does
    assert a["x_aligned"] == [False, True, False, True]
    assert a["x_row"] == [-1, 0, -1, 1]  # "lo" and "ld" start inside a teacher token: no teacher row
    # chunks: " wor"+"ld" is the teacher's " world" (row 0); <eos> is row 1; "lo" starts no chunk
    assert a["x_chunk"] == [-1, 0, 0, 1]
    assert a["chunk_size"] == [2, 1] and a["chunk_teacher_logp"] == [-1.0, -2.0] and a["chunk_first"] == [0, 1]


def test_a_merge_in_the_student_split_in_the_teacher_is_a_chain():
    # student "hello" " world" <eos>; teacher "hel" "lo" " wor" "ld" <eos>
    student = [(0, 5), (5, 11), (11, 11)]
    teacher = [(0, 3), (3, 5), (5, 9), (9, 11), (11, 11)]
    a = align(student, teacher)
    assert a["x_aligned"] == [True, True] and a["x_row"] == [1, 3]  # " world" starts at teacher row 1 (" wor")
    # " world" is the chain " wor" + "ld" (rows 1, 2): its teacher log-prob is their sum
    assert a["x_chunk"] == [0, 1] and a["chunk_size"] == [1, 1]
    assert a["chunk_teacher_logp"] == [-2.0 - 3.0, -4.0] and a["chunk_first"] == [1, 3]


def test_unicode_split_into_bytes_and_whitespace():
    # "naïve 😀": teacher "na" "ïve" " " "😀" <eos>; the student splits the emoji into 4 byte tokens
    teacher = [(0, 2), (2, 5), (5, 6), (6, 7), (7, 7)]
    student = [(0, 3), (3, 5), (5, 6), (6, 7), (6, 7), (6, 7), (6, 7), (7, 7)]
    a = align(student, teacher)
    # targets "ve", " ", 4 bytes, <eos>: the bytes hold part of a character: never aligned, no row
    assert a["x_aligned"] == [False, True, False, False, False, False, True]
    assert a["x_row"] == [-1, 1, -1, -1, -1, -1, 3]
    # " " and the four bytes are the teacher's " " and "😀" (rows 1, 2); <eos> row 3
    assert a["x_chunk"] == [-1, 0, 0, 0, 0, 0, 1] and a["chunk_size"] == [5, 1]
    assert a["chunk_teacher_logp"] == [-2.0 - 3.0, -4.0]
    # the teacher splits, the student does not: a chain over the teacher's byte tokens
    a = align(teacher, student)
    assert a["x_aligned"] == [False, True, True, True] and a["x_chunk"] == [-1, 0, 1, 2]
    assert a["chunk_teacher_logp"] == [-2.0, -3.0 - 4.0 - 5.0 - 6.0, -7.0]
    # "a  b": teacher "a" "  " "b"; student "a" " " " b": the student's " " starts with the
    # teacher's "  ", its " b" starts inside it (and owns the teacher's "b", the first teacher token
    # starting inside it), and the two together are the teacher's "  " "b"
    a = align([(0, 1), (1, 2), (2, 4), (4, 4)], [(0, 1), (1, 3), (3, 4), (4, 4)])
    assert a["x_aligned"] == [True, False, True] and a["x_row"] == [0, 1, 2]
    assert a["x_chunk"] == [0, 0, 1] and a["chunk_teacher_logp"] == [-1.0 - 2.0, -3.0]


def test_the_mapped_distribution_sums_to_one():
    g = torch.Generator().manual_seed(0)
    n, k, vt, vs = 50, 6, 40, 25
    target = torch.randint(-1, vs, (vt,), generator=g)  # some teacher tokens unmapped
    ids = torch.stack([torch.randperm(vt, generator=g)[:k] for _ in range(n)])
    probs = torch.softmax(torch.randn(n, k + 1, generator=g, dtype=torch.float64), 1)
    rest = probs[:, -1]
    probs = probs[:, :-1]
    first = torch.where(torch.rand(n, generator=g) < 0.5, ids[:, 0], torch.randint(0, vt, (n,), generator=g))
    chain = torch.where(torch.rand(n, generator=g) < 0.7, probs[:, 0] * 0.3, torch.nan)
    label = torch.randint(0, vs, (n,), generator=g)
    q, unmapped = mapped_distribution(ids, probs, rest, target, vs, chain, first, label)
    assert torch.allclose(q.sum(1) + unmapped, torch.ones(n, dtype=torch.float64))
    assert (q >= -1e-12).all() and (unmapped >= -1e-12).all()
    # the slow way, one row at a time
    for i in range(n):
        want = torch.zeros(vs, dtype=torch.float64)
        lost = float(rest[i])
        for j in range(k):
            t = int(target[ids[i, j]])
            if t >= 0:
                want[t] += probs[i, j]
            else:
                lost += float(probs[i, j])
        if not torch.isnan(chain[i]):
            c = float(chain[i])
            listed = bool((ids[i] == first[i]).any())
            src = int(target[first[i]]) if listed else -1
            if src >= 0:
                take = min(c, float(want[src]))
                want[src] -= take
            else:
                take = min(c, lost)
                lost -= take
            want[label[i]] += take
        assert torch.allclose(q[i], want) and abs(float(unmapped[i]) - lost) < 1e-12


def test_uld_and_span_kl_against_slow_references():
    g = torch.Generator().manual_seed(1)
    p_full = torch.softmax(torch.randn(8, 30, generator=g, dtype=torch.float64), 1)
    q = torch.softmax(torch.randn(8, 20, generator=g, dtype=torch.float64), 1)
    top = p_full.topk(5, dim=1)
    rest = 1 - top.values.sum(1)
    got = uld(top.values, rest, q)
    for i in range(8):  # full sorted vectors, the teacher's unlisted mass as one entry, zero-padded
        p_vec = np.concatenate([np.sort(top.values[i].numpy())[::-1], [0.0] * 15])
        q_vec = np.sort(q[i].numpy())[::-1]
        want = np.abs(p_vec[:5] - q_vec[:5]).sum() + abs(float(rest[i]) - q_vec[5:].sum())
        assert abs(float(got[i]) - want) < 1e-12
    # rows listing 2, 5 and 0 teacher tokens (the rest padding), against a student part summing to 0.6
    q_part = q[:3] * 0.6
    listed = torch.tensor([2, 5, 0])
    p_pad = torch.where(torch.arange(5) < listed[:, None], top.values[:3], 0)
    rest3 = torch.tensor([0.5, 0.2, 0.6], dtype=torch.float64)
    got = uld(p_pad, rest3, q_part, listed)
    for i in range(3):
        c = int(listed[i])
        p_vec = np.sort(p_pad[i, :c].numpy())[::-1]
        q_vec = np.sort(q_part[i].numpy())[::-1]
        want = np.abs(p_vec - q_vec[:c]).sum() + abs(float(rest3[i]) - q_vec[c:].sum())
        assert abs(float(got[i]) - want) < 1e-12
    # dense teacher: exactly the L1 distance of the sorted vectors, zero-padded
    got = uld(p_full, torch.zeros(8, dtype=torch.float64), q)
    want = [np.abs(np.sort(p_full[i].numpy())[::-1] - np.pad(np.sort(q[i].numpy())[::-1], (0, 10))).sum()
            for i in range(8)]
    assert np.allclose(got.numpy(), want)
    pt, ps = torch.tensor([0.9, 0.2, 1e-6]), torch.tensor([0.5, 0.2, 0.3])
    want = pt * (pt / ps).log() + (1 - pt) * ((1 - pt) / (1 - ps)).log()
    assert torch.allclose(span_kl(pt.log(), ps.log()), want, atol=1e-6)
    assert float(span_kl(pt.log()[1:2], ps.log()[1:2])) == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    """A teacher cache of the bundled corpus with a 600-token BPE, and a 300-token BPE for students."""
    ws = tmp_path_factory.mktemp("cross")
    docs = python_docs()[:300]
    teacher_tok = train_tokenizer(docs, 600, ws / "tok-600")
    student_tok = train_tokenizer(docs, 300, ws / "tok-300")
    cfg = lm_config(ws, data={"tokenizer": str(teacher_tok), "max_sequences": 48},
                    cache={"encoding": "topk", "k": 8, "rows_per_shard": 300, "chunk_rows": 64, "batch_size": 8,
                           "context": 16, "stride": 8},
                    student={"epochs": 1, "baseline": True})
    path = write_config(ws / "c.yaml", cfg)
    config = load_config(path)
    teacher_stage.main(config)
    d = cache_stage.main(config)
    return config, d, student_tok


def test_every_student_position_meets_its_teacher_rows_by_characters(two_tokenizers):
    """Through the API: every teacher row the batches carry is read once an epoch; an aligned
    position's teacher row predicts a token that starts where the student's does; a chunk's
    teacher rows spell exactly the characters of its student tokens."""
    config, d, student_tok = two_tokenizers
    student_dir = tokens.tokenize(dataclasses.replace(config.data, tokenizer=str(student_tok)), str(config.workspace))
    cache = lc.open_cache(d)
    ds = cache.dataset(batch_size=4, seed=3, layout=Layout(24, "pad"), tokens=student_dir, align="exact")
    corpus, teacher = ds.corpus, load_splits(config).corpus  # the student's tokens, the teacher's
    seen, checked, chunks, sampled = [], 0, 0, False
    for batch in ds:
        doc, off = batch["document"].numpy(), batch["offset"].numpy()
        seen.extend(zip(doc.tolist(), off.tolist()))
        start = ds.cross.rows.start[batch["sequence_id"].numpy()]
        seq, pos, row = batch["x_sequence"].numpy(), batch["x_position"].numpy(), batch["x_row"].numpy()
        p = start[seq] + pos  # the student's flat positions; their targets are tokens p + 1
        assert (batch["inputs"].numpy()[seq, pos + 1] == corpus.tokens[p + 1]).all()
        a = batch["x_aligned"].numpy()
        s_doc = corpus.document_of(p)
        assert (doc[row[a]] == s_doc[a]).all()
        t_span = np.asarray(teacher.spans[teacher.offsets[doc] + off + 1])  # each teacher row's predicted token
        assert (t_span[row[a], 0] == np.asarray(corpus.spans[p[a] + 1])[:, 0]).all()
        checked += int(a.sum())
        chunk, label_logp = batch["x_chunk"].numpy(), batch["label_logp"].numpy().astype(np.float64)
        for c in range(len(batch["chunk_size"])):  # the chunk's characters, the slow way
            mine = np.flatnonzero(chunk == c)
            first = int(batch["chunk_first"][c])
            lo, hi = int(corpus.spans[p[mine[0]] + 1, 0]), int(corpus.spans[p[mine[-1]] + 1, 1])
            rows = [r for r in range(first, len(doc)) if doc[r] == doc[first] and lo <= t_span[r, 0] < max(hi, lo + 1)]
            assert t_span[rows[-1], 1] == hi and int(batch["chunk_size"][c]) == len(mine)
            assert float(batch["chunk_teacher_logp"][c]) == pytest.approx(float(label_logp[rows].sum()), abs=1e-6)
            chunks += 1
        # each row's label is the teacher's next token, its label_logp that token's log-prob
        assert (batch["label"].numpy() == teacher.tokens[teacher.offsets[doc] + off + 1]).all()
        if not sampled:
            sampled = True
            for r in range(0, len(doc), 37):
                want = teacher_at(config, teacher, int(doc[r]), int(off[r]))[int(batch["label"][r])]
                assert float(label_logp[r]) == pytest.approx(float(want), abs=2e-3 * max(1.0, abs(float(want))))
    assert sorted(seen) == sorted(set(seen)) and checked > 100 and chunks > 100
    assert ds.vocab_map.shape == (600,) and int((ds.vocab_map >= 0).sum()) >= 598  # all but <pad>-like specials


def test_students_with_another_tokenizer_train_from_the_cache_through_the_cli(two_tokenizers, cli_run):
    """Each method trains end to end through `logitcache student` with student.tokenizer: the cache
    and the teacher are left as they were (no teacher rerun), the student has its own vocabulary,
    and the held-out NLL per character is reported; the hard-label twin too."""
    config, d, student_tok = two_tokenizers
    before = {p.name: p.stat().st_mtime_ns for p in (d / "shards").iterdir()}
    teacher_files = {p: p.stat().st_mtime_ns for p in Path(config.workspace, "teachers").rglob("*") if p.is_file()}
    path = Path(config.workspace) / "c.yaml"
    for align in ("uld", "exact", "span"):
        result = cli_run("student", str(path), f"student.tokenizer={student_tok}", f"student.align={align}",
                         f"run_name=x-{align}")
        assert "trained" in result.output
        jobs = sorted((Path(config.workspace) / "runs" / f"x-{align}" / "students").iterdir())
        assert [j.name for j in jobs] == ["s-hard-s0", "s-kd-s0"]
        for job in jobs:
            h = json.loads((job / "history.json").read_text())
            assert h["settings"]["tokenizer"]["align"] == align
            assert np.isfinite(h["losses"]).all() and 2 < h["epochs"][-1]["test_nll_per_char"] < 10
            state = torch.load(job / "model.pt")
            assert max(v.shape[0] for k, v in state.items() if k.endswith("weight") and v.dim() == 2) == 300
    assert {p.name: p.stat().st_mtime_ns for p in (d / "shards").iterdir()} == before
    assert {p: p.stat().st_mtime_ns for p in teacher_files} == teacher_files


def test_a_training_step_through_the_api_lowers_the_loss(two_tokenizers):
    """cross_kd_loss from the dataset's batches: gradients reach the student and, over a few steps on
    one batch, every method's loss goes down."""
    from pipeline.models.builders import build_model

    config, d, student_tok = two_tokenizers
    student_dir = tokens.tokenize(dataclasses.replace(config.data, tokenizer=str(student_tok)), str(config.workspace))
    for align in ("uld", "exact", "span"):
        ds = lc.open_cache(d).dataset(batch_size=4, layout=Layout(16), tokens=student_dir, align=align)
        batch = next(iter(ds))
        torch.manual_seed(0)
        model = build_model(config.student.models[0], (17,), 300, "student")
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(8):
            h, head = hidden_and_head(model, batch["inputs"][:, :-1], batch["segments"][:, :-1])
            loss = cross_kd_loss(h, head, batch, 1.0, align=align)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert losses[-1] < losses[0] * 0.9, (align, losses)


def test_caches_and_corpora_a_cross_student_cannot_read_are_refused(two_tokenizers, tmp_path):
    config, d, student_tok = two_tokenizers
    cache = lc.open_cache(d)
    student_dir = tokens.tokenize(dataclasses.replace(config.data, tokenizer=str(student_tok)), str(config.workspace))
    with pytest.raises(ValueError, match="align"):
        cache.dataset(batch_size=2, tokens=student_dir, align="bogus")
    with pytest.raises(ValueError, match="trains at the cache's temperature"):
        cache.dataset(batch_size=2, tokens=student_dir, temperature=2.0)
    # other documents: the same tokenizer on another slice of the corpus
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(python_docs()[500:900]))
    other_dir = tokens.tokenize(dataclasses.replace(config.data, tokenizer=str(student_tok), source=str(other)),
                                str(config.workspace))
    with pytest.raises(CacheError, match="tokenize the same data"):
        cache.dataset(batch_size=2, tokens=other_dir)
    # a teacher vocabulary edited since the cache was made
    vocab = d / "vocab.json"
    kept = vocab.read_bytes()
    try:
        vocab.write_bytes(kept.replace(b'"fingerprint"', b'"fingerprint" ', 1))
        with pytest.raises(CacheError, match="vocab.json: missing, or its sha256 differs"):
            cache.dataset(batch_size=2, tokens=student_dir)
    finally:
        vocab.write_bytes(kept)
    # a cache of pre-tokenized ids stores no spans
    ids = tmp_path / "ids.jsonl"
    ids.write_text("\n".join(json.dumps({"input_ids": list(range(i, i + 40))}) for i in range(60)) + "\n")
    cfg = load_config(Path(config.workspace) / "c.yaml", [f"data.source={ids}", f"workspace={tmp_path}"])
    teacher_stage.main(cfg)
    pre = cache_stage.main(cfg)
    assert not (pre / "vocab.json").exists() and "alignment" not in json.loads((pre / "spec.json").read_text())
    with pytest.raises(CacheError, match="holds no token spans"):
        lc.open_cache(pre).dataset(batch_size=2, tokens=student_dir)


def test_a_resumed_epoch_equals_an_uninterrupted_one(two_tokenizers):
    config, d, student_tok = two_tokenizers
    student_dir = tokens.tokenize(dataclasses.replace(config.data, tokenizer=str(student_tok)), str(config.workspace))

    def dataset():
        return lc.open_cache(d).dataset(batch_size=3, seed=5, layout=Layout(20), tokens=student_dir, align="span")

    whole = [b for b in dataset()]
    first = dataset()
    it = iter(first)
    for _ in range(4):
        next(it)
    state = first.state_dict()
    again = dataset()
    again.load_state_dict(state)
    rest = list(again)
    assert len(rest) == len(whole) - 4 > 0
    for a, b in zip(rest, whole[4:]):
        for key in ("inputs", "document", "offset", "x_row", "x_aligned", "x_chunk", "chunk_teacher_logp"):
            assert torch.equal(a[key], b[key]), key
    # the same documents in a third tokenizer's tokens are another stream: refused
    third = train_tokenizer(python_docs()[:300], 250, Path(config.workspace) / "tok-250")
    other = tokens.tokenize(dataclasses.replace(config.data, tokenizer=str(third)), str(config.workspace))
    with pytest.raises(ValueError, match="load_state_dict: the state has (items|tokens)="):
        lc.open_cache(d).dataset(batch_size=3, seed=5, layout=Layout(20), tokens=other).load_state_dict(state)


def test_the_loss_in_chunks_equals_the_loss_at_once(two_tokenizers):
    """Chunked, checkpointed logits give the same loss and gradients as one chunk, for every method
    and with cross-entropy mixed in."""
    from pipeline.models.builders import build_model

    config, d, student_tok = two_tokenizers
    student_dir = tokens.tokenize(dataclasses.replace(config.data, tokenizer=str(student_tok)), str(config.workspace))
    for align in ("uld", "exact", "span"):
        batch = next(iter(lc.open_cache(d).dataset(batch_size=4, layout=Layout(16), tokens=student_dir, align=align)))
        torch.manual_seed(0)
        model = build_model(config.student.models[0], (17,), 300, "student")
        got = []
        for chunk in (7, 10_000):
            model.zero_grad()
            h, head = hidden_and_head(model, batch["inputs"][:, :-1], batch["segments"][:, :-1])
            loss = cross_kd_loss(h, head, batch, 1.0, align=align, alpha=0.3, logit_chunk=chunk)
            loss.backward()
            got.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        assert torch.allclose(got[0][0], got[1][0], rtol=1e-5), align
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(got[0][1], got[1][1])), align


def test_through_the_alignment_a_twin_tokenizer_gets_the_exact_loss(two_tokenizers, tmp_path):
    """The teachers' tokenizer with one token added (another fingerprint, the same tokens): every
    position aligns, the map is the identity, and "exact" is the same-tokenizer forward KL of
    top-k's head and its tail as one outcome, in value and gradient."""
    import shutil

    from tokenizers import Tokenizer

    from pipeline.models.builders import build_model
    from pipeline.train.losses import kd_loss

    config, d, _ = two_tokenizers
    twin = tmp_path / "twin"
    twin.mkdir()
    tok = Tokenizer.from_file(str(Path(config.data.tokenizer) / "tokenizer.json"))
    tok.add_tokens(["<|twin|>"])
    tok.save(str(twin / "tokenizer.json"))
    shutil.copy(Path(config.data.tokenizer) / "tokenizer_config.json", twin / "tokenizer_config.json")
    twin_dir = tokens.tokenize(dataclasses.replace(config.data, tokenizer=str(twin)), str(config.workspace))
    own = load_splits(config).corpus
    cache = lc.open_cache(d)
    same = next(iter(cache.dataset(batch_size=4, shuffle=False, layout=Layout(16), tokens=own.directory)))
    cross_ds = cache.dataset(batch_size=4, shuffle=False, layout=Layout(16), tokens=twin_dir, align="exact")
    cross = next(iter(cross_ds))
    assert torch.equal(same["inputs"], cross["inputs"]) and bool(cross["x_aligned"].all())
    assert torch.equal(cross_ds.vocab_map, torch.arange(600))
    torch.manual_seed(0)
    model = build_model(config.student.models[0], (17,), 601, "student")
    h, head = hidden_and_head(model, cross["inputs"][:, :-1], cross["segments"][:, :-1])
    z = head(h).detach()
    z[..., 600] = -torch.inf  # the added token takes no mass: the two vocabularies are then one
    zc = z.clone().requires_grad_(True)
    # without chains (a chain moves the label's known probability out of the tail when the label is
    # not among the top k: what the cache knows beyond a same-tokenizer top-k loss)
    plain = {**cross, "chunk_size": torch.full_like(cross["chunk_size"], 2)}
    got = cross_kd_loss(zc, torch.nn.Identity(), plain, 1.0, align="exact", tail="bucket")
    zs = z[..., :600].clone().requires_grad_(True)
    want = kd_loss(zs, same, 1.0, tail="bucket")
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    (g_got,) = torch.autograd.grad(got, zc)
    (g_want,) = torch.autograd.grad(want, zs)
    assert torch.allclose(g_got[..., :600], g_want, atol=1e-7)
