"""Values that types cannot refuse: ranges, names, devices, keys that do not apply to an
architecture or task, duplicate YAML keys, non-UTF-8 files and malformed overrides. Each is one
ConfigError naming the field, raised before any work starts."""

from __future__ import annotations

import pytest
from conftest import tiny_config, write_config

from pipeline.core.config import load_config
from pipeline.core.errors import ConfigError
from pipeline.models.ensemble import training_settings

GPT_TEACHER = "data.task=lm", "teachers.members=[{name: g, arch: gpt}]", "student.models=[{name: s, arch: gpt}]"
IMPORT_TEACHER = "teachers.members=[{name: u, arch: import, factory: 'userzoo:mlp', checkpoint: u.pt}]"

# (overrides, fragment the single-line message must contain)
REFUSED = [
    (["teachers.epochs=0"], "teachers.epochs: 0 must be >= 1"),
    (["teachers.epochs=-3"], "teachers.epochs: -3 must be >= 1"),
    (["teachers.members.0.epochs=0"], "teachers.members.0.epochs: 0 must be >= 1"),
    (["student.epochs=0"], "student.epochs: 0 must be >= 1"),
    (["student.models.1.epochs=-1"], "student.models.1.epochs: -1 must be >= 1"),
    (["teachers.lr=0"], "teachers.lr: 0.0 must be > 0"),
    (["teachers.lr=-0.1"], "teachers.lr: -0.1 must be > 0"),
    (["student.lr=0"], "student.lr: 0.0 must be > 0"),
    (["teachers.members.1.lr=0"], "teachers.members.1.lr: 0.0 must be > 0"),
    (["student.models.0.lr=-1e-3"], "student.models.0.lr: -0.001 must be > 0"),
    (["teachers.batch_size=0"], "teachers.batch_size: 0 must be >= 1"),
    (["student.batch_size=0"], "student.batch_size: 0 must be >= 1"),
    (["cache.batch_size=0"], "cache.batch_size: 0 must be >= 1"),
    (["teachers.weight_decay=-1"], "teachers.weight_decay"),
    (["student.grid={temperature: [2, 0]}"], "student.grid.temperature: 0 is invalid; values must be > 0"),
    (["student.grid={temperature: [-1]}"], "student.grid.temperature: -1 is invalid"),
    (["student.grid={alpha: [0.5, 2]}"], "student.grid.alpha: 2 is invalid; values must be in [0, 1]"),
    (["student.grid={alpha: [-0.1]}"], "student.grid.alpha: -0.1 is invalid"),
    (["student.grid={lr: [0.01, 0]}"], "student.grid.lr: 0 is invalid; values must be > 0"),
    (["student.grid={epochs: [0]}"], "student.grid.epochs: 0 is invalid; values must be >= 1"),
    (["student.grid={epochs: [2.5]}"], "student.grid.epochs: 2.5 is invalid; values must be a whole number >= 1"),
    (["student.grid={epochs: [true]}"], "student.grid.epochs: values must be numbers"),
    (["student.grid={dropout: [0.1]}"], "student.grid.dropout: not sweepable"),
    (["data.transfer.exclude_classes=[-1]"], "data.transfer.exclude_classes: -1 is not a class"),
    (["data.num_classes=10", "data.transfer.exclude_classes=[3, 10]"],
     "data.transfer.exclude_classes: 10 is not a class; give [0, 10)"),
    (["run_name=.."], "run_name: '..' must be a plain directory name"),
    (["run_name=."], "run_name: '.' must be a plain directory name"),
    (["run_name=a/b"], "run_name: 'a/b'"),
    (["run_name=../escape"], "run_name: '../escape'"),
    (["run_name=''"], "run_name: ''"),
    (["student.models.0.name=.."], "student.models.0.name"),
    (["cache.device=gpu"], "cache.device: 'gpu' is not a device; use auto, cpu, cuda or cuda:N"),
    (["cache.device=cuda:x"], "cache.device: 'cuda:x' is not a device"),
    (["student.device=cuda1"], "student.device: 'cuda1' is not a device"),
    (["student.device=''"], "student.device: '' is not a device"),
    (["teachers.members.0.checkpoint=t.pt"], "teachers.members.0.checkpoint: applies to arch import, not mlp"),
    (["teachers.members.0.path=m"], "teachers.members.0.path: applies to arch hf, not mlp"),
    (["teachers.members.0.factory=userzoo:mlp"], "teachers.members.0.factory: applies to arch import"),
    (["teachers.members.0.kwargs={classes: 3}"], "teachers.members.0.kwargs: applies to arch import"),
    (["teachers.members.0.layers=4"], "teachers.members.0.layers: applies to arch gpt, not mlp"),
    (["student.models.0.heads=2"], "student.models.0.heads: applies to arch gpt"),
    (["student.models.0.d_model=64"], "student.models.0.d_model: applies to arch gpt"),
    (["teachers.members.0.channels=[8]"], "teachers.members.0.channels: applies to arch cnn, not mlp"),
    (["teachers.members.0.version=v2"], "teachers.members.0.version: applies to arch import"),
    ([IMPORT_TEACHER, "teachers.members.0.hidden=[8]"], "teachers.members.0.hidden: applies to arch mlp or cnn"),
    ([IMPORT_TEACHER, "teachers.members.0.epochs=3"], "teachers.members.0.epochs: import teachers are loaded"),
    (["teachers.members.0.temperature=2"], "teachers.members.0.temperature: applies to students only"),
    (["teachers.members.0.alpha=0.5"], "teachers.members.0.alpha: applies to students only"),
    (["student.models.0.seed=3"], "student.models.0.seed: students take their seeds from student.seeds"),
    (["student.models=[{name: s, arch: import, factory: 'userzoo:mlp', checkpoint: s.pt}]"],
     "student.models.0.checkpoint: students are trained from scratch"),
    (["student.logit_chunk=128"], "student.logit_chunk: applies to data.task lm only"),
    # each architecture's own spec refuses the keys of the others
    ([*GPT_TEACHER, "teachers.members.0.channels=[8]"], "teachers.members.0.channels: applies to arch cnn, not gpt"),
    ([*GPT_TEACHER, "teachers.members.0.hidden=[8]"], "teachers.members.0.hidden: applies to arch mlp or cnn, not gpt"),
    ([*GPT_TEACHER, "teachers.members.0.heads=3"], "teachers.members.0.d_model: 128 is not a multiple of heads=3"),
    (["teachers.members.0.arch=resnet"], "teachers.members.0.arch: 'resnet' is not one of mlp, cnn, import, gpt, hf"),
    (["teachers.members.0.colour=red"], "teachers.members.0.colour: unknown key; valid keys are name, arch"),
    (["teachers.members=[{name: g, arch: gpt}]"], "teachers.members.0.arch: data.task classify needs arch mlp, cnn or import, got gpt"),
    (["cache.backend=parquet", "cache.codec=shuffle-zstd"], "cache.codec: shuffle-zstd is for the zarr backend"),
    (["cache.codec=blosc"], "cache.codec"),
    (["cache.codec=shuffle-zstd", "cache.compression_level=12"],
     "cache.compression_level: 12 is outside shuffle-zstd's levels 1..9"),
    (["cache.compression_level=23"], "cache.compression_level: 23 is outside shuffle-lz4hc's levels 1..9"),  # dense's default codec
    (["cache.codec=zstd", "cache.compression_level=23"], "cache.compression_level: 23 is outside zstd's levels 1..22"),
    (["cluster.workers=0"], "cluster.workers: 0 must be >= 1"),
    (["cluster.slurm.jobs=0"], "cluster.slurm.jobs: 0 must be >= 1"),
    (["cluster.worker_timeout=0"], "cluster.worker_timeout"),
    # overrides through a scalar, or indexing a key that is not a list
    (["student.alpha=0.2", "student.alpha.x=3"], "override student.alpha.x: student.alpha is a value (0.2)"),
    (["seed=1", "seed.a.b=1"], "override seed.a.b: seed is a value (1)"),
    (["student.alpha=0.2", "student.alpha.x.y=1"], "override student.alpha.x.y: student.alpha is a value"),
    (["student.alpha.x=3"], "student.alpha: expected a number, got {'x': 3}"),
    (["student.foo.0=3"], "override student.foo.0: student.foo is not a list"),
    (["student.grid.temperature.0=3"], "override student.grid.temperature.0: student.grid.temperature is not a list"),
    (["teachers.members.0.x.0=1"], "override teachers.members.0.x.0"),
    (["student..alpha=1"], "empty part in key"),
    (["student.models.0.hidden=3", "student.models.x=1"], "'x' is not an index below 2"),
    (["student.models.x=1"], "student.models: expected a list, got dict"),
]


