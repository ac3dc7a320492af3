"""Inputs that are never loaded whole: a directory of .npy arrays (mapped), Parquet (by row group)
and Zarr (by chunk). Each reads the rows a stage asks for equal to numpy's, has the fingerprint of
the same data in memory (remembered per machine), gives the same cache as an .npz, keeps resident
memory bounded however large the file, and refuses damaged inputs in one line."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from conftest import REPO, tiny_config, write_config, write_npy_dir
from test_hostile import _no_outputs, one_line_error

from pipeline.core.config import DataConfig
from pipeline.inputs.arrays import Dataset, IdRange, MappedRows
from pipeline.inputs.rows import LazyRows, ParquetBlocks, Selection, ZarrBlocks
from pipeline.inputs.splits import _dataset, _read

N, F, GROUP = 600, 6, 64  # rows, features, rows per Parquet row group / Zarr chunk
KINDS = ["npy", "parquet-columns", "parquet-list", "zarr"]


@pytest.fixture(autouse=True)
def _digest_store(tmp_path, monkeypatch):
    monkeypatch.setenv("LOGITCACHE_DIGESTS", str(tmp_path / "store" / "digests.sqlite"))


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(4, F)) * 3
    y = rng.integers(0, 4, size=N)
    return (centers[y] + rng.normal(size=(N, F))).astype(np.float32), y.astype(np.int64)


def _write(kind: str, path: Path, x: np.ndarray, y: np.ndarray | None = None, **extra: np.ndarray) -> Path:
    """x (and y, and other arrays named as in an .npy directory) written as `kind`."""
    arrays = {"x": x, **({"y": y} if y is not None else {}), **extra}
    if kind == "npz":
        np.savez(path, **arrays)
    elif kind == "npy":
        path.mkdir()
        for k, a in arrays.items():
            np.save(path / f"{k}.npy", a)
    elif kind.startswith("parquet"):
        cols = ({"features": pa.array(list(x), type=pa.list_(pa.float32(), x.shape[1]))} if kind == "parquet-list"
                else {f"f{i}": x[:, i] for i in range(x.shape[1])})
        cols.update({} if y is None else {"label": y})
        cols.update({"sample_id": a for k, a in extra.items() if k == "ids"})
        pq.write_table(pa.table(cols), path, row_group_size=GROUP)
    else:
        group = zarr.open_group(path, mode="w")
        for k, a in arrays.items():
            group.create_array(k, shape=a.shape, chunks=(GROUP, *a.shape[1:]), dtype=a.dtype)[:] = a
    return path


def _age(path: Path) -> None:
    """Files written just now are not remembered (a rewrite in the same mtime tick could go unseen)."""
    t = time.time() - 60
    for f in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(f, (t, t))


def _load(path: Path, labelled: bool = True) -> Dataset:
    return _dataset(_read(str(path), "data.source", DataConfig(), labelled), "x", "y", str(path), labelled)


def _suffix(kind: str) -> str:
    return ".parquet" if kind.startswith("parquet") else ""


@pytest.mark.parametrize("kind", KINDS)
def test_rows_a_stage_reads_equal_numpy(tmp_path, kind):
    x, y = _data()
    ds = _load(_write(kind, tmp_path / f"d{_suffix(kind)}", x, y))
    assert ds.x.shape == x.shape and len(ds) == N and np.array_equal(ds.y, y)
    if kind != "npy":
        assert isinstance(ds.x, LazyRows)
    for lo in range(0, N, 150):  # the cache stage: its shard's rows, by slices
        xs, ys = ds.rows(slice(lo, lo + 150))
        assert xs.dtype == np.float32 and np.array_equal(xs, x[lo:lo + 150]) and np.array_equal(ys, y[lo:lo + 150])
    pos = np.random.default_rng(1).integers(0, N, size=300)  # the student: batch rows by sample id, any order
    assert np.array_equal(ds.rows(ds.positions(pos))[0], x[pos])
    assert np.array_equal(ds.x[pos[:5], 2:4], x[pos[:5], 2:4]) and np.array_equal(ds.x[7], x[7])
    assert np.array_equal(ds.x[::7], x[::7]) and np.array_equal(ds.x[-3:], x[-3:])
    copy = pickle.loads(pickle.dumps(ds))  # as sent to a Dask worker: reopens its file
    assert np.array_equal(copy.rows(pos)[0], x[pos]) and copy.fingerprint == ds.fingerprint


@pytest.mark.parametrize("kind", KINDS)
def test_subsets_are_selections_read_on_demand(tmp_path, kind):
    x, y = _data()
    ds = _load(_write(kind, tmp_path / f"d{_suffix(kind)}", x, y))
    keep = y != 2
    sub = ds.subset(keep, "no-2")
    assert isinstance(sub.x, Selection) and sub.x.shape == (int(keep.sum()), F)
    assert np.array_equal(sub.rows(slice(10, 200))[0], x[keep][10:200])
    pos = np.random.default_rng(2).integers(0, len(sub), size=100)
    assert np.array_equal(sub.rows(pos)[0], x[keep][pos]) and np.array_equal(sub.y, y[keep])
    inner = sub.subset(np.arange(len(sub)) % 3 == 0, "thirds")  # a selection of a selection
    assert isinstance(inner.x.base, type(ds.x)) and np.array_equal(np.asarray(inner.x), x[keep][::3])
    in_memory = Dataset(x, y, IdRange(N), "mem").subset(keep)
    assert isinstance(in_memory.x, np.ndarray) and sub.fingerprint == in_memory.fingerprint


@pytest.mark.parametrize("kind", ["parquet-columns", "parquet-list", "zarr"])
def test_gather_decodes_each_block_once(tmp_path, kind, monkeypatch):
    x, y = _data()
    ds = _load(_write(kind, tmp_path / f"d{_suffix(kind)}", x, y))
    blocks = ParquetBlocks if kind.startswith("parquet") else ZarrBlocks
    real, reads = blocks.read, []
    monkeypatch.setattr(blocks, "read", lambda self, h, b: reads.append(b) or real(self, h, b))
    fresh = pickle.loads(pickle.dumps(ds.x))  # no decoded blocks yet
    pos = np.array([5, 590, 70, 6, 130, 589, 71, 5])  # blocks 0, 9, 1, 0, 2, 9, 1, 0
    assert np.array_equal(fresh[pos], x[pos])
    assert sorted(reads) == [0, 1, 2, 9]
    assert np.array_equal(fresh[60:140], x[60:140]) and sorted(reads) == [0, 1, 2, 9]  # kept: not decoded again
    small = LazyRows(ds.x.blocks, cache_bytes=1)  # keeps only the last block
    assert np.array_equal(small[pos], x[pos]) and len(small._cache) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_fingerprint_equals_in_memory_and_is_remembered(tmp_path, kind, monkeypatch):
    monkeypatch.setattr("pipeline.core.io.RACY_NS", 0)  # _age sets the mtime back; nothing sets a ctime back
    x, y = _data()
    ids = np.arange(N, dtype=np.int64)[::-1] * 3  # explicit sample ids are part of the fingerprint
    path = _write(kind, tmp_path / f"d{_suffix(kind)}", x, y, ids=ids)
    _age(path)
    ds = _load(path)
    assert np.array_equal(ds.ids, ids)
    assert ds.fingerprint == Dataset(x, y, ids, "mem").fingerprint  # one id for the same data, however stored
    assert ds.fingerprint != Dataset(x, y, np.arange(N), "mem").fingerprint
    scans = []
    monkeypatch.setattr(Dataset, "_scan", lambda self: scans.append(1) or "x")
    assert _load(path).fingerprint == ds.fingerprint and scans == []  # remembered: the file is not read again


def test_other_parquet_feature_columns_are_other_inputs(tmp_path):
    x, y = _data()
    path = _write("parquet-columns", tmp_path / "d.parquet", x, y)
    _age(path)
    some = DataConfig(feature_columns=("f0", "f3"))
    for _ in range(2):  # the second time from the remembered fingerprints
        all_cols, two = _load(path), _dataset(_read(str(path), "data.source", some, True), "x", "y", "d", True)
        assert two.x.shape == (N, 2) and np.array_equal(two.rows(slice(0, N))[0], x[:, [0, 3]])
        assert two.fingerprint == Dataset(np.ascontiguousarray(x[:, [0, 3]]), y, IdRange(N), "m").fingerprint
        assert all_cols.fingerprint != two.fingerprint


def test_npy_of_another_dtype_is_converted_as_read(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(N, 1, 4, 4), dtype=np.uint8)
    ds = _load(_write("npy", tmp_path / "d", pixels, np.arange(N) % 4))
    assert isinstance(ds.x, MappedRows) and ds.x.dtype == np.float32  # mapped, not converted whole
    assert np.array_equal(ds.rows(np.array([3, 1]))[0], pixels[[3, 1]].astype(np.float32))
    assert ds.fingerprint == Dataset(pixels.astype(np.float32), None, IdRange(N), "m").fingerprint


def test_a_sharded_zarr_array_is_read_a_shard_at_a_time(tmp_path):
    x, y = _data()
    group = zarr.open_group(tmp_path / "d", mode="w")
    group.create_array("x", shape=x.shape, chunks=(16, F), shards=(128, F), dtype="float32")[:] = x
    group.create_array("y", shape=y.shape, dtype="int64")[:] = y
    ds = _load(tmp_path / "d")
    assert ds.x.blocks.bounds == (0, 128, 256, 384, 512, 600)
    assert np.array_equal(ds.x[::-1], x[::-1])


def _report(tmp_path: Path, source: Path, name: str, cli_run) -> tuple[Path, dict]:
    ws = tmp_path / name
    student = {"epochs": 2, "batch_size": 50, "models": [{"name": "s", "arch": "mlp", "hidden": [8]}]}
    cfg = tiny_config(ws, data={"source": str(source)}, student=student,
                      cache={"rows_per_shard": 128, "chunk_rows": 64, "encoding": "topk", "k": 2, "bits": 8})
    cli_run("run", str(write_config(tmp_path / f"{name}.yaml", cfg)))
    (cache,) = (ws / "caches").iterdir()
    return cache, json.loads((ws / "runs" / "t" / "report.json").read_text())


def test_parquet_and_zarr_sources_give_the_npz_cache(tmp_path, cli_run):
    x, y = _data()
    ref_cache, ref_report = _report(tmp_path, _write("npz", tmp_path / "d.npz", x, y), "npz", cli_run)
    ref_files = sorted(p.relative_to(ref_cache) for p in ref_cache.rglob("*") if p.is_file())
    assert len([p for p in ref_files if p.parts[0] == "shards"]) > 4
    for kind in ("parquet-list", "zarr"):
        cache, report = _report(tmp_path, _write(kind, tmp_path / f"d{_suffix(kind)}", x, y), kind, cli_run)
        assert cache.name == ref_cache.name  # same data, same fingerprint: the same cache id
        files = sorted(p.relative_to(cache) for p in cache.rglob("*") if p.is_file())
        assert files == ref_files
        for f in files:  # every target array, digest and spec byte for byte
            if f.parts[0] != "configs" and f.name != "manifest.json":  # configs name their own data.source
                assert (cache / f).read_bytes() == (ref_cache / f).read_bytes(), f
        manifest, ref_manifest = (json.loads((c / "manifest.json").read_text()) for c in (cache, ref_cache))
        manifest.pop("created_at"), ref_manifest.pop("created_at")
        assert manifest == ref_manifest
        assert [r["accuracy"] for r in report["rows"]] == [r["accuracy"] for r in ref_report["rows"]]


def _write_large(kind: str, path: Path, rows: int, features: int, group: int) -> int:
    """A `kind` input of rows x features float32, written a row group at a time; returns its bytes."""
    rng = np.random.default_rng(0)
    blocks = ((rng.random((group, features), dtype=np.float32), rng.integers(0, 10, group)) for _ in range(rows // group))
    if kind == "parquet":
        schema = pa.schema([("features", pa.list_(pa.float32(), features)), ("label", pa.int64())])
        with pq.ParquetWriter(path, schema, compression="none") as w:
            for xb, yb in blocks:
                values = pa.array(xb.reshape(-1))
                w.write_table(pa.table({"features": pa.FixedSizeListArray.from_arrays(values, features),
                                        "label": yb}, schema=schema))
    else:
        g = zarr.open_group(path, mode="w")
        xa = g.create_array("x", shape=(rows, features), chunks=(group, features), dtype="float32", compressors=None)
        ya = g.create_array("y", shape=(rows,), chunks=(rows,), dtype="int64")
        for i, (xb, yb) in enumerate(blocks):
            xa[i * group:(i + 1) * group] = xb
            ya[i * group:(i + 1) * group] = yb
    return sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file())


READ_ALL = """
import re, sys
from pathlib import Path
import pyarrow.parquet, zarr  # the readers' own code is not the input's
from pipeline.core.config import DataConfig
from pipeline.inputs.splits import _dataset, _read
path, shard = sys.argv[1], int(sys.argv[2])
# the peak resident size of this process's memory (ru_maxrss would include the parent's at fork)
kb = lambda: int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
before = kb()
ds = _dataset(_read(path, "data.source", DataConfig(), True), "x", "y", path, True)  # one streamed fingerprint pass
total = 0.0
for lo in range(0, len(ds), shard):
    total += float(ds.rows(slice(lo, lo + shard))[0][:, 0].sum())
