"""Bad input: one line naming the file or field and what to do, exit code != 0, no traceback,
and nothing half-written that a later run would take as complete."""

from __future__ import annotations

import numpy as np
import torch
import userzoo
from conftest import run_subprocess, tiny_config, write_config


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.exit_code != 0
    output = result.output.strip()
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and output.splitlines()[-1] == errors[0], output  # status lines may precede it
    text = errors[0]
    for f in fragments:
        assert f in text, text
    return text


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def _user_teacher(tmp_path, factory: str, model, **kwargs) -> dict:
    ckpt = tmp_path / f"{factory.split(':')[1]}.pt"
    torch.save(model.state_dict(), ckpt)
    return {"name": "user", "arch": "import", "factory": factory, "checkpoint": str(ckpt), "kwargs": kwargs}


def test_missing_config_file(cli_run, tmp_path):
    assert_one_line_error(cli_run("run", str(tmp_path / "nope.yaml"), expect=None), "nope.yaml", "not found")


def test_missing_data_file(cli_run, tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, data={"source": str(tmp_path / "gone.npz")}))
    assert_one_line_error(cli_run("teachers", str(path), expect=None), "data.source", "gone.npz", "does not exist")


def test_npz_without_labels(cli_run, tmp_path):
    src = _npz(tmp_path / "d.npz", x=np.zeros((10, 4), np.float32), labels=np.zeros(10))
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, data={"source": src}))
    assert_one_line_error(cli_run("teachers", str(path), expect=None), "d.npz", "no array 'y'", "found: labels, x")


def test_npz_without_inputs(cli_run, tmp_path):
    src = _npz(tmp_path / "d.npz", y=np.zeros(10, np.int64))
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, data={"source": src}))
    assert_one_line_error(cli_run("teachers", str(path), expect=None), "d.npz", "no array 'x'")


def test_labels_outside_class_range(cli_run, tmp_path):
    y = np.arange(40) % 5
    y[7] = 9
    src = _npz(tmp_path / "d.npz", x=np.random.rand(40, 4).astype(np.float32), y=y)
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, data={"source": src, "num_classes": 5}))
    assert_one_line_error(cli_run("teachers", str(path), expect=None), "d.npz", "label 9 outside [0, 5)")
    assert not (tmp_path / "teachers").exists()


def test_teacher_output_width_mismatch(cli_run, tmp_path):
    teacher = _user_teacher(tmp_path, "userzoo:mlp", userzoo.mlp(classes=12), classes=12)
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, teachers={"members": [teacher]}))
    assert_one_line_error(cli_run("cache", str(path), expect=None),
                          "teachers.members.0 (user)", "output width (12,)", "10 classes")
    assert not list((tmp_path / "caches").glob("*/manifest.json"))


def test_nan_teacher_outputs_leave_no_complete_cache(cli_run, tmp_path):
    teacher = _user_teacher(tmp_path, "userzoo:nan_model", userzoo.nan_model(threshold=0.35), threshold=0.35)
    cfg = tiny_config(tmp_path, teachers={"members": [teacher]}, cache={"rows_per_shard": 100})
    path = write_config(tmp_path / "c.yaml", cfg)
    text = assert_one_line_error(cli_run("cache", str(path), expect=None), "teacher user", "NaN or infinite",
                                 "sample ids")
    assert "nothing was written for this shard" in text
    caches = list((tmp_path / "caches").iterdir())
    assert len(caches) == 1
    assert not (caches[0] / "manifest.json").exists()
    assert not list((caches[0] / "shards").glob(".tmp-*"))
    # a student refuses the incomplete cache instead of training on part of it
    result = cli_run("student", str(path), expect=None)
    assert_one_line_error(result, "cache is incomplete", "rerun `logitcache cache CONFIG`")


def test_unknown_key_and_wrong_type(cli_run, tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, student={"temprature": 3}))
    assert_one_line_error(cli_run("student", str(path), expect=None), "student.temprature: unknown key",
                          "temperature")
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    assert_one_line_error(cli_run("student", str(path), "student.batch_size=big", expect=None),
                          "student.batch_size: expected an integer, got 'big'")


def test_student_class_count_differs_from_cache(cli_run, tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    cli_run("teachers", str(path))
    cli_run("cache", str(path))
    assert_one_line_error(
        cli_run("student", str(path), "student.models=[{name: u, arch: import, factory: 'userzoo:mlp', "
                "kwargs: {classes: 4}}]", expect=None),
        "student.models.0 (u)", "output width (4,)", "10 classes")


def test_cache_made_for_other_data(cli_run, tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    cli_run("teachers", str(path))
    cli_run("cache", str(path))
    cache_id = next((tmp_path / "caches").iterdir()).name
    assert_one_line_error(
        cli_run("student", str(path), f"student.cache={cache_id}", "data.transfer.exclude_classes=[3]", expect=None),
        f"{cache_id}: cache was made for dataset", "point student.cache")


def test_unimportable_factory(cli_run, tmp_path):
    teacher = {"name": "user", "arch": "import", "factory": "nosuchmodule:make", "checkpoint": str(tmp_path / "x.pt")}
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, teachers={"members": [teacher]}))
    assert_one_line_error(cli_run("teachers", str(path), expect=None), "teachers.members.0.factory",
                          "nosuchmodule:make")


def test_real_process_exit_code_and_stderr(tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, cache={"k": 0}))
    proc = run_subprocess(["cache", str(path)])
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"Error: {path}: cache.k: 0 must be >= 1"]
