"""Scale: bounded open files, a global shuffle, and batch-job progress lines."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch
from conftest import REPO

from pipeline.core.codecs import layout_codec
from pipeline.core.errors import CacheError
from pipeline.format import reader as fmt
from pipeline.format.encodings import Dense, Hybrid, Sampled, TopK
from pipeline.format.manifest import FORMAT_VERSION, write_manifest
from pipeline.format.shards import shard_entry, shard_name, write_shard


def _many_shard_cache(d, shards: int, rows: int, backend: str = "parquet", distinct: int = 50):
    enc = TopK(10, 2, 16)
    spec = {"layout": {"chunk_rows": rows, "backend": backend, "rows_per_shard": rows}, "num_classes": 10,
            "encoding": enc.params(), "temperature": 1.0, "dataset": {"fingerprint": "x", "rows": shards * rows}}
    entries = []
    logp = np.log(np.full((rows, 10), 0.1, dtype=np.float32))
    stored = enc.to_host(enc.encode(torch.from_numpy(logp), None))
    for i in range(shards):
        path = d / "shards" / shard_name(i, backend)
        if i < distinct:
            ids = np.arange(i * rows, (i + 1) * rows, dtype=np.int64)
            write_shard(path, {"sample_id": ids, **stored}, {}, enc, rows, 1)
        else:  # copies of the first shard: writing thousands of real ones is slow and tests nothing more
            shutil.copyfile(d / "shards" / shard_name(i % distinct, backend), path)
        if i < distinct:
            entries.append(shard_entry(d, i, backend, i * rows, rows))
        else:  # same bytes as the shard it copies: same digest, readers verify it
            entries.append({**entries[i % distinct], "index": i, "path": f"shards/{shard_name(i, backend)}",
                            "first_row": i * rows})
    write_manifest(d, spec, entries, {})
    return d


def test_a_5000_shard_cache_reads_under_ulimit_256(tmp_path):
    d = _many_shard_cache(tmp_path / "c", 5000, 2)
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        from pathlib import Path
        from pipeline.format.reader import CacheReader
        from pipeline.train.dataset import Cache
        cache = Cache(Path({str(d)!r}))
        r = cache.reader
        n = sum(len(b["sample_id"]) for b in cache.dataset(64, seed=0, shuffle_chunks=4))
        again = sum(len(r.read(c)["sample_id"]) for c in r.chunks()[::-7])
        assert len(r._handles) <= 64, len(r._handles)
        print(n, again)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "10000"


def test_handle_lru_keeps_at_most_max_open(tmp_path):
    d = _many_shard_cache(tmp_path / "c", 12, 3)
    r = fmt.CacheReader(d, max_open=5)
    rows = [r.read(c)["sample_id"] for c in r.chunks()]
    assert len(r._handles) == 5
    assert np.array_equal(np.concatenate(rows), np.arange(36))
    assert np.array_equal(np.concatenate([r.read(c)["sample_id"] for c in r.chunks()[::-1]]),
                          np.arange(36).reshape(12, 3)[::-1].reshape(-1))


FIXTURES = REPO / "tests" / "fixtures" / "format1"


def _zarr_read(reader, chunk):
    """The same chunk read through zarr's own API."""
    arrays = reader.handle(chunk.shard)
    return reader.decode({name: arrays[name][chunk.start:chunk.stop] for name in reader.names})


@pytest.mark.parametrize("enc", [Dense(300, "float16"), Dense(300, "float32"), TopK(300, 7, 16), TopK(300, 7, 8),
                                 TopK(70_000, 5, 16), Sampled(300, 12), Hybrid(300, 4, 6, 8)],
                         ids=lambda e: e.label())
