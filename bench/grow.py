"""Growing a cache of per-member targets: one more teacher, or 10% more rows, costs only the new work.

    .venv/bin/python bench/grow.py [--rows 20480] [--rows-per-shard 2048] [--width 1024]

Four equal compute-heavy teachers (bench/heavy_teacher.py, each its own initialization) over random
inputs, 1,000 classes, top-32 targets per teacher (cache.members separate). Each time is the cache
stage (`stages.cache.main`) in this process, teachers loaded inside it; the inputs' and checkpoints'
digests are remembered on this machine before anything is timed, as for a user who has run the
stage before. Prints one JSON line:

- `add_teacher_ratio` = t(the 4-teacher cache where the 3-teacher one exists) / t(all 4 teachers
  from scratch). The 4th teacher's forward pass alone would be 0.25. Goal <= 0.35.
- `add_rows_ratio` = t(the cache of 110% of the rows, a second input file, where the 100% cache
  exists) / t(the 110% cache from scratch). Goal <= 0.2.
- the seconds of each run, and the bytes per row of the 4-teacher cache and of each member.

    .venv/bin/python bench/grow.py --students [--seeds 0 1 2]

prints a second line (results file grow-students): students of the digits demo (configs/demo.yaml,
its three teachers, the mlp-100 student, no hard-label twins) trained from the combined cache and
from one of per-member targets (dense float16, and top-3), per seed: the read-time mean_probs
ensemble of the three (`members_mean_probs`), per_member, and mlp-wide + mlp-deep only
(`dropped_cnn`) beside a fresh cache made without cnn, per-member (`fresh_without_cnn`) and combined
(`combined_without_cnn`); bytes per row of the combined, separate and both caches.
`within_seed_noise`: the members' mean accuracy is within one standard deviation over seeds of the
combined cache's; `dropped_equals_fresh`: the dropped-member students equal the fresh cache's.
"""

from __future__ import annotations

from pipeline.core.host import tune_process

tune_process()  # the process settings the CLI's stages run under; before torch loads (libgomp reads them then)

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])

from common import Timer, line, record, workdir
from heavy_teacher import make

from pipeline.core.config import load_config
from pipeline.run.identity import context
from stages import cache as cache_stage

TEACHERS = 4


