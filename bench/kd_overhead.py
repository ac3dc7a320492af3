"""The student's training step from a cache over the same student and batches with plain
cross-entropy, side by side in one run: what distillation costs a user every epoch.

    .venv/bin/python bench/kd_overhead.py [--repeats 3] [--steps 4] [--classify-steps 64] [--only lm,classify]

Tasks and sizes (a tiny student, so that the loss is a large share of its step; a real student's
layers only add the same cost to both sides):
  - lm: token caches (CacheWriter, sequences of 64 tokens) of next-token-like teacher distributions
    at 32k and 128k vocabularies in four encodings: top-32 16-bit, top-8 8-bit, sampled-32 and
    hybrid (top-8 + 16 tail draws, 8-bit head); the student is an embedding and a linear head of the
    vocabulary (d=64), batches of 4 sequences (256 token rows) at 32k and 2 at 128k, plain SGD.
  - classify: 1,000 classes, dense float16 and top-10 8-bit; an MLP (128-256-1000) on mapped
    features, batches of 512 rows.
Each through two paths:
  - `stage`: the student stage's step (`TASKS[task].student_loss` over `Cache.dataset`: for tokens
    the logits are computed a chunk of rows at a time from the hidden states, checkpointed);
    its cross-entropy twin computes the logits the same way (`chunked_cross_entropy`).
  - `api`: the public API (`open_cache(...).dataset(...)` and `kd_loss` on the model's logits);
    its twin is `F.cross_entropy` on the same logits.
Per step, four phases: read (the next batch from the dataset: waiting for the prefetched buffer,
decoding; cross-entropy reads nothing, its inputs are in memory), targets (the batch's targets made
from its decoded columns, where the loss would first read them), loss (the student's forward pass
and the loss), backward (backward and the optimizer step); `start` is the first batch's read, the
wait for the epoch's first buffer, paid once an epoch and left out of the per-step read. Every batch
makes a distillation step and the cross-entropy step of the same inputs, one after the other (in
turn first), so that both meet the same state of a shared machine; `ratio` is the median over
`--repeats` epochs of (distillation steps' time / cross-entropy steps' time), `ratio_with_start`
the same with `start` spread over the epoch's steps (`steps`: lm `--steps`, classify
`--classify-steps`, two shuffle buffers so that reading overlaps steps as in training).

`loss_peak_ratio`: peak bytes of tensors torch allocates while the loss's forward and backward run
(from the student's logits, or for `stage` its hidden states, as a leaf) over the same for
cross-entropy: the profiler's running total of CPU allocations (torch.profiler with
profile_memory, as tests/test_compact_losses.py measures), or torch.cuda.max_memory_allocated on a
GPU. Goal: step time <= 1.10 x plain cross-entropy for top-k and hybrid (RS-KD, ACL 2025: under
10% with about 12 sampled tokens).

One JSON line: {"bench": "kd_overhead", "rows": [{"task", "vocab", "encoding", "path", "ratio",
"ratio_with_start", "steps", "loss_peak_ratio", "ms": {"kd": {read, targets, loss, backward, start},
"ce": {...}}}, ...]}.
"""

from __future__ import annotations

from pipeline.core.host import tune_process

tune_process()  # the process settings the CLI's stages run under; before torch loads (libgomp reads them then)

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import line, lm_logits, record, synthetic_logits, workdir

import pipeline as lc
from pipeline.format.encodings import Dense, Encoding, Hybrid, Sampled, TopK
from pipeline.train.losses import chunked_cross_entropy, chunked_kd_loss
from pipeline.train.tasks import TASKS

SEQ_LEN, D_MODEL, LOGIT_CHUNK = 64, 64, 512


def seqs_per_batch(vocab: int) -> int:
    """Sequences per batch: 4 (256 token rows) at 32k, 2 at 128k; the logits stay 8-16M values."""
    return max(2, 4 * 32_000 // vocab)
CLASSES, FEATURES, CLASSIFY_BATCH = 1000, 128, 512
GOAL = 1.10
PHASES = ("read", "targets", "loss", "backward")  # a step's phases (bench's `ms`); `start` is once per epoch
GOAL_ENCODINGS = ("topk32", "topk8_q8", "hybrid_k8_n16_q8", "topk10_q8")  # top-k and hybrid


def lm_encodings(vocab: int) -> dict[str, Encoding]:
    return {"topk32": TopK(vocab, 32), "topk8_q8": TopK(vocab, 8, bits=8), "sampled32": Sampled(vocab, 32),
            "hybrid_k8_n16_q8": Hybrid(vocab, 8, 16, bits=8)}


def classify_encodings() -> dict[str, Encoding]:
    return {"dense": Dense(CLASSES), "topk10_q8": TopK(CLASSES, 10, bits=8)}


class TinyLM(nn.Module):
    """Tokens (B, L) -> hidden (B, L, d) -> logits (B, L, V): the `hidden`/`head` split the student
    stage's token loss uses (pipeline/models/lm.py)."""

    def __init__(self, vocab: int, d: int = D_MODEL) -> None:
        super().__init__()
        self.emb, self.mix, self.head = nn.Embedding(vocab, d), nn.Linear(d, d), nn.Linear(d, vocab, bias=False)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mix(self.emb(tokens)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(tokens))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 256), nn.ReLU(), nn.Linear(256, CLASSES))


