"""Target encodings: one module per way of storing a teacher distribution in the cache, and the
one table and the one function that make an encoding object from its parameters.

    enc = encoding_from_config(cfg.cache, num_classes)        # the cache stage, once
    enc = encoding_from_spec(manifest["spec"])                  # a reader, once
    enc = encoding_from_params({"name": "topk", "k": 8}, C)     # CacheWriter, the logprob importer
    stored = enc.to_host(enc.encode(logp, generator))           # on the device, then the host
    targets = enc.targets(enc.decode(stored), device, tau)      # tensors at the student's T
    kl = enc.divergence(z, targets, "forward", "uniform")       # (n,) per row; z = logits / T

Every class owns the same surface (`base.Encoding`): `encode` (on the teachers' device, so only
the compact tensors cross to the host), `to_host`, `columns` (names, dimensions, descriptions),
`decode` (stored columns to its natural numpy form), `targets` (tensors, re-tempered when the
encoding allows it), `divergence` (forward KL, reverse KL, JSD where defined, with the tail
model, from the student's logits at the loss's temperature and the compact targets: never a
(rows, classes) teacher), `fidelity` against the full distribution, `raw_bytes_per_row`, `params` (what the manifest
records), `label`, and `from_params`/`problems` (how it is made and checked). Adding an encoding is
one module here, one entry in ENCODINGS, and its tests.

Class ids are stored with the fewest bits that hold the vocabulary: uint8 up to 256 classes,
uint16 up to 65,536, and above that the low 16 bits as uint16 plus the remaining high bits
bit-packed per row (18 bits per id for 150k-262k vocabularies). Sorted id lists are delta-coded,
so the high bits are almost all zero and compress away.

Format 1 (logitcache 0.1.0) stored ids as uint16, or int32 above 65,535 classes, and sampled ids
without delta coding; `encoding_from_spec` reads those caches unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.core.errors import CacheError, ConfigError
from pipeline.format.encodings.base import LOGP_FLOOR, MAX_DRAWS, Column, Encoding, Targets, id_bits, id_store
from pipeline.format.encodings.dense import Dense
from pipeline.format.encodings.hybrid import Hybrid
from pipeline.format.encodings.sampled import Sampled
from pipeline.format.encodings.topk import TopK
from pipeline.format.manifest import FORMAT_VERSION

__all__ = ["ENCODINGS", "LOGP_FLOOR", "MAX_DRAWS", "Column", "Dense", "Encoding", "Hybrid", "Sampled", "Targets", "TopK",
           "encoding_from_config", "encoding_from_params", "encoding_from_spec", "id_bits", "id_store"]

ENCODINGS: dict[str, type] = {"dense": Dense, "topk": TopK, "sampled": Sampled, "hybrid": Hybrid}


def encoding_from_params(params: dict[str, Any], num_classes: int, version: int = FORMAT_VERSION) -> Encoding:
    """The one way an encoding is made: from `params()` as a manifest records them (a cache of format
    `version`), or as a user gives them (missing ones take their defaults). A bad name or value
    raises ValueError(`field: why; what to do`); callers name the section it came from."""
    name = params.get("name")
    if name not in ENCODINGS:
        raise ValueError(f"name: {name!r} is not one of {', '.join(ENCODINGS)}")
    cls = ENCODINGS[name]
    if version >= 2:  # format 1 recorded fields this version no longer has
        valid = sorted(f.name for f in dataclasses.fields(cls) if f.init and f.name != "num_classes")
        unknown = sorted(set(params) - set(valid) - {"name"})
        if unknown:
            raise ValueError(f"{unknown[0]}: not a parameter of {name}; give {', '.join(valid)}")
    try:
        enc = cls.from_params(params, num_classes, version)
    except KeyError as e:
        raise ValueError(f"{e.args[0]}: {name} needs it") from None
    except (TypeError, ValueError) as e:
        if str(e).startswith("name:"):
            raise
        raise ValueError(f"{name}: a parameter has the wrong type ({e})") from None
    problems = enc.problems()
    if problems:
        raise ValueError(problems[0])
    return enc


def encoding_from_config(c: Any, num_classes: int) -> Encoding:
    """The cache section's encoding for `num_classes` classes; refuses settings that do not apply."""
    params: dict[str, Any] = {"name": c.encoding}
    if c.encoding == "dense":
        if num_classes > c.dense_max_classes:
            raise ConfigError(f"cache.encoding: dense needs {num_classes} values per row; above "
                              f"cache.dense_max_classes={c.dense_max_classes} use encoding topk, hybrid or sampled")
    fields = {f.name for f in dataclasses.fields(ENCODINGS[c.encoding])}
    params.update({k: getattr(c, k) for k in ("dtype", "k", "bits", "logp_range", "draws", "draw_logp") if k in fields})
    try:
        return encoding_from_params(params, num_classes)
    except ValueError as e:
        raise ConfigError(f"cache.{e}") from None


def encoding_from_spec(spec: dict[str, Any]) -> Encoding:
    """The encoding recorded in a cache's spec (format 1 or 2)."""
    try:
        return encoding_from_params(spec["encoding"], int(spec["num_classes"]), int(spec.get("format_version", 1)))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CacheError(f"spec encoding {spec.get('encoding')!r}: cannot be read ({type(e).__name__}: {e}); "
                         "the manifest is damaged or from another program") from None
