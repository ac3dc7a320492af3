"""Scale: the real stages as fresh processes on generated data at 1x, 10x and 100x; each stage's peak
resident memory and its loop's rate, and their ratios from the first size to the last.

    .venv/bin/python bench/scale.py [--tasks classify,lm] [--rows 20000] [--lm-tokens 20000]
                                    [--tokenize-words 830000] [--sizes 1,10,100]

Every stage runs as `logitcache NAME CONFIG` in a fresh Python process (common.run_stage) with
LOGITCACHE_PROGRESS_INTERVAL=3600, so it logs only its loop's final "..., N rows/s, done" line.
Per stage and size: `peak_rss_mb`, the process's own VmHWM, which it prints at exit (a child's
ru_maxrss from wait4 would carry over the peak of this process, which wrote the inputs);
`peak_anon_mb`, the largest RssAnon (heap, as opposed to mapped input pages) of samples taken every
50 ms; `per_s`, the rate of that "done" line: the stage's main loop only (the teacher pass, the
training epoch, the tokenizer's stream over the corpus), without start-up, imports, model loading
or the held-out pass; `raw_per_s`, rows over the process's wall clock. One JSON line per stage:
{"bench": "scale", "task": ..., "stage": ..., "rss_ratio": peak_rss_mb(last size)/peak_rss_mb(first
 size) of --sizes, "anon_ratio": the same for peak_anon_mb, "speed_ratio": the same for per_s
 (raw_per_s when either size has none; "speed_from" says which), "raw_speed_ratio", "unmet": the
 goals missed, "sizes": the figures above per size}. Goals: rss_ratio <= 1.25, speed_ratio >= 0.9.

classify: inputs are a directory of .npy arrays written block by block (262,144 rows) through
np.memmap, never whole in RAM: x (rows, FEATURES=128) float32 standard normal, y (rows,) int64 of
1,000 classes, and a 2,000-row held-out x_test/y_test. --rows 20,000 gives 20k, 200k and 2M rows
(1.04 GB of inputs at 100x). The teacher is a randomly initialized MLP (128-128-1000) saved once
and imported by the cache stage (factory `scale:mlp`), temperature 2; the cache is top-10, 8-bit,
16,384-row shards of 4,096-row chunks, 4,096-row teacher batches; the student (an MLP with one
hidden layer of 64) trains one epoch in batches of 256. Each size has its own workspace, removed
before the next. At 1x both loops last about a second, so their 1x rates carry warm-up.

lm (a row is a token): text corpora generated block by block (make_corpus: paragraphs of 20-299
words drawn Zipf-distributed from 1,000 random lowercase words; about 1.2 tokens a word). A fixed
corpus of 20,000 words is data.source: `logitcache teachers` trains the byte-level BPE (2,048
tokens) and the GPT teacher (1 layer, width 64, 2 epochs) on it once, before anything is measured,
and every run reuses them; the generated corpus of each size is data.transfer.source. Two ladders,
because the stages run at very different rates here (tokenize about 450k tokens/s on an idle
machine, the cache stage 15k-22k, the student 10k-12k):
- tokenize: --tokenize-words 830,000 words at 1x, about 1M, 10M and 100M tokens (5 MB to 500 MB of
  text); the run also tokenizes the fixed source (24k tokens), `n` and `per_s` are the generated
  corpus's. Its 1x peak holds everything the stage holds at any size: the interpreter and the
  stage's imports (about 40 MB), the loaded tokenizer (9 MB), one batch's Encodings and ids (a
  batch is at most 131,072 characters, about 4 MB here), the 1 MiB read block with its decoded
  copies (about 5 MB) and the allocator's fragmentation, which levels off within the first one or
  two million tokens. A 1x of 24k tokens (125 KB of text: one batch, an eighth of a read block)
  peaked at 57 MB, and the same code at 2.4M tokens at 67 MB. --tokenize-words 0 skips this ladder
  (the cache and student lines only). `make bench` passes --tokenize-words 83000 (about 100k, 1M and
  10M tokens: 25 s instead of minutes); its 1x of 100k tokens fills batches and half a read block,
  and peaked at 59.9 MB against 67.1 MB at 10M tokens (ratio 1.12) in the run that chose it.
- cache and student: --lm-tokens 20,000 words at 1x, about 24k, 241k and 2.4M tokens; the corpus
  is tokenized first (not measured). cache: top-8 of the teacher over 64-token sequences, 4,096-
  token shards (1x spans six), batches of 32 sequences; student: a 1-layer GPT of width 32, one
  epoch, batches of 32 sequences. 100M tokens would take these stages hours on 2 cores, so their
  1x loops last only a few seconds (12 batches of 32 sequences): their 1x peaks are mostly the fixed
  cost (the interpreter with torch and the stage's modules alone peak at 248 MB) and their 1x rates
  carry warm-up, so a speed_ratio above 1 is expected.
With the defaults, --tasks lm took 12 and 17 minutes in two runs on 2 cores that another job also
used (the 100M-token tokenize run: 3.5 and 6 minutes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from common import StageRun, line, record, run_stage, workdir

FEATURES, CLASSES = 128, 1000
LM_WORDS, LM_SOURCE_WORDS, LM_SEQ = 1000, 20_000, 64


def mlp() -> torch.nn.Module:
    """The teacher: a small MLP, imported by the cache stage (factory `scale:mlp`)."""
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 128), torch.nn.ReLU(), torch.nn.Linear(128, CLASSES))


def make_inputs(d: Path, rows: int, block: int = 1 << 18) -> None:
    """x.npy, y.npy (and a small held-out x_test/y_test) written block by block through a memmap."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x = np.lib.format.open_memmap(d / "x.npy", mode="w+", dtype=np.float32, shape=(rows, FEATURES))
    y = np.lib.format.open_memmap(d / "y.npy", mode="w+", dtype=np.int64, shape=(rows,))
    for i in range(0, rows, block):
        n = min(block, rows - i)
        x[i:i + n] = rng.standard_normal((n, FEATURES), dtype=np.float32)
        y[i:i + n] = rng.integers(0, CLASSES, n)
        x.flush()
        y.flush()
    del x, y
    np.save(d / "x_test.npy", rng.standard_normal((2000, FEATURES), dtype=np.float32))
    np.save(d / "y_test.npy", rng.integers(0, CLASSES, 2000))


