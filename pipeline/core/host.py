"""Process settings a host may opt into: OpenMP's spin before sleeping, and glibc's mmap threshold.

`import pipeline` changes nothing in its host process. The CLI applies these settings at start
(`tune_process`) and hands them to the Dask workers and Slurm jobs it starts (`worker_environ`); a
library user who wants the same calls `pipeline.tune_process()` before importing torch.
"""

from __future__ import annotations

import os

from pipeline.core.validate import env

# torch's OpenMP threads spin up to 300,000 times at each barrier before they sleep (libgomp's
# default). When another process shares the cores, a descheduled spinner stalls every op: a small
# student's training step took 4-5x longer (bench/threads.py). A short spin keeps that cost small.
SPIN_COUNT = 1000
MMAP_THRESHOLD = 8 << 20  # bytes
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # free bytes kept at the heap's top: what glibc's own adjustment sets beside it


def spin_environ() -> dict[str, str]:
    """GOMP_SPINCOUNT for a process about to load torch, unless the user chose a spin or wait policy."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return {}
    return {"GOMP_SPINCOUNT": str(SPIN_COUNT)}


def heap_environ() -> dict[str, str]:
    """The heap pin (`steady_heap`) as an environment variable for worker processes, unless the user
    set the threshold or turned the pin off."""
    keep = "MALLOC_MMAP_THRESHOLD_" in os.environ or not env("LOGITCACHE_STEADY_HEAP")
    if keep:
        return {}
    return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
            **({} if "MALLOC_TRIM_THRESHOLD_" in os.environ else {"MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)})}


def worker_environ() -> dict[str, str]:
    """What processes the CLI starts (Dask workers, Slurm jobs) get: the spin and the heap pin."""
    return {**spin_environ(), **heap_environ()}


def steady_heap() -> None:
    """Pin glibc's mmap threshold at 8 MB (unless MALLOC_MMAP_THRESHOLD_ is set), so tensors of
    8 MB and more are mapped afresh and unmapped when freed. On glibc's heap they fragment: each
    smaller block placed in a freed hole leaves it too short for the next batch's tensors, and
    the holes stay resident. glibc also raises the threshold to the size of each large block
    freed (up to 32 MB), which moves more of them onto the heap (bench/heap.py measures the
    classification cache stage's peak pinned at 8 MB, at 16 MB and left to glibc; docs/performance.md).
    Pinning it also freezes the trim threshold, glibc's bound on the free bytes kept at the heap's
    top, at its 128 KB start: every freed block of a few MB at the top then went back to the system
    and the next one faulted its pages in afresh (a 512 x 1,000 softmax gradient: 2.1 ms instead of
    0.8 on one thread), so it is set to 16 MB (unless MALLOC_TRIM_THRESHOLD_ is set), twice the mmap
    threshold, as glibc's adjustment sets it. A no-op where there is no glibc, and with
    LOGITCACHE_STEADY_HEAP=0."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not env("LOGITCACHE_STEADY_HEAP"):
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD; also turns off glibc's dynamic adjustment
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        mallopt(-1, TRIM_THRESHOLD)  # M_TRIM_THRESHOLD


def tune_process() -> None:
    """Apply both settings to this process: the spin (libgomp reads it when torch loads, so call
    this before importing torch) and the heap pin. The CLI calls it first thing."""
    os.environ.update(spin_environ())
    steady_heap()
