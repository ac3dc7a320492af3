"""Train, test and transfer splits of a config's data: arrays, tables and tokenized corpora.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import Config, DataConfig
from pipeline.core.errors import DataError
from pipeline.inputs.arrays import Dataset, IdRange, MappedRows, Splits, check_file, concat, release
from pipeline.inputs.documents import open_corpus
from pipeline.inputs.rows import LazyRows, is_zarr_group, open_parquet, open_zarr
from pipeline.inputs.tokens import read_manifest, sequences, tokenize


def load_splits(config: Config) -> Splits:
    """Load train/test/transfer data as the config says, and check labels against the class count.

    Loaded once per process (per Dask worker) for each config and file state."""
    cfg = config.data
    paths = [p for p in (cfg.source, cfg.test_source, cfg.transfer.source, cfg.tokenizer, *cfg.transfer.append)
             if p and Path(p).exists()]
    stamps = tuple((p, Path(p).stat().st_mtime_ns, Path(p).stat().st_size) for p in paths)
    if cfg.task == "lm":
        return load_lm_splits(cfg, config.workspace, stamps)
    return _load_splits(cfg, stamps)


@functools.lru_cache(maxsize=4)
def _load_splits(cfg: DataConfig, stamps: tuple) -> Splits:
    if cfg.source == "digits":
        full = _digits()
        train, test = _split(full, cfg.test_fraction, cfg.split_seed)
    else:
        arrays = _read(cfg.source, "data.source", cfg, labelled=True)
        train = _dataset(arrays, "x", "y", cfg.source, labelled=True)
        if cfg.test_source is not None:
            test = _dataset(_read(cfg.test_source, "data.test_source", cfg, labelled=True), "x", "y",
                            cfg.test_source, True)
        elif "x_test" in arrays:
            test = _dataset(arrays, "x_test", "y_test", cfg.source, labelled=True)
        else:
            train, test = _split(train, cfg.test_fraction, cfg.split_seed)
    if test.x.shape[1:] != train.x.shape[1:]:
        raise DataError(f"{test.source}: test inputs have shape {test.x.shape[1:]}, training inputs "
                        f"{train.x.shape[1:]}; give test data with the same features")
    assert train.y is not None and test.y is not None
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"{cfg.source}: too few rows to hold out data.test_fraction={cfg.test_fraction} "
                        "and still train; give more rows or a separate data.test_source")
    num_classes = cfg.num_classes if cfg.num_classes is not None else int(max(train.y.max(), test.y.max())) + 1
    release(train.y)
    release(test.y)
    for d in (train, test):
        _check_labels(d, num_classes, explicit=cfg.num_classes is not None)

    if cfg.transfer.source is None:
        transfer = train
    else:
        transfer = _dataset(_read(cfg.transfer.source, "data.transfer.source", cfg, labelled=False), "x", "y",
                            cfg.transfer.source, labelled=False)
        if transfer.x.shape[1:] != train.x.shape[1:]:
            raise DataError(f"{transfer.source}: transfer inputs have shape {transfer.x.shape[1:]}, "
                            f"training inputs {train.x.shape[1:]}; give data with the same features")
        if transfer.y is not None:
            _check_labels(transfer, num_classes, explicit=True)
    if cfg.transfer.append:
        parts = [transfer]
        for i, path in enumerate(cfg.transfer.append):
            key = f"data.transfer.append.{i}"
            more = _dataset(_read(path, key, cfg, labelled=False), "x", "y", path, labelled=False)
            if more.x.shape[1:] != train.x.shape[1:]:
                raise DataError(f"{key}: {path} has inputs of shape {more.x.shape[1:]}, training inputs "
                                f"{train.x.shape[1:]}; give data with the same features")
            if more.y is not None:
                _check_labels(more, num_classes, explicit=True)
            parts.append(more)
        transfer = concat(parts, " + ".join(p.source for p in parts))
    if cfg.transfer.exclude_classes:
        outside = [k for k in cfg.transfer.exclude_classes if not 0 <= k < num_classes]
        if outside:
            raise DataError(f"data.transfer.exclude_classes: {outside[0]} is not a class of {cfg.source} "
                            f"(classes 0..{num_classes - 1})")
        if transfer.y is None:
            raise DataError(f"data.transfer.exclude_classes: {transfer.source} has no labels to exclude by")
        transfer = transfer.subset(~np.isin(transfer.y, cfg.transfer.exclude_classes),
                                   f"exclude:{sorted(cfg.transfer.exclude_classes)}")
        if len(transfer) == 0:
            raise DataError("data.transfer.exclude_classes: every transfer row was excluded")
    return Splits(train=train, test=test, transfer=transfer, num_classes=num_classes)


@functools.lru_cache(maxsize=1)
def _digits() -> Dataset:
    from sklearn.datasets import (
        load_digits,  # ships with scikit-learn, nothing is downloaded
    )

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]  # (1797, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    return Dataset(x, y, np.arange(len(y), dtype=np.int64), "digits")


def _split(d: Dataset, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    perm = np.random.default_rng(seed).permutation(len(d))
    n_test = max(1, round(len(d) * test_fraction))
    test_mask = np.zeros(len(d), dtype=bool)
    test_mask[perm[:n_test]] = True
    which = f"split:{test_fraction}:{seed}"
    return d.subset(~test_mask, f"{which}:train"), d.subset(test_mask, f"{which}:test")


NPY_ARRAYS = ("x", "y", "ids", "x_test", "y_test", "ids_test")


def _read(path: str, key: str, cfg: DataConfig, labelled: bool) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir() and (p / "x.npy").is_file():
        return _read_npy_dir(p, key)
    if is_zarr_group(p):
        return open_zarr(p, key, NPY_ARRAYS)
    if p.is_dir():
        raise DataError(f"{key}: {path} is a directory without x.npy; give an .npz or .parquet file, a Zarr "
                        "group or a directory of .npy arrays (x, y, optional ids, x_test, y_test)")
    p = check_file(path, key, "an .npz or .parquet file, a Zarr group, a directory of .npy arrays, or 'digits'")
    if p.suffix == ".npz":
        if p.stat().st_size == 0:
            raise DataError(f"{key}: {path} is empty (0 bytes); write it with numpy.savez")
        try:
            with np.load(p, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception as e:  # truncated or foreign files raise BadZipFile, EOFError, zlib.error, ...
            lines = str(e).strip().splitlines()
            why = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
            raise DataError(f"{key}: {path}: cannot read as .npz ({why}); is it truncated? "
                            "write it with numpy.savez") from None
    if p.suffix in (".parquet", ".pq"):
        return open_parquet(p, key, cfg.label_column, cfg.feature_columns, labelled)
    raise DataError(f"{key}: {path} has suffix {p.suffix!r}; use .npz or .parquet")


def _read_npy_dir(p: Path, key: str) -> dict[str, Any]:
    """The .npy arrays of a directory, memory-mapped (read-only); never loaded whole."""
    out: dict[str, Any] = {"_files": {}}
    for name in NPY_ARRAYS:
        f = p / f"{name}.npy"
        if not f.is_file():
            continue
        try:
            out[name] = np.load(f, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            lines = str(e).strip().splitlines()
            raise DataError(f"{key}: {f}: cannot map as .npy ({lines[0] if lines else type(e).__name__}); "
                            "write it with numpy.save") from None
        out["_files"][name] = (str(f),)
    return out


def _dataset(arrays: dict[str, Any], xk: str, yk: str, source: str, labelled: bool) -> Dataset:
    found = ", ".join(sorted(k for k in arrays if not k.startswith("_"))) or "none"
    names = arrays.get("_names", {})  # what the user calls them: a Parquet file's configured columns

    def name(k: str) -> str:
        return names.get(k, f"array {k!r}")

    if xk not in arrays:
        raise DataError(f"{source}: no array {xk!r} (found: {found}); "
                        f"save inputs as {xk!r} and integer labels as {yk!r}")
    if labelled and yk not in arrays:
        raise DataError(f"{source}: no array {yk!r} (found: {found}); save integer labels as {yk!r}")
    x = arrays[xk]
    lazy = isinstance(x, (np.memmap, LazyRows))  # read by blocks: checked by the fingerprint's pass
    x = x if lazy else np.asarray(x)
    if x.ndim < 2 or not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{source}: {name(xk)} must be a numeric array of shape (N, features...), got {x.dtype} "
                        f"{x.shape}")
    if int(np.prod(x.shape)) == 0:
        raise DataError(f"{source}: {name(xk)} is empty (shape {x.shape}); give at least one row of features")
    if x.dtype != np.float32:  # a mapped file of another dtype is converted as it is read
        x = MappedRows(x, np.float32) if lazy else x.astype(np.float32)
    if not lazy and not np.isfinite(x).all():
        raise DataError(f"{source}: {name(xk)} holds NaN or infinite values; clean the inputs")
    y = None
    if yk in arrays:
        y_raw = arrays[yk] if isinstance(arrays[yk], np.memmap) else np.asarray(arrays[yk])
        if y_raw.shape != (len(x),):
            raise DataError(f"{source}: {name(yk)} has shape {y_raw.shape}, expected ({len(x)},) to match {xk!r}")
        _check_integers(y_raw, source, name(yk), "integer class labels")
        y = y_raw if y_raw.dtype == np.int64 else y_raw.astype(np.int64)
    ids_key = "ids" if xk == "x" else "ids_test"
    if ids_key in arrays:
        ids = np.asarray(arrays[ids_key])
        if ids.shape != (len(x),):
            raise DataError(f"{source}: {name(ids_key)} has shape {ids.shape}, expected ({len(x)},): one sample id "
                            "per row")
        _check_integers(ids, source, name(ids_key), "integer sample ids")
        ids = ids.astype(np.int64)
        order = np.argsort(ids, kind="stable")
        same = np.flatnonzero(ids[order][1:] == ids[order][:-1])
        if len(same):
            rows = sorted(order[same[0]:same[0] + 2].tolist())
            raise DataError(f"{source}: {name(ids_key)} holds sample id {int(ids[rows[0]])} twice (rows {rows[0]} and "
                            f"{rows[1]}); sample ids key every cached row, so each must be unique")
    else:
        ids = IdRange(len(x))
    files = arrays.get("_files")
    if files:  # read by blocks: the fingerprint pass (which also checks the inputs) is remembered per machine
        paths = tuple(dict.fromkeys(f for k in (xk, ids_key) for f in files.get(k, ())))
        origin = (paths, xk + arrays.get("_tag", ""))
        ds = Dataset(x, y, ids, source, origin)
        ds.fingerprint  # noqa: B018  checks the inputs now, not in the middle of a stage
        return ds
    return Dataset(x, y, ids, source, _origin(source, xk))


def _check_integers(a: Any, source: str, what: str, want: str) -> None:
    """Integers, or floats that are whole numbers (a Parquet column with nulls reads as floats with NaN)."""
    if np.issubdtype(a.dtype, np.integer):
        return
    floating = np.issubdtype(a.dtype, np.floating)
    if floating and not bool(np.isfinite(a).all()):
        raise DataError(f"{source}: {what} holds nulls, NaN or infinite values; give {want}")
    if not floating or not bool(np.all(a == np.round(a))):
        raise DataError(f"{source}: {what} must hold {want}, got {a.dtype}")


def _origin(source: str, key: str) -> tuple[tuple[str, ...], str] | None:
    """A file source's (files, which rows): its fingerprint is then remembered per machine."""
    return ((str(Path(source)),), key) if source != "digits" and Path(source).is_file() else None


