"""A cache's identity: the spec of everything that determines its targets, and its directory.

    ctx = context(cfg)      # hashes the transfer set and each teacher's checkpoint
    ctx.dir                 # <cache root>/<cache_id>

Shared by the cache stage (which writes it), the student stage (which reads the cache its config
makes) and `caches fidelity`. Built fresh on every call and passed explicitly: nothing outlives the
files it was computed from.

The cache stage also records, under <workspace>/runs/.caches/, which cache it made for a config: the id,
a hash of the config sections that determine the targets, and the (size, mtime, inode) of every
teacher file it hashed. `find_cache` serves students from that record without reading teacher
files, and falls back to hashing them whenever the config or any teacher file present differs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.core.codecs import layout_codec
from pipeline.core.config import Config, default_layout
from pipeline.core.io import atomic_write_json, hash_json
from pipeline.core.progress import log
from pipeline.format import manifest as fmt
from pipeline.format import members
from pipeline.format.columns import ALIGN_COLUMNS, VOCAB_FILE
from pipeline.format.encodings import Encoding, encoding_from_config
from pipeline.format.remote import join
from pipeline.format.views import ViewSpec
from pipeline.inputs.arrays import Splits
from pipeline.inputs.augment import check_images
from pipeline.inputs.splits import load_splits
from pipeline.inputs.tokens import SPANS
from pipeline.models.builders import architecture, resolve_device
from pipeline.models.ensemble import TeacherRef, normalized_weights, teacher_identity, teacher_refs
from pipeline.train.tasks import task_of


@dataclass(frozen=True)
class Unit:
    """One set of targets a cache writes shard by shard: a plain cache's combined ensemble, in the
    cache's own directory; or, with cache.members, one teacher's targets (or the ensemble's) in a
    store, <cache root>/members/<store id>/, named by what determines them and shared by every cache
    that needs them: a cache with one more teacher, or more rows, finds the rest already there."""

    name: str  # a teacher's name, "ensemble", or "" for a plain cache's own shards
    teachers: tuple[int, ...]  # the teachers it runs (indices into teachers.members)
    dir: Path  # holds its shards/, digests/ and .locks/
    spec: dict[str, Any] | None = None  # a store's: what determines its targets (store.json); None: the cache's own

    @property
    def store(self) -> str | None:
        return self.dir.name if self.spec is not None else None


@dataclass(frozen=True)
class Context:
    """Everything derived from the config and the files it names, built once per call and passed
    explicitly: nothing outlives the files it was computed from."""

    cfg: Config
    splits: Splits
    spec: dict[str, Any]
    dir: Path
    encoding: Encoding
    device: torch.device
    precision: str  # fp32 | bf16 | fp16: the teachers' compute dtype
    teacher_files: tuple[tuple[str, int, int, int], ...] | None = None  # (path, size, mtime_ns, inode)
    # of each file hashed into the spec, unchanged while hashing; None if one changed meanwhile
    views: ViewSpec | None = None  # cache.views > 0: each row is one augmented view
    units: tuple[Unit, ...] = ()  # what the stage writes: the cache's own shards, or member stores
    row_digests: tuple[str, ...] = ()  # cache.members: a digest of each planned shard's rows

    @property
    def chunk_rows(self) -> int:
        return self.spec["layout"]["chunk_rows"]

    @property
    def rows_per_shard(self) -> int:
        return self.spec["layout"]["rows_per_shard"]

    @property
    def token_rows(self) -> bool:
        return self.cfg.data.task == "lm"

    @property
    def url(self) -> str | None:
        """Where the cache is published when cache.root is an object store URL; else None (`dir` is
        then where it lives, not a staging copy)."""
        return join(self.cfg.cache_url, self.dir.name) if self.cfg.cache_url else None


def context(cfg: Config) -> Context:
    splits = load_splits(cfg)
    refs = teacher_refs(cfg, splits)
    files_before = _file_stats(_teacher_files(refs))
    c = cfg.cache
    enc = encoding_from_config(c, splits.num_classes)
    chunk_rows, rows_per_shard = default_layout(cfg.data.task, cfg.data.seq_len, c.views, enc.raw_bytes_per_row() + 8,
                                                c.chunk_rows, c.rows_per_shard)  # + sample_id
    device = resolve_device(c.device, "cache.device")
    precision = c.precision if c.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    spec = {
        "format_version": fmt.FORMAT_VERSION,
        "dataset": task_of(cfg).dataset_identity(cfg, splits),
        "num_classes": splits.num_classes,
        "teachers": [teacher_identity(r, splits.num_classes) for r in refs],
        "ensemble": cfg.teachers.ensemble,
        "weights": normalized_weights(cfg),
        "temperature": cfg.teachers.temperature,
        "encoding": enc.params(),
        "compute": {"device": device.type, "precision": precision},  # bf16 targets differ from fp32 ones
        "layout": {"backend": c.backend, "rows_per_shard": rows_per_shard, "chunk_rows": chunk_rows},
    }
    spec["layout"].update(layout_codec(c.codec))
    if splits.corpus is not None and splits.corpus.spans is not None:  # text: what cross-tokenizer students align by
        spec["alignment"] = {"spans": SPANS, "columns": list(ALIGN_COLUMNS), "vocab": VOCAB_FILE}
    if enc.stochastic:  # drawn ids: the seed determines the targets
        spec["sampling_seed"] = cfg.seed
    views = None
    if c.views > 0:  # only then: caches without views keep their ids
        views = ViewSpec(c.views, cfg.augment, cfg.seed, check_images(splits.input_shape, "cache.views"))
        spec["views"] = views.to_json()
    directory = cfg.cache_root / fmt.cache_id(spec)
    units: tuple[Unit, ...] = (Unit("", tuple(range(len(refs))), directory),)
    digests: tuple[str, ...] = ()
    if c.members != "combined":
        spec["format_version"] = members.MEMBERS_FORMAT  # older readers refuse it rather than read no rows
        spec["members"] = c.members
        directory = cfg.cache_root / fmt.cache_id(spec)
        units = _member_units(cfg, spec)
        digests = splits.transfer.range_digests(rows_per_shard)
    files = _file_stats(_teacher_files(refs))
    return Context(cfg, splits, spec, directory, enc, device, precision,
                   teacher_files=files if files == files_before else None, views=views, units=units,
                   row_digests=digests)


def _member_units(cfg: Config, spec: dict[str, Any]) -> tuple[Unit, ...]:
    """A store per teacher (and one for the ensemble with cache.members both). A store's id hashes
    what determines its shards but the rows: the teacher (or the ensemble's teachers, mode and
    weights), classes, temperature, encoding, compute, layout and the seed of drawn encodings. Each
    shard in it is named by its index and a digest of its rows (members.shard_name)."""
    common = {k: spec[k] for k in ("num_classes", "temperature", "encoding", "compute", "layout", "sampling_seed")
              if k in spec}
    common["format_version"] = fmt.FORMAT_VERSION  # of the shards
    root = cfg.cache_root / members.STORES
    out = []
    for i, teacher in enumerate(spec["teachers"]):
        store = {"store": "member", "teacher": teacher, **common}
        out.append(Unit(teacher["name"], (i,), root / fmt.cache_id(store), store))
    if cfg.cache.members == "both":
        store = {"store": "ensemble", "teachers": spec["teachers"], "ensemble": spec["ensemble"],
                 "weights": spec["weights"], **common}
        out.append(Unit(members.ENSEMBLE, tuple(range(len(spec["teachers"]))), root / fmt.cache_id(store), store))
    return tuple(out)


def cache_dir(cfg: Config) -> Path:
    return context(cfg).dir


# ---------------------------------------------------------------------------------------------
# The record of which cache a config's cache stage made


def targets_hash(cfg: Config) -> str:
    """Hash of the config sections that determine a cache's targets and where it lives."""
    sections = {k: dataclasses.asdict(getattr(cfg, k)) for k in ("data", "teachers", "cache")}
    sections.update(workspace=cfg.workspace, seed=cfg.seed)
    return hash_json(json.loads(json.dumps(sections, default=str)))


def _record_path(cfg: Config) -> Path:
    """Keyed by the target-determining config sections, so every run name of that config finds it."""
    return Path(cfg.workspace) / "runs" / ".caches" / f"{targets_hash(cfg)[:16]}.json"


def record(ctx: Context) -> None:
    """Note which cache this config makes, for students without teacher files."""
    if ctx.teacher_files is None:  # a teacher file changed while it was hashed: record nothing
        return
    try:
        atomic_write_json(_record_path(ctx.cfg), {"cache_id": ctx.dir.name, "cache_dir": str(ctx.dir.resolve()),
                                                  "targets_hash": targets_hash(ctx.cfg),
                                                  "teacher_files": [list(f) for f in ctx.teacher_files]})
    except OSError as e:  # students then hash the teacher files, as without a record
        log(f"{_record_path(ctx.cfg)}: cannot record the cache for students ({e.strerror})")


def find_cache(cfg: Config) -> Path:
    """The cache this config's cache stage makes: from its record when every teacher file still
    present is unchanged (absent ones, e.g. teachers kept on another machine, are trusted to the
    record), else by hashing the teacher files as the cache stage does."""
    path = _record_path(cfg)
    try:
        rec = json.loads(path.read_text()) if path.is_file() else None
        files = [tuple(f) for f in rec["teacher_files"]] if rec else []
        if rec and (rec["targets_hash"] != targets_hash(cfg) or not isinstance(rec["cache_dir"], str)):
            rec = None
    except (ValueError, OSError, KeyError, TypeError):
        log(f"{path}: unreadable record of the cache; finding the cache from the teacher files")
        rec = None
    if rec is not None:
        now = _file_stats(Path(f[0]) for f in files)
        present = {f[0]: f for f in now}
        if all(present.get(f[0], f) == f for f in files):
            absent = len({f[0] for f in files} - present.keys())
            if absent:
                log(f"student: {absent} teacher file{'s' * (absent > 1)} absent; using cache {rec['cache_id']}, "
                    "which the cache stage made for this config")
            return Path(rec["cache_dir"])
    return context(cfg).dir


def _teacher_files(refs: list[TeacherRef]) -> list[Path]:
    """Every file hashed into the spec, once: checkpoints (every file of a model directory) and the
    source files of imported factories (one module may serve several members)."""
    out: list[Path] = []
    for r in refs:
        if r.checkpoint.is_dir():
            out.extend(sorted(p for p in r.checkpoint.rglob("*") if p.is_file()))
        else:
            out.append(r.checkpoint)
        out.extend(architecture(r.spec).code_files(r.spec))
    return list(dict.fromkeys(Path(p).resolve() for p in out))


def _file_stats(paths: Any) -> tuple[tuple[str, int, int, int], ...]:
    """(path, size, mtime_ns, inode) of each file that exists."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        out.append((str(Path(p).resolve()), st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)

