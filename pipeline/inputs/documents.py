"""A tokenized split seen as documents: where each token target lives, which positions are
trained, the teacher's context windows over a document, and the rows a student lays out.

A token target is keyed by where it occurs: (document, offset), the distribution of the token
after position `offset` of the document, given the tokens before it. In the split's flat token
file that is position p = offsets[document] + offset, and the cache holds one row per *trained*
position, in flat order:

- p + 1 is inside the split and is not the first token of a document (the eos that ends each
  document is predicted; the next document's first token is not, from another document);
- with a loss mask (chat data, `labels` of -100), mask[p + 1] is 1.

So the cache's row of position p is R(p), the number of trained positions before p, and any
contiguous range of positions owns a contiguous range of cache rows: a student of any seq_len and
packing gathers its targets by R (`Layout`), without touching the cache.

The teacher reads each document with its own context (`windows`): a document longer than
`context` tokens is read in windows starting every `stride` tokens, and each window keeps the
positions the previous one could not see with `context - stride` tokens before them, so every
target has at least that much left context (or the whole document before it).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import DataError
from pipeline.core.io import hash_json
from pipeline.core.validate import FIELDS, argument, choice

BLOCK = 1 << 22  # positions counted at once when a mask must be summed (4 MB of mask, a few times that in sums)
PACKINGS = ("concat", "pad")


@dataclass(frozen=True)
class Corpus:
    """One split of a tokenized corpus (pipeline/inputs/tokens.py), mapped, never loaded whole:
    the token file and mask are memory maps; the document offsets (8 bytes a document) are read."""

    directory: Path
    split: str
    tokens: np.ndarray  # (n_tokens,) memmap
    offsets: np.ndarray  # (n_docs + 1,) int64: document d is tokens[offsets[d]:offsets[d + 1]], eos last
    mask: np.ndarray | None  # (n_tokens,) uint8 memmap: 1 where the prediction of that token is trained
    eos: int
    fingerprint: str  # of the tokens (and mask) these documents hold
    cap: int | None = None  # only the split's first `cap` tokens
    spans: np.ndarray | None = None  # (n_tokens, 2) int32 memmap: each token's character span in its document

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled (to a spawned DataLoader worker) as where it is: the worker maps the files again."""
        return _reopen, (self.directory, self.split, self.cap)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    def identity(self) -> dict[str, Any]:
        return {"tokens": self.directory.name, "split": self.split, "documents": self.n_docs,
                "positions": self.n_tokens, "masked": self.mask is not None, "fingerprint": self.fingerprint}

    def document_of(self, positions: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, positions, side="right") - 1

    def trained(self, lo: int, hi: int) -> np.ndarray:
        """(hi - lo,) bool: which positions p in [lo, hi) have a target (a byte each, nothing wider)."""
        n = self.n_tokens
        ok = np.ones(hi - lo, dtype=bool)
        if hi >= n:  # the last position predicts nothing
            ok[max(n - 1 - lo, 0):] = False
        starts = self.offsets[np.searchsorted(self.offsets, lo + 1):np.searchsorted(self.offsets, hi, side="right")]
        ok[starts - lo - 1] = False  # the next token opens another document
        if self.mask is not None:
            top = min(hi + 1, n)
            if top > lo + 1:
                ok[:top - lo - 1] &= np.asarray(self.mask[lo + 1:top]) != 0
        return ok

    def rows_before(self, points: np.ndarray) -> np.ndarray:
        """R(x) for each x of `points`: trained positions before x."""
        points = np.clip(np.asarray(points, dtype=np.int64), 0, self.n_tokens)
        if self.mask is None:  # all but the last position of each document
            return points - np.searchsorted(self.offsets[1:], points, side="right")
        order = np.argsort(points, kind="stable")
        points = points[order]
        out = np.empty(len(points), dtype=np.int64)
        base, i = 0, 0
        for lo in range(0, self.n_tokens, BLOCK):  # one pass over the mask, a block at a time
            hi = min(lo + BLOCK, self.n_tokens)
            j = np.searchsorted(points, hi, side="left")
            if j > i:
                counts = np.concatenate([[0], np.cumsum(self.trained(lo, hi), dtype=np.int64)])
                out[i:j] = base + counts[points[i:j] - lo]
                i = j
            else:
                counts = None
            base += int(counts[-1]) if counts is not None else int(self.trained(lo, hi).sum())
        out[i:] = base
        result = np.empty_like(out)
        result[order] = out
        return result

    def positions_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """The position of cache row r for each r of `rows` (sorted ascending; r equal to the number
        of rows gives n_tokens): the r-th trained position, so R(position) = r."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.full(len(rows), self.n_tokens, dtype=np.int64)
        base, i = 0, 0
        for lo in range(0, self.n_tokens, BLOCK):
            if i == len(rows):
                break
            hi = min(lo + BLOCK, self.n_tokens)
            where = np.flatnonzero(self.trained(lo, hi))
            j = int(np.searchsorted(rows, base + len(where), side="left"))
            out[i:j] = lo + where[rows[i:j] - base]
            i, base = j, base + len(where)
        return out

    def windows(self, lo: int, hi: int, context: int, stride: int) -> list[Window]:
        """The teacher's reads that produce the targets of positions [lo, hi), in order."""
        out = []
        d_lo = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        d_hi = int(np.searchsorted(self.offsets, hi, side="left"))
        for d in range(max(d_lo, 0), min(d_hi, self.n_docs)):
            a, b = int(self.offsets[d]), int(self.offsets[d + 1])
            o_lo, o_hi = max(lo, a) - a, min(hi, b - 1) - a  # targets of this document in range
            if o_hi <= o_lo:
                continue
            for k in range(_owner(o_lo, context, stride), _owner(o_hi - 1, context, stride) + 1):
                own_lo, own_hi = (0, context) if k == 0 else ((k - 1) * stride + context, k * stride + context)
                keep_lo, keep_hi = max(own_lo, o_lo), min(own_hi, o_hi)
                if keep_hi > keep_lo:
                    out.append(Window(d, a + k * stride, a + keep_hi, a + keep_lo, a + keep_hi))
        return out


