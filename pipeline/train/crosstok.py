"""A student with another tokenizer, trained from a token cache made with the teachers' tokenizer.

Both tokenizers read the same documents, and a text corpus records each token's character span
(pipeline/inputs/tokens.py); a cache of one stores, per row, the span of the token it predicts, that
token's teacher id and its log-prob under the targets (format/columns.ALIGN_COLUMNS), and the teacher
tokenizer's token bytes once (vocab.json). A student position p (its target is its token p + 1, of
characters [a, b)) and a teacher row are keyed alike by (document, start character of the predicted
token), so both sides are sorted the same way and matched by binary search:

- the student position *aligns* when a teacher row predicts a token that starts at a as well: both
  models predict what follows the same text, so the teacher's distribution can be moved onto the
  student's vocabulary (pipeline/inputs/vocab.py maps each teacher token to the student token its
  text starts with);
- the student position *owns* the teacher rows whose predicted tokens start inside [a, b); the first
  is its row for a vocabulary-free loss when it does not align (a student token holding part of a
  character owns none);
- a *chunk* runs from an aligned position to the next one: text both tokenizations cut at the same
  two places. The teacher's log-prob of the chunk is the sum of its rows' `label_logp`; the
  student's, the sum of its own tokens'. A chunk of one student token gives that token's probability
  under the teacher even when the teacher spells it with several tokens (the chain).

A student layout row owns the teacher rows its positions own, a contiguous range of the cache, so
the dataset plans, shuffles and reads it like the teachers' own layout (`cross_rows`). Tokens that
split one character into bytes (byte-level BPE on emoji or CJK) share that character's span: such a
student token never aligns (its bytes are not a whole character), a teacher's are summed in chunks.

Methods (`student.align`, the `align` argument of `cross_kd_loss`):
- "uld": Universal Logit Distillation (Boizard et al. 2024): the L1 distance between the sorted
  teacher and student probabilities at each position that owns a teacher row. Assumes nothing of
  the vocabularies; compares the shapes of the distributions only.
- "exact": the teacher's distribution moved onto the student's vocabulary at aligned positions
  (exact token matches, the text's first student token otherwise, and the chain's mass to the token
  the student reads), forward KL on it, and ULD between what could not be mapped (the tail of a
  top-k cache, tokens with no student counterpart) and the student's unmapped probabilities; ULD
  alone where positions do not align. Assumes the teacher's next-token probability of a text is the
  student's probability of its first token (a longer student token can merge across the teacher
  token's end).
- "span": forward KL between the chunk's probability under the teacher and under the student, as
  two-outcome distributions (the chunk or anything else), in the manner of approximate likelihood
  matching (Minixhofer et al. 2025). Assumes only that both models score the same text; it uses the
  realized chunk, not the distribution over alternatives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.core.errors import CacheError
from pipeline.format.reader import read_global
from pipeline.inputs.documents import Corpus, Layout, layout_rows

METHODS = ("uld", "exact", "span")
SHIFT = 32  # a key is document << SHIFT | character
END = (1 << SHIFT) - 1  # the character key past every token of a document
BLOCK = 1 << 20  # teacher rows whose keys are read at once when planning
KEY_COLUMNS = ("sample_id", "span_start", "label")  # what planning reads of each row (14-16 bytes)


def keys(documents: np.ndarray, chars: np.ndarray) -> np.ndarray:
    return (np.asarray(documents, dtype=np.int64) << SHIFT) | np.asarray(chars, dtype=np.int64)


@dataclass(frozen=True)
class CrossRows:
    """A student layout's rows over its own corpus, each owning teacher cache rows [lo, hi): row i
    reads student tokens [start[i], stop[i]) and owns the targets of positions [start[i], end[i])."""

    start: np.ndarray
    stop: np.ndarray
    end: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


@dataclass(frozen=True)
class Cross:
    """How a student with its own tokenizer reads a cache: its rows, the map of teacher ids to its
    vocabulary (pipeline/inputs/vocab.py; -1: unmapped), the method and its vocabulary's size."""

    rows: CrossRows
    vocab_map: torch.Tensor  # (teacher vocabulary,) int64
    align: str
    vocab_size: int


def position_keys(corpus: Corpus, p: np.ndarray) -> np.ndarray:
    """The key of each student position p: (its document, start of token p + 1), or (document, END)
    where p + 1 is in another document (p is the document's last token)."""
    p = np.asarray(p, dtype=np.int64)
    doc = corpus.document_of(p)
    inside = p + 1 < corpus.offsets[doc + 1]
    chars = np.full(len(p), END, dtype=np.int64)
    chars[inside] = corpus.spans[p[inside] + 1, 0]
    return keys(doc, chars)


