"""The one-time tokenize step: a text corpus streamed through the tokenizer into flat token files,
content-addressed like a cache, and the language-model splits mapped from them.

    logitcache tokenize configs/lm.yaml
    logitcache tokenize my.yaml data.source=corpus.jsonl data.tokenizer=tok/

Every LM stage calls `load_lm_splits`, which finds the tokenized corpus (or makes it, as this
command does) and maps it; nothing reads the whole corpus into memory.

<workspace>/tokens/<id>/
  manifest.json         written last: format, dtype, vocabulary, eos, counts, digests, identity
  train.bin             token ids of the training documents, each followed by eos (uint16 when the
                        vocabulary fits 65,536 ids, else uint32; little-endian, no header)
  train.offsets.npy     int64 (n_docs + 1): document d is train.bin[offsets[d]:offsets[d + 1]], eos included
  train.mask.bin        only for a source that marks trained tokens (chat messages, labels, loss_mask) with
                        data.train_on: assistant: uint8, one per token of train.bin; 1 where the prediction
                        of that token (from the tokens before it in its document) is trained. A document's
                        first token is 0 (nothing predicts it), its eos takes its last token's value.
  train.spans.bin       only for text sources: int32 (n_tokens, 2), little-endian: each token's character
                        span [start, end) in its document's text (Python str indices, as the tokenizer
                        reports them; the bytes of one character split over several tokens give each the
                        character's span); the eos ending a document spans (len, len). What a student with
                        another tokenizer aligns its tokens by (pipeline/train/crosstok.py).
  test.bin, test.offsets.npy, test.mask.bin, test.spans.bin
  transfer.bin, transfer.offsets.npy, transfer.mask.bin, transfer.spans.bin    only with data.transfer.source

The id hashes everything that determines the tokens: each source's content digest (remembered per
machine), data.text_field, the tokenizer (its file's digest, or the vocabulary size of the BPE
trained here), the split (data.split_seed and data.test_fraction, or data.test_source) and the
format version; and, only where they differ from what every corpus had before, the eos token
(when not EOS), the chat template's files (chat sources), data.train_on (when masks are
written) and the spans' format (text sources). The split is by document, as it always was: a
permutation of the documents by data.split_seed, the first round(n * test_fraction) go to test,
each split keeps source order.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pipeline.core.config import DataConfig
from pipeline.core.errors import ConfigError, DataError
from pipeline.core.io import (
    atomic_write_json,
    check_writable,
    file_digest,
    fsync_dir,
    hash_json,
    publish_dir,
    read_json,
    record_tree_digest,
    remove_dead_tmp,
    sha256_file,
    tmp_name,
)
from pipeline.core.lock import build_lock
from pipeline.core.progress import bar, log
from pipeline.inputs.chat import ChatTemplate, template_identity
from pipeline.inputs.text import (
    EOS,
    MASKED,
    Document,
    Tokenizer,
    count_documents,
    document_size,
    eos_id,
    eos_token,
    iter_documents,
    source_identity,
    source_kind,
    tokenizer_file,
    tokenizer_for,
)

TOKENS_FORMAT = 1


SPANS = "char"  # the unit of <split>.spans.bin: characters of the document's text


# One encode_batch call holds its documents' Encodings (about 130 bytes a token: ids, offsets, token
# strings) and their ids as Python lists (about 33 more): 1,000 paragraphs of bench/scale.py's corpus
# (1 MB of text, 192k tokens) took 30 MB, and 1,000 long documents would take any amount. So a batch
# ends at BATCH_DOCS documents or BATCH_CHARS characters (token ids when pre-tokenized), whichever
# comes first (128k characters of that corpus: 25k tokens, about 4 MB); a longer document comes alone.
# Characters, not bytes: len() costs nothing, and byte-level BPE makes at most 4 tokens a character.
BATCH_DOCS = 1000


BATCH_CHARS = 1 << 17


def identity(d: DataConfig) -> dict[str, Any]:
    """Everything that determines the token files; its hash is the directory's id. Cheap: file
    digests are remembered per machine, nothing is tokenized."""
    tokenizer = ({"sha256": file_digest(tokenizer_file(Path(d.tokenizer)))} if d.tokenizer is not None
                 else {"bpe_vocab_size": d.vocab_size})
    split = ({"test_source": source_identity(d.test_source, "data.test_source")} if d.test_source is not None
             else {"split_seed": d.split_seed, "test_fraction": d.test_fraction})
    transfer = (source_identity(d.transfer.source, "data.transfer.source") if d.transfer.source is not None
                else None)
    ident = {"format_version": TOKENS_FORMAT, "source": source_identity(d.source, "data.source"),
             "text_field": d.text_field, "tokenizer": tokenizer, "split": split, "transfer": transfer}
    # keys added only where they change the files, so the corpora of earlier versions keep their ids
    eos = eos_token(d)
    if eos != EOS:
        ident["eos"] = eos  # None (none declared) is refused when tokenizing
    kinds = _kinds(d)
    chat = [key for key, kind in kinds.items() if kind == "messages"]
    if chat:
        ident["chat_template"] = template_identity(d.tokenizer, _sources(d)[chat[0]], chat[0])
    if d.train_on == "assistant" and any(kind in MASKED for kind in kinds.values()):
        ident["train_on"] = d.train_on
    if "text" in kinds.values():
        ident["spans"] = SPANS
    return ident


def _sources(d: DataConfig) -> dict[str, str]:
    """The config's sources by their keys."""
    sources = {"data.source": d.source, "data.test_source": d.test_source, "data.transfer.source": d.transfer.source}
    return {key: path for key, path in sources.items() if path is not None}


