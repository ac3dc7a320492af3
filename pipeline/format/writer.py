"""CacheWriter: a cache from teacher outputs computed anywhere (your own inference job, a server).

    spec = {"teacher": {"name": "my-llm", "revision": "abc123"}, "dataset": {"fingerprint": "sha256:..."}}
    with CacheWriter("data/caches", spec=spec, encoding=TopK(32000, 32), num_classes=32000,
                     seq_len=128, temperature=1.0) as w:
        for ids, x in batches:                 # always in the same order
            w.add(ids, logits=teacher(x))      # (B, C), or (B, L, V) for token caches
    print(w.path)                              # <root>/<cache_id>, complete

The format, sharding, atomicity and content id are those of `logitcache cache`: fixed shards of
rows_per_shard rows (token caches: whole sequences; unset, shard and chunk are sized by the row's
stored bytes as the cache stage sizes them: pipeline.core.config.default_layout) named by index,
each written by write_shard under a temporary name and renamed into place, the manifest written last and only when the
`with` block ends without an exception. The id hashes the declared spec (teacher, dataset
fingerprint), the temperature, the encoding and its parameters, the layout and the format version.

Resuming: a rerun with the same spec finds the shards already on disk and does not rewrite them
(rows that fall into them are not encoded; `rows_on_disk` tells how many leading samples a caller
may skip computing, passing `add(sample_ids)` without outputs). Rows must arrive in the same order
as in the first run: each existing shard's sample ids are compared and a mismatch is refused.
Sampled and hybrid draws are seeded per shard, so reruns are byte-identical when the `add` calls
split each shard's rows the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.codecs import CODECS, codec_problems, default_codec, layout_codec
from pipeline.core.config import default_layout
from pipeline.core.errors import ArgumentError, CacheError
from pipeline.core.io import atomic_write_json, hash_json
from pipeline.core.validate import COUNT, FIELDS, SEED, Rule, argument, choice, flag
from pipeline.format import manifest as fmt
from pipeline.format.backends import BACKENDS
from pipeline.format.encodings import ENCODINGS, LOGP_FLOOR, Encoding, TopK, encoding_from_params
from pipeline.format.shards import shard_entry, shard_name, write_shard


def _encoding_arg(encoding: Encoding | str | dict[str, Any], num_classes: int) -> Encoding:
    """An encoding object from itself, a name ("dense") or parameters ({"name": "topk", "k": 8})."""
    if not isinstance(encoding, (str, dict)):
        if not isinstance(encoding, tuple(ENCODINGS.values())):
            raise ArgumentError(f"encoding: {encoding!r} is not an encoding; give lc.Dense(C), lc.TopK(C, k), ..., a "
                                f"name ({', '.join(ENCODINGS)}) or parameters ({{'name': 'topk', 'k': 8}})")
        if encoding.num_classes != num_classes:
            raise ArgumentError(f"encoding has {encoding.num_classes} classes but num_classes={num_classes}")
        problems = encoding.problems()  # as one made from its parameters is checked
        if problems:
            raise ArgumentError(f"encoding {problems[0]}")
        return encoding
    try:
        return encoding_from_params({"name": encoding} if isinstance(encoding, str) else encoding, num_classes)
    except ValueError as e:
        raise ArgumentError(f"encoding {e}") from None


def _as_tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


class CacheWriter:
    """Write a cache from outputs you computed: `with CacheWriter(...) as w: w.add(ids, logits=...)`.

    Classification: add(sample_ids (B,), logits or logprobs (B, C)). Token caches (seq_len set,
    or tokens=True for sequences of varying length): add(sample_ids (B,) one per sequence, logits
    (B, L, V)[, lengths (B,)]); row p of a sequence is the distribution of the token after
    position p, as `logitcache cache` stores it. Teachers that return only their top N:
    add(ids, topk=(class ids, log-probs)) with a TopK(k=N) encoding; the residual is 1 - their
    mass, clamped at 0. Rows are buffered up to one shard."""

    def __init__(self, root: str | Path, spec: dict[str, Any], encoding: Encoding | str | dict[str, Any],
                 num_classes: int, backend: str = "zarr", rows_per_shard: int | None = None, chunk_rows: int | None = None,
                 temperature: float = 1.0, seq_len: int | None = None, tokens: bool = False, seed: int = 0,
                 compression_level: int | None = None, codec: str | None = None) -> None:
        if not isinstance(spec, dict) or not ({"teacher", "teachers"} & spec.keys()) or "dataset" not in spec:
            raise ArgumentError("spec: declare what determines the targets, at least {'teacher': ..., 'dataset': ...} "
                                "(name/revision of the teacher, a fingerprint of the inputs)")
        try:
            hash_json(spec)
        except (TypeError, ValueError) as e:
            raise ArgumentError(f"spec: not plain JSON data ({e}); give strings, numbers, lists and dicts") from None
        if not isinstance(root, (str, os.PathLike)) or not os.fspath(root):
            raise ArgumentError(f"root: {root!r} is not a directory; give a non-empty str or Path")
        choice("backend", backend, BACKENDS)
        argument("num_classes", num_classes, FIELDS["data.num_classes"])
        for name, value in (("rows_per_shard", rows_per_shard), ("chunk_rows", chunk_rows)):
            if value is not None:  # None: sized by the row's bytes, as the cache stage sizes it
                argument(name, value, FIELDS[f"cache.{name}"])
        argument("temperature", temperature, FIELDS["teachers.temperature"])
        if seq_len is not None:
            argument("seq_len", seq_len, COUNT)
        flag("tokens", tokens)
        argument("seed", seed, SEED)
        if codec is not None:  # None: the encoding's default
            choice("codec", codec, CODECS)
        if compression_level is not None:
            argument("compression_level", compression_level, Rule(integer=True))
        self.tokens = tokens or seq_len is not None
        self.encoding = _encoding_arg(encoding, num_classes)
        chunk_rows, rows_per_shard = default_layout("lm" if self.tokens else "classify", seq_len or 1, 0,
                                                    self.encoding.raw_bytes_per_row() + 8,  # + sample_id
                                                    chunk_rows, rows_per_shard)
        if seq_len is not None and (rows_per_shard % seq_len or chunk_rows % seq_len):
            raise ArgumentError(f"rows_per_shard={rows_per_shard}, chunk_rows={chunk_rows}: both must be multiples of "
                                f"seq_len={seq_len} (sequences never straddle chunks)")
        codec = default_codec(self.encoding.name, backend) if codec is None else codec
        problems = codec_problems(codec, compression_level, backend)
        if problems:
            raise ArgumentError(problems[0])
        self.seq_len, self.backend, self.seed = seq_len, backend, seed
        self.rows_per_shard, self.chunk_rows, self.level = rows_per_shard, chunk_rows, compression_level
        self.codec = codec
        self.temperature = float(temperature)
        self.spec = self._full_spec(spec)
        self.path = Path(root) / fmt.cache_id(self.spec)
        self.shards_dir = self.path / "shards"
        self._entries: list[dict[str, Any]] = []
        self._seen = SeenIds()
        self._reset_buffer(0, 0)
        self._open = False

    def _full_spec(self, user: dict[str, Any]) -> dict[str, Any]:
        ds = user["dataset"]
        fingerprint = ds if isinstance(ds, str) else ds.get("fingerprint") if isinstance(ds, dict) else None
        dataset: dict[str, Any] = {"fingerprint": fingerprint or hash_json(ds)[:16]}
        if self.tokens:
            dataset["seq_len"] = self.seq_len  # None: sequences of varying length
            vocab = user.get("vocab_fingerprint") or (ds.get("vocab_fingerprint") if isinstance(ds, dict) else None)
            if vocab:
                dataset["vocab_fingerprint"] = vocab
        teachers = user.get("teachers", [user.get("teacher")])
        spec = {
            "format_version": fmt.FORMAT_VERSION, "made_by": "CacheWriter", "declared": user, "dataset": dataset,
            "num_classes": self.encoding.num_classes,
            "teachers": [t if isinstance(t, dict) else {"name": str(t)} for t in teachers],
            "temperature": self.temperature, "encoding": self.encoding.params(),
            "layout": {"backend": self.backend, "rows_per_shard": self.rows_per_shard, "chunk_rows": self.chunk_rows},
        }
        spec["layout"].update(layout_codec(self.codec))
        if self.encoding.stochastic:
            spec["sampling_seed"] = self.seed
        return spec

    # -- context ---------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.complete = (fmt.read_manifest(self.path) or {}).get("status") == "complete"
        self._open = True
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._open = False
        if exc_type is not None:
            return  # shards written so far stay; the manifest is not written
        if self._rows:
            self._flush()
        n = len(self._entries)
        extra_shards = [p.name for p in self.shards_dir.glob("[0-9]*") if int(p.name.split(".")[0]) >= n] \
            if self.shards_dir.is_dir() else []
        if extra_shards:
            raise CacheError(f"{self.path}: shards {sorted(extra_shards)} lie beyond the {n} shards this run wrote, so "
                             "the rows changed since an earlier run; delete the directory to start over")
        if n == 0:
            raise CacheError(f"{self.path}: no rows were added; nothing to write")
        if self.complete:
            return
        atomic_write_json(self.path / "spec.json", self.spec)
        extra = {"backend": self.backend, "encoding": self.encoding.params(), "num_classes": self.encoding.num_classes,
                 "temperature": self.temperature, "teachers": [t.get("name", "?") for t in self.spec["teachers"]],
                 "dataset": self.spec["dataset"]}
        if self.tokens:
            rows = sum(e["rows"] for e in self._entries)
            extra["bytes_per_token"] = round(sum(e["bytes"] for e in self._entries) / max(rows, 1), 2)
        fmt.write_manifest(self.path, self.spec, self._entries, extra)
        self.complete = True

    # -- buffering ---------------------------------------------------------------------------------

    def _shard_path(self, index: int) -> Path:
        return self.shards_dir / shard_name(index, self.backend)

    def _reset_buffer(self, index: int, first_row: int) -> None:
        self._index, self._first_row = index, first_row
        self._parts: list[dict[str, np.ndarray]] = []
        self._lengths: list[np.ndarray] = []
        self._rows = 0
        self._exists = self._shard_path(index).exists()
        self._gen: torch.Generator | None = None

    @property
    def rows_on_disk(self) -> int:
        """Samples (sequences for token caches) at the start that shards on disk already hold."""
        n, i = 0, 0
        while self._shard_path(i).exists():
            ids = BACKENDS[self.backend].sample_ids(self._shard_path(i))
            n += int((np.diff(ids) != 0).sum() + 1) if self.tokens and len(ids) else len(ids)
            i += 1
        return n

    def add(self, sample_ids: Any, logits: Any = None, logprobs: Any = None,
            topk: tuple[Any, Any] | None = None, lengths: Any = None) -> None:
        """Add B samples (classification rows, or sequences of a token cache), in a fixed order."""
        if not self._open:
            raise RuntimeError("CacheWriter.add: use the writer as a context manager (with CacheWriter(...) as w)")
        try:
            ids = np.asarray(sample_ids).reshape(-1)
        except ValueError:
            ids = np.asarray([None])
        if ids.size == 0:
            ids = ids.astype(np.int64)
        if ids.dtype.kind not in "iu":
            raise ArgumentError(f"add: sample_ids must be integers, got {ids.dtype} ({_span(ids)})")
        if ids.dtype.kind == "u" and len(ids) and ids.max() > np.iinfo(np.int64).max:
            raise ArgumentError(f"add: sample id {ids.max()} does not fit int64")
        ids = ids.astype(np.int64)
        given = [x for x in (logits, logprobs, topk) if x is not None]
        if len(given) > 1:
            raise ValueError("add: pass one of logits, logprobs, topk")
        values = given[0] if given else None
        if topk is not None:
            values = (_as_tensor(topk[0]), _as_tensor(topk[1]))
            if not isinstance(self.encoding, TopK) or self.encoding.bits != 16 or \
                    values[0].shape[-1] != self.encoding.k or values[1].shape != values[0].shape:
                raise ValueError(f"add(topk=...): needs a 16-bit TopK encoding with k equal to the {values[0].shape[-1]} "
                                 f"ids per row given (ids and log-probs of one shape); this writer has {self.encoding.label()}")
        elif values is not None:
            values = _as_tensor(values)
        lead = values[0] if isinstance(values, tuple) else values
        if lead is not None:
            want = 3 if self.tokens else 2
            if lead.dim() != want or lead.shape[0] != len(ids):
                shape = "(B, L, V)" if self.tokens else "(B, C)"
                raise ValueError(f"add: outputs {tuple(lead.shape)} for {len(ids)} sample ids; pass {shape} with B = "
                                 "the number of sample ids")
        seq_lengths = self._item_lengths(ids, lead, lengths)
        repeated = self._seen.add(ids)
        if repeated is not None:
            raise ArgumentError(f"add: sample id {repeated} was already added to this cache; sample ids key every row, "
                                "so each sample (sequence) may be added once")
        i = 0
        while i < len(ids):
            room = self.rows_per_shard - self._rows
            fit = np.searchsorted(np.cumsum(seq_lengths[i:]), room, side="right")
            if fit == 0 and self._rows:
                self._flush()
                continue
            j = i + max(int(fit), 1)  # a sequence longer than a shard gets a shard of its own
            self._take(ids[i:j], seq_lengths[i:j], _slice(values, i, j), logits is not None)
            i = j
            if self._rows >= self.rows_per_shard:
                self._flush()

    def _item_lengths(self, ids: np.ndarray, lead: torch.Tensor | None, lengths: Any) -> np.ndarray:
        if not self.tokens:
            return np.ones(len(ids), dtype=np.int64)
        if lengths is not None:
            if self.seq_len is not None:
                raise ValueError(f"add: lengths are for caches of varying length; this one has seq_len={self.seq_len}")
            out = np.asarray(lengths, dtype=np.int64).reshape(-1)
            if len(out) != len(ids) or (out < 1).any() or (lead is not None and (out > lead.shape[1]).any()):
                raise ValueError("add: lengths must be one per sample id, >= 1 and <= L of the outputs")
            return out
        if lead is None:
            if self.seq_len is None:
                raise ValueError("add(sample_ids) without outputs needs lengths= for a cache of varying length")
            return np.full(len(ids), self.seq_len, dtype=np.int64)
        if self.seq_len is not None and lead.shape[1] != self.seq_len:
            raise ValueError(f"add: outputs of length {lead.shape[1]} but this cache has seq_len={self.seq_len}")
        return np.full(len(ids), lead.shape[1], dtype=np.int64)

    def _take(self, ids: np.ndarray, lengths: np.ndarray, values: Any, are_logits: bool) -> None:
        rows = int(lengths.sum())
        part: dict[str, np.ndarray] = {"sample_id": np.repeat(ids, lengths) if self.tokens else ids}
        if self.tokens:
            dtype = np.int16 if self.seq_len is not None and self.seq_len <= 32767 else np.int32
            part["position"] = np.concatenate([np.arange(n, dtype=dtype) for n in lengths])
        if not self._exists:
            if values is None:
                raise ValueError(f"add: sample ids {ids[0]}..{ids[-1]} fall into shard {self._index}, which is not on "
                                 "disk yet; pass their logits or logprobs")
            part.update(self._encode(values, lengths, are_logits, ids))
        self._parts.append(part)
        self._lengths.append(lengths)
        self._rows += rows

    def _encode(self, values: Any, lengths: np.ndarray, are_logits: bool, ids: np.ndarray) -> dict[str, np.ndarray]:
        enc = self.encoding
        if isinstance(values, tuple):  # top-N ids and log-probs from a server
            top_ids, top_logp = (self._rows_of(v, lengths) for v in values)
            top_logp = top_logp.float()
            _check_finite(top_logp, ids)
            top_logp, order = top_logp.sort(dim=-1, descending=True)
            top_ids = top_ids.long().gather(-1, order)
            if int(top_ids.min()) < 0 or int(top_ids.max()) >= enc.num_classes:
                raise ValueError(f"add(topk=...): class ids outside [0, {enc.num_classes}) for sample ids {ids[0]}..{ids[-1]}")
            residual = (1.0 - top_logp.exp().sum(-1)).clamp(min=0.0)
            encoded = {"ids": top_ids, "logp": top_logp.clamp(min=LOGP_FLOOR).half(), "residual": residual.half()}
            return enc.to_host(encoded)
        x = self._rows_of(values, lengths).float()  # (rows, C)
        logp = F.log_softmax(x / self.temperature if are_logits else x, dim=-1)
        _check_finite(logp, ids)
        if self._gen is None and enc.stochastic:  # seeded per shard, like the cache stage
            self._gen = torch.Generator(device=logp.device).manual_seed(self.seed * 1_000_003 + self._index)
        return enc.to_host(enc.encode(logp, self._gen))

    def _rows_of(self, x: torch.Tensor, lengths: np.ndarray) -> torch.Tensor:
        """(B, C) as is; (B, L, ...) to the valid rows (rows, ...), sequence-major."""
        if not self.tokens:
            return x
        mask = torch.arange(x.shape[1])[None, :] < torch.from_numpy(lengths)[:, None]
        return x[mask.to(x.device)]

    def _flush(self) -> None:
        arrays = {k: np.concatenate([p[k] for p in self._parts]) for k in self._parts[0]}
        lengths = np.concatenate(self._lengths)
        path, rows = self._shard_path(self._index), self._rows
        if self._exists:
            stored = BACKENDS[self.backend].sample_ids(path)
            if not np.array_equal(stored, arrays["sample_id"]):
                raise CacheError(f"{path}: this shard on disk holds sample ids {_span(stored)} but this run's rows for "
                                 f"it are {_span(arrays['sample_id'])}; rows must arrive in the same order as in the "
                                 f"first run (or delete {self.path} to start over)")
        else:
            if self.tokens:
                arrays["offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            write_shard(path, arrays, self._attrs(rows), self.encoding, self.chunk_rows, self.level, self.codec)
        entry = shard_entry(self.path, self._index, self.backend, self._first_row, rows)
        if self.tokens and self.seq_len is None:
            entry.update(_chunk_ownership(lengths, self.chunk_rows))
        self._entries.append(entry)
        self._reset_buffer(self._index + 1, self._first_row + rows)

    def _attrs(self, rows: int) -> dict[str, Any]:
        attrs = {"format_version": fmt.FORMAT_VERSION, "cache_id": self.path.name, "shard": self._index,
                 "first_row": self._first_row, "rows": rows, "num_classes": self.encoding.num_classes,
                 "temperature": self.temperature, "encoding": self.encoding.params(),
                 "teachers": [t.get("name", "?") for t in self.spec["teachers"]], "made_by": "CacheWriter"}
        if self.tokens:
            attrs["seq_len"] = self.seq_len
        return attrs


class SeenIds:
    """The sample ids added so far, as sorted runs merged like the digits of a binary counter: a
    batch is checked with one binary search per run (a logarithmic number of them), at 8 bytes an id."""

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []  # sorted, disjoint, each at least twice the size of the next

    def add(self, ids: np.ndarray) -> int | None:
        """Add `ids`; or, when one repeats (within them or an earlier call), add none and return it."""
        new, counts = np.unique(ids, return_counts=True)
        if not len(new):
            return None
        if (counts > 1).any():
            return int(new[counts > 1][0])
        for run in self.runs:
            at = np.minimum(np.searchsorted(run, new), len(run) - 1)
            hit = run[at] == new
            if hit.any():
                return int(new[hit][0])
        while self.runs and len(self.runs[-1]) <= 2 * len(new):
            new = np.union1d(self.runs.pop(), new)
        self.runs.append(new)
        return None


def _slice(values: Any, i: int, j: int) -> Any:
    if values is None:
        return None
    if isinstance(values, tuple):
        return tuple(v[i:j] for v in values)
    return values[i:j]


def _span(ids: np.ndarray) -> str:
    return f"{ids[0]}..{ids[-1]} ({len(ids)} rows)" if len(ids) else "(none)"


def _check_finite(x: torch.Tensor, ids: np.ndarray) -> None:
    """-inf is a class with probability 0; NaN and +inf are a teacher gone wrong."""
    if torch.isnan(x).any() or (x == float("inf")).any():
        raise ValueError(f"add: NaN or +inf in the outputs for sample ids {ids[0]}..{ids[-1]}")


def _chunk_ownership(lengths: np.ndarray, chunk_rows: int) -> dict[str, list[int]]:
    """For sequences of varying length: per chunk, the sequences that start in it and the row where
    its owned rows end (a sequence belongs to the chunk it starts in, and may run past it)."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    ends = starts + lengths
    rows = int(ends[-1])
    items, extent, prev = [], [], 0
    for lo in range(0, rows, chunk_rows):
        own = max(lo, prev)
        mine = (starts >= lo) & (starts < lo + chunk_rows)
        prev = int(ends[mine].max()) if mine.any() else own
        items.append(int(mine.sum()))
        extent.append(prev)
    return {"chunk_items": items, "chunk_extent": extent}
