"""`logitcache caches ls / inspect`: what is in a cache root, and one cache's manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.errors import CacheError
from pipeline.core.io import read_json, sha256_tree, tree_size
from pipeline.format import manifest as fmt
from pipeline.format import members, remote
from pipeline.format.encodings import encoding_from_spec
from pipeline.format.shards import mismatch, shard_name


def _label(spec: dict[str, Any]) -> str:
    try:
        return encoding_from_spec(spec).label()
    except CacheError:
        return "?"


def _spec(d: Path) -> dict[str, Any]:
    """spec.json, written before the first shard; empty if a cache directory has none yet."""
    return fmt.read_spec(d / "spec.json") if (d / "spec.json").is_file() else {}


def _status(d: Path) -> dict[str, Any]:
    try:
        return _read_status(d)
    except CacheError:  # one damaged cache does not hide the others; inspect says what is wrong
        return {"id": d.name, "status": "damaged (inspect it)", "rows": 0, "encoding": "?", "backend": "?",
                "bytes": 0, "bytes_per_row": None, "configs": []}


def _read_status(d: Path) -> dict[str, Any]:
    manifest = fmt.read_manifest(d)
    configs = sorted(p.stem for p in (d / "configs").glob("*.yaml"))
    if manifest is not None and manifest.get("status") == "complete":
        gone = members.shard_problems(d, manifest, hash_them=False)["missing"]
        status = f"missing {len(gone)}/{len(members.cache_shards(d, manifest))} shards" if gone else "complete"
        if members.is_members(manifest) and not gone:
            status = f"complete, {manifest['members']}"
        return {"id": d.name, "status": status, "rows": manifest["rows"],
                "encoding": _label(manifest.get("spec", {})),
                "backend": manifest["backend"], "bytes": manifest["bytes"],
                "bytes_per_row": manifest["bytes_per_row"], "configs": configs}
    spec = _spec(d)
    layout = spec.get("layout", {})
    expected, rows = fmt.planned(spec) if spec else (0, 0)
    if spec.get("members"):  # its shards are named by their rows' digests, in member stores
        return {"id": d.name, "status": f"partial, {spec['members']}", "rows": rows, "encoding": _label(spec),
                "backend": layout.get("backend", "?"), "bytes": 0, "bytes_per_row": None, "configs": configs}
    backend = layout.get("backend", "zarr")
    present = [p for i in range(expected) if (p := d / "shards" / shard_name(i, backend)).exists()]
    return {"id": d.name, "status": f"partial {len(present)}/{expected} shards", "rows": rows,
            "encoding": _label(spec), "backend": layout.get("backend", "?"),
            "bytes": sum(tree_size(p) for p in present), "bytes_per_row": None, "configs": configs}


def _remote_status(url: str) -> dict[str, Any]:
    """A cache in object storage: complete once its manifest is there, else partly published."""
    fs, base = remote.filesystem(url)
    name = url.rsplit("/", 1)[-1]
    if not fs.exists(remote.join(base, "manifest.json")):
        return {"id": name, "status": "partly published", "rows": 0, "encoding": "?", "backend": "?", "bytes": 0,
                "bytes_per_row": None, "configs": []}
    try:
        m = remote.remote_manifest(url)
    except CacheError:
        return {"id": name, "status": "damaged (inspect it)", "rows": 0, "encoding": "?", "backend": "?",
                "bytes": 0, "bytes_per_row": None, "configs": []}
    configs = [p.rsplit("/", 1)[-1].removesuffix(".yaml") for p in fs.glob(remote.join(base, "configs", "*.yaml"))]
    return {"id": name, "status": "complete", "rows": m["rows"], "encoding": _label(m.get("spec", {})),
            "backend": m["backend"], "bytes": m["bytes"], "bytes_per_row": m["bytes_per_row"],
            "configs": sorted(configs)}


def list_caches(root: Path | str) -> str:
    if remote.is_url(root):
        fs, base = remote.filesystem(str(root))
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)) if fs.exists(base) else []
        statuses = [_remote_status(remote.join(str(root), n)) for n in names if not n.startswith(".")]
    else:
        dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                      and d.name != members.STORES) if root.is_dir() else []  # member stores are no caches
        statuses = [_status(d) for d in dirs]
    if not statuses:
        return f"no caches under {root}"
    head = f"{'id':<17} {'status':<22} {'rows':>8} {'encoding':<18} {'backend':<8} {'bytes':>10} {'B/row':>7}  configs"
    lines = [head]
    for s in statuses:
        bpr = f"{s['bytes_per_row']:.1f}" if s["bytes_per_row"] is not None else "-"
        lines.append(f"{s['id']:<17} {s['status']:<22} {s['rows']:>8} {s['encoding']:<18} {s['backend']:<8} "
                     f"{s['bytes']:>10} {bpr:>7}  {', '.join(s['configs'])}")
    return "\n".join(lines)


def inspect_cache(ref: str, root: Path | str, verify: bool) -> dict[str, Any]:
    if remote.is_url(ref) or remote.is_url(root):
        url = remote.resolve_remote(ref, str(root) if remote.is_url(root) else None)
        manifest = remote.remote_manifest(url)
        if not verify:
            return manifest
        bad = remote.verify_remote(url)
        if bad["missing"] or bad["corrupt"]:
            what = "; ".join(f"{kind} {', '.join(paths)}" for kind, paths in bad.items() if paths)
            raise CacheError(f"{url}: {what}; publish the cache again (`logitcache caches push`)")
        return {**manifest, "verified": True}
    d = fmt.resolve(ref, root)
    manifest = fmt.read_manifest(d)
    if manifest is not None and manifest.get("status") == "complete":
        bad = members.shard_problems(d, manifest, hash_them=verify)
        if verify and bad["corrupt"] and not bad["missing"] and not members.is_members(manifest):
            listed = {e["path"]: e["sha256"] for e in manifest["shards"]}
            first = bad["corrupt"][0]
            more = f" ({len(bad['corrupt'])} shards differ: {', '.join(bad['corrupt'])})" if len(bad["corrupt"]) > 1 else ""
            raise CacheError(mismatch(d / first, listed[first], sha256_tree(d / first)[0]) + more)
        if verify and (bad["missing"] or bad["corrupt"]):
            what = "; ".join(f"{kind} {', '.join(paths)}" for kind, paths in bad.items() if paths)
            raise CacheError(f"{d}: {what}; rerun `logitcache cache CONFIG` to recompute the missing shards")
        if bad["missing"]:
            return {**manifest, "status": "damaged", "shards_missing": bad["missing"]}
        return {**manifest, "verified": True} if verify else manifest
    spec = _spec(d)
    layout = spec.get("layout", {})
    n = fmt.planned(spec)[0] if spec else 0
    if spec.get("members"):  # what the stage found in the member stores when it planned this cache
        reuse = d / "reuse.json"
        return {"status": "partial", "cache_id": d.name, "shards_expected": n, "spec": spec,
                "reuse": read_json(reuse, CacheError, f"delete {reuse}") if reuse.is_file() else None}
    names = [shard_name(i, layout.get("backend", "zarr")) for i in range(n)]
    missing = [name for name in names if not (d / "shards" / name).exists()]
    return {"status": "partial", "cache_id": d.name, "shards_expected": n, "shards_missing": missing, "spec": spec}

