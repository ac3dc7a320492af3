"""A cache's identity and manifest: cache and target ids, the manifest written last, resolving a
cache reference, and the shard checks readers and finalize use.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pipeline.core import __version__
from pipeline.core.errors import CacheError
from pipeline.core.io import (
    atomic_write_json,
    fsync_dir,
    hash_json,
    read_json,
    remove_dead_tmp,
    sha256_tree,
)

FORMAT_VERSION = 3  # 3: what re-tempering needs (top-k's tail mean log-prob, the draws' log-probs)
# 2: encoding objects, ids at the vocabulary's width, hybrid; 1 and 2 are still read, at their own
# temperature where they lack those columns


MEMBERS_FORMAT = 4  # a cache whose manifest lists member stores' shards (cache.members); its shards are format 3


READABLE_VERSIONS = (1, 2, 3, MEMBERS_FORMAT)


# ---------------------------------------------------------------------------------------------
# Identity


def cache_id(spec: dict[str, Any]) -> str:
    return hash_json(spec)[:16]


def target_id(spec: dict[str, Any]) -> str:
    """Hash of what determines the targets only (not backend or shard layout)."""
    return hash_json({k: v for k, v in spec.items() if k != "layout"})[:16]


# ---------------------------------------------------------------------------------------------
# Writing


def planned(spec: dict[str, Any]) -> tuple[int, int]:
    """(shards, rows) of a cache's plan; language-model rows are tokens, shards hold whole sequences
    (or, keyed by document, rows_per_shard trained positions)."""
    if spec["dataset"].get("keyed") == "document":
        rows = spec["dataset"]["rows"]
        return -(-rows // spec["layout"]["rows_per_shard"]), rows
    per_item = spec["dataset"].get("seq_len") or spec.get("views", {}).get("count", 1)
    items, per_shard = spec["dataset"]["rows"], spec["layout"]["rows_per_shard"] // per_item
    return -(-items // per_shard), items * per_item


def write_manifest(cache_dir: Path, spec: dict[str, Any], entries: list[dict[str, Any]], extra: dict[str, Any]) -> dict:
    manifest = manifest_of(cache_dir.name, spec, entries, extra)
    remove_dead_tmp(cache_dir / "shards")  # from killed writers; never read as data
    if (cache_dir / "digests").is_dir():
        remove_dead_tmp(cache_dir / "digests")
    fsync_dir(cache_dir)  # shards were fsynced when published; now the entries above them
    atomic_write_json(cache_dir / "manifest.json", manifest)  # fsynced, and its directory entry
    return manifest


def manifest_of(cache_id: str, spec: dict[str, Any], entries: list[dict[str, Any]], extra: dict[str, Any]) -> dict:
    """The manifest of a cache whose shards are all written: `entries` in shard order."""
    import datetime

    rows = sum(e["rows"] for e in entries)
    nbytes = sum(e["bytes"] for e in entries)
    manifest = {
        "status": "complete",
        "format_version": spec.get("format_version", FORMAT_VERSION),
        "cache_id": cache_id,
        "target_id": target_id(spec),
        "created_by": f"logitcache {__version__}",
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
        "bytes": nbytes,
        "bytes_per_row": round(nbytes / max(rows, 1), 2),
        "shards": entries,
        "spec": spec,
        **extra,
    }
    return manifest


# ---------------------------------------------------------------------------------------------
# Reading


def resolve(ref: str | Path, root: Path) -> Path:
    """A cache directory from a path, an id, or a unique id prefix under `root`."""
    p = Path(ref)
    if (p / "spec.json").is_file() or (p / "manifest.json").is_file():
        return p
    if p.is_absolute() or len(p.parts) > 1:  # a path, never an id prefix
        what = "is not a cache directory (no spec.json or manifest.json)" if p.exists() else "does not exist"
        raise CacheError(f"cache {ref}: {what}; give a cache directory, an id or an id prefix "
                         "(list caches with `logitcache caches ls`)")
    if (root / str(ref)).is_dir():
        return root / str(ref)
    matches = sorted(d for d in root.glob(f"{ref}*") if d.is_dir()) if root.is_dir() else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise CacheError(f"cache {ref!r} matches {len(matches)} caches under {root}; give more of the id")
    raise CacheError(f"cache {ref!r}: no such cache directory or id under {root}; "
                     "list caches with `logitcache caches ls`")


def read_manifest(cache_dir: Path) -> dict[str, Any] | None:
    """The manifest, or None if there is none yet; a malformed one is refused in one line."""
    path = cache_dir / "manifest.json"
    if not path.is_file():
        return None
    fix = "delete the cache directory and rerun `logitcache cache CONFIG`"
    manifest = read_json(path, CacheError, fix)
    problem = _manifest_problem(manifest)
    if problem:
        raise CacheError(f"{path}: not a logitcache manifest ({problem}); {fix}")
    return manifest


def _manifest_problem(m: Any) -> str | None:
    """What is wrong with a manifest's shape, or None: a complete one must hold everything readers use."""
    if not isinstance(m, dict):
        return f"a JSON {type(m).__name__}, not an object"
    if m.get("status") != "complete":
        return None
    for key, kind in (("spec", dict), ("shards", list), ("rows", int), ("bytes", int), ("format_version", int)):
        if not isinstance(m.get(key), kind):
            return f"'{key}' is missing or not a {kind.__name__}"
    problem = _entries_problem(m["shards"], "shards")
    if problem:
        return problem
    if m["format_version"] == MEMBERS_FORMAT:
        units = m.get("units")
        if not isinstance(units, list) or not units:
            return "'units' is missing or empty (a cache of per-member targets lists its member stores)"
        for j, u in enumerate(units):
            if not (isinstance(u, dict) and isinstance(u.get("name"), str) and isinstance(u.get("store"), str)
                    and re.fullmatch(r"[0-9a-f]{16}", u["store"]) and isinstance(u.get("shards"), list)):
                return f"units[{j}] is not an entry with name, store (a 16-digit hex id) and shards"
            problem = _entries_problem(u["shards"], f"units[{j}].shards")
            if problem:
                return problem
    spec = m["spec"]
    if not (isinstance(spec.get("layout"), dict) and isinstance(spec["layout"].get("chunk_rows"), int)
            and isinstance(spec.get("dataset"), dict) and isinstance(spec.get("encoding"), dict)):
        return "'spec' lacks layout.chunk_rows, dataset or encoding"
    return None