print(before, kb(), round(total, 3))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["parquet", "zarr"])
def test_reading_every_row_keeps_memory_bounded(tmp_path, kind):
    rows, features, group = 100_352, 1024, 2048  # 411 MB of float32
    path = tmp_path / ("d.parquet" if kind == "parquet" else "d.zarr")
    size = _write_large(kind, path, rows, features, group)
    assert size > 400e6
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", READ_ALL, str(path), "4096"], env=env, capture_output=True,
                         text=True, timeout=600, check=True).stdout.split()
    before, after = int(out[0]) << 10, int(out[1]) << 10
    print(f"{kind}: {size / 1e6:.0f} MB input, resident {before / 1e6:.0f} MB after imports, "
          f"peak {after / 1e6:.0f} MB reading every row")
    assert after - before < size / 2


def _cli_error(cli_run, tmp_path: Path, source: Path, *fragments: str) -> str:
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, data={"source": str(source)}))
    line = one_line_error(cli_run("teachers", str(cfg), expect=None), *fragments)
    _no_outputs(tmp_path)
    return line


def test_non_numeric_parquet_column(cli_run, tmp_path):
    x, y = _data()
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"a": x[:, 0], "name": [f"r{i}" for i in range(N)], "label": y}), path)
    _cli_error(cli_run, tmp_path, path, "d.parquet", "feature columns must be numeric", "data.feature_columns")