def _kinds(d: DataConfig) -> dict[str, str]:
    """Each source's kind (`source_kind`), by its config key."""
    return {key: source_kind(path, key, d.text_field) for key, path in _sources(d).items()}


def tokenize(d: DataConfig, workspace: str) -> Path:
    """The directory of `d`'s tokenized corpus: reused if complete, else written to a temporary
    directory and renamed into place. Processes that need it at once (array tasks) take a lock
    (pipeline/core/lock.py): one tokenizes, the others wait and reuse it."""
    if d.task != "lm":
        raise ConfigError(f"data.task: tokenize applies to data.task lm, this config has {d.task!r}")
    ident = identity(d)
    root = Path(workspace) / "tokens"
    final = root / hash_json(ident)[:16]
    if final.exists():
        problem = token_problem(final)
        if problem is None:
            return final
        log(f"tokens {final.name}: {problem}; tokenizing again")
    check_writable(root, "workspace")
    root.mkdir(parents=True, exist_ok=True)
    with build_lock(root / f".lock-{final.name}", f"tokens {final.name}"):  # one process tokenizes, the rest wait
        if final.exists():  # tokenized by another process while this one waited, or damaged
            if token_problem(final) is None:
                return final
            aside = tmp_name(final)
            os.rename(final, aside)  # then removed: a process that maps its files keeps them until it unmaps
            shutil.rmtree(aside) if aside.is_dir() else aside.unlink()
        remove_dead_tmp(root)
        tmp = tmp_name(final)
        tmp.mkdir()
        try:
            manifest = _write(d, workspace, tmp)
            atomic_write_json(tmp / "manifest.json",
                              {**manifest, "id": final.name, "identity": ident, "complete": True})
            fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        publish_dir(tmp, final)
        fsync_dir(root)
        for entry in manifest["splits"].values():  # hashed as written: this machine need not read them again
            record_tree_digest(final / entry["file"], entry["sha256"])
            record_tree_digest(final / entry["offsets"], entry["offsets_sha256"])
            if "spans" in entry:
                record_tree_digest(final / entry["spans"], entry["spans_sha256"])
    return final


