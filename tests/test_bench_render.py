"""Benchmark results are data: bench/common.py `record` prints a script's JSON line and keeps it,
stamped, as a results file; bench/render.py turns the results files into docs/performance.md."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


common = _load("common")
render = _load("render")


def _row(page: str, figure: str) -> list[str]:
    """The cells of the table row of `figure` (the first one on the page)."""
    for text in page.splitlines():
        if text.startswith(f"| `{figure}` |"):
            return [c.strip() for c in re.split(r"(?<!\\)\|", text)[1:-1]]
    raise AssertionError(f"no row for {figure!r} in:\n{page}")


def _section(page: str, heading: str) -> str:
    """The text from `heading` to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    start = page.index(f"\n{heading}\n")
    nxt = re.compile(rf"^#{{1,{len(level)}}} ", re.MULTILINE).search(page, start + len(heading) + 2)
    return page[start:nxt.start() if nxt else len(page)]


def test_record_prints_the_line_and_writes_a_stamped_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    figures = common.line("threads", idle={"short_over_default": {"student_step_ms": 1.1}}, busy=None)
    path = common.record("threads", figures, results=tmp_path / "results")

    printed = capsys.readouterr().out.splitlines()
    assert printed == [json.dumps(figures)]  # the one JSON line, as before
    assert json.loads(printed[0])["bench"] == "threads"
    assert path == tmp_path / "results" / "threads.json"
    kept = json.loads(path.read_text())
    assert kept["name"] == "threads"
    assert kept["figures"] == figures
    stamp = kept["stamp"]
    assert set(stamp) == {"commit", "date", "machine", "command"}
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", stamp["commit"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stamp["date"])
    assert set(stamp["machine"]) == {"hostname", "cpu", "cores", "memory_gib", "torch", "gpu"}
    assert stamp["machine"]["cores"] == len(os.sched_getaffinity(0))
    assert stamp["machine"]["torch"] == common.torch.__version__
    assert sorted(p.name for p in path.parent.iterdir()) == ["threads.json"]  # no temporary file left


