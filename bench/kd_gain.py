"""End to end: the distillation gain a compact cache keeps compared with a dense one.

Runs configs/omit3.yaml (digits, no 3s in the transfer set, 3 seeds) with a dense float32 cache and
with compact caches, and reports for each: student accuracy gain over the hard-label twin, the
share of the dense cache's gain it keeps, and ECE.

    .venv/bin/python bench/kd_gain.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, workdir

from pipeline.config import load_config
from stages import cache, evaluate, student, teachers

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "omit3.yaml"
CACHES = {
    "dense-float32": ["cache.encoding=dense", "cache.dtype=float32"],
    "dense-float16": ["cache.encoding=dense", "cache.dtype=float16"],
    "topk-k8-q8": ["cache.encoding=topk", "cache.k=8", "cache.bits=8"],
    "topk-k5": ["cache.encoding=topk", "cache.k=5"],
    "topk-k3-q8": ["cache.encoding=topk", "cache.k=3", "cache.bits=8"],
}


def main() -> None:
    ws = workdir("kdgain")
    results = {}
    for name, over in CACHES.items():
        cfg = load_config(CONFIG, [f"workspace={ws}", f"run_name={name}", *over])
        teachers.main(cfg)
        cache.main(cfg)
        student.main(cfg)
        report = evaluate.main(cfg)
        rows = {(r["model"], r["role"]): r for r in report["summary"]}
        kd, hard = rows[("mlp-100", "distilled")], rows[("mlp-100", "hard-label")]
        results[name] = {"bytes_per_row": report["cache"]["bytes_per_row"], "kd_accuracy": round(kd["accuracy"], 4),
                         "hard_accuracy": round(hard["accuracy"], 4), "gain": round(kd["accuracy"] - hard["accuracy"], 4),
                         "ece": round(kd["ece"], 4), "excluded_class_accuracy": round(kd["excluded_accuracy"], 4)}
    dense = results["dense-float32"]
    for r in results.values():
        r["gain_kept"] = round(r["gain"] / dense["gain"], 3) if dense["gain"] else float("nan")
        r["ece_no_worse"] = bool(r["ece"] <= dense["ece"] + 1e-9)
    emit("kd_gain", setting="digits, class 3 left out of the transfer set, 3 seeds", results=results,
         goal={"gain_kept": 0.95, "ece": "no worse than dense"},
         seeds=3, mean_gain_dense=float(np.round(dense["gain"], 4)))


if __name__ == "__main__":
    main()
