"""stages/teachers.py: the demo teachers train and score batch by batch, gathering each batch's rows
from the mapped inputs, so the stage's memory does not grow with the training set."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, write_config, write_npy_dir

from pipeline.core.config import load_config
from pipeline.inputs import arrays as data
from pipeline.inputs.splits import load_splits
from stages import teachers as teacher_stage


def _resident() -> int:
    """Bytes this process holds resident, anonymous and file-backed (/proc/self/statm)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="resident memory is read from /proc")
@pytest.mark.parametrize("held_out", [True, False], ids=["whole-file", "split"])
def test_training_never_holds_the_training_set(tmp_path, monkeypatch, held_out):
    """One epoch and the train-accuracy pass over a 128 MB .npy input: the process's resident memory
    (sampled after every forward, training and scoring) never grows by half the input. Loading the
    split whole copies it (the 'split' case: a Selection of rows); indexing a tensor over the whole
    mapped x.npy leaves every page it touched resident (the 'whole-file' case)."""
    size = write_npy_dir(tmp_path / "big", rows=8192, features=4096, held_out=held_out)
    member = {"name": "a", "arch": "mlp", "hidden": [8], "seed": 0}
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path, data={"source": str(tmp_path / "big")}, teachers={"epochs": 1, "members": [member]})))
    splits = load_splits(cfg)  # the fingerprint pass, memoized: not part of what is measured
    data.release(splits.train.x)
    warm = torch.nn.Linear(4, 2)  # an optimizer's first use imports torch's compiler stack (~70 MB)
    opt = torch.optim.Adam(warm.parameters())
    warm(torch.ones(1, 4)).sum().backward()
    opt.step()
    samples: list[int] = []
    from pipeline.train import teachers as fitting

    build_model = fitting.build_model

    def build(*args, **kwargs) -> torch.nn.Module:
        model = build_model(*args, **kwargs)
        model.register_forward_hook(lambda *_: samples.append(_resident()))
        return model

    monkeypatch.setattr(fitting, "build_model", build)
    before = _resident()
    teacher_stage.run_shard(cfg, teacher_stage.plan(cfg)[0])
    grew = max(samples) - before
    print(f"{size >> 20} MB input ({'whole file' if held_out else 'split'}): resident grew by {grew / 2**20:.1f} MB")
    n = len(splits.train)
    assert len(samples) == -(-n // 128) + -(-n // 256)  # every training batch (128 rows) and scoring batch (256)
    assert grew < size / 2, f"resident memory grew by {grew >> 20} MB training on a {size >> 20} MB input"


def _dropout_teacher(tmp_path: Path, name: str, **teachers) -> tuple:
    member = {"name": "d", "arch": "mlp", "hidden": [32], "dropout": 0.3, "seed": 3}  # dropout: the RNG state matters
    cfg = load_config(write_config(tmp_path / f"{name}.yaml", tiny_config(
        tmp_path / name, teachers={"epochs": 3, "checkpoint_every": 4, "members": [member], **teachers})))
    return cfg, teacher_stage.plan(cfg)[0]


def test_a_killed_fit_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """A teacher fit killed mid-epoch resumes from its checkpoint beside model.pt and ends with the
    weights of an uninterrupted fit, bit for bit; the checkpoint is gone once model.pt is written."""
    from pipeline.train import teachers as fitting

    cfg, shard = _dropout_teacher(tmp_path, "whole")
    teacher_stage.run_shard(cfg, shard)
    ref = teacher_stage.teacher_refs(cfg, load_splits(cfg))[0]
    whole = torch.load(ref.checkpoint)

    cfg, shard = _dropout_teacher(tmp_path, "killed")
    ref = teacher_stage.teacher_refs(cfg, load_splits(cfg))[0]
    real, seen = fitting.Permutations.__iter__, []

    def dies_in_epoch_two(self):
        for batch in real(self):
            seen.append(self._drawn)
            if self._drawn == 1 and seen.count(1) == 7:  # epoch 2, past its first checkpoint (step 16)
                raise KeyboardInterrupt("killed")
            yield batch

    monkeypatch.setattr(fitting.Permutations, "__iter__", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        teacher_stage.run_shard(cfg, shard)
    monkeypatch.undo()
    assert not ref.checkpoint.exists() and (ref.checkpoint.parent / "checkpoint.pt").is_file()
    saved = torch.load(ref.checkpoint.parent / "checkpoint.pt", weights_only=False)["state"]
    assert (saved["epoch"], saved["batch"]) == (1, 5)  # 11 batches per epoch: steps 16 = epoch 2 batch 5
    teacher_stage.run_shard(cfg, shard)
    resumed = torch.load(ref.checkpoint)
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert sorted(p.name for p in ref.checkpoint.parent.iterdir()) == ["model.pt", "teacher.json"]


def test_a_fit_reports_progress(tmp_path, monkeypatch, capsys):
    """A teacher fit writes progress lines to a batch job's log, and teacher.json its epochs' losses."""
    import json

    monkeypatch.setenv("LOGITCACHE_PROGRESS_INTERVAL", "0")
    cfg, shard = _dropout_teacher(tmp_path, "progress")
    teacher_stage.run_shard(cfg, shard)
    err = capsys.readouterr().err
    assert "teacher d epoch 1/3" in err and "teacher d epoch 3/3" in err
    ref = teacher_stage.teacher_refs(cfg, load_splits(cfg))[0]
    report = json.loads((ref.checkpoint.parent / "teacher.json").read_text())
    assert [e["epoch"] for e in report["epochs"]] == [1, 2, 3]
    assert report["epochs"][2]["train_loss"] < report["epochs"][0]["train_loss"]
