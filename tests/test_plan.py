"""The epoch planner, read through the dataset the student stage and users' loops share: every row
once per epoch, reproducible, resumable, bounded reads."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.format import reader as fmt
from pipeline.format.encodings import Dense
from pipeline.format.manifest import write_manifest
from pipeline.format.shards import shard_entry, shard_name, write_shard
from pipeline.train.dataset import Cache


class Loader:
    """One process's batches of a cache as numpy dicts, by (epoch, first batch)."""

    def __init__(self, reader: fmt.CacheReader, batch_size: int, seed: int, shuffle_chunks: int) -> None:
        self.ds = Cache(reader.dir).dataset(batch_size, seed=seed, shuffle_chunks=shuffle_chunks)
        self.ds._reader = reader

    def __len__(self) -> int:
        return len(self.ds)

    def batches(self, epoch: int, start: int = 0):
        self.ds.seek(epoch, start)
        for b in self.ds:
            yield {k: v.numpy() for k, v in b.items() if hasattr(v, "numpy")}


@pytest.fixture
def reader(tmp_path):
    """A hand-made dense cache of 1000 rows in 3 shards of chunks of 64 rows."""
    enc = Dense(4, "float32")
    d = tmp_path / "c"
    spec = {"layout": {"chunk_rows": 64, "backend": "zarr", "rows_per_shard": 400}, "num_classes": 4,
            "encoding": enc.params(), "temperature": 1.0, "dataset": {"fingerprint": "x", "rows": 1000}}
    entries = []
    for i, start in enumerate(range(0, 1000, 400)):
        stop = min(start + 400, 1000)
        ids = np.arange(start, stop, dtype=np.int64)
        logp = np.tile(ids[:, None].astype(np.float32), (1, 4))  # row content = its id
        write_shard(d / "shards" / shard_name(i, "zarr"), {"sample_id": ids, "logp": logp}, {}, enc, 64, 3)
        entries.append(shard_entry(d, i, "zarr", start, stop - start))
    write_manifest(d, spec, entries, {})
    return fmt.CacheReader(d)


def test_each_row_once_per_epoch_and_targets_stay_with_their_ids(reader):
    loader = Loader(reader, batch_size=96, seed=1, shuffle_chunks=3)
    batches = list(loader.batches(epoch=0))
    assert len(batches) == len(loader) == 11
    ids = np.concatenate([b["sample_id"] for b in batches])
    assert sorted(ids.tolist()) == list(range(1000))
    for b in batches:
        assert (b["logp"][:, 0] == b["sample_id"]).all()


def test_order_is_shuffled_reproducible_and_changes_by_epoch(reader):
    loader = Loader(reader, batch_size=100, seed=1, shuffle_chunks=2)
    e0 = np.concatenate([b["sample_id"] for b in loader.batches(0)])
    again = np.concatenate([b["sample_id"] for b in loader.batches(0)])
    e1 = np.concatenate([b["sample_id"] for b in loader.batches(1)])
    assert np.array_equal(e0, again)
    assert not np.array_equal(e0, e1)
    assert not np.array_equal(e0, np.sort(e0))


@pytest.mark.parametrize("start", [1, 4, 7, 10])
def test_resume_at_batch_replays_the_same_batches(reader, start):
    loader = Loader(reader, batch_size=90, seed=3, shuffle_chunks=2)
    full = list(loader.batches(2))
    resumed = list(loader.batches(2, start=start))
    assert len(resumed) == len(full) - start
    for a, b in zip(full[start:], resumed):
        assert np.array_equal(a["sample_id"], b["sample_id"])


