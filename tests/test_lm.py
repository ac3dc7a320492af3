"""The language-model path end to end on tiny models: token caches, students, report, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from conftest import write_config

from pipeline.core.config import load_config
from pipeline.core.errors import CacheError, ConfigError, ModelError
from pipeline.format import reader as fmt
from pipeline.inputs.splits import load_splits
from stages import cache as cache_stage
from stages import student as student_stage
from stages import teachers as teacher_stage


def lm_config(ws, **over):
    cfg = {
        "workspace": str(ws), "run_name": "lm",
        "data": {"task": "lm", "source": "python-docs", "vocab_size": 600, "seq_len": 16, "max_sequences": 96},
        "teachers": {"epochs": 2, "batch_size": 16, "lr": 0.005, "temperature": 1.0,
                     "members": [{"name": "g", "arch": "gpt", "layers": 1, "d_model": 32, "heads": 2}]},
        "cache": {"encoding": "topk", "k": 8, "rows_per_shard": 512, "chunk_rows": 128, "batch_size": 8},
        "student": {"epochs": 2, "batch_size": 8, "alpha": 0.0, "logit_chunk": 100,
                    "models": [{"name": "s", "arch": "gpt", "layers": 1, "d_model": 16, "heads": 2}]},
    }
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v}
    return cfg


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    ws = tmp_path_factory.mktemp("lm")
    path = write_config(ws / "c.yaml", lm_config(ws))
    teacher_stage.main(load_config(path))
    return ws, path


def test_topk_token_cache_layout(lm):
    _ws, path = lm
    cfg = load_config(path)
    d = cache_stage.main(cfg)
    manifest = json.loads((d / "manifest.json").read_text())
    splits = load_splits(cfg)
    assert splits.num_classes == 600 and splits.vocab
    corpus = splits.corpus  # the first 96 sequences' worth of tokens (96 * 17), as documents
    trained = np.flatnonzero(corpus.trained(0, corpus.n_tokens))
    assert corpus.n_tokens == 96 * 17 and manifest["rows"] == len(trained) == 96 * 17 - corpus.n_docs
    assert manifest["dataset"]["vocab_fingerprint"] == splits.vocab and manifest["dataset"]["keyed"] == "document"
    assert manifest["bytes_per_token"] == manifest["bytes_per_row"] > 0
    g = zarr.open_group(str(d / "shards" / "00000.zarr"), mode="r")
    assert set(g.keys()) == {"sample_id", "position", "ids", "logp", "residual", "tail_mean_logp", "offsets",
                             "span_start", "span_length", "label", "label_logp"}  # what a student with another tokenizer aligns by
    assert g.attrs["logitcache"]["keyed"] == "document"
    data = fmt.CacheReader(d).read_all()
    # rows are (document, offset) of every trained position, in corpus order
    assert (corpus.offsets[data["sample_id"]] + data["position"] == trained).all()
    assert list(g["offsets"][:2]) == [0, int(corpus.offsets[1]) - 1]  # document 0's rows, then document 1's
    mass = np.exp(data["logp"].astype(np.float64)).sum(-1) + data["residual"]
    assert np.allclose(mass, 1.0, atol=0.02)


def test_sampled_cache_is_deterministic_and_students_train(lm, capsys):
    ws, path = lm
    cfg = load_config(path, ["cache.encoding=sampled", "cache.draws=12", "run_name=sampled", "student.baseline=false"])
    d = cache_stage.main(cfg)
    first = [s["sha256"] for s in json.loads((d / "manifest.json").read_text())["shards"]]
    import shutil

    shutil.rmtree(d)
    d = cache_stage.main(cfg)
    assert [s["sha256"] for s in json.loads((d / "manifest.json").read_text())["shards"]] == first
    data = fmt.CacheReader(d).read_all()
    assert (data["counts"].astype(int).sum(-1) == 12).all()
    assert json.loads((d / "manifest.json").read_text())["spec"]["encoding"]["ids"] == "u16"  # vocab 600
    results = student_stage.main(cfg)
    assert {r.job for r in results} == {"s-kd-s0"}
    history = json.loads((ws / "runs/sampled/students/s-kd-s0/history.json").read_text())
    assert history["epochs"][-1]["test_nll"] < history["epochs"][0]["test_nll"] + 0.5
    assert all(np.isfinite(history["losses"]))


def test_lm_run_reports_perplexity_for_every_model(lm, cli_run):
    ws, path = lm
    cli_run("run", str(path), "student.baseline=true", "student.divergence=jsd", "run_name=full")
    report = json.loads((ws / "runs/full/report.json").read_text())
    assert report["task"] == "lm" and report["test_rows"] > 0
    roles = [(r["model"], r["role"]) for r in report["rows"]]
    assert roles == [("g", "teacher"), ("ensemble", "ensemble"), ("s-kd-s0", "distilled"), ("s-hard-s0", "hard-label")]
    for r in report["rows"]:
        assert r["perplexity"] == pytest.approx(np.exp(r["nll"]), rel=1e-6) and r["perplexity"] < 600


def test_refusals(lm, tmp_path):
    _ws, path = lm
    with pytest.raises(ConfigError, match="cache.encoding: dense needs 600 values per row"):
        cache_stage.main(load_config(path, ["cache.encoding=dense", "cache.dense_max_classes=512"]))
    with pytest.raises(ConfigError, match="sampled caches support forward only"):
        load_config(path, ["cache.encoding=sampled", "student.divergence=reverse"])
    with pytest.raises(ConfigError, match=r"cache.stride: must be in 1..cache.context \(8\)"):
        load_config(path, ["cache.context=8", "cache.stride=9"])
    with pytest.raises(ConfigError, match="cache.context: the built-in gpt teachers read at most data.seq_len=16"):
        load_config(path, ["cache.context=32"])
    cache = cache_stage.main(load_config(path))
    other = load_config(path, ["data.vocab_size=500", f"student.cache={cache}"])
    with pytest.raises(CacheError, match="cache was made for dataset|tokenizer vocab"):
        student_stage.main(other)


def test_hf_teacher_from_local_directory(lm, tmp_path):
    transformers = pytest.importorskip("transformers")
    ws, path = lm
    cfg = load_config(path)
    splits = load_splits(cfg)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=600, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    model.save_pretrained(tmp_path / "hf")
    teacher = [{"name": "hf", "arch": "hf", "path": str(tmp_path / "hf")}]
    cfg2 = load_config(write_config(tmp_path / "c.yaml", lm_config(ws, teachers={"members": teacher})))
    d = cache_stage.main(cfg2)
    assert json.loads((d / "manifest.json").read_text())["teachers"] == ["hf"]

    # a model with its own, different tokenizer is refused
    import shutil

    tok_dir = next((ws / "tokenizers").iterdir())
    other = tmp_path / "other-tok"
    from pipeline.inputs.text import python_docs, train_tokenizer

    train_tokenizer(python_docs()[:50], 600, other)
    shutil.copy(other / "tokenizer.json", tmp_path / "hf" / "tokenizer.json")
    assert (tok_dir / "tokenizer.json").read_text() != (other / "tokenizer.json").read_text()
    with pytest.raises(ModelError, match="must share one tokenizer"):
        cache_stage.main(load_config(tmp_path / "c.yaml", ["cache.k=4"]))
    assert splits.vocab


def test_hf_teacher_with_an_output_layer_padded_past_the_tokenizer(lm, tmp_path):
    """Like Pythia (50,304 outputs for 50,277 tokens): the padded logits are dropped before the
    softmax, the targets equal those of the unpadded model, and the spec records both sizes."""
    transformers = pytest.importorskip("transformers")
    ws, _ = lm
    torch.manual_seed(0)
    small = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=600, n_positions=32, n_embd=32,
                                                                 n_layer=1, n_head=2, tie_word_embeddings=False))
    padded = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=627, n_positions=32, n_embd=32,
                                                                  n_layer=1, n_head=2, tie_word_embeddings=False))
    state = small.state_dict()
    for name, w in padded.state_dict().items():  # the same weights, plus 27 padded rows that win every argmax
        if w.shape == state[name].shape:
            w.copy_(state[name])
        else:
            w[:600] = state[name]
            w[600:] = 50.0
    dirs = {}
    for name, model in (("small", small), ("padded", padded)):
        model.save_pretrained(tmp_path / name)
        teacher = [{"name": "hf", "arch": "hf", "path": str(tmp_path / name)}]
        cfg = load_config(write_config(tmp_path / f"{name}.yaml", lm_config(ws, teachers={"members": teacher})),
                          ["cache.encoding=hybrid", "cache.k=8", "cache.draws=8"])
        dirs[name] = cache_stage.main(cfg)
    spec = json.loads((dirs["padded"] / "manifest.json").read_text())["spec"]
    assert spec["teachers"][0]["output_width"] == 627 and spec["teachers"][0]["vocab_size"] == 600
    assert spec["num_classes"] == 600 and "output_width" not in json.loads(
        (dirs["small"] / "manifest.json").read_text())["spec"]["teachers"][0]
    a, b = fmt.CacheReader(dirs["small"]).read_all(), fmt.CacheReader(dirs["padded"]).read_all()
    assert np.array_equal(a["ids"], b["ids"]) and np.allclose(a["logp"], b["logp"], atol=2e-3)
    assert b["ids"].max() < 600 and b["tail_ids"].max() < 600


def test_text_jsonl_and_parquet_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.inputs.text import python_docs

    docs = python_docs()[:300]
    (tmp_path / "c.txt").write_text("\n\n".join(d.replace("\n\n", "\n") for d in docs))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs))
    pq.write_table(pa.table({"body": docs}), tmp_path / "c.parquet")
    seqs = {}
    for name in ("c.txt", "c.jsonl", "c.parquet"):
        cfg = load_config(None, ["data.task=lm", f"data.source={tmp_path / name}", "data.text_field=body",
                                 "data.vocab_size=400", "data.seq_len=16", f"workspace={tmp_path}",
                                 "teachers.members=[{name: g, arch: gpt}]",
                                 "student.models=[{name: s, arch: gpt}]",
                                 "cache.rows_per_shard=512", "cache.chunk_rows=256"])
        splits = load_splits(cfg)
        assert splits.num_classes == 400 and splits.train.x.shape[1] == 17 and splits.train.x.dtype == np.int64
        seqs[name] = splits.train.x
    assert np.array_equal(seqs["c.jsonl"], seqs["c.parquet"])  # same documents, same tokens
    # pre-tokenized ids need the tokenizer they came from
    tok_dir = next((tmp_path / "tokenizers").iterdir())
    ids = [list(map(int, row)) for row in seqs["c.parquet"][:50]]
    pq.write_table(pa.table({"input_ids": ids}), tmp_path / "ids.parquet")
    base = ["data.task=lm", f"data.source={tmp_path / 'ids.parquet'}", "data.seq_len=16", f"workspace={tmp_path}",
            "teachers.members=[{name: g, arch: gpt}]", "student.models=[{name: s, arch: gpt}]",
            "cache.rows_per_shard=512", "cache.chunk_rows=256", "data.test_fraction=0.2"]
    with pytest.raises(Exception, match="pre-tokenized input_ids need the tokenizer"):
        load_splits(load_config(None, base))
    splits = load_splits(load_config(None, [*base, f"data.tokenizer={tok_dir}"]))
    assert splits.train.x.shape[1] == 17
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "fine"}\n{"text": "wrong field"}\n')
    with pytest.raises(Exception, match=r"bad.jsonl:2: expected a JSON object with a 'body' string"):
        load_splits(load_config(None, [*base[:1], f"data.source={bad}", *base[2:], "data.text_field=body"]))


def test_partial_token_cache_reports_missing_shards(lm, tmp_path, cli_run):
    _, path = lm
    cfg = load_config(path, [f"cache.root={tmp_path}"])
    d = cache_stage.main(cfg, shard_index=0, num_shards=2)
    listing = cli_run("caches", "ls", "--root", str(tmp_path)).output
    assert "partial 2/4 shards" in listing and "1625" in listing  # 1625 trained positions, 512 a shard
    info = json.loads(cli_run("caches", "inspect", d.name, "--root", str(tmp_path)).output)
    assert info["shards_expected"] == 4 and info["shards_missing"] == ["00001.zarr", "00003.zarr"]


def test_bundled_corpus_does_not_depend_on_what_else_was_imported(monkeypatch):
    import logging

    from pipeline.inputs.text import python_docs

    before = python_docs()

    def warning_twice(self, msg):
        """A method another package patches onto a standard-library class, as transformers does to
        logging.Logger; its docstring must not leak into the corpus and change every fingerprint."""

    monkeypatch.setattr(logging.Logger, "warning_twice", warning_twice, raising=False)
    assert python_docs() == before and len(before) > 1000