def token_problem(directory: Path) -> str | None:
    """What is wrong with a tokenized corpus, or None: a complete manifest, and each split's token
    file of the size and sha256 it records, its offsets file of the sha256 it records (or, in a
    manifest from before offsets were hashed, of the shape and ends). Digests are remembered per
    machine (pipeline/core/io.py): an unchanged file is read once per machine, and one flipped byte,
    a truncation or a lost file is found before any stage maps it."""
    try:
        manifest = read_manifest(directory)
    except DataError as e:
        return str(e).split("; ")[0]
    where = directory / "manifest.json"
    try:
        dtype = np.dtype(manifest["dtype"])
        splits = [manifest["splits"][name] for name in ("train", "test", "transfer")
                  if name in manifest["splits"] or name != "transfer"]
        for e in splits:
            if not (all(isinstance(e[k], str) and Path(e[k]).name == e[k] for k in ("file", "offsets", "sha256"))
                    and isinstance(e["n_docs"], int) and isinstance(e["n_tokens"], int)):
                raise TypeError
    except (KeyError, TypeError, ValueError):
        return f"{where}: a split lacks file, offsets, n_docs, n_tokens or sha256, or dtype is not a dtype"
    for e in splits:
        tokens_file, offsets_file = directory / e["file"], directory / e["offsets"]
        for f in (tokens_file, offsets_file):
            if not f.is_file():
                return f"{f}: missing"
        size, expected = tokens_file.stat().st_size, e["n_tokens"] * dtype.itemsize
        if size != expected:
            return (f"{tokens_file}: {size} bytes, but the manifest records {e['n_tokens']} {dtype.name} tokens "
                    f"({expected} bytes); the file was truncated or overwritten")
        if file_digest(tokens_file) != e["sha256"]:
            return f"{tokens_file}: its sha256 differs from the manifest's; the file was modified or damaged"
        if e.get("mask"):
            mask_file = directory / str(e["mask"])
            if not mask_file.is_file():
                return f"{mask_file}: missing"
            if mask_file.stat().st_size != e["n_tokens"] or file_digest(mask_file) != e.get("mask_sha256"):
                return f"{mask_file}: its size or sha256 differs from the manifest's; the file was modified or damaged"
        if e.get("spans"):
            spans_file = directory / str(e["spans"])
            if not spans_file.is_file():
                return f"{spans_file}: missing"
            if spans_file.stat().st_size != 8 * e["n_tokens"] or file_digest(spans_file) != e.get("spans_sha256"):
                return f"{spans_file}: its size or sha256 differs from the manifest's; the file was modified or damaged"
        if e.get("offsets_sha256") is not None:
            if file_digest(offsets_file) != e["offsets_sha256"]:
                return f"{offsets_file}: its sha256 differs from the manifest's; the file was modified or damaged"
            continue
        try:
            offsets = np.load(offsets_file, mmap_mode="r", allow_pickle=False)
            ok = offsets.shape == (e["n_docs"] + 1,) and offsets.dtype == np.int64 and \
                int(offsets[0]) == 0 and int(offsets[-1]) == e["n_tokens"]
        except (ValueError, OSError, IndexError):
            ok = False
        if not ok:
            return f"{offsets_file}: not {e['n_docs'] + 1} int64 offsets from 0 to {e['n_tokens']}"
    return None


def read_manifest(directory: Path) -> dict[str, Any]:
    """A tokenized corpus's manifest; a directory without a complete one is refused in one line."""
    path = directory / "manifest.json"
    fix = f"remove {directory} and rerun `logitcache tokenize`"
    if not path.is_file():
        raise DataError(f"{directory}: tokenized corpus without manifest.json; {fix}")
    manifest = read_json(path, DataError, fix)
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        raise DataError(f"{path}: not a complete tokenized corpus; {fix}")
    if manifest.get("format_version") != TOKENS_FORMAT:
        raise DataError(f"{path}: tokens format {manifest.get('format_version')}, this version reads "
                        f"{TOKENS_FORMAT}; {fix}")
    return manifest


