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
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.core.validate import env

HOST = socket.gethostname().replace("-", "_")


def _pid_namespace() -> str:
    """This process's pid namespace: containers that share a hostname have their own, so a pid
    means the same process only within one (host, namespace)."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


OWNER = f"{HOST}.{_pid_namespace()}"  # whose process table a temp name's pid belongs to


def process_start_time(pid: int) -> str:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22), so a pid reused
    by a later process is not taken for the writer; "" where /proc does not say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


_PROCS: dict[int, str] = {}  # by pid: a forked child is another writer


def tmp_name(path: Path) -> Path:
    """A unique temporary sibling of `path`; names starting with '.tmp-' are never read as data. The
    name says which process wrote it: (host, pid namespace) and (pid, start time)."""
    pid = os.getpid()
    if pid not in _PROCS:
        _PROCS[pid] = f"{pid}.{process_start_time(pid)}"
    return path.with_name(f".tmp-{path.name}-{OWNER}-{_PROCS[pid]}-{uuid.uuid4().hex[:8]}")


def is_url(ref: str | Path) -> bool:
    """A URL of an object store (anything with a scheme but file://): pipeline/format/remote.py."""
    text = os.fspath(ref)
    return "://" in text and not text.startswith("file://")


def tmp_grace() -> float:
    """Seconds after its last change a temporary entry of a writer this host cannot check (another
    host or container) is taken for dead: LOGITCACHE_TMP_GRACE, default an hour."""
    return float(env("LOGITCACHE_TMP_GRACE"))


def remove_dead_tmp(directory: Path, recursive: bool = False) -> int:
    """Remove '.tmp-' entries left by dead writers (under every subdirectory too with `recursive`).

    A writer in this host's pid namespace is asked directly: its pid must be running and have
    started when the name says. One on another host or in another container (a shared filesystem;
    containers often share a hostname) cannot be asked, so its entry is removed only once nothing in
    it changed for tmp_grace() seconds."""
    removed, grace = 0, None
    found = directory.rglob(".tmp-*") if recursive else directory.glob(".tmp-*")
    for p in sorted(found, key=lambda q: len(q.parts)):
        if not p.exists() and not p.is_symlink():  # inside one removed before
            continue
        parts = p.name.rsplit("-", 3)
        pid, _, started = parts[2].partition(".") if len(parts) == 4 else ("", "", "")
        if len(parts) == 4 and parts[1] == OWNER and pid.isdigit():
            if process_alive(int(pid), started):
                continue
        else:
            grace = tmp_grace() if grace is None else grace
            if time.time() - _last_change(p) < grace:
                continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        removed += 1
    return removed


def _last_change(path: Path) -> float:
    """The newest mtime of a file, or of a directory and everything in it."""
    try:
        newest = path.lstat().st_mtime
        if path.is_dir() and not path.is_symlink():
            for top, dirs, files in os.walk(path):
                for name in dirs + files:
                    newest = max(newest, os.lstat(os.path.join(top, name)).st_mtime)
        return newest
    except OSError:
        return time.time()  # changing under us: someone is writing it


def dead_here(owner: str, pid: Any, started: Any = "") -> bool:
    """Whether a lock or claim taken by process `pid` of `owner` (host and pid namespace, OWNER of
    the taker) is held by a dead process this host can see: no need to wait out its lease."""
    return owner == OWNER and not process_alive(int(pid), str(started or ""))


def process_alive(pid: int, started: str = "") -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not started or process_start_time(pid) in ("", started)


def out_of_handles(err: BaseException) -> str | None:
    """What an error says when it means this process or the system ran out of file handles, else
    None: not a damaged file, and not fixed by recomputing one."""
    code = getattr(err, "errno", None)
    text = str(err)
    if code == errno.EMFILE or "Too many open files" in text and "system" not in text:
        try:
            import resource

            limit = f" (the limit is {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}, `ulimit -n`)"
        except (ImportError, OSError, ValueError):
            limit = ""
        return f"this process has too many open files (EMFILE){limit}"
    if code == errno.ENFILE or "Too many open files in system" in text:
        return "the system's table of open files is full (ENFILE)"
    return None


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
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, an interrupt: nothing half-written is left behind
        tmp.unlink(missing_ok=True)
        raise
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
# file's stamp (size, mtime_ns, inode, ctime_ns) is unchanged, so a memo never outlives the file it
# was made from: `cp -p` or a restored mtime still moves ctime, which no user call can set. The
# store is one SQLite file per machine on a local disk (digest_db), each row sealed by a checksum;
# a store that fails is reported once and the digest computed, never guessed.

_DB_LOCK = threading.Lock()
_WARNED: set[str] = set()
RACY_NS = 2_000_000_000  # a file changed this recently is not remembered: a rewrite in the same tick could go unseen
# filesystems whose POSIX locks SQLite cannot rely on, and which several machines may share
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
                       "fuse.glusterfs", "9p", "afs", "panfs", "wekafs", "orangefs", "fuse.sshfs", "fuse.s3fs",
                       "fuse.gcsfuse", "fuse.juicefs", "fuse.cephfs", "fuse.lustre"}


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        print(f"logitcache: {message}", file=sys.stderr, flush=True)


def mount_type(path: Path) -> str:
    """The filesystem type of the mount holding `path` (its nearest existing ancestor), from
    /proc/mounts; "" where that cannot be read."""
    try:
        existing = next(p for p in [path, *path.parents] if p.exists())
        real = os.path.realpath(existing)
        with open("/proc/mounts") as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) >= 3]
    except (OSError, StopIteration):
        return ""
    best, kind = "", ""
    for point, fstype in mounts:
        point = point.replace("\\040", " ")
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, fstype
    return kind


