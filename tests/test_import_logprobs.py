"""`logitcache import-logprobs`: vLLM prompt_logprobs and OpenAI completions logprobs rows, made
here from a tokenizer trained in the test and a known teacher distribution, become a top-k cache
with the exact residual; rows whose tokens do not match the text are refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import pipeline as lc
from pipeline.inputs.text import Tokenizer, train_tokenizer

TEXTS = ["the cat sat on the mat", "a dog ran in the park today", "the cat and the dog", "hello world of cats"]
N = 5


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS * 20, 300, out)
    return out


def teacher(tok: Tokenizer, n_tokens: int, seed: int) -> np.ndarray:
    """Log-probs (n_tokens, V) of a made-up teacher at each prompt position."""
    z = torch.randn(n_tokens, tok.vocab_size, generator=torch.Generator().manual_seed(seed)) * 3
    return torch.log_softmax(z, -1).numpy()


def vllm_row(tok, text, i, logp):
    ids = tok.hf.encode(text).ids
    plp = [None]
    for p in range(1, len(ids)):
        top = np.argsort(-logp[p])[:N]
        entry = {str(int(j)): {"logprob": float(logp[p, j]), "rank": r + 1, "decoded_token": tok.hf.decode([int(j)])}
                 for r, j in enumerate(top)}
        if str(ids[p]) not in entry:  # vLLM adds the prompt token with its rank
            entry[str(ids[p])] = {"logprob": float(logp[p, ids[p]]), "rank": int((logp[p] > logp[p, ids[p]]).sum()) + 1,
                                  "decoded_token": tok.hf.decode([ids[p]])}
        plp.append(entry)
    return {"id": i, "text": text, "prompt_token_ids": ids, "prompt_logprobs": plp}


def openai_row(tok, text, i, logp):
    ids = tok.hf.encode(text).ids
    tokens = [tok.hf.decode([j]) for j in ids]  # the text of each token, as servers return it
    top = [None] + [{tok.hf.id_to_token(int(j)): float(logp[p, j]) for j in np.argsort(-logp[p])[:N]}
                    for p in range(1, len(ids))]
    return {"choices": [{"text": text, "logprobs": {"tokens": tokens, "token_logprobs": [None] * len(ids),
                                                   "top_logprobs": top}}], "id": i}


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("form", [vllm_row, openai_row])
def test_import_gives_top_n_with_the_residual(tmp_path, tok_dir, cli_run, form):
    tok = Tokenizer(tok_dir)
    teach = {i: teacher(tok, len(tok.hf.encode(t).ids), i) for i, t in enumerate(TEXTS)}
    f = write_jsonl(tmp_path / "served.jsonl", [form(tok, t, i, teach[i]) for i, t in enumerate(TEXTS)])
    out = cli_run("import-logprobs", str(f), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "caches"),
                  "--top-n", str(N), "--teacher", "llm@rev1", "--chunk-rows", "8", "--rows-per-shard", "16")
    cache = lc.open_cache(out.output.split()[1].rstrip(":"), root=tmp_path / "caches")
    expected_rows = sum(len(tok.hf.encode(t).ids) - 1 for t in TEXTS)
    assert cache.rows == expected_rows and cache.token_rows and cache.temperature == 1.0
    assert cache.num_classes == tok.vocab_size and cache.teachers == ["llm@rev1"]
    inputs = {i: np.array(tok.hf.encode(t).ids) for i, t in enumerate(TEXTS)}
    seen = []
    for b in cache.dataset(batch_size=2, seed=0, inputs=inputs):
        for j, sid in enumerate(b["sequence_id"].tolist()):
            rows = b["sequence"] == j
            pos = b["position"][rows].numpy()
            assert pos.tolist() == list(range(len(inputs[sid]) - 1))
            lp = teach[sid][pos + 1]  # row p: the distribution over token p + 1
            top = np.argsort(-lp, axis=-1)[:, :N]
            assert np.array_equal(b["ids"][rows].numpy(), top)
            vals = np.take_along_axis(lp, top, -1)
            assert np.allclose(b["logp"][rows].numpy(), vals, atol=2e-3)
            assert np.allclose(b["residual"][rows].numpy(), 1 - np.exp(vals).sum(-1), atol=2e-3)
            assert b["input_lengths"][j] == len(inputs[sid])
            seen.append(sid)
    assert sorted(seen) == [0, 1, 2, 3]


def test_import_refuses_rows_whose_tokens_do_not_match(tmp_path, tok_dir, cli_run):
    tok = Tokenizer(tok_dir)
    lp = teacher(tok, 40, 0)
    good = vllm_row(tok, TEXTS[0], 0, lp)
    root = str(tmp_path / "caches")

    def refused(row, line_no=2):
        f = write_jsonl(tmp_path / "bad.jsonl", [good, row])
        out = cli_run("import-logprobs", str(f), "--tokenizer", str(tok_dir), "--out", root, "--top-n", str(N),
                      expect=1)
        assert len(out.output.strip().splitlines()) == 1 and f"bad.jsonl:{line_no}:" in out.output
        return out.output

    wrong_ids = {**vllm_row(tok, TEXTS[1], 1, lp)}
    wrong_ids["prompt_token_ids"] = wrong_ids["prompt_token_ids"][::-1]
    assert "prompt_token_ids do not match the tokenized text" in refused(wrong_ids)
    other_text = {**vllm_row(tok, TEXTS[1], 1, lp), "text": TEXTS[2], "prompt_token_ids": None}
    assert "tokeniz" in refused(other_text)
    short = vllm_row(tok, TEXTS[1], 1, lp)
    own = str(short["prompt_token_ids"][2])  # keep only the prompt token itself
    short["prompt_logprobs"][2] = {own: short["prompt_logprobs"][2][own]}
    assert "fewer than --top-n" in refused(short)
    oa = openai_row(tok, TEXTS[1], 1, lp)
    oa["choices"][0]["logprobs"]["tokens"][1] = "zzqqxx"
    assert "not one token of the tokenizer" in refused(oa)
    oa = openai_row(tok, TEXTS[1], 1, lp)
    oa["choices"][0]["text"] = TEXTS[0]
    assert "do not match the tokenized text" in refused(oa)
    assert "expected an object" in refused("{")  # json.dumps of a str: a JSON string, not an object
    assert not list((tmp_path / "caches").glob("*/manifest.json"))  # nothing half-imported counts as a cache
    out = cli_run("import-logprobs", str(tmp_path / "bad.jsonl"), "--tokenizer", str(tok_dir), "--out", root,
                  "--top-n", "21", expect=1)
    assert "at most 20" in out.output
