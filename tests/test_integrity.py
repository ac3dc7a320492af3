"""Never train on corrupt, missing or stale data, and never let a failed run pass for a finished
one: flipped bytes, deleted shards, clobbered students, malformed files, unusable workspaces, and
students that find their cache without the teacher files."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch
from conftest import tiny_config, write_config
from test_hostile import one_line_error

from pipeline.core.config import load_config
from pipeline.core.errors import CacheError
from pipeline.format import reader as fmt
from pipeline.format.manifest import read_manifest
from pipeline.format.shards import shard_name
from stages import cache as cache_stage
from stages import student as student_stage
from stages import teachers as teacher_stage


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Teachers, and a complete Zarr and Parquet cache of 4 shards each, made once."""
    ws = tmp_path_factory.mktemp("integrity")
    cfg = tiny_config(ws, teachers={"epochs": 3}, student={"epochs": 1, "baseline": False, "batch_size": 200,
                                                           "models": [{"name": "s", "arch": "mlp", "hidden": [8]}]})
    path = write_config(ws / "c.yaml", cfg)
    teacher_stage.main(load_config(path))
    caches = {b: cache_stage.main(load_config(path, [f"cache.backend={b}"])) for b in ("zarr", "parquet")}
    return ws, path, caches


def _copy(caches, backend, tmp_path):
    """A private copy of a built cache (under the same id, in another root) to damage."""
    src = caches[backend]
    dst = tmp_path / "root" / src.name
    shutil.copytree(src, dst)
    return dst


def _nothing_trained(tmp_path):
    assert not list(tmp_path.rglob("done.json")) and not list(tmp_path.rglob("model.pt"))


def _flip(path, offset_fraction=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset_fraction)] ^= 0x5A
    path.write_bytes(bytes(data))


# --- a flipped byte --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_student_refuses_a_flipped_byte_in_any_shard(cli_run, built, tmp_path, backend):
    _ws, path, caches = built
    d = _copy(caches, backend, tmp_path)
    shard = d / "shards" / shard_name(2, backend)
    victim = max((p for p in shard.rglob("*") if p.is_file() and "logp" in p.parts), key=lambda p: p.stat().st_size) \
        if backend == "zarr" else shard
    _flip(victim)
    result = cli_run("student", str(path), f"workspace={tmp_path}", f"student.cache={d}", expect=None)
    one_line_error(result, str(shard), "checksum mismatch", "delete it and rerun `logitcache cache CONFIG`")
    _nothing_trained(tmp_path)


def test_reader_hashes_each_shard_once(built, tmp_path, monkeypatch):
    _ws, _path, caches = built
    from pipeline.core import io as pio

    monkeypatch.setenv("LOGITCACHE_DIGESTS", str(tmp_path / "store" / "digests.sqlite"))
    calls = []
    real = pio.sha256_tree
    monkeypatch.setattr(pio, "sha256_tree", lambda p, *a: calls.append(p.name) or real(p, *a))
    reader = fmt.CacheReader(caches["zarr"])
    for _ in range(2):
        reader.read_all()
    assert sorted(calls) == sorted(shard_name(i, "zarr") for i in range(len(reader.shards)))


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_a_later_reader_stats_shards_and_rehashes_a_changed_one(built, tmp_path, monkeypatch, backend):
    """The first reader on a machine hashes every shard; a later one only stats them, until a shard's
    file changes (here one byte, same size and inode, as a bad copy-over or an edit would)."""
    from pipeline.core import io as pio

    _ws, _path, caches = built
    monkeypatch.setenv("LOGITCACHE_DIGESTS", str(tmp_path / "store" / "digests.sqlite"))
    monkeypatch.setattr(pio, "RACY_NS", 0)  # the files' mtimes are set back below; nothing sets a ctime back
    d = _copy(caches, backend, tmp_path)
    old = time.time() - 60  # files written within the last 2 s are never remembered
    for f in d.rglob("*"):
        os.utime(f, (old, old))
    hashed: list[str] = []
    real = pio.sha256_file
    monkeypatch.setattr(pio, "sha256_file", lambda p, *a: hashed.append(p.name) or real(p, *a))
    fmt.CacheReader(d, verify=True)
    files = [f for e in read_manifest(d)["shards"] for f in [d / e["path"], *(d / e["path"]).rglob("*")]
             if f.is_file()]
    assert sorted(hashed) == sorted(f.name for f in files)
    hashed.clear()
    reader = fmt.CacheReader(d, verify=True)
    assert hashed == []
    assert len(reader.read_all()["sample_id"]) == reader.rows
    shard = d / "shards" / shard_name(2, backend)
    victim = max((p for p in shard.rglob("*") if p.is_file() and "logp" in p.parts), key=lambda p: p.stat().st_size) \
        if backend == "zarr" else shard
    _flip(victim)
    os.utime(victim, (old + 1, old + 1))
    with pytest.raises(CacheError, match="checksum mismatch"):
        fmt.CacheReader(d, verify=True)
    assert hashed  # only the changed shard is read again
    assert all(name in {victim.name} | ({f.name for f in shard.rglob("*")} if backend == "zarr" else set())
               for name in hashed)