@pytest.mark.parametrize("codec", ["zstd", "shuffle-lz4hc"])
def test_fast_chunk_reads_equal_zarrs_exactly(tmp_path, enc, codec):
    """Chunk by chunk and joined into a buffer (in a shuffled order), including a partial last chunk
    and a chunk of fill values that zarr never wrote to a file."""
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(700, enc.num_classes, generator=g) * 3, -1)
    arrays = enc.to_host(enc.encode(logp, torch.Generator().manual_seed(1)))
    arrays["sample_id"] = np.arange(700, dtype=np.int64) * 3
    arrays["sample_id"][256:512] = 0  # all fill value: no chunk file
    d = tmp_path / "c"
    write_shard(d / "shards" / shard_name(0, "zarr"), arrays, {}, enc, 256, None, codec)  # last chunk partial
    assert not (d / "shards" / "00000.zarr" / "sample_id" / "c" / "1").exists()
    spec = {"format_version": FORMAT_VERSION, "num_classes": enc.num_classes, "encoding": enc.params(),
            "temperature": 1.0, "dataset": {"fingerprint": "t", "rows": 700},
            "layout": {"backend": "zarr", "rows_per_shard": 700, "chunk_rows": 256, **layout_codec(codec)}}
    write_manifest(d, spec, [shard_entry(d, 0, "zarr", 0, 700)], {})
    r = fmt.CacheReader(d)
    for c in r.chunks():
        assert r._reads.layout(0) is not None  # the fast path is taken
        fast, slow = r.read(c), _zarr_read(r, c)
        assert fast.keys() == slow.keys()
        for k in fast:
            assert fast[k].dtype == slow[k].dtype and np.array_equal(fast[k], slow[k]), k
    order = [r.chunks()[i] for i in (2, 0, 1)]
    joined = r.decode(r.read_joined(order))
    for k, v in joined.items():
        assert np.array_equal(v, np.concatenate([_zarr_read(r, c)[k] for c in order])), k
    shutil.rmtree(d / "shards" / "00000.zarr")  # removed under the reader (an evicted download, a deleted cache)
    with pytest.raises(CacheError, match="00000.zarr: the shard was removed while being read"):
        r.read(r.chunks()[0])  # never its missing chunk files taken for fill values


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.iterdir() if p.name.endswith("-zarr")))
def test_fast_reads_of_format_1_fixtures_equal_zarrs(name):
    r = fmt.CacheReader(FIXTURES / name)
    for c in r.chunks():
        fast, slow = r.read(c), _zarr_read(r, c)
        assert all(np.array_equal(fast[k], slow[k]) and fast[k].dtype == slow[k].dtype for k in slow)


def test_unusual_zarr_layouts_fall_back_to_zarr(tmp_path):
    """A shard written with zarr's sharding codec is not read by the fast path, and reads the same."""
    import zarr

    enc = TopK(50, 3, 16)
    logp = torch.log_softmax(torch.randn(300, 50, generator=torch.Generator().manual_seed(0)), -1)
    arrays = {**enc.to_host(enc.encode(logp)), "sample_id": np.arange(300, dtype=np.int64)}
    d = tmp_path / "c"
    g = zarr.open_group(str(d / "shards" / "00000.zarr"), mode="w", zarr_format=3)
    for name, data in arrays.items():
        a = g.create_array(name, shape=data.shape, dtype=data.dtype, shards=(300, *data.shape[1:]),
                           chunks=(100, *data.shape[1:]))
        a[...] = data
    spec = {"format_version": FORMAT_VERSION, "num_classes": 50, "encoding": enc.params(),
            "temperature": 1.0, "dataset": {"fingerprint": "t", "rows": 300},
            "layout": {"backend": "zarr", "rows_per_shard": 300, "chunk_rows": 100}}
    write_manifest(d, spec, [shard_entry(d, 0, "zarr", 0, 300)], {})
    r = fmt.CacheReader(d)
    assert r._reads.layout(0) is None
    got = r.read_all()
    assert np.array_equal(got["sample_id"], np.arange(300))
    assert np.array_equal(got["ids"], enc.decode(arrays)["ids"])


def test_progress_without_a_terminal_prints_lines_at_an_interval(monkeypatch, capsys):
    import time

    from pipeline.core import progress

    monkeypatch.setenv("LOGITCACHE_PROGRESS_INTERVAL", "0.05")
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False, raising=False)
    p = progress.bar(1000, "cache abc")
    for _ in range(4):
        time.sleep(0.06)
        p.update(100)
    p.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 5, lines
    assert lines[0].startswith("cache abc: 100/1000 rows (10.0%), ") and "rows/s, ETA 0m0" in lines[0]
    assert lines[-1].startswith("cache abc: 400/1000 rows (40.0%)") and lines[-1].endswith(", done")


