"""bench/gpu.py runs where no GPU is lent: every part at toy sizes on the CPU, so the script that
measures the GPU path cannot rot; on a CUDA device the same toy run goes through the device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, device: str) -> dict[str, dict]:
    env = {**os.environ, "LOGITCACHE_BENCH_RESULTS": str(tmp_path / "results"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--toy", "--device", device], check=False,
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    assert [x["bench"] for x in lines] == ["gpu_teacher", "gpu_encode", "kd_overhead"]
    kept = {p.stem: json.loads(p.read_text())["figures"] for p in (tmp_path / "results").glob("*.json")}
    assert sorted(kept) == ["gpu-encode", "gpu-kd_overhead", "gpu-teacher"]
    return kept


def _check(kept: dict[str, dict]) -> None:
    teacher = kept["gpu-teacher"]["vocab"]
    assert sorted(teacher) == ["2048", "512"] and all(v["ratio"] > 0 for v in teacher.values())
    encode = kept["gpu-encode"]["encodings"]
    assert {k.split("/")[0] for k in encode} == {"topk32", "topk8_q8", "hybrid_k8_n16_q8"}
    assert all(v["encode_rows_per_s"] > 0 and v["over_forward"] > 0 for v in encode.values())
    rows = kept["gpu-kd_overhead"]["rows"]
    assert {(r["task"], r["path"]) for r in rows} == {("lm", "stage"), ("lm", "api"), ("classify", "stage"),
                                                      ("classify", "api")}
    assert all(r["ratio"] > 0 and r["loss_peak_ratio"] > 0 for r in rows)


def test_gpu_bench_runs_at_toy_sizes_on_the_cpu(tmp_path: Path) -> None:
    _check(_run(tmp_path, "cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bench_runs_at_toy_sizes_on_the_device(tmp_path: Path) -> None:
    kept = _run(tmp_path, "cuda")
    _check(kept)
    assert kept["gpu-teacher"]["device"] == "cuda"