class TokenFile:
    """Appends documents to <name>.bin, each followed by eos, and their end offsets to
    <name>.offsets.npy, by buffered file writes: memory holds one batch, whatever the corpus size.
    With `masked`, each token's trained flag goes to <name>.mask.bin in step; with `spanned`, each
    token's character span to <name>.spans.bin. The data is hashed as it is written."""

    def __init__(self, directory: Path, name: str, dtype: np.dtype, vocab_size: int, eos: int, source: str,
                 masked: bool = False, spanned: bool = False) -> None:
        self.directory, self.name, self.dtype = directory, name, dtype
        self.vocab_size, self.eos, self.source = vocab_size, eos, source
        self.tokens: BinaryIO = open(directory / f"{name}.bin", "wb")
        self.ends: BinaryIO = open(directory / f".{name}.ends", "wb")  # int64 end offsets, raw
        self.masks: BinaryIO | None = open(directory / f"{name}.mask.bin", "wb") if masked else None
        self.spans: BinaryIO | None = open(directory / f"{name}.spans.bin", "wb") if spanned else None
        self.sha256, self.mask_sha256, self.spans_sha256 = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
        self.n_docs = self.n_tokens = self.n_trained = 0

    def append(self, docs: Sequence[Sequence[int] | np.ndarray], masks: Sequence[np.ndarray] | None = None,
               spans: Sequence[tuple[np.ndarray, int]] | None = None) -> None:
        """`masks` (with `masked`): per document, 1 where the source trains that token; a document's
        first token is then set to 0 and its eos takes the source's flag of its last token. `spans`
        (with `spanned`): per document, its tokens' (n, 2) character spans and its length in
        characters (the eos's span is (length, length))."""
        lengths = np.fromiter((len(ids) + 1 for ids in docs), dtype=np.int64, count=len(docs))
        ends = np.cumsum(lengths)
        flat = np.full(int(ends[-1]) if len(docs) else 0, self.eos, dtype=np.int64)  # (batch tokens,)
        for ids, end, n in zip(docs, ends, lengths):
            flat[end - n:end - 1] = ids
        if len(flat) and flat.max() >= self.vocab_size:
            raise DataError(f"{self.source}: token id {int(flat.max())} outside the tokenizer's vocabulary "
                            f"of {self.vocab_size}; tokenize with the tokenizer in data.tokenizer")
        data = flat.astype(self.dtype.newbyteorder("<")).tobytes()
        self.tokens.write(data)
        self.sha256.update(data)
        self.ends.write((ends + self.n_tokens).astype("<i8").tobytes())
        if self.masks is not None:
            assert masks is not None and len(masks) == len(docs)
            flags = np.zeros(len(flat), dtype=np.uint8)  # (batch tokens,)
            for m, end, n in zip(masks, ends, lengths):
                assert len(m) == n - 1
                if n > 1:
                    flags[end - n:end - 1] = m
                    flags[end - 1] = m[-1]
                flags[end - n] = 0
            self.masks.write(flags.tobytes())
            self.mask_sha256.update(flags.tobytes())
            self.n_trained += int(flags.sum(dtype=np.int64))
        if self.spans is not None:
            assert spans is not None and len(spans) == len(docs)
            out = np.empty((len(flat), 2), dtype="<i4")  # (batch tokens, 2)
            for (s, length), end, n in zip(spans, ends, lengths):
                if length >= 1 << 31:
                    raise DataError(f"{self.source}: a document of {length} characters; spans are int32, split "
                                    "documents longer than 2**31 characters")
                out[end - n:end - 1] = s
                out[end - 1] = length
            data = out.tobytes()
            self.spans.write(data)
            self.spans_sha256.update(data)
        self.n_docs += len(docs)
        self.n_tokens += len(flat)

    def close(self) -> dict[str, Any]:
        """Flush and fsync; write the offsets as .npy (a header, then 0 and the streamed ends)."""
        for f in (self.tokens, self.ends, self.masks, self.spans):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        raw = self.directory / f".{self.name}.ends"
        with open(self.directory / f"{self.name}.offsets.npy", "wb") as out, open(raw, "rb") as src:
            np.lib.format.write_array_header_1_0(out, {"descr": "<i8", "fortran_order": False,
                                                       "shape": (self.n_docs + 1,)})
            out.write(np.zeros(1, dtype="<i8").tobytes())
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        raw.unlink()
        entry = {"file": f"{self.name}.bin", "offsets": f"{self.name}.offsets.npy", "n_docs": self.n_docs,
                 "n_tokens": self.n_tokens, "sha256": self.sha256.hexdigest(),
                 "offsets_sha256": sha256_file(self.directory / f"{self.name}.offsets.npy")}
        if self.masks is not None:
            entry.update(mask=f"{self.name}.mask.bin", mask_sha256=self.mask_sha256.hexdigest(),
                         trained_tokens=self.n_trained)
        if self.spans is not None:
            entry.update(spans=f"{self.name}.spans.bin", spans_sha256=self.spans_sha256.hexdigest())
        return entry


