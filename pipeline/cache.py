"""The soft-target cache: encodings, shard writers and readers for Zarr v3 and Parquet, the manifest.

Layout (see README "Cache format"):

    <root>/<cache_id>/
      spec.json           what determines the targets (written first)
      configs/<run>.yaml  resolved configs that produced or used this cache
      shards/00000.zarr   one Zarr v3 group per shard (or shards/00000.parquet)
      manifest.json       written last; the cache exists only once it says "complete"

Every shard is written by one writer under a '.tmp-' name and renamed into place, so a shard is
either whole or absent. Shard bytes hold no times or random names: the same inputs give the same
bytes, and the manifest records each shard's sha256.
"""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import __version__
from pipeline.errors import CacheError
from pipeline.io import (
    atomic_write_json,
    hash_json,
    publish_dir,
    remove_dead_tmp,
    sha256_tree,
    tmp_name,
)

FORMAT_VERSION = 1
LOGP_FLOOR = -1.0e4  # finite stand-in for log(0), representable in float16

DESCRIPTIONS = {
    "sample_id": "int64 id of the input row these targets belong to; joins the cache to the dataset",
    "dense/logp": "ensemble log-probabilities at the cached temperature, (rows, classes)",
    "topk/ids": "class ids of the k most probable classes, most probable first, (rows, k)",
    "topk/logp": "ensemble log-probabilities of those classes at the cached temperature, (rows, k)",
    "topk/residual": "probability mass outside the top k (the tail), (rows,)",
    "position": "position of the token within its sequence; rows of a sequence are contiguous",
    "sampled/ids": "distinct token ids drawn from the ensemble distribution, (rows, draws), zero-padded",
    "sampled/counts": "times each id was drawn; weight = count / draws is unbiased for its probability",
    "sampled/entropy": "entropy of the ensemble distribution at the cached temperature, (rows,)",
    "offsets": "first row of each sequence in this shard, plus the row count, (sequences + 1,)",
}


@dataclass(frozen=True)
class Encoding:
    name: str  # dense | topk | sampled
    num_classes: int  # classes, or vocabulary size
    dtype: str = "float16"  # dense storage dtype
    k: int = 0  # topk
    draws: int = 0  # sampled
    token_rows: bool = False  # language models: rows are tokens, with a position column
    bits: int = 16  # topk: 16 (float16 log-probs) or 8 (log-quantized uint8, delta-coded ids)
    logp_range: float = 16.0  # bits=8: log-probs in [-logp_range, 0] map to 255 steps

    @property
    def scale(self) -> float:
        """bits=8: one quantization step in log space (the decoded error is at most half a step)."""
        return self.logp_range / 255.0

    @property
    def ids_dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.num_classes <= 65535 else np.int32)

    def describe(self) -> dict[str, Any]:
        if self.name == "dense":
            return {"name": "dense", "dtype": self.dtype}
        if self.name == "sampled":
            return {"name": "sampled", "draws": self.draws, "ids_dtype": str(self.ids_dtype),
                    "counts_dtype": "uint8", "entropy_dtype": "float16"}
        if self.bits == 8:
            return {"name": "topk", "k": self.k, "bits": 8, "ids": "ascending, delta-coded " + str(self.ids_dtype),
                    "logp": "uint8 q, logp = -q * scale", "residual": "uint8 q, residual = exp(-q * scale)",
                    "scale": self.scale, "logp_range": self.logp_range}
        return {"name": "topk", "k": self.k, "ids_dtype": str(self.ids_dtype), "logp_dtype": "float16",
                "residual_dtype": "float16"}

    def columns(self) -> list[str]:
        base = ["sample_id", "position"] if self.token_rows else ["sample_id"]
        return base + {"dense": ["logp"], "topk": ["ids", "logp", "residual"],
                       "sampled": ["ids", "counts", "entropy"]}[self.name]


