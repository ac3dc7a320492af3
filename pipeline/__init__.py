"""logitcache: run a teacher ensemble once, cache its soft targets, train many students from the cache.

The public Python API (docs/python-api.md):

    open_cache(id_or_path, root=None) -> Cache      manifest, encoding, classes, temperature, dataset(...)
    Cache.dataset(batch_size, seed=0, ...)          IterableDataset split by DDP rank and DataLoader worker
    kd_loss(student_logits, batch, temperature)     alpha * CE + (1 - alpha) * T^2 * D, any encoding
    cross_kd_loss(hidden, head, batch, temperature, align=...)   a student with another tokenizer
    replay_views(batch, inputs, cache.views)        the exact pixels of a views cache batch's views
    CacheWriter(root, spec=..., encoding=..., num_classes=...)   a cache from outputs computed elsewhere
    tune_process()                                  the CLI's thread-spin and heap settings, opt in

The package is layered; each subpackage imports only from those before it:

    core     errors, atomic io and digests, progress, configuration, model specs, codecs, process settings
    format   the cache: columns, encodings, shard backends (Zarr, Parquet), shards, manifest, reader, writer
    inputs   input arrays and tables, text and token files, splits, augmentation
    models   one module per architecture, their table (builders.py), the teacher ensemble
    train    the epoch planner, the dataset, losses, tasks, the training loop, teacher fitting, metrics
    run      a cache's identity, computing its targets, student jobs, Dask fan-out
    tools    inspect, fidelity, import of served log-probs

Names are imported on first use, so `import pipeline` (and the CLI) stays fast, and importing it
changes nothing in the host process (no environment variable, no malloc setting).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeline.core import __version__

_EXPORTS = {
    "open_cache": "pipeline.train.dataset", "Cache": "pipeline.train.dataset",
    "CacheDataset": "pipeline.train.dataset", "CacheLoader": "pipeline.train.dataset",
    "to_device": "pipeline.train.dataset", "replay_views": "pipeline.train.dataset",
    "kd_loss": "pipeline.train.losses", "cross_kd_loss": "pipeline.train.crossloss",
    "Layout": "pipeline.inputs.documents", "mixture": "pipeline.train.mixture", "Mixture": "pipeline.train.mixture",
    "CacheWriter": "pipeline.format.writer",
    "Dense": "pipeline.format.encodings", "TopK": "pipeline.format.encodings",
    "Sampled": "pipeline.format.encodings", "Hybrid": "pipeline.format.encodings",
    "tune_process": "pipeline.core.host", "steady_heap": "pipeline.core.host",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from pipeline.core.host import steady_heap, tune_process
    from pipeline.format.encodings import Dense, Hybrid, Sampled, TopK
    from pipeline.format.writer import CacheWriter
    from pipeline.inputs.documents import Layout
    from pipeline.train.dataset import Cache, CacheDataset, CacheLoader, open_cache, replay_views, to_device
    from pipeline.train.crossloss import cross_kd_loss
    from pipeline.train.losses import kd_loss
    from pipeline.train.mixture import Mixture, mixture


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
