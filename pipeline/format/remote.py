"""Caches in object storage (s3://, gs://, az://, or any fsspec URL): published shard by shard,
read through a bounded local shard cache.

Publishing (`push`, and the cache stage with cache.root a URL): a cache is uploaded to
<root>/<cache_id>/ shard by shard. A writer claims a shard with a conditional put (create only;
S3's If-None-Match) of claims/<shard>.json, uploads its objects, then its digest sidecar, which
says the shard is whole; spec.json and the configs follow, manifest.json last. A kill -9 mid-upload
leaves no manifest, so no reader takes the cache as complete, and a rerun uploads what is missing
(taking over the dead writer's claim). Every reader checks a shard's sha256 as it downloads it.

Reading (`open_reader`): the manifest is fetched, then each shard the first time it is needed,
into a local shard cache (LOGITCACHE_SHARD_CACHE, default ~/.cache/logitcache/shards, at most
LOGITCACHE_SHARD_CACHE_BYTES, default 20 GB): downloaded to a temporary name, checked against the
manifest's sha256, then published. The least recently used shards are evicted to stay under the
limit; a shard read in the last minute is kept (another process may be reading it). Credentials
and endpoints come from the environment as the store's own tools read them (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, ...; s3fs for s3://, gcsfs for gs://, adlfs for az://).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline.core.errors import CacheError
from pipeline.core.io import (
    OWNER,
    atomic_write_bytes,
    dead_here,
    is_url,
    process_start_time,
    publish_dir,
    publish_file,
    record_tree_digest,
    remove_dead_tmp,
    tmp_name,
)
from pipeline.core.progress import log
from pipeline.core.validate import env
from pipeline.format.manifest import READABLE_VERSIONS
from pipeline.format.shards import record_of


def local_path(ref: str | Path) -> Path:
    text = os.fspath(ref)
    return Path(text[len("file://"):]) if text.startswith("file://") else Path(text)


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of `url`; a missing driver is one CacheError naming it."""
    try:
        from fsspec.core import url_to_fs

        return url_to_fs(url, use_listings_cache=False)  # other processes write here too
    except ImportError as e:
        raise CacheError(f"{url}: reading it needs {e.name or 'its fsspec driver'} (pip install "
                         "'logitcache[s3]' for s3://, gcsfs for gs://, adlfs for az://)") from None
    except ValueError as e:
        raise CacheError(f"{url}: not a storage URL fsspec knows ({e})") from None


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


# ---------------------------------------------------------------------------------------------
# Publishing


def push(cache_dir: Path, root_url: str) -> str:
    """Upload the complete cache at `cache_dir` to <root_url>/<cache id>; its URL. Objects already
    there are kept; manifest.json goes last."""
    from pipeline.format.manifest import read_manifest

    manifest = read_manifest(cache_dir)
    if manifest is None or manifest.get("status") != "complete":
        raise CacheError(f"{cache_dir}: only a complete cache is published; rerun `logitcache cache CONFIG` "
                         "to finish it")
    if manifest.get("units"):
        raise CacheError(f"{cache_dir}: a cache of per-member targets reads shared member stores of its local "
                         "cache root and is not published; publish a cache made with cache.members combined")
    url = join(root_url, cache_dir.name)
    if complete(url):
        return url
    names = [e["path"].rsplit("/", 1)[-1] for e in manifest["shards"]]
    done = published(url)
    for name in names:
        if name not in done:
            publish_shard(cache_dir, name, url)
    busy = sorted(set(names) - published(url))
    if busy:
        raise CacheError(f"{url}: another writer is publishing {len(busy)} of its shards ({busy[0]}, ...); rerun "
                         "`logitcache caches push` once it has finished")
    publish_manifest(cache_dir, url, manifest)
    return url


