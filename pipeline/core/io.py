"""Atomic, durable writes and content hashes: a file is either fully there or absent.

Every publish is fsynced: the data before its rename, the directory entry after it, so a power loss
never leaves a name pointing at truncated bytes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

HOST = socket.gethostname().replace("-", "_")


def tmp_name(path: Path) -> Path:
    """A unique temporary sibling of `path`; names starting with '.tmp-' are never read as data."""
    return path.with_name(f".tmp-{path.name}-{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_dead_tmp(directory: Path) -> int:
    """Remove '.tmp-' entries left by dead writers on this host; a live writer's are kept."""
    removed = 0
    for p in directory.glob(".tmp-*"):
        parts = p.name.rsplit("-", 3)
        if len(parts) != 4 or parts[1] != HOST or not parts[2].isdigit() or _alive(int(parts[2])):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_writable(directory: Path, field: str) -> None:
    """Make sure `directory` is, or could be made as, a directory this process can write, before any
    work whose result would be lost; a ConfigError naming `field` otherwise. Creates nothing: the
    nearest existing ancestor must be a writable directory (probed with a file removed at once)."""
    from pipeline.core.errors import ConfigError

    existing = next((p for p in [directory, *directory.parents] if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise ConfigError(f"{field}: {existing} is a file, not a directory; choose another {field} or move that file")
    try:
        probe = tmp_name(existing / "probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{field}: cannot write to {existing} ({e.strerror}); choose a writable {field}") from None


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (files renamed into it, removed from it) survive a power loss."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def read_json(path: Path, error: type[Exception], fix: str) -> Any:
    """A JSON file's content; unreadable or not JSON is `error` in one line naming the file and `fix`."""
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as e:  # UnicodeDecodeError is a ValueError
        raise error(f"{path}: not valid JSON ({type(e).__name__}); {fix}") from None


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def publish_dir(tmp: Path, final: Path) -> bool:
    """Rename a finished directory into place, never over an existing one (rename(2) refuses a
    non-empty target). False, and `tmp` removed, if another writer got there first.

    Two writers of the same shard produce identical bytes, so losing the race loses nothing.
    """
    try:
        os.rename(tmp, final)
        return True
    except OSError:
        if final.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise


def publish_file(tmp: Path, final: Path) -> bool:
    """Link a finished file into place, never over an existing one (link(2) refuses an existing
    name; os.replace would not). False, and `tmp` removed, if another writer got there first."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        tmp.unlink()
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if final.exists():  # a filesystem without hard links: check, then rename (a narrow race)
            tmp.unlink()
            return False
        os.rename(tmp, final)
        return True
    tmp.unlink()
    return True


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def sha256_tree(path: Path, fsync: bool = False, digest: Callable[[Path], str] | None = None) -> tuple[str, int]:
    """Hash of a file, or of a directory's relative paths and contents; plus total bytes.

    With fsync, every file and directory is also flushed to disk as it is hashed: a writer seals a
    shard it has just written (still in the page cache) in one pass before publishing it. `digest`
    replaces the per-file sha256 (e.g. by one remembered per machine)."""
    if digest is None:
        def digest(f: Path) -> str:
            return sha256_file(f, fsync)
    if path.is_file():
        return digest(path), path.stat().st_size
    h = hashlib.sha256()
    total = 0
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        h.update(rel.encode() + b"\0" + digest(f).encode() + b"\n")
        total += f.stat().st_size
    if fsync:
        for d in sorted((p for p in path.rglob("*") if p.is_dir()), reverse=True):
            fsync_dir(d)
        fsync_dir(path)
    return h.hexdigest(), total


def tree_size(path: Path) -> int:
    """Bytes of a file, or of every file under a directory: stat only, nothing read."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------
# Digests remembered per machine: a 10 GB input or a multi-GB checkpoint directory is read once,
# not once per stage and Dask worker. An entry is keyed by (path, what) and valid only while the
# file's (size, mtime_ns, inode) are unchanged, so a memo never outlives the file it was made from.
# The store is one SQLite file (LOGITCACHE_DIGESTS, default ~/.cache/logitcache/digests.sqlite):
# atomic updates, safe for concurrent processes.

_DB_LOCK = threading.Lock()


def digest_db() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "logitcache" / "digests.sqlite"
    return Path(os.environ.get("LOGITCACHE_DIGESTS", default))


def _stamp(path: str | Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


def _connect() -> sqlite3.Connection | None:
    db = digest_db()
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(db, timeout=30, isolation_level=None)
        con.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT, what TEXT, size INTEGER, mtime_ns INTEGER, "
                    "inode INTEGER, digest TEXT, PRIMARY KEY (path, what))")
        return con
    except (OSError, sqlite3.Error):  # a read-only home: hash every time rather than fail
        return None


def remembered(files: list[Path] | list[str], what: str, compute: Callable[[], str]) -> str:
    """`compute()`, remembered under `what` while every file in `files` keeps its size, mtime and
    inode. `what` names the value (e.g. "sha256", or a fingerprint of selected rows)."""
    names = [os.fspath(f) for f in files]
    parents: dict[str, str] = {}  # a tree's files share a few directories: resolve each once
    for f in names:
        parent = os.path.dirname(f)
        if parent not in parents:
            parents[parent] = os.path.realpath(parent)
    key_path = "\0".join(os.path.join(parents[os.path.dirname(f)], os.path.basename(f)) for f in names)
    stamps = [_stamp(f) for f in names]
    size, mtime, inode = (sum(s[0] for s in stamps), hash_json([s[1] for s in stamps]),
                          hash_json([s[2] for s in stamps])) if len(files) != 1 else stamps[0]
    with _DB_LOCK:
        con = _connect()
        if con is not None:
            try:
                row = con.execute("SELECT size, mtime_ns, inode, digest FROM digests WHERE path = ? AND what = ?",
                                  (key_path, what)).fetchone()
            except sqlite3.Error:
                row = None
            finally:
                con.close()
            if row is not None and tuple(row[:3]) == (size, mtime, inode):
                return str(row[3])
    value = compute()
    # not remembered if a file changed while being read, or so recently that a rewrite within the
    # same mtime tick could go unseen (git's "racy clean" problem)
    if [_stamp(f) for f in names] != stamps or any(
            time.time_ns() - os.stat(f).st_mtime_ns < 2_000_000_000 for f in names):
        return value
    with _DB_LOCK:
        con = _connect()
        if con is not None:
            try:
                con.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?, ?)",
                            (key_path, what, size, mtime, inode, value))
            except sqlite3.Error:
                pass
            finally:
                con.close()
    return value


def file_digest(path: Path) -> str:
    """sha256 of a file, streamed in 1 MiB blocks and remembered per machine."""
    path = Path(path)
    return remembered([path], "sha256", lambda: sha256_file(path))


def tree_digest(path: Path) -> tuple[str, int]:
    """`sha256_tree` of a file or directory, each file's digest remembered per machine."""
    return sha256_tree(Path(path), digest=file_digest)


def whole_tree_digest(path: Path) -> str:
    """`sha256_tree`'s digest of a file or directory, remembered per machine as one entry keyed on
    every file of the tree: checking it again costs a walk and a stat per file, not a read."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    files = sorted(os.path.join(top, f) for top, _dirs, names in os.walk(path) for f in names)
    return remembered(files, "sha256-tree", lambda: sha256_tree(path)[0])


def hash_json(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())

