"""Publishing shards: never over an existing one, fsynced before the manifest, digests recorded by
the writer so that finalizing and `caches ls` read no shard data."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pipeline.core import io as pio
from pipeline.core.errors import CacheError
from pipeline.format import reader as fmt
from pipeline.format.encodings import Dense
from pipeline.format.manifest import FORMAT_VERSION, write_manifest
from pipeline.format.shards import digest_path, recorded_digest, sealed_record, shard_entry, shard_name, write_shard
from pipeline.tools.inspect import list_caches

ENC = Dense(4, "float32")


def _arrays(value: float, rows: int = 200) -> dict[str, np.ndarray]:
    return {"sample_id": np.arange(rows, dtype=np.int64), "logp": np.full((rows, 4), value, np.float32)}


def _shard(d, i: int, backend: str, value: float = 0.0):
    path = d / "shards" / shard_name(i, backend)
    return path, write_shard(path, _arrays(value), {"shard": i}, ENC, 64, 3)


def _spec(backend: str, shards: int = 1) -> dict:
    return {"format_version": FORMAT_VERSION, "num_classes": 4, "encoding": ENC.params(), "temperature": 1.0,
            "dataset": {"fingerprint": "t", "rows": 200 * shards},
            "layout": {"backend": backend, "rows_per_shard": 200, "chunk_rows": 64}}


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_late_duplicate_writer_leaves_the_first_shard_untouched(tmp_path, backend):
    path, first = _shard(tmp_path, 0, backend, value=1.0)
    before = pio.sha256_tree(path)
    sidecar = digest_path(path).read_bytes()
    _, late = _shard(tmp_path, 0, backend, value=2.0)  # other bytes: must not replace what is there
    assert first and not late
    assert pio.sha256_tree(path) == before
    assert digest_path(path).read_bytes() == sidecar
    assert json.loads(sidecar) == sealed_record(path.name, *before)
    assert [p.name for p in (tmp_path / "shards").iterdir()] == [path.name]  # the late writer's tmp is gone
    assert [p.name for p in (tmp_path / "digests").iterdir()] == [f"{path.name}.json"]


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_shard_files_and_directories_are_fsynced_before_publish_and_manifest(tmp_path, backend, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_link, real_rename, real_replace = os.fsync, os.link, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def mover(kind, real):
        def move(src, dst, *a, **kw):
            events.append((kind, f"{src} -> {dst}"))
            return real(src, dst, *a, **kw)
        return move

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", mover("publish", real_link))
    monkeypatch.setattr(os, "rename", mover("publish", real_rename))
    monkeypatch.setattr(os, "replace", mover("replace", real_replace))
    path, _ = _shard(tmp_path, 0, backend)
    published = next(i for i, (k, what) in enumerate(events) if k == "publish" and what.endswith(f"-> {path}"))
    tmp = events[published][1].split(" -> ")[0]
    synced_before = {p for k, p in events[:published] if k == "fsync"}
    inside = [path] if path.is_file() else [path, *path.rglob("*")]  # every file and directory of the shard
    for p in inside:
        assert tmp + str(p)[len(str(path)):] in synced_before, p
    assert ("fsync", str(path.parent)) in events[published:]  # the shards/ entry
    events.clear()
    write_manifest(tmp_path, _spec(backend), [shard_entry(tmp_path, 0, backend, 0, 200)], {})
    manifest = next(i for i, (k, what) in enumerate(events) if k == "replace" and what.endswith("manifest.json"))
    assert ("fsync", str(tmp_path)) in events[:manifest]  # the shards/ directory's own entry
    assert any(k == "fsync" and ".tmp-manifest.json" in p for k, p in events[:manifest])
    assert ("fsync", str(tmp_path)) in events[manifest:]  # the manifest's entry


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_manifest_is_built_from_sidecars_without_reading_shards(tmp_path, backend, monkeypatch):
    for i in range(3):
        _shard(tmp_path, i, backend, value=float(i))
    expected = [pio.sha256_tree(tmp_path / "shards" / shard_name(i, backend)) for i in range(3)]

    def no_reads(*a, **kw):
        raise AssertionError("shard data read while finalizing")

    monkeypatch.setattr(pio, "sha256_file", no_reads)
    entries = [shard_entry(tmp_path, i, backend, 200 * i, 200) for i in range(3)]
    write_manifest(tmp_path, _spec(backend, 3), entries, {})
    assert [(e["sha256"], e["bytes"]) for e in entries] == expected  # same digest as sha256_tree
    monkeypatch.undo()
    fmt.CacheReader(tmp_path, verify=True)


def test_lost_sidecar_is_rebuilt_and_a_wrong_size_refused(tmp_path):
    path, _ = _shard(tmp_path, 0, "parquet")
    digest_path(path).unlink()  # writer killed between publishing the shard and its sidecar
    assert recorded_digest(path) == pio.sha256_tree(path)
    assert digest_path(path).is_file()
    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(CacheError, match="00000.parquet: holds .* bytes but its writer wrote"):
        recorded_digest(path)


def test_listing_a_partial_cache_reads_no_shard_data(tmp_path, monkeypatch):
    d = tmp_path / "abc"
    for i in (0, 2):
        _shard(d, i, "zarr")
    spec = _spec("zarr", 4)
    (d / "spec.json").write_text(json.dumps(spec))
    size = sum(pio.tree_size(d / "shards" / shard_name(i, "zarr")) for i in (0, 2))

    def no_reads(*a, **kw):
        raise AssertionError("shard data hashed to list caches")

    monkeypatch.setattr(pio, "sha256_file", no_reads)
    line = list_caches(tmp_path).splitlines()[1]
    assert "partial 2/4 shards" in line and f" {size} " in line