def publish_shard(cache_dir: Path, name: str, url: str) -> bool:
    """Upload shard `name` (every object of it), then its digest sidecar, which says in the store
    that the shard is there whole. False if the shard is already there or another live writer is
    uploading it.

    A writer first claims the shard (a create-only put of claims/<name>.json, renewed every quarter
    lease while it uploads); only the claimer uploads, so the objects of a shard never mix two
    writers' bytes (two machines whose teachers' numerics differ). A claim not renewed for a lease
    (LOGITCACHE_LOCK_LEASE) is taken over, and the taker overwrites what the dead claimer left."""
    from pipeline.core.lock import lease_seconds

    if is_published(url, name):
        return False
    fs, base = filesystem(url)
    claim, lease, token = join(base, "claims", f"{name}.json"), lease_seconds(), uuid.uuid4().hex

    def body() -> bytes:
        return json.dumps({"token": token, "writer": OWNER, "pid": os.getpid(),
                           "started": process_start_time(os.getpid()), "time": time.time()}).encode()

    def ours() -> bool:
        try:
            return bool(json.loads(fs.cat_file(claim)).get("token") == token)
        except (FileNotFoundError, ValueError):
            return False

    if not _claim(fs, claim, body(), lease):
        return False
    try:
        shard = cache_dir / "shards" / name
        files = [shard] if shard.is_file() else sorted(p for p in shard.rglob("*") if p.is_file())
        renewed = time.monotonic()
        for p in files:
            _put(fs, p, join(base, p.relative_to(cache_dir).as_posix()), replace=True)  # claimed: ours to overwrite
            if time.monotonic() - renewed > lease / 4:
                if not ours():
                    raise CacheError(f"{join(url, 'shards', name)}: another writer took over the upload after this "
                                     "one stalled for a lease; rerun to check the store")
                fs.pipe_file(claim, body())
                renewed = time.monotonic()
        if not ours():  # taken over while this one stalled: the taker publishes it
            return False
        _put(fs, cache_dir / "digests" / f"{name}.json", join(base, "digests", f"{name}.json"))
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            if ours():
                fs.rm_file(claim)


def _claim(fs: Any, claim: str, body: bytes, lease: float) -> bool:
    """Create the claim object, or take over one that was not renewed for a lease; False if a live
    writer holds it."""
    for _ in range(3):
        try:
            with fs.open(claim, "xb") as f:
                f.write(body)
            return True
        except FileExistsError:
            try:
                if _age(fs, claim) < lease and not _dead_here(fs, claim):
                    return False
                fs.rm_file(claim)  # stale: its writer died; the next create-only put decides the taker
            except FileNotFoundError:
                pass
    return False


def _dead_here(fs: Any, claim: str) -> bool:
    """Whether the claim's writer is a dead process of this host's pid namespace (no need to wait a lease)."""
    try:
        held = json.loads(fs.cat_file(claim))
        return dead_here(held["writer"], held["pid"], held.get("started"))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return False


def _age(fs: Any, path: str) -> float:
    """Seconds since the claim at `path` was last written: by the store's clock where it says, else
    by the time its writer put in it."""
    import datetime

    info = fs.info(path)
    when = info.get("LastModified") or info.get("last_modified") or info.get("mtime")
    if isinstance(when, datetime.datetime):
        now = datetime.datetime.now(when.tzinfo or datetime.timezone.utc)
        return (now - when).total_seconds()
    if isinstance(when, (int, float)):
        return time.time() - float(when)
    try:
        return time.time() - float(json.loads(fs.cat_file(path))["time"])
    except (ValueError, KeyError, TypeError):
        return float("inf")  # unreadable: its writer died mid-put


def is_published(url: str, name: str) -> bool:
    """Whether shard `name` is whole in the store (its sidecar is): one request."""
    fs, base = filesystem(url)
    return bool(fs.exists(join(base, "digests", f"{name}.json")))


def published(url: str) -> set[str]:
    """Names of the shards whose every object is in the store (their sidecars are)."""
    fs, base = filesystem(url)
    side = join(base, "digests")
    try:
        return {p.rsplit("/", 1)[-1].removesuffix(".json") for p in fs.ls(side, detail=False) if p.endswith(".json")}
    except FileNotFoundError:
        return set()