def _entries_problem(entries: list[Any], where: str) -> str | None:
    for i, e in enumerate(entries):
        if not (isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("sha256"), str)
                and isinstance(e.get("rows"), int) and Path(e["path"]).parts[:1] == ("shards",)
                and ".." not in Path(e["path"]).parts):
            return f"{where}[{i}] is not an entry with path under shards/, rows and sha256"
    return None


def read_spec(path: Path) -> dict[str, Any]:
    """A cache's spec.json; a malformed one is refused in one line naming it."""
    try:
        spec = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        spec, why = None, type(e).__name__
    else:
        why = "not an object with a layout"
    if not (isinstance(spec, dict) and isinstance(spec.get("layout"), dict)
            and isinstance(spec.get("dataset"), dict)):
        raise CacheError(f"{path}: not a valid cache spec ({why}); delete the directory {path.parent} "
                         "(a cache with a damaged spec cannot be finished) and rerun `logitcache cache CONFIG`")
    return spec


def shard_problems(cache_dir: Path, shards: list[dict[str, Any]], hash_them: bool) -> dict[str, list[str]]:
    """The manifest's shards that are missing (a stat each) and, with hash_them, corrupt."""
    missing, corrupt = [], []
    for e in shards:
        path = cache_dir / e["path"]
        if not path.exists():
            missing.append(e["path"])
        elif hash_them and sha256_tree(path)[0] != e["sha256"]:
            corrupt.append(e["path"])
    return {"missing": missing, "corrupt": corrupt}

