"""Token bytes of byte-level, SentencePiece-style and WordPiece tokenizers trained or built here, the
stored vocabulary, and the teacher-to-student token map checked against slow references."""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from pipeline.core.errors import DataError
from pipeline.inputs.text import EOS, Tokenizer, train_tokenizer
from pipeline.inputs.vocab import BYTE_LEVEL, Vocab, map_vocab, read_vocab, token_bytes, write_vocab

PROSE = ("the world of tokens and teachers a student learns from distribution hello worlds words wording "
         "naïve café über señor 日本語 東京 テキスト 🙂 🚀 🎉 tab\tspaced line\nbreak, while every cached "
         "probability keeps its place; offline logits stored once are read by many students whose "
         "vocabularies differ: merges, pieces, bytes and characters. Alignment (spans) costs little "
         "compared with rerunning large models over billions of documents; a teacher's distribution, "
         "temperature and entropy tell the student what else was likely, beyond the single label")
WORDS = PROSE.split(" ")

TEXTS = ["hello world", "tab\tand\ttabs", "new\nlines\n\n", "double  spaces   here", "naïve café", "🙂🚀 emoji 🎉",
         "日本語のテキスト", " leading space", "unseen: жизнь Ωμέγα", "trailing "]


def corpus() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(20)) for _ in range(400)]


@pytest.fixture(scope="module")
def bpes(tmp_path_factory) -> dict[int, Tokenizer]:
    """Byte-level BPEs of 300 and 600 tokens trained on one corpus, each with a <pad> special."""
    root = tmp_path_factory.mktemp("bpe")
    return {n: Tokenizer(train_tokenizer(corpus(), n, root / str(n), special_tokens=["<pad>"])) for n in (300, 600)}


def unigram(decoder: str) -> HFTokenizer:
    """A SentencePiece-style unigram trained here, with "<0xNN>" pieces and byte fallback, decoded by
    a Metaspace decoder or by Llama's Sequence (Replace, ByteFallback, Fuse, Strip)."""
    tok = HFTokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator([d.replace("\t", " ").replace("\n", " ") for d in corpus()],
                            trainers.UnigramTrainer(vocab_size=200, special_tokens=["<unk>", EOS], unk_token="<unk>",
                                                    show_progress=False))
    spec = json.loads(tok.to_str())
    lowest = min(score for _, score in spec["model"]["vocab"])
    spec["model"]["vocab"] += [[f"<0x{b:02X}>", lowest - 1] for b in range(256)]
    spec["model"]["byte_fallback"] = True
    tok = HFTokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Metaspace() if decoder == "metaspace" else decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return tok


def joined(hf: HFTokenizer, text: str) -> bytes:
    spelled = token_bytes(hf)
    return b"".join(spelled[i] for i in hf.encode(text, add_special_tokens=False).ids)


def byte_level_bpe(merges: list[str]) -> HFTokenizer:
    """A byte-level BPE built by hand: the 256 byte characters, then one token per merge."""
    vocab = {c: i for i, c in enumerate(sorted(BYTE_LEVEL, key=BYTE_LEVEL.__getitem__))}
    pairs = [tuple(m.split(" ")) for m in merges]
    for a, b in pairs:
        vocab.setdefault(a + b, len(vocab))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


# =============================================================================================
# token_bytes


def test_byte_level_characters_are_gpt2s_alphabet_one_per_byte():
    assert set(BYTE_LEVEL) == set(pre_tokenizers.ByteLevel.alphabet())
    assert sorted(BYTE_LEVEL.values()) == list(range(256))
    assert BYTE_LEVEL["Ġ"] == 0x20 and BYTE_LEVEL["Ċ"] == 0x0A and BYTE_LEVEL["A"] == 0x41


def test_byte_level_tokens_spell_words_and_parts_of_characters(bpes):
    hf = bpes[600].hf
    spelled = token_bytes(hf)
    assert spelled[hf.token_to_id("Ġworld")] == b" world"
    assert spelled[hf.token_to_id("Ã")] == b"\xc3"  # the first byte of "é", "ï", "ü"
    # merged tokens that hold part of a character: the first two bytes every emoji here shares, and
    # "na" with the first byte of "ï"
    assert spelled[hf.token_to_id("ðŁ")] == "🙂".encode()[:2] and spelled[hf.token_to_id("naÃ")] == b"na\xc3"
    assert hf.encode("🙃").ids[0] == hf.token_to_id("ðŁ")  # an emoji the corpus lacks
    assert len(spelled) == hf.get_vocab_size() == 600
    assert spelled[hf.token_to_id(EOS)] is None and spelled[hf.token_to_id("<pad>")] is None


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode()
        return True
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_tokens_joined_are_the_text(bpes, text):
    for tok in bpes.values():
        assert joined(tok.hf, text) == text.encode()