def _check_labels(d: Dataset, num_classes: int, explicit: bool) -> None:
    assert d.y is not None
    step = 1 << 22
    for i in range(0, len(d.y), step):  # by blocks: labels may be a mapped file
        block = np.asarray(d.y[i:i + step])
        bad = (block < 0) | (block >= num_classes)
        if bad.any():
            hint = "fix the labels or data.num_classes" if explicit else "labels must be 0..C-1"
            raise DataError(f"{d.source}: label {int(block[bad][0])} outside [0, {num_classes}); {hint}")
    release(d.y)


@functools.lru_cache(maxsize=4)
def load_lm_splits(d: DataConfig, workspace: str, stamps: tuple) -> Splits:
    """Train/test/transfer sequences mapped from the tokenized corpus (made first if missing).

    `stamps` (the source files' mtimes and sizes) only keys this per-process memo."""
    directory = tokenize(d, workspace)
    manifest = read_manifest(directory)

    def dataset(split: str, limit: int | None, source: str) -> Dataset:
        x = sequences(directory, manifest, split, d.seq_len, limit)
        token_file = str(directory / manifest["splits"][split]["file"])
        # rows are read as int64; the fingerprint pass is remembered per machine, keyed on the token file
        return Dataset(MappedRows(x, np.int64), None, IdRange(len(x)), source,
                       ((token_file,), f"lm:{split}:{d.seq_len}:{len(x)}"))

    limit = d.max_sequences
    train = dataset("train", limit, d.source)
    test = dataset("test", None if limit is None else max(1, limit // 4), f"{d.source} (test)")
    for name, ds in (("training", train), ("test", test)):
        if len(ds) == 0:
            held_out = f" after data.test_fraction={d.test_fraction} is held out" if d.test_source is None else ""
            raise DataError(f"data.source: too little text for one {name} sequence of data.seq_len={d.seq_len} "
                            f"tokens{held_out}; give more text, a shorter seq_len"
                            + (" or a smaller test_fraction" if held_out and name == "training" else ""))
    transfer = train if d.transfer.source is None else dataset("transfer", None, d.transfer.source)
    # the cache's targets: the transfer split's documents (the training split's first max_sequences
    # sequences' worth of tokens when it is the transfer set and capped)
    cap = limit * (d.seq_len + 1) if d.transfer.source is None and limit is not None else None
    corpus = open_corpus(directory, manifest, "train" if d.transfer.source is None else "transfer", cap)
    return Splits(train=train, test=test, transfer=transfer, num_classes=manifest["vocab_size"],
                  vocab=manifest["vocab_fingerprint"], corpus=corpus)

