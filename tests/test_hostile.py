"""A catalogue of hostile inputs, tried as a new user would: each runs the real CLI and must end
with a non-zero exit, no traceback, one line naming the field or file, and nothing written that a
later run would take as a result. User code that raises may show its own first line; --debug
shows the full traceback."""

from __future__ import annotations

import textwrap
import uuid

import numpy as np
import pytest
import torch
from conftest import tiny_config, write_config

from pipeline.core.config import load_config


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code not in (0, None), result.output
    output = result.output.strip()
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and output.splitlines()[-1] == errors[0], output
    for f in fragments:
        assert f in errors[0], errors[0]
    return errors[0]


def _config(tmp_path, **sections) -> str:
    return str(write_config(tmp_path / "c.yaml", tiny_config(tmp_path, **sections)))


def _npz(path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def _xy(n: int = 40, features: int = 4) -> dict:
    return {"x": np.random.rand(n, features).astype(np.float32), "y": np.arange(n) % 4}


def _no_outputs(tmp_path) -> None:
    assert not (tmp_path / "teachers").exists() or not list((tmp_path / "teachers").rglob("model.pt"))
    assert not list(tmp_path.glob("caches/*/manifest.json"))
    assert not list(tmp_path.glob("runs/*/*/done.json"))


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write a Python module into tmp_path (importable, with a fresh name); returns its name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> str:
        name = f"hostile_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return write


GOOD_MODEL = """
import torch
from torch import nn

def mlp(inputs=64, classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, classes))
"""


def _import_teacher(tmp_path, module: str, fn: str = "mlp", checkpoint=None, **kwargs) -> dict:
    if checkpoint is None:
        checkpoint = tmp_path / f"{module}.pt"
        torch.save(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).state_dict(), checkpoint)
    return {"name": "user", "arch": "import", "factory": f"{module}:{fn}", "checkpoint": str(checkpoint),
            "kwargs": kwargs}


# --- config and command line ------------------------------------------------------------------

@pytest.mark.parametrize("command", ["teachers", "cache", "student", "run"])
def test_workers_zero_is_refused(cli_run, tmp_path, command):
    one_line_error(cli_run(command, _config(tmp_path), "--workers", "0", expect=None),
                   "--workers: 0 must be >= 1", "omit --workers")
    _no_outputs(tmp_path)


def test_workers_and_scheduler_together(cli_run, tmp_path):
    one_line_error(cli_run("cache", _config(tmp_path), "--workers", "2", "--scheduler", "tcp://x:1", expect=None),
                   "--scheduler and --workers")


@pytest.mark.parametrize("override,fragment", [
    ("teachers.epochs=0", "teachers.epochs: 0 must be >= 1"),
    ("teachers.members.0.epochs=-2", "teachers.members.0.epochs"),
    ("teachers.lr=0", "teachers.lr"),
    ("teachers.batch_size=0", "teachers.batch_size"),
    ("student.grid={temperature: [0]}", "student.grid.temperature"),
    ("student.grid={alpha: [2]}", "student.grid.alpha"),
    ("run_name=..", "run_name"),
    ("data.transfer.exclude_classes=[-4]", "data.transfer.exclude_classes"),
    ("teachers.members.0.checkpoint=elsewhere.pt", "teachers.members.0.checkpoint: applies to arch import"),
    ("student.logit_chunk=64", "student.logit_chunk"),
    ("cache.device=gpu0", "cache.device: 'gpu0' is not a device"),
    ("student.device=tpu", "student.device: 'tpu' is not a device"),
    ("student.epochs.x.y=1", "override student.epochs.x.y: student.epochs is a value (2)"),
    ("student.nothing.0=1", "override student.nothing.0"),
])
def test_bad_values_stop_before_any_work(cli_run, tmp_path, override, fragment):
    one_line_error(cli_run("run", _config(tmp_path), override, expect=None), fragment)
    _no_outputs(tmp_path)


