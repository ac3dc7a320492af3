"""The student jobs of a config: models crossed with the grid and seeds, plus hard-label twins.

Shared by the student stage (which trains them) and the evaluate stage (which scores them).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

from pipeline import cache as fmt
from pipeline.config import GRID_KEYS, Config, ModelSpec
from pipeline.spec import find_cache


@dataclass(frozen=True)
class Shard:
    model: int  # index into student.models
    seed: int
    kind: str  # "kd" or "hard"


@dataclass(frozen=True)
class Variant:
    spec: ModelSpec  # a student model with one grid point applied; the grid values are in its name
    hard_name: str  # its hard-label twin's name: temperature and alpha do not change that run


def variants(cfg: Config) -> list[Variant]:
    """student.models crossed with student.grid."""
    grid = cfg.student.grid
    keys = [k for k in GRID_KEYS if k in grid]
    out = []
    for m in cfg.student.models:
        for values in itertools.product(*(grid[k] for k in keys)):
            changes = {k: (int(v) if k == "epochs" else float(v)) for k, v in zip(keys, values)}
            suffix = "".join(f"-{_ABBREV[k]}{v:g}" for k, v in changes.items())
            hard = "".join(f"-{_ABBREV[k]}{v:g}" for k, v in changes.items() if k in ("lr", "epochs"))
            out.append(Variant(dataclasses.replace(m, name=m.name + suffix, **changes), m.name + hard))
    return out


_ABBREV = {"temperature": "T", "alpha": "a", "lr": "lr", "epochs": "ep"}


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


def cache_path(cfg: Config) -> Path:
    """student.cache if given, else the cache this config's cache stage made (see spec.find_cache)."""
    if cfg.student.cache is not None:
        return fmt.resolve(cfg.student.cache, cfg.cache_root)
    return find_cache(cfg)