def test_list_column_ragged_in_a_later_row_group(cli_run, tmp_path):
    rows = [[0.1, 0.2, 0.3]] * 100 + [[0.1, 0.2]] * 3 + [[0.5, 0.5, 0.5]] * 97
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"features": rows, "label": np.arange(200) % 3}), path, row_group_size=50)
    _cli_error(cli_run, tmp_path, path, "data.source", "d.parquet", "'features' is ragged", "[2, 3]")


def test_list_column_with_a_null_row(cli_run, tmp_path):
    rows = [[0.1, 0.2, 0.3]] * 120 + [None] + [[0.1, 0.2, 0.3]] * 79
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"features": rows, "label": np.arange(200) % 3}), path, row_group_size=50)
    _cli_error(cli_run, tmp_path, path, "d.parquet", "'features' is ragged or has nulls")


@pytest.mark.parametrize("kind", ["parquet-columns", "parquet-list", "zarr", "npy"])
def test_nan_in_a_later_block(cli_run, tmp_path, kind):
    x, y = _data()
    x[301, 2] = np.nan
    path = _write(kind, tmp_path / f"d{_suffix(kind)}", x, y)
    _cli_error(cli_run, tmp_path, path, path.name, "NaN or infinite", "row 301", "clean the inputs")


def test_parquet_without_the_label_column(cli_run, tmp_path):
    x, _ = _data()
    path = _write("parquet-list", tmp_path / "d.parquet", x)
    _cli_error(cli_run, tmp_path, path, "data.source", "d.parquet", "no label column 'label'", "data.label_column")


