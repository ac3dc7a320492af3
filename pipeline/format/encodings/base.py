"""What every encoding shares: the Column and Encoding types, class ids stored at the
vocabulary's width, 8-bit log quantization, row blocks that bound the encoders' temporaries, and
the top-k head's targets and divergence (used by topk and hybrid)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.errors import ConfigError
from pipeline.format import kl

LOGP_FLOOR = -1.0e4  # finite stand-in for log(0), representable in float16


BLOCK_ELEMENTS = 1 << 20  # values per block of rows in the encoders' (rows, C) temporaries


MAX_DRAWS = 255  # counts are uint8


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
    def divergence(self, z: torch.Tensor, targets: dict[str, torch.Tensor], kind: str,
                   tail: str) -> torch.Tensor: ...
    def fidelity(self, full: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]: ...
    def full_logp(self, targets: dict[str, torch.Tensor]) -> torch.Tensor | None: ...
    def raw_bytes_per_row(self) -> float: ...
    def params(self) -> dict[str, Any]: ...
    def label(self) -> str: ...

    @property
    def retemperable(self) -> bool: ...  # targets() serves any temperature

    @property
    def stochastic(self) -> bool: ...  # encode draws at random: the seed is part of the targets


class Targets:
    """A batch's targets, made when the loss first reads them: `enc.targets(decoded, device, tau)`
    runs on the device `.to(device)` names (the CPU by default), so a loader only decodes and the
    re-tempering and renormalization run where the loss does (on a GPU student's GPU). Read like a
    dict of tensors (`t["logp"]`, `t.items()`); not a Mapping, so a DataLoader passes it through
    unconverted (collation of a Mapping would make it in the worker)."""

    def __init__(self, enc: Encoding, decoded: dict[str, np.ndarray], tau: float,
                 device: torch.device | str = "cpu") -> None:
        self.encoding, self.decoded, self.tau, self.device = enc, decoded, tau, torch.device(device)
        self._made: dict[str, torch.Tensor] | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Targets:
        device = torch.device(device)
        return self if device == self.device else Targets(self.encoding, self.decoded, self.tau, device)

    def pin_memory(self) -> Targets:
        return self

    def made(self) -> dict[str, torch.Tensor]:
        if self._made is None:
            self._made = self.encoding.targets(self.decoded, self.device, self.tau)
        return self._made

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.made()[key]

    def __iter__(self) -> Any:
        return iter(self.made())

    def __len__(self) -> int:
        return len(self.made())

    def __contains__(self, key: object) -> bool:
        return key in self.made()

    def keys(self) -> Any:
        return self.made().keys()

    def values(self) -> Any:
        return self.made().values()

    def items(self) -> Any:
        return self.made().items()

    def __repr__(self) -> str:
        state = "made" if self._made is not None else "not made yet"
        return f"Targets({self.encoding.label()}, tau={self.tau}, {self.device}, {state})"


# ---------------------------------------------------------------------------------------------
# Class ids at the vocabulary's width


def id_bits(num_classes: int) -> int:
    return max(1, (num_classes - 1).bit_length())


def legacy_ids(num_classes: int) -> str:
    """Format 1's id storage: uint16, or int32 above 65,535 classes."""
    return "u16" if num_classes <= 65535 else "i32"


def id_store(num_classes: int) -> str:
    """How ids of a `num_classes` vocabulary are stored: u8, u16, or u16+h<n> (n high bits packed)."""
    bits = id_bits(num_classes)
    return "u8" if bits <= 8 else "u16" if bits <= 16 else f"u16+h{bits - 16}"


def pack_ids(ids: np.ndarray, store: str, name: str) -> dict[str, np.ndarray]:
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


def unpack_ids(stored: dict[str, np.ndarray], store: str, name: str, delta: bool = False) -> np.ndarray:
    """Stored ids (n, m) as int32 (every vocabulary fits; gather takes int32, the loss widens on
    its device), delta-coded ones summed back in the same pass: half the bytes of int64 ids."""
    ids = stored[name]
    if store.startswith("u16+h"):
        hb = int(store[5:])
        n, m = ids.shape
        bits = np.unpackbits(stored[f"{name}_hi"], axis=-1, count=m * hb, bitorder="little").reshape(n, m, hb)
        ids = ids.astype(np.int32) | ((bits.astype(np.int32) << np.arange(hb, dtype=np.int32)).sum(-1) << 16)
    return np.cumsum(ids, axis=-1, dtype=np.int32) if delta else ids.astype(np.int32)


def tensor(a: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """A decoded column on `device`: shared with numpy on the CPU (zero-copy Parquet pages, which
    are read-only, are copied first: torch shares only writable memory)."""
    return torch.from_numpy(a if a.flags.writeable else a.copy()).to(device)


def id_columns(store: str, name: str, m_dim: str, description: str) -> list[Column]:
    cols = [Column(name, ("row", m_dim), description)]
    if store.startswith("u16+h"):
        cols.append(Column(f"{name}_hi", ("row", "byte"),
                           f"bits 16 and up of {name}, {store[5:]} per id, packed little-endian per row"))
    return cols


def id_bytes(store: str, m: int) -> float:
    if store.startswith("u16+h"):
        return 2 * m + math.ceil(m * int(store[5:]) / 8)
    return m * {"u8": 1, "u16": 2, "i32": 4}[store]


def delta_code(ids: torch.Tensor) -> torch.Tensor:
    """Ascending ids (B, m) -> first id, then differences: small numbers that compress."""
    return torch.cat([ids[:, :1], ids[:, 1:] - ids[:, :-1]], dim=-1)


# ---------------------------------------------------------------------------------------------
# Shared pieces: 8-bit log quantization, distinct draws with counts, head + tail targets


def quantize(neg_log: torch.Tensor, logp_range: float) -> torch.Tensor:
    """-log p in [0, logp_range] -> uint8 steps of logp_range / 255 (half a step of error at most)."""
    return (neg_log.clamp(0, logp_range) / (logp_range / 255.0)).round().to(torch.uint8)


def dequantize_logp(q: np.ndarray, logp_range: float) -> np.ndarray:
    return -np.float32(logp_range / 255.0) * q.astype(np.float32)


def dequantize_mass(q: np.ndarray, logp_range: float) -> np.ndarray:
    r = np.exp(dequantize_logp(q, logp_range))
    return np.where(q == 255, np.float32(0), r)  # 255: below e^-logp_range, stored as no tail at all


def row_blocks(n: int, classes: int) -> list[tuple[int, int]]:
    """Row ranges [a, b) of about BLOCK_ELEMENTS values each that cover n rows of `classes`. No
    block is a single row unless n is: torch sums one long row in another order than several."""
    step = max(2, BLOCK_ELEMENTS // max(classes, 1))
    starts = list(range(0, n, step))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()  # the last row joins the block before it
    return list(zip(starts, starts[1:] + [n]))


def in_blocks(fn: Any, *rows: torch.Tensor) -> Any:
    """fn over row blocks of `rows` (tensors of the same rows, the first (B, C)), joined: fn's
    (rows, C) temporaries exist for one block at a time. fn returns a tensor or {name: tensor}, each
    with a leading row dimension. Every step of the encoders is row by row, draws included (torch's
    multinomial on the CPU draws row after row from one generator), so the result is the whole
    tensor's, bit for bit."""
    blocks = row_blocks(len(rows[0]), rows[0].shape[-1]) or [(0, 0)]
    parts = [fn(*(t[a:b] for t in rows)) for a, b in blocks]
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def tail_summary(logp: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of logp (B, C), the probability R outside the classes `ids` (B, k), the exp of a
    logsumexp over the others, exact when tiny (1 - the head's sum is not); and the mean log-prob of
    those classes weighted by their probability, sum p log p / R (0 where R is 0). Over row blocks,
    so its temporaries stay a few MB beside a (B, C) logp at any vocabulary (over whole rows they
    were more (B, C) tensors: 1 GB each at 2,048 x 128k)."""
    def rows(lp: torch.Tensor, i: torch.Tensor) -> dict[str, torch.Tensor]:
        tail = lp.scatter(-1, i, float("-inf"))
        lse = torch.logsumexp(tail, dim=-1)  # (b,)
        w = (tail - lse[:, None]).exp_()  # p / R, 0 on the head
        mean = w.mul_(tail.nan_to_num_(neginf=0.0)).sum(-1)
        return {"mass": lse.exp(), "mean": torch.where(torch.isfinite(lse), mean, torch.zeros_like(mean))}

    out = in_blocks(rows, logp, ids)
    return out["mass"], out["mean"]


def float16_or_nan(values: np.ndarray | None, rows: int) -> np.ndarray:
    """A float16 column, or NaN (unknown) in every row when there is none."""
    return values if values is not None else np.full(rows, np.nan, np.float16)


def distinct_counts(drawn: torch.Tensor, delta: bool) -> tuple[torch.Tensor, torch.Tensor]:
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
        ids = delta_code(torch.where(counts > 0, ids, last))
    else:
        ids = torch.where(counts > 0, ids, torch.zeros_like(ids))
    return ids, counts


def head_targets(decoded: dict[str, np.ndarray], num_classes: int, device: torch.device | str,
                  tau: float) -> dict[str, torch.Tensor]:
    """Top-k head as tensors, re-tempered and renormalized with the residual: the tail sized by its
    mean log-prob where the cache has one, else as a uniform tail (kl.log_tail_power)."""
    mean = decoded.get("tail_mean_logp")
    logp, residual = kl.retemper_topk(tensor(decoded["logp"], device), tensor(decoded["residual"], device),
                                      num_classes, tau, None if mean is None else tensor(mean, device))  # float32 from here
    return {"ids": tensor(decoded["ids"], device), "logp": logp, "residual": residual}


def head_divergence(z: torch.Tensor, t: dict[str, torch.Tensor], kind: str, tail: str) -> torch.Tensor:
    """D(teacher, student) per row (n,) from an exact top-k head and the tail mass, from the student's
    logits z (n, C) at the loss's temperature and the compact targets: no (n, C) teacher is built.

    tail="uniform": the residual is spread evenly over the classes outside the head, a teacher
    log-prob that is one number per row (`kl.uniform_tail_divergence`); tail="bucket": those
    classes form one outcome whose student mass is their sum, a (k + 1)-outcome divergence."""
    ids, logp, residual = t["ids"].long(), t["logp"], t["residual"]
    C, k = z.shape[-1], ids.shape[-1]
    if k >= C:  # the head is every class
        return kl.divergence(logp.float(), F.log_softmax(z.float(), dim=-1).gather(-1, ids), kind)
    if tail == "uniform":
        return kl.uniform_tail_divergence(z, ids, logp, residual, kind)
    if tail == "bucket":
        logq = F.log_softmax(z.float(), dim=-1)
        logq_tail = torch.logsumexp(logq.scatter(-1, ids, float("-inf")), dim=-1, keepdim=True)  # (n, 1)
        teacher = torch.cat([logp.float(), residual.float().clamp(min=0).log()[:, None]], dim=-1)  # (n, k + 1)
        return kl.divergence(teacher, torch.cat([logq.gather(-1, ids), logq_tail], dim=-1), kind)
    raise ConfigError(f"student.tail: {tail!r} is not one of uniform, bucket")


def draw_logp(logp: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, delta: bool) -> torch.Tensor:
    """The log-probs (B, S) float16 of distinct drawn `ids` (delta-coded when `delta`), 0 on padding."""
    at = logp.gather(-1, ids.cumsum(-1) if delta else ids).clamp(min=LOGP_FLOOR)
    return torch.where(counts > 0, at, torch.zeros_like(at)).half()


def need_draw_logp(enc: Encoding, tau: float) -> None:
    if tau != 1.0 and not enc.retemperable:
        raise ConfigError(f"student.temperature: this {enc.label()} cache holds draws without their log-probs "
                          "(format 2, or cache.draw_logp false) and cannot be re-tempered; train at the cache's "
                          "temperature (student.temperature unset), or rebuild it with this logitcache "
                          "(`logitcache cache CONFIG` with cache.draw_logp true)")


def forward_only(enc: Encoding, kind: str) -> None:
    if kind != "forward":
        raise ConfigError(f"student.divergence: {kind} needs teacher probabilities for every class; "
                          f"{enc.label()} caches support forward only, use encoding hybrid or topk")


def head_problems(k: int, bits: int, logp_range: float, num_classes: int, limit: int) -> list[str]:
    """What is wrong with a top-k head's parameters, as `field: why; what to do` messages."""
    e = []
    if k < 1:
        e.append(f"k: {k} must be >= 1")
    elif k > limit:
        e.append(f"k: {k} but the data has {num_classes} classes; use k <= {limit}")
    if bits not in (8, 16):
        e.append(f"bits: {bits} is not 16 or 8")
    if logp_range <= 0:
        e.append(f"logp_range: {logp_range} must be > 0")
    return e


def draws_problems(draws: int) -> list[str]:
    return [] if 1 <= draws <= MAX_DRAWS else [f"draws: {draws} must be in 1..{MAX_DRAWS} (counts are uint8)"]
