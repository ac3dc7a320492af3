"""Token targets keyed by (document, offset): the corpus arithmetic against slow references, the
teachers' windows, and students of several layouts reading one cache, each target checked against
the teacher at its (document, offset)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_config
from test_lm import lm_config

import pipeline as lc
from pipeline.core.config import load_config
from pipeline.core.errors import CacheError
from pipeline.inputs.documents import Corpus, Layout, layout_rows
from pipeline.inputs.splits import load_splits
from pipeline.models.ensemble import load_teacher, teacher_refs
from stages import cache as cache_stage
from stages import student as student_stage
from stages import teachers as teacher_stage


def corpus_of(lengths: list[int], mask: np.ndarray | None = None, seed: int = 0) -> Corpus:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.random.default_rng(seed).integers(1, 50, int(offsets[-1]))
    return Corpus(None, "train", tokens, offsets, mask, 0, "f")  # type: ignore[arg-type]


def slow_trained(c: Corpus) -> np.ndarray:
    """Positions with a target, one at a time: the next token is in the same document (and trained)."""
    out = []
    for d in range(c.n_docs):
        a, b = int(c.offsets[d]), int(c.offsets[d + 1])
        for p in range(a, b - 1):
            if c.mask is None or c.mask[p + 1]:
                out.append(p)
    return np.array(out, dtype=np.int64)


@pytest.mark.parametrize("masked", [False, True])
def test_rows_before_and_positions_of_rows_match_a_slow_count(masked, monkeypatch):
    monkeypatch.setattr("pipeline.inputs.documents.BLOCK", 7)  # many blocks, boundaries inside documents
    lengths = [1, 5, 2, 30, 9, 1, 17]
    mask = (np.random.default_rng(3).random(sum(lengths)) < 0.6).astype(np.uint8) if masked else None
    c = corpus_of(lengths, mask)
    want = slow_trained(c)
    assert (np.flatnonzero(c.trained(0, c.n_tokens)) == want).all()
    points = np.array([c.n_tokens, 0, 3, 17, 40, 41, 64, 12])  # unsorted on purpose
    assert (c.rows_before(points) == [int((want < x).sum()) for x in points]).all()
    rows = np.arange(0, len(want) + 1, 3)
    got = c.positions_of_rows(rows)
    assert (got[rows < len(want)] == want[rows[rows < len(want)]]).all() and (got[rows == len(want)] == c.n_tokens).all()


@pytest.mark.parametrize("context,stride", [(8, 4), (8, 8), (8, 1), (5, 3)])
def test_windows_cover_every_target_once_with_the_left_context(context, stride):
    c = corpus_of([3, 40, 8, 9, 23])
    want = slow_trained(c)
    kept = []
    for lo, hi in ((0, 20), (20, 41), (41, c.n_tokens)):  # shard boundaries inside documents
        for w in c.windows(lo, hi, context, stride):
            assert w.stop - w.start <= context and w.start >= c.offsets[w.document]
            p = w.keep_lo + np.flatnonzero(c.trained(w.keep_lo, w.keep_hi))
            assert ((p >= lo) & (p < hi)).all() and (p < w.stop).all()
            doc_start = c.offsets[w.document]
            # every kept target sees context - stride tokens before it, or its whole document
            assert ((p - w.start >= context - stride) | (w.start == doc_start)).all()
            kept.extend(p.tolist())
    assert kept == want.tolist()


@pytest.mark.parametrize("packing", ["concat", "pad"])
@pytest.mark.parametrize("seq_len", [1, 4, 16])
def test_layout_rows_own_each_target_once(packing, seq_len):
    c = corpus_of([3, 40, 8, 2, 23], (np.arange(76) % 3 != 0).astype(np.uint8))
    rows = layout_rows(c, Layout(seq_len, packing))
    assert (rows.lo[1:] == rows.hi[:-1]).all() and rows.lo[0] == 0 and rows.hi[-1] == len(slow_trained(c))
    assert (rows.stop - rows.start <= seq_len + 1).all() and (rows.hi > rows.lo).all()
    if packing == "pad":  # a row never holds two documents
        doc = np.searchsorted(c.offsets, rows.start, side="right") - 1
        assert (rows.stop <= c.offsets[doc + 1]).all()


def test_a_layout_refuses_nonsense():
    with pytest.raises(ValueError, match="packing: 'zigzag' is not one of concat, pad"):
        Layout(8, "zigzag")
    with pytest.raises(ValueError, match="seq_len: 0 must be in 1..1048576"):
        Layout(0)


# ---------------------------------------------------------------------------------------------
# One cache, students of any layout


@pytest.fixture(scope="module")
def doc_cache(tmp_path_factory):
    """A dense float32 cache (exact values) of a GPT teacher read with context 16, stride 8."""
    ws = tmp_path_factory.mktemp("docs")
    cfg = lm_config(ws, cache={"encoding": "dense", "dtype": "float32", "rows_per_shard": 300, "chunk_rows": 64,
                               "batch_size": 8, "context": 16, "stride": 8})
    cfg["data"]["max_sequences"] = 48
    path = write_config(ws / "c.yaml", cfg)
    config = load_config(path)
    teacher_stage.main(config)
    d = cache_stage.main(config)
    return config, d


def teacher_at(config, corpus: Corpus, doc: int, offset: int) -> torch.Tensor:
    """The teacher's log-probs of the token after (doc, offset), the slow way: one forward pass on
    the window that owns it (window k starts at k * stride)."""
    splits = load_splits(config)
    (ref,) = teacher_refs(config, splits)
    model = load_teacher(ref, splits, torch.device("cpu"))
    context, stride = 16, 8
    k = 0 if offset < context else (offset - context) // stride + 1
    a = int(corpus.offsets[doc])
    x = torch.from_numpy(np.asarray(corpus.tokens[a + k * stride:a + offset + 1], dtype=np.int64))[None]
    with torch.no_grad():
        return torch.log_softmax(model(x)[0, -1].double() / config.teachers.temperature, -1)


@pytest.mark.parametrize("seq_len,packing", [(32, "concat"), (64, "concat"), (256, "concat"), (32, "pad"),
                                             (256, "pad")])
def test_students_of_any_layout_get_the_teachers_targets(doc_cache, seq_len, packing):
    config, d = doc_cache
    cache = lc.open_cache(d)
    corpus = load_splits(config).corpus
    ds = cache.dataset(batch_size=3, seed=1, layout=Layout(seq_len, packing), tokens=corpus.directory)
    seen, checked = [], 0
    for batch in ds:
        x = batch["inputs"]
        assert x.shape[1] == seq_len + 1
        p = corpus.offsets[batch["document"].numpy()] + batch["offset"].numpy()
        seen.extend(p.tolist())
        seq, pos = batch["sequence"], batch["position"]
        # the row's input at `position` is the token at p, its label the token after
        assert (x[seq, pos].numpy() == corpus.tokens[p]).all() and (x[seq, pos + 1].numpy() == corpus.tokens[p + 1]).all()
        if packing == "pad":  # one document per row
            assert (batch["segments"][batch["segments"] >= 0] == 0).all()
        for i in range(0, len(p), 97):  # a sample of rows against the teacher
            want = teacher_at(config, corpus, int(batch["document"][i]), int(batch["offset"][i]))
            assert torch.allclose(batch["logp"][i].double(), want, atol=2e-5)
            checked += 1
    assert sorted(seen) == np.flatnonzero(corpus.trained(0, corpus.n_tokens)).tolist()  # each target once
    assert checked > 3


def test_the_student_stage_trains_packed_and_unpacked_from_one_cache(doc_cache, tmp_path):
    config, d = doc_cache
    before = sorted(p.name for p in (d / "shards").iterdir())
    for packing, seq_len in (("concat", 32), ("pad", 24)):
        student = dataclasses.replace(config.student, seq_len=seq_len, packing=packing, baseline=False, epochs=1)
        results = student_stage.main(dataclasses.replace(config, student=student, run_name=f"s-{packing}"))
        assert [r.skipped for r in results] == [False]
    assert sorted(p.name for p in (d / "shards").iterdir()) == before  # the cache was not touched


def test_a_cache_is_refused_with_other_tokens(doc_cache, tmp_path):
    config, d = doc_cache
    corpus = load_splits(config).corpus
    other = Corpus(corpus.directory, corpus.split, corpus.tokens, corpus.offsets, corpus.mask, corpus.eos, "deadbeef")
    with pytest.raises(CacheError, match="not those cache"):
        lc.open_cache(d).dataset(batch_size=2, tokens=other)
    with pytest.raises(ValueError, match="pass tokens="):
        lc.open_cache(d).dataset(batch_size=2)


# ---------------------------------------------------------------------------------------------
# A mixture of two corpora and their caches


@pytest.fixture(scope="module")
def two_caches(doc_cache, tmp_path_factory):
    """doc_cache, and a second cache of another corpus tokenized with the same tokenizer."""
    config, d = doc_cache
    ws = config.workspace
    text = tmp_path_factory.mktemp("b") / "b.txt"
    words = ["alpha", "beta", "gamma", "delta", "return", "value", "the", "of", "list"]
    rng = np.random.default_rng(5)
    text.write_text("\n\n".join(" ".join(rng.choice(words, rng.integers(5, 60))) for _ in range(80)))
    tokenizer = load_splits(config).corpus.directory  # its manifest names the BPE it used
    import json

    bpe = str(Path(json.loads((tokenizer / "manifest.json").read_text())["tokenizer"]).parent)
    over = {"data": {**config_dict(config)["data"], "source": str(text), "tokenizer": bpe}}
    cfg_b = load_config(write_config(Path(ws) / "b.yaml", {**config_dict(config), **over, "run_name": "b"}))
    teacher_stage.main(cfg_b)
    return config, d, cfg_b, cache_stage.main(cfg_b)


def config_dict(config) -> dict:
    import yaml

    from pipeline.core.config import dump_yaml

    return yaml.safe_load(dump_yaml(config))


def test_a_mixture_takes_each_source_by_weight_with_unique_documents(two_caches):
    config, d_a, cfg_b, d_b = two_caches
    corpora = [load_splits(config).corpus, load_splits(cfg_b).corpus]
    caches = [lc.open_cache(d_a), lc.open_cache(d_b)]
    parts = [c.dataset(batch_size=4, seed=0, layout=Layout(32), tokens=k.directory) for c, k in zip(caches, corpora)]
    mix = lc.mixture(parts, weights=[1, 3], seed=2)
    n = len(parts[0]) + len(parts[1])
    batches = list(mix)
    sources = [int(b["source"][0]) for b in batches]
    assert len(batches) == n and sources.count(1) == round(n * 0.75) and sources.count(0) == n - round(n * 0.75)
    base = corpora[0].n_docs
    for b in batches:
        s = int(b["source"][0])
        doc = b["document"].numpy() - (base if s else 0)
        assert ((b["document"].numpy() >= base) == bool(s)).all()  # ids unique across the mixture
        corpus = corpora[s]
        p = corpus.offsets[doc] + b["offset"].numpy()
        x = b["inputs"]
        assert (x[b["sequence"], b["position"]].numpy() == corpus.tokens[p]).all()
    # resumed mid-epoch: the same remaining batches
    mix.seek(0, 5)
    again = list(mix)
    assert len(again) == n - 5
    for x, y in zip(again, batches[5:]):
        assert torch.equal(x["document"], y["document"]) and torch.equal(x["logp"], y["logp"])


def test_the_student_stage_trains_on_a_mixture(two_caches):
    config, _d_a, _cfg_b, d_b = two_caches
    from pipeline.core.config import MixtureSource

    student = dataclasses.replace(config.student, baseline=False, epochs=1,
                                  mixture=(MixtureSource("self", 1.0), MixtureSource(str(d_b), 2.0)))
    results = student_stage.main(dataclasses.replace(config, student=student, run_name="mix"))
    assert [r.skipped for r in results] == [False]


def test_a_mixture_state_resumes_and_refuses_another_shape(two_caches):
    config, d_a, cfg_b, d_b = two_caches
    corpora = [load_splits(config).corpus, load_splits(cfg_b).corpus]
    parts = [lc.open_cache(d).dataset(batch_size=4, layout=Layout(32), tokens=k.directory)
             for d, k in zip((d_a, d_b), corpora)]
    mix = lc.mixture(parts, weights=[1, 1], seed=3)
    mix.set_epoch(1)
    state = mix.state_dict(batches=2)
    full = list(mix)
    other = lc.mixture(parts, weights=[1, 1], seed=3)
    other.load_state_dict(state)
    assert [b["document"].tolist() for b in other] == [b["document"].tolist() for b in full[2:]]
    with pytest.raises(ValueError, match="the state has weights"):
        lc.mixture(parts, weights=[2, 1], seed=3).load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Chat data: only the assistant's tokens are cached and distilled


def test_chat_prompt_tokens_are_never_cached_nor_distilled(tmp_path):
    cfg = lm_config(tmp_path, data={"source": "examples/chat/chat.jsonl", "tokenizer": "examples/chat/tokenizer",
                                    "train_on": "assistant", "seq_len": 32, "max_sequences": 40},
                    cache={"encoding": "topk", "k": 4, "rows_per_shard": 256, "chunk_rows": 64, "batch_size": 8})
    cfg["teachers"]["epochs"] = 1
    config = load_config(write_config(tmp_path / "chat.yaml", cfg))
    teacher_stage.main(config)
    d = cache_stage.main(config)
    corpus = load_splits(config).corpus
    assert corpus.mask is not None
    # the slow way: a position is trained when the next token is the assistant's, in the same document
    trained, prompt = [], 0
    for doc in range(corpus.n_docs):
        a, b = int(corpus.offsets[doc]), int(corpus.offsets[doc + 1])
        for p in range(a, min(b, corpus.n_tokens) - 1):
            if corpus.mask[p + 1]:
                trained.append(p)
            else:
                prompt += 1
    assert prompt > len(trained) / 3  # the example has many prompt tokens
    rows = lc.open_cache(d).reader.read_all()
    cached = corpus.offsets[rows["sample_id"]] + rows["position"]
    assert cached.tolist() == trained  # every assistant token once, no prompt token
    manifest = lc.open_cache(d).manifest
    assert manifest["trained_tokens"] == len(trained) and manifest["positions"] == corpus.n_tokens
    ds = lc.open_cache(d).dataset(batch_size=4, layout=Layout(32), tokens=corpus.directory)
    distilled = 0
    for batch in ds:  # each loss row's label is an assistant token
        p = corpus.offsets[batch["document"].numpy()] + batch["offset"].numpy()
        assert corpus.mask[p + 1].all()
        distilled += len(p)
    assert distilled == len(trained)
    student = dataclasses.replace(config.student, baseline=False, epochs=1)
    assert [r.skipped for r in student_stage.main(dataclasses.replace(config, student=student))] == [False]


def test_a_damaged_loss_mask_is_found_and_rebuilt(tmp_path):
    from pipeline.inputs.tokens import tokenize

    cfg = lm_config(tmp_path, data={"source": "examples/chat/chat.jsonl", "tokenizer": "examples/chat/tokenizer",
                                    "train_on": "assistant", "seq_len": 32})
    d = load_config(write_config(tmp_path / "chat.yaml", cfg)).data
    directory = tokenize(d, str(tmp_path))
    mask = directory / "train.mask.bin"
    good = mask.read_bytes()
    damaged = bytearray(good)
    damaged[100] ^= 1
    mask.write_bytes(bytes(damaged))
    assert tokenize(d, str(tmp_path)) == directory and mask.read_bytes() == good  # found, rebuilt, never used
