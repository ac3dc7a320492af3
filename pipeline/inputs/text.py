"""Text data for language-model distillation: corpus sources, streamed, and the tokenizer.

Sources (data.source when task: lm):
- "python-docs": the bundled example, the docstrings of a fixed list of Python standard-library
  modules (Python Software Foundation License), read from the running interpreter; nothing is
  downloaded.
- a .txt file (one document per blank-line-separated paragraph), a .jsonl file (field
  data.text_field), or a Parquet file with a text column (data.text_field) or a pre-tokenized list
  column `input_ids`.

Tokenizer (data.tokenizer): a local directory with tokenizer.json (Hugging Face `tokenizers` or
`transformers` format), or null to train a byte-level BPE of data.vocab_size on the training
documents; the trained one is saved under <workspace>/tokenizers/<hash>/ and reused.

Every source is read as a stream of documents (a file is never read whole); pipeline/tokens.py
turns that stream into token files once.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import DataConfig
from pipeline.core.errors import DataError
from pipeline.core.io import atomic_write_text, file_digest, hash_json
from pipeline.inputs.arrays import check_file

EOS = "<|endoftext|>"


DOC_MODULES = ["abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "builtins", "calendar", "cmath", "collections", "colorsys", "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis", "email", "enum", "filecmp", "fnmatch", "fractions", "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "imaplib", "importlib", "inspect", "io", "ipaddress", "itertools", "json", "logging", "lzma", "mailbox", "math", "mimetypes", "multiprocessing", "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint", "queue", "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "turtle", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zoneinfo"]


def python_docs() -> list[str]:
    """Docstrings of DOC_MODULES, their public members and those members' methods, in a fixed order."""
    import warnings

    docs: list[str] = []
    with warnings.catch_warnings():  # deprecated attributes warn when inspected
        warnings.simplefilter("ignore")
        for name in DOC_MODULES:
            docs.extend(_module_docs(name))
    return docs


def _module_docs(name: str) -> list[str]:
    import importlib
    import inspect

    try:
        mod = importlib.import_module(name)
    except ImportError:  # a module missing from this build of Python is skipped
        return []
    members = [mod] + [obj for key, obj in sorted(vars(mod).items()) if not key.startswith("_")
                       and (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj))
                       and getattr(obj, "__module__", None) == mod.__name__]
    for obj in list(members):
        if inspect.isclass(obj):
            # methods the class itself defines; not ones other packages patched in (transformers
            # adds logging.Logger.warning_once), which would make the corpus depend on imports
            members += [m for key, m in sorted(vars(obj).items()) if not key.startswith("_")
                        and (inspect.isfunction(m) or inspect.ismethoddescriptor(m))
                        and getattr(m, "__module__", None) in (mod.__name__, None)]
    docs = [inspect.getdoc(obj) for obj in members]
    return [d for d in docs if d and len(d) > 80]


SUFFIXES = (".txt", ".jsonl", ".parquet", ".pq")


BLOCK = 1 << 20  # bytes read at a time from text files


PARQUET_BATCH = 1024  # rows read at a time from Parquet, one row group after another


def source_file(path: str, key: str) -> Path:
    """A text source's file, checked to exist and to have a known suffix."""
    p = check_file(path, key, "a .txt, .jsonl or .parquet file, or 'python-docs'")
    if p.suffix not in SUFFIXES:
        raise DataError(f"{key}: {path} has suffix {p.suffix!r}; use .txt, .jsonl or .parquet")
    return p


def source_identity(path: str, key: str) -> dict[str, str]:
    """What a source's documents depend on: the bundled corpus's text, or a file's suffix (it says how
    the bytes are read) and sha256 (remembered per machine, so a large corpus is hashed once)."""
    if path == "python-docs":
        return {"python-docs": docs_digest(python_docs())}
    p = source_file(path, key)
    return {"suffix": p.suffix, "sha256": file_digest(p)}


def docs_digest(docs: Iterable[str]) -> str:
    """sha256 of the documents joined with NUL, computed one document at a time."""
    h = hashlib.sha256()
    for i, doc in enumerate(docs):
        if i:
            h.update(b"\x00")
        h.update(doc.encode())
    return h.hexdigest()