def test_duplicate_yaml_section(cli_run, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"workspace: {tmp_path}\nteachers:\n  epochs: 2\nstudent:\n  epochs: 1\nteachers:\n  lr: 0.1\n")
    one_line_error(cli_run("teachers", str(path), expect=None), "c.yaml", "key 'teachers' appears twice",
                   "lines 2 and 6")
    _no_outputs(tmp_path)


def test_non_utf8_config(cli_run, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"workspace: \xff\xfe\n")
    one_line_error(cli_run("teachers", str(path), expect=None), "c.yaml", "not UTF-8")


def test_config_is_a_directory(cli_run, tmp_path):
    result = cli_run("teachers", str(tmp_path), expect=None)
    assert result.exit_code != 0 and "Traceback" not in result.output and "directory" in result.output


def test_unexpected_error_is_one_line_and_debug_shows_traceback(cli_run, tmp_path, user_module):
    """A user forward that fails only on real data (after the shape check) is not a known error:
    one line with its type, message and where it was raised, and a pointer to --debug."""
    module = user_module(GOOD_MODEL + """
class Picky(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp()
    def forward(self, x):
        if x.shape[0] > 2:
            raise KeyError("feature 'age' missing")
        return self.net(x)

def picky():
    return Picky()
""")
    teacher = _import_teacher(tmp_path, module, "picky")
    teacher["checkpoint"] = str(tmp_path / "p.pt")
    torch.save({f"net.{k}": v for k, v in torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
                .state_dict().items()}, teacher["checkpoint"])
    path = _config(tmp_path, teachers={"members": [teacher]})
    line = one_line_error(cli_run("cache", path, expect=None), "KeyError", "feature 'age' missing", "forward",
                          "--debug")
    assert module in line  # where: the user's file
    assert not list(tmp_path.glob("caches/*/manifest.json"))
    with pytest.raises(KeyError):
        cli_run("--debug", "cache", path, expect=None)


def test_debug_reraises_known_errors(cli_run, tmp_path):
    from pipeline.core.errors import ConfigError

    with pytest.raises(ConfigError):
        cli_run("--debug", "teachers", str(tmp_path / "nope.yaml"), expect=None)


def test_caches_commands_take_the_workspace_from_config(cli_run, tmp_path):
    path = _config(tmp_path)
    cli_run("teachers", path)
    cli_run("cache", path)
    cache_id = next((tmp_path / "caches").iterdir()).name
    listing = cli_run("caches", "ls", "--config", path).output
    assert cache_id in listing
    inspected = cli_run("caches", "inspect", cache_id[:8], "--config", path).output
    assert cache_id in inspected
    # --root still wins over the config
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cache_id not in cli_run("caches", "ls", "--root", str(empty), "--config", path).output
    one_line_error(cli_run("caches", "ls", "--config", str(tmp_path / "missing.yaml"), expect=None),
                   "missing.yaml", "not found")


# --- data ----------------------------------------------------------------------------------------

def _data_error(cli_run, tmp_path, data: dict, *fragments: str, command: str = "teachers") -> str:
    line = one_line_error(cli_run(command, _config(tmp_path, data=data), expect=None), *fragments)
    _no_outputs(tmp_path)
    return line


def test_empty_arrays(cli_run, tmp_path):
    src = _npz(tmp_path / "d.npz", x=np.zeros((0, 4), np.float32), y=np.zeros(0, np.int64))
    _data_error(cli_run, tmp_path, {"source": src}, "d.npz", "'x' is empty")


def test_zero_byte_npz(cli_run, tmp_path):
    (tmp_path / "d.npz").write_bytes(b"")
    line = _data_error(cli_run, tmp_path, {"source": str(tmp_path / "d.npz")}, "data.source", "d.npz", "empty")
    assert "Aborted" not in line