def _write(d: DataConfig, workspace: str, out: Path) -> dict[str, Any]:
    """Tokenize every split of `d` into `out`; the manifest's entries."""
    n_docs = count_documents(d.source, "data.source", d.text_field)  # a cheap first pass: nothing tokenized
    if n_docs == 0:
        raise DataError(f"data.source: {d.source} holds no documents (empty, or only blank lines); give a corpus")
    in_test: np.ndarray | None = None  # (n_docs,) bool: held-out documents
    if d.test_source is None:
        # a deterministic document-level split keeps held-out text unseen by teachers and students
        order = np.random.default_rng(d.split_seed).permutation(n_docs)
        in_test = np.zeros(n_docs, dtype=bool)
        in_test[order[:max(1, round(n_docs * d.test_fraction))]] = True

    def train_docs() -> Iterator[str]:
        docs = iter_documents(d.source, "data.source", d.text_field)
        return docs if in_test is None else (doc for doc, t in zip(docs, in_test) if not t)  # type: ignore[misc]

    kinds = _kinds(d)
    tok = tokenizer_for(d, workspace, train_docs if kinds["data.source"] == "text" else None)
    eos = eos_id(d, tok)
    chat = ChatTemplate(Path(d.tokenizer)) if "messages" in kinds.values() and d.tokenizer is not None else None
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
    files = {name: TokenFile(out, name, dtype, tok.vocab_size, eos, source,
                             masked=d.train_on == "assistant" and kinds[key] in MASKED, spanned=kinds[key] == "text")
             for name, key, source in (("train", "data.source", d.source),
                                       ("test", "data.test_source" if d.test_source else "data.source",
                                        d.test_source or d.source),
                                       ("transfer", "data.transfer.source", d.transfer.source)) if source is not None}
    written = _stream(d.source, "data.source", d, tok, chat, [files["train"], files["test"]], in_test)
    if written != n_docs:
        raise DataError(f"data.source: {d.source} changed while it was tokenized ({n_docs} documents, then "
                        f"{written}); rerun when it is no longer being written")
    if d.test_source is not None:
        _stream(d.test_source, "data.test_source", d, tok, chat, [files["test"]], None)
    if d.transfer.source is not None:
        _stream(d.transfer.source, "data.transfer.source", d, tok, chat, [files["transfer"]], None)
    return {"format_version": TOKENS_FORMAT, "dtype": dtype.name, "vocab_size": tok.vocab_size,
            "vocab_fingerprint": tok.fingerprint, "tokenizer": str(tok.path), "eos": eos,
            "splits": {name: f.close() for name, f in files.items()}}


def _stream(path: str, key: str, d: DataConfig, tok: Tokenizer, chat: ChatTemplate | None, files: list[TokenFile],
            in_test: np.ndarray | None) -> int:
    """Encode `path`'s documents in batches (`_batches`) into files[0], or files[1] where `in_test`;
    the number of documents read."""
    kind = source_kind(path, key, d.text_field)
    n = 0
    progress = bar(None, f"tokenize {path}", "tokens")  # a line every LOGITCACHE_PROGRESS_INTERVAL s in job logs
    for batch in _batches(iter_documents(path, key, d.text_field)):
        ids, masks, spans = _encode(batch, kind, tok, chat, f"{key}: {path}", n)
        written = sum(f.n_tokens for f in files)
        if in_test is None:
            files[0].append(ids, masks, spans)
        else:
            test = in_test[n:n + len(batch)]
            if len(test) < len(batch):
                raise DataError(f"{key}: {path} changed while it was tokenized (more documents than counted); "
                                "rerun when it is no longer being written")
            for f, held_out in zip(files, (False, True)):
                f.append([x for x, t in zip(ids, test) if t == held_out],
                         None if masks is None else [m for m, t in zip(masks, test) if t == held_out],
                         None if spans is None else [s for s, t in zip(spans, test) if t == held_out])
        n += len(batch)
        progress.update(sum(f.n_tokens for f in files) - written)  # the files count end-of-text tokens too
    progress.close()
    return n