def workspace(rows: int, more: int, width: int, rows_per_shard: int) -> Path:
    """Inputs (`rows`, and `more` in a second file), four teacher checkpoints and c.yaml."""
    ws = workdir("grow")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows + more, 64)).astype(np.float32)
    np.savez(ws / "d.npz", x=x[:rows], y=rng.integers(0, 1000, rows), x_test=x[:10], y_test=np.arange(10))
    np.savez(ws / "more.npz", x=x[rows:], y=rng.integers(0, 1000, more))
    members = []
    for i in range(TEACHERS):
        torch.manual_seed(i)
        torch.save(make(width=width).state_dict(), ws / f"t{i}.pt")
        members.append({"name": f"t{i}", "arch": "import", "factory": "heavy_teacher:make",
                        "checkpoint": str(ws / f"t{i}.pt"), "kwargs": {"width": width}})
    (ws / "c.yaml").write_text(yaml.safe_dump({
        "workspace": str(ws), "data": {"source": str(ws / "d.npz"), "num_classes": 1000},
        "teachers": {"temperature": 1.0, "members": members},
        "cache": {"encoding": "topk", "k": 32, "members": "separate", "rows_per_shard": rows_per_shard,
                  "chunk_rows": rows_per_shard // 2, "batch_size": 512},
    }))
    return ws


DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
WITHOUT_CNN = "teachers.members=[{name: mlp-wide, arch: mlp, hidden: [1200, 1200], dropout: 0.3, seed: 0}, " \
              "{name: mlp-deep, arch: mlp, hidden: [512, 512, 512], dropout: 0.2, seed: 1}]"


def students(seeds: list[int]) -> dict:
    """The demo's students from combined and per-member caches (see the module docstring)."""
    from stages import student as student_stage
    from stages import teachers as teacher_stage

    ws = workdir("grow-students")
    base = [f"workspace={ws}", "student.models=[{name: mlp-100, arch: mlp, hidden: [100]}]",
            "student.baseline=false", f"student.seeds={json.dumps(seeds)}"]
    teacher_stage.main(load_config(DEMO, base))

    def run(name: str, *over: str) -> dict[str, list[float]]:
        cfg = load_config(DEMO, [*base, f"run_name={name}", *over])
        cache_stage.main(cfg)
        out: dict[str, list[float]] = {}
        for r in student_stage.main(cfg):
            out.setdefault(r.job.rsplit("-kd-s", 1)[0], []).append(round(r.final_accuracy, 4))
        return out

    def stats(values: list[float]) -> dict:
        return {"per_seed": values, "mean": round(float(np.mean(values)), 4), "sd": round(float(np.std(values, ddof=1)), 4)
                if len(values) > 1 else 0.0}

    figures: dict = {"seeds": seeds}
    for encoding, over in (("dense", []), ("topk3", ["cache.encoding=topk", "cache.k=3"])):
        sep = run(f"sep-{encoding}", *over, "cache.members=separate", "student.grid={members: [[mlp-wide, mlp-deep, cnn], "
                  "[mlp-wide, mlp-deep]], combine: [mean_probs, per_member]}")
        acc = {"combined": run(f"comb-{encoding}", *over)["mlp-100"],
               "members_mean_probs": sep["mlp-100-mmlp-wide+mlp-deep+cnn-cmean_probs"],
               "members_per_member": sep["mlp-100-mmlp-wide+mlp-deep+cnn-cper_member"],
               "dropped_cnn": sep["mlp-100-mmlp-wide+mlp-deep-cmean_probs"],
               "fresh_without_cnn": run(f"fresh-{encoding}", *over, "cache.members=separate", WITHOUT_CNN)["mlp-100"],
               "combined_without_cnn": run(f"freshcomb-{encoding}", *over, WITHOUT_CNN)["mlp-100"]}
        comb, mine = stats(acc["combined"]), stats(acc["members_mean_probs"])
        figures[encoding] = {
            "accuracy": {k: stats(v) for k, v in acc.items()},
            "within_seed_noise": abs(mine["mean"] - comb["mean"]) <= max(comb["sd"], 1e-9),
            "dropped_equals_fresh": acc["dropped_cnn"] == acc["fresh_without_cnn"],
            "bytes_per_row": {m: json.loads((cache_stage.main(load_config(DEMO, [*base, *over, f"cache.members={m}"]))
                                             / "manifest.json").read_text())["bytes_per_row"]
                              for m in ("combined", "separate", "both")},
        }
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20480)
    ap.add_argument("--rows-per-shard", type=int, default=2048)
    ap.add_argument("--width", type=int, default=1024, help="of each teacher's hidden layers")
    ap.add_argument("--students", action="store_true", help="the demo's students from combined and per-member caches")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    if args.students:
        record("grow-students", line("grow", **students(args.seeds)))
        return
    more = args.rows // 10
    ws = workspace(args.rows, more, args.width, args.rows_per_shard)
    three = [f"teachers.members={json.dumps(yaml.safe_load((ws / 'c.yaml').read_text())['teachers']['members'][:3])}"]
    grown = [f"data.transfer.append=[{ws / 'more.npz'}]"]

    def cfg(root: str, *over: str):
        return load_config(ws / "c.yaml", [f"cache.root={ws / root}", *over])

    time.sleep(2.5)  # files this fresh are not remembered (pipeline/core/io.py RACY_NS)
    for over in ([], three, grown):
        context(cfg("warm", *over))  # the digests of inputs and checkpoints, remembered on this machine

    def timed(root: str, *over: str) -> tuple[float, Path]:
        with Timer() as t:
            d = cache_stage.main(cfg(root, *over))
        return t.seconds, d

    timed("grown", *three)  # the 3-teacher cache
    t_add_teacher, four = timed("grown")
    t_add_rows, _ = timed("grown", *grown)
    t_full4, scratch = timed("scratch")
    t_full110, _ = timed("scratch110", *grown)
    assert four.name == scratch.name, "a grown cache has the id of one made in one go"
    manifest = json.loads((four / "manifest.json").read_text())
    record("grow", line(
        "grow", rows=args.rows, added_rows=more, teachers=TEACHERS, shards=-(-args.rows // args.rows_per_shard),
        add_teacher_ratio=round(t_add_teacher / t_full4, 3), add_rows_ratio=round(t_add_rows / t_full110, 3),
        seconds={"add_4th_teacher": round(t_add_teacher, 2), "all_4_teachers": round(t_full4, 2),
                 "add_10pct_rows": round(t_add_rows, 2), "all_110pct_rows": round(t_full110, 2)},
        bytes_per_row={"cache": manifest["bytes_per_row"],
                       **{u["name"]: u["bytes_per_row"] for u in manifest["units"]}},
    ))


if __name__ == "__main__":
    main()
