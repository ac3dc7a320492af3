"""`logitcache import-logprobs`: a token-level top-k cache from a served teacher's prompt log-probs.

    logitcache import-logprobs served.jsonl --tokenizer tok/ --out data/caches --top-n 20 --teacher my-llm@rev

Input: one JSON object per line (blank lines skipped), for one prompt, in either form:

  vLLM (`SamplingParams(prompt_logprobs=N)`, RequestOutput fields):
    {"id": 7, "text": "...", "prompt_token_ids": [...],                  # prompt_token_ids optional
     "prompt_logprobs": [null, {"464": {"logprob": -0.1, "rank": 1, "decoded_token": " The"}, ...}, ...]}

  OpenAI-compatible completions (`echo: true, logprobs: N, max_tokens: 0`), the choice's fields:
    {"id": 7, "text": "...", "logprobs": {"tokens": ["The", " cat", ...], "token_logprobs": [null, ...],
                                          "top_logprobs": [null, {" cat": -0.4, " dog": -1.9}, ...]}}
    (a whole response, {"choices": [{"text": ..., "logprobs": ...}]}, is read from its first choice)

`id` (int) is the sample id (default: the line's index among non-blank lines); `text` is required:
it is tokenized with the local tokenizer and must give exactly the served tokens (vLLM: the
prompt_token_ids, one entry per token, and each position's dict holding the prompt token itself,
as vLLM always returns it; OpenAI: the token strings mapped to ids). Token strings map to ids as
"token_id:123" (vLLM's return_tokens_as_token_ids), then as a vocabulary entry ("Ġcat"), then as
the text of one token (" cat"); a string that is none of these, or the text of several tokens, is
refused. Entry i (i >= 1) is the teacher's distribution over token i given tokens < i, at T = 1; it
becomes the cache row at position i - 1 (the distribution after reading tokens 0..i-1, as
`logitcache cache` stores it). The N most probable entries are kept (N = --top-n <= 20; fewer is
refused), and the residual mass is 1 - their probability sum, clamped at 0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import DataError
from pipeline.core.io import check_writable, file_digest
from pipeline.format.writer import CacheWriter
from pipeline.inputs.text import Tokenizer

MAX_TOP_N = 20


class _Vocab:
    """Token strings of a served response to ids, through the local tokenizer."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self._decoded: dict[str, int | None] | None = None

    def id_of(self, s: str) -> int | None:
        if s.startswith("token_id:") and s[9:].isdigit():
            return int(s[9:])
        i = self.tok.hf.token_to_id(s)
        if i is not None:
            return i
        if self._decoded is None:  # built once: the text of every single token
            self._decoded = {}
            for j in range(self.tok.vocab_size):
                text = self.tok.hf.decode([j], skip_special_tokens=False)
                self._decoded[text] = None if text in self._decoded else j  # None: ambiguous
        return self._decoded.get(s)


