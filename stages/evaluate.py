"""Stage 4: score teachers, the ensemble and every student on held-out data; write the report.

    logitcache evaluate configs/demo.yaml

Writes <run>/report.json, <run>/report.md, <run>/learning_curves.png and <run>/reliability.png, and
prints the table. Metrics: accuracy, NLL, expected calibration error (equal-width bins), and top-1
agreement with the teacher ensemble. Teachers and the ensemble are scored at temperature 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.config import Config
from pipeline.core.errors import CacheError, ModelError
from pipeline.core.io import atomic_write_bytes, atomic_write_json, atomic_write_text, check_writable, hash_json
from pipeline.core.progress import log
from pipeline.format.remote import open_reader
from pipeline.inputs.splits import load_splits
from pipeline.models.builders import build_model, load_state
from pipeline.models.ensemble import load_teacher, normalized_weights, teacher_identity, teacher_refs
from pipeline.run import jobs
from pipeline.train import metrics
from pipeline.train.loop import read_done
from pipeline.train.tasks import held_out_chars, student_splits, task_of

REPORT_FORMAT = 4  # 4: nll_per_char of text corpora, students of their own tokenizer. Part of the up-to-date check: a new report layout rewrites old reports


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _read_report(path: Path) -> dict[str, Any] | None:
    """The previous report, or None if there is none or it is damaged (then it is rewritten)."""
    try:
        report = json.loads(path.read_text()) if path.is_file() else None
    except (ValueError, OSError):
        return None
    return report if isinstance(report, dict) and isinstance(report.get("rows"), list) else None


def main(cfg: Config) -> dict[str, Any]:
    check_writable(cfg.run_dir, "workspace")  # before anything is scored
    splits = load_splits(cfg)
    task = task_of(cfg)
    x, y = task.held_out(splits)  # language models: next-token prediction on held-out sequences
    batch = task.eval_batch
    bins = cfg.evaluate.ece_bins
    cpu = torch.device("cpu")

    planned = jobs.plan(cfg)
    cache = open_reader(jobs.cache_path(cfg))
    done = []
    for shard in planned:
        name = jobs.job_name(cfg, shard)
        marker = read_done(cfg.run_dir / "students" / name)  # checks the model and history it names
        if marker is None:
            raise CacheError(f"{cfg.run_dir / 'students' / name}: student {name} has not finished; "
                             "run `logitcache student CONFIG`")
        if marker["settings_hash"] != hash_json(jobs.settings(cfg, shard, cache)):
            raise ModelError(f"{cfg.run_dir / 'students' / name / 'done.json'}: student {name} was trained with "
                             "other settings or another cache than this config's; run `logitcache student CONFIG`")
        done.append((shard, name, marker))
    refs = teacher_refs(cfg, splits)
    inputs = hash_json({"students": [d[2] for d in done], "test": splits.test.fingerprint, "bins": bins,
                        "teachers": [teacher_identity(r, splits.num_classes)["checkpoint_sha256"] for r in refs], "ensemble": cfg.teachers.ensemble,
                        "weights": normalized_weights(cfg), "format": REPORT_FORMAT,
                        "excluded": list(cfg.data.transfer.exclude_classes)})
    report_path = cfg.run_dir / "report.json"
    report = _read_report(report_path)
    if report is not None and report.get("inputs_hash") == inputs:
        log(f"evaluate: report up to date ({report_path})")
        print(table(report["rows"]))
        if len(cfg.student.seeds) > 1:
            print(summary_table(report["summary"]))
        return report

    exclude = cfg.data.transfer.exclude_classes  # classification only (the config refuses it for lm)
    excluded = np.isin(y, exclude) if exclude else None

    chars = held_out_chars(splits, y.shape)
    own = student_splits(cfg) if cfg.student.tokenizer is not None else splits  # what the students read
    x_own, y_own = task.held_out(own) if own is not splits else (x, y)
    own_chars = held_out_chars(own, y_own.shape) if own is not splits else chars

    def score(sm: metrics.Summary, reference: metrics.Summary, theirs: bool = False) -> dict[str, float]:
        """Metrics on the held-out targets; `theirs`: a student of its own tokenizer, scored on its
        tokens (its agreement with the teachers' predictions is not defined: NaN)."""
        labels, n_chars = (y_own, own_chars) if theirs else (y, chars)
        out = task.report_metrics(metrics.all_metrics(sm, labels, sm if theirs else reference, bins))
        if theirs:
            out["agreement"] = float("nan")
        if n_chars is not None:  # text: comparable across tokenizers
            out["nll_per_char"] = float(-sm.logp_true.sum() / max(int(n_chars.sum()), 1))
        if excluded is not None and excluded.any():  # classes the students never saw in the transfer set
            out["excluded_accuracy"] = float((sm.pred[excluded] == y[excluded]).mean())
        return out

    rows: list[dict[str, Any]] = []
    teachers = [load_teacher(ref, splits, cpu) for ref in refs]
    *teacher_sums, ensemble = metrics.summaries(teachers, x, y, batch, (cfg.teachers.ensemble, normalized_weights(cfg)),
                                                   cfg.cache.logit_rows)
    for ref, model, sm in zip(refs, teachers, teacher_sums):
        rows.append({"model": ref.spec.name, "role": "teacher", "params": _params(model), **score(sm, ensemble)})
    rows.append({"model": "ensemble", "role": "ensemble", "params": sum(_params(m) for m in teachers),
                 **score(ensemble, ensemble)})
    del teachers

    curves: dict[str, list[float]] = {}
    student_sums: dict[str, metrics.Summary] = {}
    for shard, name, marker in done:
        spec = jobs.models(cfg)[shard.model]
        model = build_model(spec, task_of(cfg).student_shape(cfg, own), own.num_classes,
                            f"student.models.{shard.model}")
        load_state(model, cfg.run_dir / "students" / name / "model.pt", f"student.models.{shard.model}")
        model.eval()
        (sm,) = metrics.summaries([model], x_own, y_own, batch, logit_rows=cfg.cache.logit_rows)
        student_sums[name] = sm
        role = "distilled" if shard.kind == "kd" else "hard-label"
        rows.append({"model": name, "role": role, "params": _params(model), **score(sm, ensemble, own is not splits)})
        history = json.loads((cfg.run_dir / "students" / name / "history.json").read_text())
        curves[name] = [e["test_accuracy"] for e in history["epochs"]]

    run = cfg.run_dir
    _plot_curves(curves, run / "learning_curves.png")
    first_seed = {n: student_sums[n] for shard, n, _ in done if shard.seed == cfg.student.seeds[0]}
    _plot_reliability({"ensemble": ensemble, **(first_seed if own is splits else {})}, y, bins, run / "reliability.png")
    cache_manifest = cache.manifest
    report = {
        "run": cfg.run_name, "task": cfg.data.task, "inputs_hash": inputs, "test_rows": int(y.size),
        "num_classes": splits.num_classes,
        "cache": {k: cache_manifest[k] for k in ("cache_id", "rows", "bytes", "bytes_per_row", "encoding",
                                                  "backend", "temperature")},
        "rows": rows,
        "summary": summarize(rows, done),
    }
    atomic_write_json(report_path, report)
    atomic_write_text(run / "report.md", _markdown(report))
    log(f"evaluate: wrote {report_path} and {run / 'report.md'}")
    print(table(rows))
    if len(cfg.student.seeds) > 1:
        print(summary_table(report["summary"]))
    return report


def summarize(rows: list[dict[str, Any]], done: list) -> list[dict[str, Any]]:
    """Students grouped by model and kind: mean and standard deviation over seeds."""
    by_job = {r["model"]: r for r in rows}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for shard, name, _ in done:
        model = name.rsplit("-", 2)[0]
        groups.setdefault((model, by_job[name]["role"]), []).append(by_job[name])
    out = []
    for (model, role), members in groups.items():
        entry: dict[str, Any] = {"model": model, "role": role, "seeds": len(members)}
        for m in [k for k in ("accuracy", "nll", "ece", "agreement", "excluded_accuracy") if k in members[0]]:
            values = np.array([r[m] for r in members])
            entry[m] = float(values.mean())
            entry[f"{m}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def summary_table(summary: list[dict[str, Any]]) -> str:
    extra = "excluded_accuracy" in summary[0]
    head = f"{'model (mean ± sd over seeds)':<30} {'role':<11} {'accuracy':>17} {'nll':>15} {'ece':>15}"
    head += f" {'acc(excluded)':>17}" if extra else ""
    lines = ["", head, "-" * len(head)]
    for r in summary:
        line = (f"{r['model']:<30} {r['role']:<11} {r['accuracy']:>8.4f} ± {r['accuracy_std']:.4f} "
                f"{r['nll']:>6.4f} ± {r['nll_std']:.4f} {r['ece']:>6.4f} ± {r['ece_std']:.4f}")
        if extra:
            line += f" {r['excluded_accuracy']:>8.4f} ± {r['excluded_accuracy_std']:.4f}"
        lines.append(line)
    return "\n".join(lines)


def table(rows: list[dict[str, Any]]) -> str:
    extra = "excluded_accuracy" in rows[0]
    ppl = "perplexity" in rows[0]
    head = f"{'model':<24} {'role':<11} {'params':>9} {'accuracy':>9} {'nll':>7} {'ece':>7} {'agree':>7}"
    head += f" {'acc(excluded)':>14}" if extra else ""
    head += f" {'ppl':>9}" if ppl else ""
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (f"{r['model']:<24} {r['role']:<11} {r['params']:>9} {r['accuracy']:>9.4f} "
                f"{r['nll']:>7.4f} {r['ece']:>7.4f} {r['agreement']:>7.4f}")
        line += f" {r['excluded_accuracy']:>14.4f}" if extra else ""
        lines.append(line + (f" {r['perplexity']:>9.2f}" if ppl else ""))
    return "\n".join(lines)


def _markdown(report: dict[str, Any]) -> str:
    c = report["cache"]
    lines = [
        f"# logitcache report: {report['run']}", "",
        (f"Held-out rows: {report['test_rows']}, classes: {report['num_classes']}. Cache `{c['cache_id']}`: "
        f"{c['rows']} rows, {c['encoding']['name']} on {c['backend']}, {c['bytes']} bytes "
        f"({c['bytes_per_row']} B/row), T={c['temperature']}."), "",
        "| model | role | params | accuracy | NLL | ECE | agreement with ensemble |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['model']} | {r['role']} | {r['params']} | {r['accuracy']:.4f} | {r['nll']:.4f} | "
                     f"{r['ece']:.4f} | {r['agreement']:.4f} |")
    if "excluded_accuracy" in report["rows"][0]:
        lines += ["", "Accuracy on the classes left out of the transfer set: " + ", ".join(
            f"{r['model']} {r['excluded_accuracy']:.4f}" for r in report["rows"]) + "."]
    if any(r["seeds"] > 1 for r in report["summary"]):
        lines += ["", "Students, mean ± standard deviation over seeds:", "",
                  "| model | role | seeds | accuracy | NLL | ECE |", "|---|---|---:|---:|---:|---:|"]
        for r in report["summary"]:
            lines.append(f"| {r['model']} | {r['role']} | {r['seeds']} | {r['accuracy']:.4f} ± {r['accuracy_std']:.4f} "
                         f"| {r['nll']:.4f} ± {r['nll_std']:.4f} | {r['ece']:.4f} ± {r['ece_std']:.4f} |")
    lines += ["", "![learning curves](learning_curves.png)", "", "![reliability](reliability.png)", ""]
    return "\n".join(lines)


def _plot_curves(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, acc in curves.items():
        ax.plot(range(1, len(acc) + 1), acc, label=name, linestyle="-" if "-kd-" in name else "--")
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Student learning curves (solid: distilled, dashed: hard labels)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _plot_reliability(models: dict[str, metrics.Summary], y: np.ndarray, bins: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="perfect calibration")
    plot_bins = min(bins, 10)  # held-out sets are small: wide bins, and only bins with enough rows
    for name, sm in models.items():
        correct = sm.pred == y.reshape(-1)
        conf, acc, count = metrics.reliability(sm.conf, correct, plot_bins)
        keep = count >= 5
        ax.plot(conf[keep], acc[keep], marker="o", markersize=3,
                label=f"{name} (ECE {metrics.ece(sm.conf, correct, bins):.3f})")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability on held-out data")
    ax.legend(fontsize=7)
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
