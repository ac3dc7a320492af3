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
    build_model = teacher_stage.build_model

    def build(*args, **kwargs) -> torch.nn.Module:
        model = build_model(*args, **kwargs)
        model.register_forward_hook(lambda *_: samples.append(_resident()))
        return model

    monkeypatch.setattr(teacher_stage, "build_model", build)
    before = _resident()
    teacher_stage.run_shard(cfg, teacher_stage.plan(cfg)[0])
    grew = max(samples) - before
    print(f"{size >> 20} MB input ({'whole file' if held_out else 'split'}): resident grew by {grew / 2**20:.1f} MB")
    n = len(splits.train)
    assert len(samples) == -(-n // 128) + -(-n // 256)  # every training batch (128 rows) and scoring batch (256)
    assert grew < size / 2, f"resident memory grew by {grew >> 20} MB training on a {size >> 20} MB input"
