"""The epoch planner: which rows an epoch reads, in which order, and which view of each sample.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.core.config import AugmentConfig
from pipeline.format.columns import Chunk
from pipeline.format.views import ViewSpec
from pipeline.inputs.augment import hash_keys

# ---------------------------------------------------------------------------------------------
# The student's choice of view


def chosen_views(seed: int, epoch: int, shard: int, blocks: np.ndarray, count: int) -> np.ndarray:
    """The view each block of samples of a shard trains on in `epoch`: position epoch mod N of a
    per-block permutation of the N views, drawn afresh every N epochs. Every view of every sample is
    used once per N epochs, and the order differs between blocks, cycles and seeds. (blocks,) int64.

    Choosing per block rather than per sample is the same augmentation in distribution: each
    (sample, view)'s parameters are independent draws, so which samples share a view index says
    nothing about their pixels."""
    cycle, step = divmod(epoch, count)
    keys = hash_keys(seed, cycle, shard, np.asarray(blocks, np.int64)[:, None], np.arange(count)[None, :])
    return np.argsort(keys, axis=1, kind="stable")[:, step]


def epoch_blocks(spec: ViewSpec, shard_rows: list[int], chunk_rows: int, seed: int, epoch: int) -> list[Chunk]:
    """The row ranges a student reads in `epoch`: for each block of `chunk_rows` consecutive samples
    of each shard, the rows of its chosen view. A shard of S samples holds view v of its sample i at
    row v * S + i; S is a multiple of chunk_rows except in the last shard, so a block's view is one
    whole chunk (a range of the last shard may straddle two). Chunk.index: the chunk of its first row."""
    out = []
    for s, rows in enumerate(shard_rows):
        samples = rows // spec.count
        blocks = np.arange(-(-samples // chunk_rows))
        for j, v in zip(blocks.tolist(), chosen_views(seed, epoch, s, blocks, spec.count).tolist()):
            start = v * samples + j * chunk_rows
            out.append(Chunk(s, start // chunk_rows, start, v * samples + min((j + 1) * chunk_rows, samples)))
    return out


def augmentation(cfg: Any, spec: dict[str, Any]) -> tuple[ViewSpec | None, AugmentConfig | None]:
    """What a student trains on, given a cache's spec: (the cache's views, replayed), or (None, the
    config's augmentation, drawn online for a cache of plain images), or (None, None)."""
    if "views" in spec:
        return ViewSpec.of(spec, "student.cache"), None
    if cfg.data.task == "classify" and cfg.augment.active:
        return None, cfg.augment
    return None, None