# ---------------------------------------------------------------------------------------------
# Caches


def token_cache(root: Path, vocab: int, enc: Encoding, sequences: int) -> Path:
    """A token cache of `sequences` sequences of SEQ_LEN tokens, written by CacheWriter as a user's
    own teacher job would (a few sequences of (L, V) logits at a time)."""
    spec = {"teacher": {"name": "synthetic-lm"}, "dataset": {"fingerprint": f"kd-overhead-{vocab}"}}
    with lc.CacheWriter(root, spec=spec, encoding=enc, num_classes=vocab, seq_len=SEQ_LEN,
                        rows_per_shard=SEQ_LEN * 16, chunk_rows=SEQ_LEN * 8) as w:
        for s in range(0, sequences, 2):
            n = min(2, sequences - s)
            w.add(np.arange(s, s + n), logits=lm_logits(n * SEQ_LEN, vocab, seed=s).view(n, SEQ_LEN, vocab))
    return w.path


def class_cache(root: Path, enc: Encoding, rows: int) -> Path:
    spec = {"teacher": {"name": "synthetic-classifier"}, "dataset": {"fingerprint": "kd-overhead-classify"}}
    with lc.CacheWriter(root, spec=spec, encoding=enc, num_classes=CLASSES, rows_per_shard=8192,
                        chunk_rows=4096) as w:
        for s in range(0, rows, 4096):
            n = min(4096, rows - s)
            w.add(np.arange(s, s + n), logits=synthetic_logits(n, CLASSES, seed=s))
    return w.path


# ---------------------------------------------------------------------------------------------
# One (task, path): the distillation step and its cross-entropy twin


