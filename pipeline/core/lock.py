"""One builder, the others wait: a lease lock that works across processes, containers and the nodes
of a shared filesystem.

    with build_lock(root / f".lock-{name}", f"tokens {name}"):
        if (root / name).exists():   # built by another process while this one waited
            return root / name
        ...build into a temporary name and publish it...

The lock is a file created with O_EXCL, holding who took it. Its holder touches it every quarter
lease (a heartbeat thread), so a waiter knows a live holder from a dead one without asking a process
table it may not see (another node, another container): a lock not touched for a lease
(LOGITCACHE_LOCK_LEASE seconds, default 60) is stale and taken over, and one whose holder is a dead
process of this host's pid namespace is taken over at once. The lock only saves work: what it guards
is still published atomically and never replaced, so two builders (a holder frozen longer than a
lease) waste time but cannot corrupt anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.io import OWNER, dead_here, process_start_time
from pipeline.core.progress import log
from pipeline.core.validate import env


def lease_seconds() -> float:
    return float(env("LOGITCACHE_LOCK_LEASE"))


class LeaseLock:
    """The lock file `path`, held while building `what`: `acquire()` waits for it (or with
    wait=False returns False when a live process holds it); `release()` lets it go."""

    def __init__(self, path: Path, what: str, poll: float = 0.2) -> None:
        self.path, self.what, self.poll = path, what, poll
        self._stop: threading.Event | None = None
        self._beat: threading.Thread | None = None
        self._token = ""

    def acquire(self, wait: bool = True) -> bool:
        lease = lease_seconds()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        token = _acquire(self.path, self.what, lease, self.poll, wait)
        if token is None:
            return False
        self._token, self._stop = token, threading.Event()
        self._beat = threading.Thread(target=_heartbeat, args=(self.path, token, lease / 4, self._stop),
                                      daemon=True, name="logitcache-lock")
        self._beat.start()
        return True

    def release(self) -> None:
        if self._stop is None or self._beat is None:
            return
        self._stop.set()
        self._beat.join()
        self._stop = self._beat = None
        if _token(self.path) == self._token:  # still ours, not taken over after a freeze
            with contextlib.suppress(OSError):
                self.path.unlink()


@contextlib.contextmanager
def build_lock(path: Path, what: str, poll: float = 0.2) -> Iterator[None]:
    """Hold the lock file `path` while building `what`; wait while another live process holds it."""
    lock = LeaseLock(path, what, poll)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _token(path: Path) -> str | None:
    """The token of the lock file at `path` (one per acquisition: inode numbers are reused), or None."""
    try:
        return str(json.loads(path.read_text())["token"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _acquire(path: Path, what: str, lease: float, poll: float, wait: bool = True) -> str | None:
    me = {"owner": OWNER, "pid": os.getpid(), "started": process_start_time(os.getpid()), "what": what,
          "token": uuid.uuid4().hex}
    waited = False
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _take_over_if_stale(path, lease):
                continue
            if not wait:
                return None
            if not waited:
                log(f"{what}: another process is building it ({_holder(path)}); waiting for it")
                waited = True
            time.sleep(poll)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        return me["token"]


def _holder(path: Path) -> str:
    try:
        held = json.loads(path.read_text())
        return f"{held['owner']} pid {held['pid']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def _take_over_if_stale(path: Path, lease: float) -> bool:
    """Remove the lock at `path` if its holder is dead or silent for a lease; True if removed (by
    this process or another one that got there first)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return True
    seen = _token(path)
    stale = time.time() - st.st_mtime > lease
    if not stale:
        try:
            held = json.loads(path.read_text())
            stale = dead_here(held["owner"], held["pid"], held.get("started"))
        except (OSError, ValueError, KeyError, TypeError):  # being written, or not ours to judge
            return False
    if not stale:
        return False
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)  # one taker wins the rename; the others find the lock gone
    except FileNotFoundError:
        return True
    if _token(aside) != seen:  # a fresh lock was taken meanwhile: put it back if still free
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    else:
        log(f"{path}: taking over a lock whose holder is gone ({_holder(aside)})")
    aside.unlink(missing_ok=True)
    return True


def _heartbeat(path: Path, token: str, every: float, stop: threading.Event) -> None:
    while not stop.wait(every):
        try:
            if _token(path) != token:  # taken over after a freeze: not ours to keep alive
                return
            os.utime(path)
        except OSError:
            return
