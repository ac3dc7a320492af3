"""Target encodings: one small class per way of storing a teacher distribution in the cache.

    enc = encoding_from_config(cfg.cache, num_classes)        # the cache stage, once
    enc = encoding_from_spec(manifest["spec"])                  # a reader, once
    stored = enc.to_host(enc.encode(logp, generator))           # on the device, then the host
    targets = enc.targets(enc.decode(stored), device, tau)      # tensors at the student's T
    kl = enc.divergence(logq, targets, "forward", "uniform")    # (n,) per row

Every class owns the same surface: `encode` (on the teachers' device, so only the compact tensors
cross to the host), `to_host`, `columns` (names, dimensions, descriptions), `decode` (stored columns
to its natural numpy form), `targets` (tensors, re-tempered when the encoding allows it),
`divergence` (forward KL, reverse KL, JSD where defined, with the tail model), `fidelity` against
the full distribution, `raw_bytes_per_row`, `params` (what the manifest records) and `label`.
Adding an encoding is one class here, one entry in ENCODINGS, and its tests.

Class ids are stored with the fewest bits that hold the vocabulary: uint8 up to 256 classes,
uint16 up to 65,536, and above that the low 16 bits as uint16 plus the remaining high bits
bit-packed per row (18 bits per id for 150k-262k vocabularies). Sorted id lists are delta-coded,
so the high bits are almost all zero and compress away.

Format 1 (logitcache 0.1.0) stored ids as uint16, or int32 above 65,535 classes, and sampled ids
without delta coding; `encoding_from_spec` reads those caches unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.errors import CacheError, ConfigError
from pipeline.format import kl

LOGP_FLOOR = -1.0e4  # finite stand-in for log(0), representable in float16


BLOCK_ELEMENTS = 1 << 20  # values per block of rows in the encoders' (rows, C) temporaries


MAX_DRAWS = 255  # counts are uint8


_CAST_SLICE = 16384  # elements: under torch's parallel grain (32768), so a cast runs on the calling thread


@dataclass(frozen=True)
class Column:
    name: str
    dims: tuple[str, ...]  # ("row",) or ("row", <second axis>)
    description: str


class Encoding(Protocol):
    name: ClassVar[str]
    num_classes: int

    def columns(self) -> list[Column]: ...
    def encode(self, logp: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]: ...
    def to_host(self, encoded: dict[str, torch.Tensor]) -> dict[str, np.ndarray]: ...
    def decode(self, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
    def targets(self, decoded: dict[str, np.ndarray], device: torch.device | str,
                tau: float = 1.0) -> dict[str, torch.Tensor]: ...
    def divergence(self, logq: torch.Tensor, targets: dict[str, torch.Tensor], kind: str,
                   tail: str) -> torch.Tensor: ...
    def fidelity(self, full: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]: ...
    def raw_bytes_per_row(self) -> float: ...
    def params(self) -> dict[str, Any]: ...
    def label(self) -> str: ...

    @property
    def retemperable(self) -> bool: ...


# ---------------------------------------------------------------------------------------------
# Class ids at the vocabulary's width


def id_bits(num_classes: int) -> int:
    return max(1, (num_classes - 1).bit_length())


def id_store(num_classes: int) -> str:
    """How ids of a `num_classes` vocabulary are stored: u8, u16, or u16+h<n> (n high bits packed)."""
    bits = id_bits(num_classes)
    return "u8" if bits <= 8 else "u16" if bits <= 16 else f"u16+h{bits - 16}"


def _pack_ids(ids: np.ndarray, store: str, name: str) -> dict[str, np.ndarray]:
    """ids (n, m) int -> the stored columns `name` (and `name`_hi for vocabularies above 65,536)."""
    if store == "u8":
        return {name: ids.astype(np.uint8)}
    if store == "i32":
        return {name: ids.astype(np.int32)}
    out = {name: (ids & 0xFFFF).astype(np.uint16)}
    if store.startswith("u16+h"):
        hb = int(store[5:])
        hi = (ids.astype(np.int64) >> 16)[..., None] >> np.arange(hb)  # (n, m, hb) bit planes
        out[f"{name}_hi"] = np.packbits((hi & 1).astype(np.uint8).reshape(len(ids), -1), axis=-1, bitorder="little")
    return out


def _unpack_ids(stored: dict[str, np.ndarray], store: str, name: str) -> np.ndarray:
    ids = stored[name].astype(np.int64)  # (n, m)
    if store.startswith("u16+h"):
        hb = int(store[5:])
        n, m = ids.shape
        bits = np.unpackbits(stored[f"{name}_hi"], axis=-1, count=m * hb, bitorder="little").reshape(n, m, hb)
        ids |= (bits.astype(np.int64) << np.arange(hb)).sum(-1) << 16
    return ids


def _float32(a: np.ndarray) -> np.ndarray:
    """Stored float16 values as float32, cast by torch in slices below its parallel grain: ~2x
    numpy's float16 cast on a 4096 x 32 chunk, and never an OpenMP region, which on the main
    thread costs 10x the cast itself (measured)."""
    out = np.empty(a.shape, np.float32)
    if not a.flags.writeable:  # zero-copy Parquet pages are read-only; torch shares only writable memory
        a = a.copy()
    src, dst = torch.from_numpy(a).reshape(-1), torch.from_numpy(out).reshape(-1)
    for i in range(0, len(src), _CAST_SLICE):
        dst[i:i + _CAST_SLICE].copy_(src[i:i + _CAST_SLICE])
    return out


def _id_columns(store: str, name: str, m_dim: str, description: str) -> list[Column]:
    cols = [Column(name, ("row", m_dim), description)]
    if store.startswith("u16+h"):
        cols.append(Column(f"{name}_hi", ("row", "byte"),
                           f"bits 16 and up of {name}, {store[5:]} per id, packed little-endian per row"))
    return cols


def _id_bytes(store: str, m: int) -> float:
    if store.startswith("u16+h"):
        return 2 * m + math.ceil(m * int(store[5:]) / 8)
    return m * {"u8": 1, "u16": 2, "i32": 4}[store]


def _delta(ids: torch.Tensor) -> torch.Tensor:
    """Ascending ids (B, m) -> first id, then differences: small numbers that compress."""
    return torch.cat([ids[:, :1], ids[:, 1:] - ids[:, :-1]], dim=-1)


# ---------------------------------------------------------------------------------------------
# Shared pieces: 8-bit log quantization, distinct draws with counts, head + tail targets


def _quantize(neg_log: torch.Tensor, logp_range: float) -> torch.Tensor:
    """-log p in [0, logp_range] -> uint8 steps of logp_range / 255 (half a step of error at most)."""
    return (neg_log.clamp(0, logp_range) / (logp_range / 255.0)).round().to(torch.uint8)


def _dequantize_logp(q: np.ndarray, logp_range: float) -> np.ndarray:
    return -np.float32(logp_range / 255.0) * q.astype(np.float32)


def _dequantize_mass(q: np.ndarray, logp_range: float) -> np.ndarray:
    r = np.exp(_dequantize_logp(q, logp_range))
    return np.where(q == 255, np.float32(0), r)  # 255: below e^-logp_range, stored as no tail at all


def _row_blocks(n: int, classes: int) -> list[tuple[int, int]]:
    """Row ranges [a, b) of about BLOCK_ELEMENTS values each that cover n rows of `classes`. No
    block is a single row unless n is: torch sums one long row in another order than several."""
    step = max(2, BLOCK_ELEMENTS // max(classes, 1))
    starts = list(range(0, n, step))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()  # the last row joins the block before it
    return list(zip(starts, starts[1:] + [n]))


def _in_blocks(fn: Any, *rows: torch.Tensor) -> Any:
    """fn over row blocks of `rows` (tensors of the same rows, the first (B, C)), joined: fn's
    (rows, C) temporaries exist for one block at a time. fn returns a tensor or {name: tensor}, each
    with a leading row dimension. Every step of the encoders is row by row, draws included (torch's
    multinomial on the CPU draws row after row from one generator), so the result is the whole
    tensor's, bit for bit."""
    blocks = _row_blocks(len(rows[0]), rows[0].shape[-1]) or [(0, 0)]
    parts = [fn(*(t[a:b] for t in rows)) for a, b in blocks]
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def _mass_outside(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per row of logp (B, C), the probability outside the classes `ids` (B, k): the exp of a
    logsumexp over the others, exact when tiny (1 - the head's sum is not). Over row blocks, so its
    temporaries stay a few MB beside a (B, C) logp at any vocabulary (over whole rows they were two
    more (B, C) tensors: 2 GB at 2,048 x 128k)."""
    return _in_blocks(lambda lp, i: torch.logsumexp(lp.scatter(-1, i, float("-inf")), dim=-1).exp(), logp, ids)


def _distinct_counts(drawn: torch.Tensor, delta: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws (B, S) -> distinct ids in ascending order with their counts, (B, S) each.

    Padding after the distinct ids has count 0 and repeats the last id (delta-coded: zeros), or
    is 0 when `delta` is False (format 1)."""
    ids, _ = drawn.sort(dim=-1)
    S = ids.shape[-1]
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    pos = torch.arange(S, device=ids.device).expand_as(ids)
    run_start = torch.where(first, pos, torch.zeros_like(pos)).cummax(dim=-1).values
    counts = torch.zeros_like(ids).scatter_add_(1, run_start, torch.ones_like(ids))  # at run starts
    order = (~first).to(torch.int8).argsort(dim=-1, stable=True)  # distinct ids first, in id order
    ids, counts = ids.gather(-1, order), counts.gather(-1, order)
    if delta:
        last = ids.gather(-1, ((counts > 0).sum(-1, keepdim=True) - 1).clamp(min=0))
        ids = _delta(torch.where(counts > 0, ids, last))
    else:
        ids = torch.where(counts > 0, ids, torch.zeros_like(ids))
    return ids, counts


def _head_targets(decoded: dict[str, np.ndarray], num_classes: int, device: torch.device | str,
                  tau: float) -> dict[str, torch.Tensor]:
    """Top-k head as tensors, re-tempered and renormalized with the residual (uniform-tail model)."""
    logp = torch.from_numpy(decoded["logp"]).to(device)
    residual = torch.from_numpy(decoded["residual"]).to(device)
    logp, residual = kl.retemper_topk(logp, residual, num_classes, tau)
    return {"ids": torch.from_numpy(decoded["ids"]).to(device), "logp": logp, "residual": residual}


def _head_divergence(logq: torch.Tensor, t: dict[str, torch.Tensor], kind: str, tail: str) -> torch.Tensor:
    """D(teacher, student) per row (n,) from an exact top-k head and the tail mass.

    tail="uniform": the residual is spread evenly over the classes outside the head (a full
    (n, C) teacher, the size of the student's logits); tail="bucket": those classes form one
    outcome whose student mass is their sum, a (k + 1)-outcome divergence."""
    ids, logp, residual = t["ids"], t["logp"], t["residual"]
    C, k = logq.shape[-1], ids.shape[-1]
    if k >= C:
        return kl.divergence(logq.new_full(logq.shape, float("-inf")).scatter(-1, ids, logp), logq, kind)
    if tail == "uniform":
        return kl.divergence(kl.topk_full_logp(ids, logp, residual, C), logq, kind)
    if tail == "bucket":
        logq_tail = torch.logsumexp(logq.scatter(-1, ids, float("-inf")), dim=-1, keepdim=True)  # (n, 1)
        teacher = torch.cat([logp, residual.clamp(min=0).log()[:, None]], dim=-1)  # (n, k + 1)
        return kl.divergence(teacher, torch.cat([logq.gather(-1, ids), logq_tail], dim=-1), kind)
    raise ConfigError(f"student.tail: {tail!r} is not one of uniform, bucket")


def _need_t1(enc: Encoding, tau: float) -> None:
    if tau != 1.0:
        raise ConfigError(f"student.temperature: {enc.label()} targets are draws at the cache's temperature and "
                          "cannot be re-tempered; train at the cache's temperature (student.temperature unset)")


def _forward_only(enc: Encoding, kind: str) -> None:
    if kind != "forward":
        raise ConfigError(f"student.divergence: {kind} needs teacher probabilities for every class; "
                          f"{enc.label()} caches support forward only, use encoding hybrid or topk")


# ---------------------------------------------------------------------------------------------
# The encodings


@dataclass(frozen=True)
class Dense:
    """Every class's log-probability: exact (to float16/32), for small class counts."""

    name: ClassVar[str] = "dense"
    num_classes: int
    dtype: str = "float16"

    def columns(self) -> list[Column]:
        return [Column("logp", ("row", "class"), "log-probabilities at the cached temperature, (rows, classes)")]

    def encode(self, logp: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return {"logp": logp.clamp(min=LOGP_FLOOR).to(getattr(torch, self.dtype))}

    def to_host(self, encoded: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {"logp": encoded["logp"].cpu().numpy()}

    def decode(self, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"logp": stored["logp"]}

    def targets(self, decoded: dict[str, np.ndarray], device: torch.device | str,
                tau: float = 1.0) -> dict[str, torch.Tensor]:
        logp = torch.from_numpy(decoded["logp"]).to(device)
        return {"logp": kl.retemper_dense(logp, tau)}

    def divergence(self, logq: torch.Tensor, targets: dict[str, torch.Tensor], kind: str,
                   tail: str) -> torch.Tensor:
        return kl.divergence(targets["logp"], logq, kind)

    def fidelity(self, full: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        return {"kl": kl.divergence(full, targets["logp"], "forward"), "mass_kept": torch.ones(len(full)),
                "top1": targets["logp"].argmax(-1)}

    def raw_bytes_per_row(self) -> float:
        return self.num_classes * np.dtype(self.dtype).itemsize

    def params(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype}

    def label(self) -> str:
        return f"dense-{self.dtype}"

    @property
    def retemperable(self) -> bool:
        return True


@dataclass(frozen=True)
class TopK:
    """The k most probable classes exactly, plus the mass outside them; the student models the tail.

    bits=16: ids most probable first, float16 log-probs and residual. bits=8: ids ascending and
    delta-coded, log-probs and the residual's log as uint8 steps of logp_range / 255 below zero."""

    name: ClassVar[str] = "topk"
    num_classes: int
    k: int
    bits: int = 16
    logp_range: float = 16.0
    ids: str = ""  # id storage; "" means the vocabulary's width (id_store)

    def __post_init__(self) -> None:
        if not self.ids:
            object.__setattr__(self, "ids", id_store(self.num_classes))

    def columns(self) -> list[Column]:
        order = "ascending, delta-coded" if self.bits == 8 else "most probable first"
        logp = "uint8 q, logp = -q * logp_range / 255" if self.bits == 8 else "float16"
        return [*_id_columns(self.ids, "ids", "rank", f"class ids of the k most probable classes, {order}, (rows, k)"),
                Column("logp", ("row", "rank"), f"log-probabilities of those classes at the cached temperature ({logp})"),
                Column("residual", ("row",), "probability mass outside the top k (the tail), (rows,)"
                       + (" as uint8 q, mass = exp(-q * logp_range / 255), 255 = none" if self.bits == 8 else ""))]

    def encode(self, logp: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return self.encode_head(logp, *logp.topk(self.k, dim=-1))

    def encode_head(self, logp: torch.Tensor, vals: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored head from the top-k values and ids (B, k), most probable first."""
        if self.k < logp.shape[-1]:
            residual = _mass_outside(logp, ids)
        else:
            residual = torch.zeros(logp.shape[0], device=logp.device)
        if self.bits == 8:  # quantized on the device: a quarter of the bytes cross to the host
            ids, order = ids.sort(dim=-1)
            vals = vals.gather(-1, order)
            return {"ids": _delta(ids), "logp": _quantize(-vals, self.logp_range),
                    "residual": _quantize(-residual.clamp(min=1e-30).log(), self.logp_range)}
        return {"ids": ids, "logp": vals.clamp(min=LOGP_FLOOR).half(), "residual": residual.half()}

    def to_host(self, encoded: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        out = {k: v.cpu().numpy() for k, v in encoded.items() if k != "ids"}
        return {**_pack_ids(encoded["ids"].cpu().numpy(), self.ids, "ids"), **out}

    def decode(self, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = _unpack_ids(stored, self.ids, "ids")
        if self.bits != 8:
            return {"ids": ids, "logp": _float32(stored["logp"]), "residual": _float32(stored["residual"])}
        return {"ids": np.cumsum(ids, axis=-1), "logp": _dequantize_logp(stored["logp"], self.logp_range),
                "residual": _dequantize_mass(stored["residual"], self.logp_range)}

    def targets(self, decoded: dict[str, np.ndarray], device: torch.device | str,
                tau: float = 1.0) -> dict[str, torch.Tensor]:
        return _head_targets(decoded, self.num_classes, device, tau)

    def divergence(self, logq: torch.Tensor, targets: dict[str, torch.Tensor], kind: str,
                   tail: str) -> torch.Tensor:
        return _head_divergence(logq, targets, kind, tail)

    def fidelity(self, full: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        ids = targets["ids"]
        cached = kl.topk_full_logp(ids, targets["logp"], targets["residual"], self.num_classes)
        return {"kl": kl.divergence(full, cached, "forward"), "mass_kept": full.exp().gather(-1, ids).sum(-1),
                "top1": ids.gather(-1, targets["logp"].argmax(-1, keepdim=True)).squeeze(-1)}

    def raw_bytes_per_row(self) -> float:
        return _id_bytes(self.ids, self.k) + (self.k + 1) * (1 if self.bits == 8 else 2)

    def params(self) -> dict[str, Any]:
        p: dict[str, Any] = {"name": self.name, "k": self.k, "bits": self.bits, "ids": self.ids}
        return {**p, "logp_range": self.logp_range} if self.bits == 8 else p

    def label(self) -> str:
        return f"topk-k{self.k}" + ("-q8" if self.bits == 8 else "")

    @property
    def retemperable(self) -> bool:
        return True


@dataclass(frozen=True)
class Sampled:
    """`draws` ids drawn from the teacher distribution, kept as distinct ids with counts, plus the
    exact entropy: count / draws is unbiased for each probability, so the forward KL estimate is
    unbiased (Sparse Logit Sampling). Noisy on the head, where most of the mass is."""

    name: ClassVar[str] = "sampled"
    num_classes: int
    draws: int
    ids: str = ""
    delta: bool = True  # format 1: zero-padded ids, not delta-coded

    def __post_init__(self) -> None:
        if not self.ids:
            object.__setattr__(self, "ids", id_store(self.num_classes))

    def columns(self) -> list[Column]:
        coding = "delta-coded, padding repeats the last id" if self.delta else "zero-padded"
        return [*_id_columns(self.ids, "ids", "draw", f"distinct ids drawn from the distribution, ascending, {coding}"),
                Column("counts", ("row", "draw"), "times each id was drawn (uint8); count / draws is unbiased for "
                       "its probability; 0 on padding"),
                Column("entropy", ("row",), "entropy of the distribution at the cached temperature (float16)")]

    def encode(self, logp: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return _in_blocks(lambda rows: self._encode_rows(rows, generator), logp)

    def _encode_rows(self, logp: torch.Tensor, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        p = logp.float().exp()
        drawn = torch.multinomial(p, self.draws, replacement=True, generator=generator)  # (B, S)
        ids, counts = _distinct_counts(drawn, self.delta)
        return {"ids": ids, "counts": counts.to(torch.uint8), "entropy": (-torch.xlogy(p, p).sum(-1)).half()}

    def to_host(self, encoded: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {**_pack_ids(encoded["ids"].cpu().numpy(), self.ids, "ids"),
                "counts": encoded["counts"].cpu().numpy(), "entropy": encoded["entropy"].cpu().numpy()}

    def decode(self, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = _unpack_ids(stored, self.ids, "ids")
        return {"ids": np.cumsum(ids, axis=-1) if self.delta else ids, "counts": stored["counts"],
                "entropy": _float32(stored["entropy"])}

    def targets(self, decoded: dict[str, np.ndarray], device: torch.device | str,
                tau: float = 1.0) -> dict[str, torch.Tensor]:
        _need_t1(self, tau)
        return {"ids": torch.from_numpy(decoded["ids"]).to(device),
                "weights": torch.from_numpy(decoded["counts"]).to(device).float() / self.draws,
                "entropy": torch.from_numpy(decoded["entropy"]).to(device)}

    def divergence(self, logq: torch.Tensor, targets: dict[str, torch.Tensor], kind: str,
                   tail: str) -> torch.Tensor:
        _forward_only(self, kind)
        return -(targets["weights"] * logq.gather(-1, targets["ids"])).sum(-1) - targets["entropy"]

    def fidelity(self, full: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        ids, w = targets["ids"], targets["weights"]
        return {"kl": None, "mass_kept": (full.exp().gather(-1, ids) * (w > 0)).sum(-1),
                "top1": ids.gather(-1, w.argmax(-1, keepdim=True)).squeeze(-1)}

    def raw_bytes_per_row(self) -> float:
        return _id_bytes(self.ids, self.draws) + self.draws + 2

    def params(self) -> dict[str, Any]:
        return {"name": self.name, "draws": self.draws, "ids": self.ids, "delta": self.delta}

    def label(self) -> str:
        return f"sampled-n{self.draws}"

    @property
    def retemperable(self) -> bool:
        return False


@dataclass(frozen=True)
class Hybrid:
    """An exact top-k head plus `draws` ids drawn from the renormalized tail, with the exact tail
    mass R and the tail's entropy term: the forward KL is exact on the head and unbiased on the
    tail, since R * count / draws is unbiased for each tail probability.

        KL = sum_head p (log p - log q) - H_tail - R * sum_j (count_j / draws) log q_j
    where H_tail = -sum_tail p log p. Reverse KL and JSD use the head and the tail model."""

    name: ClassVar[str] = "hybrid"
    num_classes: int
    k: int
    draws: int
    bits: int = 16
    logp_range: float = 16.0
    ids: str = ""
    head: TopK = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.ids:
            object.__setattr__(self, "ids", id_store(self.num_classes))
        object.__setattr__(self, "head", TopK(self.num_classes, self.k, self.bits, self.logp_range, self.ids))

    def columns(self) -> list[Column]:
        head = [c if c.name != "residual" else Column("residual", ("row",), "exact probability mass outside the "
                                                      "top k (float16 at any `bits`: the tail estimate scales with it)")
                for c in self.head.columns()]
        return [*head,
                *_id_columns(self.ids, "tail_ids", "draw", "distinct ids drawn from the tail renormalized to one, "
                             "ascending, delta-coded, padding repeats the last id"),
                Column("tail_counts", ("row", "draw"), "times each tail id was drawn (uint8); "
                       "residual * count / draws is unbiased for its probability; 0 on padding"),
                Column("tail_entropy", ("row",), "-sum of p log p over the tail classes (float16)")]

    def encode(self, logp: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return _in_blocks(lambda rows: self._encode_rows(rows, generator), logp)

    def _encode_rows(self, logp: torch.Tensor, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        vals, head_ids = logp.topk(self.k, dim=-1)
        out = self.head.encode_head(logp, vals, head_ids)
        p_tail = logp.float().exp().scatter(-1, head_ids, 0.0)  # (B, C), zero on the head
        mass = p_tail.sum(-1, keepdim=True)
        if self.bits == 8:  # the tail's weights are R * count / draws: R in float16 (5e-4), not 8-bit steps (3%)
            out["residual"] = mass.squeeze(-1).half()
        uniform = torch.ones_like(p_tail).scatter(-1, head_ids, 0.0)  # rows whose tail underflowed: weight 0 anyway
        drawn = torch.multinomial(torch.where(mass > 0, p_tail, uniform), self.draws, replacement=True,
                                  generator=generator)
        ids, counts = _distinct_counts(drawn, delta=True)
        return {**out, "tail_ids": ids, "tail_counts": counts.to(torch.uint8),
                "tail_entropy": (-torch.xlogy(p_tail, p_tail).sum(-1)).half()}

    def to_host(self, encoded: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        head = self.head.to_host({k: encoded[k] for k in ("ids", "logp", "residual")})  # residual: float16
        return {**head, **_pack_ids(encoded["tail_ids"].cpu().numpy(), self.ids, "tail_ids"),
                "tail_counts": encoded["tail_counts"].cpu().numpy(),
                "tail_entropy": encoded["tail_entropy"].cpu().numpy()}

    def decode(self, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        residual = _float32(stored["residual"])
        head = self.head.decode({**stored, "residual": np.zeros(len(residual), np.uint8)})
        return {**head, "residual": residual, "tail_ids": np.cumsum(_unpack_ids(stored, self.ids, "tail_ids"), axis=-1),
                "tail_counts": stored["tail_counts"], "tail_entropy": _float32(stored["tail_entropy"])}

    def targets(self, decoded: dict[str, np.ndarray], device: torch.device | str,
                tau: float = 1.0) -> dict[str, torch.Tensor]:
        _need_t1(self, tau)
        t = _head_targets(decoded, self.num_classes, device, 1.0)
        counts = torch.from_numpy(decoded["tail_counts"]).to(device).float()
        return {**t, "tail_ids": torch.from_numpy(decoded["tail_ids"]).to(device),
                "tail_weights": t["residual"][:, None] * counts / self.draws,
                "tail_entropy": torch.from_numpy(decoded["tail_entropy"]).to(device)}

    def divergence(self, logq: torch.Tensor, targets: dict[str, torch.Tensor], kind: str,
                   tail: str) -> torch.Tensor:
        if kind != "forward":
            return _head_divergence(logq, targets, kind, tail)
        p = targets["logp"].exp()
        head = (p * (targets["logp"] - logq.gather(-1, targets["ids"]))).sum(-1)
        cross = -(targets["tail_weights"] * logq.gather(-1, targets["tail_ids"])).sum(-1)
        return head + cross - targets["tail_entropy"]

    def fidelity(self, full: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        head = self.head.fidelity(full, targets)
        tail = (full.exp().gather(-1, targets["tail_ids"]) * (targets["tail_weights"] > 0)).sum(-1)
        return {"kl": None, "mass_kept": head["mass_kept"] + tail, "top1": head["top1"]}

    def raw_bytes_per_row(self) -> float:
        residual_extra = 1 if self.bits == 8 else 0  # float16 residual even at 8 bits
        return self.head.raw_bytes_per_row() + residual_extra + _id_bytes(self.ids, self.draws) + self.draws + 2

    def params(self) -> dict[str, Any]:
        return {**self.head.params(), "name": self.name, "draws": self.draws}

    def label(self) -> str:
        return f"hybrid-k{self.k}-n{self.draws}" + ("-q8" if self.bits == 8 else "")

    @property
    def retemperable(self) -> bool:
        return False


ENCODINGS: dict[str, type] = {"dense": Dense, "topk": TopK, "sampled": Sampled, "hybrid": Hybrid}


def encoding_from_config(c: Any, num_classes: int) -> Encoding:
    """The cache section's encoding for `num_classes` classes; refuses settings that do not apply."""
    if c.encoding == "dense":
        if num_classes > c.dense_max_classes:
            raise ConfigError(f"cache.encoding: dense needs {num_classes} values per row; above "
                              f"cache.dense_max_classes={c.dense_max_classes} use encoding topk, hybrid or sampled")
        return Dense(num_classes, c.dtype)
    if c.encoding in ("topk", "hybrid"):
        limit = num_classes if c.encoding == "topk" else num_classes - 1
        if c.k > limit:
            raise ConfigError(f"cache.k: {c.k} but the data has {num_classes} classes; use k <= {limit}"
                              + (" (hybrid needs a tail to sample)" if c.encoding == "hybrid" else ""))
    if c.encoding == "topk":
        return TopK(num_classes, c.k, c.bits, c.logp_range)
    if c.encoding == "hybrid":
        return Hybrid(num_classes, c.k, c.draws, c.bits, c.logp_range)
    return Sampled(num_classes, c.draws)


def encoding_from_spec(spec: dict[str, Any]) -> Encoding:
    """The encoding recorded in a cache's spec (format 1 or 2)."""
    try:
        return _from_params(spec["encoding"], int(spec["num_classes"]), int(spec.get("format_version", 1)))
    except (KeyError, TypeError, ValueError) as e:
        raise CacheError(f"spec encoding {spec.get('encoding')!r}: cannot be read ({type(e).__name__}: {e}); "
                         "the manifest is damaged or from another program") from None


def _from_params(p: dict[str, Any], num_classes: int, version: int) -> Encoding:
    name = p["name"]
    if name not in ENCODINGS:
        raise ValueError(f"unknown encoding {name!r}")
    if version == 1:  # ids uint16, or int32 above 65,535 classes; sampled ids zero-padded
        ids = "u16" if num_classes <= 65535 else "i32"
        if name == "dense":
            return Dense(num_classes, p.get("dtype", "float16"))
        if name == "topk":
            return TopK(num_classes, int(p["k"]), int(p.get("bits", 16)), float(p.get("logp_range", 16.0)), ids)
        if name == "sampled":
            return Sampled(num_classes, int(p["draws"]), ids, delta=False)
        raise ValueError(f"encoding {name!r} did not exist in format 1")
    if name == "dense":
        return Dense(num_classes, p["dtype"])
    if name == "topk":
        return TopK(num_classes, int(p["k"]), int(p["bits"]), float(p.get("logp_range", 16.0)), p["ids"])
    if name == "sampled":
        return Sampled(num_classes, int(p["draws"]), p["ids"], bool(p.get("delta", True)))
    return Hybrid(num_classes, int(p["k"]), int(p["draws"]), int(p["bits"]), float(p.get("logp_range", 16.0)),
                  p["ids"])


def student_logq(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Student log-probs at temperature T in float32, (n, C)."""
    return F.log_softmax(logits.float() / temperature, dim=-1)