@dataclass
class Case:
    """How one task and path run a step: `kd(model, batch)` and `ce(model, inputs)` return the loss
    from the model's forward pass; `kd_leaf`/`ce_leaf` the same from a leaf (the logits or hidden
    states) for the memory measurement, with the leaf they start from."""
    make_model: Callable[[], nn.Module]
    kd: Callable[[nn.Module, dict[str, Any]], torch.Tensor]
    ce: Callable[[nn.Module, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]
    ce_inputs: Callable[[dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]
    leaves: Callable[[nn.Module, dict[str, Any]], tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]]


SETTINGS = {"temperature": 1.0, "alpha": 0.0, "divergence": "forward", "tail": "uniform"}


def lm_case(vocab: int, path: str, device: torch.device) -> Case:
    task = TASKS["lm"]

    def ce_inputs(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch["inputs"].to(device)
        return x[:, :-1], x[:, 1:]

    if path == "stage":
        def kd(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
            return task.student_loss(model, batch, device, logit_chunk=LOGIT_CHUNK, **SETTINGS)

        def ce(model: nn.Module, xy: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            hidden = model.hidden(xy[0])
            return chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), model.head, xy[1].reshape(-1),
                                         LOGIT_CHUNK)

        def leaves(model: nn.Module, batch: dict[str, Any]) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
            x, y = ce_inputs(batch)
            with torch.no_grad():
                h = model.hidden(x)
            seq, pos = batch["sequence"].to(device), batch["position"].to(device)
            leaf = h.detach().requires_grad_()
            return (lambda: chunked_kd_loss(leaf[seq, pos], model.head, batch, labels=y[seq, pos],
                                            logit_chunk=LOGIT_CHUNK, **SETTINGS),
                    lambda: chunked_cross_entropy(leaf.reshape(-1, leaf.shape[-1]), model.head, y.reshape(-1),
                                                  LOGIT_CHUNK))
    else:
        def kd(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
            x = batch["inputs"].to(device)
            return lc.kd_loss(model(x[:, :-1]), batch, temperature=SETTINGS["temperature"])

        def ce(model: nn.Module, xy: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            logits = model(xy[0])
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xy[1].reshape(-1))

        def leaves(model: nn.Module, batch: dict[str, Any]) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
            x, y = ce_inputs(batch)
            with torch.no_grad():
                logits = model(x)
            leaf = logits.detach().requires_grad_()
            return (lambda: lc.kd_loss(leaf, batch, temperature=SETTINGS["temperature"]),
                    lambda: F.cross_entropy(leaf.reshape(-1, vocab), y.reshape(-1)))

    return Case(lambda: TinyLM(vocab), kd, ce, ce_inputs, leaves)


def classify_case(path: str, device: torch.device) -> Case:
    task = TASKS["classify"]

    def ce_inputs(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["inputs"].to(device), batch["labels"].to(device)

    if path == "stage":
        def kd(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
            return task.student_loss(model, batch, device, **SETTINGS)
    else:
        def kd(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
            return lc.kd_loss(model(batch["inputs"].to(device)), batch, temperature=SETTINGS["temperature"])

    def ce(model: nn.Module, xy: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(model(xy[0]), xy[1])

    def leaves(model: nn.Module, batch: dict[str, Any]) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
        x, y = ce_inputs(batch)
        with torch.no_grad():
            leaf = model(x).detach().requires_grad_()
        return lambda: lc.kd_loss(leaf, batch, **SETTINGS), lambda: F.cross_entropy(leaf, y)

    return Case(mlp, kd, ce, ce_inputs, leaves)


# ---------------------------------------------------------------------------------------------
# Measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def paired_epoch(model: nn.Module, opt: torch.optim.Optimizer, ds: Any, case: Case,
                 device: torch.device, most: int | None = None) -> dict[str, dict[str, float]]:
    """One epoch of `ds` in which every batch makes a distillation step and then (or, every other
    batch, first) the cross-entropy step of the same inputs, already in memory, so that both sides
    meet the same state of a shared machine. Seconds per step of each phase: read (the next batch),
    targets (making the batch's targets from its decoded columns), loss, backward; `start` is the
    first step's read (the wait for the epoch's first buffer, paid once per epoch), which the
    per-step read leaves out. `most`: stop after that many batches."""
    sides = {side: dict.fromkeys(PHASES, 0.0) for side in ("kd", "ce")}
    start, steps = 0.0, 0

    def step(side: str, batch: Any) -> None:
        t0 = time.perf_counter()
        if side == "kd":
            batch["targets"].made()  # what the loss would do first: Targets are made where they are read
        t1 = time.perf_counter()
        loss = case.kd(model, batch) if side == "kd" else case.ce(model, batch)
        _sync(device)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        t3 = time.perf_counter()
        sides[side]["targets"] += t1 - t0
        sides[side]["loss"] += t2 - t1
        sides[side]["backward"] += t3 - t2

    it = iter(ds)
    while True:
        t0 = time.perf_counter()
        batch = next(it, None) if steps != most else None
        if batch is None:
            break
        _sync(device)
        if steps == 0:
            start = time.perf_counter() - t0
        else:
            sides["kd"]["read"] += time.perf_counter() - t0
        xy = case.ce_inputs(batch)
        _sync(device)
        for side, what in (("kd", batch), ("ce", xy))[::1 if steps % 2 == 0 else -1]:
            step(side, what)
        steps += 1
    per_step = {side: {k: v / max(steps - (k == "read"), 1) for k, v in phases.items()} for side, phases in sides.items()}
    return {"kd": {**per_step["kd"], "start": start}, "ce": {**per_step["ce"], "start": 0.0}, "steps": steps}


def peak_bytes(fn: Callable[[], torch.Tensor], device: torch.device) -> int:
    """Peak bytes allocated above the start while `fn()` and its backward run."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn().backward()
    with tempfile.TemporaryDirectory() as d:
        prof.export_chrome_trace(f"{d}/trace.json")
        events = json.loads(Path(f"{d}/trace.json").read_text())["traceEvents"]
    return allocated_peak(events)


def allocated_peak(events: list[dict[str, Any]]) -> int:
    """The peak of the profiler's running total of allocated bytes over a trace's memory events,
    above the total before the first (the total carries over from earlier profiles)."""
    memory = [e["args"] for e in events if e.get("name") == "[memory]"]
    if not memory:
        return 1
    base = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(1, max(m["Total Allocated"] for m in memory) - base)


def measure(case: Case, ds: Any, repeats: int, device: torch.device) -> dict[str, Any]:
    """`repeats` epochs of paired distillation and cross-entropy steps over the same batches; the step
    ratio (median over epochs of the distillation steps' time over the cross-entropy steps'), the
    phases' ms per step (medians over epochs) and the loss's peak memory ratio."""
    torch.manual_seed(0)
    model = case.make_model().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    ds.set_epoch(0)
    first = next(iter(ds))
    kd_leaf, ce_leaf = case.leaves(model, first)
    peak = {"kd": peak_bytes(kd_leaf, device), "ce": peak_bytes(ce_leaf, device)}
    paired_epoch(model, opt, ds, case, device, most=2)  # warm: first reads, allocator, kernels
    runs = []
    for r in range(repeats):
        ds.set_epoch(r + 1)
        runs.append(paired_epoch(model, opt, ds, case, device))
    step = [{side: sum(run[side][k] for k in PHASES) for side in ("kd", "ce")} for run in runs]
    ratios = [s["kd"] / s["ce"] for s in step]
    with_start = [(s["kd"] + run["kd"]["start"] / run["steps"]) / s["ce"] for s, run in zip(step, runs)]
    ms = {side: {k: round(1e3 * statistics.median(run[side][k] for run in runs), 2) for k in (*PHASES, "start")}
          for side in ("kd", "ce")}
    return {"ratio": round(statistics.median(ratios), 3), "ratio_with_start": round(statistics.median(with_start), 3),
            "steps": runs[0]["steps"], "loss_peak_ratio": round(peak["kd"] / peak["ce"], 3),
            "ms": ms, "ratios": [round(x, 3) for x in ratios],
            "loss_peak_mb": {k: round(v / 2**20, 1) for k, v in peak.items()}}


def lm_rows(vocabs: list[int], repeats: int, steps: int, device: torch.device, ws: Path) -> list[dict[str, Any]]:
    rows = []
    for vocab in vocabs:
        sequences = steps * seqs_per_batch(vocab)
        tokens = np.random.default_rng(0).integers(0, vocab, (sequences, SEQ_LEN + 1))
        for name, enc in lm_encodings(vocab).items():
            cache = lc.open_cache(token_cache(ws / "caches", vocab, enc, sequences))
            for path in ("stage", "api"):
                ds = cache.dataset(seqs_per_batch(vocab), seed=0, shuffle_chunks=2, inputs=tokens)
                got = measure(lm_case(vocab, path, device), ds, repeats, device)
                rows.append({"task": "lm", "vocab": vocab, "encoding": name, "path": path, **got})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def classify_rows(repeats: int, steps: int, device: torch.device, ws: Path) -> list[dict[str, Any]]:
    rows = []
    n = steps * CLASSIFY_BATCH
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    y = rng.integers(0, CLASSES, n)
    for name, enc in classify_encodings().items():
        cache = lc.open_cache(class_cache(ws / "caches", enc, n))
        for path in ("stage", "api"):
            ds = cache.dataset(CLASSIFY_BATCH, seed=0, inputs=x, labels=y)
            got = measure(classify_case(path, device), ds, repeats, device)
            rows.append({"task": "classify", "vocab": CLASSES, "encoding": name, "path": path, **got})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def run(repeats: int, steps: int, tasks: list[str], vocabs: list[int], device: torch.device,
        classify_steps: int | None = None) -> list[dict[str, Any]]:
    """The rows of `tasks`: `steps` steps per epoch for lm, `classify_steps` (default `steps`) for classify."""
    ws = workdir("kd-overhead")
    try:
        rows = []
        if "lm" in tasks:
            rows += lm_rows(vocabs, repeats, steps, device, ws)
        if "classify" in tasks:
            rows += classify_rows(repeats, classify_steps or steps, device, ws)
        return rows
    finally:
        shutil.rmtree(ws, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="steps per epoch (lm)")
    ap.add_argument("--classify-steps", type=int, default=64,
                    help="steps per epoch (classify): 2 shuffle buffers, so that reading overlaps steps as in training")
    ap.add_argument("--only", default="lm,classify", help="comma-separated: lm, classify")
    ap.add_argument("--vocabs", default="32000,128000")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = run(args.repeats, args.steps, args.only.split(","), [int(v) for v in args.vocabs.split(",")], device,
               args.classify_steps)
    met = all(r["ratio"] <= GOAL for r in rows if r["encoding"] in GOAL_ENCODINGS)
    record("kd_overhead", line("kd_overhead", device=str(device), goal=GOAL, met=met, steps=args.steps,
                               classify_steps=args.classify_steps,
                               repeats=args.repeats, rows=rows))


if __name__ == "__main__":
    main()