def test_record_follows_the_environment_and_replaces_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("LOGITCACHE_BENCH_RESULTS", str(tmp_path))
    first = common.record("heap-classify", {"bench": "heap", "peak_mb": {"pinned_8mb": [350.0]}})
    assert first == tmp_path / "heap-classify.json"
    before = first.read_text()

    def crash(src: str, dst: str) -> None:  # the process dies between writing and renaming
        raise OSError("killed")

    monkeypatch.setattr(common.os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        common.record("heap-classify", {"bench": "heap", "peak_mb": {"pinned_8mb": [999.0]}})
    assert first.read_text() == before  # the old results file is whole and unchanged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heap-classify.json"]  # the temporary file is gone
    monkeypatch.undo()

    monkeypatch.setenv("LOGITCACHE_BENCH_RESULTS", str(tmp_path))
    common.record("heap-classify", {"bench": "heap", "peak_mb": {"pinned_8mb": [360.5]}})
    assert json.loads(first.read_text())["figures"]["peak_mb"]["pinned_8mb"] == [360.5]
    with pytest.raises(ValueError):
        common.record("../escape", {"bench": "x"})
    capsys.readouterr()


def _results(d: Path, stem: str, figures: dict, commit: str = "0123456789abcdef" * 2 + "01234567-dirty") -> None:
    d.mkdir(parents=True, exist_ok=True)
    stamp = {"commit": commit, "date": "2026-01-02T03:04:05Z", "command": f"bench/{stem}.py",
             "machine": {"hostname": "box", "cpu": "Some CPU", "cores": 2, "memory_gib": 23.5, "torch": "2.13.0",
                         "gpu": None}}
    (d / f"{stem}.json").write_text(json.dumps({"name": stem, "stamp": stamp, "figures": figures}))


def test_render_marks_goals_met_and_not_met_and_lists_what_is_not_recorded(tmp_path: Path) -> None:
    makefile = tmp_path / "Makefile"
    makefile.write_text("bench: $(STAMP)\n\t$(PY) bench/student_streaming.py\n\t$(PY) bench/fanout.py\n"
                        "\t$(PY) bench/render.py\n\nbench-quality: $(STAMP)\n\t$(PY) bench/bytes.py\n")
    results = tmp_path / "results"
    _results(results, "student_streaming", {"bench": "student_streaming", "cores": 2, "ratio": 0.97, "goal": 0.95,
                                            "disk_steps_per_s": 120.5})
    _results(results, "teacher_overhead-cpu", {"bench": "teacher_overhead", "ratio": 0.77, "goal": 0.97})
    _results(results, "bytes", {"bench": "bytes", "results": {"32000_vocab": {
        "hybrid@40": {"bias_rel": -0.002, "var_rel": 0.05}, "sampled@40": {"var_rel": 0.04}},
        "151936_vocab": {"hybrid@24": {"bias_rel": -0.02}}}})
    for stem in ("scale-lm-cache", "scale-classify-cache"):
        _results(results, stem, {"bench": "scale", "rss_ratio": 1.1})

    page = render.render(results, makefile)

    assert page.startswith("# Performance\n\nGenerated by `make performance`")
    assert "do not edit by hand" in page.split("\n\n")[1]
    overhead = _row(_section(page, "### bench/teacher_overhead.py"), "ratio")  # not in this Makefile: still shown
    assert overhead[:2] == ["`ratio`", "0.77"] and overhead[3] == "**no**" and overhead[2].startswith("≥ 0.97")
    streaming = _section(page, "### bench/student_streaming.py")
    assert _row(streaming, "ratio") == ["`ratio`", "0.97", _row(streaming, "ratio")[2], "yes"]
    assert _row(streaming, "ratio")[2].startswith("≥ 0.95")
    assert _row(streaming, "disk_steps_per_s")[1:] == ["120.5", "—", "—"]  # a figure with no goal
    assert "`goal`" not in streaming and "`cores`" not in streaming  # the script's own goal, the machine
    assert "Recorded by `make bench`: `.venv/bin/python bench/student_streaming.py`." in streaming
    assert "Run: `bench/student_streaming.py` at commit `0123456789ab (with uncommitted changes)`, " \
           "2026-01-02T03:04:05Z, on box, Some CPU, 2 cores, 23.5 GiB, torch 2.13.0, no GPU." in streaming
    # goals against another figure of the same run, and on an absolute value
    encodings = _section(page, "### bench/bytes.py")
    assert _row(encodings, "results.32000_vocab.hybrid@40.bias_rel")[1:4:2] == ["-0.002", "yes"]
    assert _row(encodings, "results.151936_vocab.hybrid@24.bias_rel")[1:4:2] == ["-0.02", "**no**"]  # |x|
    var = _row(encodings, "results.32000_vocab.hybrid@40.var_rel")
    assert var[1] == "0.05" and var[3] == "**no**" and "`results.32000_vocab.sampled@40.var_rel` (0.04)" in var[2]
    assert "`results.1000_classes.hybrid@24.bias_rel`" in encodings.split("Goals with no figure")[1]
    # a script's results files, one part each, in sorted order
    scale = _section(page, "### bench/scale.py")
    assert scale.index("#### scale-classify-cache") < scale.index("#### scale-lm-cache")
    # a benchmark the Makefile runs with no results file: said so, with the target that records it
    fanout = _section(page, "### bench/fanout.py")
    assert "| not recorded yet: `make bench` records it | — | — | — |" in fanout
    assert "| `" not in fanout  # no figures invented
    assert "bench/render.py" not in page.split("## ", 1)[1]  # render is no benchmark
    assert render.render(results, makefile) == page  # same results, same bytes

    out = tmp_path / "docs" / "performance.md"
    render.main(["--results", str(results), "--out", str(out), "--makefile", str(makefile)])
    assert out.read_text() == page


def test_a_recorded_run_renders(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    common.record("student_memory", common.line("student_memory", ratio=1.2, goal=1.10, met=False), results=tmp_path)
    capsys.readouterr()
    page = render.render(tmp_path, REPO / "Makefile")
    row = _row(_section(page, "### bench/student_memory.py"), "ratio")
    assert row[1] == "1.2" and row[3] == "**no**"
    assert _row(_section(page, "### bench/student_memory.py"), "met")[1] == "false"


def test_a_figure_of_rows_renders_as_its_own_table(tmp_path: Path) -> None:
    rows = [{"T": 0.5, "bias_rel": 0.01, "var_rel": 0.0}, {"T": 2.0, "bias_rel": -0.2, "var_rel": 1.5}]
    _results(tmp_path, "temperature-topk-k32", {"bench": "temperature", "encoding": "topk-k32", "rows": rows})
    part = _section(render.render(tmp_path, REPO / "Makefile"), "#### temperature-topk-k32")
    assert _row(part, "encoding")[1] == "topk-k32"
    assert "| `rows` |" not in part  # not a JSON blob in one cell
    assert "`rows`:\n\n| T | bias_rel | var_rel |\n|---|---|---|\n| 0.5 | 0.01 | 0.0 |\n| 2.0 | -0.2 | 1.5 |" in part


def test_every_benchmark_the_makefile_runs_is_described_and_goals_name_real_benchmarks() -> None:
    made = render.makefile_benchmarks(REPO / "Makefile")
    assert {"reader", "scale", "threads", "heap", "bytes", "kd_gain", "views", "lm_students"} <= set(made)
    assert made["reader"] == ("bench", ".venv/bin/python bench/reader.py --repeats 5")
    assert made["views"][0] == "bench-quality"
    assert sorted(s for s in made if s not in render.DESCRIPTIONS) == []
    assert sorted(render.script_of(k) for k in render.GOALS if render.script_of(k) not in made) == []
    assert "render" not in made
    for goals in render.GOALS.values():
        for comparison, _, text in goals.values():
            assert comparison in render.COMPARE and text


def test_a_figure_that_is_a_list_of_records_renders_as_a_table_judged_per_record(tmp_path: Path) -> None:
    """bench/kd_overhead.py's rows: one table row per record, its goal applied to the records it
    selects (top-k and hybrid), none to the others."""
    results = tmp_path / "results"
    rows = [{"task": "lm", "vocab": 32000, "encoding": "topk32", "path": "stage", "ratio": 1.04, "loss_peak_ratio": 0.5},
            {"task": "lm", "vocab": 32000, "encoding": "hybrid_k8_n16_q8", "path": "api", "ratio": 1.2,
             "loss_peak_ratio": 0.6},
            {"task": "lm", "vocab": 32000, "encoding": "sampled32", "path": "api", "ratio": 1.3, "loss_peak_ratio": 0.6}]
    _results(results, "kd_overhead", {"bench": "kd_overhead", "device": "cpu", "rows": rows})
    page = render.render(results, REPO / "Makefile")
    section = _section(page, "### bench/kd_overhead.py")
    assert _row(section, "device")[1] == "cpu"
    assert "`rows`:" in section and "| `rows` |" not in section  # a table, not one cell of JSON
    lines = [x for x in section.splitlines() if x.startswith("| lm |")]
    assert len(lines) == 3
    assert lines[0].endswith("| yes |") and "≤ 1.1" in lines[0]
    assert lines[1].endswith("| **no** |")
    assert lines[2].endswith("| — | — |")  # sampled: no goal


def test_what_limits_a_benchmark_is_said_only_while_one_of_its_goals_is_not_met(tmp_path: Path) -> None:
    makefile = tmp_path / "Makefile"
    makefile.write_text("bench: $(STAMP)\n\t$(PY) bench/teacher_overhead.py\n")
    results = tmp_path / "results"
    _results(results, "teacher_overhead-cpu", {"bench": "teacher_overhead", "ratio": 0.77})
    unmet = _section(render.render(results, makefile), "### bench/teacher_overhead.py")
    assert f"Where goals are not met: {render.LIMITS['teacher_overhead']}" in unmet
    _results(results, "teacher_overhead-cpu", {"bench": "teacher_overhead", "ratio": 0.98})
    met = _section(render.render(results, makefile), "### bench/teacher_overhead.py")
    assert "Where goals are not met" not in met and _row(met, "ratio")[3] == "yes"
    assert set(render.LIMITS) <= set(render.DESCRIPTIONS)  # every note is a real benchmark's