def encode(logp: torch.Tensor, enc: Encoding, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Encode ensemble log-probs (B, C) on their device; only the encoded tensors go to the host."""
    if enc.name == "sampled":
        return _sample(logp, enc.draws, generator)
    if enc.name == "dense":
        return {"logp": logp.clamp(min=LOGP_FLOOR).to(getattr(torch, enc.dtype))}
    vals, ids = logp.topk(enc.k, dim=-1)  # (B, k), sorted descending
    if enc.k < logp.shape[-1]:
        tail = logp.scatter(-1, ids, float("-inf"))
        residual = torch.logsumexp(tail, dim=-1).exp()  # exact even when tiny, unlike 1 - sum
    else:
        residual = torch.zeros(logp.shape[0], device=logp.device)
    if enc.bits == 8:  # quantized from float32 on the device: a quarter of the bytes cross to the host
        return _quantize({"ids": ids, "logp": vals, "residual": residual}, enc)
    return {"ids": ids.to(torch.int32), "logp": vals.clamp(min=LOGP_FLOOR).half(), "residual": residual.half()}


def _sample(logp: torch.Tensor, draws: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """Draw `draws` ids per row from exp(logp); keep distinct ids with their counts, (B, draws)."""
    p = logp.float().exp()
    drawn = torch.multinomial(p, draws, replacement=True, generator=generator)  # (B, S)
    ids, _ = drawn.sort(dim=-1)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    pos = torch.arange(draws, device=ids.device).expand_as(ids)
    run_start = torch.where(first, pos, torch.zeros_like(pos)).cummax(dim=-1).values
    counts = torch.zeros_like(ids).scatter_add_(1, run_start, torch.ones_like(ids))  # at run starts
    order = (~first).to(torch.int8).argsort(dim=-1, stable=True)  # distinct ids first, in id order
    ids, counts = ids.gather(-1, order), counts.gather(-1, order)
    ids = torch.where(counts > 0, ids, torch.zeros_like(ids))
    entropy = -(torch.xlogy(p, p)).sum(-1)
    return {"ids": ids.to(torch.int32), "counts": counts.to(torch.uint8), "entropy": entropy.half()}


def to_host(encoded: dict[str, torch.Tensor], enc: Encoding) -> dict[str, np.ndarray]:
    out = {k: v.cpu().numpy() for k, v in encoded.items()}
    if "ids" in out:
        out["ids"] = out["ids"].astype(enc.ids_dtype)
    return out


def _quantize(t: dict[str, torch.Tensor], enc: Encoding) -> dict[str, torch.Tensor]:
    """Top-k in 8 bits: ids ascending and delta-coded (small numbers compress), log-probs and the
    residual's log as uint8 steps of `scale` below zero."""
    ids, order = t["ids"].long().sort(dim=-1)
    logp = t["logp"].float().gather(-1, order)
    delta = torch.cat([ids[:, :1], ids[:, 1:] - ids[:, :-1]], dim=-1)

    def q(neg_log: torch.Tensor) -> torch.Tensor:
        return (neg_log.clamp(0, enc.logp_range) / enc.scale).round().to(torch.uint8)

    residual = t["residual"].float().clamp(min=1e-30)
    return {"ids": delta.to(torch.int32), "logp": q(-logp), "residual": q(-residual.log())}


def decode(arrays: dict[str, np.ndarray], enc: Encoding) -> dict[str, np.ndarray]:
    """Stored columns -> standard ones (ids, log-probs, residual); vectorized, no row loops.

    8-bit top-k decodes to float32, so the error is the quantization's alone: half a step."""
    if enc.name != "topk" or enc.bits != 8:
        return arrays
    out = dict(arrays)
    out["ids"] = np.cumsum(arrays["ids"].astype(np.int64), axis=-1).astype(enc.ids_dtype)
    out["logp"] = -np.float32(enc.scale) * arrays["logp"].astype(np.float32)
    r = np.exp(-np.float32(enc.scale) * arrays["residual"].astype(np.float32))
    out["residual"] = np.where(arrays["residual"] == 255, np.float32(0), r)  # 255: below e^-logp_range
    return out


# ---------------------------------------------------------------------------------------------
# Identity


def cache_id(spec: dict[str, Any]) -> str:
    return hash_json(spec)[:16]


def target_id(spec: dict[str, Any]) -> str:
    """Hash of what determines the targets only (not backend or shard layout)."""
    return hash_json({k: v for k, v in spec.items() if k != "layout"})[:16]


# ---------------------------------------------------------------------------------------------
# Writing


def planned(spec: dict[str, Any]) -> tuple[int, int]:
    """(shards, rows) of a cache's plan; language-model rows are tokens, shards hold whole sequences."""
    per_item = spec["dataset"].get("seq_len", 1)
    items, per_shard = spec["dataset"]["rows"], spec["layout"]["rows_per_shard"] // per_item
    return -(-items // per_shard), items * per_item


def shard_name(index: int, backend: str) -> str:
    return f"{index:05d}.{'zarr' if backend == 'zarr' else 'parquet'}"


def write_shard(path: Path, arrays: dict[str, np.ndarray], attrs: dict[str, Any], enc: Encoding,
                chunk_rows: int, level: int) -> None:
    """Write one shard to a temporary name and rename it to `path` (one writer per shard)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        if path.suffix == ".zarr":
            _write_zarr(tmp, arrays, attrs, enc, chunk_rows, level)
            publish_dir(tmp, path)
        else:
            _write_parquet(tmp, arrays, attrs, enc, chunk_rows, level)
            tmp.replace(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


def _description(enc: Encoding, name: str) -> str:
    return DESCRIPTIONS.get(name) or DESCRIPTIONS[f"{enc.name}/{name}"]


def _write_zarr(tmp: Path, arrays: dict[str, np.ndarray], attrs: dict[str, Any], enc: Encoding,
                chunk_rows: int, level: int) -> None:
    import zarr
    from zarr.codecs import ZstdCodec

    group = zarr.open_group(str(tmp), mode="w", zarr_format=3, attributes={"logitcache": attrs})
    for name in enc.columns() + (["offsets"] if "offsets" in arrays else []):
        data = arrays[name]
        dims = (("sequence",) if name == "offsets" else ("row",)) if data.ndim == 1 else \
            ("row", "class" if name == "logp" and enc.name == "dense" else "rank")
        arr = group.create_array(
            name, shape=data.shape, dtype=data.dtype, chunks=(chunk_rows, *data.shape[1:]),
            compressors=ZstdCodec(level=level), dimension_names=dims,
            attributes={"description": _description(enc, name)},
        )
        arr[...] = data


def _write_parquet(tmp: Path, arrays: dict[str, np.ndarray], attrs: dict[str, Any], enc: Encoding,
                   chunk_rows: int, level: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns, fields, encodings = [], [], {}
    for name in enc.columns():
        data = arrays[name]
        if data.ndim == 2:
            col = pa.FixedSizeListArray.from_arrays(pa.array(data.ravel()), data.shape[1])
            encodings[name] = "BYTE_STREAM_SPLIT" if data.dtype.kind == "f" else "PLAIN"
        else:
            col = pa.array(data)
            encodings[name] = "DELTA_BINARY_PACKED" if data.dtype.kind in "iu" else "BYTE_STREAM_SPLIT"
        columns.append(col)
        fields.append(pa.field(name, col.type, nullable=False,
                               metadata={"description": _description(enc, name)}))
    if "offsets" in arrays:  # per sequence, not per row: kept in the metadata
        attrs = {**attrs, "offsets": arrays["offsets"].tolist()}
    schema = pa.schema(fields, metadata={"logitcache": json.dumps(attrs, sort_keys=True)})
    table = pa.Table.from_arrays(columns, schema=schema)
    # dictionary encoding halves read speed on float data (measured); statistics are useless here
    pq.write_table(table, tmp, row_group_size=chunk_rows, compression="zstd", compression_level=level,
                   use_dictionary=False, column_encoding=encodings, write_statistics=False)


def shard_entry(cache_dir: Path, index: int, backend: str, first_row: int, rows: int) -> dict[str, Any]:
    rel = f"shards/{shard_name(index, backend)}"
    digest, nbytes = sha256_tree(cache_dir / rel)
    return {"index": index, "path": rel, "first_row": first_row, "rows": rows, "sha256": digest, "bytes": nbytes}


def write_manifest(cache_dir: Path, spec: dict[str, Any], entries: list[dict[str, Any]], extra: dict[str, Any]) -> dict:
    import datetime

    rows = sum(e["rows"] for e in entries)
    nbytes = sum(e["bytes"] for e in entries)
    manifest = {
        "status": "complete",
        "format_version": FORMAT_VERSION,
        "cache_id": cache_dir.name,
        "target_id": target_id(spec),
        "created_by": f"logitcache {__version__}",
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
        "bytes": nbytes,
        "bytes_per_row": round(nbytes / max(rows, 1), 2),
        "shards": entries,
        "spec": spec,
        **extra,
    }
    remove_dead_tmp(cache_dir / "shards")  # from killed writers; never read as data
    atomic_write_json(cache_dir / "manifest.json", manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# Reading


def resolve(ref: str | Path, root: Path) -> Path:
    """A cache directory from a path, an id, or a unique id prefix under `root`."""
    p = Path(ref)
    if (p / "spec.json").is_file() or (p / "manifest.json").is_file():
        return p
    if (root / str(ref)).is_dir():
        return root / str(ref)
    matches = sorted(d for d in root.glob(f"{ref}*") if d.is_dir()) if root.is_dir() else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise CacheError(f"cache {ref!r} matches {len(matches)} caches under {root}; give more of the id")
    raise CacheError(f"cache {ref!r}: no such cache directory or id under {root}; "
                     "list caches with `logitcache caches ls`")


def read_manifest(cache_dir: Path) -> dict[str, Any] | None:
    path = cache_dir / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CacheError(f"{path}: not valid JSON; delete the cache directory and rerun `logitcache cache`") from None


@dataclass(frozen=True)
class Chunk:
    shard: int  # position in the manifest's shard list
    index: int  # chunk within the shard
    start: int  # first row within the shard
    stop: int


class CacheReader:
    """Read a complete cache chunk by chunk; chunks are the unit of shuffling and I/O."""

    def __init__(self, cache_dir: Path, verify: bool = False) -> None:
        manifest = read_manifest(cache_dir)
        if manifest is None or manifest.get("status") != "complete":
            raise CacheError(f"{cache_dir}: cache is incomplete (no complete manifest.json); "
                             "rerun `logitcache cache CONFIG` to finish it")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{cache_dir}: cache format {manifest.get('format_version')} is not "
                             f"{FORMAT_VERSION}; rebuild it with this version of logitcache")
        self.dir = cache_dir
        self.manifest = manifest
        spec = manifest["spec"]
        enc = spec["encoding"]
        self.encoding = Encoding(enc["name"], spec["num_classes"], enc.get("dtype", "float16"), enc.get("k", 0),
                                 enc.get("draws", 0), token_rows="seq_len" in spec["dataset"],
                                 bits=enc.get("bits", 16), logp_range=enc.get("logp_range", 16.0))
        self.chunk_rows: int = spec["layout"]["chunk_rows"]
        self.shards = manifest["shards"]
        self._handles: dict[int, Any] = {}
        self._pool: Any = None
        self._lock = threading.Lock()
        self.backend = spec["layout"]["backend"]
        if verify:
            self.verify()

    @property
    def num_classes(self) -> int:
        return self.encoding.num_classes

    @property
    def temperature(self) -> float:
        return float(self.manifest["spec"]["temperature"])

    @property
    def dataset_fingerprint(self) -> str:
        return self.manifest["spec"]["dataset"]["fingerprint"]

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    def verify(self) -> None:
        for e in self.shards:
            digest, _ = sha256_tree(self.dir / e["path"])
            if digest != e["sha256"]:
                raise CacheError(f"{self.dir / e['path']}: checksum mismatch, the shard is corrupt; "
                                 "delete it and rerun `logitcache cache CONFIG`")

    def chunks(self) -> list[Chunk]:
        out = []
        for s, e in enumerate(self.shards):
            for j, start in enumerate(range(0, e["rows"], self.chunk_rows)):
                out.append(Chunk(s, j, start, min(start + self.chunk_rows, e["rows"])))
        return out

    def read(self, chunk: Chunk) -> dict[str, np.ndarray]:
        entry = self.shards[chunk.shard]
        path = self.dir / entry["path"]
        if path.suffix == ".zarr":
            arrays = self._handle(chunk.shard, path)
            raw = {name: arrays[name][chunk.start:chunk.stop] for name in self.encoding.columns()}
            return decode(raw, self.encoding)
        import pyarrow as pa

        table = self._handle(chunk.shard, path).read_row_group(chunk.index)
        out = {}
        for name in self.encoding.columns():
            col = table.column(name).combine_chunks()
            if pa.types.is_fixed_size_list(col.type):
                out[name] = col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
            else:
                out[name] = col.to_numpy(zero_copy_only=False)
        return decode(out, self.encoding)

    def read_many(self, chunks: list[Chunk]) -> list[dict[str, np.ndarray]]:
        """Read several chunks in order; Zarr chunks concurrently (zarr's per-read overhead and zstd
        release the GIL). A pyarrow ParquetFile is not safe to share between threads, and its reads
        are multi-threaded already, so Parquet reads stay sequential."""
        if len(chunks) <= 1 or self.backend != "zarr":
            return [self.read(c) for c in chunks]
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="logitcache-read")
        return list(self._pool.map(self.read, chunks))

    def read_all(self) -> dict[str, np.ndarray]:
        parts = self.read_many(self.chunks())
        return {k: np.concatenate([p[k] for p in parts]) for k in self.encoding.columns()}

    def _handle(self, i: int, path: Path) -> Any:
        with self._lock:
            return self._open(i, path)

    def _open(self, i: int, path: Path) -> Any:
        if i not in self._handles:
            if path.suffix == ".zarr":
                import zarr

                group = zarr.open_group(str(path), mode="r")  # array handles kept: opening one reads metadata
                self._handles[i] = {name: group[name] for name in self.encoding.columns()}
            else:
                import pyarrow.parquet as pq

                self._handles[i] = pq.ParquetFile(path)
        return self._handles[i]
