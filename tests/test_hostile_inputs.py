"""Hostile input, round three: the environment, the config's own rules, the Python API, duplicate
sample ids, served log-probs, token files, input formats, model directories and the integrity
chain. Each case is refused (or, for damaged token files, rebuilt) with one line naming the file,
field, argument or variable and what to do; none ends in an "unexpected" line; nothing complete is
left behind and nothing is trained on damaged or ambiguous data."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, TESTS, tiny_config, write_config
from test_hostile import one_line_error
from test_import_logprobs import TEXTS, openai_row, teacher, vllm_row, write_jsonl
from test_tokenize import word_tokenizer

import pipeline as lc
from pipeline.core.config import AugmentConfig, load_config
from pipeline.core.errors import ArgumentError, CacheError, ConfigError
from pipeline.core.io import sha256_file
from pipeline.core.validate import ENV, FIELDS, env, problem
from pipeline.format.views import ViewSpec
from pipeline.format.writer import SeenIds
from pipeline.inputs import tokens
from pipeline.inputs.text import Tokenizer, train_tokenizer
from pipeline.run.identity import _teacher_files

SPEC = {"teacher": {"name": "t", "revision": "1"}, "dataset": {"fingerprint": "hostile"}}
C = 6


def _cfg(tmp_path, **sections) -> str:
    return str(write_config(tmp_path / "c.yaml", tiny_config(tmp_path, **sections)))


def _nothing_written(ws) -> None:
    """No cache, teacher, student or token output of any kind under the workspace."""
    for sub in ("caches", "teachers", "runs", "tokens"):
        assert not (ws / sub).exists() or not any((ws / sub).rglob("*")), sub


def _no_manifest(root) -> None:
    assert not (root.exists() and list(root.rglob("manifest.json")))


# =============================================================================================
# The environment: every LOGITCACHE_ variable is checked like a config field, before any work.

BAD_ENV = [
    ("LOGITCACHE_PROGRESS_INTERVAL", "30s", "a number of seconds >= 0"),
    ("LOGITCACHE_PROGRESS_INTERVAL", "-1", "a number of seconds >= 0"),
    ("LOGITCACHE_PROGRESS_INTERVAL", "nan", "a number of seconds >= 0"),
    ("LOGITCACHE_MAX_OPEN_SHARDS", "0", "a whole number >= 1"),
    ("LOGITCACHE_MAX_OPEN_SHARDS", "many", "a whole number >= 1"),
    ("LOGITCACHE_READ_THREADS", "-1", "a whole number >= 0"),
    ("LOGITCACHE_READ_THREADS", "2.5", "a whole number >= 0"),
    ("LOGITCACHE_LOCK_LEASE", "1m", "a number of seconds > 0"),
    ("LOGITCACHE_LOCK_LEASE", "-3", "a number of seconds > 0"),
    ("LOGITCACHE_TMP_GRACE", "soon", "a number of seconds >= 0"),
    ("LOGITCACHE_SHARD_CACHE_BYTES", "20GB", "a number of bytes >= 1"),
    ("LOGITCACHE_SHARD_CACHE_BYTES", "0", "a number of bytes >= 1"),
    ("LOGITCACHE_STEADY_HEAP", "yes", "1 (on) or 0 (off)"),
]


@pytest.mark.parametrize("name,value,fragment", BAD_ENV, ids=[f"{n[11:]}={v}" for n, v, _ in BAD_ENV])
def test_bad_environment_variable_stops_every_command_before_any_work(cli_run, tmp_path, monkeypatch, name, value,
                                                                      fragment):
    monkeypatch.setenv(name, value)
    one_line_error(cli_run("cache", _cfg(tmp_path), expect=None), f"{name}={value!r}", fragment, "or unset it")
    _nothing_written(tmp_path)
    with pytest.raises(ConfigError, match=name):  # the library reads it through the same rule
        env(name)


@pytest.mark.parametrize("name,kind", [("LOGITCACHE_DIGESTS", "dir"), ("LOGITCACHE_SHARD_CACHE", "file"),
                                       ("XDG_CACHE_HOME", "file")])
def test_path_variables_must_name_the_right_kind_of_path(cli_run, tmp_path, monkeypatch, name, kind):
    target = tmp_path / "target"
    target.mkdir() if kind == "dir" else target.write_text("x")
    monkeypatch.setenv(name, str(target))
    one_line_error(cli_run("caches", "ls", "--root", str(tmp_path), expect=None), name,
                   "names a directory" if kind == "dir" else "names a file")


def test_every_variable_read_is_in_the_table_and_the_docs():
    """grep the code for LOGITCACHE_ names and os.environ reads: each is in ENV (read through env())
    and in docs/runtime.md; only the OpenMP and malloc variables the CLI leaves to the user, whose
    presence alone is looked at, are not parsed here."""
    read = set()
    for folder in ("pipeline", "stages"):
        for f in (REPO / folder).rglob("*.py"):
            text = f.read_text()
            read |= set(re.findall(r"LOGITCACHE_[A-Z_]+[A-Z]", text))
            read |= set(re.findall(r"os\.environ(?:\.get\(|\[)\"([A-Z_]+)\"", text))
    presence_only = {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MALLOC_MMAP_THRESHOLD_"}
    assert read - presence_only <= set(ENV), read - presence_only - set(ENV)
    docs = (REPO / "docs" / "runtime.md").read_text()
    assert all(f"`{name}`" in docs for name in ENV)


# =============================================================================================
# Config fields whose nonsense used to be replaced by something that runs, or crashed later

BAD_FIELDS = [
    (["data.task=lm", "data.vocab_size=0"], "data.vocab_size: 0 must be in 258..16777216"),
    (["data.task=lm", "data.vocab_size=-5"], "data.vocab_size: -5 must be in 258"),
    (["data.task=lm", "data.vocab_size=99999999999"], "data.vocab_size: 99999999999 must be in 258"),
    (["data.task=lm", "data.max_sequences=0"], "data.max_sequences: 0 must be >= 1"),
    (["data.task=lm", "data.max_sequences=-4"], "data.max_sequences: -4 must be >= 1"),
    (["data.feature_columns=[a, label]"], "data.feature_columns: 'label' is data.label_column"),
    (["data.label_column=target", "data.feature_columns=[target]"], "'target' is data.label_column"),
    (["data.feature_columns=[a, sample_id]"], "'sample_id' is the sample id column"),
    (["data.feature_columns=[a, b, a]"], "'a' is listed twice"),
    (["data.feature_columns=[]"], "data.feature_columns: an empty list"),
    (["data.split_seed=-1"], "data.split_seed: -1 must be in 0.."),
    (["teachers.temperature=.nan"], "teachers.temperature: nan must be a finite number > 0"),
    (["student.alpha=.inf"], "student.alpha: inf must be a finite number in [0, 1]"),
    (["cache.views=70000"], "cache.views: 70000 must be in 0..65535"),
    (["cache.views=2", "augment.flip=0.5", "cache.chunk_rows=0"], "cache.chunk_rows: 0 must be >= 1"),
]


@pytest.mark.parametrize("overrides,fragment", BAD_FIELDS, ids=[" ".join(o)[:50] for o, _ in BAD_FIELDS])
def test_nonsense_settings_are_refused_before_any_work(cli_run, tmp_path, overrides, fragment):
    one_line_error(cli_run("run", _cfg(tmp_path), *overrides, expect=None), fragment)
    _nothing_written(tmp_path)


# =============================================================================================
# The Python API: its arguments follow the rules of the config fields they mirror, in their words


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    logits = torch.randn(96, C, generator=torch.Generator().manual_seed(0))
    with lc.CacheWriter(root, spec=SPEC, encoding="dense", num_classes=C, rows_per_shard=64, chunk_rows=32) as w:
        w.add(np.arange(96), logits=logits)
    return lc.open_cache(w.path)


BAD_DATASET = [
    ({"temperature": 0}, "temperature: 0 must be > 0"),
    ({"temperature": -2.0}, "temperature: -2.0 must be > 0"),
    ({"temperature": float("inf")}, "temperature: inf must be a finite number > 0"),
    ({"batch_size": 0}, "batch_size: 0 must be >= 1"),
    ({"batch_size": 12.5}, "batch_size: 12.5 must be a whole number >= 1"),
    ({"batch_size": True}, "batch_size: True must be a whole number"),
    ({"seed": -1}, "seed: -1 must be in 0.."),
    ({"shuffle_chunks": 0}, "shuffle_chunks: 0 must be >= 1"),
    ({"rank": -1}, "rank: -1 must be >= 0"),
    ({"world_size": 0}, "world_size: 0 must be >= 1"),
    ({"shuffle": "no"}, "shuffle: expected True or False"),
    ({"drop_last": 1}, "drop_last: expected True or False"),
    ({"augment": AugmentConfig(flip=1.5)}, "augment.flip: 1.5 must be in [0, 1]"),
    ({"augment": AugmentConfig(crop="padded")}, "augment.padding: crop padded needs padding >= 1"),
    ({"augment": {"flip": 0.5}}, "augment: expected an AugmentConfig"),
]


@pytest.mark.parametrize("kwargs,message", BAD_DATASET, ids=[str(k)[:40] for k, _ in BAD_DATASET])
def test_dataset_arguments(small_cache, kwargs, message):
    with pytest.raises(ArgumentError) as e:
        small_cache.dataset(**{"batch_size": 8, **kwargs})
    assert str(e.value).startswith(message), str(e.value)
    assert isinstance(e.value, ValueError)


def test_the_api_says_what_the_config_says(small_cache, tmp_path):
    """The same rule, the same words: only the name differs (the argument, or the config field)."""
    with pytest.raises(ConfigError) as from_config:
        load_config(None, ["student.temperature=-2"])
    with pytest.raises(ArgumentError) as from_api:
        small_cache.dataset(batch_size=8, temperature=-2.0)
    assert str(from_config.value) == "student." + str(from_api.value)
    assert str(from_api.value) == problem("temperature", -2.0, FIELDS["student.temperature"])


def _batch(cache, **kw):
    return next(iter(cache.dataset(batch_size=cache.rows, shuffle=False, **kw)))


BAD_LOSS = [
    ({"temperature": 0}, "temperature: 0 must be > 0"),
    ({"temperature": -2}, "temperature: -2 must be > 0"),
    ({"alpha": 2, "labels": "ids"}, "alpha: 2 must be in [0, 1]"),
    ({"alpha": -0.1, "labels": "ids"}, "alpha: -0.1 must be in [0, 1]"),
    ({"alpha": float("nan"), "labels": "ids"}, "alpha: nan must be a finite number"),
    ({"divergence": "kl"}, "divergence: 'kl' is not one of forward, reverse, jsd"),
    ({"tail": "flat"}, "tail: 'flat' is not one of uniform, bucket"),
    ({"alpha": 0.5, "labels": "float ids"}, "labels: float labels (96,) are label distributions"),
    ({"alpha": 0.5, "labels": "out of range"}, "labels: class id 6 outside [0, 6) (and not the ignored -100)"),
    ({"alpha": 0.5, "labels": "not a distribution"}, "labels: label distributions must be finite, >= 0, and sum"),
    ({"alpha": 0.5, "labels": "numpy"}, "labels: expected a tensor, got ndarray"),
    ({"logits": "numpy"}, "student_logits: expected a float tensor, got ndarray"),
]


def _labels(kind: str, n: int):
    return {"ids": torch.zeros(n, dtype=torch.long), "float ids": torch.zeros(n),
            "out of range": torch.full((n,), C), "not a distribution": torch.full((n, C), 0.5),
            "numpy": np.zeros(n, dtype=np.int64)}[kind]


@pytest.mark.parametrize("kwargs,message", BAD_LOSS, ids=[str(k)[:40] for k, _ in BAD_LOSS])
def test_kd_loss_arguments(small_cache, kwargs, message):
    batch = _batch(small_cache)
    n = len(batch["sample_id"])
    kwargs = dict(kwargs)
    logits = torch.randn(n, C)
    if kwargs.pop("logits", None) == "numpy":
        logits = logits.numpy()
    if "labels" in kwargs:
        kwargs["labels"] = _labels(kwargs["labels"], n)
    with pytest.raises(ArgumentError) as e:
        lc.kd_loss(logits, batch, **{"temperature": 1.0, **kwargs})
    assert str(e.value).startswith(message), str(e.value)


def test_kd_loss_takes_label_distributions(small_cache):
    """Soft labels (rows, C): alpha * CE against the distribution + (1 - alpha) * KD, as computed the slow way."""
    batch = _batch(small_cache)
    n = len(batch["sample_id"])
    s = torch.randn(n, C)
    y = torch.softmax(torch.randn(n, C), -1)
    got = lc.kd_loss(s, batch, 1.0, alpha=0.3, labels=y)
    p = batch["targets"]["logp"].float().exp()
    ce = -(y * F.log_softmax(s, -1)).sum(-1).mean()
    kd = (p * (p.log() - F.log_softmax(s, -1))).sum(-1).mean()
    assert got.item() == pytest.approx((0.3 * ce + 0.7 * kd).item(), rel=1e-4)
    onehot = F.one_hot(batch["sample_id"] % C, C).float()  # a one-hot distribution is the class id
    assert lc.kd_loss(s, batch, 1.0, alpha=1.0, labels=onehot).item() == pytest.approx(
        lc.kd_loss(s, batch, 1.0, alpha=1.0, labels=batch["sample_id"] % C).item(), rel=1e-5)


def test_class_ids_for_mixed_views_are_refused(small_cache):
    """A batch of mixed views (a partner per row) has no single class per row: y[sample_id] would train
    the cross-entropy on the wrong label of every mixed view. Its label distributions are accepted."""
    batch = dict(_batch(small_cache))
    n = len(batch["sample_id"])
    batch["partner"] = torch.where(torch.arange(n) % 2 == 0, torch.arange(n).flip(0), torch.full((n,), -1))
    with pytest.raises(ArgumentError, match=r"mixed views .* pass labels=batch\['labels'\]"):
        lc.kd_loss(torch.randn(n, C), batch, 1.0, alpha=0.5, labels=batch["sample_id"] % C)
    lam = torch.full((n, 1), 0.7)
    mixed = F.one_hot(batch["sample_id"] % C, C) * lam + F.one_hot(batch["partner"].clamp(min=0) % C, C) * (1 - lam)
    assert torch.isfinite(lc.kd_loss(torch.randn(n, C), batch, 1.0, alpha=0.5, labels=mixed))


BAD_WRITER = [
    ({"temperature": 0}, "temperature: 0 must be > 0"),
    ({"rows_per_shard": 0}, "rows_per_shard: 0 must be >= 1"),
    ({"chunk_rows": -1}, "chunk_rows: -1 must be >= 1"),
    ({"num_classes": 1}, "num_classes: 1 must be >= 2"),
    ({"seed": -3}, "seed: -3 must be in 0.."),
    ({"seq_len": 0}, "seq_len: 0 must be >= 1"),
    ({"backend": "hdf5"}, "backend: 'hdf5' is not one of zarr, parquet"),
    ({"codec": "lz"}, "codec: 'lz' is not one of zstd"),
    ({"encoding": "topk8"}, "encoding name: 'topk8' is not one of"),
    ({"encoding": lc.TopK(C, 0)}, "encoding k: 0 must be >= 1"),
    ({"encoding": 3}, "encoding: 3 is not an encoding"),
    ({"spec": {"teacher": object(), "dataset": "d"}}, "spec: not plain JSON data"),
    ({"root": ""}, "root: '' is not a directory"),
]


@pytest.mark.parametrize("kwargs,message", BAD_WRITER, ids=[str(k)[:40] for k, _ in BAD_WRITER])
def test_cache_writer_arguments(tmp_path, kwargs, message):
    args = {"root": tmp_path / "caches", "spec": SPEC, "encoding": "dense", "num_classes": C, **kwargs}
    with pytest.raises(ArgumentError) as e:
        lc.CacheWriter(**args)
    assert str(e.value).startswith(message), str(e.value)
    assert not (tmp_path / "caches").exists()


def test_other_public_functions_check_their_arguments(small_cache):
    ds = small_cache.dataset(batch_size=8)
    for call, message in [
        (lambda: lc.open_cache(""), "id_or_path: '' is not a cache id"),
        (lambda: lc.open_cache(3), "id_or_path: 3 is not a cache id"),
        (lambda: lc.open_cache(small_cache.path, verify="yes"), "verify: expected True or False"),
        (lambda: ds.set_epoch(-1), "epoch: -1 must be >= 0"),
        (lambda: ds.seek(0, -2), "batches: -2 must be >= 0"),
        (lambda: ds.state_dict(batches=1.5), "batches: 1.5 must be a whole number"),
        (lambda: ds.load_state_dict({"epoch": 0}), "state: no 'spans'"),
        (lambda: ds.load_state_dict({**ds.state_dict(), "batches": -1}), "state['batches']: -1 must be >= 0"),
        (lambda: ds.loader(num_workers=-1), "num_workers: -1 must be >= 0"),
        (lambda: lc.to_device({"x": torch.zeros(1)}, "gpu0"), "device: 'gpu0' is not a device"),
        (lambda: lc.replay_views({}, np.zeros((1, 1, 4, 4)), None), "views: expected the cache's views"),
    ]:
        with pytest.raises(ArgumentError) as e:
            call()
        assert str(e.value).startswith(message), str(e.value)


# =============================================================================================
# Duplicate sample ids: refused wherever rows enter


@pytest.mark.parametrize("calls", [
    [[0, 1, 2, 1]],  # within one call
    [[0, 1, 2], [3, 2]],  # across calls
    [list(range(40)), list(range(40, 70)), [5]],  # across shards (rows_per_shard 32)
], ids=["one call", "two calls", "two shards"])
def test_cache_writer_refuses_a_repeated_sample_id(tmp_path, calls):
    writer = lc.CacheWriter(tmp_path, spec=SPEC, encoding="dense", num_classes=C, rows_per_shard=32, chunk_rows=16)
    with pytest.raises(ArgumentError, match=r"add: sample id \d+ was already added"), writer as w:
        for ids in calls:
            w.add(ids, logits=torch.randn(len(ids), C))
    _no_manifest(tmp_path)


def test_cache_writer_refuses_ids_that_are_not_integers(tmp_path):
    writer = lc.CacheWriter(tmp_path, spec=SPEC, encoding="dense", num_classes=C)
    with pytest.raises(ArgumentError, match="sample_ids must be integers, got float64"), writer as w:
        w.add(np.array([0.0, 1.5]), logits=torch.randn(2, C))
    _no_manifest(tmp_path)


def test_seen_ids_finds_any_repeat_among_many_batches():
    seen, order = SeenIds(), np.random.default_rng(0).permutation(20_000)
    for i in range(0, len(order), 37):
        assert seen.add(order[i:i + 37]) is None
    assert len(seen.runs) <= 16  # a logarithmic number of sorted runs
    assert all(seen.add(np.array([x])) == x for x in order[::501])


def _xy_npz(path, ids):
    np.savez(path, x=np.random.rand(len(ids), 4).astype(np.float32), y=np.arange(len(ids)) % 3, ids=np.asarray(ids))
    return str(path)


def _parquet(path, **columns):
    pq.write_table(pa.table(columns), path)
    return str(path)


def _zarr(path, **arrays):
    import zarr

    g = zarr.open_group(str(path), mode="w")
    for name, a in arrays.items():
        g.create_array(name, shape=a.shape, chunks=(10, *a.shape[1:]), dtype=a.dtype)[:] = a
    return str(path)


def _npy_dir(path, ids):
    path.mkdir()
    np.save(path / "x.npy", np.random.rand(len(ids), 4).astype(np.float32))
    np.save(path / "y.npy", np.arange(len(ids)) % 3)
    np.save(path / "ids.npy", np.asarray(ids))
    return str(path)


IDS = [*range(20), 7, *range(21, 40)]  # 7 twice, at rows 7 and 20

DUP_SOURCES = {
    "npz": (lambda p: _xy_npz(p / "d.npz", IDS), "array 'ids' holds sample id 7 twice (rows 7 and 20)"),
    "npy dir": (lambda p: _npy_dir(p / "d", IDS), "array 'ids' holds sample id 7 twice"),
    "parquet": (lambda p: _parquet(p / "d.parquet", a=np.random.rand(40), b=np.random.rand(40),
                                   label=np.arange(40) % 3, sample_id=np.asarray(IDS)),
                "column 'sample_id' holds sample id 7 twice (rows 7 and 20)"),
    "zarr": (lambda p: _zarr(p / "d.zarr", x=np.random.rand(40, 4).astype(np.float32), y=np.arange(40) % 3,
                             ids=np.asarray(IDS)), "array 'ids' holds sample id 7 twice"),
}


@pytest.mark.parametrize("kind", list(DUP_SOURCES))
def test_input_files_with_a_repeated_id_are_refused(cli_run, tmp_path, kind):
    make, message = DUP_SOURCES[kind]
    one_line_error(cli_run("teachers", _cfg(tmp_path, data={"source": make(tmp_path)}), expect=None),
                   message, "each must be unique")
    _nothing_written(tmp_path)


# =============================================================================================
# Input formats: messages name the user's columns and files


BAD_PARQUET = [
    ({"label": np.array([0.0, 1.0, np.nan, 2.0] * 10)}, {}, "column 'label' (data.label_column) holds nulls"),
    ({"target": np.array(["cat", "dog"] * 20)}, {"label_column": "target"},
     "column 'target' (data.label_column) must hold integer class labels, got object"),
    ({"label": np.arange(40) % 3, "sample_id": np.array([1.5] + list(range(1, 40)))}, {},
     "column 'sample_id' must hold integer sample ids"),
    ({"label": np.arange(40) % 3, "sample_id": pa.array([None] + list(range(1, 40)), pa.int64())}, {},
     "column 'sample_id' holds nulls"),
]


@pytest.mark.parametrize("columns,data,message", BAD_PARQUET, ids=["label nulls", "label strings", "float ids",
                                                                    "null ids"])
def test_parquet_messages_name_the_configured_columns(cli_run, tmp_path, columns, data, message):
    src = _parquet(tmp_path / "d.parquet", a=np.random.rand(40), b=np.random.rand(40), **columns)
    line = one_line_error(cli_run("teachers", _cfg(tmp_path, data={"source": src, **data}), expect=None),
                          "d.parquet", message)
    assert "'y'" not in line and "'ids'" not in line
    _nothing_written(tmp_path)


def _damage_zarr(group, target: str) -> None:
    if target == "x chunk":
        (group / "x" / "c" / "1" / "0").write_bytes(b"\x28\xb5\x2f\xfd\x00")  # a zstd frame cut short
    elif target == "y chunk":
        f = group / "y" / "c" / "2"
        f.write_bytes(f.read_bytes()[:7])
    else:
        (group / "y" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "arr')


@pytest.mark.parametrize("target,message", [
    ("x chunk", "array 'x' cannot be read at rows 10..20"),
    ("y chunk", "array 'y' cannot be read at rows 20..30"),
    ("y metadata", "array 'y' cannot be opened"),
])
def test_a_damaged_zarr_input_names_its_file(cli_run, tmp_path, target, message):
    group = tmp_path / "d.zarr"
    _zarr(group, x=np.random.rand(40, 4).astype(np.float32), y=np.arange(40) % 3)
    _damage_zarr(group, target)
    line = one_line_error(cli_run("teachers", _cfg(tmp_path, data={"source": str(group)}), expect=None),
                          "data.source", message)
    assert "unexpected" not in line
    if target != "y metadata":
        assert f"chunk file {group / target[0] / 'c'}" in line
    _nothing_written(tmp_path)


# =============================================================================================
# import-logprobs


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("served")
    train_tokenizer(TEXTS * 20, 300, d / "tok")
    tok = Tokenizer(d / "tok")
    rows = [vllm_row(tok, t, i, teacher(tok, len(tok.hf.encode(t).ids), i)) for i, t in enumerate(TEXTS)]
    return d, rows, tok


def _import(cli_run, tmp_path, served, rows=None, raw: bytes | None = None, *extra: str, out=None):
    d, good, _tok = served
    f = tmp_path / "served.jsonl"
    if raw is not None:
        f.write_bytes(raw)
    else:
        write_jsonl(f, good if rows is None else rows)
    args = ["import-logprobs", str(f), "--tokenizer", str(d / "tok"), "--out", str(out or tmp_path / "caches"),
            "--top-n", "5", "--rows-per-shard", "8", "--chunk-rows", "4", *extra]
    return cli_run(*args, expect=None)


def _line(row) -> bytes:
    return (json.dumps(row) + "\n").encode()


IMPORT_CASES = {
    "two lines with one id": (lambda rows: b"".join(_line({**r, "id": 0 if i == 2 else r["id"]})
                                                    for i, r in enumerate(rows)),
                              ["served.jsonl:3: id 0 was already given on line 1"]),
    "repeated default id": (lambda rows: b"".join(_line({k: v for k, v in r.items() if k != "id"} if i < 3
                                                        else {**r, "id": 0}) for i, r in enumerate(rows)),
                            ["served.jsonl:4: id 0 was already given on line 1"]),
    "empty file": (lambda rows: b"", ["served.jsonl: no records", "one JSON object per prompt"]),
    "only blank lines": (lambda rows: b"\n  \n\n", ["served.jsonl: no records"]),
    "latin-1 line": (lambda rows: _line(rows[0]) + '{"id": 9, "text": "caf\u00e9"}\n'.encode("latin-1"),
                     ["served.jsonl:2: not UTF-8 text", "save the file as UTF-8"]),
    "id beyond int64": (lambda rows: _line({**rows[0], "id": 2**64}), ["served.jsonl:1: 'id' must be an integer"]),
    "id true": (lambda rows: _line({**rows[0], "id": True}), ["served.jsonl:1: 'id' must be an integer"]),
}


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_import_refuses_a_bad_file_naming_it(cli_run, tmp_path, served, case):
    make, fragments = IMPORT_CASES[case]
    line = one_line_error(_import(cli_run, tmp_path, served, None, make(served[1])), *fragments)
    assert "unexpected" not in line and "no rows were added" not in line
    _no_manifest(tmp_path)


@pytest.mark.parametrize("extra,message", [
    (["--top-n", "0"], "--top-n: 0 must be in 1..20"),
    (["--top-n", "21"], "--top-n: 21 must be in 1..20"),
    (["--rows-per-shard", "0"], "--rows-per-shard: 0 must be >= 1"),
    (["--chunk-rows", "-4"], "--chunk-rows: -4 must be >= 1"),
    (["--teacher", " "], "--teacher: empty"),
])
def test_import_options_follow_the_config_rules(cli_run, tmp_path, served, extra, message):
    one_line_error(_import(cli_run, tmp_path, served, None, None, *extra), message)
    assert not (tmp_path / "caches").exists()


def test_import_out_under_a_file_or_a_bad_tokenizer(cli_run, tmp_path, served):
    (tmp_path / "afile").write_text("x")
    one_line_error(_import(cli_run, tmp_path, served, out=tmp_path / "afile" / "caches"),
                   "--out:", "is a file, not a directory")
    d = served[0]
    f = write_jsonl(tmp_path / "s.jsonl", served[1])
    one_line_error(cli_run("import-logprobs", str(f), "--tokenizer", str(d / "nope"), "--out", str(tmp_path / "c"),
                           "--top-n", "5", expect=None), "--tokenizer:", "has no tokenizer.json")
    assert not (tmp_path / "c").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_import_out_read_only(cli_run, tmp_path, served):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        one_line_error(_import(cli_run, tmp_path, served, out=ro / "caches"), "--out:", "cannot write")
    finally:
        ro.chmod(0o755)


def test_import_of_both_forms_still_works(cli_run, tmp_path, served):
    _d, rows, tok = served
    both = rows[:2] + [openai_row(tok, t, i + 2, teacher(tok, len(tok.hf.encode(t).ids), i + 2))
                       for i, t in enumerate(TEXTS[2:])]
    out = _import(cli_run, tmp_path, served, both)
    assert out.exit_code == 0, out.output
    assert lc.open_cache(out.output.split()[1].rstrip(":"), root=tmp_path / "caches").rows > 0


# =============================================================================================
# Token files: verified where the token directory is opened; a damaged one is rebuilt, never used


@pytest.fixture
def lm_ws(tmp_path):
    rng = np.random.default_rng(0)
    word_tokenizer(tmp_path / "tok", 40)
    docs = [" ".join(f"w{i}" for i in rng.integers(0, 40, 30)) for _ in range(40)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs))
    cfg = tiny_config(tmp_path, data={"task": "lm", "source": str(tmp_path / "corpus.txt"),
                                      "tokenizer": str(tmp_path / "tok"), "seq_len": 8},
                      teachers={"members": [{"name": "g", "arch": "gpt", "layers": 1, "d_model": 16, "heads": 2}]},
                      cache={"encoding": "topk", "k": 4, "rows_per_shard": 64, "chunk_rows": 32},
                      student={"models": [{"name": "s", "arch": "gpt", "layers": 1, "d_model": 16, "heads": 2}]})
    return tmp_path, str(write_config(tmp_path / "c.yaml", cfg))


def _flip(f):
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x21
    f.write_bytes(bytes(data))


DAMAGE = {
    "flipped byte": (lambda d: _flip(d / "train.bin"), "train.bin: its sha256 differs from the manifest's"),
    "truncated": (lambda d: os.truncate(d / "train.bin", 100), "train.bin: 100 bytes, but the manifest records"),
    "empty test file": (lambda d: os.truncate(d / "test.bin", 0), "test.bin: 0 bytes"),
    "offsets deleted": (lambda d: (d / "train.offsets.npy").unlink(), "train.offsets.npy: missing"),
    "offsets edited": (lambda d: _flip(d / "test.offsets.npy"), "test.offsets.npy: its sha256 differs"),
    "manifest deleted": (lambda d: (d / "manifest.json").unlink(), "without manifest.json"),
    "manifest dtype": (lambda d: (d / "manifest.json").write_text(
        (d / "manifest.json").read_text().replace('"uint16"', '"float99"')), "dtype is not a dtype"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_token_files_are_rebuilt_never_used(cli_run, lm_ws, damage):
    ws, path = lm_ws
    cli_run("tokenize", path)
    d = next((ws / "tokens").iterdir())
    good = {f.name: sha256_file(f) for f in d.iterdir() if f.suffix in (".bin", ".npy")}
    hurt, message = DAMAGE[damage]
    hurt(d)
    out = cli_run("tokenize", path).output
    assert message in out and "tokenizing again" in out, out
    assert tokens.token_problem(d) is None
    assert {f.name: sha256_file(f) for f in d.iterdir() if f.suffix in (".bin", ".npy")} == good
    assert [p.name for p in (ws / "tokens").iterdir()] == [d.name]  # the damaged copy is gone, no temp left


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_an_empty_corpus_is_not_tokenized(cli_run, lm_ws, text):
    ws, path = lm_ws
    (ws / "corpus.txt").write_text(text)
    one_line_error(cli_run("tokenize", path, expect=None), "data.source", "corpus.txt holds no documents")
    assert not (ws / "tokens").exists() or not [p for p in (ws / "tokens").iterdir() if not p.name.startswith(".")]


def test_a_split_that_leaves_no_training_text_blames_test_fraction(cli_run, lm_ws):
    ws, path = lm_ws
    one_line_error(cli_run("teachers", path, "data.test_fraction=0.99", expect=None),
                   "too little text for one training sequence", "data.test_fraction=0.99 is held out",
                   "a smaller test_fraction")
    assert not (ws / "teachers").exists()


def test_a_truncated_token_file_never_reaches_a_stage(cli_run, lm_ws):
    """`teachers` (any stage) opens the token directory through the same check: rebuilt, then trained."""
    ws, path = lm_ws
    cli_run("tokenize", path)
    d = next((ws / "tokens").iterdir())
    os.truncate(d / "train.bin", 10)
    out = cli_run("teachers", path, "teachers.epochs=1").output
    assert "train.bin: 10 bytes" in out and "tokenizing again" in out and "unexpected" not in out
    assert tokens.token_problem(d) is None


# =============================================================================================
# Model directories: an hf teacher's config.json is checked before a cache writes anything


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("hf") / "model"
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=42, n_positions=16, n_embd=16,
                                                                 n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0))
    model.save_pretrained(d)
    return d


HF_DAMAGE = {
    "not JSON": (lambda d: (d / "config.json").write_text("{not json"), "config.json is not valid JSON"),
    "a list": (lambda d: (d / "config.json").write_text("[1, 2]"), "not a transformers model config"),
    "no model_type": (lambda d: (d / "config.json").write_text('{"vocab_size": 42}'), "no model_type"),
    "vocab_size text": (lambda d: (d / "config.json").write_text('{"model_type": "gpt2", "vocab_size": "42"}'),
                        "vocab_size '42' is not a whole number"),
    "unknown model_type": (lambda d: (d / "config.json").write_text('{"model_type": "no_such_model"}'),
                           "transformers cannot read it"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "holds no weights"),
}


@pytest.mark.parametrize("damage", list(HF_DAMAGE))
def test_a_broken_hf_model_directory_is_refused_before_the_cache_writes(cli_run, lm_ws, hf_dir, damage):
    ws, _path = lm_ws
    model = ws / "model"
    shutil.copytree(hf_dir, model)
    hurt, message = HF_DAMAGE[damage]
    hurt(model)
    cfg = load_config(_path)
    raw = tiny_config(ws, data={"task": "lm", "source": cfg.data.source, "tokenizer": cfg.data.tokenizer, "seq_len": 8},
                      teachers={"members": [{"name": "h", "arch": "hf", "path": str(model)}]},
                      cache={"encoding": "topk", "k": 4, "rows_per_shard": 64, "chunk_rows": 32},
                      student={"models": [{"name": "s", "arch": "gpt", "layers": 1, "d_model": 16, "heads": 2}]})
    line = one_line_error(cli_run("cache", str(write_config(ws / "hf.yaml", raw)), expect=None),
                          "teachers.members.0.path", message)
    assert "unexpected" not in line
    assert not list(ws.glob("caches/*/spec.json")) and not list(ws.glob("caches/*/shards/*"))


# =============================================================================================
# The integrity chain: one verification, which says what is wrong with which file


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from stages import cache as cache_stage
    from stages import teachers as teacher_stage

    ws = tmp_path_factory.mktemp("chain")
    path = write_config(ws / "c.yaml", tiny_config(ws, teachers={"epochs": 2}, student={"epochs": 1}))
    teacher_stage.main(load_config(path))
    return ws, path, cache_stage.main(load_config(path))


def _fresh(chain, tmp_path):
    _ws, path, d = chain
    dst = tmp_path / "root" / d.name
    shutil.copytree(d, dst)
    return path, dst


def test_an_edited_record_is_not_trusted_at_finalize(cli_run, chain, tmp_path):
    path, d = _fresh(chain, tmp_path)
    manifest = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").unlink()
    side = d / "digests" / "00001.zarr.json"
    side.write_text(json.dumps({**json.loads(side.read_text()), "sha256": "0" * 64}))
    out = cli_run("cache", str(path), f"cache.root={d.parent}").output
    assert "00001.zarr was edited or damaged" in out and "complete" in out
    assert json.loads((d / "manifest.json").read_text())["shards"] == manifest["shards"]
    assert lc.open_cache(d, verify=True).rows == manifest["rows"]


def test_an_edited_manifest_is_named_and_the_advice_ends_well(cli_run, chain, tmp_path):
    path, d = _fresh(chain, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["shards"][1]["sha256"] = "1" * 64
    (d / "manifest.json").write_text(json.dumps(m))
    student = ["student", str(path), f"workspace={tmp_path}", f"student.cache={d}"]
    one_line_error(cli_run(*student, expect=None), "shards/00001.zarr", "the manifest was edited, not the shard",
                   f"delete {d / 'manifest.json'}")
    assert not list(tmp_path.rglob("done.json"))
    (d / "manifest.json").unlink()  # the advice: finalize again from the records; nothing recomputed
    out = cli_run("cache", str(path), f"cache.root={d.parent}").output
    assert "0 of 4 shards to compute" in out and "complete" in out
    cli_run(*student)
    assert list(tmp_path.rglob("done.json"))


def test_caches_inspect_verify_names_a_damaged_shard(cli_run, chain, tmp_path):
    _path, d = _fresh(chain, tmp_path)
    victim = max((p for p in (d / "shards" / "00002.zarr").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    _flip(victim)
    one_line_error(cli_run("caches", "inspect", d.name, "--root", str(d.parent), "--verify", expect=None),
                   "shards/00002.zarr: checksum mismatch, the shard is corrupt", "delete it and rerun")


def test_running_out_of_file_handles_is_not_a_damaged_shard(tmp_path):
    """A real `ulimit -n` below the reader's open shard files: EMFILE and LOGITCACHE_MAX_OPEN_SHARDS are
    named, the shard is not blamed; with fewer open shards the same limit reads the whole cache."""
    root = tmp_path / "caches"
    with lc.CacheWriter(root, spec=SPEC, encoding="dense", num_classes=C, backend="parquet", rows_per_shard=8,
                        chunk_rows=8) as w:
        w.add(np.arange(480), logits=torch.randn(480, C))
    script = textwrap.dedent(f"""
        import resource, sys
        import pipeline as lc
        from pipeline.core.errors import ConfigError
        cache = lc.open_cache({str(w.path)!r})
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
        try:
            print(len(next(iter(cache.dataset(batch_size=480, shuffle_chunks=60)))["sample_id"]))
        except ConfigError as e:
            print("refused:", e)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    run = [sys.executable, "-c", script]
    out = subprocess.run(run, env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.startswith("refused:") and "too many open files (EMFILE)" in out, out
    assert "LOGITCACHE_MAX_OPEN_SHARDS" in out and "the shard itself is fine" in out and "corrupt" not in out
    env["LOGITCACHE_MAX_OPEN_SHARDS"] = "8"
    assert subprocess.run(run, env=env, capture_output=True, text=True, timeout=120, check=True).stdout == "480\n"


def test_out_of_handles_while_hashing_is_said_as_such(chain, tmp_path, monkeypatch):
    from pipeline.format import reader

    _path, d = _fresh(chain, tmp_path)

    def emfile(path):
        raise OSError(errno.ENFILE, "Too many open files in system")

    monkeypatch.setattr(reader, "whole_tree_digest", emfile)
    with pytest.raises(ConfigError, match=r"open files is full \(ENFILE\).*LOGITCACHE_MAX_OPEN_SHARDS"):
        reader.CacheReader(d, verify=True)


def test_a_module_shared_by_teachers_is_one_file(tmp_path, monkeypatch, cli_run):
    """Three imported teachers from one module: their source file is counted once, so a student that
    finds its cache reports no absent teacher file when none is."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "zoo3.py").write_text("from torch import nn\n\ndef mlp(inputs=64, classes=10):\n"
                                      "    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, classes))\n")
    members = []
    for i in range(3):
        ckpt = tmp_path / f"t{i}.pt"
        torch.save(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).state_dict(), ckpt)
        members.append({"name": f"t{i}", "arch": "import", "factory": "zoo3:mlp", "checkpoint": str(ckpt)})
    path = _cfg(tmp_path, teachers={"members": members}, student={"epochs": 1})
    from pipeline.inputs.splits import load_splits
    from pipeline.models.ensemble import teacher_refs

    cfg = load_config(path)
    files = _teacher_files(teacher_refs(cfg, load_splits(cfg)))
    assert len(files) == len(set(files)) == 4  # three checkpoints and one module
    cli_run("cache", path)
    out = cli_run("student", path).output
    assert "absent" not in out


# =============================================================================================
# Views: what cannot be replayed is refused


def _views_spec(**augment):
    return {"views": {"format": 2, "count": 2, "seed": 0, "augment": {"crop": "none", "flip": 0.5, **augment}},
            "dataset": {"input_shape": [1, 8, 8]}}


@pytest.mark.parametrize("augment,message", [
    ({"colour_jitter": 0.4}, "augment settings this version cannot replay (colour_jitter)"),
    ({"flip": 3.0}, "augmentation is invalid (augment.flip: 3.0 must be in [0, 1])"),
])
def test_views_that_cannot_be_replayed_are_refused(augment, message):
    with pytest.raises(CacheError, match=re.escape(message)):
        ViewSpec.of(_views_spec(**augment), "some-cache")
    assert ViewSpec.of(_views_spec(), "some-cache").augment.flip == 0.5
