"""Text data for language-model distillation: corpus sources, streamed, and the tokenizer.

Sources (data.source when task: lm):
- "python-docs": the bundled example, the docstrings of a fixed list of Python standard-library
  modules (Python Software Foundation License), read from the running interpreter; nothing is
  downloaded.
- a .txt file (one document per blank-line-separated paragraph), or a .jsonl or Parquet file whose
  records hold, by the first field found of these:
  - `input_ids` (lists of token ids), with `labels` (-100: not trained, else the token itself, as
    Hugging Face datasets align them) or `loss_mask` (0/1 per token), or neither;
  - `messages` (a conversation: a list of {role, content}), rendered by pipeline/inputs/chat.py;
  - the text field data.text_field.
  `source_kind` says which, from the Parquet schema or the first JSONL record.

Tokenizer (data.tokenizer): a local directory with tokenizer.json (Hugging Face `tokenizers` or
`transformers` format), or null to train a byte-level BPE of data.vocab_size on the training
documents; the trained one is saved under <workspace>/tokenizers/<hash>/ and reused. Each document
ends with the tokenizer's declared end-of-sequence token, or data.eos_token.

Every source is read as a stream of documents (a file is never read whole); pipeline/tokens.py
turns that stream into token files once.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import DataConfig
from pipeline.core.errors import DataError
from pipeline.core.io import atomic_write_text, file_digest, hash_json
from pipeline.inputs.arrays import check_file

EOS = "<|endoftext|>"  # the end-of-sequence token of the BPE trained here


MASKED = ("labels", "loss_mask", "messages")  # kinds that say which tokens are trained


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


def source_kind(path: str, key: str, text_field: str) -> str:
    """What a source's records hold: "labels" or "loss_mask" (`input_ids` with that field),
    "input_ids", "messages" or "text", by the first field found in that order; from the Parquet
    schema or the first JSONL record."""
    if path == "python-docs":
        return "text"
    p = source_file(path, key)
    if p.suffix == ".txt":
        return "text"
    if p.suffix == ".jsonl":
        first = next(_jsonl_lines(p, key), None)
        try:
            record = json.loads(first[1]) if first is not None else {}
        except json.JSONDecodeError:
            record = {}  # iter_documents reports the line
        names = list(record) if isinstance(record, dict) else []
    else:
        names = _parquet_file(p, key).schema_arrow.names
    if "input_ids" in names:
        if "labels" in names and "loss_mask" in names:
            raise DataError(f"{key}: {p} has both 'labels' and 'loss_mask'; keep the one that marks the "
                            "trained tokens")
        return "labels" if "labels" in names else "loss_mask" if "loss_mask" in names else "input_ids"
    return "messages" if "messages" in names else "text"


Document = str | np.ndarray | tuple[np.ndarray, np.ndarray] | list[dict[str, str]]


def iter_documents(path: str, key: str, text_field: str) -> Iterator[Document]:
    """The source's documents in order, streamed, as its kind (`source_kind`) holds them: strings;
    token ids (int64); (token ids, uint8 mask, 1 where trained) from `labels` or `loss_mask`; or a
    conversation (a list of {role, content}). Nothing is read whole."""
    if path == "python-docs":
        yield from python_docs()
        return
    p = source_file(path, key)
    kind = source_kind(path, key, text_field)
    if p.suffix == ".txt":
        yield from _paragraphs(p, key)
    elif p.suffix == ".jsonl":
        for lineno, line in _jsonl_lines(p, key):
            yield _jsonl_document(line, kind, f"{p}:{lineno}", text_field)
    else:
        yield from _parquet_documents(p, key, text_field, kind)


def _jsonl_document(line: str, kind: str, where: str, text_field: str) -> Document:
    expected = {"text": f"a {text_field!r} string (data.text_field)", "messages": "a 'messages' list",
                "input_ids": "an 'input_ids' list of non-negative token ids"}.get(
        kind, f"an 'input_ids' list of non-negative token ids and a {kind!r} list")
    try:
        record = json.loads(line)
        if kind == "text":
            doc = record[text_field]
            if not isinstance(doc, str):
                raise TypeError(doc)
            return doc
        if kind == "messages":
            return _conversation(record["messages"], where)
        ids = _int_array(record["input_ids"], signed=False)
        if kind == "input_ids":
            return ids
        return ids, _token_mask(ids, _int_array(record[kind], signed=True), kind, where)
    except (json.JSONDecodeError, KeyError, TypeError, IndexError):
        raise DataError(f"{where}: expected a JSON object with {expected}") from None


def _int_array(value: Any, signed: bool) -> np.ndarray:
    """A JSON list of integers as int64; TypeError for anything else (a negative one unless `signed`)."""
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise TypeError(value)
    out = np.asarray(value, dtype=np.int64)
    if not signed and len(out) and out.min() < 0:
        raise TypeError(value)
    return out


def _token_mask(ids: np.ndarray, extra: np.ndarray, kind: str, where: str) -> np.ndarray:
    """uint8 (len(ids),), 1 where the token is trained, from a document's `labels` or `loss_mask`."""
    if len(extra) != len(ids):
        raise DataError(f"{where}: {len(extra)} {kind} for {len(ids)} input_ids; give one per token")
    if kind == "loss_mask":
        bad = (extra != 0) & (extra != 1)
        if bad.any():
            raise DataError(f"{where}: loss_mask holds {int(extra[bad][0])}; give 0 (not trained) or 1 (trained) "
                            "per token")
        return extra.astype(np.uint8)
    trained = extra != -100
    wrong = np.flatnonzero(trained & (extra != ids))
    if len(wrong):
        i = int(wrong[0])
        raise DataError(f"{where}: labels[{i}] is {int(extra[i])} but input_ids[{i}] is {int(ids[i])}; labels must "
                        "be -100 or the token at the same position (aligned with input_ids, not shifted)")
    return trained.astype(np.uint8)