@pytest.mark.parametrize("overrides,fragment", REFUSED, ids=[" ".join(o)[:60] for o, _ in REFUSED])
def test_refused(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert fragment in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("overrides", [
    ["teachers.epochs=1", "teachers.lr=1e-5", "student.grid={temperature: [0.5, 8], alpha: [0, 1], epochs: [1, 3]}"],
    ["data.num_classes=10", "data.transfer.exclude_classes=[0, 9]"],
    ["cache.device=cuda:3", "student.device=cuda"],  # valid forms; availability is checked where used
    ["teachers.members.0.hidden=[8]", "teachers.members.2.channels=[4]", "student.models.0.dropout=0.2"],
    ["run_name=..hidden-but-fine"],
])
def test_accepted(overrides):
    load_config(None, overrides)


def test_every_spec_class_has_an_architecture():
    from pipeline.core.specs import SPECS
    from pipeline.models.builders import ARCHITECTURES

    assert set(SPECS.values()) == set(ARCHITECTURES)
    assert all(cls.arch == name for name, cls in SPECS.items())  # the Literal default names its table key


def test_shipped_configs_still_load():
    for name in ("configs/demo.yaml", "configs/omit3.yaml", "configs/lm.yaml", "examples/slurm/cluster.yaml"):
        load_config(name)


def test_zero_is_not_unset_in_training_settings():
    """`spec.epochs or t.epochs` took a member's explicit value for unset when it was falsy."""
    import dataclasses

    cfg = load_config(None, ["teachers.epochs=7", "teachers.lr=0.5"])
    spec = dataclasses.replace(cfg.teachers.members[0], epochs=0, lr=0.0)  # past validation on purpose
    assert training_settings(cfg, spec)["epochs"] == 0 and training_settings(cfg, spec)["lr"] == 0.0
    assert training_settings(cfg, cfg.teachers.members[0])["epochs"] == 7


def test_duplicate_yaml_key_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("student:\n  epochs: 3\nteachers:\n  epochs: 2\nstudent:\n  alpha: 0.5\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg and "key 'student' appears twice" in msg and "lines 1 and 5" in msg


def test_duplicate_nested_yaml_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cache:\n  k: 3\n  encoding: topk\n  k: 8\n")
    with pytest.raises(ConfigError, match=r"key 'k' appears twice in one section \(lines 2 and 4\)"):
        load_config(path)


def test_non_utf8_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes("run_name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"c.yaml: not UTF-8 text \(byte 13\); save the config as UTF-8"):
        load_config(path)


def test_all_problems_reported_at_once(tmp_path):
    cfg = tiny_config(tmp_path, run_name="..", teachers={**tiny_config(tmp_path)["teachers"], "epochs": 0},
                      student={"lr": 0, "grid": {"alpha": [3]}})
    with pytest.raises(ConfigError) as e:
        load_config(write_config(tmp_path / "c.yaml", cfg))
    msg = str(e.value)
    for fragment in ("teachers.epochs", "student.lr", "student.grid.alpha", "run_name"):
        assert fragment in msg


def test_resolve_device_refuses_missing_cuda(monkeypatch):
    import torch

    from pipeline.models.builders import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"cache.device: cuda:1 requested but CUDA is not available"):
        resolve_device("cuda:1", "cache.device")
    with pytest.raises(ConfigError, match=r"device: 'tpu' is not a device"):
        resolve_device("tpu")
    assert resolve_device("auto").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"student.device: cuda:1 requested but this machine has 1 CUDA"):
        resolve_device("cuda:1", "student.device")
