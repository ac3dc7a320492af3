"""Console output: one-line status messages and tqdm progress bars (shown on a terminal only)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bar(total: int, desc: str, unit: str = "rows") -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=None, dynamic_ncols=True)
