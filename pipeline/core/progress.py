"""Console output: one-line status messages and progress: a tqdm bar on a terminal, and without one
(a Slurm or Dask job's log) a line every LOGITCACHE_PROGRESS_INTERVAL seconds (default 30):

    cache 3f9a2c1e: 1200000/4000000 rows (30.0%), 41.2k rows/s, ETA 1m08s
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm.auto import tqdm

from pipeline.core.validate import env


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bar(total: int | None, desc: str, unit: str = "rows") -> Any:
    """An object with update(n) and close(): a bar on a terminal, else periodic log lines; `total`
    None when it is not known in advance."""
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True)
    return LineProgress(total, desc, unit, env("LOGITCACHE_PROGRESS_INTERVAL"))


class LineProgress:
    """Progress for logs: done/total, rate and ETA, at most one line per `interval` seconds."""

    def __init__(self, total: int | None, desc: str, unit: str, interval: float) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n = 0
        self.start = self.last = time.monotonic()
        self.first = 0  # work done before this run (resumed), not counted in the rate

    def update(self, n: int = 1) -> None:
        if self.n == 0 and time.monotonic() - self.start < 1e-3:
            self.first += n  # the caller's initial catch-up (shards already on disk)
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            log(self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = (self.n - self.first) / elapsed
        if self.total is None:
            return f"{self.desc}: {self.n} {self.unit}, {_rate(rate)} {self.unit}/s, ETA ?"
        pct = f" ({100 * self.n / self.total:.1f}%)" if self.total else ""
        eta = _duration((self.total - self.n) / rate) if rate > 0 and self.total >= self.n else "?"
        return f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}, {_rate(rate)} {self.unit}/s, ETA {eta}"

    def close(self) -> None:
        if self.n > self.first:
            log(self.line(time.monotonic()).rsplit(", ETA", 1)[0] + ", done")


def _rate(r: float) -> str:
    return f"{r / 1e6:.2f}M" if r >= 1e6 else f"{r / 1e3:.1f}k" if r >= 1e3 else f"{r:.1f}"


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

