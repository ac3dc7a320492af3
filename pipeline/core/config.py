"""Typed, frozen configuration: YAML fills the dataclasses, `key=value` overrides on the command line.

    cfg = load_config("configs/demo.yaml", ["student.temperature=2", "cache.encoding=topk"])

Every problem in a config (unknown key, wrong type, invalid value) is collected and reported at
once, in one line, naming each field. Relative paths are taken from the current directory.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.core.codecs import CODECS, codec_problems, default_codec
from pipeline.core.errors import ConfigError
from pipeline.core.io import is_url
from pipeline.core.specs import SPECS, CNNSpec, MLPSpec, ModelSpec, foreign_field, spec_class
from pipeline.core.validate import FIELDS, field_problems


@dataclass(frozen=True)
class TransferConfig:
    source: str | None = None  # None: the labelled training split; else an .npz/.parquet path
    exclude_classes: tuple[int, ...] = ()  # drop these classes from the transfer set
    # more transfer rows: these files' rows follow the transfer set's, in order (classify only); a
    # cache with cache.members of the longer set reuses every shard of the shorter one's rows
    append: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataConfig:
    task: Literal["classify", "lm"] = "classify"  # lm: next-token distributions of language models
    source: str = "digits"  # classify: "digits" or .npz/.parquet; lm: "python-docs" or .txt/.jsonl/.parquet
    test_source: str | None = None  # separate test file; else x_test/y_test in the .npz, else a split
    test_fraction: float = 0.25
    split_seed: int = 0
    label_column: str = "label"  # Parquet only
    feature_columns: tuple[str, ...] | None = None  # Parquet only; None: one list column or all numeric
    num_classes: int | None = None  # None: inferred as max label + 1
    transfer: TransferConfig = TransferConfig()
    # lm only
    text_field: str = "text"  # .jsonl / Parquet text field
    tokenizer: str | None = None  # local directory with tokenizer.json; None: train a BPE here
    vocab_size: int = 8192  # of the BPE trained when tokenizer is None
    eos_token: str | None = None  # token appended to each document; None: the tokenizer's declared eos_token
    train_on: Literal["assistant", "all"] = "assistant"  # chat, labels, loss_mask sources: all ignores their masks
    seq_len: int = 64  # tokens a model reads per sequence
    max_sequences: int | None = None  # cap on training sequences (test: a quarter of it)


def _default_teachers() -> tuple[ModelSpec, ...]:
    return (
        MLPSpec(name="mlp-wide", hidden=(1200, 1200), dropout=0.3, seed=0),
        MLPSpec(name="mlp-deep", hidden=(512, 512, 512), dropout=0.2, seed=1),
        CNNSpec(name="cnn", channels=(32, 64), hidden=(128,), dropout=0.2, seed=2),
    )


@dataclass(frozen=True)
class TeachersConfig:
    members: tuple[ModelSpec, ...] = field(default_factory=_default_teachers)
    ensemble: Literal["mean_probs", "mean_logprobs"] = "mean_probs"
    weights: tuple[float, ...] | None = None  # None: equal weights
    temperature: float = 4.0  # temperature at which the ensemble's targets are cached
    epochs: int = 30  # built-in teachers: training epochs, unless a member sets its own
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    checkpoint_every: int = 200  # built-in teachers: steps between mid-epoch checkpoints


@dataclass(frozen=True)
class CacheConfig:
    backend: Literal["zarr", "parquet"] = "zarr"
    encoding: Literal["dense", "topk", "sampled", "hybrid"] = "dense"
    dtype: Literal["float16", "float32"] = "float16"  # dense: storage dtype of the log-probs
    k: int = 5  # topk, hybrid: classes kept exactly per row (the head)
    bits: Literal[16, 8] = 16  # topk, hybrid: 8 stores log-quantized uint8 log-probs and delta-coded ids
    logp_range: float = 16.0  # bits=8: log-probs below -logp_range are clipped
    draws: int = 32  # sampled: ids drawn per row from the distribution; hybrid: from its tail (<= 255)
    draw_logp: bool = True  # sampled, hybrid: keep each draw's log-prob (2 B): students at any temperature
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # teacher compute; auto: bf16 on cuda, else fp32
    dense_max_classes: int = 4096  # dense is refused above this many classes (vocabulary)
    rows_per_shard: int | None = None  # the unit of work and of atomic writes; None: default_layout, by row bytes
    chunk_rows: int | None = None  # zarr chunk / Parquet row group, the unit of reading; None: default_layout
    batch_size: int | None = None  # teacher forward batch; None: 512 rows, or 8 sequences for lm
    logit_rows: int = 2048  # lm: token rows whose (rows, vocab) logits exist at once (teacher, evaluation)
    context: int | None = None  # lm: tokens the teachers read at once; None: data.seq_len
    stride: int | None = None  # lm: a longer document is read in windows every stride tokens; None: context // 2
    device: str = "auto"  # auto: cuda when available, else cpu
    root: str | None = None  # where caches live; None: <workspace>/caches
    compression_level: int | None = None  # None: the codec's own default (zstd 3, shuffle-lz4hc 1)
    # zarr: shuffle-*: Blosc byte shuffle first (pipeline/core/codecs.py, docs/cache-format.md "Codecs");
    # None: the encoding's default (default_codec: shuffle-lz4hc for dense and topk, shuffle-zstd for hybrid,
    # zstd for sampled; Parquet: zstd)
    codec: Literal["zstd", "shuffle-zstd", "shuffle-lz4", "shuffle-lz4hc"] | None = None
    views: int = 0  # augmented views cached per sample (the `augment:` section); 0: the plain images
    # combined: the ensemble's targets only; separate: each teacher's targets, combined by the student
    # at read time; both: the two. Member targets live in stores shared by every cache that uses them,
    # so adding a teacher or rows computes only what is new (docs/growing.md)
    members: Literal["combined", "separate", "both"] = "combined"


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation of image inputs: the cache's views (cache.views > 0) and, for a cache without
    views, the student's online augmentation. See pipeline/views.py."""

    crop: Literal["none", "resized", "padded"] = "none"  # resized: RandomResizedCrop; padded: RandomCrop(padding)
    scale: tuple[float, ...] = (0.08, 1.0)  # resized: range of the box's area over the image's
    ratio: tuple[float, ...] = (0.75, 4.0 / 3.0)  # resized: range of the box's width / height
    padding: int = 0  # padded: zero padding on each side (a shift by -padding..padding pixels)
    translate: int = 0  # any crop: a further shift by -translate..translate pixels on each axis, zero fill
    flip: float = 0.0  # probability of a horizontal flip
    mixup_prob: float = 0.0  # probability a view is mixed with a partner sample (needs cache.views > 0)
    mixup_alpha: float = 0.2  # lambda ~ Beta(alpha, alpha)
    cutmix_prob: float = 0.0  # probability a view gets a box pasted from a partner (needs cache.views > 0)
    cutmix_alpha: float = 1.0

    @property
    def active(self) -> bool:
        """Whether any pixel changes (an inactive spec gives N copies of the image)."""
        return self.crop != "none" or self.translate > 0 or self.flip > 0 or self.mixup_prob > 0 or self.cutmix_prob > 0


