"""Chat and instruction data: conversations rendered with the tokenizer's chat template, the loss
masks of chat, labels and loss_mask sources checked token by token against references built the
slow way, and the end-of-document token taken from the tokenizer or data.eos_token."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO

from pipeline.core.config import load_config
from pipeline.inputs import tokens
from pipeline.inputs.text import EOS

pytest.importorskip("transformers")

EXAMPLE = REPO / "examples" / "chat"
GPT = ["teachers.members=[{name: g, arch: gpt}]", "student.models=[{name: s, arch: gpt}]"]


def lm_cfg(ws: Path, source: Path | str, *extra: str):
    return load_config(None, ["data.task=lm", f"data.source={source}", "data.seq_len=16", f"workspace={ws}", *GPT,
                              "cache.rows_per_shard=512", "cache.chunk_rows=256", *extra])


def conversations(path: Path) -> list[list[dict[str, str]]]:
    return [json.loads(line)["messages"] for line in path.read_text().splitlines() if line.strip()]


def reference_chat(convs: list, tok_dir: Path, newline: bool = False) -> list[tuple[list[int], list[int]]]:
    """(ids, source mask) per conversation the slow way, without transformers or jinja: the ChatML
    of examples/chat/make.py written out piece by piece, each piece encoded alone (every piece
    starts at a special token or after the role's newline, so no token spans two of them), 1 on the
    assistant's content and its <|im_end|> (and the newline after it with `newline`)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    out = []
    for conv in convs:
        ids: list[int] = []
        mask: list[int] = []
        for m in conv:
            trained = int(m["role"] == "assistant")
            for piece, flag in (([start], 0), (tok.encode(m["role"] + "\n").ids, 0),
                                (tok.encode(m["content"]).ids, trained), ([end], trained),
                                (tok.encode("\n").ids, trained if newline else 0)):
                ids += piece
                mask += [flag] * len(piece)
        out.append((ids, mask))
    return out


def reference_files(docs: list[tuple[list[int], list[int]]], eos: int, seed: int = 0,
                    test_fraction: float = 0.25) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train and test (tokens, mask file) as the format defines them, document by document: the
    split by permutation, eos after each document with its last token's flag, first tokens 0."""
    order = np.random.default_rng(seed).permutation(len(docs))
    held_out = set(order[:max(1, round(len(docs) * test_fraction))].tolist())
    return {name: concatenated([doc for i, doc in enumerate(docs) if (i in held_out) == test], eos)
            for name, test in (("train", False), ("test", True))}


def concatenated(docs: list[tuple[list[int], list[int]]], eos: int) -> tuple[np.ndarray, np.ndarray]:
    """The documents' tokens, each followed by eos, and the mask file's flags."""
    flat: list[int] = []
    flags: list[int] = []
    for ids, mask in docs:
        doc_flags = [*mask, mask[-1] if mask else 0]
        doc_flags[0] = 0
        flat += [*ids, eos]
        flags += doc_flags
    return np.asarray(flat), np.asarray(flags, dtype=np.uint8)


def read_split(d: Path, split: str) -> tuple[dict, np.ndarray, np.ndarray | None]:
    m = tokens.read_manifest(d)
    flat = np.fromfile(d / m["splits"][split]["file"], dtype=m["dtype"])
    mask = tokens.mask(d, m, split)
    return m, flat, None if mask is None else np.asarray(mask)


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the committed example holds Python 3.11's docstrings")
def test_the_example_is_what_make_py_makes(tmp_path):
    """Run as a user runs it: in a fresh interpreter (a test process has patched inspect.getfile)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, str(EXAMPLE / "make.py"), str(tmp_path)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    for name in ("chat.jsonl", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (EXAMPLE / name).read_bytes(), name
    assert len(conversations(tmp_path / "chat.jsonl")) == 1134
    load_config(REPO / "configs" / "chat.yaml")


def test_chat_tokens_and_masks_equal_the_slow_reference(tmp_path, monkeypatch, cli_run):
    """The whole example, in batches that end inside the split: every token and every flag equals
    the reference, and the counts are the example's (70,259 tokens, 30,036 trained)."""
    monkeypatch.setattr(tokens, "BATCH_DOCS", 37)
    cfg = lm_cfg(tmp_path, EXAMPLE / "chat.jsonl", f"data.tokenizer={EXAMPLE / 'tokenizer'}")
    d = tokens.tokenize(cfg.data, str(tmp_path))
    docs = reference_chat(conversations(EXAMPLE / "chat.jsonl"), EXAMPLE / "tokenizer")
    ref = reference_files(docs, eos=0)
    totals = {"tokens": 0, "trained": 0}
    for split in ("train", "test"):
        m, flat, mask = read_split(d, split)
        entry = m["splits"][split]
        assert np.array_equal(flat, ref[split][0]) and np.array_equal(mask, ref[split][1])
        assert entry["mask"] == f"{split}.mask.bin" and entry["trained_tokens"] == int(ref[split][1].sum())
        assert (d / entry["mask"]).stat().st_size == entry["n_tokens"] == len(flat)
        assert entry["mask_sha256"] == hashlib.sha256((d / entry["mask"]).read_bytes()).hexdigest()
        totals["tokens"] += entry["n_tokens"]
        totals["trained"] += entry["trained_tokens"]
    assert m["eos"] == 0 and totals == {"tokens": 70_259, "trained": 30_036}
    assert (m["splits"]["train"]["n_docs"], m["splits"]["test"]["n_docs"]) == (850, 284)
    out = cli_run("tokenize", "configs/chat.yaml", f"workspace={tmp_path}", "data.test_fraction=0.25",
                  f"data.source={EXAMPLE / 'chat.jsonl'}", f"data.tokenizer={EXAMPLE / 'tokenizer'}").output
    assert out.splitlines()[-1].startswith(f"tokens {d.name}: train 850 docs 52477 tokens (22497 trained), "
                                           "test 284 docs 17782 tokens (7539 trained);"), out


def test_a_template_without_generation_markers_is_masked_by_token_prefixes(tmp_path):
    """Without {% generation %} the mask comes from rendering each conversation up to each assistant
    turn and comparing token prefixes: the flags the markers give, plus the newline the template
    writes after the turn (nothing tells it apart from the turn without markers)."""
    convs = conversations(EXAMPLE / "chat.jsonl")[:120]
    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    plain = tmp_path / "plain-tok"
    shutil.copytree(EXAMPLE / "tokenizer", plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    template = config["chat_template"].replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert "{% generation" not in template and "endgeneration" not in template
    (plain / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    dirs = {}
    for name, tok_dir in (("marked", EXAMPLE / "tokenizer"), ("plain", plain)):
        dirs[name] = tokens.tokenize(lm_cfg(tmp_path, source, f"data.tokenizer={tok_dir}").data, str(tmp_path))
    assert dirs["marked"] != dirs["plain"]  # the template is in the identity
    trained = {}
    for name, d in dirs.items():
        ref = reference_files(reference_chat(convs, EXAMPLE / "tokenizer", newline=name == "plain"), eos=0)
        for split in ("train", "test"):
            _, flat, mask = read_split(d, split)
            assert np.array_equal(flat, ref[split][0]) and np.array_equal(mask, ref[split][1]), (name, split)
        trained[name] = sum(tokens.read_manifest(d)["splits"][s]["trained_tokens"] for s in ("train", "test"))
    assert trained == {"marked": 3_345, "plain": 3_597}


def test_train_on_all_writes_no_mask(tmp_path):
    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations(EXAMPLE / "chat.jsonl")[:60]))
    tok = f"data.tokenizer={EXAMPLE / 'tokenizer'}"
    masked = tokens.tokenize(lm_cfg(tmp_path, source, tok).data, str(tmp_path))
    every = tokens.tokenize(lm_cfg(tmp_path, source, tok, "data.train_on=all").data, str(tmp_path))
    assert masked != every
    m = tokens.read_manifest(every)
    assert tokens.mask(every, m, "train") is None and "mask" not in m["splits"]["test"]
    assert sorted(p.name for p in every.iterdir()) == ["manifest.json", "test.bin", "test.offsets.npy",
                                                       "train.bin", "train.offsets.npy"]
    assert (every / "train.bin").read_bytes() == (masked / "train.bin").read_bytes()


def _ids_with_labels(n_docs: int, vocab: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    rng = np.random.default_rng(seed)
    ids = [rng.integers(1, vocab, rng.integers(0, 30)).tolist() for _ in range(n_docs)]
    labels = [[t if rng.random() < 0.6 else -100 for t in doc] for doc in ids]
    return ids, labels


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_labels_and_loss_mask_equal_the_reference(tmp_path, monkeypatch, suffix):
    """Pre-tokenized input_ids with labels (-100 = not trained) or loss_mask: the same mask file
    either way, equal to the reference; input_ids alone keep today's files and write no mask."""
    from pipeline.inputs import text

    monkeypatch.setattr(text, "PARQUET_BATCH", 16)
    monkeypatch.setattr(tokens, "BATCH_DOCS", 23)
    tok_dir = EXAMPLE / "tokenizer"
    ids, labels = _ids_with_labels(300, 2048)
    masks = [[int(x != -100) for x in doc] for doc in labels]
    columns = {"labels": {"input_ids": ids, "labels": labels}, "loss_mask": {"input_ids": ids, "loss_mask": masks},
               "plain": {"input_ids": ids}}
    dirs = {}
    for name, cols in columns.items():
        path = tmp_path / f"{name}{suffix}"
        if suffix == ".parquet":
            pq.write_table(pa.table(cols), path, row_group_size=50)
        else:
            path.write_text("".join(json.dumps({k: v[i] for k, v in cols.items()}) + "\n" for i in range(len(ids))))
        dirs[name] = tokens.tokenize(lm_cfg(tmp_path, path, f"data.tokenizer={tok_dir}").data, str(tmp_path))
    ref = reference_files(list(zip(ids, masks)), eos=0)
    for split in ("train", "test"):
        for name in ("labels", "loss_mask"):
            m, flat, mask = read_split(dirs[name], split)
            assert np.array_equal(flat, ref[split][0]) and np.array_equal(mask, ref[split][1]), name
        m, flat, mask = read_split(dirs["plain"], split)
        assert np.array_equal(flat, ref[split][0]) and mask is None and "trained_tokens" not in m["splits"][split]
    trained = sum(tokens.read_manifest(dirs["labels"])["splits"][s]["trained_tokens"] for s in ("train", "test"))
    assert trained == sum(int(r[1].sum()) for r in ref.values()) == 2_485


def test_bad_labels_masks_and_messages_are_refused_in_one_line(tmp_path, cli_run):
    tok = f"data.tokenizer={EXAMPLE / 'tokenizer'}"

    def refused(name: str, content: str | dict, *fragments: str, extra: tuple[str, ...] = (tok,)) -> None:
        path = tmp_path / name
        if isinstance(content, dict):
            pq.write_table(pa.table(content), path)
        else:
            path.write_text(content)
        (tmp_path / "c.yaml").write_text(f"workspace: {tmp_path}\n")
        result = cli_run("tokenize", str(tmp_path / "c.yaml"), "data.task=lm", f"data.source={path}", *GPT, *extra,
                         expect=None)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and "Traceback" not in result.output, result.output
        for f in fragments:
            assert f in lines[0], lines[0]

    shifted = json.dumps({"input_ids": [5, 6, 7], "labels": [6, 7, -100]})
    refused("shift.jsonl", '{"input_ids": [5, 6], "labels": [5, 6]}\n' + shifted + "\n",
            "shift.jsonl:2: labels[0] is 6 but input_ids[0] is 5", "not shifted")
    refused("short.parquet", {"input_ids": [[5, 6], [7, 8, 9]], "loss_mask": [[0, 1], [1, 1]]},
            "short.parquet row 1: 2 loss_mask for 3 input_ids")
    refused("two.parquet", {"input_ids": [[5, 6]], "loss_mask": [[0, 2]]},
            "two.parquet row 0: loss_mask holds 2; give 0 (not trained) or 1")
    refused("both.parquet", {"input_ids": [[5]], "labels": [[5]], "loss_mask": [[1]]},
            "both.parquet has both 'labels' and 'loss_mask'")
    refused("roles.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [{"content": "x"}]}\n',
            "roles.jsonl:2: messages[0] must be an object with 'role' and 'content' strings")
    refused("empty.jsonl", '{"messages": []}\n', "empty.jsonl:1: 'messages' must be a non-empty list")
    refused("notok.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n',
            "data.tokenizer", "holds chat messages", "chat_template", extra=())
    bare = tmp_path / "bare-tok"
    bare.mkdir()
    shutil.copy(EXAMPLE / "tokenizer" / "tokenizer.json", bare)
    (bare / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    refused("notemplate.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n',
            f"data.tokenizer: {bare} has no chat_template", extra=(f"data.tokenizer={bare}",))
    strict = tmp_path / "strict-tok"
    shutil.copytree(EXAMPLE / "tokenizer", strict)
    config = json.loads((strict / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{%- for m in messages -%}{%- if m['role'] == 'tool' -%}"
                               "{{- raise_exception('tool messages are not supported') -}}{%- endif -%}{%- endfor -%}"
                               + config["chat_template"])
    (strict / "tokenizer_config.json").write_text(json.dumps(config))
    ok = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    tool = json.dumps({"messages": [{"role": "tool", "content": "{}"}]})
    refused("tool.jsonl", "".join(f"{c}\n" for c in (ok, ok, ok, tool, ok)), "tool.jsonl: conversation 4: the chat template",
            "tool messages are not supported", extra=(f"data.tokenizer={strict}",))
    assert not list((tmp_path / "tokens").glob("*/manifest.json"))


# --- the end-of-document token -------------------------------------------------------------------


def word_tokenizer(out: Path, config: dict | None = None, special_map: dict | None = None) -> Path:
    """A word-level tokenizer of w0..w49 with <|endoftext|> (id 0) and </s> (id 1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {EOS: 0, "</s>": 1, "[UNK]": 2, **{f"w{i}": i + 3 for i in range(50)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    if config is not None:
        (out / "tokenizer_config.json").write_text(json.dumps(config))
    if special_map is not None:
        (out / "special_tokens_map.json").write_text(json.dumps(special_map))
    return out


def test_eos_is_the_declared_token_or_data_eos_token(tmp_path):
    source = tmp_path / "c.txt"
    rng = np.random.default_rng(0)
    source.write_text("\n\n".join(" ".join(f"w{i}" for i in rng.integers(0, 50, 12)) for _ in range(40)))
    toks = {"eos": word_tokenizer(tmp_path / "a", {"eos_token": EOS}),
            "s": word_tokenizer(tmp_path / "b", {"eos_token": {"content": "</s>", "special": True}}),
            "map": word_tokenizer(tmp_path / "c", {"bos_token": EOS}, {"eos_token": "</s>"})}
    got = {}
    for name, tok_dir in toks.items():
        cfg = lm_cfg(tmp_path, source, f"data.tokenizer={tok_dir}")
        d = tokens.tokenize(cfg.data, str(tmp_path))
        m, flat, _ = read_split(d, "train")
        offsets = np.load(d / "train.offsets.npy")
        got[name] = (m["eos"], set(flat[offsets[1:] - 1].tolist()), "eos" in tokens.identity(cfg.data))
    assert got == {"eos": (0, {0}, False), "s": (1, {1}, True), "map": (1, {1}, True)}
    # data.eos_token wins over the declaration, and its choice is in the directory's id
    declared = tokens.tokenize(lm_cfg(tmp_path, source, f"data.tokenizer={toks['eos']}").data, str(tmp_path))
    cfg = lm_cfg(tmp_path, source, f"data.tokenizer={toks['eos']}", "data.eos_token=</s>")
    d = tokens.tokenize(cfg.data, str(tmp_path))
    assert d != declared and tokens.read_manifest(d)["eos"] == 1
    assert np.array_equal(np.fromfile(d / "train.bin", np.uint16)[np.load(d / "train.offsets.npy")[1:] - 1], [1] * 30)


def test_plain_text_corpora_add_only_their_spans_to_their_ids(tmp_path):
    """The bundled corpus with the BPE trained here, and a tokenizer that declares <|endoftext|>: the
    identity has the keys it had before chat data, plus the spans every text corpus now records."""
    old_keys = {"format_version", "source", "text_field", "tokenizer", "split", "transfer", "spans"}
    assert set(tokens.identity(lm_cfg(tmp_path, "python-docs").data)) == old_keys
    tok_dir = word_tokenizer(tmp_path / "a", {"eos_token": EOS})
    (tmp_path / "c.txt").write_text("w1 w2\n\nw3\n")
    assert set(tokens.identity(lm_cfg(tmp_path, tmp_path / "c.txt", f"data.tokenizer={tok_dir}").data)) == old_keys


def test_a_missing_or_unknown_eos_is_refused_in_one_line(tmp_path, cli_run):
    (tmp_path / "c.txt").write_text("w1 w2\n\nw3 w4\n\nw5\n")
    (tmp_path / "c.yaml").write_text(f"workspace: {tmp_path}\n")
    cases = [(word_tokenizer(tmp_path / "none"), (), ("data.tokenizer", "declares no end-of-sequence token",
                                                      "set data.eos_token")),
             (word_tokenizer(tmp_path / "bad", {"eos_token": "<eos>"}), (),
              ("data.tokenizer: end-of-sequence token '<eos>' is not in the vocabulary", "data.eos_token")),
             (tmp_path / "bad", ("data.eos_token=<pad>",),
              ("data.eos_token: end-of-sequence token '<pad>' is not in the vocabulary", "give a token"))]
    for tok_dir, extra, fragments in cases:
        result = cli_run("tokenize", str(tmp_path / "c.yaml"), "data.task=lm", f"data.source={tmp_path / 'c.txt'}",
                         f"data.tokenizer={tok_dir}", *GPT, *extra, expect=None)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and "Traceback" not in result.output, result.output
        for f in fragments:
            assert f in lines[0], lines[0]
    assert not list((tmp_path / "tokens").glob("*/manifest.json"))


def test_each_split_has_the_mask_of_its_own_source(tmp_path):
    """data.source chat, data.test_source text, data.transfer.source labels: masks for train and
    transfer only."""
    source = tmp_path / "chat.jsonl"
    convs = conversations(EXAMPLE / "chat.jsonl")[:40]
    source.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"text": m["content"]}) + "\n" for c in convs for m in c))
    ids, labels = _ids_with_labels(25, 2048, seed=1)
    pq.write_table(pa.table({"input_ids": ids, "labels": labels}), tmp_path / "transfer.parquet")
    cfg = lm_cfg(tmp_path, source, f"data.tokenizer={EXAMPLE / 'tokenizer'}", f"data.test_source={tmp_path / 'test.jsonl'}",
                 f"data.transfer.source={tmp_path / 'transfer.parquet'}")
    d = tokens.tokenize(cfg.data, str(tmp_path))
    m = tokens.read_manifest(d)
    assert {name: "mask" in e for name, e in m["splits"].items()} == {"train": True, "test": False, "transfer": True}
    masks = [[int(x != -100) for x in doc] for doc in labels]
    for name, docs in (("train", reference_chat(convs, EXAMPLE / "tokenizer")), ("transfer", list(zip(ids, masks)))):
        _, flat, mask = read_split(d, name)
        ref_flat, ref_mask = concatenated(docs, eos=0)
        assert np.array_equal(flat, ref_flat) and np.array_equal(mask, ref_mask), name
    assert m["splits"]["transfer"]["trained_tokens"] == 249
