"""Atomic writes and content hashes: a file is either fully there or absent."""

from __future__ import annotations

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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def publish_dir(tmp: Path, final: Path) -> bool:
    """Rename a finished directory into place. False if another writer got there first.

    Two writers of the same shard produce identical bytes, so losing the race loses nothing.
    """
    try:
        os.replace(tmp, final)
        return True
    except OSError:
        if final.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: Path) -> tuple[str, int]:
    """Hash of a file, or of a directory's relative paths and contents; plus total bytes."""
    if path.is_file():
        return sha256_file(path), path.stat().st_size
    h = hashlib.sha256()
    total = 0
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        h.update(rel.encode() + b"\0" + sha256_file(f).encode() + b"\n")
        total += f.stat().st_size
    return h.hexdigest(), total


def hash_json(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())