def test_zarr_group_without_x(cli_run, tmp_path):
    x, y = _data()
    path = _write("zarr", tmp_path / "d", x, y)
    zarr.open_group(path, mode="a").__delitem__("x")
    line = _cli_error(cli_run, tmp_path, path, "no array 'x'", "found: y", "save inputs as 'x'")
    assert "_files" not in line


@pytest.mark.filterwarnings("ignore:The data type")
def test_zarr_inputs_of_strings(cli_run, tmp_path):
    path = tmp_path / "d"
    group = zarr.open_group(path, mode="w")
    group.create_array("x", shape=(10, 2), dtype="<U4")[:] = np.full((10, 2), "a")
    group.create_array("y", shape=(10,), dtype="int64")[:] = np.arange(10) % 2
    _cli_error(cli_run, tmp_path, path, "'x' must be a numeric array")


def test_gathered_npy_rows_are_read_not_mapped(tmp_path, monkeypatch):
    """A student's batch gathered from a .npy input is read with pread, so none of the file's pages
    become resident in the process (a fault on a mapping maps the page's whole folio: about 100 MB
    per batch was measured on a 1 GB input), also through a split of the file; rows and labels
    equal fancy indexing, in any order, with repeats."""
    from pipeline.inputs import arrays as data
    from pipeline.inputs.arrays import mapped_resident

    n = 65536
    d = tmp_path / "big"
    write_npy_dir(d, n, 256)  # 64 MB of float32
    rng = np.random.default_rng(0)
    ds = _load(d)
    ref_x, ref_y = np.load(d / "x.npy"), np.load(d / "y.npy")
    data.release(ds.x)  # the fingerprint pass's pages
    data.release(ds.y)
    monkeypatch.setattr(data, "release", lambda arr: None)  # pages a gather mapped would stay resident
    before = mapped_resident()
    for _ in range(50):
        pos = rng.integers(0, n, 256)
        pos[:4] = pos[0]  # repeats
        pos[4:12] = np.arange(100, 108)  # a run of adjacent rows
        xs, ys = ds.rows(ds.positions(pos))
        assert np.array_equal(xs, ref_x[pos]) and np.array_equal(ys, ref_y[pos]) and ys.dtype == np.int64
    grew = mapped_resident() - before
    assert grew < 4 << 20, f"{grew >> 20} MB of the input became resident"
    part = ds.subset(np.arange(n) % 3 != 0)  # a split (data.test_fraction) selects rows of the file
    keep = np.flatnonzero(np.arange(n) % 3 != 0)
    before = mapped_resident()
    for _ in range(50):
        pos = rng.integers(0, len(part), 256)
        xs, ys = part.rows(pos)
        assert np.array_equal(xs, ref_x[keep[pos]]) and np.array_equal(ys, ref_y[keep[pos]])
    xs, _ = part.rows(slice(1000, 1300))  # a range of a split is scattered rows of the file
    assert np.array_equal(xs, ref_x[keep[1000:1300]])
    grew = mapped_resident() - before
    assert grew < 4 << 20, f"{grew >> 20} MB of the input became resident through the split"