# --- a deleted shard -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_a_shard_deleted_from_a_complete_cache(cli_run, built, tmp_path, backend):
    _ws, path, caches = built
    d = _copy(caches, backend, tmp_path)
    manifest = (d / "manifest.json").read_bytes()
    gone = d / "shards" / shard_name(1, backend)
    shutil.rmtree(gone) if gone.is_dir() else gone.unlink()
    root = str(d.parent)
    assert "missing 1/4 shards" in cli_run("caches", "ls", "--root", root).output
    assert "complete" not in cli_run("caches", "ls", "--root", root).output
    one_line_error(cli_run("caches", "inspect", d.name, "--root", root, "--verify", expect=None),
                   "missing shards/" + gone.name)
    one_line_error(cli_run("student", str(path), f"workspace={tmp_path}", f"student.cache={d}", expect=None),
                   str(gone), "missing", "logitcache cache")
    _nothing_trained(tmp_path)
    # the cache stage notices and recomputes it: the same bytes, so the manifest stays true
    out = cli_run("cache", str(path), f"cache.backend={backend}", f"cache.root={root}").output
    assert "recomputed" in out
    assert (d / "manifest.json").read_bytes() == manifest
    assert json.loads(cli_run("caches", "inspect", d.name, "--root", root, "--verify").output)["verified"]


# --- a failed rerun never clobbers a finished student ---------------------------------------

def _report_accuracy(cli_run, path, run):
    cli_run("evaluate", str(path), f"run_name={run}")
    rows = json.loads((path.parent / "runs" / run / "report.json").read_text())["rows"]
    return next(r["accuracy"] for r in rows if r["model"] == "s-kd-s0")


def test_rerun_killed_while_publishing_leaves_no_marker_for_the_new_model(cli_run, built, monkeypatch):
    ws, path, _ = built
    run = "clobber"
    cli_run("student", str(path), f"run_name={run}")
    job = ws / "runs" / run / "students" / "s-kd-s0"
    done = json.loads((job / "done.json").read_text())
    assert _report_accuracy(cli_run, path, run) == pytest.approx(done["final"]["accuracy"])

    from pipeline.train import loop

    real = loop.atomic_write_bytes

    def dies_after_the_model(p, data):  # the moment the old code left a stale marker beside a new model
        if p.name == "history.json":
            raise KeyboardInterrupt("killed")
        return real(p, data)

    monkeypatch.setattr(loop, "atomic_write_bytes", dies_after_the_model)
    killed = cli_run("student", str(path), f"run_name={run}", "student.lr=0.05", "student.alpha=0.9", expect=None)
    assert killed.exit_code != 0 and "Aborted" in killed.output
    monkeypatch.undo()
    assert not (job / "done.json").exists()  # the old marker never describes the new model.pt
    one_line_error(cli_run("evaluate", str(path), f"run_name={run}", expect=None), "s-kd-s0", "has not finished")
    assert "trained" in cli_run("student", str(path), f"run_name={run}").output  # not "up to date"
    done = json.loads((job / "done.json").read_text())
    assert _report_accuracy(cli_run, path, run) == pytest.approx(done["final"]["accuracy"])