def window_batches(corpus: Corpus, lo: int, hi: int, context: int, stride: int,
                   batch: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The teacher's inputs for the targets of positions [lo, hi), `batch` windows at a time:
    (tokens (windows, width) right-padded with eos, flat positions of the kept targets in order,
    their indices into tokens' windows x width). The teachers are causal, so padding after a
    position never changes its logits."""
    keep = []
    for w in corpus.windows(lo, hi, context, stride):
        p = w.keep_lo + np.flatnonzero(corpus.trained(w.keep_lo, w.keep_hi))
        if len(p):
            keep.append((w, p))
    for i in range(0, len(keep), batch):
        group = keep[i:i + batch]
        width = max(w.stop - w.start for w, _ in group)
        x = np.full((len(group), width), corpus.eos, dtype=np.int64)
        for j, (w, _) in enumerate(group):
            x[j, :w.stop - w.start] = corpus.tokens[w.start:w.stop]
        yield (x, np.concatenate([p for _, p in group]),
               np.concatenate([j * width + p - w.start for j, (w, p) in enumerate(group)]))


@dataclass(frozen=True)
class Window:
    """The teacher reads tokens[start:stop] and keeps the trained positions in [keep_lo, keep_hi)."""

    document: int
    start: int
    stop: int
    keep_lo: int
    keep_hi: int


def context_window(context: int | None, stride: int | None, seq_len: int) -> tuple[int, int]:
    """(context, stride) of the teachers' reads: cache.context (default data.seq_len) and
    cache.stride (default half the context)."""
    context = context or seq_len
    return context, stride or max(1, context // 2)


def _owner(offset: int, context: int, stride: int) -> int:
    """The window that keeps `offset`: window 0 keeps [0, context), window k >= 1 the `stride`
    positions after the previous one's, [(k - 1) * stride + context, k * stride + context)."""
    return 0 if offset < context else (offset - context) // stride + 1


def open_corpus(directory: Path, manifest: dict[str, Any], split: str, cap: int | None = None) -> Corpus:
    """`split` of the tokenized corpus in `directory`; with `cap`, only its first `cap` tokens (the
    document they cut ends there, without a target for its last token)."""
    entry = manifest["splits"].get(split)
    fix = f"remove {directory} and rerun `logitcache tokenize`"
    if entry is None:
        raise DataError(f"{directory}: tokenized corpus has no {split} split; {fix}")
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    n = int(entry["n_tokens"])
    offsets = np.load(directory / entry["offsets"], mmap_mode="r")
    if offsets.shape != (entry["n_docs"] + 1,) or int(offsets[-1]) != n:
        raise DataError(f"{directory / entry['offsets']}: {len(offsets)} offsets ending at {int(offsets[-1])}, "
                        f"the manifest says {entry['n_docs'] + 1} ending at {n}; {fix}")
    offsets = np.asarray(offsets, dtype=np.int64)
    if cap is not None and cap < n:
        offsets = np.append(offsets[offsets < cap], cap)
        n = cap
    tokens = np.memmap(directory / entry["file"], dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
    mask = None
    if entry.get("mask"):
        mask = np.memmap(directory / entry["mask"], dtype=np.uint8, mode="r", shape=(n,)) if n else \
            np.zeros(0, np.uint8)
    spans = None
    if entry.get("spans"):
        spans = np.memmap(directory / entry["spans"], dtype="<i4", mode="r", shape=(n, 2)) if n else \
            np.zeros((0, 2), np.int32)
    fingerprint = hash_json({"sha256": entry["sha256"], "mask": entry.get("mask_sha256"), "positions": n})[:16]
    return Corpus(directory, split, tokens, offsets, mask, int(manifest["eos"]), fingerprint, cap, spans)


def _reopen(directory: Path, split: str, cap: int | None) -> Corpus:
    from pipeline.core.io import read_json

    return open_corpus(directory, read_json(directory / "manifest.json", DataError, "rerun `logitcache tokenize`"),
                       split, cap)


# ---------------------------------------------------------------------------------------------
# Student rows


@dataclass(frozen=True)
class Layout:
    """How a student lays out its rows: `seq_len` input tokens each; "concat" packs the documents
    back to back (a row may hold several, with eos between them; attention stays inside each
    document where the architecture takes segment ids), "pad" gives each document its own rows
    (a longer one is cut into rows of seq_len), right-padded."""

    seq_len: int
    packing: str = "concat"

    def __post_init__(self) -> None:  # the rules of student.seq_len and student.packing
        argument("seq_len", self.seq_len, FIELDS["student.seq_len"])
        choice("packing", self.packing, PACKINGS)


@dataclass(frozen=True)
class Rows:
    """A layout's rows over a corpus that hold at least one target: row i reads tokens
    [start[i], stop[i]) (stop - start <= seq_len + 1) and owns the cache rows [lo[i], hi[i])."""

    start: np.ndarray  # (rows,) int64 flat position of the first token
    stop: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


def layout_rows(corpus: Corpus, layout: Layout) -> Rows:
    """The rows, in corpus order. Positions [start, start + seq_len) are the row's inputs; every
    position is an input of exactly one row, so every target is used once an epoch."""
    L, n = layout.seq_len, corpus.n_tokens
    if layout.packing == "concat":
        start = np.arange(0, max(n - 1, 0), L, dtype=np.int64)
        end = np.minimum(start + L, n)  # positions owned
        stop = np.minimum(start + L + 1, n)
    else:
        a, b = corpus.offsets[:-1], corpus.offsets[1:]
        per = np.maximum(-(-(b - a - 1) // L), 0)  # rows of each document (its last token is only a label)
        first = np.repeat(np.cumsum(per) - per, per)
        start = np.repeat(a, per) + (np.arange(int(per.sum()), dtype=np.int64) - first) * L
        end = np.minimum(start + L, np.repeat(b, per))
        stop = np.minimum(start + L + 1, np.repeat(b, per))
    bounds = corpus.rows_before(np.concatenate([start, end]))
    lo, hi = bounds[:len(start)], bounds[len(start):]
    keep = hi > lo
    return Rows(start[keep], stop[keep], lo[keep], hi[keep])
