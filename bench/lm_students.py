"""Students distilled from top-k, sampled and hybrid caches of the bundled corpus at about the same
bytes per token, next to dense-free references: the hard-label student and the teacher.

Runs configs/lm.yaml (GPT teacher on Python standard-library docstrings, 8,192-token BPE, α = 0,
forward KL) once per encoding, sharing the teacher, and reports each cache's bytes per token and
the student's held-out NLL, mean over seeds.

    .venv/bin/python bench/lm_students.py [--seeds 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import line, record, workdir

from pipeline.core.config import load_config
from stages import cache, evaluate, student, teachers

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "lm.yaml"
# about 40 bytes per token each (measured: bench/bytes.py at 32k and the manifests printed below)
BUDGET = 40  # bytes per token
CACHES = {
    "topk-k12": ["cache.encoding=topk", "cache.k=12"],
    "topk-k16-q8": ["cache.encoding=topk", "cache.k=16", "cache.bits=8"],
    "sampled-n32": ["cache.encoding=sampled", "cache.draws=32"],
    "hybrid-k4-n24": ["cache.encoding=hybrid", "cache.k=4", "cache.draws=24"],  # about 50 B
    "hybrid-k4-n12-q8": ["cache.encoding=hybrid", "cache.k=4", "cache.draws=12", "cache.bits=8"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=list(CACHES), help="a subset of the encodings (first trains the "
                    "hard-label baseline)")
    ap.add_argument("--workdir", type=Path, default=None, help="reuse a workspace (teacher, caches, finished jobs)")
    args = ap.parse_args()
    ws = args.workdir or workdir("lmstudents")
    seeds = f"student.seeds=[{', '.join(str(s) for s in range(args.seeds))}]"
    results = {}
    hard = teacher = None
    for name, over in ((k, CACHES[k]) for k in args.only):
        cfg = load_config(CONFIG, [f"workspace={ws}", f"run_name={name}", seeds,
                                   f"student.baseline={'true' if name == next(iter(CACHES)) else 'false'}", *over])
        teachers.main(cfg)
        cache.main(cfg)
        student.main(cfg)
        report = evaluate.main(cfg)
        kd = [r for r in report["rows"] if r["role"] == "distilled"]
        results[name] = {"bytes_per_token": report["cache"]["bytes_per_row"],
                         "student_nll": round(float(np.mean([r["nll"] for r in kd])), 4),
                         "student_nll_per_seed": [round(r["nll"], 4) for r in kd]}
        if name == next(iter(CACHES)):
            hard = round(float(np.mean([r["nll"] for r in report["rows"] if r["role"] == "hard-label"])), 4)
            teacher = round(next(r["nll"] for r in report["rows"] if r["role"] == "ensemble"), 4)
    within = {k: v for k, v in results.items() if v["bytes_per_token"] <= BUDGET * 1.1}  # the comparison's budget
    best_other = min((v["student_nll"] for k, v in within.items() if not k.startswith("hybrid")), default=None)
    best_hybrid = min((v["student_nll"] for k, v in within.items() if k.startswith("hybrid")), default=None)
    record("lm_students", line("lm_students", setting="configs/lm.yaml, vocab 8192, alpha 0, forward KL",
                               seeds=args.seeds,
         results=results, hard_label_nll=hard, teacher_nll=teacher,
         goal=f"within {BUDGET} B/token (+10%): the hybrid student at least as good as the best of top-k and sampled",
         goal_met=None if None in (best_hybrid, best_other) else bool(best_hybrid <= best_other)))


if __name__ == "__main__":
    main()
