"""The GPU path of the teacher pass and students (skipped without CUDA)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config, write_config

from pipeline.core.config import load_config
from pipeline.format import reader as fmt
from stages import cache as cache_stage
from stages import student as student_stage
from stages import teachers as teacher_stage

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_teacher_pass_matches_cpu_and_students_train_on_cuda(tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, cache={"encoding": "topk", "k": 4}))
    teacher_stage.main(load_config(path))
    cpu = cache_stage.main(load_config(path, ["cache.device=cpu", f"cache.root={tmp_path / 'cpu'}"]))
    gpu = cache_stage.main(load_config(path, ["cache.device=cuda", f"cache.root={tmp_path / 'gpu'}"]))
    a, b = fmt.CacheReader(cpu).read_all(), fmt.CacheReader(gpu).read_all()
    assert (a["ids"][:, 0] == b["ids"][:, 0]).mean() > 0.98  # bf16 autocast may swap near-ties
    assert np.abs(a["logp"][:, 0].astype(np.float32) - b["logp"][:, 0].astype(np.float32)).mean() < 0.05
    res = student_stage.main(load_config(path, ["student.device=cuda", f"student.cache={gpu}"]))
    assert res[0].final_accuracy > 0.5
    assert json.loads((gpu / "manifest.json").read_text())["rows"] == 1348
