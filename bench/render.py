"""Render bench/results/*.json into docs/performance.md: for each benchmark what it measures and the
command that records it, then per results file the run's stamp and one row per figure, with the goal
from GOALS below and whether the figure meets it. A benchmark the Makefile runs that has no results
file yet gets a row saying so. Same results in, same bytes out.

    .venv/bin/python bench/render.py [--results bench/results] [--out docs/performance.md]

`make performance` runs it, and `make bench` and `make bench-quality` after their scripts. It reads
JSON and measures nothing (standard library only). A results file is what `record` in
bench/common.py writes: {"name": SCRIPT or SCRIPT-PART, "stamp": {...}, "figures": {the printed line}}.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

Goal = tuple[str, Any, str]  # (comparison, threshold, a short text: what, and where the goal is stated)

_READER_LAYOUTS = ("default", "zarr_4096", "zarr_4096_shuffle_lz4hc", "zarr_4096_shuffle_zstd", "zarr_16384",
                   "zarr_16384_shuffle_lz4hc", "parquet_4096")
_VIEW_BYTES = {f"bytes_per_view_1000_classes_topk10_8bit.{aug}.bytes_per_view":
               ("<=", 32.0, f"B/view, 1,000 classes, top-10 8-bit, {aug}")
               for aug in ("crop+flip", "crop+flip+mixup/cutmix")}
_ENCODING_SETTINGS = ("1000_classes", "32000_vocab", "151936_vocab")

# The goals, in one place. Keys: a benchmark (the script's name), or one results file (SCRIPT-PART),
# whose entry then replaces the script's for that file. Figures are key paths into the printed line,
# levels joined by "." ("ratio.zarr_4096"). Comparisons: <=, >=, <, >, == and abs< (|figure| <
# threshold); a threshold "@PATH" is another figure of the same run. A goal whose figure a run lacks
# is not judged for that run. Where each goal was stated: "README" is the README's "Performance"
# section and the sections it pointed to (Encodings, Language models, Views) before the README was
# split into docs/ (commit 751a228); after that, docs/performance.md, which this script now writes.
GOALS: dict[str, dict[str, Goal]] = {
    # README; the script's goal=0.97; docstring: "Writing must hide behind compute"
    "teacher_overhead": {"ratio": (">=", 0.97, "cache stage over a bare teacher loop")},
    # README; the script's goal=0.95
    "student_streaming": {"ratio": (">=", 0.95, "steps/s from disk over all in RAM")},
    # docs/python-api.md: a rank that ends with os._exit(0) once its results are written does not abort at exit
    "gloo_exit": {"aborts.os_exit": ("==", 0, "jobs with a rank aborted at exit, ranks ending with os._exit(0)")},
    # docs/scaling-out.md and the script's docstring: a warm shard cache reads as fast as local disk
    "object_storage": {"ratio.warm": (">=", 0.9, "rows/s, warm shard cache over local disk")},
    # README; docstring "goal ratio <= 1.10"; the script's goal=1.10
    "student_memory": {"ratio": ("<=", 1.10, "peak RSS, 10x the cache over 1x")},
    # README (>= 0.5 for every layout; none for the first reader); docstring; the script's goal=0.5
    "reader": {f"ratio.{layout}": (">=", 0.5, "of memmap's rows/s") for layout in _READER_LAYOUTS},
    # README only: the script states no goal
    "fanout": {"speedup": (">=", 1.6, "2 Dask workers over 1 process, 1 thread"),
               "caches_identical": ("==", True, "serial and Dask caches byte-identical")},
    # README; docstring; the script's goals and unmet
    "scale": {"rss_ratio": ("<=", 1.25, "peak RSS at 100x over 1x"),
              "speed_ratio": (">=", 0.9, "loop rate at 100x over 1x")},
    # README Encodings: hybrid at <= 40 B, |bias| < 1% of the exact KL and variance below sampled, at
    # 1,000 classes, 32k and 152k (the script's goals() checks the two vocabularies only)
    "bytes": {
        **{f"results.{setting}.hybrid@{budget}.bias_rel": ("abs<", 0.01, "hybrid: bias, relative to the exact KL")
           for setting in _ENCODING_SETTINGS for budget in (24, 40)},
        **{f"results.{setting}.hybrid@{budget}.var_rel": ("<", f"@results.{setting}.sampled@{budget}.var_rel",
                                                          "hybrid: variance below sampled's at the same budget")
           for setting in _ENCODING_SETTINGS for budget in (24, 40)}},
    # README Encodings; the script's GOAL (gain_kept >= 0.95 at <= 40 B/row, ECE no worse than dense)
    "kd_gain": {"goal_met": ("==", True, "a cache at <= 40 B/row keeps >= 95% of the gain, ECE no worse")},
    # README Language models; the script's goal
    "lm_students": {"goal_met": ("==", True, "at <= 40 B/token (+10%) the hybrid student is the best")},
    # issue: at least one cross-tokenizer method beats the student tokenizer's hard-label twin
    "cross_tokenizer": {"goal_met": ("==", True, "a cross-tokenizer student beats its hard-label twin in NLL/char")},
    # README Views; the script's GOALS (bytes, write time, the two accuracy checks it computes)
    "views": {
        **_VIEW_BYTES,
        **{f"write_time_per_view_over_per_image.views={n}": ("<=", 1.0, "write time per row over plain images")
           for n in (1, 8, 32)},
        "goals_met.views_reach_online": ("==", True, "N-view student within 1 sd of online KD"),
        "goals_met.views_beat_one_view": ("==", True, "N-view student above the 1-view cache's"),
        "seconds": ("<=", 300, "wall time of the 3-seed default run")},  # README Views only
    "views-bytes": dict(_VIEW_BYTES),  # bench/views.py --only bytes
    # issue 23 (a cache that grows): with four equal teachers, growth costs only the new work
    "grow": {"add_teacher_ratio": ("<=", 0.35, "t(add a 4th teacher) / t(all 4 from scratch)"),
             "add_rows_ratio": ("<=", 0.2, "t(add 10% rows) / t(110% from scratch)")},
    # issue 23: per-member targets give the combined cache's student; a dropped member, a fresh cache's
    "grow-students": {f"{enc}.{key}": ("==", True, text) for enc in ("dense",) for key, text in (
        ("within_seed_noise", "members' student within 1 sd of the combined cache's"),
        ("dropped_equals_fresh", "a member dropped: the student of a cache made without it"))},
    # issue 24: writing hides behind a bf16 teacher on a GPU (teacher_overhead's goal, where it is meant)
    "gpu-teacher": {f"vocab.{v}.ratio": (">=", 0.97, "cache stage over a bare bf16 forward") for v in (32000, 128000)},
}

# Goals on the records of a figure that is a table (a list of records, bench/kd_overhead.py's "rows"), by
# benchmark (or results file) and figure: (which records, as {key: allowed values}; the record's figure; the goal).
TableGoal = tuple[dict[str, tuple[Any, ...]], str, Goal]
_KD_GOAL: TableGoal = ({"encoding": ("topk32", "topk8_q8", "hybrid_k8_n16_q8", "topk10_q8")}, "ratio",
                       ("<=", 1.10, "step time over plain cross-entropy (top-k, hybrid; RS-KD: < 10%)"))
TABLE_GOALS: dict[str, dict[str, list[TableGoal]]] = {
    "kd_overhead": {"rows": [_KD_GOAL]},  # issue 24: RS-KD (ACL 2025) trains within 10% of cross-entropy
    "gpu-kd_overhead": {"rows": [_KD_GOAL]},
}

# What each benchmark measures, in one line.
DESCRIPTIONS = {
    "amortization": "Wall time of 4 students trained from one cache (teacher run once) over 4 online "
                    "distillations, and the break-even number of students.",
    "bytes": "Bytes per row of each encoding at 24, 40 and 96 B budgets, and the bias and variance of the "
             "student's loss it gives, at 1,000 classes and 32k and 152k vocabularies.",
    "fanout": "The cache stage on 2 Dask workers over one process (one torch thread, and all threads); "
              "whether the caches are byte-identical; where the Dask run's time goes.",
    "gpu": "On a CUDA device: the cache stage over a bare bf16 teacher forward at 32k and 128k vocabularies, "
           "top-k and hybrid encoding on the device, and kd_overhead there.",
    "kd_overhead": "A student's training step from a cache over the same student and batches with plain "
                   "cross-entropy (read, targets, loss, backward; each batch makes both steps in turn), "
                   "through the student stage and the public API; the loss's peak memory over "
                   "cross-entropy's.",
    "gloo_exit": "DDP ranks on gloo that abort at exit, of as many two-rank jobs each way: returning after "
                 "destroy_process_group, and ending with os._exit(0) as examples/distributed.py does.",
    "grow": "The cache stage growing a cache of per-member targets by a 4th teacher and by 10% more rows, "
            "each over the same cache made from scratch; bytes per row of the cache and of each member. "
            "`--students`: the demo's students from combined and per-member caches.",
    "heap": "The cache stage's peak RSS and rows/s over repeated runs under each glibc mmap-threshold setting.",
    "kd_gain": "The share of a dense float32 cache's distillation gain that compact caches keep at about 24 "
               "and 40 B/row, and their ECE (128-class hierarchical task).",
    "lm_students": "Held-out NLL of GPT students distilled from top-k, sampled and hybrid caches at about "
                   "40 B/token, beside the hard-label student and the teacher.",
    "cross_tokenizer": "Held-out NLL per character of students with another tokenizer (a 4,096-token BPE) "
                       "distilled from an 8,192-token teacher's top-32 cache by each alignment method, beside "
                       "their hard-label twin, a same-tokenizer student and the teacher; the bytes the alignment "
                       "columns add per token.",
    "object_storage": "A student epoch's rows/s from an S3-compatible server on localhost through the local "
                      "shard cache, cold and warm, over the same cache on local disk.",
    "reader": "Cache reader rows/s over a numpy memmap of the same stored columns, read through the same "
              "loader and decode, per encoding and layout; bytes per row of every codec.",
    "scale": "Each stage as a fresh process at 1x, 10x and 100x the data: peak RSS and loop rate, and "
             "their ratios from the first size to the last.",
    "student_memory": "Peak RSS of the student stage streaming a 10x larger cache over the 1x cache.",
    "student_streaming": "Student steps/s reading targets from the cache on disk over all targets in RAM.",
    "teacher_overhead": "Cache stage rows/s over a bare teacher forward loop (same model, batch, device).",
    "temperature": "Each encoding cached at T = 1 and served to a student at T = 0.5, 1, 2 and 4 (32k "
                   "vocabulary, next-token-like rows): relative bias and variance of the KD loss and of its "
                   "gradient against the full distribution at that T.",
    "threads": "ms per training step and per teacher batch with the short OpenMP spin over libgomp's "
               "default, idle and beside one busy process.",
    "views": "Students from plain, 1-, 8- and 32-view caches and online KD under augmentation; bytes per "
             "view; cache write time per view over per image.",
}

# What holds a benchmark's figures below their goals, said under its tables when one of its goals is
# not met in the recorded run. Only words here: the numbers are the run's, named by their figure.
LIMITS = {
    "reader": "The goal for the defaults is `ratio.default`; the other layouts are there to compare "
              "(zstd, shuffle-zstd and Parquet decode too slowly to meet it). Reading a chunk costs a file "
              "per column and a codec call whatever its rows, so 4,096-row chunks of rows of a few bytes "
              "(top-32 8-bit, dense over 100 classes) fall below the goal "
              "(`ratio.zarr_4096_shuffle_lz4hc` in some runs) while chunks of about 2 MiB, the default "
              "(`default_layout` in pipeline/core/config.py), amortize it.",
    "kd_overhead": "The goal covers top-k and hybrid. Classification top-10: the tiny MLP's step lasts a few "
                   "ms, and each batch pays costs that do not grow with the model: reading it (`ms.kd.read`), "
                   "making its targets (`ms.kd.targets`: re-tempering and renormalizing the head, a dozen "
                   "small tensor operations) and the loss's small operations on the head and tail "
                   "(`ms.kd.loss` over `ms.ce.loss`); a larger step hides them, and the LM rows, whose "
                   "steps are longer, meet the goal. Dense classification rows carry the teacher's whole "
                   "distribution, and its passes over (rows, classes) come on top of cross-entropy's: "
                   "renormalizing it (`ms.kd.targets`), its probabilities and entropy beside the soft-label "
                   "cross-entropy (`ms.kd.loss` against `ms.ce.loss`). They grow with the output layer as "
                   "cross-entropy's loss does, so a larger model body hides them and a larger batch does "
                   "not. `ms.kd.start` is paid once an epoch.",
    "fanout": "The speedup is the cores each run gets (`breakdown.dask_cores_used` over "
              "`breakdown.serial_cores_used`) times the serial run's CPU seconds over the workers' "
              "(`breakdown.dask_cpu_s.workers`). Beside other jobs the workers wait for a core "
              "(`breakdown.task_s` well above their CPU seconds) and the speedup measures the machine's "
              "load, not the fan-out ([scaling-out.md](scaling-out.md#where-the-time-goes)). "
              "`machine_two_process_gains` is what the two cores gave plain compute in two processes "
              "right after each repeat: below 2.0 the host's other guests held part of a core, and the "
              "Dask run lost the same share.",
    "teacher_overhead": "The goal is a GPU's (bench/gpu.py, `make bench-gpu`); on the CPU the teacher and "
                        "the shard writer share the cores.",
}

# Sections of the page, in order (their titles are the anchors other docs link to). A benchmark in
# no section goes under "Other benchmarks".
SECTIONS: list[tuple[str, list[str]]] = [
    ("Cache stage", ["teacher_overhead"]),
    ("Reading the cache", ["reader", "object_storage"]),
    ("Students", ["kd_overhead", "student_streaming", "student_memory"]),
    ("Scale", ["scale"]),
    ("Threads", ["threads"]),
    ("Heap", ["heap"]),
    ("Fan-out", ["fanout"]),
    ("Amortization", ["amortization"]),
    ("Distributed", ["gloo_exit"]),
    ("Growing a cache", ["grow"]),
    ("Encodings", ["bytes", "kd_gain", "temperature"]),
    ("Language-model students", ["lm_students"]),
    ("Cross-tokenizer students", ["cross_tokenizer"]),
    ("Views", ["views"]),
    ("GPU", ["gpu"]),
]
PART_TITLES = {"reader-codec_bytes": "Codecs", "gpu-teacher": "Cache stage over a bare forward",
               "gpu-encode": "Encoding on the device", "gpu-kd_overhead": "Student step over cross-entropy"}  # a results file's heading, where not its name

# Keys of the printed line that are no figures: the script's name, cores and machine (the stamp has
# them), and the script's own statement of its goals (GOALS above is what the page judges by).
NOT_FIGURES = {"bench", "cores", "machine", "goal", "goals"}

COMPARE: dict[str, tuple[str, Callable[[Any, Any], bool]]] = {
    "<=": ("≤", operator.le), ">=": ("≥", operator.ge), "<": ("<", operator.lt), ">": (">", operator.gt),
    "==": ("=", operator.eq), "abs<": ("\\|x\\| <", lambda v, t: abs(v) < t),
}
MISSING = object()


def script_of(stem: str) -> str:
    """The script a results file comes from: NAME.json and NAME-PART.json are bench/NAME.py's."""
    return stem.split("-", 1)[0]