HEAP_PROBE = textwrap.dedent("""
    import re, sys
    import numpy as np
    import pipeline

    def anon():
        return int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    if sys.argv[1] == "pin":
        pipeline.steady_heap()
    a = np.ones(20 << 20, np.uint8)  # freeing it raises glibc's own threshold to 20 MB
    del a
    a = np.ones(20 << 20, np.uint8)
    before = anon()
    del a
    print(before - anon())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc")
def test_steady_heap_returns_large_freed_blocks_to_the_os():
    """With the mmap threshold pinned (8 MB) a freed 20 MB array goes back to the OS at once;
    with glibc's adjusting threshold the second one comes from the heap and stays resident."""
    returned = {}
    for mode in ("pin", "default"):
        out = subprocess.run([sys.executable, "-c", HEAP_PROBE, mode], capture_output=True, text=True, check=True,
                             cwd=REPO, env={"PATH": "/usr/bin:/bin"})
        returned[mode] = int(out.stdout) / 1024  # MB
    assert returned["pin"] > 19 and returned["default"] < 1, returned


TRIM_PROBE = textwrap.dedent("""
    import ctypes, re, sys
    import numpy as np
    import pipeline

    def anon():
        return int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    if sys.argv[1] == "pin":
        pipeline.steady_heap()
    else:  # the mmap threshold pinned alone, as before the trim threshold was set with it
        ctypes.CDLL(None).mallopt(-3, 8 << 20)
    a = np.ones(4 << 20, np.uint8)  # below the mmap threshold: on the heap, at its top
    before = anon()
    del a
    print(before - anon())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc")
def test_steady_heap_keeps_a_freed_block_at_the_heap_top_for_the_next_batch():
    """Pinning the mmap threshold freezes glibc's trim threshold at 128 KB, so a freed 4 MB block
    at the heap's top went back to the OS and the next batch's tensor faulted its pages in again;
    steady_heap sets the trim threshold to 16 MB, and the block stays resident."""
    returned = {}
    for mode in ("pin", "mmap_only"):
        out = subprocess.run([sys.executable, "-c", TRIM_PROBE, mode], capture_output=True, text=True, check=True,
                             cwd=REPO, env={"PATH": "/usr/bin:/bin"})
        returned[mode] = int(out.stdout) / 1024  # MB
    assert returned["pin"] < 1 and returned["mmap_only"] > 3.5, returned


def test_read_threads_follow_the_cores_and_the_environment(tmp_path, monkeypatch):
    """Chunks are decoded on the calling thread with 2 cores or fewer (a pool there costs CPU and
    gains nothing), on up to 4 threads beside it with more; LOGITCACHE_READ_THREADS overrides, and a
    bad value is refused in one line that names it."""
    from pipeline.core.errors import ConfigError

    for cores, threads in ((1, 0), (2, 0), (3, 2), (5, 4), (64, 4)):
        monkeypatch.setattr(fmt, "usable_cores", lambda cores=cores: cores)
        assert fmt.default_read_threads() == threads, cores
    monkeypatch.setenv("LOGITCACHE_READ_THREADS", "3")
    assert fmt.default_read_threads() == 3
    monkeypatch.setenv("LOGITCACHE_READ_THREADS", "two")
    with pytest.raises(ConfigError, match="LOGITCACHE_READ_THREADS='two': set it to a whole number"):
        fmt.default_read_threads()
    monkeypatch.delenv("LOGITCACHE_READ_THREADS")
    d = _many_shard_cache(tmp_path / "c", 6, 300, "zarr")
    serial, pooled = fmt.CacheReader(d, read_threads=0), fmt.CacheReader(d, read_threads=2)
    a, b = serial.read_joined(serial.chunks()), pooled.read_joined(pooled.chunks())
    assert not serial._pools and list(pooled._pools) == [2]  # each read where it was told to, 2 threads
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_chunk_file_is_read_whole_whatever_its_size(tmp_path):
    """The fast path reads a chunk file into a buffer sized for its frame; a file longer than that
    (damaged, or written by another program) is still read whole, for the codec to judge."""
    from pipeline.format.backends.zarr_shards import _read_file

    data = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    (tmp_path / "c.0").write_bytes(data)
    got: list[object] = []

    def read() -> None:  # a fresh thread: a fresh buffer, first of 1,000 bytes, then of 8,000
        got.extend(bytes(v) if v is not None else None for v in (_read_file(str(tmp_path / "c.0"), 1000),
                                                                  _read_file(str(tmp_path / "c.0"), 8000),
                                                                  _read_file(str(tmp_path / "c.1"), 10)))

    t = threading.Thread(target=read)
    t.start()
    t.join()
    assert got == [data, data, None]
