"""The tokenize step: token files equal to the old in-memory packing, reuse, content addressing,
crash safety, flat memory, and one-line refusals of bad text."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, TESTS

from pipeline.core.config import load_config
from pipeline.core.errors import DataError
from pipeline.core.io import hash_json
from pipeline.inputs import text, tokens
from pipeline.inputs.arrays import MappedRows
from pipeline.inputs.documents import open_corpus
from pipeline.inputs.splits import load_splits
from pipeline.inputs.text import EOS, python_docs, train_tokenizer

SEQ = 16


def word_tokenizer(out: Path, n_words: int) -> Path:
    """A word-level tokenizer of `n_words` words w0, w1, ... plus EOS, its declared eos_token (fast: no BPE)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {EOS: 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(n_words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    return out


def old_read(path: Path, field: str = "body") -> list:
    """Documents as the former reader returned them: the whole file read into one list."""
    if path.suffix == ".txt":
        return [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    if path.suffix == ".jsonl":
        return [json.loads(line)[field] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    table = pq.read_table(path)
    if "input_ids" in table.column_names:
        return table.column("input_ids").to_pylist()
    return [t for t in table.column(field).to_pylist() if t]


def old_sequences(docs: list, tok_dir: Path, seed: int = 0,
                  test_fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """The former in-memory path, the slow way: every document in a list, split by a permutation,
    encoded whole, joined with eos in a Python list, cut into (N, SEQ + 1) sequences."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    order = np.random.default_rng(seed).permutation(len(docs))
    n_test = max(1, round(len(docs) * test_fraction))
    out = []
    for part in (sorted(order[n_test:]), sorted(order[:n_test])):
        chosen = [docs[i] for i in part]
        lists = chosen if chosen and not isinstance(chosen[0], str) else [e.ids for e in tok.encode_batch(chosen)]
        flat: list[int] = []
        for ids in lists:
            flat.extend(ids)
            flat.append(eos)
        n = len(flat) // (SEQ + 1)
        out.append(np.asarray(flat[: n * (SEQ + 1)], dtype=np.int64).reshape(n, SEQ + 1))
    return out[0], out[1]


GPT = ["teachers.members=[{name: g, arch: gpt}]", "student.models=[{name: s, arch: gpt}]"]


def lm_cfg(ws: Path, source: Path | str, *extra: str):
    return load_config(None, ["data.task=lm", f"data.source={source}", f"data.seq_len={SEQ}", f"workspace={ws}",
                              "data.text_field=body", *GPT, "cache.rows_per_shard=512", "cache.chunk_rows=256", *extra])


def lm_yaml(ws: Path, source: Path, *data: str) -> str:
    (ws / "c.yaml").write_text("\n".join([
        f"workspace: {ws}", "data:", "  task: lm", f"  source: {source}", *(f"  {d}" for d in data),
        "teachers: {members: [{name: g, arch: gpt}]}", "student: {models: [{name: s, arch: gpt}]}", ""]))
    return str(ws / "c.yaml")


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return [d.replace("\n\n", "\n") for d in python_docs()[:400]]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory, docs) -> Path:
    return train_tokenizer(docs[:100], 500, tmp_path_factory.mktemp("bpe"))


def write_source(path: Path, docs: list) -> Path:
    if path.suffix == ".txt":
        path.write_text("\n\n".join(docs) + "\n")
    elif path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps({"body": d}) for d in docs) + "\n")
    else:
        column = "input_ids" if docs and not isinstance(docs[0], str) else "body"
        pq.write_table(pa.table({column: docs}), path, row_group_size=37)
    return path


@pytest.mark.parametrize("name", ["c.txt", "c.jsonl", "c.parquet"])
def test_sequences_equal_the_in_memory_path(tmp_path, monkeypatch, docs, bpe, name):
    monkeypatch.setattr(text, "BLOCK", 97)  # blocks end inside paragraphs, words and multi-byte characters
    monkeypatch.setattr(text, "PARQUET_BATCH", 10)
    monkeypatch.setattr(tokens, "BATCH_DOCS", 16)  # batches end at either bound; the two documents longer
    monkeypatch.setattr(tokens, "BATCH_CHARS", 4000)  # than 4,000 characters come alone
    source = write_source(tmp_path / name, docs)
    splits = load_splits(lm_cfg(tmp_path, source, f"data.tokenizer={bpe}"))
    train, test = old_sequences(old_read(source), bpe)
    assert isinstance(splits.train.x, MappedRows) and splits.train.x.dtype == np.int64
    assert np.array_equal(splits.train.x[:], train) and np.array_equal(splits.test.x[:], test)
    assert splits.train.fingerprint == splits.train._scan()  # remembered value is the content's


def test_text_with_crlf_and_multibyte_characters_across_blocks(tmp_path, monkeypatch, bpe):
    monkeypatch.setattr(text, "BLOCK", 5)
    body = "caf\u00e9 \u2603 na\u00efve\r\n\r\nsecond \u00e9\u00e9\u00e9\r\n\r\n\r\n\n\nthird\rline\n\n \n\n"
    (tmp_path / "c.txt").write_bytes(body.encode())
    got = list(text.iter_documents(str(tmp_path / "c.txt"), "data.source", "text"))
    assert got == [d.strip() for d in (tmp_path / "c.txt").read_text(encoding="utf-8").split("\n\n") if d.strip()]
    assert text.count_documents(str(tmp_path / "c.txt"), "data.source", "text") == len(got) == 3


def test_paragraphs_equal_splitting_the_whole_file(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    pieces = ["a", "b", " ", "\n", "\n", "\n\n", "\r\n", "\r", "\u00e9", "\u2603"]
    for _ in range(200):
        (tmp_path / "c.txt").write_bytes("".join(rng.choice(pieces, rng.integers(0, 60))).encode())
        whole = (tmp_path / "c.txt").read_text(encoding="utf-8")
        for block in (1, 2, 3, 7):
            monkeypatch.setattr(text, "BLOCK", block)
            got = list(text.iter_documents(str(tmp_path / "c.txt"), "data.source", "text"))
            assert got == [d.strip() for d in whole.split("\n\n") if d.strip()], (whole, block)


def test_trained_tokenizer_and_split_match_the_in_memory_path(tmp_path, docs):
    """data.tokenizer null: the BPE is trained from the streamed training documents and keyed as before."""
    source = write_source(tmp_path / "c.jsonl", docs)
    splits = load_splits(lm_cfg(tmp_path, source, "data.vocab_size=400", "data.split_seed=3", "data.test_fraction=0.2"))
    order = np.random.default_rng(3).permutation(len(docs))
    train_docs = [docs[i] for i in sorted(order[max(1, round(len(docs) * 0.2)):])]
    key = hash_json({"docs": hashlib.sha256("\x00".join(train_docs).encode()).hexdigest(), "vocab_size": 400})[:12]
    [tok_dir] = list((tmp_path / "tokenizers").iterdir())
    assert tok_dir.name == key
    ref = train_tokenizer(train_docs, 400, tmp_path / "ref")
    assert (tok_dir / "tokenizer.json").read_text() == (ref / "tokenizer.json").read_text()
    train, test = old_sequences(docs, tok_dir, seed=3, test_fraction=0.2)
    assert np.array_equal(splits.train.x[:], train) and np.array_equal(splits.test.x[:], test)


def test_pretokenized_input_ids(tmp_path, monkeypatch, docs, bpe):
    monkeypatch.setattr(text, "PARQUET_BATCH", 16)
    from tokenizers import Tokenizer

    ids = [e.ids for e in Tokenizer.from_file(str(bpe / "tokenizer.json")).encode_batch(docs)] + [[]]
    source = write_source(tmp_path / "ids.parquet", ids)
    splits = load_splits(lm_cfg(tmp_path, source, f"data.tokenizer={bpe}"))
    train, test = old_sequences(old_read(source), bpe)
    assert np.array_equal(splits.train.x[:], train) and np.array_equal(splits.test.x[:], test)
    pq.write_table(pa.table({"input_ids": [[1, 2], [3, 600]]}), tmp_path / "big.parquet")
    with pytest.raises(DataError, match=r"big.parquet: token id 600 outside the tokenizer's vocabulary of 500"):
        tokens.tokenize(lm_cfg(tmp_path, tmp_path / "big.parquet", f"data.tokenizer={bpe}").data, str(tmp_path))
    assert not list((tmp_path / "tokens").glob(".tmp-*"))


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    tok_dir = word_tokenizer(tmp_path / "tok", 70_000)
    rng = np.random.default_rng(0)
    docs = [" ".join(f"w{w}" for w in rng.integers(0, 70_000, rng.integers(1, 40))) for _ in range(300)]
    source = write_source(tmp_path / "c.txt", docs)
    cfg = lm_cfg(tmp_path, source, f"data.tokenizer={tok_dir}")
    splits = load_splits(cfg)
    manifest = tokens.read_manifest(tokens.tokenize(cfg.data, str(tmp_path)))
    assert manifest["dtype"] == "uint32" and manifest["vocab_size"] == 70_002 and splits.num_classes == 70_002
    train, test = old_sequences(old_read(source), tok_dir)
    assert train.max() > 65_535
    assert np.array_equal(splits.train.x[:], train) and np.array_equal(splits.test.x[:], test)


def test_files_offsets_and_max_sequences(tmp_path, docs, bpe):
    source = write_source(tmp_path / "c.jsonl", docs)
    cfg = lm_cfg(tmp_path, source, f"data.tokenizer={bpe}", "data.max_sequences=8")
    d = tokens.tokenize(cfg.data, str(tmp_path))
    m = tokens.read_manifest(d)
    flat = np.fromfile(d / "train.bin", dtype=np.uint16)
    offsets = np.load(d / "train.offsets.npy")
    assert offsets.dtype == np.int64 and offsets[0] == 0
    assert offsets[-1] == len(flat) == m["splits"]["train"]["n_tokens"]
    assert len(offsets) == m["splits"]["train"]["n_docs"] + 1 and (flat[offsets[1:] - 1] == m["eos"]).all()
    assert m["splits"]["train"]["n_docs"] + m["splits"]["test"]["n_docs"] == len(docs)
    splits = load_splits(cfg)
    assert splits.train.x.shape == (8, SEQ + 1) and splits.test.x.shape == (2, SEQ + 1)
    assert np.array_equal(splits.train.x[:], flat[: 8 * (SEQ + 1)].reshape(8, SEQ + 1))


def test_second_call_reuses_the_files(tmp_path, monkeypatch, docs, bpe, cli_run):
    source = write_source(tmp_path / "c.txt", docs)
    cfg = lm_cfg(tmp_path, source, f"data.tokenizer={bpe}")
    first = tokens.tokenize(cfg.data, str(tmp_path))
    stamp = (first / "manifest.json").stat().st_mtime_ns

    def no_encoding(*_args, **_kw):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(text.Tokenizer, "encode", no_encoding)
    monkeypatch.setattr(tokens, "tokenizer_for", no_encoding)
    assert tokens.tokenize(cfg.data, str(tmp_path)) == first
    assert (first / "manifest.json").stat().st_mtime_ns == stamp
    out = cli_run("tokenize", lm_yaml(tmp_path, source, f"tokenizer: {bpe}", "text_field: body")).output
    assert out.startswith(f"tokens {first.name}: train ") and str(first) in out
    with source.open("a") as f:  # a changed source is another corpus
        f.write("\n\none more paragraph\n")
    monkeypatch.undo()
    second = tokens.tokenize(cfg.data, str(tmp_path))
    assert second != first and first.is_dir()
    assert tokens.tokenize(lm_cfg(tmp_path, source, f"data.tokenizer={bpe}", "data.split_seed=1").data,
                           str(tmp_path)) not in (first, second)


KILL_AT_CLOSE = """
import os, signal, sys
from pipeline.core.config import load_config
from pipeline.inputs import tokens
tokens.TokenFile.close = lambda self: os.kill(os.getpid(), signal.SIGKILL)
cfg = load_config(None, sys.argv[2:])
tokens.tokenize(cfg.data, sys.argv[1])
"""


def test_killed_writer_leaves_nothing_that_looks_complete(tmp_path, docs, bpe):
    source = write_source(tmp_path / "c.txt", docs)
    args = ["data.task=lm", f"data.source={source}", f"data.tokenizer={bpe}", f"workspace={tmp_path}", *GPT]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    p = subprocess.run([sys.executable, "-c", KILL_AT_CLOSE, str(tmp_path), *args], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == -signal.SIGKILL, p.stderr
    root = tmp_path / "tokens"
    left = sorted(p.name.split("-")[0] for p in root.iterdir())
    assert left == [".lock", ".tmp"]  # only the dead writer's temp dir and its lock, never read as data
    cfg = load_config(None, args)
    d = tokens.tokenize(cfg.data, str(tmp_path))  # clears the dead writer's leftovers, writes a complete one
    assert [p.name for p in root.iterdir()] == [d.name] and tokens.read_manifest(d)["complete"] is True
    (d / "manifest.json").unlink()  # a damaged directory is rebuilt, never taken as complete
    load_splits(load_config(None, [*args, "data.seq_len=8"]))
    assert [p.name for p in root.iterdir()] == [d.name] and tokens.token_problem(d) is None


def test_error_during_tokenizing_removes_the_temporary_directory(tmp_path, monkeypatch, docs, bpe):
    source = write_source(tmp_path / "c.txt", docs)

    def interrupted(self, ids, masks=None, spans=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokens.TokenFile, "append", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tokens.tokenize(lm_cfg(tmp_path, source, f"data.tokenizer={bpe}").data, str(tmp_path))
    assert list((tmp_path / "tokens").iterdir()) == []


def test_losing_writer_keeps_the_winners_files(tmp_path, monkeypatch, docs, bpe):
    source = write_source(tmp_path / "c.txt", docs)
    cfg = lm_cfg(tmp_path, source, f"data.tokenizer={bpe}")
    winner = tokens.tokenize(cfg.data, str(tmp_path))
    stamp = (winner / "manifest.json").stat().st_mtime_ns
    real_exists, looked = Path.exists, []

    def not_yet(self: Path) -> bool:  # the other writer looked once, before the winner published
        if self == winner and not looked:
            looked.append(self)
            return False
        return real_exists(self)

    monkeypatch.setattr(Path, "exists", not_yet)
    assert tokens.tokenize(cfg.data, str(tmp_path)) == winner
    monkeypatch.undo()
    assert (winner / "manifest.json").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "tokens").iterdir()] == [winner.name]


def _one_line(result, *fragments: str) -> None:
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error"), result.output
    for f in fragments:
        assert f in lines[0], lines[0]


def test_bad_text_is_refused_in_one_line(tmp_path, cli_run):
    (tmp_path / "latin.txt").write_bytes(("fine text\n\n" * 200 + "caf\u00e9\n").encode("latin-1"))
    _one_line(cli_run("tokenize", lm_yaml(tmp_path, tmp_path / "latin.txt"), expect=None),
              "data.source", "latin.txt", f"not UTF-8 text (byte {11 * 200 + 3})")
    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n\n{"body": "wrong field"}\n')
    _one_line(cli_run("tokenize", str(tmp_path / "c.yaml"), f"data.source={tmp_path / 'c.jsonl'}", expect=None),
              "c.jsonl:3: expected a JSON object with a 'text' string (data.text_field)")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    _one_line(cli_run("tokenize", str(tmp_path / "c.yaml"), f"data.source={tmp_path / 'n.parquet'}", expect=None),
              "data.source", "n.parquet", "column 'text' (data.text_field) must hold strings")
    _one_line(cli_run("tokenize", "configs/demo.yaml", f"workspace={tmp_path}", expect=None),
              "data.task: tokenize applies to data.task lm")
    assert not (tmp_path / "tokens").exists() or not list((tmp_path / "tokens").iterdir())


MEASURE = """
import resource, sys
from pipeline.core.config import load_config
from pipeline.inputs import tokens
cfg = load_config(None, sys.argv[1:])
tokens.tokenize(cfg.data, cfg.workspace)
print("peak_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _corpus(path: Path, n_tokens: int, n_words: int) -> None:
    """Paragraphs of 1..400 random words w0..w{n_words-1}: one block of 1,000 generated once, written
    as often as it takes."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 400, 1000)
    words = [f"w{i}" for i in rng.integers(0, n_words, int(lengths.sum()))]
    ends = np.cumsum(lengths)
    block = "\n\n".join(" ".join(words[e - n:e]) for e, n in zip(ends, lengths)) + "\n\n"
    with open(path, "w") as f:
        f.writelines(block for _ in range(-(-n_tokens // int(ends[-1] + len(lengths)))))


@pytest.mark.slow
def test_memory_does_not_grow_with_the_corpus(tmp_path):
    """~2M and ~20M tokens tokenized in fresh processes: the same peak resident memory."""
    tok_dir = word_tokenizer(tmp_path / "tok", 1000)
    peaks = {}
    for n in (2_000_000, 20_000_000):
        _corpus(tmp_path / f"c{n}.txt", n, 1000)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
        p = subprocess.run([sys.executable, "-c", MEASURE, "data.task=lm",
                            f"data.source={tmp_path / f'c{n}.txt'}", f"data.tokenizer={tok_dir}",
                            f"workspace={tmp_path / str(n)}", *GPT], env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=600, check=False)
        assert p.returncode == 0, p.stderr + p.stdout
        peaks[n] = int(p.stdout.split("peak_kib")[1])
        (tmp_path / f"c{n}.txt").unlink()
        m = tokens.read_manifest(next((tmp_path / str(n) / "tokens").iterdir()))
        assert m["splits"]["train"]["n_tokens"] + m["splits"]["test"]["n_tokens"] >= n
    assert peaks[20_000_000] < 1.15 * peaks[2_000_000], peaks


def test_a_batch_of_long_documents_is_bounded_by_characters(tmp_path):
    """40 documents of 250,000 characters (50,000 tokens each) are encoded one at a time: the peak
    is that of tokenizing 4 of them (283 MB both). Batched by document count alone, the 40 went into
    the tokenizer together and peaked at 402 MB."""
    tok_dir = word_tokenizer(tmp_path / "tok", 1000)
    rng = np.random.default_rng(0)
    doc = " ".join(f"w{i}" for i in rng.integers(0, 1000, 50_000))
    assert len(doc) > tokens.BATCH_CHARS
    peaks = {}
    for n in (4, 40):
        source = tmp_path / f"c{n}.txt"
        with open(source, "w") as f:
            f.writelines(doc + "\n\n" for _ in range(n))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
        p = subprocess.run([sys.executable, "-c", MEASURE, "data.task=lm", f"data.source={source}",
                            f"data.tokenizer={tok_dir}", f"workspace={tmp_path / str(n)}", *GPT],
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
        assert p.returncode == 0, p.stderr + p.stdout
        peaks[n] = int(p.stdout.split("peak_kib")[1]) / 1024
        m = tokens.read_manifest(next((tmp_path / str(n) / "tokens").iterdir()))
        assert m["splits"]["train"]["n_tokens"] + m["splits"]["test"]["n_tokens"] == n * 50_001
    assert peaks[40] < 1.1 * peaks[4], peaks


def test_text_tokens_record_their_character_spans(tmp_path, bpe):
    """Each token's span is where the tokenizer says it came from (the slow way: each document
    encoded alone), the eos spans (len, len), and the token files are unchanged by recording them;
    pre-tokenized sources have no spans. A damaged spans file is found and the corpus tokenized again."""
    from tokenizers import Tokenizer

    docs = ["Hello  world\n\tna\u00efve caf\u00e9 \U0001F600 \u4e2d\u6587", "  leading and trailing  ", "x"] * 5
    source = write_source(tmp_path / "c.jsonl", docs)
    d = lm_cfg(tmp_path, source, f"data.tokenizer={bpe}", "data.test_fraction=0.2").data
    directory = tokens.tokenize(d, str(tmp_path))
    manifest = tokens.read_manifest(directory)
    assert manifest["identity"]["spans"] == "char"
    hf = Tokenizer.from_file(str(bpe / "tokenizer.json"))
    order = np.random.default_rng(d.split_seed).permutation(len(docs))
    held = set(order[:max(1, round(len(docs) * d.test_fraction))].tolist())
    for split, keep in (("train", False), ("test", True)):
        mine = [doc for i, doc in enumerate(docs) if (i in held) == keep]
        if split == "train":
            train_docs = mine
        expect = np.concatenate([np.vstack([np.asarray(hf.encode(doc).offsets).reshape(-1, 2), [[len(doc)] * 2]])
                                 for doc in mine])
        entry = manifest["splits"][split]
        got = np.fromfile(directory / entry["spans"], dtype="<i4").reshape(-1, 2)
        assert got.shape == (entry["n_tokens"], 2) and np.array_equal(got, expect)
    corpus = open_corpus(directory, manifest, "train")
    for i, doc in enumerate(train_docs):  # the spans tile each document's text
        spans = _distinct(corpus.spans[corpus.offsets[i]:corpus.offsets[i + 1] - 1])
        assert "".join(doc[s:e] for s, e in spans) == doc
    (directory / "train.spans.bin").write_bytes(b"\0" * (directory / "train.spans.bin").stat().st_size)
    assert "train.spans.bin: its size or sha256 differs" in tokens.token_problem(directory)
    assert tokens.tokenize(d, str(tmp_path)) == directory and tokens.token_problem(directory) is None
    ids = write_source(tmp_path / "ids.parquet", [[1, 2, 3], [4, 5]])
    pre = tokens.read_manifest(tokens.tokenize(lm_cfg(tmp_path, ids, f"data.tokenizer={bpe}").data, str(tmp_path)))
    assert "spans" not in pre["identity"] and "spans" not in pre["splits"]["train"]


def _distinct(spans: np.ndarray) -> list[tuple[int, int]]:
    """Spans in order, a character split over several byte tokens once."""
    out: list[tuple[int, int]] = []
    for s, e in spans.tolist():
        if not out or out[-1] != (s, e):
            out.append((s, e))
    return out