def test_rerun_failing_mid_training_keeps_the_finished_student(cli_run, built, monkeypatch):
    ws, path, _ = built
    run = "midway"
    cli_run("student", str(path), f"run_name={run}")
    job = ws / "runs" / run / "students" / "s-kd-s0"
    before = {n: (job / n).read_bytes() for n in ("model.pt", "history.json", "done.json")}

    def raises(*a, **kw):
        raise RuntimeError("student forward failed")

    monkeypatch.setattr(student_stage, "held_out", raises)
    one_line_error(cli_run("student", str(path), f"run_name={run}", "student.lr=0.05", expect=None),
                   "student forward failed")
    monkeypatch.undo()
    assert {n: (job / n).read_bytes() for n in before} == before
    one_line_error(cli_run("evaluate", str(path), f"run_name={run}", "student.lr=0.05", expect=None),
                   "done.json", "trained with other settings")
    assert "up to date" in cli_run("student", str(path), f"run_name={run}").output
    # a model.pt replaced behind done.json's back is never scored
    other = torch.load(job / "model.pt")
    torch.save({k: v + 1 for k, v in other.items()}, job / "model.pt")
    one_line_error(cli_run("evaluate", str(path), f"run_name={run}", expect=None), "model.pt", "differs")


# --- hard-label twins and checkpoints --------------------------------------------------------

def test_inserting_a_grid_value_does_not_retrain_hard_twins(built):
    _ws, path, _ = built
    over = ["run_name=grid", "student.baseline=true"]
    first = student_stage.main(load_config(path, [*over, "student.grid={temperature: [2.0, 4.0]}"]))
    assert [r.job for r in first if "hard" in r.job] == ["s-hard-s0"]
    second = student_stage.main(load_config(path, [*over, "student.grid={temperature: [1.0, 2.0, 4.0]}"]))
    by_job = {r.job: r.skipped for r in second}
    assert by_job == {"s-T1-kd-s0": False, "s-hard-s0": True, "s-T2-kd-s0": True, "s-T4-kd-s0": True}


def test_checkpoints_do_not_carry_the_loss_list(built, monkeypatch):
    _ws, path, _ = built
    import io as _io

    from pipeline.train import loop

    states = []
    real = loop.atomic_write_bytes

    def capture(p, data):
        if p.name == "checkpoint.pt":
            states.append(torch.load(_io.BytesIO(data), weights_only=False)["state"])
        return real(p, data)

    monkeypatch.setattr(loop, "atomic_write_bytes", capture)
    student_stage.main(load_config(path, ["run_name=ckpt", "student.epochs=3", "student.checkpoint_every=2"]))
    assert len(states) > 3
    assert all(set(s) == {"epoch", "batch", "step", "history"} for s in states)
    history = json.loads((path.parent / "runs/ckpt/students/s-kd-s0/history.json").read_text())
    assert len(history["losses"]) == states[-1]["step"]
    assert not (path.parent / "runs/ckpt/students/s-kd-s0/losses.f64").exists()


# --- malformed files -------------------------------------------------------------------------

@pytest.mark.parametrize("content", ["[]", '"complete"', '{"status": "complete"}',
                                     '{"status": "complete", "spec": {}, "shards": "all", "rows": 1, "bytes": 1, '
                                     '"format_version": 2}'],
                         ids=["list", "string", "bare", "shards-string"])
def test_manifest_of_the_wrong_shape(cli_run, built, tmp_path, content):
    _ws, path, caches = built
    d = _copy(caches, "zarr", tmp_path)
    (d / "manifest.json").write_text(content)
    one_line_error(cli_run("student", str(path), f"workspace={tmp_path}", f"student.cache={d}", expect=None),
                   str(d / "manifest.json"), "not a logitcache manifest")
    _nothing_trained(tmp_path)
    assert "damaged" in cli_run("caches", "ls", "--root", str(d.parent)).output


def test_corrupt_spec_of_another_cache(cli_run, built, tmp_path):
    _ws, path, _ = built
    other = tmp_path / "root" / "0123456789abcdef"
    other.mkdir(parents=True)
    (other / "spec.json").write_text('{"layout": ')
    line = one_line_error(cli_run("cache", str(path), f"cache.root={other.parent}", expect=None),
                          str(other / "spec.json"), "not a valid cache spec", "delete")
    assert "unexpected" not in line