def test_memory_is_bounded_by_the_shuffle_buffer(reader, monkeypatch):
    """Reads run at most PREFETCH buffers ahead of the one being yielded, never the whole cache,
    and resuming skips reads."""
    from pipeline.train.dataset import PREFETCH

    reads: list[int] = []
    real = reader.read_joined
    monkeypatch.setattr(reader, "read_joined", lambda cs: (reads.extend(c.stop - c.start for c in cs), real(cs))[1])
    loader = Loader(reader, batch_size=50, seed=0, shuffle_chunks=2)
    it = loader.batches(0)
    next(it)
    it.close()  # waits for the buffer being read ahead
    assert 2 * 64 <= sum(reads) <= (1 + PREFETCH) * 2 * 64
    reads.clear()
    list(loader.batches(0, start=15))  # batch 15 starts at row 750
    assert 1000 - 750 <= sum(reads) <= 1000 - 750 + 2 * 64


def test_batches_mix_classes_across_the_whole_cache(tmp_path):
    """On a transfer set sorted by class (shards and chunks each hold one or two classes), the
    default loader's batches hold within 10% as many distinct classes as a uniform permutation's."""
    from pipeline.core.config import StudentConfig

    classes, per_class, chunk, batch = 10, 2048, 256, 64
    enc = Dense(2, "float32")
    d = tmp_path / "sorted"
    n = classes * per_class
    label = np.repeat(np.arange(classes), per_class)  # the cache's rows are sorted by class
    spec = {"layout": {"chunk_rows": chunk, "backend": "zarr", "rows_per_shard": 2048}, "num_classes": 2,
            "encoding": enc.params(), "temperature": 1.0, "dataset": {"fingerprint": "x", "rows": n}}
    entries = []
    for i, start in enumerate(range(0, n, 2048)):
        ids = np.arange(start, start + 2048, dtype=np.int64)
        write_shard(d / "shards" / shard_name(i, "zarr"),
                        {"sample_id": ids, "logp": np.zeros((2048, 2), np.float32)}, {}, enc, chunk, 1)
        entries.append(shard_entry(d, i, "zarr", start, 2048))
    write_manifest(d, spec, entries, {})
    loader = Loader(fmt.CacheReader(d), batch, seed=0, shuffle_chunks=StudentConfig().shuffle_chunks)
    ours = np.mean([len(np.unique(label[b["sample_id"]])) for e in range(2) for b in loader.batches(e)
                    if len(b["sample_id"]) == batch])
    perm = np.random.default_rng(0).permutation(n)
    uniform = np.mean([len(np.unique(label[perm[i:i + batch]])) for i in range(0, n - batch + 1, batch)])
    print(f"distinct classes per batch: {ours:.2f}, uniform permutation {uniform:.2f}")
    assert ours >= 0.9 * uniform, (ours, uniform)


def test_the_epoch_order_is_drawn_one_buffer_at_a_time(tmp_path):
    """Starting an epoch allocates its chunk order and one or two buffers, never a permutation of
    every row: 8 bytes a row would be 8 GB per epoch of a billion-token cache."""
    import tracemalloc

    n, chunk = 1 << 20, 4096
    enc = Dense(2, "float16")
    d = tmp_path / "big"
    spec = {"layout": {"chunk_rows": chunk, "backend": "zarr", "rows_per_shard": n}, "num_classes": 2,
            "encoding": enc.params(), "temperature": 1.0, "dataset": {"fingerprint": "x", "rows": n}}
    write_shard(d / "shards" / shard_name(0, "zarr"),
                    {"sample_id": np.arange(n), "logp": np.zeros((n, 2), np.float16)}, {}, enc, chunk, 1)
    write_manifest(d, spec, [shard_entry(d, 0, "zarr", 0, n)], {})
    loader = Loader(fmt.CacheReader(d), batch_size=1024, seed=0, shuffle_chunks=2)
    for start in (0, 700):  # from the top, and resuming deep into the epoch
        tracemalloc.start()
        it = loader.batches(0, start)
        first = next(it)
        peak = tracemalloc.get_traced_memory()[1]
        it.close()
        tracemalloc.stop()
        assert first["sample_id"].shape == (1024,)
        assert peak < (n * 8) // 4, f"{peak >> 20} MB allocated to start an epoch of {n} rows"
