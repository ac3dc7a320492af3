"""How a cache's shards are compressed: the `cache.codec` table, with each codec's levels.

Kept apart from pipeline/cache.py so that validating a config imports neither torch nor zarr.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Codec:
    """How a Zarr shard's chunks are compressed (`cache.codec`): zstd, or Blosc's byte shuffle and
    then `blosc` for columns of multi-byte values (the nearly constant high bytes of float16
    log-probs and of ids apart from the low ones). Single bytes have nothing to shuffle: they take
    zstd, at the codec's level for shuffle-zstd, else at zstd's default. Levels run 1..max_level
    (Blosc's top is 9)."""

    default_level: int
    max_level: int
    blosc: str | None = None

    def compressor(self, itemsize: int, level: int) -> Any:
        from zarr.codecs import BloscCodec, ZstdCodec

        if self.blosc is None or itemsize == 1:
            return ZstdCodec(level=level if self.blosc in (None, "zstd") else CODECS["zstd"].default_level)
        return BloscCodec(cname=self.blosc, clevel=level, shuffle="shuffle", typesize=itemsize)


# On top-k columns at 4,096-row chunks (bench/reader.py, docs/cache-format.md "Codecs") shuffle-lz4hc at level 1
# takes no more bytes than zstd at 3 and decodes 2-3x faster; shuffle-zstd is the smallest. Parquet
# caches use zstd on byte-stream-split pages.
CODECS: dict[str, Codec] = {"zstd": Codec(3, 22), "shuffle-zstd": Codec(3, 9, "zstd"),
                            "shuffle-lz4": Codec(3, 9, "lz4"), "shuffle-lz4hc": Codec(1, 9, "lz4hc")}


# The codec of a Zarr cache that leaves `cache.codec` unset, by encoding (bench/reader.py; docs/cache-format.md
# "Codecs"). Top-k: shuffle-lz4hc, whose chunks decode in half the CPU time of shuffle-zstd's and a third of
# zstd's (top-32 16-bit: 0.21, 0.41, 0.47 us/row, against 0.32 us/row for the rest of the loader), at no more
# bytes than zstd from 2,048-row chunks (5-12% more than shuffle-zstd, whose zstd codes the shuffled ids and
# log-probs tighter): the reader keeps up with half a memmap's loader.
# Dense: shuffle-lz4hc too. Its float16 rows take the same bytes as zstd's at 100 classes (512-row chunks:
# 157 against 155 B/row; 13% more at 10 classes, where a row is 20 bytes) and decode 3x faster: at the
# dense default of 512-row chunks the reader ran at 0.36-0.55 of a memmap against zstd's 0.26-0.47 (four
# runs beside other jobs), still short of 0.5 there, which 4,096-row chunks reach (docs/performance.md).
# Hybrid: shuffle-zstd, the smallest (2-15% under zstd; shuffle-lz4hc takes 10% more), for vocabularies where
# the student's step dwarfs reading. Sampled: zstd (a shuffle saves nothing; shuffle-lz4hc takes 40% more).
# Parquet: zstd on byte-stream-split pages.
DEFAULT_CODECS: dict[str, str] = {"topk": "shuffle-lz4hc", "dense": "shuffle-lz4hc", "hybrid": "shuffle-zstd"}


def default_codec(encoding: str, backend: str) -> str:
    """The codec a cache of `encoding` (its name) and `backend` is written with when none is given."""
    return DEFAULT_CODECS.get(encoding, "zstd") if backend == "zarr" else "zstd"


def codec_problems(codec: str, level: int | None, backend: str) -> list[str]:
    """What is wrong with writing `backend` shards with `codec` at compression `level` (None: the
    codec's default), each message opening with the setting it is about."""
    if codec not in CODECS:
        return [f"codec: {codec!r} is not one of {', '.join(CODECS)}"]
    problems = []
    if codec != "zstd" and backend != "zarr":
        problems.append(f"codec: {codec} is for the zarr backend; Parquet caches use zstd (their float columns "
                        "are already byte-split)")
    top = CODECS[codec].max_level
    if level is not None and not 1 <= level <= top:
        problems.append(f"compression_level: {level} is outside {codec}'s levels 1..{top}")
    return problems


def layout_codec(codec: str) -> dict[str, str]:
    """The codec's entry in a spec's layout: none for zstd, so that caches written before codecs
    existed keep their ids."""
    return {} if codec == "zstd" else {"codec": codec}

