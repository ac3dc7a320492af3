"""Hash once: digests of inputs and checkpoints are remembered per machine, keyed by the file's
(path, size, mtime, inode), and recomputed when the file changes."""

from __future__ import annotations

import builtins
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.core import io


@pytest.fixture(autouse=True)
def _own_store(tmp_path, monkeypatch):
    monkeypatch.setenv("LOGITCACHE_DIGESTS", str(tmp_path / "store" / "digests.sqlite"))
    monkeypatch.setattr(io, "RACY_NS", 0)  # ctime cannot be set back: tests judge freshness by mtime alone
    io._WARNED.clear()


def _age(path, seconds=60):
    """Files written just now are not remembered (a rewrite in the same mtime tick could go unseen)."""
    t = time.time() - seconds
    os.utime(path, (t, t))


def _count_opens(monkeypatch, path):
    opened = []
    real = builtins.open

    def spy(file, *a, **kw):
        if os.fspath(file) == os.fspath(path):
            opened.append(file)
        return real(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", spy)
    return opened


def test_second_digest_does_not_read_the_file(tmp_path, monkeypatch):
    f = tmp_path / "big.bin"
    f.write_bytes(os.urandom(3 << 20))
    _age(f)
    opened = _count_opens(monkeypatch, f)
    first = io.file_digest(f)
    assert first == hashlib.sha256(f.read_bytes()).hexdigest()
    opened.clear()
    assert io.file_digest(f) == first
    assert opened == []


def test_modified_or_touched_file_is_rehashed(tmp_path, monkeypatch):
    f = tmp_path / "ckpt.pt"
    f.write_bytes(b"a" * 1000)
    _age(f, 120)
    old = io.file_digest(f)
    with open(f, "r+b") as fh:  # same size, same inode, new content
        fh.write(b"b")
    _age(f, 60)
    assert io.file_digest(f) == hashlib.sha256(b"b" + b"a" * 999).hexdigest() != old
    opened = _count_opens(monkeypatch, f)
    os.utime(f)  # touched: mtime changes, so it is read again (and not remembered while fresh)
    io.file_digest(f)
    assert len(opened) == 1


@pytest.mark.parametrize("aged", [False, True])
def test_fresh_files_are_not_remembered(tmp_path, monkeypatch, aged):
    monkeypatch.setattr(io, "RACY_NS", 2_000_000_000)
    f = tmp_path / "fresh.bin"
    f.write_bytes(b"x" * 10)
    if aged:  # an old mtime set just now (cp -p, tar, rsync -t): the ctime is fresh
        _age(f)
    io.file_digest(f)
    opened = _count_opens(monkeypatch, f)
    io.file_digest(f)
    assert len(opened) == 1


def test_a_same_size_copy_with_the_old_mtime_is_rehashed(tmp_path):
    """`cp -p new old` over a same-size file keeps its inode, size and (restored) mtime; the ctime
    moves, so the remembered digest is not served."""
    f = tmp_path / "weights.bin"
    f.write_bytes(b"a" * 4096)
    _age(f, 120)
    old = io.file_digest(f)
    mtime = f.stat().st_mtime_ns
    inode = f.stat().st_ino
    time.sleep(0.01)  # past the filesystem's timestamp tick
    with open(f, "r+b") as fh:
        fh.write(b"b" * 4096)
    os.utime(f, ns=(mtime, mtime))
    assert (f.stat().st_size, f.stat().st_mtime_ns, f.stat().st_ino) == (4096, mtime, inode)
    assert io.file_digest(f) == hashlib.sha256(b"b" * 4096).hexdigest() != old


def test_a_broken_store_warns_once_and_never_serves_a_wrong_digest(tmp_path, monkeypatch, capsys):
    f = tmp_path / "f.bin"
    f.write_bytes(b"abc" * 100)
    _age(f)
    truth = hashlib.sha256(b"abc" * 100).hexdigest()
    assert io.file_digest(f) == truth
    import sqlite3

    db = tmp_path / "store" / "digests.sqlite"
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("UPDATE memo SET digest = ?", ("0" * 64,))  # a row changed behind the memo's back
    con.close()
    assert io.file_digest(f) == truth and io.file_digest(f) == truth
    err = capsys.readouterr().err
    assert err.count("does not match its seal") == 1
    db.write_bytes(b"not a database" * 100)  # a store that fails outright
    assert io.file_digest(f) == truth and io.file_digest(f) == truth
    err = capsys.readouterr().err
    assert err.count("the digest memo cannot be used") == 1 and "LOGITCACHE_DIGESTS" in err


def test_a_home_on_a_network_filesystem_keeps_the_memo_on_a_local_disk(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LOGITCACHE_DIGESTS")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / ".cache"))
    assert io.digest_db() == tmp_path / "home" / ".cache" / "logitcache" / "digests.sqlite"
    monkeypatch.setattr(io, "mount_type", lambda path: "nfs4")
    assert io.digest_db() == Path("/var/tmp") / f"logitcache-{os.getuid()}" / "digests.sqlite"
    monkeypatch.setenv("LOGITCACHE_DIGESTS", str(tmp_path / "shared.sqlite"))  # asked for: used, with a warning
    assert io.digest_db() == tmp_path / "shared.sqlite"
    assert "is on a nfs4 filesystem" in capsys.readouterr().err


def test_mount_type_reads_the_longest_mount_point(tmp_path):
    kind = io.mount_type(tmp_path)
    with open("/proc/mounts") as f:
        kinds = {line.split()[2] for line in f}
    assert kind in kinds


def test_tree_digest_matches_and_remembers_each_file(tmp_path, monkeypatch):
    d = tmp_path / "model"
    d.mkdir()
    for name in ("config.json", "weights.bin"):
        (d / name).write_bytes(name.encode() * 100)
        _age(d / name)
    assert io.tree_digest(d) == io.sha256_tree(d)
    opened = _count_opens(monkeypatch, d / "weights.bin")
    io.tree_digest(d)
    assert opened == []


def test_dataset_fingerprint_of_a_mapped_input_is_remembered(tmp_path, monkeypatch):
    from pipeline.inputs.arrays import Dataset
    from pipeline.inputs.splits import _dataset, _read_npy_dir

    src = tmp_path / "npy"
    src.mkdir()
    x = np.random.default_rng(0).normal(size=(500, 8)).astype(np.float32)
    np.save(src / "x.npy", x)
    _age(src / "x.npy")
    ds = _dataset(_read_npy_dir(src, "data.source"), "x", "y", str(src), labelled=False)
    in_memory = Dataset(x, None, np.arange(500, dtype=np.int64), "mem")
    assert ds.fingerprint == in_memory.fingerprint  # the same data, mapped or not, has one id
    scans = []
    monkeypatch.setattr(Dataset, "_scan", lambda self: scans.append(1) or "x")
    again = _dataset(_read_npy_dir(src, "data.source"), "x", "y", str(src), labelled=False)
    assert again.fingerprint == ds.fingerprint and scans == []


def test_unwritable_store_still_hashes(tmp_path, monkeypatch):
    monkeypatch.setenv("LOGITCACHE_DIGESTS", "/proc/no/such/dir/digests.sqlite")
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    assert io.file_digest(f) == hashlib.sha256(b"abc").hexdigest()