def cross_rows(corpus: Corpus, layout: Layout, reader: Any, teacher_docs: int, teacher_eos: int) -> CrossRows:
    """The student's layout rows and the teacher rows each owns, found in one pass over the cache's
    key columns (BLOCK rows at a time). On the way, each document's length by the teachers' eos row
    (label `teacher_eos`) is checked against the student's tokens: the same documents."""
    if corpus.spans is None:
        raise CacheError(f"{corpus.directory}: the student's tokenized corpus has no character spans (pre-tokenized "
                         "or chat data); a student with another tokenizer reads a text corpus")
    if corpus.n_docs != teacher_docs:
        raise CacheError(f"{corpus.directory}: {corpus.n_docs} documents in its {corpus.split} split, the cache's "
                         f"corpus has {teacher_docs}; tokenize the same data (source, split) with the student's tokenizer")
    rows = layout_rows(corpus, layout)
    end = np.minimum(rows.stop, rows.start + layout.seq_len)
    lo_keys = position_keys(corpus, rows.start)
    last_doc = corpus.document_of(end - 1)
    same = (end < corpus.n_tokens) & (corpus.document_of(np.minimum(end, corpus.n_tokens - 1)) == last_doc)
    hi_keys = np.where(same, position_keys(corpus, np.minimum(end, corpus.n_tokens - 1)), keys(last_doc, END))
    query = np.concatenate([lo_keys, hi_keys])
    order = np.argsort(query, kind="stable")
    found = np.empty(len(query), dtype=np.int64)
    doc_chars = np.asarray(corpus.spans[corpus.offsets[1:] - 1, 0], dtype=np.int64)
    i, total = 0, reader.rows
    for r0 in range(0, total, BLOCK):
        r1 = min(r0 + BLOCK, total)
        part = read_global(reader, [(r0, r1)], decode=False)
        k = keys(part["sample_id"], part["span_start"])
        if len(k) > 1 and np.any(np.diff(k) < 0):
            raise CacheError(f"{reader.dir}: rows are not in (document, character) order; the cache is damaged: "
                             "rebuild it")
        _check_lengths(corpus, doc_chars, part, teacher_eos)
        j = i + int(np.searchsorted(query[order[i:]], k[-1], side="right")) if len(k) else i
        found[order[i:j]] = r0 + np.searchsorted(k, query[order[i:j]], side="left")
        i = j
    found[order[i:]] = total
    lo, hi = found[:len(rows.start)], found[len(rows.start):]
    keep = hi > lo
    return CrossRows(rows.start[keep], rows.stop[keep], end[keep], lo[keep], hi[keep])


def _check_lengths(corpus: Corpus, doc_chars: np.ndarray, part: dict[str, np.ndarray], eos: int) -> None:
    """The rows predicting a document's end (label eos) start at the document's length in
    characters: it must be the student's document's length too."""
    at = part["label"] == eos
    d = part["sample_id"][at].astype(np.int64)
    theirs = part["span_start"][at].astype(np.int64)
    mine = np.where(d < corpus.n_docs, doc_chars[np.minimum(d, corpus.n_docs - 1)], -1)
    bad = np.flatnonzero(mine != theirs)
    if len(bad):
        i = bad[0]
        raise CacheError(f"{corpus.directory}: document {int(d[i])} has {int(mine[i])} characters, the cache's has "
                         f"{int(theirs[i])}; tokenize the same data (source, split, text_field) with the student's "
                         "tokenizer")