def digest_db() -> Path:
    """LOGITCACHE_DIGESTS, else ~/.cache/logitcache/digests.sqlite (XDG_CACHE_HOME respected) where
    that is a local disk, else /var/tmp/logitcache-<uid>/digests.sqlite: a home directory on NFS or
    Lustre is one file for every node of a cluster, and SQLite's locks there are unreliable."""
    db = env("LOGITCACHE_DIGESTS")
    if db is not None:
        if mount_type(db.parent) in NETWORK_FILESYSTEMS:
            _warn_once("network", f"LOGITCACHE_DIGESTS={db} is on a {mount_type(db.parent)} filesystem, where "
                                  "SQLite's locks are unreliable; point it at a node-local disk")
        return db
    db = (env("XDG_CACHE_HOME") or Path.home() / ".cache") / "logitcache" / "digests.sqlite"
    if mount_type(db.parent) in NETWORK_FILESYSTEMS:
        return Path("/var/tmp") / f"logitcache-{os.getuid() if hasattr(os, 'getuid') else 0}" / "digests.sqlite"
    return db


def _stamp(path: str | Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


def _seal(*fields: Any) -> str:
    return hash_json([str(f) for f in fields])[:16]


def _connect() -> sqlite3.Connection | None:
    db = digest_db()
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(db, timeout=30, isolation_level=None)
        con.execute("CREATE TABLE IF NOT EXISTS memo (path TEXT, what TEXT, size INTEGER, mtime_ns INTEGER, "
                    "inode INTEGER, ctime_ns INTEGER, digest TEXT, seal TEXT, PRIMARY KEY (path, what))")
        return con
    except (OSError, sqlite3.Error) as e:
        _store_failed(db, e)
        return None


def _store_failed(db: Path, e: Exception) -> None:
    _warn_once("store", f"{db}: the digest memo cannot be used ({type(e).__name__}: {e}); digests are computed "
                        "each time, which is slow for large inputs. Set LOGITCACHE_DIGESTS to a writable file "
                        "on a local disk")


def remembered(files: list[Path] | list[str], what: str, compute: Callable[[], str], written_here: bool = False,
               resolved: bool = False) -> str:
    """`compute()`, remembered under `what` while every file in `files` keeps its size, mtime, inode
    and ctime. `what` names the value (e.g. "sha256", or a fingerprint of selected rows).
    `written_here`: this process has just written the files and checked the value, so their
    freshness proves nothing against it (the shard cache's downloads). `resolved`: the files'
    directories are real paths already (a walk of a resolved root), so none is resolved again."""
    names = [os.fspath(f) for f in files]
    if resolved:
        key_path = "\0".join(names)
    else:
        parents: dict[str, str] = {}  # a tree's files share a few directories: resolve each once
        for f in names:
            parent = os.path.dirname(f)
            if parent not in parents:
                parents[parent] = os.path.realpath(parent)
        key_path = "\0".join(os.path.join(parents[os.path.dirname(f)], os.path.basename(f)) for f in names)
    stamps = [_stamp(f) for f in names]
    if any(s[2] == 0 or s[3] == 0 for s in stamps):  # a filesystem without inodes or ctimes: cannot tell
        return compute()
    stamp = stamps[0] if len(files) == 1 else (sum(s[0] for s in stamps), *(hash_json([s[i] for s in stamps])
                                                                          for i in (1, 2, 3)))
    with _DB_LOCK:
        con = _connect()
        if con is not None:
            row = None
            try:
                row = con.execute("SELECT size, mtime_ns, inode, ctime_ns, digest, seal FROM memo WHERE path = ? AND "
                                  "what = ?", (key_path, what)).fetchone()
            except sqlite3.Error as e:
                _store_failed(digest_db(), e)
            finally:
                con.close()
            if row is not None and row[5] != _seal(key_path, what, *row[:5]):
                _warn_once("seal", f"{digest_db()}: a remembered digest does not match its seal; it is ignored "
                                   "and recomputed (delete the file if this repeats)")
            elif row is not None and tuple(row[:4]) == tuple(stamp):
                return str(row[4])
    value = compute()
    # not remembered if a file changed while being read, or so recently that a rewrite within the
    # same mtime tick could go unseen (git's "racy clean" problem)
    now = time.time_ns()
    if [_stamp(f) for f in names] != stamps or not written_here and any(now - max(s[1], s[3]) < RACY_NS
                                                                         for s in stamps):
        return value
    with _DB_LOCK:
        con = _connect()
        if con is not None:
            try:
                con.execute("INSERT OR REPLACE INTO memo VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (key_path, what, *stamp, value, _seal(key_path, what, *stamp, value)))
            except sqlite3.Error as e:
                _store_failed(digest_db(), e)
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
    return remembered(_tree_files(path), "sha256-tree", lambda: sha256_tree(path)[0], resolved=True)


def _tree_files(path: Path) -> list[str]:
    """Every file under directory `path`, sorted, walked from its real path: the walk never enters a
    linked directory, so each file's directory is a real path and needs no resolving (resolving each
    of a Zarr shard's hundreds of chunk directories, a stat per path component, cost more than the
    walk)."""
    root = os.path.realpath(path)
    return sorted(os.path.join(top, f) for top, _dirs, names in os.walk(root) for f in names)


def record_tree_digest(path: Path, digest: str) -> None:
    """Remember `digest` as `whole_tree_digest(path)`: for a file or directory this process has just
    written and checked against it."""
    path = Path(path)
    if path.is_file():
        remembered([path], "sha256", lambda: digest, written_here=True)
    else:
        remembered(_tree_files(path), "sha256-tree", lambda: digest, written_here=True, resolved=True)


def hash_json(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())