def config(ws: Path, teacher: Path) -> Path:
    cfg = {
        "workspace": str(ws), "run_name": "scale",
        "data": {"source": str(ws / "inputs"), "num_classes": CLASSES},
        "teachers": {"temperature": 2.0, "members": [{"name": "mlp", "arch": "import", "factory": "scale:mlp",
                                                      "checkpoint": str(teacher)}]},
        "cache": {"encoding": "topk", "k": 10, "bits": 8, "rows_per_shard": 16384, "chunk_rows": 4096,
                  "batch_size": 4096},
        "student": {"epochs": 1, "batch_size": 256, "baseline": False, "checkpoint_every": 1000,
                    "models": [{"name": "s", "arch": "mlp", "hidden": [64]}]},
    }
    path = ws / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def stage(name: str, cfg: Path) -> StageRun:
    """`logitcache NAME CONFIG` in a fresh process (common.run_stage: its own peak RSS, its loop's rate)."""
    return run_stage([name, str(cfg)], env={"PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)])}, cwd=REPO)


def make_corpus(path: Path, words: int, seed: int, block: int = 2000) -> None:
    """About `words` words in paragraphs of 20-300, `block` paragraphs generated and written at a time."""
    rng = np.random.default_rng(0)
    vocab = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9))) for _ in range(LM_WORDS)]
    p = 1.0 / np.arange(1, LM_WORDS + 1)
    rng = np.random.default_rng(seed)
    vocab_arr = np.array(vocab)
    with open(path, "w") as f:
        written = 0
        while written < words:
            lengths = rng.integers(20, 300, block)
            lengths = lengths[: max(1, int(np.searchsorted(np.cumsum(lengths), words - written)) + 1)]
            drawn = vocab_arr[rng.choice(LM_WORDS, int(lengths.sum()), p=p / p.sum())]
            ends = np.cumsum(lengths)
            f.write("".join(" ".join(drawn[e - n:e]) + "\n\n" for e, n in zip(ends, lengths)))
            written += int(ends[-1])


def lm_config(ws: Path, transfer: Path) -> Path:
    cfg = {
        "workspace": str(ws), "run_name": "scale",
        "data": {"task": "lm", "source": str(ws / "source.txt"), "vocab_size": 2048, "seq_len": LM_SEQ,
                 "test_fraction": 0.1, "transfer": {"source": str(transfer)}},
        "teachers": {"temperature": 1.0, "epochs": 2, "batch_size": 32, "lr": 0.003,
                     "members": [{"name": "gpt", "arch": "gpt", "layers": 1, "d_model": 64, "heads": 2}]},
        "cache": {"encoding": "topk", "k": 8, "rows_per_shard": 4096, "chunk_rows": 4096, "batch_size": 32},
        "student": {"epochs": 1, "batch_size": 32, "lr": 0.003, "alpha": 0.0, "baseline": False, "seeds": [0],
                    "models": [{"name": "s", "arch": "gpt", "layers": 1, "d_model": 32, "heads": 2}]},
    }
    path = ws / "lm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def lm(words: int, tokenize_words: int, sizes: list[int]) -> None:
    """tokenize on a generated corpus of `tokenize_words` x size words, cache and student on one of
    `words` x size words (tokenized first, unmeasured); one JSON line per stage."""
    root = workdir("scale-lm")
    names = ("tokenize", "cache", "student") if tokenize_words else ("cache", "student")
    figures: dict[str, dict[str, dict[str, float]]] = {s: {} for s in names}
    try:
        make_corpus(root / "source.txt", LM_SOURCE_WORDS, seed=1)
        # the BPE and the teacher are trained once, on the fixed source, before anything is measured
        make_corpus(root / "warmup.txt", 1000, seed=3)
        stage("teachers", lm_config(root, root / "warmup.txt"))
        shutil.rmtree(root / "tokens")
        for size in sizes:
            if tokenize_words:
                corpus = root / f"tokenize-{size}x.txt"
                make_corpus(corpus, size * tokenize_words, seed=2)
                run = stage("tokenize", lm_config(root, corpus))
                figures["tokenize"][f"{size}x"] = measured(transfer_tokens(root), run)
                shutil.rmtree(root / "tokens")
                corpus.unlink()
            transfer = root / f"transfer-{size}x.txt"
            make_corpus(transfer, size * words, seed=2)
            cfg = lm_config(root, transfer)
            stage("tokenize", cfg)
            for name in ("cache", "student"):
                figures[name][f"{size}x"] = measured(transfer_tokens(root), stage(name, cfg))
            for d in ("tokens", "caches", "runs"):  # the next size's files need the disk
                shutil.rmtree(root / d, ignore_errors=True)
            transfer.unlink()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report("lm", figures, sizes, unit="tokens")


