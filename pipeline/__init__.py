"""logitcache: run a teacher ensemble once, cache its soft targets, train many students from the cache.

The public Python API (README "Python API"):

    open_cache(id_or_path, root=None) -> Cache      manifest, encoding, classes, temperature, dataset(...)
    Cache.dataset(batch_size, seed=0, ...)          IterableDataset split by DDP rank and DataLoader worker
    kd_loss(student_logits, batch, temperature)     alpha * CE + (1 - alpha) * T^2 * D, any encoding
    replay_views(batch, inputs, cache.views)        the exact pixels of a views cache batch's views
    CacheWriter(root, spec=..., encoding=..., num_classes=...)   a cache from outputs computed elsewhere

Names are imported on first use, so `import pipeline` (and the CLI) stays fast.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

# torch's OpenMP threads spin up to 300,000 times at each barrier before they sleep (libgomp's
# default). When another process shares the cores, a descheduled spinner stalls every op: a small
# student's training step took 4-5x longer (bench/threads.py). A short spin keeps that cost small.
# libgomp reads this when torch loads, so it applies to the CLI and to code that imports pipeline
# before torch; set GOMP_SPINCOUNT (or OMP_WAIT_POLICY) yourself to choose otherwise.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

__version__ = "0.1.0"

MMAP_THRESHOLD = 8 << 20  # bytes


def steady_heap() -> None:
    """Pin glibc's mmap threshold at 8 MB (unless MALLOC_MMAP_THRESHOLD_ is set), so tensors of
    8 MB and more are mapped afresh and unmapped when freed. On glibc's heap they fragment: each
    smaller block placed in a freed hole leaves it too short for the next batch's tensors, and
    the holes stay resident. glibc also raises the threshold to the size of each large block
    freed (up to 32 MB), which moves more of them onto the heap. The classification cache stage
    of bench/heap.py (16 MB logits per batch) peaked at 359-370 MB pinned at 8 MB, 369-474 MB at
    16 MB and 409-457 MB left to glibc, at some cost in speed where tensors of 8-32 MB are most of
    the work (README "Steady heap"). The CLI calls this; Dask workers it starts get the same
    through the environment. A no-op where there is no glibc, and with LOGITCACHE_STEADY_HEAP=0."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or os.environ.get("LOGITCACHE_STEADY_HEAP") == "0":
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD; also turns off glibc's dynamic adjustment


_EXPORTS = {
    "open_cache": "pipeline.api", "Cache": "pipeline.api", "CacheDataset": "pipeline.api",
    "CacheLoader": "pipeline.api", "kd_loss": "pipeline.api", "to_device": "pipeline.api",
    "replay_views": "pipeline.api",
    "CacheWriter": "pipeline.writer",
    "Dense": "pipeline.encodings", "TopK": "pipeline.encodings", "Sampled": "pipeline.encodings",
    "Hybrid": "pipeline.encodings",
}

__all__ = ["__version__", "steady_heap", *_EXPORTS]

if TYPE_CHECKING:
    from pipeline.api import Cache, CacheDataset, CacheLoader, kd_loss, open_cache, replay_views, to_device
    from pipeline.encodings import Dense, Hybrid, Sampled, TopK
    from pipeline.writer import CacheWriter


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
