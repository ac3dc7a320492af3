"""Scale: the real `cache` and `student` stages (and `tokenize` for language models), each a fresh
subprocess, on generated data at 1x, 10x and 100x; peak RSS (os.wait4's ru_maxrss of that process)
and rows/s of each stage.

    .venv/bin/python bench/scale.py [--tasks classify,lm] [--rows 20000] [--lm-tokens 20000] [--sizes 1,10,100]

Inputs are a directory of .npy arrays written block by block through np.memmap (never whole in
RAM): rows of 64 float32 features, 1,000 classes; at 100x of 40,000 rows that is 4M rows, 1.02 GB
of inputs. The teacher is a small imported MLP; the cache is top-10, 8-bit; the student trains one
epoch. rows/s is net of the stage's fixed cost (interpreter, imports, model and checkpoint I/O),
measured by running the same stage on a 1,000-row input first; the raw wall-clock figures are
printed too. One JSON line per stage:
{"bench": "scale", "task": "classify", "stage": ..., "rss_ratio": RSS(100x)/RSS(1x),
 "speed_ratio": rows/s(100x)/rows/s(1x), ...}. Goals: rss_ratio <= 1.25, speed_ratio >= 0.9.

The LM task (`"task": "lm"`, a row is a token) streams a generated text corpus: paragraphs of random
words (1,000 distinct lowercase words, Zipf-distributed), written to a .txt file block by block, about
--lm-tokens words at 1x. It is the config's data.transfer.source; data.source is a fixed corpus of
20,000 words, so the byte-level BPE (2,048 tokens) and the built-in GPT teacher (1 layer, width 64,
`logitcache teachers`, 2 epochs) are trained on it once, in a few seconds, and reused at every size.
Each size then runs `tokenize`, `cache` (top-8, 64-token sequences, 4,096-token shards so that even
1x spans whole shards) and `student` (a 1-layer GPT, one epoch), each timed and measured as its own
process; token counts are the tokenized corpus's (about 1.2 tokens per word), and `raw_speed_ratio`
is the same ratio without subtracting start-up costs.

Why the default is 20,000 words at 1x (about 24k tokens; 2.4M at 100x): the stages' own loop rates
here were about 21k tokens/s for the cache stage and 9.5k for the student (a run at 2,000 words), so
1x+10x+100x take about 8 minutes on 2 cores; the 1M/10M/100M tokens an LLM team would want would
take hours here. At 1x the teacher pass lasts about a second, so its rate still carries warm-up.
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
from common import StageRun, emit, run_stage, workdir

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


def lm(words: int, sizes: list[int]) -> None:
    """tokenize, cache and student on a generated corpus of `words` x size words; one JSON line per stage."""
    import json

    root = workdir("scale-lm")
    stages = ("tokenize", "cache", "student")
    figures: dict[str, dict[str, dict[str, float]]] = {s: {} for s in stages}
    try:
        make_corpus(root / "source.txt", LM_SOURCE_WORDS, seed=1)
        # the BPE and the teacher are trained once, on the fixed source, before anything is measured
        make_corpus(root / "warmup.txt", 1000, seed=3)
        stage("teachers", lm_config(root, root / "warmup.txt"))
        shutil.rmtree(root / "tokens")
        for size in sizes:
            transfer = root / f"transfer-{size}x.txt"
            make_corpus(transfer, size * words, seed=2)
            cfg = lm_config(root, transfer)
            tokens = 0
            for name in stages:
                run = stage(name, cfg)
                if name == "tokenize":
                    tokens = json.loads(next((root / "tokens").glob("*/manifest.json")).read_text())[
                        "splits"]["transfer"]["n_tokens"]
                figures[name][f"{size}x"] = measured(tokens, run)
            for d in ("tokens", "caches", "runs"):  # the next size's files need the disk
                shutil.rmtree(root / d, ignore_errors=True)
            transfer.unlink()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report("lm", figures, sizes, unit="tokens")


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
        emit("scale", task=task, stage=name, unit=unit, rss_ratio=round(rss_ratio, 3), anon_ratio=round(anon_ratio, 3),
             speed_ratio=round(speed_ratio, 3),
             raw_speed_ratio=round(f[hi]["raw_per_s"] / f[lo]["raw_per_s"], 3), speed_from=key,
             goals={"rss_ratio": "<= 1.25", "speed_ratio": ">= 0.9"}, unmet=unmet, **extra, sizes=f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="classify,lm", help="classify, lm, or both")
    ap.add_argument("--rows", type=int, default=20_000, help="rows at 1x (classify)")
    ap.add_argument("--lm-tokens", type=int, default=20_000,
                    help="words of the LM corpus at 1x (about 1.2 tokens each); see the docstring for the default")
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
        lm(args.lm_tokens, sizes)


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
