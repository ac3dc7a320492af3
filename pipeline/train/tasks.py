"""Tasks: what differs between classifying examples and predicting next tokens, in one object each.

    task = task_of(cfg)                     # TASKS[cfg.data.task], looked up once
    x, y = task.examples(splits.train, rows)
    loss = task.student_loss(model, batch, dev, **settings)

A classification row is one example with one label; a token row is one position of a sequence,
whose label is the next token, and whose logits are computed from hidden states a chunk of rows at
a time, never as (batch, seq, vocab). Adding a task is one class here and one entry in TASKS (its
config checks live with the rest in pipeline/core/config.py, and its inputs in
pipeline/inputs/splits.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from pipeline.core.config import Config
from pipeline.core.io import file_digest
from pipeline.inputs.arrays import Dataset, Splits
from pipeline.inputs.documents import Layout, context_window
from pipeline.inputs.splits import load_splits
from pipeline.inputs.text import tokenizer_file
from pipeline.inputs.tokens import read_manifest as read_token_manifest
from pipeline.inputs.tokens import target_chars
from pipeline.models.ensemble import token_logits
from pipeline.models.lm import hidden_and_head
from pipeline.train.crossloss import cross_kd_loss
from pipeline.train.losses import chunked_cross_entropy, chunked_kd_loss, kd_loss


class Task(Protocol):
    name: str
    row_unit: str  # what a cache row is, in progress lines
    eval_batch: int  # examples (sequences) scored at once by held-out metrics
    labels_in_inputs: bool  # a row's label comes with its inputs (the next token), not from a label column

    def rows_per_example(self, cfg: Config) -> int: ...
    def cache_batch(self, cfg: Config) -> int: ...
    def score_batch(self, cfg: Config) -> int: ...
    def dataset_identity(self, cfg: Config, splits: Splits) -> dict[str, Any]: ...
    def examples(self, data: Dataset, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]: ...
    def held_out(self, splits: Splits) -> tuple[np.ndarray, np.ndarray]: ...
    def report_metrics(self, metrics: dict[str, float]) -> dict[str, float]: ...
    def teacher_logits(self, models: list[nn.Module], x: torch.Tensor,
                       logit_rows: int) -> Any: ...
    def fit_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logit_rows: int) -> torch.Tensor: ...
    def student_labels(self, splits: Splits) -> Dataset | None: ...
    def student_data(self, cfg: Config, splits: Splits) -> dict[str, Any]: ...
    def student_shape(self, cfg: Config, splits: Splits) -> tuple[int, ...]: ...
    def transfer_fingerprint(self, splits: Splits) -> str: ...
    def student_settings(self, cfg: Config) -> dict[str, Any]: ...
    def student_loss(self, model: nn.Module, batch: dict[str, Any], dev: torch.device,
                     **settings: Any) -> torch.Tensor: ...


@dataclass(frozen=True)
class Classification:
    name: str = "classify"
    row_unit: str = "rows"
    eval_batch: int = 512
    labels_in_inputs: bool = False

    def rows_per_example(self, cfg: Config) -> int:
        return 1

    def cache_batch(self, cfg: Config) -> int:
        return cfg.cache.batch_size or 512

    def score_batch(self, cfg: Config) -> int:
        return 256

    def dataset_identity(self, cfg: Config, splits: Splits) -> dict[str, Any]:
        t = splits.transfer
        return {"fingerprint": t.fingerprint, "rows": len(t), "input_shape": list(splits.input_shape)}

    def examples(self, data: Dataset, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and labels of the rows at positions `index` (any order: the batch keeps it)."""
        x, y = data.rows(index)
        assert y is not None  # load_splits refuses unlabelled training data
        return torch.from_numpy(x), torch.from_numpy(y)

    def held_out(self, splits: Splits) -> tuple[np.ndarray, np.ndarray]:
        assert splits.test.y is not None
        return splits.test.x, splits.test.y

    def report_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return metrics

    def teacher_logits(self, models: list[nn.Module], x: torch.Tensor, logit_rows: int) -> Any:
        """(rows, each model's logits (B, C)) for the whole batch at once."""
        return iter([(slice(0, len(x)), [m(x) for m in models])])

    def fit_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logit_rows: int) -> torch.Tensor:
        """A built-in teacher's training loss: cross-entropy of its (B, C) logits."""
        return nn.functional.cross_entropy(model(x), y)

    def student_labels(self, splits: Splits) -> Dataset | None:
        return splits.transfer if splits.transfer.y is not None else None

    def student_data(self, cfg: Config, splits: Splits) -> dict[str, Any]:
        """What `Cache.dataset` joins to the targets: the inputs (and labels) by sample id."""
        return {"inputs": splits.transfer, "labels": self.student_labels(splits)}

    def student_shape(self, cfg: Config, splits: Splits) -> tuple[int, ...]:
        return splits.input_shape

    def transfer_fingerprint(self, splits: Splits) -> str:
        return splits.transfer.fingerprint

    def student_settings(self, cfg: Config) -> dict[str, Any]:
        return {}

    def student_loss(self, model: nn.Module, batch: dict[str, Any], dev: torch.device,
                     **settings: Any) -> torch.Tensor:
        x = batch["inputs"].to(dev, non_blocking=True)
        labels = batch.get("labels")
        return kd_loss(model(x), batch, labels=labels.to(dev) if labels is not None else None, **settings)


