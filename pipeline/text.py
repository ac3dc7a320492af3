"""Text data for language-model distillation: corpus, tokenizer, packed token sequences.

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

Documents are tokenized, joined with an end-of-text token, and packed into sequences of
seq_len + 1 tokens: the model reads the first seq_len and predicts the next token at each position.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig
from pipeline.data import Dataset, Splits, check_file
from pipeline.errors import DataError
from pipeline.io import atomic_write_text, hash_json

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


def read_documents(path: str, key: str, text_field: str) -> list[str] | np.ndarray:
    """Documents as strings, or a pre-tokenized ragged list from Parquet `input_ids`."""
    if path == "python-docs":
        return python_docs()
    p = check_file(path, key, "a .txt, .jsonl or .parquet file, or 'python-docs'")
    if p.suffix == ".txt":
        return [d.strip() for d in _utf8(p, key).split("\n\n") if d.strip()]
    if p.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(_utf8(p, key).splitlines()):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)[text_field]
                if not isinstance(doc, str):
                    raise TypeError(doc)
                docs.append(doc)
            except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                raise DataError(f"{p}:{i + 1}: expected a JSON object with a {text_field!r} string "
                                "(data.text_field)") from None
        return docs
    if p.suffix in (".parquet", ".pq"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p)
        except (pa.ArrowException, OSError) as e:
            lines = str(e).strip().splitlines()
            raise DataError(f"{key}: {p}: cannot read as Parquet ({lines[0] if lines else type(e).__name__})") from None
        if "input_ids" in table.column_names:
            ids = table.column("input_ids").to_pylist()
            if not all(isinstance(r, list) and all(isinstance(t, int) and t >= 0 for t in r) for r in ids):
                raise DataError(f"{key}: {p}: column 'input_ids' must hold lists of non-negative token ids")
            return ids
        if text_field not in table.column_names:
            raise DataError(f"{p}: no column {text_field!r} (data.text_field) or 'input_ids'; "
                            f"columns are {', '.join(table.column_names)}")
        texts = [t for t in table.column(text_field).to_pylist() if t]
        if not all(isinstance(t, str) for t in texts):
            raise DataError(f"{key}: {p}: column {text_field!r} (data.text_field) must hold strings")
        return texts
    raise DataError(f"{key}: {path} has suffix {p.suffix!r}; use .txt, .jsonl or .parquet")


def _utf8(p: Path, key: str) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{key}: {p} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None


class Tokenizer:
    """A `tokenizers.Tokenizer` with its vocabulary fingerprint."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise DataError(f"data.tokenizer: {path} has no tokenizer.json; save one with "
                            "tokenizer.save_pretrained(dir) or tokenizers' Tokenizer.save")
        try:
            self.hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises its own Exception type for malformed files
            lines = str(e).strip().splitlines()
            raise DataError(f"data.tokenizer: {file} is not a valid tokenizer.json "
                            f"({lines[0] if lines else type(e).__name__})") from None
        self.path = file
        vocab = self.hf.get_vocab()
        self.vocab_size = max(vocab.values()) + 1
        self.fingerprint = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]
        eos = self.hf.token_to_id(EOS)
        self.eos = eos if eos is not None else self.vocab_size - 1

    def encode(self, docs: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(docs)]


def train_tokenizer(docs: list[str], vocab_size: int, out: Path) -> Path:
    """Byte-level BPE trained on `docs`, saved as out/tokenizer.json (atomically)."""
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


def tokenizer_for(d: DataConfig, workspace: str, train_docs: list[str] | None) -> Tokenizer:
    if d.tokenizer is not None:
        return Tokenizer(Path(d.tokenizer))
    if train_docs is None:
        raise DataError("data.tokenizer: pre-tokenized input_ids need the tokenizer they were made with; "
                        "set data.tokenizer to its directory")
    key = hash_json({"docs": hashlib.sha256("\x00".join(train_docs).encode()).hexdigest(),
                     "vocab_size": d.vocab_size})[:12]
    out = Path(workspace) / "tokenizers" / key
    if not (out / "tokenizer.json").is_file():
        train_tokenizer(train_docs, d.vocab_size, out)
    return Tokenizer(out)


def pack(token_lists: list[list[int]], eos: int, seq_len: int) -> np.ndarray:
    """Join documents with eos and cut into (N, seq_len + 1) int32 sequences (remainder dropped)."""
    flat: list[int] = []
    for ids in token_lists:
        flat.extend(ids)
        flat.append(eos)
    n = len(flat) // (seq_len + 1)
    return np.asarray(flat[: n * (seq_len + 1)], dtype=np.int32).reshape(n, seq_len + 1)


@functools.lru_cache(maxsize=4)
def load_lm_splits(d: DataConfig, workspace: str, stamps: tuple) -> Splits:
    docs = read_documents(d.source, "data.source", d.text_field)
    # a deterministic document-level split keeps held-out text unseen by teachers and students
    order = np.random.default_rng(d.split_seed).permutation(len(docs))
    n_test = max(1, round(len(docs) * d.test_fraction))
    test_docs = [docs[i] for i in sorted(order[:n_test])]
    train_docs = [docs[i] for i in sorted(order[n_test:])]
    if d.test_source is not None:
        train_docs, test_docs = list(docs), list(read_documents(d.test_source, "data.test_source", d.text_field))
    pretokenized = bool(docs) and not isinstance(docs[0], str)
    tok = tokenizer_for(d, workspace, None if pretokenized else train_docs)
    encode = (lambda ds: ds) if pretokenized else tok.encode
    train = pack(encode(train_docs), tok.eos, d.seq_len)
    test = pack(encode(test_docs), tok.eos, d.seq_len)
    if d.max_sequences is not None:
        train, test = train[: d.max_sequences], test[: max(1, d.max_sequences // 4)]
    for name, arr in (("training", train), ("test", test)):
        if len(arr) == 0:
            raise DataError(f"data.source: too little text for one {name} sequence of "
                            f"data.seq_len={d.seq_len} tokens; give more text or a shorter seq_len")
        if arr.max() >= tok.vocab_size:
            raise DataError(f"{d.source}: token id {int(arr.max())} outside the tokenizer's vocabulary "
                            f"of {tok.vocab_size}; tokenize with the tokenizer in data.tokenizer")
    train_ds = Dataset(train.astype(np.int64), None, np.arange(len(train), dtype=np.int64), d.source)
    test_ds = Dataset(test.astype(np.int64), None, np.arange(len(test), dtype=np.int64), f"{d.source} (test)")
    transfer_ds = train_ds
    if d.transfer.source is not None:
        extra = read_documents(d.transfer.source, "data.transfer.source", d.text_field)
        seqs = pack(extra if extra and not isinstance(extra[0], str) else tok.encode(extra), tok.eos, d.seq_len)
        transfer_ds = Dataset(seqs.astype(np.int64), None, np.arange(len(seqs), dtype=np.int64), d.transfer.source)
    return Splits(train=train_ds, test=test_ds, transfer=transfer_ds, num_classes=tok.vocab_size,
                  vocab=tok.fingerprint)