def published_entry(url: str, index: int, name: str, first_row: int, rows: int) -> dict[str, Any]:
    """A shard's manifest entry from the record its writer published; one whose seal does not hold
    (edited or damaged) is not trusted: the shard is hashed where it lies."""
    record = record_of(name, read_remote_json(join(url, "digests", f"{name}.json")))
    if record is None:
        fs, base = filesystem(url)
        log(f"{join(url, 'digests', name)}.json: the record was edited or damaged (its seal does not hold); "
            "hashing the shard where it lies")
        record = remote_tree_digest(fs, join(base, "shards", name))
    return {"index": index, "path": f"shards/{name}", "first_row": first_row, "rows": rows,
            "sha256": record[0], "bytes": record[1]}


def publish_manifest(cache_dir: Path, url: str, manifest: dict[str, Any]) -> None:
    """spec.json, the teacher vocabulary of a cache of text (vocab.json) and the configs that made or
    used the cache, then manifest.json: the cache is complete in the store from then on."""
    fs, base = filesystem(url)
    for p in [cache_dir / "spec.json", cache_dir / "vocab.json", *sorted((cache_dir / "configs").glob("*.yaml"))]:
        if p.is_file():
            _put(fs, p, join(base, p.relative_to(cache_dir).as_posix()))
    try:
        with fs.open(join(base, "manifest.json"), "xb") as f:
            f.write((json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    except FileExistsError:
        pass


def complete(url: str) -> bool:
    fs, base = filesystem(url)
    return bool(fs.exists(join(base, "manifest.json")))


def _put(fs: Any, local: Path, remote: str, replace: bool = False) -> None:
    """Upload `local` to `remote`: created only if absent (a conditional put where the store has
    them), or with `replace` over whatever is there."""
    if replace:
        fs.put_file(os.fspath(local), remote)
        return
    try:
        with open(local, "rb") as src, fs.open(remote, "xb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    except FileExistsError:
        pass
    except NotImplementedError:  # a store without conditional puts: check, then put (a narrow race)
        if not fs.exists(remote):
            fs.put_file(os.fspath(local), remote)


# ---------------------------------------------------------------------------------------------
# Reading


def read_remote_json(url: str) -> Any:
    fs, path = filesystem(url)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        raise CacheError(f"{url}: no such object") from None
    except ValueError:
        raise CacheError(f"{url}: not valid JSON; the cache is damaged, publish it again") from None


def remote_manifest(url: str) -> dict[str, Any]:
    """The manifest of the cache at `url`, which must be complete and of a readable version."""
    if not complete(url):
        raise CacheError(f"{url}: cache is incomplete (no manifest.json); finish publishing it "
                         "(`logitcache caches push`, or rerun `logitcache cache CONFIG`)")
    manifest = read_remote_json(join(url, "manifest.json"))
    if not isinstance(manifest, dict) or manifest.get("status") != "complete":
        raise CacheError(f"{url}/manifest.json: not a complete cache manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise CacheError(f"{url}: cache format {manifest.get('format_version')} is not one of {READABLE_VERSIONS}; "
                         "rebuild it with this version of logitcache")
    return manifest


def remote_tree_digest(fs: Any, path: str) -> tuple[str, int]:
    """`sha256_tree` of an object or of every object under a prefix, streamed from the store."""
    def digest(obj: str) -> str:
        h = hashlib.sha256()
        with fs.open(obj, "rb", block_size=1 << 22) as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        return h.hexdigest()

    if fs.isfile(path):
        return digest(path), int(fs.size(path))
    h, total = hashlib.sha256(), 0
    for obj, info in sorted(fs.find(path, detail=True).items()):
        rel = obj[len(path.rstrip("/")) + 1:]
        h.update(rel.encode() + b"\0" + digest(obj).encode() + b"\n")
        total += int(info["size"])
    return h.hexdigest(), total


def verify_remote(url: str) -> dict[str, list[str]]:
    """Every shard of the cache at `url` hashed where it lies: {"missing": [...], "corrupt": [...]}."""
    manifest = remote_manifest(url)
    fs, base = filesystem(url)
    bad: dict[str, list[str]] = {"missing": [], "corrupt": []}
    for e in manifest["shards"]:
        path = join(base, e["path"])
        if not fs.exists(path):
            bad["missing"].append(e["path"])
        elif remote_tree_digest(fs, path)[0] != e["sha256"]:
            bad["corrupt"].append(e["path"])
    return bad


def shard_cache_dir() -> Path:
    return env("LOGITCACHE_SHARD_CACHE") or (env("XDG_CACHE_HOME") or Path.home() / ".cache") / "logitcache" / "shards"


def shard_cache_limit() -> int:
    return int(env("LOGITCACHE_SHARD_CACHE_BYTES"))


class ShardCache:
    """Local copies of a remote cache's shards under <dir>/<cache id>/, verified on download and
    kept under `limit` bytes across every cache in <dir> (least recently used evicted first)."""

    RECENT_S = 60.0  # a shard used this recently is never evicted

    def __init__(self, url: str, manifest: dict[str, Any], directory: Path | None = None,
                 limit: int | None = None) -> None:
        self.url, self.manifest = url, manifest
        self.root = directory if directory is not None else shard_cache_dir()
        self.limit = limit if limit is not None else shard_cache_limit()
        self.dir = self.root / url.rstrip("/").rsplit("/", 1)[-1]
        self.fs, self.base = filesystem(url)
        self._lock = threading.Lock()
        self._pinned: set[Path] = set()  # shards a read of this process is using: never evicted
        self.downloads = 0
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest_file = self.dir / "manifest.json"
        if not manifest_file.is_file() or json.loads(manifest_file.read_text()) != manifest:
            atomic_write_bytes(manifest_file, json.dumps(manifest, indent=2, sort_keys=True).encode())

    def fetch(self, i: int) -> bool:
        """Shard i on the local disk, marked used; True if it was just downloaded (and so checked)."""
        e = self.manifest["shards"][i]
        local = self.dir / e["path"]
        with self._lock:
            self._pinned.add(local)
            fresh = not local.exists()
            if fresh:
                self._download(e, local)
            os.utime(local)  # most recently used
        return fresh

    def release(self) -> None:
        """Unpin every shard: the read that used them is done."""
        with self._lock:
            self._pinned.clear()

    def _download(self, e: dict[str, Any], local: Path) -> None:
        from pipeline.core.io import sha256_tree

        local.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_tmp(local.parent)
        self._make_room(int(e["bytes"]))
        remote = join(self.base, e["path"])
        tmp = tmp_name(local)
        try:
            if self.fs.isdir(remote):
                self.fs.get(remote.rstrip("/") + "/", os.fspath(tmp), recursive=True)
            else:
                self.fs.get_file(remote, os.fspath(tmp))
        except FileNotFoundError:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            raise CacheError(f"{join(self.url, e['path'])}: shard listed in the manifest is missing from the store; "
                             "publish the cache again") from None
        try:
            if sha256_tree(tmp)[0] != e["sha256"]:
                raise CacheError(f"{join(self.url, e['path'])}: checksum mismatch after download, the stored shard "
                                 "is corrupt; delete it from the store and publish the cache again")
            (publish_dir if tmp.is_dir() else publish_file)(tmp, local)
            record_tree_digest(local, e["sha256"])  # checked just now: later readers on this machine only stat it
        finally:
            if tmp.exists():
                shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        self.downloads += 1

    def _make_room(self, need: int) -> None:
        """Evict least recently used shards of every cache here until `need` more bytes fit: one stat
        per shard, sizes from each cache's manifest. Other processes share the directory and evict
        too: a shard gone meanwhile is simply skipped."""
        found: dict[Path, tuple[float, int]] = {}
        for d in self.root.iterdir():
            try:
                shards = json.loads((d / "manifest.json").read_text())["shards"]
            except (OSError, ValueError, KeyError, TypeError):  # not a cache copy (or being written)
                continue
            for e in shards:
                with contextlib.suppress(OSError, KeyError, TypeError):
                    found[d / e["path"]] = ((d / e["path"]).stat().st_mtime, int(e["bytes"]))
        total = sum(size for _, size in found.values())
        for p in sorted(found, key=lambda q: found[q][0]):
            if total + need <= self.limit:
                break
            # in use here, or recently by another process: over the limit rather than pull it from a reader
            if p in self._pinned or time.time() - found[p][0] < self.RECENT_S:
                continue
            aside = tmp_name(p)
            try:
                if time.time() - p.stat().st_mtime < self.RECENT_S:  # touched by a reader since it was listed
                    continue
                os.rename(p, aside)  # atomic: a reader finds the whole shard or none of it, never part
            except FileNotFoundError:  # evicted by another process meanwhile
                total -= found[p][1]
                continue
            shutil.rmtree(aside, ignore_errors=True) if aside.is_dir() else aside.unlink(missing_ok=True)
            total -= found[p][1]


def open_reader(ref: str | Path, verify: bool = False, units: Any = None, **kw: Any) -> Any:
    """A CacheReader of a local cache directory or of a cache URL (through a ShardCache); a local
    cache of per-member targets is read as pipeline/format/members.py says (`units`: which members)."""
    from pipeline.format.members import open_local
    from pipeline.format.reader import CacheReader

    if not is_url(ref):
        return open_local(local_path(ref), verify=verify, units=units, **kw)
    url = os.fspath(ref).rstrip("/")
    manifest = remote_manifest(url)
    if units is not None or manifest.get("units"):
        raise CacheError(f"{url}: caches of per-member targets are read from a local cache root; publish "
                         "combined caches to object storage")
    shards = ShardCache(url, manifest)
    return CacheReader(shards.dir, verify=verify, remote=shards, **kw)


def resolve_remote(ref: str, root_url: str | None) -> str:
    """A cache URL from a URL, or from an id or unique id prefix under the root URL `root_url`."""
    if is_url(ref):
        return ref.rstrip("/")
    if root_url is None or "/" in ref:
        raise CacheError(f"cache {ref}: give a cache URL, or an id under a root URL")
    fs, root = filesystem(root_url)
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) if fs.exists(root) else []
    matches = [n for n in names if n == ref] or [n for n in names if n.startswith(ref)]
    if len(matches) == 1:
        return join(root_url, matches[0])
    if len(matches) > 1:
        raise CacheError(f"cache {ref!r} matches {len(matches)} caches under {root_url}; give more of the id")
    raise CacheError(f"cache {ref!r}: no such cache under {root_url}; list caches with `logitcache caches ls`")


# ---------------------------------------------------------------------------------------------
# Inputs


def input_cache_dir() -> Path:
    """Local copies of inputs given as URLs: beside the shard cache (LOGITCACHE_SHARD_CACHE/../inputs)."""
    return shard_cache_dir().parent / "inputs"


def fetch_input(url: str, key: str, what: str) -> Path:
    """A local copy of the input object at `url`, downloaded again only when the object changed (its
    size, ETag or modification time): every stage maps and hashes the local copy as it would a local
    file, so the cache id is the same as for that file. No size limit: an input is what a run needs."""
    from pipeline.core.errors import DataError

    fs, path = filesystem(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise DataError(f"{key}: {url} does not exist; give {what}") from None
    if info.get("type") != "file":
        raise DataError(f"{key}: {url} is not an object (a prefix?); give {what} (a Zarr group or a directory of "
                        ".npy arrays is read from a local path only)")
    version = {"url": url, "size": info.get("size"),
               "version": str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified"))}
    home = input_cache_dir() / hashlib.sha256(url.encode()).hexdigest()[:16]
    local, stamp = home / path.rstrip("/").rsplit("/", 1)[-1], home / ".source.json"
    try:
        if local.is_file() and json.loads(stamp.read_text()) == version and local.stat().st_size == version["size"]:
            return local
    except (OSError, ValueError):
        pass
    home.mkdir(parents=True, exist_ok=True)
    remove_dead_tmp(home)
    tmp = tmp_name(local)
    try:
        fs.get_file(path, os.fspath(tmp))
        if tmp.stat().st_size != version["size"]:
            raise DataError(f"{key}: {url} changed while it was downloaded; rerun")
        os.replace(tmp, local)  # a reader of the old copy keeps its file until it closes it
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_bytes(stamp, json.dumps(version).encode())
    return local