def _conversation(messages: Any, where: str) -> list[dict[str, str]]:
    """A non-empty list of messages with `role` and `content` strings; keys whose value is null
    (a Parquet struct has every field) are dropped."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        m = {k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content' strings")
        out.append(m)
    return out


def document_size(doc: Document) -> int:
    """What bounds a batch: characters of text (of a conversation's messages), or token ids."""
    if isinstance(doc, tuple):
        return len(doc[0])
    if isinstance(doc, list):
        return sum(len(m["content"]) for m in doc)
    return len(doc)


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
    kind = source_kind(path, key, text_field)
    columns = _parquet_columns(pf, p, key, text_field, kind)
    if kind != "text":  # a row is a document, even an empty one
        return pf.metadata.num_rows
    return sum(pc.sum(pc.greater(pc.binary_length(b.column(0)), 0)).as_py() or 0
               for b in _parquet_batches(pf, p, key, columns))


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


def _parquet_columns(pf: Any, p: Path, key: str, text_field: str, kind: str) -> list[str]:
    """The columns `kind` reads, their types checked: `input_ids` (and `labels` or `loss_mask`: lists
    of integers), `messages` (lists), or the text column (strings)."""
    import pyarrow as pa

    schema = pf.schema_arrow

    def lists(name: str, of: str) -> None:
        t = schema.field(name).type
        if not ((pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)):
            raise DataError(f"{key}: {p}: column {name!r} must hold lists of {of}")

    if kind == "messages":
        t = schema.field("messages").type
        if not ((pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_struct(t.value_type)):
            raise DataError(f"{key}: {p}: column 'messages' must hold lists of {{role, content}} structs")
        return ["messages"]
    if kind != "text":
        lists("input_ids", "non-negative token ids")
        if kind == "input_ids":
            return ["input_ids"]
        lists(kind, "-100 or token ids" if kind == "labels" else "0/1 flags")
        return ["input_ids", kind]
    if text_field not in schema.names:
        raise DataError(f"{p}: no column {text_field!r} (data.text_field), 'input_ids' or 'messages'; "
                        f"columns are {', '.join(schema.names)}")
    t = schema.field(text_field).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise DataError(f"{key}: {p}: column {text_field!r} (data.text_field) must hold strings")
    return [text_field]


def _parquet_batches(pf: Any, p: Path, key: str, columns: list[str]) -> Iterator[Any]:
    import pyarrow as pa

    try:
        yield from pf.iter_batches(batch_size=PARQUET_BATCH, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{key}: {p}: cannot read as Parquet ({_first_line(e)})") from None


def _parquet_documents(p: Path, key: str, text_field: str, kind: str) -> Iterator[Document]:
    import pyarrow.compute as pc

    pf = _parquet_file(p, key)
    columns = _parquet_columns(pf, p, key, text_field, kind)
    row = 0  # of the batch's first row
    for batch in _parquet_batches(pf, p, key, columns):
        arr = batch.column(0)
        if kind == "text":
            yield from (t for t in arr.to_pylist() if t)
        elif kind == "messages":
            yield from (_conversation(m, f"{p} row {row + i}") for i, m in enumerate(arr.to_pylist()))
        else:
            values = arr.flatten()
            if arr.null_count or values.null_count or (len(values) and pc.min(values).as_py() < 0):
                raise DataError(f"{key}: {p}: column 'input_ids' must hold lists of non-negative token ids")
            ids = np.split(values.to_numpy().astype(np.int64), np.cumsum(pc.list_value_length(arr).to_numpy())[:-1])
            if kind == "input_ids":
                yield from ids
            else:
                extra = batch.column(1)
                if extra.null_count or extra.flatten().null_count:
                    raise DataError(f"{key}: {p}: column {kind!r} holds nulls; give one integer per token")
                lengths = pc.list_value_length(extra).to_numpy()
                flags = np.split(extra.flatten().to_numpy().astype(np.int64), np.cumsum(lengths)[:-1])
                yield from ((x, _token_mask(x, f, kind, f"{p} row {row + i}"))
                            for i, (x, f) in enumerate(zip(ids, flags)))
        row += batch.num_rows


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


TOKENIZER_CONFIGS = ("tokenizer_config.json", "special_tokens_map.json")  # where eos_token is declared, in order


def declared_eos(path: Path) -> str | None:
    """The end-of-sequence token a tokenizer declares: `eos_token` of the tokenizer_config.json or
    special_tokens_map.json beside its tokenizer.json (a string, or an AddedToken's `content`)."""
    directory = path if path.is_dir() else path.parent
    for name in TOKENIZER_CONFIGS:
        file = directory / name
        if not file.is_file():
            continue
        try:
            token = json.loads(file.read_text(encoding="utf-8")).get("eos_token")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            raise DataError(f"data.tokenizer: {file} is not a JSON object; save the tokenizer again "
                            "with save_pretrained") from None
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and token:
            return token
    return None


def eos_token(d: DataConfig) -> str | None:
    """The token that ends each document: data.eos_token, else data.tokenizer's declared one (None
    if it declares none), else the trained BPE's EOS."""
    if d.eos_token is not None:
        return d.eos_token
    return EOS if d.tokenizer is None else declared_eos(Path(d.tokenizer))


def eos_id(d: DataConfig, tok: Tokenizer) -> int:
    """The id of `eos_token(d)` in `tok`'s vocabulary; a tokenizer without one is refused."""
    token = eos_token(d)
    if token is None:
        raise DataError(f"data.tokenizer: {d.tokenizer} declares no end-of-sequence token (eos_token in "
                        "tokenizer_config.json or special_tokens_map.json); set data.eos_token to the token "
                        "that ends a document")
    i = tok.hf.token_to_id(token)
    if i is None:
        key, fix = (("data.eos_token", "give a token of that vocabulary") if d.eos_token is not None else
                    ("data.tokenizer", "fix its eos_token or set data.eos_token to a token of that vocabulary"))
        raise DataError(f"{key}: end-of-sequence token {token!r} is not in the vocabulary of {tok.path}; {fix}")
    return i


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

    def encode(self, docs: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(docs)]


def train_tokenizer(docs: Iterable[str], vocab_size: int, out: Path, special_tokens: Sequence[str] = (),
                    chat_template: str | None = None) -> Path:
    """Byte-level BPE trained on `docs` (any iterable: it is streamed), with EOS and `special_tokens`,
    saved as out/tokenizer.json and a tokenizer_config.json that declares EOS as its eos_token (and
    holds `chat_template`), each written atomically."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, *special_tokens], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    _write_tokenizer_config(out, chat_template)
    atomic_write_text(out / "tokenizer.json", tok.to_str())
    return out


def _write_tokenizer_config(out: Path, chat_template: str | None = None) -> None:
    # tokenizer_class lets transformers' AutoTokenizer load the directory without a model config.json
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS}
    if chat_template is not None:
        config["chat_template"] = chat_template
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")


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
    elif not (out / "tokenizer_config.json").is_file():  # trained before tokenizers declared their eos
        _write_tokenizer_config(out)
    return Tokenizer(out)