@dataclass(frozen=True)
class MixtureSource:
    """One source of a student's mixture (lm): a token cache and how often its batches come."""

    cache: str = "self"  # a cache id, id prefix or directory; "self": the cache this config's cache stage makes
    weight: float = 1.0
    tokens: str | None = None  # its tokenized corpus directory; None: <workspace>/tokens/<the cache's>


def _default_students() -> tuple[ModelSpec, ...]:
    return (
        MLPSpec(name="mlp-30", hidden=(30,)),
        MLPSpec(name="mlp-100", hidden=(100,)),
    )


@dataclass(frozen=True)
class StudentConfig:
    models: tuple[ModelSpec, ...] = field(default_factory=_default_students)
    cache: str | None = None  # cache id or directory; None: the cache this config's cache stage makes
    seeds: tuple[int, ...] = (0,)
    grid: dict[str, list[Any]] = field(default_factory=dict)  # sweep: {temperature: [2, 4], alpha: [0.1, 0.5]}
    baseline: bool = True  # also train each model on hard labels only (alpha=1), same batches
    epochs: int = 40
    batch_size: int = 64
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 3e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    temperature: float | None = None  # None: the cache's temperature (exact); else re-tempered
    alpha: float = 0.1  # weight of the hard-label cross-entropy; 1 - alpha on the soft targets
    tail: Literal["uniform", "bucket"] = "uniform"  # topk: how the residual mass is modelled
    divergence: Literal["forward", "reverse", "jsd"] = "forward"  # forward KL, reverse KL or JSD (sampled: forward only)
    # lm: token rows whose (rows, vocab) logits are computed at once; the loss of a chunk keeps about
    # seven (rows, vocab) float32 tensors alive, so 512 rows of a 2,048-token vocabulary peak at 28 MB
    logit_chunk: int = 512
    seq_len: int | None = None  # lm: input tokens per student row; None: data.seq_len
    packing: Literal["concat", "pad"] = "concat"  # lm: documents back to back, or each in its own padded rows
    mixture: tuple[MixtureSource, ...] = ()  # lm: train on several token caches with weights; (): this config's
    # lm: the student's own tokenizer (a directory with tokenizer.json) when it differs from the
    # cache's (data.tokenizer); it reads the same documents, aligned to the teacher rows by their
    # character spans (pipeline/train/crosstok.py), with the method `align`: uld, exact or span
    tokenizer: str | None = None
    align: Literal["uld", "exact", "span"] = "exact"
    shuffle_chunks: int = 32  # chunks per shuffle buffer, drawn from across the whole cache
    checkpoint_every: int = 50  # steps between mid-epoch checkpoints
    device: str = "cpu"  # student training device: cpu, cuda, cuda:1 or auto
    # a cache with per-member targets (cache.members separate or both): which teachers, their weights
    # and how their targets combine at read time; (), None, None: the cache's teachers, weights, ensemble
    members: tuple[str, ...] = ()
    weights: tuple[float, ...] | None = None  # one per student.members (or per cached teacher)
    combine: Literal["mean_probs", "mean_logprobs", "per_member"] | None = None  # per_member: a loss per teacher


