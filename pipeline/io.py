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
import uuid
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
    """Make sure `directory` is (or can be made) a directory this process can write, before any
    work whose result would be lost; a ConfigError naming `field` otherwise."""
    from pipeline.errors import ConfigError

    blocker = next((p for p in [directory, *directory.parents] if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ConfigError(f"{field}: {blocker} is a file, not a directory; choose another {field} or move that file")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = tmp_name(directory / "probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{field}: cannot write to {directory} ({e.strerror}); choose a writable {field}") from None


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


def sha256_tree(path: Path, fsync: bool = False) -> tuple[str, int]:
    """Hash of a file, or of a directory's relative paths and contents; plus total bytes.

    With fsync, every file and directory is also flushed to disk as it is hashed: a writer seals a
    shard it has just written (still in the page cache) in one pass before publishing it."""
    if path.is_file():
        return sha256_file(path, fsync), path.stat().st_size
    h = hashlib.sha256()
    total = 0
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        h.update(rel.encode() + b"\0" + sha256_file(f, fsync).encode() + b"\n")
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


def hash_json(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())
