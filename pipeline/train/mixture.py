"""A mixture of caches with weights: one student reads several token caches (each over its own
tokenized corpus, in its own layout) as one stream of batches.

    mix = lc.mixture([cache_a.dataset(8, layout=lay, tokens=dir_a),
                      cache_b.dataset(8, layout=lay, tokens=dir_b)], weights=[3, 1], seed=0)
    for epoch in range(E):
        mix.set_epoch(epoch)
        for batch in mix: ...            # batch["source"]: which dataset it came from

A mixture epoch has as many batches as its sources' epochs together (N = sum n_i); source i
gives round(N * w_i / sum w) of them (at least one), continuing its own epochs where it is drawn
more often than it has batches, so a source of weight above its share is repeated and one below
it is spread over several mixture epochs. The order of the sources' batches inside a mixture
epoch is a seeded permutation of (seed, epoch) alone, so the stream, and where a source is at
any step, is a pure function of (seed, epoch, batch): a resumed run picks up exactly there.

Every batch carries `source` (its dataset's index), and its `document` and `sample_id` ids are
offset by the documents of the sources before it, so ids stay unique across the mixture.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.train.dataset import CacheDataset


class Mixture(IterableDataset):
    def __init__(self, sources: Sequence[CacheDataset], weights: Sequence[float], seed: int = 0) -> None:
        if len(sources) < 1 or len(weights) != len(sources):
            raise ValueError(f"mixture: {len(sources)} datasets and {len(weights)} weights; give one weight each")
        if any(not isinstance(w, (int, float)) or isinstance(w, bool) or not w > 0 for w in weights):
            raise ValueError(f"mixture: weights {list(weights)} must all be > 0")
        if any(ds.corpus is None for ds in sources):
            raise ValueError("mixture: every dataset must read a token cache keyed by document "
                             "(cache.dataset(..., tokens=...))")
        self.sources, self.seed, self.epoch, self._start = list(sources), int(seed), 0, 0
        self.weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.doc_base = np.concatenate([[0], np.cumsum([ds.corpus.n_docs for ds in sources])[:-1]]).astype(np.int64)
        self.epoch_rows = sum(ds.epoch_rows for ds in sources)

    def _counts(self) -> np.ndarray:
        """Batches each source gives per mixture epoch."""
        n = sum(len(ds) for ds in self.sources)
        return np.maximum(1, np.round(n * self.weights)).astype(np.int64)

    def __len__(self) -> int:
        return int(self._counts().sum())

    def schedule(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, the source's overall batch number) of each batch of mixture epoch `epoch`."""
        counts = self._counts()
        order = np.random.default_rng([self.seed, epoch, 7]).permutation(np.repeat(np.arange(len(counts)), counts))
        nth = np.empty(len(order), dtype=np.int64)
        for i, c in enumerate(counts):
            at = np.flatnonzero(order == i)
            nth[at] = epoch * c + np.arange(len(at))
        return order, nth

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._start = int(epoch), 0

    def seek(self, epoch: int, batches: int) -> None:
        self.epoch, self._start = int(epoch), int(batches)

    def _shape(self) -> dict[str, Any]:
        """What the schedule depends on: a saved position means nothing under another."""
        return {"seed": self.seed, "weights": self.weights.tolist(), "sources": [ds.cache_id for ds in self.sources],
                "world_size": self.sources[0]._resolve_dist()[1], "batches_per_source": [len(ds) for ds in self.sources]}

    def state_dict(self, batches: int) -> dict[str, Any]:
        """The position after `batches` batches of the current epoch (count them in your loop)."""
        return {"epoch": self.epoch, "batches": int(batches), **self._shape()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self._shape()
        for key, value in mine.items():
            if state.get(key) != value:
                raise ValueError(f"load_state_dict: the state has {key}={state.get(key)!r} but this mixture "
                                 f"{value!r}; resume with the datasets and weights that saved it")
        self.seek(state["epoch"], state["batches"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order, nth = self.schedule(self.epoch)
        mine = np.arange(self._start + worker, len(order), workers)  # round-robin, as CacheDataset
        streams = {}
        for i, ds in enumerate(self.sources):
            ds.rank, ds.world_size = ds._resolve_dist()
            wanted = nth[mine[order[mine] == i]]
            per = len(ds)  # the source's batches per epoch on this rank
            streams[i] = _chain(ds, wanted // per, wanted % per)
        for b in mine:
            i = int(order[b])
            batch = next(streams[i])
            base = int(self.doc_base[i])
            batch["document"] = batch["document"] + base
            batch["sample_id"] = batch["sample_id"] + base
            batch["source"] = torch.full((len(batch["sample_id"]),), i, dtype=torch.int64)
            yield batch


def _chain(ds: CacheDataset, epochs: np.ndarray, batches: np.ndarray) -> Iterator[dict[str, Any]]:
    """The source's batches (epoch, batch) in the given (ascending) order, reading each of its
    epochs once."""
    for e in np.unique(epochs):
        yield from ds.batches_at(int(e), ds.rank, ds.world_size, [int(b) for b in batches[epochs == e]])


def mixture(datasets: Sequence[CacheDataset], weights: Sequence[float] | None = None, seed: int = 0) -> Mixture:
    """Several token-cache datasets read as one, each batch from one of them, `weights` (default:
    each dataset's own size) setting how often (see the module docstring)."""
    if weights is None:
        weights = [len(ds) for ds in datasets]
    return Mixture(datasets, weights, seed)