@dataclass(frozen=True)
class SlurmConfig:
    """dask-jobqueue SLURMCluster settings; each Slurm job runs `processes` Dask workers."""

    jobs: int = 1
    queue: str | None = None
    account: str | None = None
    cores: int = 8
    memory: str = "32GB"
    processes: int = 1
    walltime: str = "02:00:00"
    job_extra_directives: tuple[str, ...] = ()  # e.g. ["--gres=gpu:1"]
    job_script_prologue: tuple[str, ...] = ()  # e.g. ["source .venv/bin/activate"]


@dataclass(frozen=True)
class ClusterConfig:
    """Where stages fan out: in-process, a LocalCluster, an existing scheduler, or Slurm via Dask."""

    kind: Literal["none", "local", "address", "slurm"] = "none"
    workers: int = 2  # local: worker processes
    threads_per_worker: int = 1  # Dask threads per worker; torch uses as many intra-op threads
    address: str | None = None  # kind=address: e.g. tcp://10.0.0.5:8786
    gpus_per_worker: int = 0  # >0: tasks ask for resources={"GPU": 1}; workers advertise this many
    retries: int = 2  # a task whose worker dies is rerun this many times
    worker_timeout: float = 600.0  # seconds to wait for the workers to start (Slurm: to leave the queue)
    slurm: SlurmConfig = SlurmConfig()


@dataclass(frozen=True)
class EvaluateConfig:
    ece_bins: int = 15


CHUNK_BYTES = 2 << 20  # a chunk's stored bytes by default, before compression