@pytest.mark.parametrize("decoder", ["metaspace", "sequence"])
def test_metaspace_tokens_joined_are_the_text_after_the_prepended_space(decoder):
    """The Metaspace pre-tokenizer prepends "▁" unless the text starts with a space; that space is
    in the first token's bytes, and nothing else differs from the text's UTF-8."""
    hf = unigram(decoder)
    spelled = token_bytes(hf)
    for text in TEXTS:
        expected = text if text.startswith(" ") else " " + text
        assert joined(hf, text) == expected.encode(), text
        if decoder == "sequence":  # Llama's decoder strips that one space and applies byte fallback
            assert joined(hf, text)[1:] == hf.decode(hf.encode(text).ids).encode()
    assert spelled[hf.token_to_id("<0x0A>")] == b"\n" and spelled[hf.token_to_id("<0xF0>")] == b"\xf0"
    assert hf.token_to_id("<0x09>") in hf.encode("a\tb").ids  # no tab in the vocabulary: a byte
    assert spelled[hf.token_to_id("▁")] == b" "
    assert spelled[hf.token_to_id("<unk>")] is None and spelled[hf.token_to_id(EOS)] is None


def test_wordpiece_pieces_start_words_after_a_space_unless_glued_by_cleanup():
    pieces = ["[UNK]", "[SEP]", "the", "dog", "walk", "##ing", "##s", ".", ",", "n't", "can"]
    tok = HFTokenizer(models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(["[SEP]"])
    spelled = dict(zip(pieces, token_bytes(tok)))
    assert spelled == {"[UNK]": None, "[SEP]": None, "the": b" the", "dog": b" dog", "walk": b" walk",
                       "##ing": b"ing", "##s": b"s", ".": b".", ",": b",", "n't": b"n't", "can": b" can"}
    text = "the dog walking, the dogs walks."
    assert joined(tok, text) == b" " + text.encode() == b" " + tok.decode(tok.encode(text).ids).encode()


def test_other_decoders_fall_back_to_decoding_each_id_and_added_tokens_are_their_content():
    tok = HFTokenizer(models.WordLevel({"[UNK]": 0, "w0": 1, "w1": 2}, unk_token="[UNK]"))
    tok.add_tokens(["<tool>"])
    tok.add_special_tokens(["<bos>"])
    assert token_bytes(tok) == [None, b"w0", b"w1", b"<tool>", None]
    gap = HFTokenizer(models.WordLevel({"[UNK]": 0, "w0": 1, "w1": 3}, unk_token="[UNK]"))
    assert token_bytes(gap) == [None, b"w0", None, b"w1"]


# =============================================================================================
# the stored vocabulary


def test_stored_vocabulary_round_trips_every_byte(tmp_path):
    tokens = [bytes(range(256)), None, b"\x80\xff", " wörld".encode(), b"\xe6", b"", None]
    write_vocab(tmp_path / "vocab.json", tokens, eos=1, fingerprint="abc123")
    spec = json.loads((tmp_path / "vocab.json").read_text())
    assert spec["format"] == 1 and spec["eos"] == 1 and spec["fingerprint"] == "abc123"
    assert spec["tokens"][2] == "\x80\xff" and spec["tokens"][1] is None
    assert read_vocab(tmp_path / "vocab.json") == Vocab(tokens, 1, "abc123")
    assert not [p for p in tmp_path.iterdir() if p.name != "vocab.json"]  # no temporary left behind


def test_a_trained_tokenizers_vocabulary_round_trips(tmp_path, bpes):
    tok = bpes[300]
    write_vocab(tmp_path / "v.json", token_bytes(tok.hf), tok.hf.token_to_id(EOS), tok.fingerprint)
    vocab = read_vocab(tmp_path / "v.json")
    assert vocab.tokens == token_bytes(tok.hf) and vocab.eos == 0 and vocab.fingerprint == tok.fingerprint


GOOD = {"format": 1, "eos": 0, "fingerprint": "f", "tokens": [None, "a"]}
DAMAGED = [
    ("not json {", "not valid JSON"),
    (json.dumps([1, 2]), "format is None"),
    (json.dumps({**GOOD, "format": 2}), "format is 2"),
    (json.dumps({**GOOD, "eos": 2}), "'eos' is 2, not a token id below 2"),
    (json.dumps({**GOOD, "eos": True}), "'eos' is True"),
    (json.dumps({**GOOD, "tokens": [None, 5]}), "'tokens' is not a list of strings and nulls"),
    (json.dumps({**GOOD, "tokens": "ab"}), "'tokens' is not a list"),
    (json.dumps({**GOOD, "tokens": [None, "Ā"]}), "a character above U+00FF"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "fingerprint"}), "'fingerprint' is not a string"),
]