def test_truncated_npz(cli_run, tmp_path):
    src = _npz(tmp_path / "d.npz", **_xy(400, 16))
    data = (tmp_path / "d.npz").read_bytes()
    (tmp_path / "d.npz").write_bytes(data[: len(data) // 2])
    _data_error(cli_run, tmp_path, {"source": src}, "data.source", "d.npz", "cannot read as .npz")


def test_npz_of_random_bytes(cli_run, tmp_path):
    (tmp_path / "d.npz").write_bytes(np.random.default_rng(0).bytes(1000))
    _data_error(cli_run, tmp_path, {"source": str(tmp_path / "d.npz")}, "d.npz", "cannot read as .npz")


def test_truncated_transfer_npz(cli_run, tmp_path):
    src = _npz(tmp_path / "t.npz", **_xy(400, 64))
    (tmp_path / "t.npz").write_bytes((tmp_path / "t.npz").read_bytes()[:300])
    _data_error(cli_run, tmp_path, {"source": "digits", "transfer": {"source": src}},
                "data.transfer.source", "t.npz", command="cache")


@pytest.mark.parametrize("key", ["source", "test_source"])
def test_directory_as_source(cli_run, tmp_path, key):
    (tmp_path / "dir.npz").mkdir()
    data = {"source": _npz(tmp_path / "d.npz", **_xy()), key: str(tmp_path / "dir.npz")}
    line = _data_error(cli_run, tmp_path, data, f"data.{key}", "dir.npz", "is a directory")
    assert "does not exist" not in line


def _parquet(path, **columns) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return str(path)


def test_parquet_without_label_column(cli_run, tmp_path):
    src = _parquet(tmp_path / "d.parquet", a=np.random.rand(40), b=np.random.rand(40), target=np.arange(40) % 3)
    line = _data_error(cli_run, tmp_path, {"source": src}, "d.parquet", "no label column 'label'",
                       "data.label_column", "target")
    assert "save" not in line and "'y'" not in line


def test_ragged_parquet_list_column(cli_run, tmp_path):
    rows = [[0.1, 0.2, 0.3]] * 20 + [[0.1, 0.2]] * 20
    src = _parquet(tmp_path / "d.parquet", features=rows, label=np.arange(40) % 3)
    _data_error(cli_run, tmp_path, {"source": src}, "d.parquet", "'features' is ragged")


def test_parquet_of_garbage(cli_run, tmp_path):
    (tmp_path / "d.parquet").write_bytes(b"PAR1" + b"\x00" * 50)
    _data_error(cli_run, tmp_path, {"source": str(tmp_path / "d.parquet")}, "d.parquet", "cannot read as Parquet")


def test_exclude_class_beyond_inferred_count(cli_run, tmp_path):
    _data_error(cli_run, tmp_path, {"transfer": {"exclude_classes": [3, 12]}},
                "data.transfer.exclude_classes", "12 is not a class", "0..9")


def _lm_config(tmp_path, source: str) -> str:
    cfg = tiny_config(tmp_path, data={"task": "lm", "source": source, "seq_len": 8, "vocab_size": 300},
                      teachers={"epochs": 1, "members": [{"name": "g", "arch": "gpt", "layers": 1, "d_model": 16,
                                                          "heads": 2}]},
                      cache={"rows_per_shard": 64, "chunk_rows": 32},
                      student={"models": [{"name": "s", "arch": "gpt", "layers": 1, "d_model": 16, "heads": 2}]})
    return str(write_config(tmp_path / "c.yaml", cfg))


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_non_utf8_text(cli_run, tmp_path, suffix):
    body = "caf\u00e9 au lait\n\n" * 50 if suffix == ".txt" else '{"text": "caf\u00e9"}\n' * 50
    (tmp_path / f"corpus{suffix}").write_bytes(body.encode("latin-1"))
    one_line_error(cli_run("teachers", _lm_config(tmp_path, str(tmp_path / f"corpus{suffix}")), expect=None),
                   "data.source", f"corpus{suffix}", "not UTF-8")
    _no_outputs(tmp_path)


def test_text_source_is_a_directory(cli_run, tmp_path):
    (tmp_path / "corpus.txt").mkdir()
    one_line_error(cli_run("teachers", _lm_config(tmp_path, str(tmp_path / "corpus.txt")), expect=None),
                   "data.source", "is a directory")


def test_broken_tokenizer_file(cli_run, tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{not json")
    (tmp_path / "corpus.txt").write_text("hello world\n\n" * 50)
    path = _lm_config(tmp_path, str(tmp_path / "corpus.txt"))
    one_line_error(cli_run("teachers", path, f"data.tokenizer={tmp_path / 'tok'}", expect=None),
                   "data.tokenizer", "not a valid tokenizer.json")


# --- models --------------------------------------------------------------------------------------

def _model_error(cli_run, tmp_path, teacher: dict, *fragments: str) -> str:
    line = one_line_error(cli_run("cache", _config(tmp_path, teachers={"members": [teacher]}), expect=None),
                          *fragments)
    _no_outputs(tmp_path)
    return line


def test_factory_that_raises(cli_run, tmp_path, user_module):
    module = user_module("def make(**kw):\n    raise ValueError('hidden size must be even')\n")
    _model_error(cli_run, tmp_path, _import_teacher(tmp_path, module, "make"),
                 "teachers.members.0.factory", "raised ValueError: hidden size must be even")


def test_factory_module_with_syntax_error(cli_run, tmp_path, user_module):
    module = user_module("def make(:\n    pass\n")
    _model_error(cli_run, tmp_path, _import_teacher(tmp_path, module, "make"),
                 "teachers.members.0.factory", "SyntaxError", f"{module}.py:1")


def test_factory_module_that_raises_on_import(cli_run, tmp_path, user_module):
    module = user_module("raise RuntimeError('set MODEL_HOME first')\n")
    _model_error(cli_run, tmp_path, _import_teacher(tmp_path, module, "make"),
                 "teachers.members.0.factory", "RuntimeError: set MODEL_HOME first")


def test_factory_function_missing(cli_run, tmp_path, user_module):
    module = user_module(GOOD_MODEL)
    _model_error(cli_run, tmp_path, _import_teacher(tmp_path, module, "mpl"),
                 "teachers.members.0.factory", "no function 'mpl'")


def test_factory_unknown_kwargs(cli_run, tmp_path, user_module):
    module = user_module(GOOD_MODEL)
    _model_error(cli_run, tmp_path, _import_teacher(tmp_path, module, "mlp", widht=3),
                 "teachers.members.0.kwargs", "unexpected keyword argument 'widht'")


def test_forward_raises_type_error(cli_run, tmp_path, user_module):
    module = user_module(GOOD_MODEL + """
class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp()
    def forward(self, x, mask):
        return self.net(x)

def two():
    return Two()
""")
    teacher = _import_teacher(tmp_path, module, "two")
    _model_error(cli_run, tmp_path, teacher, "teachers.members.0 (user)", "forward pass", "TypeError",
                 "mask")


def test_forward_returns_a_tuple(cli_run, tmp_path, user_module):
    module = user_module(GOOD_MODEL + """
class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp()
    def forward(self, x):
        return self.net(x), None

def pair():
    return Pair()
""")
    _model_error(cli_run, tmp_path, _import_teacher(tmp_path, module, "pair"),
                 "teachers.members.0 (user)", "forward returned tuple")


@pytest.mark.parametrize("content", [b"", b"hello world\n", b"\x80\x02garbage" * 10, bytes(range(256)) * 4],
                         ids=["empty", "text", "pickle-ish", "random"])
def test_checkpoint_of_random_bytes(cli_run, tmp_path, user_module, content):
    module = user_module(GOOD_MODEL)
    ckpt = tmp_path / "bad.pt"
    ckpt.write_bytes(content)
    _model_error(cli_run, tmp_path, _import_teacher(tmp_path, module, checkpoint=ckpt),
                 "teachers.members.0.checkpoint", "bad.pt", "cannot load")


def test_checkpoint_that_is_not_a_state_dict(cli_run, tmp_path, user_module):
    module = user_module(GOOD_MODEL)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    _model_error(cli_run, tmp_path, _import_teacher(tmp_path, module, checkpoint=tmp_path / "list.pt"),
                 "teachers.members.0.checkpoint", "holds a list, not a state_dict")


def test_checkpoint_is_a_directory(cli_run, tmp_path, user_module):
    module = user_module(GOOD_MODEL)
    (tmp_path / "ckpt").mkdir()
    _model_error(cli_run, tmp_path, _import_teacher(tmp_path, module, checkpoint=tmp_path / "ckpt"),
                 "teachers.members.0.checkpoint", "is a directory")


def test_missing_import_checkpoint_is_one_line(cli_run, tmp_path, user_module):
    """teacher_identity hashed the file before the friendly check: a FileNotFoundError traceback."""
    module = user_module(GOOD_MODEL)
    _model_error(cli_run, tmp_path, _import_teacher(tmp_path, module, checkpoint=tmp_path / "gone.pt"),
                 "teachers.members.0.checkpoint", "gone.pt does not exist")


@pytest.mark.parametrize("command", ["cache", "student"])
def test_untrained_builtin_teacher_is_one_line(cli_run, tmp_path, command):
    one_line_error(cli_run(command, _config(tmp_path), expect=None),
                   "teachers.members.0 (a)", "not trained yet", "logitcache teachers")
    _no_outputs(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("key", ["cache.device", "student.device"])
def test_cuda_requested_without_cuda(cli_run, tmp_path, key):
    path = _config(tmp_path)
    if key == "student.device":
        cli_run("teachers", path)
        cli_run("cache", path)
    one_line_error(cli_run("cache" if key == "cache.device" else "student", path, f"{key}=cuda:0", expect=None),
                   "cuda:0 requested but CUDA is not available")
    assert not list(tmp_path.glob("runs/*/*/done.json"))


# --- the cache id covers an imported teacher's code -------------------------------------------

def _teacher_id(tmp_path, teacher: dict) -> dict:
    from pipeline.inputs.splits import load_splits
    from pipeline.models.ensemble import teacher_identity, teacher_refs

    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_config(tmp_path, teachers={"members": [teacher]})))
    splits = load_splits(cfg)
    return teacher_identity(teacher_refs(cfg, splits)[0], splits.num_classes)


def test_import_teacher_code_and_version_are_in_the_identity(tmp_path, user_module):
    module = user_module(GOOD_MODEL)
    teacher = _import_teacher(tmp_path, module)
    before = _teacher_id(tmp_path, teacher)
    assert "version" not in before["spec"]  # a new field with its default never changes an id
    # editing forward (here: input normalization) keeps the weights but must change the identity
    src = tmp_path / f"{module}.py"
    src.write_text(src.read_text().replace("nn.Flatten(), ", "nn.Flatten(), nn.LayerNorm(inputs, elementwise_affine=False), "))
    edited = _teacher_id(tmp_path, teacher)
    assert edited["checkpoint_sha256"] == before["checkpoint_sha256"]
    assert edited["code_sha256"] != before["code_sha256"]
    bumped = _teacher_id(tmp_path, {**teacher, "version": "2"})
    assert bumped["spec"]["version"] == "2" and bumped != edited


def test_builtin_teacher_identity_has_no_code_hash(tmp_path):
    from pipeline.core.specs import CNNSpec, MLPSpec
    from pipeline.models.ensemble import _spec_dict

    assert _spec_dict(MLPSpec(name="a")) == {"name": "a"}
    assert _spec_dict(CNNSpec(name="c", hidden=(8,))) == {"name": "c", "arch": "cnn", "hidden": [8]}