MAX_CHUNK_ROWS = 16_384  # rows per chunk by default at most (tokens: whole sequences)


SHARD_CHUNKS = 16  # chunks per shard by default at most


SHARD_ROWS = {"classify": 65_536, "lm": 131_072}  # rows (tokens) per shard by default at most


def default_layout(task: str, seq_len: int, views: int, row_bytes: float, chunk_rows: int | None = None,
                   rows_per_shard: int | None = None) -> tuple[int, int]:
    """(chunk_rows, rows_per_shard) for settings left unset, from a row's stored bytes. A chunk is
    the power of two of rows nearest CHUNK_BYTES (2 MiB before compression), at most 16,384 rows; a
    language model's is whole sequences (one at least), and with views a quarter (samples of one
    view). Reading a chunk has a fixed cost (a file per column, a codec call), so chunks of a few
    bytes per row must hold many rows to read at memory speed (bench/reader.py: top-32 8-bit rows
    read at 0.41 of a memmap in 4,096-row chunks, 0.93 in 16,384-row ones); bounding the bytes keeps
    a student's shuffle buffer of 32 chunks near 64 MiB at any class count. A shard is 16 chunks, at
    most 65,536 rows (131,072 tokens), at least one chunk: a unit of work worth scheduling whose rows
    the cache stage holds while writing it. With views a shard is `views` times a multiple of
    chunk_rows. A `chunk_rows` that is set sizes the shard; a `rows_per_shard` set alone that is
    smaller than a chunk (per view) makes the chunk one it divides. Bad values pass through
    unchanged for `validate` to report."""
    def given(v: Any) -> int | None:
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

    seq_len, views, chunk_rows, rows_per_shard = given(seq_len) or 1, given(views) or 0, given(chunk_rows), given(rows_per_shard)
    rows = min(MAX_CHUNK_ROWS, 2 ** max(0, round(math.log2(CHUNK_BYTES / max(row_bytes, 1.0)))))
    if task == "lm":
        chunk = seq_len * max(1, rows // seq_len)
        if rows_per_shard:
            chunk = min(chunk, rows_per_shard)
    else:
        chunk = max(1, rows // (4 if views else 1))
        if rows_per_shard and views and rows_per_shard % views == 0:
            per_view = rows_per_shard // views
            chunk = next(c for c in range(min(chunk, per_view), 0, -1) if per_view % c == 0)
        elif rows_per_shard and not views:
            chunk = min(chunk, rows_per_shard)
    chunk = chunk_rows or chunk
    if views:
        shard = views * chunk * max(1, SHARD_CHUNKS // views)
    else:
        shard = chunk * max(1, min(SHARD_CHUNKS, SHARD_ROWS.get(task, SHARD_ROWS["classify"]) // chunk))
    return chunk, rows_per_shard or shard


@dataclass(frozen=True)
class Config:
    workspace: str = "data"  # root for teachers/, caches/ and runs/
    run_name: str = "demo"  # run directory: <workspace>/runs/<run_name>
    seed: int = 0
    data: DataConfig = DataConfig()
    teachers: TeachersConfig = TeachersConfig()
    cache: CacheConfig = CacheConfig()
    augment: AugmentConfig = AugmentConfig()
    student: StudentConfig = StudentConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    cluster: ClusterConfig = ClusterConfig()

    def __post_init__(self) -> None:
        c, d = self.cache, self.data
        if not (isinstance(c, CacheConfig) and isinstance(d, DataConfig)):
            return  # a malformed section, reported by _build
        if self.cache.codec is None:  # the encoding's default, filled in once
            object.__setattr__(self, "cache", dataclasses.replace(self.cache, codec=default_codec(c.encoding, c.backend)))

    @property
    def run_dir(self) -> Path:
        return Path(self.workspace) / "runs" / self.run_name

    @property
    def cache_root(self) -> Path:
        """Where this machine writes and finds caches: cache.root, or <workspace>/caches (also where
        shards are staged when cache.root is a URL)."""
        if self.cache.root and not is_url(self.cache.root):
            return Path(self.cache.root)
        return Path(self.workspace) / "caches"

    @property
    def cache_url(self) -> str | None:
        """cache.root when it is an object store URL (s3://bucket/caches), else None."""
        return self.cache.root.rstrip("/") if self.cache.root and is_url(self.cache.root) else None

    @property
    def teacher_dir(self) -> Path:
        return Path(self.workspace) / "teachers"


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read YAML (or the built-in defaults when path is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found; pass the path of a YAML config")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
        try:
            raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
        except _DuplicateKey as e:
            raise ConfigError(f"{p}: {e}") from None
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise ConfigError(f"{p}: not valid YAML{where}; fix the syntax") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections (data:, teachers:, ...)")
    for item in overrides:
        _apply_override(raw, item)
    errors: list[str] = []
    cfg = _build(Config, raw, "", errors)
    if not errors:
        errors.extend(validate(cfg))
    if errors:
        source = f"{path}: " if path is not None else ""
        raise ConfigError(source + "; ".join(errors))
    return cfg


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(f"key {key!r} appears twice in one section (lines {seen[key]} and "
                                    f"{line}); keep one, the first would be silently dropped")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. student.temperature=4")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty part in key {key!r}; write e.g. student.models.0.hidden=[64]")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_index(part, key, len(node))]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[:i])} is a value ({node!r}), not a section or list")
        if part not in node or node[part] is None:
            # lists of models need their defaults materialized before an index can be set
            node[part] = _default_as_raw(parts[: i + 1], key) if parts[i + 1].isdigit() else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[_index(last, key, len(node))] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override {key}: {'.'.join(parts[:-1])} is a value ({node!r}), not a section or list")


def _index(part: str, key: str, length: int) -> int:
    if not part.isdigit() or int(part) >= length:
        raise ConfigError(f"override {key}: {part!r} is not an index below {length}")
    return int(part)


def _default_as_raw(path: list[str], key: str) -> Any:
    node: Any = to_dict(Config())
    for part in path:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            node = None
            break
    if not isinstance(node, list):
        raise ConfigError(f"override {key}: {'.'.join(path)} is not a list, so it cannot be indexed; "
                          "check the key's spelling")
    return node


def _build(cls: type, raw: Any, where: str, errors: list[str]) -> Any:
    """Build dataclass `cls` from `raw`, appending every problem found to `errors`."""
    if not isinstance(raw, dict):
        errors.append(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    for key in unknown:
        other_arch = foreign_field(key, raw.get("arch", "mlp")) if issubclass(cls, ModelSpec) else None
        errors.append(f"{where}{key}: {other_arch or 'unknown key; valid keys are ' + ', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], f"{where}{name}", errors)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{where}{name}: required key is missing")
    try:
        return cls(**kwargs)
    except TypeError:  # a required key is missing: already reported
        return None


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(tp: Any, value: Any, where: str, errors: list[str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where, errors)
    if origin is Literal:
        if value not in args:
            errors.append(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]  # `hidden: 64` means (64,)
        if not isinstance(value, (list, tuple)):
            errors.append(f"{where}: expected a list, got {type(value).__name__}")
            return ()
        return tuple(_coerce(args[0], v, f"{where}.{i}", errors) for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping, got {type(value).__name__}")
            return {}
        return dict(value)
    if tp is ModelSpec:  # the member's `arch` picks its spec class
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping, got {type(value).__name__}")
            return None
        try:
            tp = spec_class(value.get("arch", "mlp"), where)
        except ConfigError as e:
            errors.append(str(e))
            return None
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{where}.", errors)
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{where}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{where}: expected a string, got {value!r}")
        return value
    return value


GRID_KEYS = ("temperature", "alpha", "lr", "epochs")  # ModelSpec fields a student sweep may vary


READ_KEYS = ("members", "weights", "combine")  # how a student reads per-member targets; sweepable too


COMBINE = ("mean_probs", "mean_logprobs", "per_member")


DEVICE_FORMS = "auto, cpu, cuda or cuda:N"


def valid_device(name: str) -> bool:
    """auto, cpu, cuda or cuda:N: the forms the stages accept."""
    if name in ("auto", "cpu", "cuda"):
        return True
    kind, _, index = name.partition(":")
    return kind == "cuda" and index.isdigit()


def validate(cfg: Config) -> list[str]:
    """Value checks that types cannot express; returns every problem found. A field's own rule
    lives in pipeline/core/validate.py (FIELDS), shared with the Python API; the rules here tie
    fields together."""
    e: list[str] = field_problems(cfg)
    d, t, c, s = cfg.data, cfg.teachers, cfg.cache, cfg.student
    bad_excluded = [k for k in d.transfer.exclude_classes
                    if k < 0 or (d.num_classes is not None and k >= d.num_classes)]
    if bad_excluded:  # with num_classes unset, the upper bound is checked when the data is loaded
        bound = f"[0, {d.num_classes})" if d.num_classes is not None else "classes >= 0"
        e.append(f"data.transfer.exclude_classes: {bad_excluded[0]} is not a class; give {bound}")
    if d.task == "lm" and d.transfer.exclude_classes:
        e.append("data.transfer.exclude_classes: applies to data.task classify only")
    e.extend(_feature_problems(d))
    if not t.members:
        e.append("teachers.members: give at least one teacher")
    if t.weights is not None:
        if len(t.weights) != len(t.members):
            e.append(f"teachers.weights: {len(t.weights)} weights for {len(t.members)} teachers")
        elif any(not math.isfinite(w) or w < 0 for w in t.weights) or not 0 < sum(t.weights) < math.inf:
            e.append("teachers.weights: must be finite, non-negative, with a positive sum")
    for section, members in (("teachers.members", t.members), ("student.models", s.models)):
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            e.append(f"{section}: names must be unique, got {', '.join(names)}")
        for i, m in enumerate(members):
            where = f"{section}.{i}"
            e.extend(m.problems(where, teacher=section == "teachers.members"))
            if m.task != d.task:
                archs = [a for a, cls in SPECS.items() if cls.task == d.task]
                archs = ", ".join(archs[:-1]) + " or " + archs[-1] if len(archs) > 1 else archs[0]
                e.append(f"{where}.arch: data.task {d.task} needs arch {archs}, got {m.arch}")
    if c.codec in CODECS:  # an unknown one is refused with its type
        e.extend(f"cache.{problem}" for problem in codec_problems(c.codec, c.compression_level, c.backend))
    for key, dev in (("cache.device", c.device), ("student.device", s.device)):
        if not valid_device(dev):
            e.append(f"{key}: {dev!r} is not a device; use {DEVICE_FORMS}")
    if d.task == "lm":
        if d.seq_len < 2:
            e.append("data.seq_len: must be >= 2")
        if (c.context or 0) > d.seq_len and any(m.arch == "gpt" for m in t.members):
            e.append(f"cache.context: the built-in gpt teachers read at most data.seq_len={d.seq_len} tokens; "
                     "lower cache.context or raise data.seq_len")
        if isinstance(c.stride, int) and c.stride > (c.context or d.seq_len):
            e.append(f"cache.stride: must be in 1..cache.context ({c.context or d.seq_len})")
        for i, m in enumerate(s.mixture):
            if not m.weight > 0:
                e.append(f"student.mixture.{i}.weight: {m.weight} must be > 0")
        if s.tokenizer is not None and s.mixture:
            e.append("student.tokenizer: a student with another tokenizer reads one cache; remove student.mixture")
    else:
        defaults = StudentConfig()
        for key in ("logit_chunk", "seq_len", "packing", "mixture", "tokenizer", "align"):
            if getattr(s, key) != getattr(defaults, key):
                e.append(f"student.{key}: applies to data.task lm only; remove it")
    if c.encoding == "sampled" and s.divergence != "forward":
        e.append(f"student.divergence: {s.divergence} needs teacher probabilities; sampled caches "
                 "support forward only, use cache.encoding=hybrid or topk")
    if not s.models:
        e.append("student.models: give at least one student model")
    if not s.seeds:
        e.append("student.seeds: give at least one seed")
    for key, values in s.grid.items():
        if key not in GRID_KEYS + READ_KEYS:
            e.append(f"student.grid.{key}: not sweepable; use {', '.join(GRID_KEYS + READ_KEYS)}")
        elif not isinstance(values, list) or not values:
            e.append(f"student.grid.{key}: give a non-empty list of values")
        elif key in READ_KEYS:
            e.extend(f"student.grid.{key}.{i}: {why}" for i, v in enumerate(values)
                     if (why := _read_problem(key, v, cfg)))
        elif not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            e.append(f"student.grid.{key}: values must be numbers")
        else:
            bad = [(v, why) for v in values if (why := FIELDS[f"student.{key}"].why(v))]
            if bad:
                e.append(f"student.grid.{key}: {bad[0][0]!r} is invalid; values {bad[0][1]}")
    e.extend(_validate_views(cfg))
    e.extend(_validate_members(cfg))
    k = cfg.cluster
    if k.kind == "address" and not k.address:
        e.append("cluster.address: kind=address needs a scheduler address, e.g. tcp://host:8786")
    if not cfg.run_name or cfg.run_name in (".", "..") or "/" in cfg.run_name or "\\" in cfg.run_name:
        e.append(f"run_name: {cfg.run_name!r} must be a plain directory name (not '.', '..', or with '/')")
    if not cfg.workspace:
        e.append("workspace: must be a directory path")
    return e


def _feature_problems(d: DataConfig) -> list[str]:
    """data.feature_columns may name neither the labels nor the sample ids: a label among the
    features is a label leak (a model that reads its answer), ids are keys, not inputs."""
    if d.feature_columns is None:
        return []
    if not d.feature_columns:
        return [("data.feature_columns: an empty list; name the feature columns, or unset it to take every "
                 "numeric column")]
    e = []
    for col, what in ((d.label_column, "data.label_column, the labels: a feature would leak them"),
                      ("sample_id", "the sample id column, a key and not an input")):
        if col in d.feature_columns:
            e.append(f"data.feature_columns: {col!r} is {what}; remove it from data.feature_columns")
    dup = sorted({c for c in d.feature_columns if d.feature_columns.count(c) > 1})
    if dup:
        e.append(f"data.feature_columns: {dup[0]!r} is listed twice; list each column once")
    return e


def augment_problems(a: AugmentConfig) -> list[str]:
    """What is wrong with an augmentation on its own: its fields' rules and the ties between them
    (`Cache.dataset(augment=...)` checks a user's AugmentConfig with this)."""
    return field_problems(a, "augment.") or _augment_ties(a)


def _validate_members(cfg: Config) -> list[str]:
    """cache.members and the student's read-time choice of members, weights and combination."""
    e: list[str] = []
    c, s, d = cfg.cache, cfg.student, cfg.data
    if d.transfer.append and d.task == "lm":
        e.append("data.transfer.append: applies to data.task classify only")
    if c.members != "combined":
        if d.task == "lm":
            e.append("cache.members: per-member targets apply to data.task classify; token caches store the "
                     "combined ensemble (cache.members: combined)")
        if c.views > 0:
            e.append("cache.members: per-member targets apply to caches without views (a view's mixup partner "
                     "depends on the whole transfer set, so its shards cannot be reused by content)")
        if cfg.cache_url is not None:
            e.append("cache.members: member stores live under a local cache.root; publish combined caches to "
                     "object storage")
        if c.members == "both" and "ensemble" in [m.name for m in cfg.teachers.members]:
            e.append("teachers.members: 'ensemble' names the combined targets of cache.members both; rename "
                     "that teacher")
    for key in READ_KEYS:
        value = getattr(s, key)
        if value not in ((), None) and (why := _read_problem(key, value, cfg)):
            e.append(f"student.{key}: {why}")
    reads = [k for k in READ_KEYS if getattr(s, k) not in ((), None) or k in s.grid]
    if reads and c.members == "combined" and s.cache is None:
        e.append(f"student.{reads[0]}: reads per-member targets, but cache.members is combined (the ensemble "
                 "only); set cache.members: separate (or both)")
    return e


def _read_problem(key: str, value: Any, cfg: Config) -> str | None:
    """What is wrong with one value of student.members, student.weights or student.combine."""
    s, teachers = cfg.student, [m.name for m in cfg.teachers.members]
    if key == "combine":
        return None if value in COMBINE else f"{value!r} is not one of {', '.join(COMBINE)}"
    if not isinstance(value, (list, tuple)) or not value:
        return "give a non-empty list"
    if key == "members":
        if not all(isinstance(v, str) for v in value) or len(set(value)) != len(value):
            return "give distinct teacher names"
        unknown = [v for v in value if v not in teachers]
        if unknown and s.cache is None:
            return f"{unknown[0]!r} is not a teacher; give names of teachers.members ({', '.join(teachers)})"
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return "weights must be numbers"
    if any(v < 0 for v in value) or sum(value) <= 0:
        return "weights must be non-negative with a positive sum"
    chosen = len(s.members) if s.members else len(teachers)
    if "members" not in s.grid and len(value) != chosen and s.cache is None:
        return f"{len(value)} weights for {chosen} teachers read (student.members, else teachers.members)"
    return None


def _augment_ties(a: AugmentConfig) -> list[str]:
    e: list[str] = []
    for key in ("scale", "ratio"):
        pair = getattr(a, key)
        if len(pair) != 2 or not 0 < pair[0] <= pair[1] or (key == "scale" and pair[1] > 1):
            bound = "0 < low <= high <= 1" if key == "scale" else "0 < low <= high"
            e.append(f"augment.{key}: {list(pair)} must be two numbers [low, high] with {bound}")
    if a.crop == "padded" and a.padding == 0:
        e.append("augment.padding: crop padded needs padding >= 1 (pixels of shift each way)")
    if a.mixup_prob + a.cutmix_prob > 1.0:
        e.append("augment: mixup_prob + cutmix_prob must be <= 1 (a view is mixed one way at most)")
    return e


def _validate_views(cfg: Config) -> list[str]:
    a, c, n = cfg.augment, cfg.cache, cfg.cache.views
    e = _augment_ties(a)
    if n > 65535 or (c.chunk_rows is not None and c.chunk_rows < 1) or (c.rows_per_shard is not None and c.rows_per_shard < 1):
        pass  # reported by their rules
    elif n > 0:
        if cfg.data.task == "lm":
            e.append("cache.views: augmented views apply to data.task classify (image inputs)")
        if not a.active:
            e.append(f"cache.views: {n} views of an unaugmented image are {n} identical copies; "
                     "set augment.crop, augment.flip, augment.translate or mixup/cutmix")
        chunk = c.chunk_rows or 1  # unset: the default divides the shard's samples
        if c.rows_per_shard is not None and (c.rows_per_shard % n or (c.rows_per_shard // n) % chunk):
            of = f"cache.views={n} times a multiple of cache.chunk_rows={chunk}" if c.chunk_rows else f"a multiple of cache.views={n}"
            e.append(f"cache.rows_per_shard: {c.rows_per_shard} must be {of} (rows are view-major in a shard, so "
                     f"that a chunk holds one view), e.g. {n * chunk * max(1, round(c.rows_per_shard / (n * chunk)))}")
    elif a.mixup_prob > 0 or a.cutmix_prob > 0:
        e.append("augment: mixup/cutmix need cache.views >= 1 (the teachers must see the mixed images; "
                 "a cache of plain images has no targets for them)")
    return e


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config (tuples as lists), for YAML/JSON and hashing."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