@pytest.mark.parametrize("content,fragment", DAMAGED, ids=[f for _, f in DAMAGED])
def test_a_damaged_vocabulary_is_refused_in_one_line(tmp_path, content, fragment):
    path = tmp_path / "vocab.json"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        read_vocab(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and fragment in message and "\n" not in message
    assert message.endswith("rebuild the cache with `logitcache cache CONFIG`")


# =============================================================================================
# map_vocab


def slow_longest_prefix(b: bytes, spelled: list[bytes | None]) -> int:
    """The lowest id among the longest student tokens that are a proper prefix of b, by a scan."""
    best = -1
    for i, s in enumerate(spelled):
        if s and len(s) < len(b) and b.startswith(s) and (best < 0 or len(s) > len(spelled[best])):
            best = i
    return best


def check_map(teacher: Vocab, student: HFTokenizer, student_eos: int) -> dict[str, int]:
    """map_vocab against the rules applied one teacher token at a time, the slow way."""
    m = map_vocab(teacher, student, student_eos)
    spelled = token_bytes(student)
    assert m.target.dtype == np.int64 and m.target.shape == (len(teacher.tokens),) and m.exact.dtype == bool
    for t, b in enumerate(teacher.tokens):
        s = int(m.target[t])
        if t == teacher.eos:
            assert s == student_eos and m.exact[t]
        elif not b:
            assert s == -1
        elif b in spelled:
            assert s == spelled.index(b) and m.exact[t]
        else:
            assert not m.exact[t]
            first = student.encode(b.decode(), add_special_tokens=False).ids[0] if _is_utf8(b) else None
            if first is not None and spelled[first] and b.startswith(spelled[first]):
                assert s == first
            else:
                assert s == slow_longest_prefix(b, spelled), b
    summary = m.summary()
    assert sum(summary.values()) == len(teacher.tokens)
    assert summary["exact"] == int(m.exact.sum()) and summary["unmapped"] == int((m.target < 0).sum())
    return summary


def vocab_of(tok: Tokenizer) -> Vocab:
    return Vocab(token_bytes(tok.hf), tok.hf.token_to_id(EOS), tok.fingerprint)


def test_a_larger_bpe_maps_onto_a_smaller_one_by_exact_bytes_or_the_first_student_token(bpes):
    teacher, student = bpes[600], bpes[300]
    summary = check_map(vocab_of(teacher), student.hf, student.hf.token_to_id(EOS))
    # the 300-token BPE's merges are the first of the 600-token one's: its 299 spelled tokens match
    # exactly (with eos), the other 300 teacher tokens are split, and <pad> goes nowhere
    assert summary == {"exact": 299, "prefix": 300, "unmapped": 1}
    m = map_vocab(vocab_of(teacher), student.hf, student.hf.token_to_id(EOS))
    world = teacher.hf.token_to_id("Ġworld")
    assert student.hf.token_to_id("Ġworld") is None
    assert m.target[world] == student.hf.encode(" world").ids[0] and not m.exact[world]
    assert m.target[teacher.hf.token_to_id("<pad>")] == -1


def test_a_smaller_bpe_maps_exactly_onto_a_larger_one(bpes):
    teacher, student = bpes[300], bpes[600]
    assert check_map(vocab_of(teacher), student.hf, 0) == {"exact": 299, "prefix": 0, "unmapped": 1}


def test_a_bpe_and_a_unigram_map_onto_each_other_through_spaces_and_bytes(bpes):
    uni, bpe = unigram("sequence"), bpes[600].hf
    summary = check_map(vocab_of(bpes[600]), uni, uni.token_to_id(EOS))
    assert summary["unmapped"] == 1 and summary["exact"] > 100  # <pad>; "Ġworld" is "▁world", "Ã" is "<0xC3>"
    m = map_vocab(Vocab(token_bytes(uni), uni.token_to_id(EOS), "u"), bpe, bpe.token_to_id(EOS))
    assert m.target[uni.token_to_id("<0xC3>")] == bpe.token_to_id("Ã") and m.target[uni.token_to_id("<unk>")] == -1
    assert m.target[uni.token_to_id("▁world")] == bpe.token_to_id("Ġworld")
    summary = check_map(Vocab(token_bytes(uni), uni.token_to_id(EOS), "u"), bpe, bpe.token_to_id(EOS))
    assert summary["unmapped"] == 1  # every byte is a BPE token: only <unk> goes nowhere


def test_a_merge_in_the_teacher_split_in_the_student_goes_to_the_students_first_token():
    # teacher: " world" is one token; student: " world" encodes as "Ġw" + "orld", though "Ġwor" exists
    teacher = byte_level_bpe(["Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"])
    student = byte_level_bpe(["o r", "or l", "orl d", "Ġ w", "Ġw o", "Ġwo r"])
    assert student.encode(" world").tokens == ["Ġw", "orld"]
    m = map_vocab(Vocab(token_bytes(teacher), 0, "t"), student, 0)
    tid, sid = teacher.token_to_id, student.token_to_id
    assert m.target[tid("Ġworld")] == sid("Ġw") and not m.exact[tid("Ġworld")]
    assert m.target[tid("Ġwor")] == sid("Ġwor") and m.exact[tid("Ġwor")]
    assert m.target[tid("ld")] == sid("l") and not m.exact[tid("ld")]
    # the other way: the student's "orld" is split by the teacher into "or" + "ld"
    back = map_vocab(Vocab(token_bytes(student), 0, "s"), teacher, 0)
    assert back.target[sid("orld")] == tid("or") and back.target[sid("orl")] == tid("or")
    assert back.target[sid("Ġwo")] == tid("Ġw")
    check_map(Vocab(token_bytes(teacher), 0, "t"), student, 0)
    check_map(Vocab(token_bytes(student), 0, "s"), teacher, 0)
    # a student that pads on the left maps as one that does not, and keeps its padding
    student.enable_padding(direction="left", length=8)
    assert map_vocab(Vocab(token_bytes(teacher), 0, "t"), student, 0).target.tolist() == m.target.tolist()
    assert student.padding["direction"] == "left"


def test_hand_built_cases_onto_a_metaspace_student():
    pieces = [("<unk>", 0.0), (EOS, 0.0), ("▁world", -1.0), ("▁", -2.0), ("w", -3.0), ("wor", -3.0),
              ("ld", -3.0), ("o", -3.0), ("r", -3.0), ("l", -3.0), ("d", -3.0), ("▁wor", -9.0), ("日", -3.0)]
    student = HFTokenizer(models.Unigram(pieces, unk_id=0))
    student.pre_tokenizer = pre_tokenizers.Metaspace()
    student.decoder = decoders.Metaspace()
    student.add_special_tokens(["<unk>", EOS])
    sid = student.token_to_id
    teacher = Vocab([None, b" world", b"world", b"worl", " 日本".encode(), "日".encode()[:2], b"", b"xyz", b" w"],
                    eos=0, fingerprint="t")
    m = map_vocab(teacher, student, sid(EOS))
    # " world" is a student token; "world" encodes as "▁world" (the space Metaspace prepends), not a
    # prefix, so the longest prefix "wor" takes it; " 日本" starts with "▁" then "日" (the "本" is unknown)
    assert m.target.tolist() == [sid(EOS), sid("▁world"), sid("wor"), sid("wor"), sid("▁"), -1, -1, -1, sid("▁")]
    assert m.exact.tolist() == [True, True, False, False, False, False, False, False, False]
    assert m.summary() == {"exact": 2, "prefix": 4, "unmapped": 3}
    check_map(teacher, student, sid(EOS))


def random_bpe(n: int, seed: int) -> HFTokenizer:
    """A byte-level BPE of about n tokens built by hand: random words, each spelled by merging its
    letters left to right."""
    rng = random.Random(seed)
    char_of = {b: c for c, b in BYTE_LEVEL.items()}
    merges: list[str] = []
    have = set(BYTE_LEVEL)
    while 256 + len(merges) < n:
        letters = rng.choices("abcdefghijklmnopqrstuvwxyzé", k=rng.randint(2, 9))
        word = " " * rng.randint(0, 1) + "".join(letters)
        chars = [char_of[b] for b in word.encode()]
        for k in range(1, len(chars)):
            whole = "".join(chars[:k + 1])
            if whole not in have:
                have.add(whole)
                merges.append(f"{''.join(chars[:k])} {chars[k]}")
    return byte_level_bpe(merges)


def test_map_vocab_is_fast_at_8k_by_8k():
    teacher, student = random_bpe(8192, 0), random_bpe(8192, 1)
    vocab = Vocab(token_bytes(teacher), 0, "t")
    start = time.perf_counter()
    summary = map_vocab(vocab, student, 0).summary()
    seconds = time.perf_counter() - start
    assert summary["unmapped"] == 0 and summary["prefix"] > 1000
    assert seconds < 2.0, f"map_vocab took {seconds:.2f} s for 8k x 8k tokens"