def is_pretokenized(path: str, key: str) -> bool:
    """True for a Parquet source with an `input_ids` column (read from the schema only)."""
    if path == "python-docs" or source_file(path, key).suffix not in (".parquet", ".pq"):
        return False
    return "input_ids" in _parquet_file(Path(path), key).schema_arrow.names


def iter_documents(path: str, key: str, text_field: str) -> Iterator[str | np.ndarray]:
    """The source's documents in order, streamed: strings, or token ids (int64) from Parquet
    `input_ids`. Nothing is read whole."""
    if path == "python-docs":
        yield from python_docs()
        return
    p = source_file(path, key)
    if p.suffix == ".txt":
        yield from _paragraphs(p, key)
    elif p.suffix == ".jsonl":
        for lineno, line in _jsonl_lines(p, key):
            try:
                doc = json.loads(line)[text_field]
                if not isinstance(doc, str):
                    raise TypeError(doc)
            except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                raise DataError(f"{p}:{lineno}: expected a JSON object with a {text_field!r} string "
                                "(data.text_field)") from None
            yield doc
    else:
        yield from _parquet_documents(p, key, text_field)


def count_documents(path: str, key: str, text_field: str) -> int:
    """How many documents `iter_documents` yields, without parsing or keeping them."""
    if path == "python-docs":
        return len(python_docs())
    p = source_file(path, key)
    if p.suffix == ".txt":
        return sum(1 for _ in _paragraphs(p, key))
    if p.suffix == ".jsonl":
        return sum(1 for _ in _jsonl_lines(p, key))
    import pyarrow.compute as pc

    pf = _parquet_file(p, key)
    column = _parquet_column(pf, p, key, text_field)
    if column == "input_ids":
        return pf.metadata.num_rows
    return sum(pc.sum(pc.greater(pc.binary_length(b.column(0)), 0)).as_py() or 0
               for b in _parquet_batches(pf, p, key, column))


def _utf8_blocks(p: Path, key: str) -> Iterator[str]:
    """The file's text in blocks, with newlines translated as open() does; bytes that are not UTF-8
    are one DataError giving their offset."""
    utf8 = codecs.getincrementaldecoder("utf-8")()
    decoder = io.IncrementalNewlineDecoder(utf8, translate=True)
    read = 0
    with open(p, "rb") as f:
        while True:
            block = f.read(BLOCK)
            pending = len(utf8.buffer)
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise DataError(f"{key}: {p} is not UTF-8 text (byte {read - pending + e.start}); "
                                "convert it to UTF-8") from None
            read += len(block)
            if text:
                yield text
            if not block:
                return


def _paragraphs(p: Path, key: str) -> Iterator[str]:
    """Blank-line-separated paragraphs, stripped, empty ones dropped: `text.split("\\n\\n")` of the
    whole file, one block at a time (the unfinished last piece is carried to the next block, as a
    list of blocks while no separator comes, so a long paragraph is joined once, not once per block)."""
    carry: list[str] = []
    for text in _utf8_blocks(p, key):
        if "\n\n" not in text and not (carry and carry[-1].endswith("\n") and text.startswith("\n")):
            carry.append(text)
            continue
        parts = "".join([*carry, text]).split("\n\n")
        carry = [parts.pop()]
        for part in parts:
            if part.strip():
                yield part.strip()
    last = "".join(carry).strip()
    if last:
        yield last