def transfer_tokens(root: Path) -> int:
    """Tokens in the transfer split of the one tokenized corpus under `root`."""
    import json

    manifest = json.loads(next((root / "tokens").glob("*/manifest.json")).read_text())
    return int(manifest["splits"]["transfer"]["n_tokens"])


def measured(n: int, run: StageRun) -> dict[str, float | None]:
    """One stage run's figures: `per_s` is the rate the stage's progress reports for its main loop
    (start-up, model loading and the held-out pass excluded), `raw_per_s` is n over the process's
    wall clock; `peak_anon_mb` is the heap part of the peak (mapped input pages excluded)."""
    return {"n": n, "seconds": round(run.seconds, 2), "peak_rss_mb": round(run.peak_mb, 1),
            "peak_anon_mb": round(run.peak_anon_mb, 1), "per_s": round(run.rate) if run.rate else None,
            "raw_per_s": round(n / run.seconds)}


def report(task: str, figures: dict[str, dict[str, dict[str, float]]], sizes: list[int], unit: str,
           **extra: float) -> None:
    lo, hi = f"{sizes[0]}x", f"{sizes[-1]}x"
    for name, f in figures.items():
        rss_ratio = f[hi]["peak_rss_mb"] / f[lo]["peak_rss_mb"]
        anon_ratio = f[hi]["peak_anon_mb"] / f[lo]["peak_anon_mb"]
        key = "per_s" if f[hi]["per_s"] and f[lo]["per_s"] else "raw_per_s"  # tokenize reports no loop rate
        speed_ratio = f[hi][key] / f[lo][key]
        unmet = [k for k, ok in (("rss_ratio", rss_ratio <= 1.25), ("speed_ratio", speed_ratio >= 0.9)) if not ok]
        record(f"scale-{task}-{name}", line("scale", task=task, stage=name, unit=unit, rss_ratio=round(rss_ratio, 3),
                                            anon_ratio=round(anon_ratio, 3),
             speed_ratio=round(speed_ratio, 3),
             raw_speed_ratio=round(f[hi]["raw_per_s"] / f[lo]["raw_per_s"], 3), speed_from=key,
             goals={"rss_ratio": "<= 1.25", "speed_ratio": ">= 0.9"}, unmet=unmet, **extra, sizes=f))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="classify,lm", help="classify, lm, or both")
    ap.add_argument("--rows", type=int, default=20_000, help="rows at 1x (classify)")
    ap.add_argument("--lm-tokens", type=int, default=20_000,
                    help="words of the LM cache and student corpus at 1x (about 1.2 tokens each); see the docstring")
    ap.add_argument("--tokenize-words", type=int, default=830_000,
                    help="words of the LM tokenize corpus at 1x (about 1M tokens); 0 skips the tokenize "
                         "ladder (no tokenize line); see the docstring")
    ap.add_argument("--sizes", default="1,10,100")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    tasks = args.tasks.split(",")
    unknown = sorted(set(tasks) - {"classify", "lm"})
    if unknown:
        raise SystemExit(f"--tasks: unknown task {unknown[0]!r}; give classify, lm or both")
    if "classify" in tasks:
        classify(args.rows, sizes)
    if "lm" in tasks:
        lm(args.lm_tokens, args.tokenize_words, sizes)


def classify(base_rows: int, sizes: list[int]) -> None:
    """cache and student on generated .npy inputs of `base_rows` x size rows; one JSON line per stage."""
    root = workdir("scale")
    torch.manual_seed(0)
    teacher = root / "teacher.pt"
    torch.save(mlp().state_dict(), teacher)
    stages = ("cache", "student")
    figures: dict[str, dict[str, dict[str, float]]] = {s: {} for s in stages}
    try:
        for size in sizes:
            rows = size * base_rows
            ws = root / f"{size}x"
            make_inputs(ws / "inputs", rows)
            cfg = config(ws, teacher)
            for name in stages:
                figures[name][f"{size}x"] = measured(rows, stage(name, cfg))
            shutil.rmtree(ws)  # the next size's inputs need the disk
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report("classify", figures, sizes, unit="rows",
           input_gb=round(sizes[-1] * base_rows * (FEATURES * 4 + 8) / 1e9, 2))


if __name__ == "__main__":
    main()