@dataclass(frozen=True)
class Tokens:
    name: str = "lm"
    row_unit: str = "tokens"
    eval_batch: int = 16
    labels_in_inputs: bool = True

    def rows_per_example(self, cfg: Config) -> int:
        return cfg.data.seq_len  # a row is a token; shards and chunks hold whole sequences

    def cache_batch(self, cfg: Config) -> int:
        return cfg.cache.batch_size or 8

    def score_batch(self, cfg: Config) -> int:
        """Sequences whose (tokens, vocab) logits stay within cache.logit_rows rows."""
        return max(1, cfg.cache.logit_rows // cfg.data.seq_len)

    def dataset_identity(self, cfg: Config, splits: Splits) -> dict[str, Any]:
        """Rows keyed by (document, offset) (pipeline/inputs/documents.py): the transfer split's
        trained positions, read with the teachers' context and stride."""
        corpus = splits.corpus
        context, stride = context_window(cfg.cache.context, cfg.cache.stride, cfg.data.seq_len)
        return {"keyed": "document", **corpus.identity(), "context": context, "stride": stride,
                "rows": int(corpus.rows_before(np.array([corpus.n_tokens]))[0]), "vocab_fingerprint": splits.vocab}

    def examples(self, data: Dataset, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token prediction: read tokens[:-1], predict tokens[1:]."""
        seq = torch.from_numpy(data.rows(index)[0])  # (B, seq_len + 1)
        return seq[:, :-1], seq[:, 1:]

    def held_out(self, splits: Splits) -> tuple[np.ndarray, np.ndarray]:
        return splits.test.x[:, :-1], splits.test.x[:, 1:]

    def report_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return {**metrics, "perplexity": float(np.exp(metrics["nll"]))}

    def teacher_logits(self, models: list[nn.Module], x: torch.Tensor, logit_rows: int) -> Any:
        """(token rows, each model's logits (rows, V)), `logit_rows` rows at a time."""
        return token_logits(models, x, logit_rows)

    def fit_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logit_rows: int) -> torch.Tensor:
        """Cross-entropy of the next token, `logit_rows` (rows, V) logits at a time: never (B, L, V)."""
        hidden, head = hidden_and_head(model, x)
        return chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head, y.reshape(-1), logit_rows)

    def student_labels(self, splits: Splits) -> Dataset | None:
        return None  # the label of a token is the next token of its sequence

    def student_data(self, cfg: Config, splits: Splits) -> dict[str, Any]:
        """The student's own layout (student.seq_len, student.packing) over the cache's documents in
        `splits`, the student's (student_splits: with student.tokenizer, aligned by `student.align`)."""
        data = {"layout": Layout(cfg.student.seq_len or cfg.data.seq_len, cfg.student.packing), "tokens": splits.corpus}
        return {**data, "align": cfg.student.align} if cfg.student.tokenizer is not None else data

    def student_shape(self, cfg: Config, splits: Splits) -> tuple[int, ...]:
        """(positions + 1,): the student's rows, and the held-out sequences it is scored on."""
        return (max(cfg.student.seq_len or cfg.data.seq_len, cfg.data.seq_len) + 1,)

    def transfer_fingerprint(self, splits: Splits) -> str:
        return splits.corpus.fingerprint

    def student_settings(self, cfg: Config) -> dict[str, Any]:
        out = {"logit_chunk": cfg.student.logit_chunk,
               "layout": {"seq_len": cfg.student.seq_len or cfg.data.seq_len, "packing": cfg.student.packing}}
        if cfg.student.tokenizer is not None:  # the student's own tokenizer, by content, and the method
            out["tokenizer"] = {"sha256": file_digest(tokenizer_file(Path(cfg.student.tokenizer), "student.tokenizer")),
                                "align": cfg.student.align}
        return out

    def student_loss(self, model: nn.Module, batch: dict[str, Any], dev: torch.device,
                     logit_chunk: int = 512, layout: Any = None, **settings: Any) -> torch.Tensor:
        """The batch's target rows sit at (sequence, position) of its rows of tokens; their (rows, V)
        logits are computed in chunks from the hidden states. `layout` was applied by the dataset."""
        x = batch["inputs"].to(dev, non_blocking=True)  # (B, L + 1)
        segments = batch.get("segments")
        hidden, head = hidden_and_head(model, x[:, :-1], None if segments is None else segments[:, :-1].to(dev))
        if "x_row" in batch:  # a student with its own tokenizer (pipeline/train/crosstok.py)
            return cross_kd_loss(hidden, head, batch, settings["temperature"], batch["align"], settings["alpha"],
                                 logit_chunk=logit_chunk, tail=settings.get("tail", "uniform"))
        seq, pos = batch["sequence"].to(dev), batch["position"].to(dev)
        return chunked_kd_loss(hidden[seq, pos], head, batch, labels=x[:, 1:][seq, pos], logit_chunk=logit_chunk,
                               **settings)


def student_splits(cfg: Config) -> Splits:
    """The splits a student with its own tokenizer (student.tokenizer) reads and is scored on: the
    same documents, tokenized with it."""
    data = dataclasses.replace(cfg.data, tokenizer=cfg.student.tokenizer, eos_token=None)
    return load_splits(dataclasses.replace(cfg, data=data))


def held_out_chars(splits: Splits, shape: tuple[int, ...]) -> np.ndarray | None:
    """The characters each held-out target of a language model's text corpus adds
    (tokens.target_chars), for the held-out targets of `shape` (sequences, seq_len); None otherwise."""
    if splits.corpus is None or len(shape) != 2:
        return None
    directory = splits.corpus.directory
    return target_chars(directory, read_token_manifest(directory), "test", shape[1], shape[0])


TASKS: dict[str, Task] = {"classify": Classification(), "lm": Tokens()}


def task_of(cfg: Config) -> Task:
    return TASKS[cfg.data.task]
