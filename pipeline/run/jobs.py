"""The student jobs of a config: models crossed with the grid and seeds, plus hard-label twins,
and the settings that determine each job's result.

Shared by the student stage (which trains them) and the evaluate stage (which scores them).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core import specs
from pipeline.core.config import GRID_KEYS, READ_KEYS, Config, to_dict
from pipeline.core.errors import ConfigError
from pipeline.core.specs import ModelSpec
from pipeline.format import reader as fmt
from pipeline.format.manifest import read_manifest, resolve
from pipeline.format.remote import join, resolve_remote
from pipeline.run.identity import find_cache
from pipeline.train.members import Blend, blend_of
from pipeline.train.plan import augmentation
from pipeline.train.tasks import task_of

# The epoch planner's version: students trained before pipeline/train/plan.py read their batches in
# another order, so their results are not this version's and are retrained.
EPOCH_ORDER = 2


@dataclass(frozen=True)
class Shard:
    model: int  # index into student.models
    seed: int
    kind: str  # "kd" or "hard"


@dataclass(frozen=True)
class Variant:
    spec: ModelSpec  # a student model with one grid point applied; the grid values are in its name
    hard_name: str  # its hard-label twin's name: temperature, alpha and the teachers read do not change that run
    read: dict[str, Any] = dataclasses.field(default_factory=dict)  # its grid point's members/weights/combine


def variants(cfg: Config) -> list[Variant]:
    """student.models crossed with student.grid."""
    grid = cfg.student.grid
    keys = [k for k in GRID_KEYS if k in grid]
    reads = [k for k in READ_KEYS if k in grid]
    out = []
    for m in cfg.student.models:
        for values in itertools.product(*(grid[k] for k in keys + reads)):
            changes = {k: (int(v) if k == "epochs" else float(v)) for k, v in zip(keys, values)}
            read = dict(zip(reads, values[len(keys):]))
            suffix = "".join(f"-{_ABBREV[k]}{v:g}" for k, v in changes.items()) + "".join(
                f"-{_ABBREV[k]}{_READ_LABEL[k](v)}" for k, v in read.items())
            hard = "".join(f"-{_ABBREV[k]}{v:g}" for k, v in changes.items() if k in ("lr", "epochs"))
            out.append(Variant(dataclasses.replace(m, name=m.name + suffix, **changes), m.name + hard, read))
    return out


_ABBREV = {"temperature": "T", "alpha": "a", "lr": "lr", "epochs": "ep", "members": "m", "weights": "w",
           "combine": "c"}
_READ_LABEL = {"members": "+".join, "weights": lambda w: "_".join(f"{x:g}" for x in w), "combine": str}


def blend(cfg: Config, shard: Shard, manifest: dict[str, Any]) -> Blend | None:
    """How a kd job reads the cache (its grid point's, else student.members/weights/combine); None for
    a cache's own targets, and always for a hard-label twin."""
    if shard.kind == "hard":
        return None
    s, read = cfg.student, variants(cfg)[shard.model].read
    members = read.get("members", s.members or None)
    weights = read.get("weights", s.weights)
    try:
        return blend_of(manifest, members, weights, read.get("combine", s.combine))
    except ValueError as e:
        where = "student.grid" if read else "student"
        raise ConfigError(f"{where}.{e} (cache {manifest['cache_id']})") from None


def models(cfg: Config) -> list[ModelSpec]:
    return [v.spec for v in variants(cfg)]


def job_name(cfg: Config, shard: Shard) -> str:
    v = variants(cfg)[shard.model]
    return f"{v.spec.name if shard.kind == 'kd' else v.hard_name}-{shard.kind}-s{shard.seed}"


def plan(cfg: Config) -> list[Shard]:
    """A kd job for every model, grid point and seed; one hard-label twin per distinct hard run."""
    shards, twins = [], set()
    for i, v in enumerate(variants(cfg)):
        for seed in cfg.student.seeds:
            shards.append(Shard(i, seed, "kd"))
            if cfg.student.baseline and (v.hard_name, seed) not in twins:
                twins.add((v.hard_name, seed))
                shards.append(Shard(i, seed, "hard"))
    return shards


def settings(cfg: Config, shard: Shard, reader: fmt.CacheReader) -> dict[str, Any]:
    """Everything that determines a job's result; its hash decides whether a rerun is needed.

    A hard-label twin's settings hold nothing of the grid point it was planned from but lr and
    epochs (temperature and alpha do not change it), so inserting a grid value never retrains it."""
    s, v = cfg.student, variants(cfg)[shard.model]
    m = v.spec
    online = augmentation(cfg, reader.manifest["spec"])[1]
    common = {"seed": shard.seed, "kind": shard.kind, "cache_id": reader.dir.name,
              "epochs": s.epochs if m.epochs is None else m.epochs, "lr": s.lr if m.lr is None else m.lr,
              "batch_size": s.batch_size,
              "optimizer": s.optimizer, "momentum": s.momentum, "weight_decay": s.weight_decay,
              "tail": s.tail, "divergence": s.divergence, "shuffle_chunks": s.shuffle_chunks,
              "epoch_order": EPOCH_ORDER,
              **task_of(cfg).student_settings(cfg),
              **({"augment": to_dict(online)} if online is not None else {}),
              **({"mixture": [to_dict(m) for m in s.mixture]} if s.mixture else {})}
    read = blend(cfg, shard, reader.manifest)
    if read is not None:  # a cache of per-member targets: the members, weights and combination read
        common["read"] = read.to_json()
    if shard.kind == "hard":
        twin = dataclasses.replace(m, name=v.hard_name, temperature=None, alpha=None)
        return {"model": specs.identity(twin), **common, "temperature": reader.temperature, "alpha": 1.0}
    temperature = m.temperature if m.temperature is not None else s.temperature
    return {"model": specs.identity(m), **common, "temperature": reader.temperature if temperature is None else temperature,
            "alpha": m.alpha if m.alpha is not None else s.alpha}


def cache_path(cfg: Config) -> Path | str:
    """student.cache if given, else the cache this config's cache stage made (see spec.find_cache).
    With cache.root a URL: the cache in the store, or its staged copy here when that is complete."""
    if cfg.cache_url is not None:
        if cfg.student.cache is not None:
            return resolve_remote(cfg.student.cache, cfg.cache_url)
        local = find_cache(cfg)
        whole = (local / "manifest.json").is_file() and read_manifest(local).get("status") == "complete"
        return local if whole else join(cfg.cache_url, local.name)
    if cfg.student.cache is not None:
        return resolve(cfg.student.cache, cfg.cache_root)
    return find_cache(cfg)