def import_logprobs(file: Path, tokenizer: Path, root: Path, top_n: int, teacher: str, backend: str = "zarr",
                    rows_per_shard: int | None = None, chunk_rows: int | None = None) -> Path:
    """Write the cache; returns its directory. Refuses a bad line with DataError naming file:line,
    before anything is written when the file cannot be read or `root` cannot be written."""
    if not 1 <= top_n <= MAX_TOP_N:
        raise DataError(f"--top-n {top_n}: servers return at most {MAX_TOP_N} log-probs per token; use 1..{MAX_TOP_N}")
    if not file.is_file():
        raise DataError(f"{file}: no such file; give the JSONL of served prompt log-probs")
    check_writable(Path(root), "--out")
    tok = Tokenizer(tokenizer, "--tokenizer")
    vocab = _Vocab(tok)
    digest = file_digest(file)
    spec = {"teacher": {"name": teacher, "served": True}, "dataset": {"fingerprint": digest[:16], "source": file.name},
            "vocab_fingerprint": tok.fingerprint, "top_n": top_n, "importer": "import-logprobs/1"}
    writer = CacheWriter(root, spec=spec, encoding={"name": "topk", "k": top_n}, num_classes=tok.vocab_size,
                         backend=backend, rows_per_shard=rows_per_shard, chunk_rows=chunk_rows, temperature=1.0,
                         tokens=True)
    first_line: dict[int, int] = {}  # sample id -> the line that gave it
    with writer as w, open(file, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{file}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text (byte {e.start} of the line); save the file as UTF-8") from None
            if not line.strip():
                continue
            sample_id, ids, logp = _parse(line, where, tok, vocab, top_n, len(first_line))
            if sample_id in first_line:
                raise DataError(f"{where}: id {sample_id} was already given on line {first_line[sample_id]}; sample "
                                "ids key every row of the cache, so each prompt needs its own id")
            first_line[sample_id] = line_no
            w.add([sample_id], topk=(ids[None], logp[None]))
        if not first_line:
            raise DataError(f"{file}: no records (the file is empty or holds only blank lines); give one JSON "
                            "object per prompt, one per line")
    return w.path


def _parse(line: str, where: str, tok: Tokenizer, vocab: _Vocab, top_n: int,
           index: int) -> tuple[int, np.ndarray, np.ndarray]:
    """One line -> (sample id, top-N ids (n - 1, N), log-probs (n - 1, N))."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
    if isinstance(obj, dict) and isinstance(obj.get("choices"), list) and obj["choices"]:
        obj = {**obj["choices"][0], **({"id": obj["id"]} if isinstance(obj.get("id"), int) else {})}
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise DataError(f"{where}: expected an object with the prompt's 'text' (see `logitcache import-logprobs --help`)")
    sample_id = obj.get("id", index)
    if not isinstance(sample_id, int) or isinstance(sample_id, bool) or not -2**63 <= sample_id < 2**63:
        raise DataError(f"{where}: 'id' must be an integer sample id (int64), got {sample_id!r}")
    tokens = tok.hf.encode(obj["text"]).ids
    if "prompt_logprobs" in obj:
        entries = _vllm(obj, where, tokens)
    elif isinstance(obj.get("logprobs"), dict):
        entries = _openai(obj["logprobs"], where, tokens, vocab)
    else:
        raise DataError(f"{where}: no 'prompt_logprobs' (vLLM) or 'logprobs' (OpenAI completions) field")
    if len(tokens) < 2:
        raise DataError(f"{where}: a prompt of {len(tokens)} token(s) has no next-token log-probs to cache")
    ids = np.zeros((len(entries), top_n), dtype=np.int64)
    logp = np.zeros((len(entries), top_n), dtype=np.float32)
    for p, entry in enumerate(entries):
        if len(entry) < top_n:
            raise DataError(f"{where}: token {p + 1} has {len(entry)} log-probs, fewer than --top-n {top_n}")
        best = sorted(entry.items(), key=lambda kv: (-kv[1], kv[0]))[:top_n]
        for j, (i, lp) in enumerate(best):
            if not 0 <= i < tok.vocab_size:
                raise DataError(f"{where}: token {p + 1}: id {i} is outside the tokenizer's vocabulary of "
                                f"{tok.vocab_size}; use the tokenizer the server used")
            if not lp <= 1e-4:  # also catches NaN
                raise DataError(f"{where}: token {p + 1}: log-prob {lp} is not <= 0")
            ids[p, j], logp[p, j] = i, min(lp, 0.0)
    return sample_id, ids, logp


def _logprob(value: Any, where: str, p: int) -> float:
    lp = value.get("logprob") if isinstance(value, dict) else value
    if not isinstance(lp, (int, float)) or isinstance(lp, bool):
        raise DataError(f"{where}: token {p}: log-prob {value!r} is not a number")
    return float(lp)


def _vllm(obj: dict[str, Any], where: str, tokens: list[int]) -> list[dict[int, float]]:
    served = obj.get("prompt_token_ids")
    if served is not None and list(served) != tokens:
        raise DataError(f"{where}: prompt_token_ids do not match the tokenized text ({len(served)} served vs "
                        f"{len(tokens)} local tokens, first difference at {_first_diff(served, tokens)}); use the "
                        "tokenizer the server used")
    plp = obj["prompt_logprobs"]
    if not isinstance(plp, list) or len(plp) != len(tokens):
        n = len(plp) if isinstance(plp, list) else "no"
        raise DataError(f"{where}: prompt_logprobs has {n} entries but the text has {len(tokens)} tokens; use the "
                        "tokenizer the server used")
    out = []
    for p in range(1, len(tokens)):
        if not isinstance(plp[p], dict):
            raise DataError(f"{where}: prompt_logprobs[{p}] is not a dict of token id -> log-prob")
        try:
            entry = {int(k): _logprob(v, where, p) for k, v in plp[p].items()}
        except ValueError:
            raise DataError(f"{where}: prompt_logprobs[{p}] has a key that is not a token id") from None
        if tokens[p] not in entry:  # vLLM always includes the prompt token itself
            raise DataError(f"{where}: token {p} of the tokenized text (id {tokens[p]}) is not among "
                            f"prompt_logprobs[{p}]; the text was tokenized differently from the server")
        out.append(entry)
    return out


def _openai(lp: dict[str, Any], where: str, tokens: list[int], vocab: _Vocab) -> list[dict[int, float]]:
    served, top = lp.get("tokens"), lp.get("top_logprobs")
    if not isinstance(served, list) or not isinstance(top, list) or len(top) != len(served):
        raise DataError(f"{where}: logprobs needs 'tokens' and 'top_logprobs' lists of one length")
    served_ids = [_to_id(s, vocab, where, p) for p, s in enumerate(served)]
    if served_ids != tokens:
        raise DataError(f"{where}: the served tokens do not match the tokenized text ({len(served)} served vs "
                        f"{len(tokens)} local tokens, first difference at {_first_diff(served_ids, tokens)}); use the "
                        "tokenizer the server used")
    out = []
    for p in range(1, len(tokens)):
        if not isinstance(top[p], dict):
            raise DataError(f"{where}: top_logprobs[{p}] is not a dict of token -> log-prob")
        entry: dict[int, float] = {}
        for s, v in top[p].items():
            entry[_to_id(s, vocab, where, p)] = _logprob(v, where, p)
        out.append(entry)
    return out


def _to_id(s: Any, vocab: _Vocab, where: str, p: int) -> int:
    i = vocab.id_of(s) if isinstance(s, str) else None
    if i is None:
        raise DataError(f"{where}: token {p}: {s!r} is not one token of the tokenizer (or the text of several); "
                        "use the tokenizer the server used, or serve with return_tokens_as_token_ids")
    return i


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