def _jsonl_lines(p: Path, key: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of the non-blank lines."""
    read = 0
    with open(p, "rb") as f:
        for i, raw in enumerate(f):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{key}: {p} is not UTF-8 text (byte {read + e.start}); convert it to UTF-8") from None
            read += len(raw)
            if line.strip():
                yield i + 1, line


def _parquet_file(p: Path, key: str) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(p)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{key}: {p}: cannot read as Parquet ({_first_line(e)})") from None


def _parquet_column(pf: Any, p: Path, key: str, text_field: str) -> str:
    """`input_ids` (lists of non-negative integers) if present, else the text column (strings)."""
    import pyarrow as pa

    schema = pf.schema_arrow
    if "input_ids" in schema.names:
        t = schema.field("input_ids").type
        if not ((pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)):
            raise DataError(f"{key}: {p}: column 'input_ids' must hold lists of non-negative token ids")
        return "input_ids"
    if text_field not in schema.names:
        raise DataError(f"{p}: no column {text_field!r} (data.text_field) or 'input_ids'; "
                        f"columns are {', '.join(schema.names)}")
    t = schema.field(text_field).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise DataError(f"{key}: {p}: column {text_field!r} (data.text_field) must hold strings")
    return text_field


def _parquet_batches(pf: Any, p: Path, key: str, column: str) -> Iterator[Any]:
    import pyarrow as pa

    try:
        yield from pf.iter_batches(batch_size=PARQUET_BATCH, columns=[column])
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{key}: {p}: cannot read as Parquet ({_first_line(e)})") from None


def _parquet_documents(p: Path, key: str, text_field: str) -> Iterator[str | np.ndarray]:
    import pyarrow.compute as pc

    pf = _parquet_file(p, key)
    column = _parquet_column(pf, p, key, text_field)
    for batch in _parquet_batches(pf, p, key, column):
        arr = batch.column(0)
        if column != "input_ids":
            yield from (t for t in arr.to_pylist() if t)
            continue
        values = arr.flatten()
        if arr.null_count or values.null_count or (len(values) and pc.min(values).as_py() < 0):
            raise DataError(f"{key}: {p}: column 'input_ids' must hold lists of non-negative token ids")
        ids = values.to_numpy().astype(np.int64)
        ends = np.cumsum(pc.list_value_length(arr).to_numpy())
        yield from np.split(ids, ends[:-1])


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def tokenizer_file(path: Path, key: str = "data.tokenizer") -> Path:
    """The tokenizer.json of data.tokenizer (a directory or the file itself); `key` names where the
    path came from in messages."""
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"{key}: {path} has no tokenizer.json; save one with "
                        "tokenizer.save_pretrained(dir) or tokenizers' Tokenizer.save")
    return file


class Tokenizer:
    """A `tokenizers.Tokenizer` with its vocabulary fingerprint."""

    def __init__(self, path: Path, key: str = "data.tokenizer") -> None:
        from tokenizers import Tokenizer as HFTokenizer

        file = tokenizer_file(path, key)
        try:
            self.hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises its own Exception type for malformed files
            raise DataError(f"{key}: {file} is not a valid tokenizer.json ({_first_line(e)})") from None
        self.path = file
        vocab = self.hf.get_vocab()
        if not vocab:
            raise DataError(f"{key}: {file} has an empty vocabulary; give the tokenizer the data was tokenized with")
        self.vocab_size = max(vocab.values()) + 1
        self.fingerprint = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]
        eos = self.hf.token_to_id(EOS)
        self.eos = eos if eos is not None else self.vocab_size - 1

    def encode(self, docs: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(docs)]


def train_tokenizer(docs: Iterable[str], vocab_size: int, out: Path) -> Path:
    """Byte-level BPE trained on `docs` (any iterable: it is streamed), saved as out/tokenizer.json
    (atomically)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    atomic_write_text(out / "tokenizer.json", tok.to_str())
    return out


def tokenizer_for(d: DataConfig, workspace: str, train_docs: Callable[[], Iterator[str]] | None) -> Tokenizer:
    """data.tokenizer, or the BPE trained on the training documents (`train_docs()` streams them; it
    is called once to key the tokenizer by their content and once more to train it if it is new)."""
    if d.tokenizer is not None:
        return Tokenizer(Path(d.tokenizer))
    if train_docs is None:
        raise DataError("data.tokenizer: pre-tokenized input_ids need the tokenizer they were made with; "
                        "set data.tokenizer to its directory")
    key = hash_json({"docs": docs_digest(train_docs()), "vocab_size": d.vocab_size})[:12]
    out = Path(workspace) / "tokenizers" / key
    if not (out / "tokenizer.json").is_file():
        train_tokenizer(train_docs(), d.vocab_size, out)
    return Tokenizer(out)

