"""Token bytes and the map from a teacher's vocabulary onto a student's, for cross-tokenizer distillation.

A token cache records the teacher's vocabulary once, as the bytes each token stands for
(`write_vocab`, `read_vocab`); a student with another tokenizer maps every teacher token to one of
its own (`map_vocab`) and moves the teacher's probability mass along that map.

What a token's bytes are (`token_bytes`), from the tokenizer's decoder: the bytes the decoder puts
into the text for that token in the middle of a sequence.
- ByteLevel (GPT-2 style): each character of the token stands for one byte (GPT-2's byte-to-unicode
  table, inverted), so "Ġworld" is b" world" and a token holding part of a UTF-8 character is
  those raw bytes.
- Metaspace, or a Sequence of Replace("▁", " "), ByteFallback, Fuse and Strip (SentencePiece
  style): "▁" is a space, "<0xNN>" is that one byte (when the model or decoder does byte
  fallback). The space a Metaspace pre-tokenizer prepends to a text, and which its decoder strips
  from the first token, is kept: "▁world" is b" world" wherever it occurs. Strip acts on the whole
  decoded text (after Fuse), not on a token, and is ignored. A literal "▁" in the text cannot be
  told from a space.
- WordPiece: a piece with the continuation prefix ("##ing") is the piece without it (b"ing"); any
  other piece starts a word, and a WordPiece vocabulary holds no spaces, so it is assumed to follow a
  space, as the decoder joins it (b" walk"), except where the decoder's cleanup glues it to the word
  before ("." , "," , "?", "!", "n't", "'s", ...). The first word of a text and words after other
  punctuation differ. A lowercasing or accent-stripping normalizer makes every such byte string the
  normalized text, not the original.
- Any other decoder (or none): `hf.decode([id])` as UTF-8, an approximation (a BPEDecoder's "</w>"
  end of word, for one, is lost).
Special tokens, the model's unknown token, and ids absent from the vocabulary have no bytes (None);
an added token that is not special is its content as UTF-8.

How a teacher token maps onto the student (`map_vocab`), in order:
1. the teacher's eos goes to the student's eos (exact);
2. a token without bytes goes nowhere (-1);
3. bytes equal to a student token's bytes go to that token (exact; the lowest id among equals);
4. otherwise, the teacher token's text is split by the student, and its probability, that the text
   continues with these bytes, goes to the student token the text starts with: the student's first
   token of encoding the text, when the bytes are UTF-8 and that token's bytes are a prefix of them;
   else (a token holding part of a character, or a Metaspace student that prepends "▁") the longest
   student token whose bytes are a prefix;
5. no student token is a prefix: -1.
Rule 4 is an approximation: the student's tokenization of the longer text that follows can merge
across the teacher token's end (teacher "Ġwor" + "ld" while the student has "Ġworld"), so the mass
lands on a token the student would not use there. Only exact matches (`VocabMap.exact`) carry the
teacher's probability of the very same next text.

Stored form, one file per cache, JSON:
    {"format": 1, "eos": <teacher eos id>, "fingerprint": <tokenizer fingerprint>,
     "tokens": [<bytes as latin-1, one character per byte> or null, ...]}   # index = token id
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.errors import DataError
from pipeline.core.io import atomic_write_json, read_json

if TYPE_CHECKING:
    from tokenizers import Tokenizer as HFTokenizer

FORMAT = 1

REBUILD = "rebuild the cache with `logitcache cache CONFIG`"


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the printable character that spells each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    code = {b: b for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in code):
        code[b] = 256 + n
    return {chr(c): b for b, c in code.items()}


BYTE_LEVEL = _byte_level_chars()
_BYTE_LEVEL_LATIN1 = str.maketrans({c: chr(b) for c, b in BYTE_LEVEL.items()})  # one latin-1 char per byte

# what a WordPiece decoder's cleanup does to " " + piece (tokenizers' decoders/wordpiece.rs)
WORDPIECE_CLEANUP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


def _byte_level(piece: str) -> bytes:
    # as tokenizers' ByteLevel decoder does, a piece with a character outside the table is its UTF-8
    if BYTE_LEVEL.keys() >= set(piece):
        return piece.translate(_BYTE_LEVEL_LATIN1).encode("latin-1")
    return piece.encode()


FALLBACK_BYTE = re.compile(r"<0x([0-9A-F]{2})>")  # SentencePiece's byte-fallback pieces


def _piece_spelling(decoder: dict[str, Any] | None, byte_fallback: bool) -> Callable[[str], bytes] | None:
    """A function from a vocabulary piece to its bytes, for the decoders described above; None for
    any other (the caller falls back to decoding each id)."""
    steps = [] if decoder is None else decoder["decoders"] if decoder["type"] == "Sequence" else [decoder]
    if not steps:
        return None
    replace: list[tuple[str, str]] = []
    to_bytes: Callable[[str], bytes] = str.encode
    wordpiece: dict[str, Any] | None = None
    for step in steps:
        kind = step["type"]
        if kind == "ByteLevel":
            to_bytes = _byte_level
        elif kind == "Metaspace":
            replace.append((step["replacement"], " "))
        elif kind == "Replace" and "String" in step["pattern"]:
            replace.append((step["pattern"]["String"], step["content"]))
        elif kind == "ByteFallback":
            byte_fallback = True
        elif kind == "WordPiece":
            wordpiece = step
        elif kind not in ("Fuse", "Strip"):  # both act on the whole text, not on one token
            return None

    def spell(piece: str) -> bytes:
        if byte_fallback and (byte := FALLBACK_BYTE.fullmatch(piece)):
            return bytes([int(byte[1], 16)])
        if wordpiece is not None:
            prefix = wordpiece["prefix"]
            piece = piece[len(prefix):] if piece.startswith(prefix) else " " + piece
            if wordpiece.get("cleanup", False):
                for dirty, clean in WORDPIECE_CLEANUP:
                    piece = piece.replace(dirty, clean)
        for old, new in replace:
            piece = piece.replace(old, new)
        return to_bytes(piece)

    return spell


def _unknown_piece(model: dict[str, Any]) -> str | None:
    """The model's unknown token (a BPE's or WordPiece's unk_token, a Unigram's unk_id), if any."""
    if model["type"] == "Unigram":
        return None if model.get("unk_id") is None else model["vocab"][model["unk_id"]][0]
    return model.get("unk_token")


def token_bytes(hf: HFTokenizer) -> list[bytes | None]:
    """The bytes each token id 0..max id stands for in the original text (module docstring); None
    for special tokens, the unknown token and ids absent from the vocabulary."""
    spec = json.loads(hf.to_str())
    model = spec["model"]
    spell = _piece_spelling(spec.get("decoder"), bool(model.get("byte_fallback", False)))
    vocab = hf.get_vocab(with_added_tokens=True)
    added = hf.get_added_tokens_decoder()
    unknown = _unknown_piece(model)
    out: list[bytes | None] = [None] * (max(vocab.values(), default=-1) + 1)
    for piece, i in vocab.items():
        if i in added:
            out[i] = None if added[i].special else added[i].content.encode()
        elif piece != unknown:
            out[i] = spell(piece) if spell is not None else hf.decode([i]).encode()
    return out


@dataclass(frozen=True)
class Vocab:
    """A tokenizer's vocabulary as stored with a cache: bytes per token id (None: no text), its eos id
    and its fingerprint (pipeline/inputs/text.py's Tokenizer.fingerprint)."""

    tokens: list[bytes | None]
    eos: int
    fingerprint: str


def write_vocab(path: Path, tokens: list[bytes | None], eos: int, fingerprint: str) -> None:
    """Write a vocabulary in the stored form (module docstring), atomically."""
    if not 0 <= eos < len(tokens):
        raise ValueError(f"eos {eos} is not a token id of a {len(tokens)}-token vocabulary")
    atomic_write_json(Path(path), {"format": FORMAT, "eos": eos, "fingerprint": fingerprint,
                                   "tokens": [None if t is None else t.decode("latin-1") for t in tokens]})


def read_vocab(path: Path) -> Vocab:
    """A vocabulary written by `write_vocab`; anything else is one DataError line naming the file."""
    path = Path(path)
    spec = read_json(path, DataError, REBUILD)

    def refuse(what: str) -> DataError:
        return DataError(f"{path}: {what}, not a token vocabulary of format {FORMAT}; {REBUILD}")

    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise refuse(f"format is {spec.get('format') if isinstance(spec, dict) else None!r}")
    tokens, eos, fingerprint = spec.get("tokens"), spec.get("eos"), spec.get("fingerprint")
    if not isinstance(tokens, list) or not all(t is None or isinstance(t, str) for t in tokens):
        raise refuse("'tokens' is not a list of strings and nulls")
    if not isinstance(fingerprint, str):
        raise refuse("'fingerprint' is not a string")
    if not isinstance(eos, int) or isinstance(eos, bool) or not 0 <= eos < len(tokens):
        raise refuse(f"'eos' is {eos!r}, not a token id below {len(tokens)}")
    try:
        as_bytes = [None if t is None else t.encode("latin-1") for t in tokens]
    except UnicodeEncodeError:
        raise refuse("a token holds a character above U+00FF") from None
    return Vocab(as_bytes, eos, fingerprint)


@dataclass(frozen=True, eq=False)
class VocabMap:
    """Where each teacher token's probability goes on the student's vocabulary."""

    target: np.ndarray  # int64 (teacher vocab,): a student token id, or -1 (nowhere)
    exact: np.ndarray  # bool (teacher vocab,): the teacher token's bytes equal its target's

    def summary(self) -> dict[str, int]:
        mapped = int((self.target >= 0).sum())
        exact = int(self.exact.sum())
        return {"exact": exact, "prefix": mapped - exact, "unmapped": len(self.target) - mapped}


def map_vocab(teacher: Vocab, student: HFTokenizer, student_eos: int) -> VocabMap:
    """Each teacher token's student token, by the rules in the module docstring. Dictionary lookups
    only: a teacher token costs one lookup per prefix length, never a scan of the student's vocabulary."""
    spelled = token_bytes(student)
    if not 0 <= student_eos < len(spelled):
        raise ValueError(f"student_eos {student_eos} is not a token id of the student's "
                         f"{len(spelled)}-token vocabulary")
    by_bytes: dict[bytes, int] = {}
    for i, b in enumerate(spelled):
        if b:
            by_bytes.setdefault(b, i)
    longest = max(map(len, by_bytes), default=0)
    if student.padding is not None or student.truncation is not None:  # left padding puts a pad id first
        student = type(student).from_str(student.to_str())
        student.no_padding()
        student.no_truncation()

    target = np.full(len(teacher.tokens), -1, dtype=np.int64)
    split: list[int] = []  # teacher tokens no student token spells exactly
    for t, b in enumerate(teacher.tokens):
        if t == teacher.eos:
            target[t] = student_eos
        elif b and b in by_bytes:
            target[t] = by_bytes[b]
        elif b:
            split.append(t)

    texts: dict[int, str] = {}
    for t in split:
        try:
            texts[t] = teacher.tokens[t].decode()
        except UnicodeDecodeError:  # part of a character: only the prefix rule applies
            pass
    firsts = student.encode_batch(list(texts.values()), add_special_tokens=False)
    first = {t: e.ids[0] for t, e in zip(texts, firsts) if e.ids}
    for t in split:
        b = teacher.tokens[t]
        s = first.get(t)
        if s is not None and spelled[s] and b.startswith(spelled[s]):
            target[t] = s
            continue
        for k in range(min(len(b) - 1, longest), 0, -1):
            if b[:k] in by_bytes:
                target[t] = by_bytes[b[:k]]
                break

    exact = np.zeros(len(teacher.tokens), dtype=bool)
    for t in np.flatnonzero(target >= 0):
        exact[t] = t == teacher.eos or teacher.tokens[t] == spelled[target[t]]
    return VocabMap(target, exact)
