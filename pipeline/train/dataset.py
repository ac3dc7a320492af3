"""The public Python API: read a cache in your own training loop, on one process or many.

    import pipeline as lc
    cache = lc.open_cache("3f9a2c", root="data/caches")      # id, id prefix or directory
    ds = cache.dataset(batch_size=64, seed=0, inputs=x)       # a torch IterableDataset of whole batches
    loader = ds.loader(num_workers=2)                         # a DataLoader that can save its position
    for epoch in range(3):
        ds.set_epoch(epoch)
        for batch in loader:
            logits = model(batch["inputs"])
            loss = lc.kd_loss(logits, batch, temperature=cache.temperature)
            ...
            ckpt = {"model": model.state_dict(), "data": loader.state_dict()}

Partitioning (docs/python-api.md; the order comes from pipeline/train/plan.py). An epoch's order is a pure function of (seed, epoch): the
cache's chunks (the unit of reads) in a seeded permutation across all shards, cut into buffers of
`shuffle_chunks` consecutive chunks, items shuffled inside each buffer by a generator keyed on
(seed, epoch, buffer). An item is a row, or for token caches one whole sequence. That stream of N
items is cut into world-size contiguous ranges, one per rank (sizes differ by at most one item),
and each rank's range into `batches` batches of at most `batch_size` items; rank-local batch b is
made by DataLoader worker b % num_workers, so a DataLoader's round-robin over its workers hands out
batches 0, 1, 2, ..., the same batches for any num_workers. Every worker reads the buffers that
hold its batches: with buffers larger than num_workers batches, that is every buffer of the rank's
range. Every item is yielded exactly once per epoch.

Uneven splits: without drop_last every rank yields the same number of batches,
ceil(ceil(N / world) / batch_size); the final batches of a rank share its remainder evenly, so DDP
ranks never wait on each other and nothing is repeated. Where a rank has fewer items than batches
(batch_size 1 on an uneven split) its last batch is padding: one item again, with
batch["padding"] True, which kd_loss weighs 0 (its gradient is zero and the all-reduce still
runs). With drop_last each rank yields floor(N / (world * batch_size)) full batches and the last
items of the epoch's order (fewer than world * batch_size, different ones every epoch) are skipped.
Rank and world size are resolved when iteration starts, in the process and in every DataLoader
worker (explicit rank/world_size, else torch.distributed's).

Views caches: an epoch's items are one view of each sample, a choice per block of samples that is
a pure function of (seed, epoch, block) and cycles through all N views every N epochs; the pieces
are the chosen views' chunks (1/N of the cache). Each batch carries the views' parameters, and
`replay_views` (used for `inputs` too) rebuilds their pixels exactly as the teachers saw them.

Resume: state_dict() holds the position (epoch, batches consumed per rank, the part of the epoch
the layout covers) and everything that shapes the order (seed, shuffle, shuffle_chunks, drop_last,
batch size, world size, the cache's id); load_state_dict() refuses a state of another cache or
order. On the same world size and batch size the next iteration yields exactly the remaining
batches with the same contents, for any num_workers. On another world size or batch size the
items the epoch has not yet seen are laid out afresh over the new ranks: none is seen twice,
none is missed (plan.remaining).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.core.config import AugmentConfig, augment_problems
from pipeline.core.errors import ArgumentError, CacheError
from pipeline.core.io import sha256_file
from pipeline.core.validate import COUNT, FIELDS, NONNEGATIVE_INT, SEED, Rule, argument, choice, flag
from pipeline.format import reader as fmt
from pipeline.format.columns import ALIGN_COLUMNS, ROW_COLUMNS
from pipeline.format.encodings import Encoding, Targets
from pipeline.format.manifest import resolve
from pipeline.format.members import member_names
from pipeline.format.reader import read_global, read_rows
from pipeline.format.remote import is_url, open_reader, resolve_remote
from pipeline.format.views import PARAMS, ViewSpec, mixes
from pipeline.inputs import augment as vw
from pipeline.inputs.arrays import Dataset
from pipeline.inputs.augment import check_images
from pipeline.inputs.documents import Corpus, Layout, layout_rows, open_corpus
from pipeline.inputs.tokens import read_manifest as read_token_manifest
from pipeline.train import plan
from pipeline.train.crosstok import KEY_COLUMNS, METHODS, Cross, align_batch, cross_rows
from pipeline.train.members import Blend, blend_of

DEFAULT_ROOT = Path("data/caches")
PREFETCH = 2  # buffers read ahead of the one consumed: a buffer that opens a new shard (its checks) or
# meets a busy core is absorbed by the one after it instead of stalling the step (bench/reader.py)
ORDER_VERSION = 1  # of the epoch order (pipeline/train/plan.py): a saved position means nothing under another


def _shared_flag() -> Any:
    """A flag DataLoader workers (forked or spawned) can set and the parent read."""
    import multiprocessing

    return multiprocessing.RawValue("b", 0)


# ---------------------------------------------------------------------------------------------
# Opening a cache


class Cache:
    """A complete cache: its manifest, encoding, class count, temperature, teachers and rows. A
    cache in object storage (`source` a URL) is read through a local shard cache: `path` is its
    local copy (pipeline/format/remote.py)."""

    def __init__(self, source: str | Path, verify: bool = False) -> None:
        self.reader = open_reader(source, verify=verify)
        self.source = source
        self.path = self.reader.dir

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def manifest(self) -> dict[str, Any]:
        return self.reader.manifest

    @property
    def encoding(self) -> Encoding:
        return self.reader.encoding

    @property
    def num_classes(self) -> int:
        return self.reader.num_classes

    @property
    def vocab_size(self) -> int:
        return self.reader.num_classes

    @property
    def temperature(self) -> float:
        return self.reader.temperature

    @property
    def teachers(self) -> list[str]:
        names = self.manifest.get("teachers")
        if names is None:
            names = [t.get("name", "?") if isinstance(t, dict) else str(t) for t in self.manifest["spec"].get("teachers", [])]
        return list(names)

    @property
    def members(self) -> list[str]:
        """The teachers whose own targets the cache holds (cache.members separate or both), else []."""
        return member_names(self.manifest)

    @property
    def rows(self) -> int:
        return self.reader.rows

    @property
    def token_rows(self) -> bool:
        return self.reader.token_rows

    @property
    def views(self) -> ViewSpec | None:
        """A views cache's view count, augmentation, seed and image size (for `replay_views`); else None."""
        spec = self.manifest["spec"]
        return ViewSpec.of(spec, self.path) if "views" in spec else None

    def verify(self) -> None:
        """Recompute every shard's sha256; raises CacheError naming a corrupt shard."""
        self.reader.verify()

    def dataset(self, batch_size: int, seed: int = 0, shuffle: bool = True, shuffle_chunks: int = 4,
                inputs: Any = None, drop_last: bool = False, temperature: float | None = None,
                rank: int | None = None, world_size: int | None = None, pad_value: int = 0,
                labels: Any = None, augment: AugmentConfig | None = None, layout: Layout | None = None,
                tokens: str | Path | Corpus | None = None, members: Sequence[str] | None = None,
                weights: Sequence[float] | None = None, combine: str | None = None,
                align: str = "exact") -> CacheDataset:
        """An IterableDataset of whole batches (dicts of tensors); see the module docstring.

        batch_size counts items (rows, or sequences of a token cache); `inputs` is any indexable
        (array, memmap, tensor, list) looked up by sample_id, or a pipeline Dataset (its rows are
        gathered by sample id); `labels` likewise, joined as batch["labels"] (a views cache's mixed
        views get label distributions (B, C)); `augment` draws a view of each plain image per
        (seed, sample, epoch) for `inputs`; `temperature` is the T of the re-tempered `targets`
        (default: the cache's); rank and world_size default to torch.distributed's when it is
        initialized.

        A token cache keyed by document (`logitcache cache` of a language model) is read in the
        student's own `layout` (seq_len and packing; default: the teachers' context, packed) over
        `tokens`, the tokenized corpus directory it was made from (or its Corpus): each batch row
        is seq_len + 1 tokens of that corpus, its targets gathered by (document, offset). `tokens`
        may also be the same documents tokenized with the student's own tokenizer (a cache of a
        text corpus): the batch then carries the student's tokens and the alignment of its
        positions with the teacher rows, for `cross_kd_loss` with `align` (uld, exact or span;
        pipeline/train/crosstok.py), and the dataset's `vocab_map` maps teacher ids to the student's.

        A cache of per-member targets (`cache.members`, `Cache.members`) is read as the student
        asks: `members` (default all), `weights` (default the cache's, renormalized over them) and
        `combine`: mean_probs or mean_logprobs (an ensemble at read time, the batch's `targets`
        dense) or per_member (batch["members"]: each member's targets and weight, for kd_loss's
        multi-teacher loss); default the cache's ensemble mode (pipeline/train/members.py)."""
        cross = None
        if self.reader.keyed_by_document and tokens is not None and self.other_tokenizer(tokens):
            corpus = self.student_corpus(tokens)
            layout = layout if layout is not None else Layout(self.manifest["spec"]["dataset"]["context"])
            cross = self.cross(corpus, layout, align)
        else:
            corpus = self.corpus(tokens) if self.reader.keyed_by_document else None
        if layout is None and corpus is not None:
            layout = Layout(self.manifest["spec"]["dataset"]["context"])
        try:
            blend = blend_of(self.manifest, members, weights, combine)
        except ValueError as e:
            raise ValueError(f"Cache.dataset {e}") from None
        return CacheDataset(self, batch_size, seed, shuffle, shuffle_chunks, inputs, drop_last, temperature,
                            rank, world_size, pad_value, labels, augment, layout, corpus, blend, cross)

    def other_tokenizer(self, tokens: str | Path | Corpus) -> bool:
        """Whether the tokenized corpus `tokens` was made with another vocabulary than the cache's."""
        directory = tokens.directory if isinstance(tokens, Corpus) else Path(tokens)
        theirs = self.manifest["spec"]["dataset"].get("vocab_fingerprint")
        return read_token_manifest(directory).get("vocab_fingerprint") != theirs

    def student_corpus(self, tokens: str | Path | Corpus) -> Corpus:
        """The cache's documents tokenized with a student's tokenizer: its split of the same name, cut
        after the documents the cache covers."""
        d = self.manifest["spec"]["dataset"]
        if isinstance(tokens, Corpus):
            directory, split = tokens.directory, tokens.split
        else:
            directory, split = Path(tokens), d["split"]
        manifest = read_token_manifest(directory)
        corpus = open_corpus(directory, manifest, split)
        if corpus.n_docs > d["documents"]:
            corpus = open_corpus(directory, manifest, split, int(corpus.offsets[d["documents"]]))
        return corpus

    def cross(self, corpus: Corpus, layout: Layout, align: str) -> Cross:
        """How a student with its own tokenizer reads this cache: its rows and the teacher rows each
        owns, and the teacher-to-student vocabulary map (pipeline/train/crosstok.py)."""
        from pipeline.format.columns import VOCAB_FILE
        from pipeline.inputs.text import Tokenizer
        from pipeline.inputs.vocab import map_vocab, read_vocab

        choice("align", align, METHODS)
        reader = open_reader(self.source, alignment=True, columns=KEY_COLUMNS)  # what planning reads
        vocab = reader.dir / VOCAB_FILE
        recorded = self.manifest.get("vocab_sha256")
        if recorded is not None and (not vocab.is_file() or sha256_file(vocab) != recorded):
            raise CacheError(f"{vocab}: missing, or its sha256 differs from {reader.dir / 'manifest.json'}'s; the "
                             "teacher vocabulary was modified or damaged: rebuild the cache (`logitcache cache CONFIG`)")
        teacher = read_vocab(vocab)
        rows = cross_rows(corpus, layout, reader, self.manifest["spec"]["dataset"]["documents"], teacher.eos)
        manifest = read_token_manifest(corpus.directory)
        student = Tokenizer(Path(manifest["tokenizer"]), f"{corpus.directory}/manifest.json: tokenizer")
        vocab_map = torch.from_numpy(map_vocab(teacher, student.hf, int(manifest["eos"])).target)
        return Cross(rows, vocab_map, align, manifest["vocab_size"])

    def corpus(self, tokens: str | Path | Corpus | None) -> Corpus:
        """The documents this cache's targets belong to, from the tokenized corpus directory
        `tokens`; refused unless its tokens are the cache's."""
        d = self.manifest["spec"]["dataset"]
        if tokens is None:
            raise ValueError(f"cache {self.id} is keyed by (document, offset) of tokenized corpus {d['tokens']}; "
                             f"pass tokens=<workspace>/tokens/{d['tokens']} (its directory)")
        corpus = tokens if isinstance(tokens, Corpus) else \
            open_corpus(Path(tokens), read_token_manifest(Path(tokens)), d["split"], d["positions"])
        if corpus.fingerprint != d["fingerprint"] or corpus.n_tokens != d["positions"]:
            raise CacheError(f"{corpus.directory}: its {corpus.split} tokens ({corpus.fingerprint}) are not those cache "
                             f"{self.id} was made from ({d['fingerprint']}); pass the tokenized corpus {d['tokens']}")
        return corpus

    def __repr__(self) -> str:
        return (f"Cache({self.id}, {self.encoding.label()}, {self.num_classes} classes, T={self.temperature}, "
                f"{self.rows} rows)")