def _encode(batch: list[Document], kind: str, tok: Tokenizer, chat: ChatTemplate | None, where: str,
            first: int) -> tuple[list[Any], list[np.ndarray] | None, list[tuple[np.ndarray, int]] | None]:
    """A batch of one kind's documents as token ids, with their masks where the kind has them and,
    for text, each document's token spans and length."""
    if kind == "text":
        encodings = tok.hf.encode_batch(batch)
        return ([e.ids for e in encodings], None,
                [(np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2), len(doc)) for e, doc in zip(encodings, batch)])
    if kind == "input_ids":
        return batch, None, None
    if kind == "messages":
        assert chat is not None
        return (*chat.encode(batch, where, first), None)  # type: ignore[arg-type]
    return [ids for ids, _ in batch], [m for _, m in batch], None  # type: ignore[misc]


def _batches(docs: Iterator[Document]) -> Iterator[list[Document]]:
    """Consecutive documents, at most BATCH_DOCS of them and BATCH_CHARS of their size together
    (`document_size`), except a larger document, which comes alone."""
    batch: list[Document] = []
    size = 0
    for doc in docs:
        n = document_size(doc)
        if batch and size + n > BATCH_CHARS:
            yield batch
            batch, size = [], 0
        batch.append(doc)
        size += n
        if len(batch) == BATCH_DOCS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def sequences(directory: Path, manifest: dict[str, Any], split: str, seq_len: int,
              limit: int | None = None) -> np.ndarray:
    """(N, seq_len + 1) token ids of `split`, memory-mapped (no copy): the flat token file cut into
    consecutive sequences, the remainder dropped; at most `limit` sequences."""
    entry = manifest["splits"][split]
    n = entry["n_tokens"] // (seq_len + 1)
    if limit is not None:
        n = min(n, limit)
    if n == 0:  # an empty file cannot be mapped
        return np.zeros((0, seq_len + 1), dtype=manifest["dtype"])
    try:
        flat = np.memmap(directory / entry["file"], dtype=np.dtype(manifest["dtype"]).newbyteorder("<"), mode="r",
                         shape=(entry["n_tokens"],))
    except (ValueError, OSError) as e:  # changed since tokenize checked it
        raise DataError(f"{directory / entry['file']}: cannot map {entry['n_tokens']} tokens ({e}); rerun "
                        "`logitcache tokenize CONFIG` to check and rebuild it") from None
    return flat[: n * (seq_len + 1)].reshape(n, seq_len + 1)



def target_chars(directory: Path, manifest: dict[str, Any], split: str, seq_len: int, n: int) -> np.ndarray | None:
    """(n, seq_len) int64: the characters of text each target of `sequences(..., seq_len)[:n]` adds
    (tokens 1..seq_len of each sequence): its span's length, 0 for a token sharing the span of the
    token before it (bytes of one character) and for an eos. What makes a loss per character
    comparable across tokenizers. None for a split without spans (not text)."""
    entry = manifest["splits"][split]
    if "spans" not in entry or n == 0:
        return None
    spans = np.memmap(directory / entry["spans"], dtype="<i4", mode="r", shape=(entry["n_tokens"], 2))
    flat = np.asarray(spans[: n * (seq_len + 1)], dtype=np.int64).reshape(n, seq_len + 1, 2)
    repeat = np.all(flat[:, 1:] == flat[:, :-1], axis=2)
    return np.where(repeat, 0, flat[:, 1:, 1] - flat[:, 1:, 0])


def mask(directory: Path, manifest: dict[str, Any], split: str) -> np.ndarray | None:
    """(n_tokens,) uint8 of `split`, memory-mapped: 1 where the prediction of that token of <split>.bin
    (from the tokens before it in its document) is trained; None when every token is (no mask file)."""
    entry = manifest["splits"][split]
    if "mask" not in entry:
        return None
    path = directory / entry["mask"]
    size = path.stat().st_size if path.is_file() else None
    if size != entry["n_tokens"]:
        raise DataError(f"{path}: {'missing' if size is None else f'{size} bytes'}, the manifest says "
                        f"{entry['n_tokens']} tokens; remove {directory} and rerun `logitcache tokenize`")
    if size == 0:  # an empty file cannot be mapped
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(size,))