def test_corrupt_done_json(cli_run, built):
    ws, path, _ = built
    cli_run("student", str(path), "run_name=badmarker")
    marker = ws / "runs/badmarker/students/s-kd-s0/done.json"
    marker.write_bytes(b"\x00{ not json")
    one_line_error(cli_run("evaluate", str(path), "run_name=badmarker", expect=None), str(marker), "not valid JSON")
    out = cli_run("student", str(path), "run_name=badmarker").output  # the student stage retrains it
    assert "done.json: not valid JSON" in out and "s-kd-s0: trained" in out
    cli_run("evaluate", str(path), "run_name=badmarker")


@pytest.mark.parametrize("ref", ["/nope", "/nope/deeper", "nope/x"])
def test_missing_cache_paths(cli_run, built, tmp_path, ref):
    _ws, path, _ = built
    one_line_error(cli_run("student", str(path), f"workspace={tmp_path}", f"student.cache={ref}", expect=None),
                   f"cache {ref}: does not exist")


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage" * 10, b"PK\x03\x04" + bytes(range(256))])
def test_checkpoint_of_random_bytes_starts_over(cli_run, built, content):
    ws, path, _ = built
    ckpt = ws / "runs/badckpt/students/s-kd-s0/checkpoint.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_bytes(content)
    out = cli_run("student", str(path), "run_name=badckpt").output
    assert "cannot be resumed" in out and "starting this job over" in out and "Traceback" not in out
    assert (ckpt.parent / "done.json").is_file() and not ckpt.exists()
    shutil.rmtree(ws / "runs/badckpt")


# --- the workspace is checked before anything is trained --------------------------------------

@pytest.mark.parametrize("command", ["teachers", "run", "cache", "student", "evaluate"])
@pytest.mark.parametrize("under", ["", "/sub"])
def test_workspace_that_is_a_file(cli_run, built, tmp_path, command, under):
    _ws, path, caches = built
    (tmp_path / "file").write_text("not a directory")
    over = [f"workspace={tmp_path / 'file'}{under}", f"student.cache={caches['zarr']}"]
    if command == "evaluate":  # scores the built teachers
        over.append(f"cache.root={caches['zarr'].parent}")
    one_line_error(cli_run(command, str(path), *over, expect=None), "workspace", str(tmp_path / "file"), "is a file")
    assert (tmp_path / "file").read_text() == "not a directory"


# --- students find their cache without the teacher files --------------------------------------

def test_student_finds_its_cache_without_teacher_files(cli_run, built, tmp_path):
    ws, path, caches = built
    moved = tmp_path / "teachers"
    shutil.move(str(ws / "teachers"), moved)
    try:
        out = cli_run("student", str(path), "run_name=noteachers").output
        assert caches["zarr"].name in out and "teacher files absent" in out
        # a config whose targets differ cannot use the record: the teachers are needed, in one line
        one_line_error(cli_run("student", str(path), "run_name=noteachers", "teachers.temperature=3", expect=None),
                       "teachers.members.0 (a)", "not trained yet")
    finally:
        shutil.move(str(moved), ws / "teachers")


def test_a_teacher_overwritten_in_place_is_never_served_stale(cli_run, built, tmp_path):
    ws, path, caches = built
    cfg = tiny_config(tmp_path)
    shutil.copytree(ws / "teachers", tmp_path / "teachers")
    path2 = write_config(tmp_path / "c.yaml", {**json.loads(json.dumps(cfg)),
                                               **{k: v for k, v in load_raw(path).items() if k != "workspace"}})
    cli_run("cache", str(path2))
    assert cli_run("student", str(path2)).exit_code == 0
    ckpt = next((tmp_path / "teachers").rglob("model.pt"))
    state = torch.load(ckpt)
    torch.save({k: v * 1.01 for k, v in state.items()}, ckpt)  # retrained in place, same config
    one_line_error(cli_run("student", str(path2), "run_name=again", expect=None), "incomplete", "logitcache cache")


def load_raw(path):
    import yaml

    return yaml.safe_load(path.read_text())