def open_cache(id_or_path: str | Path, root: str | Path | None = None, verify: bool = False) -> Cache:
    """A complete cache from its directory or URL, or its id or unique id prefix under `root`
    (default data/caches; a URL such as s3://bucket/caches too)."""
    for name, value in (("id_or_path", id_or_path), ("root", root)):
        if (value is not None or name == "id_or_path") and (not isinstance(value, (str, os.PathLike))
                                                            or not os.fspath(value)):
            raise ArgumentError(f"{name}: {value!r} is not a cache id, directory or URL; give a non-empty str or Path")
    flag("verify", verify)
    if is_url(id_or_path) or (root is not None and is_url(root)):
        return Cache(resolve_remote(os.fspath(id_or_path), os.fspath(root) if root is not None else None),
                     verify=verify)
    return Cache(resolve(id_or_path, Path(root) if root is not None else DEFAULT_ROOT), verify=verify)


# ---------------------------------------------------------------------------------------------
# The dataset


def _dist_default() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class CacheDataset(IterableDataset):
    """Whole batches of a cache, split by torch.distributed rank and DataLoader worker.

    Each batch is a dict: `sample_id` (rows,) int64; for token caches `position` (rows,), `sequence`
    (rows,) the row's sequence within the batch and `sequence_id` (sequences,); the decoded targets
    in the encoding's natural form (dense `logp`; top-k `ids`, `logp`, `residual`; sampled `ids`,
    `counts`, `entropy`; hybrid adds `tail_*`); `targets`, the same re-tempered to `temperature` by
    `encoding.targets` (what `kd_loss` uses; a `Targets` made when first read, on the device the
    loss moves it to); `inputs` (items, ...) looked up by sample_id when
    given (ragged 1-D inputs right-padded with pad_value, lengths in `input_lengths`); and
    `encoding` and `temperature` (not tensors). A views cache's rows are views, one per sample per
    epoch: the batch adds `view`, `box`, `flip` and with mixup/cutmix `partner` (int64, -1 when
    none), `lam` (float16) and `cut` (views.expand), and `inputs` are the views' pixels
    (`replay_views`), not the source images. Use with DataLoader(ds, batch_size=None) or
    `ds.loader()`."""

    def __init__(self, cache: Cache, batch_size: int, seed: int, shuffle: bool, shuffle_chunks: int, inputs: Any,
                 drop_last: bool, temperature: float | None, rank: int | None, world_size: int | None,
                 pad_value: int, labels: Any = None, augment: AugmentConfig | None = None,
                 layout: Layout | None = None, corpus: Corpus | None = None, blend: Blend | None = None,
                 cross: Cross | None = None) -> None:
        _check_arguments(batch_size, seed, shuffle, shuffle_chunks, drop_last, temperature, rank, world_size,
                         pad_value, augment)
        enc = cache.encoding
        self.temperature = float(temperature) if temperature is not None else cache.temperature
        if not enc.retemperable and self.temperature != cache.temperature:
            raise ValueError(f"temperature={self.temperature}: this {enc.label()} cache (format "
                             f"{cache.manifest['format_version']}) holds draws at T={cache.temperature} without "
                             "their log-probs and cannot be re-tempered; leave temperature unset, or rebuild it with "
                             "this logitcache (`logitcache cache CONFIG`, cache.draw_logp true)")
        self.path, self.source, self.encoding, self.token_rows = cache.path, cache.source, enc, cache.token_rows
        self.cache_temperature = cache.temperature
        self._reader: fmt.CacheReader | None = cache.reader
        self.blend = blend  # per-member targets: which members, weights and combination (members.py)
        if blend is not None:
            self.encoding = blend.encoding
            self._reader = open_reader(cache.source, units=blend.names)
        self._pid = os.getpid()
        self.batch_size, self.seed, self.shuffle, self.shuffle_chunks = batch_size, seed, shuffle, shuffle_chunks
        self.inputs, self.drop_last, self.pad_value = inputs, drop_last, pad_value
        self._explicit = (rank, world_size)
        self.rank, self.world_size = self._resolve_dist()
        self.cache_id = cache.id
        self.labels, self.augment = labels, augment if augment is not None and augment.active else None
        self.views = cache.views
        if self.views is not None and self.augment is not None:
            raise ValueError("augment: a views cache replays the views its teachers saw; leave augment unset")
        if self.augment is not None and inputs is None:
            raise ValueError("augment draws views of the inputs; pass inputs= too")
        self.layout, self.corpus, self.layout_rows = layout, corpus, None
        self.cross = cross  # a student with another tokenizer: its corpus is its own (crosstok.py)
        self.vocab_map = cross.vocab_map if cross is not None else None
        if cross is not None:
            if blend is not None:
                raise ValueError("a student with another tokenizer reads a cache of combined targets; leave members, "
                                 "weights and combine unset")
            if self.temperature != cache.temperature:
                raise ValueError(f"temperature={self.temperature}: a student with another tokenizer trains at the "
                                 f"cache's temperature ({cache.temperature}): its chunk probabilities cannot be "
                                 "re-tempered; leave temperature unset")
            self._reader = open_reader(cache.source, alignment=True)
            self.layout_rows = cross.rows
            self.pieces = plan.layout_pieces(cross.rows.lo, cross.rows.hi, cache.reader.chunk_rows)
        elif corpus is not None:  # the student's rows over the documents, and the cache rows each owns
            assert layout is not None
            self.layout_rows = layout_rows(corpus, layout)
            if cache.rows != int(corpus.rows_before(np.array([corpus.n_tokens]))[0]):
                raise CacheError(f"{cache.path}: {cache.rows} rows, but its corpus has "
                                 f"{int(corpus.rows_before(np.array([corpus.n_tokens]))[0])} trained positions; "
                                 "the cache is damaged: rebuild it")
            self.pieces = plan.layout_pieces(self.layout_rows.lo, self.layout_rows.hi, cache.reader.chunk_rows)
        else:
            self.pieces = plan.pieces(cache.reader) if self.views is None else []
        self.items = sum(p.items for p in self._epoch_pieces(0))
        self.epoch = 0
        self._spans: plan.Spans | None = None  # the part of the epoch laid out over the ranks; None: all of it
        self._start = 0  # rank-local batches of that layout already consumed (resume)
        self._yielded = 0  # batches this object handed out in this process (num_workers=0)
        self._in_workers = _shared_flag()  # set by DataLoader workers that iterate this dataset

    def _resolve_dist(self) -> tuple[int, int]:
        rank, world = _dist_default()
        r, w = self._explicit
        rank, world = (r if r is not None else rank), (w if w is not None else world)
        if not 0 <= rank < world:
            raise ValueError(f"rank={rank}, world_size={world}: need 0 <= rank < world_size")
        return rank, world

    @property
    def reader(self) -> fmt.CacheReader:
        """This process's reader: a DataLoader worker opens its own (a forked copy of the parent's
        would hold the parent's thread pool and file handles)."""
        if self._reader is None or self._pid != os.getpid():
            units = self.blend.names if self.blend is not None else None
            more = {"alignment": True} if self.cross is not None else {}
            self._reader, self._pid = open_reader(self.source, units=units, **more), os.getpid()
        return self._reader

    def __getstate__(self) -> dict[str, Any]:
        """Spawn-started workers reopen the cache and get the rank resolved now, in the parent (a
        spawned worker cannot see the parent's process group)."""
        from multiprocessing.context import get_spawning_popen

        state = {**self.__dict__, "_reader": None}
        if get_spawning_popen() is None:  # pickled for another purpose than starting a worker
            state["_in_workers"] = None
        else:
            state["rank"], state["world_size"] = self._resolve_dist()
        return state

    # -- epochs and resume ---------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch (call before iterating each epoch, as with DistributedSampler)."""
        argument("epoch", epoch, NONNEGATIVE_INT)
        if epoch != self.epoch:
            self.epoch, self._spans, self._start, self._yielded = epoch, None, 0, 0
            if self._in_workers is not None:
                self._in_workers.value = 0
        self.rank, self.world_size = self._resolve_dist()

    def state_dict(self, batches: int | None = None) -> dict[str, Any]:
        """Position in the epoch: `batches` consumed on this rank (default: those this object yielded
        in this process; with DataLoader workers use `ds.loader()` or pass the count)."""
        if batches is not None:
            argument("batches", batches, NONNEGATIVE_INT)
        if batches is None and self._in_workers is not None and self._in_workers.value:
            raise ValueError("state_dict: DataLoader workers iterate this dataset, so it cannot know how many batches "
                             "your loop consumed; use ds.loader() and its state_dict(), or pass "
                             "state_dict(batches=N)")
        done = self._start + self._yielded if batches is None else int(batches)
        epoch, spans = self.epoch, self._spans
        if done >= len(self):  # the epoch is finished: the next position is the next epoch's start
            epoch, done, spans = epoch + 1, 0, None
        return {"epoch": epoch, "batches": done, "spans": None if spans is None else [list(s) for s in spans],
                "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size,
                "drop_last": self.drop_last, "seed": self.seed, "shuffle": self.shuffle,
                "shuffle_chunks": self.shuffle_chunks, "items": self.items, "cache": self.cache_id,
                "order": ORDER_VERSION, **({"read": self.blend.to_json()} if self.blend is not None else {}),
                **({"tokens": self.corpus.fingerprint} if self.cross is not None else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where `state` (any rank's: the position is global) left off: on the same world size
        and batch size the next iteration yields exactly the batches after state["batches"];
        otherwise what the epoch has not seen is laid out afresh over this world size."""
        _check_state(state)
        mine = {"cache": self.cache_id, "order": ORDER_VERSION, "items": self.items, "seed": self.seed,
                "shuffle": self.shuffle, "shuffle_chunks": self.shuffle_chunks}
        if self.blend is not None:
            mine["read"] = self.blend.to_json()
        if self.cross is not None:  # the student's own tokens
            mine["tokens"] = self.corpus.fingerprint
        for key, value in mine.items():
            if state.get(key) != value:
                raise ValueError(f"load_state_dict: the state has {key}={state.get(key)!r} but this dataset "
                                 f"{value!r}; resume with the cache and order settings that saved it")
        self.rank, self.world_size = self._resolve_dist()
        spans = None if state["spans"] is None else [(int(a), int(b)) for a, b in state["spans"]]
        self.epoch, self._yielded = int(state["epoch"]), 0
        if (state["world_size"], state["batch_size"], state["drop_last"]) == (self.world_size, self.batch_size,
                                                                             self.drop_last):
            self._spans, self._start = spans, int(state["batches"])
        else:
            spans = spans if spans is not None else [(0, self.items)]
            self._spans = plan.remaining(spans, state["batch_size"], state["world_size"], state["drop_last"],
                                         int(state["batches"]))
            self._start = 0

    def seek(self, epoch: int, batches: int) -> None:
        """Make the next iteration start at rank-local batch `batches` of `epoch` (a position the
        caller saved itself; `load_state_dict` checks a saved state and comes here)."""
        argument("epoch", epoch, NONNEGATIVE_INT)
        argument("batches", batches, NONNEGATIVE_INT)
        self.epoch, self._spans, self._start, self._yielded = int(epoch), None, int(batches), 0

    @property
    def _layout_items(self) -> int:
        return self.items if self._spans is None else plan.span_items(self._spans)

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        return len(plan.rank_layout(self._layout_items, self.batch_size, self.world_size, self.rank,
                                    self.drop_last)[1])

    # -- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is None or torch.distributed.is_available() and torch.distributed.is_initialized():
            self.rank, self.world_size = self._resolve_dist()  # a forked worker sees the parent's group
        if info is not None and self._in_workers is not None:
            self._in_workers.value = 1
        in_process = info is None
        self._yielded = 0
        for batch in self.worker_batches(self.epoch, self.rank, self.world_size, worker, workers, self._start):
            if in_process:
                self._yielded += 1
            yield batch
        if in_process:  # the epoch is done; iterating again without set_epoch replays it from the start
            self._start, self._yielded = 0, len(self)

    def worker_batches(self, epoch: int, rank: int, world: int, worker: int, workers: int,
                       start: int = 0) -> Iterator[dict[str, Any]]:
        """The batches of one (rank, worker) slot once the rank has consumed `start` batches:
        rank-local batches start + worker, start + worker + workers, ... Their items are the same
        for any worker count; each worker reads only the buffers that hold its batches."""
        n_batches = len(plan.rank_layout(self._layout_items, self.batch_size, world, rank, self.drop_last)[1])
        return self.batches_at(epoch, rank, world, plan.worker_batches(start, n_batches, worker, workers))

    def batches_at(self, epoch: int, rank: int, world: int, mine: Sequence[int]) -> Iterator[dict[str, Any]]:
        """Rank-local batches `mine` (ascending) of `epoch`, reading only the buffers that hold them."""
        n = self._layout_items
        rank_start, sizes = plan.rank_layout(n, self.batch_size, world, rank, self.drop_last)
        at = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]) + rank_start
        spans = self._spans if self._spans is not None else [(0, self.items)]
        stream = self._item_stream(epoch, plan.merged([s for b in mine for s in plan.take(spans, at[b], at[b + 1])]))
        pending: list[tuple[dict[str, np.ndarray], np.ndarray]] = []
        have = 0
        for b in mine:
            size = sizes[b]
            if size == 0:  # padding: this rank has fewer items than batches; one item again, weighed 0
                item = plan.take(spans, min(rank_start, n - 1), min(rank_start, n - 1) + 1)
                rows, lengths = next(self._item_stream(epoch, item))
                yield {**self._batch(rows, lengths, epoch), "padding": True}
                continue
            while have < size:
                part = next(stream)
                pending.append(part)
                have += len(part[1])
            rows, lengths = _concat(pending)
            cut = int(lengths[:size].sum())
            yield self._batch({k: v[:cut] for k, v in rows.items()}, lengths[:size], epoch)
            pending = [({k: v[cut:] for k, v in rows.items()}, lengths[size:])] if have > size else []
            have -= size

    @property
    def epoch_rows(self) -> int:
        """Rows an epoch reads: all of the cache's, or one view of each sample of a views cache."""
        return sum(p.stop - p.start for p in self._epoch_pieces(self.epoch))

    def _epoch_pieces(self, epoch: int) -> list[plan.Piece]:
        return plan.epoch_pieces(self.reader, self.views, self.seed, epoch, self.pieces)

    def _item_stream(self, epoch: int, spans: plan.Spans) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        """The items of the epoch's stream in `spans` (sorted, disjoint), in order, as (stored rows,
        item lengths) per buffer, reading only the buffers that hold them.

        Buffers are read on one background thread, PREFETCH ahead of the one the consumer works
        through, so storage costs overlap the training step; every read happens on that thread, so
        a Parquet file is never read by two threads at once. Buffers hold the stored (narrow)
        columns and each batch is decoded as it is made: a buffer of 8-bit top-10 rows takes
        ~16 B/row, not the ~130 B/row of int64 ids and float32 log-probs. Memory: the buffer being
        consumed plus PREFETCH read ahead."""
        wanted, seen, j = [], 0, 0  # spans[j:] end after `seen`: buffers and spans are walked once, in step
        for b, buffer in enumerate(plan.buffers(self._epoch_pieces(epoch), self.seed, epoch, self.shuffle,
                                                self.shuffle_chunks)):
            if j == len(spans):
                break
            n = sum(p.items for p in buffer)
            parts, k = [], j
            while k < len(spans) and spans[k][0] < seen + n:
                lo, hi = spans[k]
                parts.append((max(lo, seen) - seen, min(hi, seen + n) - seen))
                k += 1
            if parts and n:
                wanted.append((b, buffer, n, parts))
            seen += n
            while j < len(spans) and spans[j][1] <= seen:
                j += 1
        if not wanted:
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="logitcache-prefetch") as ahead:
            pending: list[Future] = [ahead.submit(self._read_buffer, w[1]) for w in wanted[:PREFETCH]]
            for i, (b, _, n, parts) in enumerate(wanted):
                rows, starts = pending.pop(0).result()  # starts (n + 1,): first row of each item
                if i + PREFETCH < len(wanted):
                    pending.append(ahead.submit(self._read_buffer, wanted[i + PREFETCH][1]))
                order = plan.item_order(self.seed, epoch, b, n, self.shuffle)
                sel = order[parts[0][0]:parts[0][1]] if len(parts) == 1 else \
                    np.concatenate([order[lo:hi] for lo, hi in parts])
                lengths = starts[sel + 1] - starts[sel]
                offs = np.repeat(starts[sel] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
                take = offs + np.arange(int(lengths.sum()))
                # take() copies whole rows: several times faster than fancy indexing on (rows, k) columns
                yield {k: np.take(v, take, axis=0) for k, v in rows.items()}, lengths
                del rows

    def _read_buffer(self, buffer: list[plan.Piece]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        reader = self.reader
        if self.layout_rows is not None:  # pieces are runs of whole layout rows, by cache row
            rows = read_global(reader, [(p.start, p.stop) for p in buffer], decode=False)
            lo, at, parts = self.layout_rows.lo, 0, []
            for p in buffer:
                parts.append(lo[p.first_item:p.first_item + p.items] - p.start + at)
                at += p.stop - p.start
            starts = np.append(np.concatenate(parts), at)
            if self.cross is not None:  # which layout row each cache row belongs to
                items = np.concatenate([np.arange(p.first_item, p.first_item + p.items) for p in buffer])
                rows["item"] = np.repeat(items, np.diff(starts))
            return rows, starts
        rows = read_rows(reader, [p.chunk(reader.chunk_rows) for p in buffer if p.items], decode=False)
        n = len(rows["sample_id"])
        if reader.token_rows:
            starts = np.flatnonzero(rows["position"] == 0)
            if len(starts) != sum(p.items for p in buffer) or (len(starts) and starts[0] != 0):
                raise CacheError(f"{reader.dir}: token rows do not form whole sequences; the cache is corrupt")
        else:
            starts = np.arange(n)
        return rows, np.append(starts, n)

    def _batch(self, stored: dict[str, np.ndarray], lengths: np.ndarray, epoch: int) -> dict[str, Any]:
        enc = self.encoding
        rows = self.reader.decode(stored)
        if "item" in stored:  # a cross-tokenizer buffer's layout row of each cache row
            rows["item"] = stored["item"]
        if self.views is not None:
            rows = vw.expand(self.views, rows, self.path)
        sample_id = rows["sample_id"].astype(np.int64)
        decoded = {k: v for k, v in rows.items() if k not in ROW_COLUMNS and k not in ALIGN_COLUMNS and k != "item"}
        out: dict[str, Any] = {"sample_id": torch.from_numpy(sample_id)}
        keys = sample_id
        if self.cross is not None:
            out.update(self._cross_batch(rows, lengths))
        elif self.layout_rows is not None:
            out.update(self._layout_batch(rows, lengths))
        elif self.token_rows:
            first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            keys = sample_id[first]
            out["position"] = torch.from_numpy(rows["position"].astype(np.int64))
            out["sequence"] = torch.from_numpy(np.repeat(np.arange(len(lengths)), lengths))
            out["sequence_id"] = torch.from_numpy(keys)
        out.update({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in decoded.items()})
        if self.blend is None:
            out["targets"] = Targets(enc, decoded, self.temperature / self.cache_temperature)  # made where the loss is
        else:  # each member's targets, combined or side by side
            out.update(self.blend.batch(self.reader.split(decoded), "cpu", self.temperature / self.cache_temperature))
        if self.inputs is not None and self.views is not None:
            out["inputs"] = vw.render_rows(_lookup(self.inputs), rows, self.views.augment)
        elif self.augment is not None:
            drawn = vw.draw(self.augment, self.seed, keys, np.full(len(keys), epoch), _image_hw(self.inputs))
            out["inputs"] = vw.render_rows(_lookup(self.inputs), {"sample_id": keys, **drawn}, self.augment)
        elif self.inputs is not None and self.layout_rows is None:
            out.update(_join(self.inputs, keys, self.pad_value))
        if self.labels is not None:
            label_of = _label_lookup(self.labels)
            mixed = vw.soft_labels(rows, label_of, enc.num_classes) if self.views is not None else None
            out["labels"] = mixed if mixed is not None else torch.from_numpy(label_of(keys))
        out["encoding"] = enc
        out["temperature"] = self.temperature
        out["padding"] = False
        return out

    def _cross_batch(self, rows: dict[str, np.ndarray], lengths: np.ndarray) -> dict[str, Any]:
        """A cross-tokenizer batch: the student rows' own tokens (`inputs`, `segments`,
        `input_lengths`, `sequence_id`), each teacher row's `document`, `offset`, `label` (the
        teacher id of the token it predicts) and `label_logp` (that token's log-prob), and the
        alignment of the student positions with the teacher rows (crosstok.align_batch)."""
        assert self.cross is not None and self.corpus is not None and self.layout is not None
        first = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        items = rows["item"][first]
        lay = self.cross.rows
        x, seg, width = _student_tokens(self.corpus, lay.start[items], lay.stop[items], self.layout.seq_len,
                                        self.pad_value)
        out: dict[str, Any] = {"inputs": x, "segments": seg, "input_lengths": width,
                               "sequence_id": torch.from_numpy(items.astype(np.int64)),
                               "document": torch.from_numpy(rows["sample_id"].astype(np.int64)),
                               "offset": torch.from_numpy(rows["position"].astype(np.int64)),
                               "label": torch.from_numpy(rows["label"].astype(np.int64)),
                               "label_logp": torch.from_numpy(rows["label_logp"].astype(np.float32)), "align": self.cross.align,
                               "vocab_map": self.cross.vocab_map}
        out.update(align_batch(self.corpus, lay, items, rows, lengths))
        return out

    def _layout_batch(self, rows: dict[str, np.ndarray], lengths: np.ndarray) -> dict[str, torch.Tensor]:
        """The batch's layout rows: `inputs` (B, seq_len + 1) tokens of the corpus (right-padded with
        pad_value), `segments` (B, seq_len + 1) each token's document within its row (-1: padding),
        `input_lengths`; per target row its `document` and `offset` (the cache's key), `sequence`
        (its batch row) and `position` (its input position in that row)."""
        corpus, lay, L = self.corpus, self.layout_rows, self.layout.seq_len
        doc = rows["sample_id"].astype(np.int64)
        p = corpus.offsets[doc] + rows["position"].astype(np.int64)  # (rows,) flat positions
        first = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        item = np.searchsorted(lay.start, p[first], side="right") - 1
        start, stop = lay.start[item], lay.stop[item]
        pos = p - np.repeat(start, lengths)
        if len(pos) and (pos.min() < 0 or pos.max() >= L):
            raise CacheError(f"{self.path}: cache rows fall outside the student rows that own them; the cache "
                             f"does not match tokenized corpus {corpus.directory}: rebuild it")
        x, seg, width = _student_tokens(corpus, start, stop, L, self.pad_value)
        return {"inputs": x, "segments": seg, "input_lengths": width, "document": torch.from_numpy(doc),
                "offset": torch.from_numpy(rows["position"].astype(np.int64)),
                "sequence": torch.from_numpy(np.repeat(np.arange(len(item)), lengths)),
                "position": torch.from_numpy(pos), "sequence_id": torch.from_numpy(item.astype(np.int64))}

    def loader(self, num_workers: int = 0, **kwargs: Any) -> CacheLoader:
        """A DataLoader over this dataset (batch_size=None) that counts consumed batches, so its
        state_dict() resumes exactly, with workers too."""
        return CacheLoader(self, num_workers=num_workers, **kwargs)


def _student_tokens(corpus: Corpus, start: np.ndarray, stop: np.ndarray, seq_len: int,
                    pad_value: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of a corpus: tokens [start, stop) right-padded to seq_len + 1 with pad_value, each
    token's document within its row (-1: padding), and the rows' lengths."""
    width = stop - start
    at = start[:, None] + np.arange(seq_len + 1)  # (B, L + 1) flat positions
    valid = np.arange(seq_len + 1) < width[:, None]
    x = np.full((len(start), seq_len + 1), pad_value, dtype=np.int64)
    x[valid] = corpus.tokens[at[valid]]
    seg = np.full((len(start), seq_len + 1), -1, dtype=np.int64)
    seg[valid] = np.searchsorted(corpus.offsets, at[valid], side="right") - 1
    seg[valid] -= np.repeat(seg[:, 0], valid.sum(1))  # documents numbered from 0 in each row
    return torch.from_numpy(x), torch.from_numpy(seg), torch.from_numpy(width)


def _check_arguments(batch_size: Any, seed: Any, shuffle: Any, shuffle_chunks: Any, drop_last: Any,
                     temperature: Any, rank: Any, world_size: Any, pad_value: Any, augment: Any) -> None:
    """`Cache.dataset`'s arguments, by the rules of the config fields they mirror (student.batch_size,
    student.temperature, ...): one ArgumentError naming the first that breaks its rule."""
    argument("batch_size", batch_size, COUNT)
    argument("seed", seed, SEED)
    flag("shuffle", shuffle)
    argument("shuffle_chunks", shuffle_chunks, COUNT)
    flag("drop_last", drop_last)
    if temperature is not None:
        argument("temperature", temperature, FIELDS["student.temperature"])
    if rank is not None:
        argument("rank", rank, NONNEGATIVE_INT)
    if world_size is not None:
        argument("world_size", world_size, COUNT)
    argument("pad_value", pad_value, Rule(integer=True))
    if augment is not None:
        if not isinstance(augment, AugmentConfig):
            raise ArgumentError(f"augment: expected an AugmentConfig (pipeline.core.config), got {type(augment).__name__}")
        problems = augment_problems(augment)
        if problems:
            raise ArgumentError(problems[0])


STATE_FIELDS = {"epoch": NONNEGATIVE_INT, "batches": NONNEGATIVE_INT, "world_size": COUNT, "batch_size": COUNT}


def _check_state(state: Any) -> None:
    """A saved position, as `state_dict` writes it: a dict with its numbers and flags in range."""
    if not isinstance(state, dict):
        raise ArgumentError(f"state: expected the dict state_dict() returned, got {type(state).__name__}")
    missing = [k for k in ("spans", "drop_last", *STATE_FIELDS) if k not in state]
    if missing:
        raise ArgumentError(f"state: no {missing[0]!r}; pass the dict state_dict() returned, unchanged")
    for key, rule in STATE_FIELDS.items():
        argument(f"state[{key!r}]", state[key], rule)
    flag("state['drop_last']", state["drop_last"])
    spans = state["spans"]
    if spans is not None and not (isinstance(spans, (list, tuple)) and all(
            isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(v, int) and v >= 0 for v in s)
            and s[0] <= s[1] for s in spans)):
        raise ArgumentError("state['spans']: expected None or a list of [start, stop] item ranges; pass the dict "
                            "state_dict() returned, unchanged")


def _concat(parts: list[tuple[dict[str, np.ndarray], np.ndarray]]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return ({k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]},
            np.concatenate([p[1] for p in parts]))


def _join(inputs: Any, keys: np.ndarray, pad_value: int) -> dict[str, torch.Tensor]:
    """inputs[sample_id] for each item, stacked (ragged 1-D ones right-padded)."""
    try:
        if isinstance(inputs, Dataset):  # mapped or lazily read rows, gathered page-budgeted
            return {"inputs": torch.from_numpy(inputs.rows(inputs.positions(keys))[0])}
        if isinstance(inputs, torch.Tensor):
            return {"inputs": inputs[torch.from_numpy(keys)]}
        if isinstance(inputs, np.ndarray):
            return {"inputs": torch.from_numpy(np.ascontiguousarray(inputs[keys]))}
        items = [np.asarray(inputs[int(k)]) for k in keys]
    except (IndexError, KeyError) as e:
        raise KeyError(f"inputs has no entry for a sample_id of this batch ({type(e).__name__}: {e}); inputs must "
                       "be indexable by the cache's sample ids") from None
    if all(a.shape == items[0].shape for a in items):
        return {"inputs": torch.from_numpy(np.stack(items))}
    lengths = np.array([len(a) for a in items])
    padded = np.full((len(items), int(lengths.max())), pad_value, dtype=items[0].dtype)
    for i, a in enumerate(items):
        padded[i, :len(a)] = a
    return {"inputs": torch.from_numpy(padded), "input_lengths": torch.from_numpy(lengths)}


def _lookup(inputs: Any) -> Callable[[np.ndarray], torch.Tensor]:
    """Images by sample id, from `inputs` as `Cache.dataset` takes them."""
    return lambda ids: _join(inputs, ids, 0)["inputs"]


def _image_hw(inputs: Any) -> tuple[int, int]:
    shape = inputs.x.shape if isinstance(inputs, Dataset) else np.shape(inputs)
    return check_images(tuple(shape[1:]), "augment")


def _label_lookup(labels: Any) -> Callable[[np.ndarray], np.ndarray]:
    """Labels by sample id: a Dataset's y, or any indexable by sample id."""
    if isinstance(labels, Dataset):
        if labels.y is None:
            raise ValueError(f"labels: {labels.source} has no labels; leave labels unset")
        return lambda ids: np.asarray(labels.y[labels.positions(ids)])
    if isinstance(labels, torch.Tensor):
        return lambda ids: labels[torch.from_numpy(ids)].numpy()
    return lambda ids: np.asarray(labels[ids]) if isinstance(labels, np.ndarray) \
        else np.asarray([labels[int(i)] for i in ids])


def replay_views(batch: dict[str, Any], inputs: Any, views: ViewSpec) -> torch.Tensor:
    """Pixels (B, C, H, W) float32 of a views cache batch's rows, rebuilt from their parameters
    exactly as the cache stage rendered them for the teachers (the function the student stage
    replays them with): `inputs` the source images (B', C, H, W) indexable by sample id, as for
    `Cache.dataset(inputs=...)`; `views` the cache's `Cache.views`. `batch` needs sample_id, view and
    the parameters a views batch carries (box, flip; partner, lam, cut with mixup/cutmix)."""
    if not isinstance(views, ViewSpec):
        raise ArgumentError(f"views: expected the cache's views (cache.views), got {views!r}; replay_views needs a "
                            "views cache")
    if not isinstance(batch, dict):
        raise ArgumentError(f"batch: expected a batch dict of a views cache, got {type(batch).__name__}")
    needed = ["sample_id", "view", "box", "flip", *(["partner"] if mixes(views.augment) else [])]
    missing = [k for k in needed if k not in batch]
    if missing:
        raise ArgumentError(f"batch: no {missing[0]!r}; pass a batch of this views cache's dataset (it carries "
                            f"{', '.join(needed)})")
    params = {k: v.cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in batch.items()
              if k in ("sample_id", "view", *PARAMS)}
    return vw.render_rows(_lookup(inputs), params, views.augment)


class CacheLoader(DataLoader):
    """DataLoader(ds, batch_size=None) that counts the batches it hands out: state_dict() is the
    dataset's position, load_state_dict() resumes there (any num_workers; see the module docstring
    for another world size)."""

    def __init__(self, dataset: CacheDataset, num_workers: int = 0, **kwargs: Any) -> None:
        argument("num_workers", num_workers, NONNEGATIVE_INT)
        if kwargs.get("persistent_workers"):
            raise ValueError("persistent_workers=True keeps each worker's copy of the dataset, so set_epoch and "
                             "load_state_dict would not reach it; leave it off")
        super().__init__(dataset, batch_size=None, num_workers=num_workers, **kwargs)
        self._consumed = 0
        self._epoch = dataset.epoch

    def _sync(self) -> None:
        if self.dataset.epoch != self._epoch:  # set_epoch was called
            self._epoch, self._consumed = self.dataset.epoch, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._sync()
        ds: CacheDataset = self.dataset
        ds.rank, ds.world_size = ds._resolve_dist()  # in the parent, before workers start
        self._consumed = ds._start
        for batch in super().__iter__():
            self._consumed += 1
            yield batch
        ds._start = 0  # iterating again without set_epoch replays the epoch

    def state_dict(self) -> dict[str, Any]:
        self._sync()
        return self.dataset.state_dict(batches=self._consumed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)
        self._epoch, self._consumed = self.dataset.epoch, self.dataset._start


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Move every tensor of a batch (nested dicts too) to `device`; other values are kept."""
    if not isinstance(device, torch.device):
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ArgumentError(f"device: {device!r} is not a device; use cpu, cuda, cuda:N or a torch.device") from None
    return {k: to_device(v, device) if isinstance(v, dict) else v.to(device)
            if isinstance(v, (torch.Tensor, Targets)) else v for k, v in batch.items()}


__all__ = ["Cache", "CacheDataset", "CacheLoader", "open_cache", "replay_views", "to_device"]