def whole_tokens(corpus: Corpus, p: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Which target tokens p + 1 (of spans `t`) hold whole characters: their span differs from
    their neighbours' in the document (byte tokens of one character share it); an eos (empty span)
    is whole."""
    before = np.all(np.asarray(corpus.spans[p], dtype=np.int64) == t, axis=1)
    inside = p + 2 < corpus.offsets[corpus.document_of(p) + 1]
    after = np.zeros(len(p), dtype=bool)
    after[inside] = np.all(np.asarray(corpus.spans[p[inside] + 2], dtype=np.int64) == t[inside], axis=1)
    return ~(before | after) | (t[:, 0] == t[:, 1])


def align_batch(corpus: Corpus, rows: CrossRows, items: np.ndarray, teacher: dict[str, np.ndarray],
                lengths: np.ndarray) -> dict[str, torch.Tensor]:
    """What the loss needs to match a batch's student positions with its teacher rows.

    `items`: the batch's layout rows, in batch order; `teacher` its teacher rows (sample_id, span,
    label, label_logp), grouped by item in that order, `lengths` of each. Returns, per student
    target position n of the batch (rows of the (B, L) inputs, in order): `x_sequence`, `x_position`,
    `x_row` (its first owned teacher row of the batch, -1 if none), `x_aligned`, `x_chunk` (its
    chunk, -1 if none) and per chunk `chunk_teacher_logp`, `chunk_size` (student tokens) and
    `chunk_first` (its first teacher row)."""
    kt = keys(teacher["sample_id"], teacher["span_start"])
    t_end = teacher["span_start"].astype(np.int64) + teacher["span_length"]
    label_logp = teacher["label_logp"].astype(np.float64)
    offs = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("seq", "pos", "row", "aligned", "chunk")}
    chunk_logp: list[np.ndarray] = []
    chunk_size: list[np.ndarray] = []
    chunk_first: list[np.ndarray] = []
    n_chunks = 0
    for b, i in enumerate(items):
        a, e = int(rows.start[i]), int(rows.end[i])
        p = np.arange(a, e, dtype=np.int64)
        doc = corpus.document_of(p)
        target = p + 1 < corpus.offsets[doc + 1]  # text: every position but a document's last has a target
        p, doc = p[target], doc[target]
        if not len(p):
            continue
        s_span = np.asarray(corpus.spans[p + 1], dtype=np.int64)  # the student's predicted tokens
        whole = whole_tokens(corpus, p, s_span)
        lo, hi = int(offs[b]), int(offs[b + 1])
        k_item = kt[lo:hi]
        ks = keys(doc, s_span[:, 0])
        first = np.searchsorted(k_item, ks, side="left")  # (positions,) into the item's rows
        stop = np.searchsorted(k_item, keys(doc, s_span[:, 1]), side="left")
        owns = first < np.maximum(stop, first + (s_span[:, 0] == s_span[:, 1]))
        owns &= (first < hi - lo) & whole  # a token holding part of a character is distilled in its chunk only
        aligned = owns & (k_item[np.minimum(first, hi - lo - 1)] == ks)
        row = np.where(owns, lo + first, -1)
        # chunks: from each aligned position to the next aligned one (or the item's end)
        at = np.flatnonzero(aligned)
        chunk = np.full(len(p), -1, dtype=np.int64)
        starts = np.union1d(at, np.flatnonzero(np.diff(doc, prepend=-1)))  # a chunk never spans documents
        if len(at):
            bounds = np.append(starts, len(p))
            last = bounds[1:] - 1  # each chunk's last position
            eos = s_span[last, 0] == s_span[last, 1]  # an eos's row starts where it ends
            t_lo = lo + first[starts]
            t_hi = lo + np.searchsorted(k_item, keys(doc[last], s_span[last, 1]) + eos, side="left")
            ok = aligned[starts] & (t_hi > t_lo)
            where = np.maximum(t_hi - 1, 0)
            ok &= (t_end[where] == s_span[last, 1]) & (teacher["sample_id"][where].astype(np.int64) == doc[starts])
            ids = np.full(len(starts), -1, dtype=np.int64)
            ids[ok] = n_chunks + np.arange(int(ok.sum()))
            chunk = np.repeat(ids, np.diff(bounds))
            csum = np.concatenate([[0.0], np.cumsum(label_logp)])
            chunk_logp.append((csum[t_hi] - csum[t_lo])[ok])
            chunk_size.append(np.diff(bounds)[ok])
            chunk_first.append(t_lo[ok])
            n_chunks += int(ok.sum())
        out["seq"].append(np.full(len(p), b, dtype=np.int64))
        out["pos"].append(p - a)
        out["row"].append(row)
        out["aligned"].append(aligned)
        out["chunk"].append(chunk)

    def cat(parts: list[np.ndarray], dtype: Any) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype))

    return {"x_sequence": cat(out["seq"], np.int64), "x_position": cat(out["pos"], np.int64),
            "x_row": cat(out["row"], np.int64), "x_aligned": cat(out["aligned"], bool),
            "x_chunk": cat(out["chunk"], np.int64), "chunk_teacher_logp": cat(chunk_logp, np.float64),
            "chunk_size": cat(chunk_size, np.int64), "chunk_first": cat(chunk_first, np.int64)}