def goals_for(stem: str) -> dict[str, Goal]:
    return GOALS[stem] if stem in GOALS else GOALS.get(script_of(stem), {})


def makefile_benchmarks(makefile: Path) -> dict[str, tuple[str, str]]:
    """{script: (make target, command)} for every `$(PY) bench/NAME.py ...` recipe line but render's."""
    out: dict[str, tuple[str, str]] = {}
    target = None
    for text in makefile.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text)
        if m:
            target = m.group(1)
            continue
        m = re.match(r"^\t\$\(PY\) (bench/(\w+)\.py.*?)\s*$", text)
        if m and target and m.group(2) != "render" and m.group(2) not in out:
            out[m.group(2)] = (target, f".venv/bin/python {m.group(1)}")
    return out


def load_results(results: Path) -> dict[str, dict[str, Any]]:
    """{stem: results file} for every bench/results/*.json, sorted by stem."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}


def flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(key path, leaf) in the order the script wrote them; a list is one leaf."""
    if isinstance(value, dict) and value:
        out = []
        for k, v in value.items():
            out.extend(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return [(prefix, value)]


def lookup(figures: dict[str, Any], path: str) -> Any:
    """The figure at a key path, or MISSING."""
    for key, value in flatten(figures):
        if key == path:
            return value
    return MISSING


def shown(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return cell(text)


def cell(text: str) -> str:
    return text.replace("\n", " ").replace("|", "\\|")


def judge(goal: Goal, value: Any, figures: dict[str, Any]) -> tuple[str, str]:
    """(goal cell, met cell): "yes", "**no**", or "—" where the value cannot be judged."""
    comparison, threshold, text = goal
    symbol, compare = COMPARE[comparison]
    if isinstance(threshold, str) and threshold.startswith("@"):
        ref = lookup(figures, threshold[1:])
        target = f"`{cell(threshold[1:])}` ({'not in this run' if ref is MISSING else shown(ref)})"
        threshold = ref
    else:
        target = shown(threshold)
    goal_cell = f"{symbol} {target}: {cell(text)}"
    if threshold is MISSING or value is None:
        return goal_cell, "—"
    if isinstance(threshold, bool) or isinstance(value, bool):
        ok = isinstance(threshold, bool) and isinstance(value, bool) and compare(value, threshold)
    elif isinstance(value, (int, float)) and isinstance(threshold, (int, float)):
        ok = compare(value, threshold)
    else:
        return goal_cell, "—"
    return goal_cell, "yes" if ok else "**no**"


def stamp_line(result: dict[str, Any]) -> str:
    s = result.get("stamp", {})
    m = s.get("machine", {})
    commit = str(s.get("commit", "unknown"))
    dirty = commit.endswith("-dirty")
    commit = commit.removesuffix("-dirty")[:12] + (" (with uncommitted changes)" if dirty else "")
    machine = ", ".join(str(x) for x in (
        m.get("hostname"), m.get("cpu"), f"{m.get('cores')} cores", f"{m.get('memory_gib')} GiB",
        f"torch {m.get('torch')}", f"GPU {m['gpu']}" if m.get("gpu") else "no GPU"))
    return (f"Run: `{cell(str(s.get('command', '?')))}` at commit `{commit}`, {s.get('date', '?')}, "
            f"on {cell(machine)}.")


def table_goals_for(stem: str) -> dict[str, list[TableGoal]]:
    return TABLE_GOALS[stem] if stem in TABLE_GOALS else TABLE_GOALS.get(script_of(stem), {})


def is_table(value: Any) -> bool:
    """A figure that is a list of records (dicts): rendered as its own table, one row per record."""
    return isinstance(value, list) and bool(value) and all(isinstance(r, dict) for r in value)


def table(key: str, records: list[dict[str, Any]], goals: list[TableGoal]) -> list[str]:
    """The records of figure `key` as a table (columns: their keys in first-seen order); where the
    figure has goals, the goal and met? cells of the goals that select each record."""
    columns: list[str] = []
    for r in records:
        columns += [k for k in r if k not in columns]
    judged_cols = " goal | met? |" if goals else ""
    out = [f"`{cell(key)}`:", "", "| " + " | ".join(cell(c) for c in columns) + " |" + judged_cols,
           "|" + "---|" * (len(columns) + (2 if goals else 0))]
    for r in records:
        values = "| " + " | ".join(shown(r[c]) if c in r else "—" for c in columns) + " |"
        if not goals:
            out.append(values)
            continue
        mine = [(figure, goal) for when, figure, goal in goals
                if all(r.get(k) in allowed for k, allowed in when.items()) and figure in r]
        judged = [judge(goal, r[figure], r) for figure, goal in mine]
        goal_cell = "; ".join(f"`{cell(f)}` {g}" for (f, _), (g, _) in zip(mine, judged)) or "—"
        met_cell = ("**no**" if any(m == "**no**" for _, m in judged) else
                    "yes" if judged and all(m == "yes" for _, m in judged) else "—")
        out.append(f"{values} {goal_cell} | {met_cell} |")
    return [*out, ""]


def part(stem: str, result: dict[str, Any], level: str | None) -> list[str]:
    figures = result.get("figures", {})
    goals = goals_for(stem)
    out = [f"{level} {PART_TITLES.get(stem, stem)}", ""] if level else []
    out += [stamp_line(result), "", "| figure | value | goal | met? |", "|---|---|---|---|"]
    top = {k: v for k, v in figures.items() if k not in NOT_FIGURES}
    tables: list[tuple[str, list[dict[str, Any]]]] = []  # figures that are lists of records, at any depth
    for key, value in flatten(top) if top else []:
        if is_table(value):
            tables.append((key, value))
            continue
        goal, met = judge(goals[key], value, figures) if key in goals else ("—", "—")
        out.append(f"| `{cell(key)}` | {shown(value)} | {goal} | {met} |")
    out.append("")
    table_goals = table_goals_for(stem)
    for key, value in tables:
        out += table(key, value, table_goals.get(key, []))
    return out


def benchmark(script: str, stems: list[str], results: dict[str, dict[str, Any]],
              make: tuple[str, str] | None) -> list[str]:
    out = [f"### bench/{script}.py", ""]
    what = DESCRIPTIONS.get(script, "")
    how = f"Recorded by `make {make[0]}`: `{make[1]}`." if make else "Not run by `make bench` or `make bench-quality`."
    out += [f"{what} {how}".strip(), ""]
    if not stems:
        target = f"`make {make[0]}`" if make else f"`.venv/bin/python bench/{script}.py`"
        return [*out, "| figure | value | goal | met? |", "|---|---|---|---|",
                f"| not recorded yet: {target} records it | — | — | — |", ""]
    single = stems == [script]
    for stem in stems:
        out += part(stem, results[stem], None if single else "####")
    judged = {path for stem in stems for path in goals_for(stem)}
    absent = sorted(p for p in judged if all(lookup(results[s]["figures"], p) is MISSING for s in stems))
    if absent:
        out += ["Goals with no figure in the recorded runs: " + ", ".join(f"`{cell(p)}`" for p in absent) + ".", ""]
    if script in LIMITS and any(line.endswith("**no** |") for line in out):
        out += [f"Where goals are not met: {LIMITS[script]}", ""]
    return out


def render(results_dir: Path, makefile: Path) -> str:
    results = load_results(results_dir)
    made = makefile_benchmarks(makefile)
    scripts = sorted({*made, *(script_of(s) for s in results)})
    placed = {s for _, names in SECTIONS for s in names}
    sections = [(t, [s for s in names if s in scripts]) for t, names in SECTIONS]
    sections.append(("Other benchmarks", [s for s in scripts if s not in placed]))
    out = [
        "# Performance",
        "",
        ("Generated by `make performance` (`bench/render.py`) from `bench/results/*.json`: do not edit by "
         "hand. To update a benchmark, run the command under its heading, then `make performance`."),
        "",
        ("Each results file holds the last run of a script (or one part of it) and its stamp: the commit, "
         "the UTC time and the machine. The tables list every figure of that run; the goals and the met? "
         "column come from `GOALS` in `bench/render.py` (\"—\": no goal, or nothing to judge). How each "
         "script measures: [benchmarks.md](benchmarks.md). Compare ratios within one run: they are "
         "measured side by side on machines that other jobs may share."),
        "",
    ]
    for title, names in sections:
        if not names:
            continue
        out += [f"## {title}", ""]
        for script in names:
            stems = [s for s in results if script_of(s) == script]
            out += benchmark(script, stems, results, made.get(script))
    return "\n".join(out).rstrip("\n") + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "performance.md")
    ap.add_argument("--makefile", type=Path, default=REPO / "Makefile")
    args = ap.parse_args(argv)
    write_atomic(args.out, render(args.results, args.makefile))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
