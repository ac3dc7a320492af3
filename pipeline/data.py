"""Datasets: the bundled example (scikit-learn's digits), .npz files and Parquet files.

A Dataset carries `ids` (int64 sample ids) so that cached targets join back to their inputs, and
a content fingerprint so that a cache made for other data is refused.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import Config, DataConfig
from pipeline.errors import DataError


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray  # (N, *input_shape) float32
    y: np.ndarray | None  # (N,) int64, or None for unlabelled transfer data
    ids: np.ndarray  # (N,) int64, unique
    source: str  # where it came from, for messages

    def __len__(self) -> int:
        return len(self.ids)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Content hash of inputs and ids (labels do not change the teachers' targets)."""
        h = hashlib.sha256()
        h.update(repr((self.x.shape, str(self.x.dtype))).encode())
        h.update(np.ascontiguousarray(self.x).tobytes())
        h.update(np.ascontiguousarray(self.ids, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]

    @functools.cached_property
    def _order(self) -> np.ndarray:
        return np.argsort(self.ids, kind="stable")

    def positions(self, sample_ids: np.ndarray) -> np.ndarray:
        """Row positions of `sample_ids`; raises if any id is not in this dataset."""
        order = self._order
        pos = np.searchsorted(self.ids, sample_ids, sorter=order)
        pos = np.clip(pos, 0, len(order) - 1)
        rows = order[pos]
        if not np.array_equal(self.ids[rows], sample_ids):
            missing = sample_ids[self.ids[rows] != sample_ids][:3].tolist()
            raise DataError(
                f"{self.source}: sample ids {missing} of the cache are not in this dataset; "
                "the cache was made for other data, rerun `logitcache cache`"
            )
        return rows

    def subset(self, mask: np.ndarray) -> Dataset:
        return Dataset(self.x[mask], None if self.y is None else self.y[mask], self.ids[mask], self.source)


@dataclass(frozen=True)
class Splits:
    train: Dataset  # labelled; teachers are fitted on it
    test: Dataset  # labelled, held out; evaluation only
    transfer: Dataset  # inputs the teachers label with soft targets; students train on it
    num_classes: int  # classes, or the vocabulary size for language models
    vocab: str | None = None  # language models: fingerprint of the tokenizer's vocabulary

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


def load_splits(config: Config) -> Splits:
    """Load train/test/transfer data as the config says, and check labels against the class count.

    Loaded once per process (per Dask worker) for each config and file state."""
    cfg = config.data
    paths = [p for p in (cfg.source, cfg.test_source, cfg.transfer.source, cfg.tokenizer) if p and Path(p).exists()]
    stamps = tuple((p, Path(p).stat().st_mtime_ns, Path(p).stat().st_size) for p in paths)
    if cfg.task == "lm":
        from pipeline.text import load_lm_splits

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
    if cfg.transfer.exclude_classes:
        outside = [k for k in cfg.transfer.exclude_classes if not 0 <= k < num_classes]
        if outside:
            raise DataError(f"data.transfer.exclude_classes: {outside[0]} is not a class of {cfg.source} "
                            f"(classes 0..{num_classes - 1})")
        if transfer.y is None:
            raise DataError(f"data.transfer.exclude_classes: {transfer.source} has no labels to exclude by")
        transfer = transfer.subset(~np.isin(transfer.y, cfg.transfer.exclude_classes))
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
    return d.subset(~test_mask), d.subset(test_mask)


def check_file(path: str, key: str, what: str) -> Path:
    """`path` as a Path if it is a readable file; else one DataError naming `key` and the problem."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{key}: {path} is a directory; give {what}")
    if not p.exists():
        raise DataError(f"{key}: {path} does not exist; give {what}")
    if not p.is_file():
        raise DataError(f"{key}: {path} is not a regular file; give {what}")
    return p


def _read(path: str, key: str, cfg: DataConfig, labelled: bool) -> dict[str, np.ndarray]:
    p = check_file(path, key, "an .npz or .parquet file, or 'digits'")
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
        return _read_parquet(p, key, cfg, labelled)
    raise DataError(f"{key}: {path} has suffix {p.suffix!r}; use .npz or .parquet")


def _read_parquet(p: Path, key: str, cfg: DataConfig, labelled: bool) -> dict[str, np.ndarray]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except (pa.ArrowException, OSError) as e:
        lines = str(e).strip().splitlines()
        raise DataError(f"{key}: {p}: cannot read as Parquet ({lines[0] if lines else type(e).__name__})") from None
    names = table.column_names
    out: dict[str, np.ndarray] = {}
    if cfg.label_column in names:
        out["y"] = table.column(cfg.label_column).to_numpy(zero_copy_only=False)
    elif labelled:
        raise DataError(f"{key}: {p} has no label column {cfg.label_column!r} (data.label_column); "
                        f"columns are {', '.join(names)}")
    if "sample_id" in names:
        out["ids"] = table.column("sample_id").to_numpy()
    if cfg.feature_columns:
        missing = [c for c in cfg.feature_columns if c not in names]
        if missing:
            raise DataError(f"{p}: no column {missing[0]!r} (data.feature_columns); columns are {', '.join(names)}")
        features = list(cfg.feature_columns)
    else:
        features = [c for c in names if c not in (cfg.label_column, "sample_id")]
    if not features:
        raise DataError(f"{p}: no feature columns besides {cfg.label_column!r}; set data.feature_columns")
    list_cols = [c for c in features if pa.types.is_list(table.schema.field(c).type)
                 or pa.types.is_fixed_size_list(table.schema.field(c).type)]
    if list_cols:
        if len(features) != 1:
            raise DataError(f"{p}: list column {list_cols[0]!r} mixed with other features; "
                            "use one list column or scalar columns (data.feature_columns)")
        rows = table.column(features[0]).to_pylist()
        lengths = {len(r) if isinstance(r, list) else -1 for r in rows}
        if len(lengths) > 1 or -1 in lengths:
            raise DataError(f"{key}: {p}: list column {features[0]!r} is ragged or has nulls (lengths "
                            f"{sorted(n for n in lengths if n >= 0)[:4]}); every row needs the same number of features")
        try:
            out["x"] = np.asarray(rows, dtype=np.float32)
        except (ValueError, TypeError):
            raise DataError(f"{key}: {p}: list column {features[0]!r} must hold numbers") from None
    else:
        try:
            out["x"] = np.stack([table.column(c).to_numpy().astype(np.float32) for c in features], axis=1)
        except (ValueError, TypeError, pa.ArrowException):
            raise DataError(f"{p}: feature columns must be numeric; set data.feature_columns") from None
    return out


def _dataset(arrays: dict[str, np.ndarray], xk: str, yk: str, source: str, labelled: bool) -> Dataset:
    if xk not in arrays:
        raise DataError(f"{source}: no array {xk!r} (found: {', '.join(sorted(arrays)) or 'none'}); "
                        f"save inputs as {xk!r} and integer labels as {yk!r}")
    if labelled and yk not in arrays:
        raise DataError(f"{source}: no array {yk!r} (found: {', '.join(sorted(arrays))}); "
                        f"save integer labels as {yk!r}")
    x = np.asarray(arrays[xk])
    if x.ndim < 2 or not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{source}: {xk!r} must be a numeric array of shape (N, features...), got {x.dtype} {x.shape}")
    if x.size == 0:
        raise DataError(f"{source}: {xk!r} is empty (shape {x.shape}); give at least one row of features")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{source}: {xk!r} holds NaN or infinite values; clean the inputs")
    y = None
    if yk in arrays:
        y_raw = np.asarray(arrays[yk])
        if y_raw.shape != (len(x),):
            raise DataError(f"{source}: {yk!r} has shape {y_raw.shape}, expected ({len(x)},) to match {xk!r}")
        whole = np.issubdtype(y_raw.dtype, np.floating) and bool(np.isfinite(y_raw).all()) \
            and bool(np.all(y_raw == np.round(y_raw)))
        if not np.issubdtype(y_raw.dtype, np.integer) and not whole:
            raise DataError(f"{source}: {yk!r} must hold integer class labels, got {y_raw.dtype}")
        y = y_raw.astype(np.int64)
    ids_key = "ids" if xk == "x" else "ids_test"
    if ids_key in arrays:
        ids = np.asarray(arrays[ids_key]).astype(np.int64)
        if ids.shape != (len(x),) or len(np.unique(ids)) != len(ids):
            raise DataError(f"{source}: {ids_key!r} must be {len(x)} unique integers")
    else:
        ids = np.arange(len(x), dtype=np.int64)
    return Dataset(x, y, ids, source)


def _check_labels(d: Dataset, num_classes: int, explicit: bool) -> None:
    assert d.y is not None
    bad = (d.y < 0) | (d.y >= num_classes)
    if bad.any():
        hint = "fix the labels or data.num_classes" if explicit else "labels must be 0..C-1"
        raise DataError(f"{d.source}: label {int(d.y[bad][0])} outside [0, {num_classes}); {hint}")
