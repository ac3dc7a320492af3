"""The GPU path's figures in one run, under 5 minutes on one H100: one JSON line each.

    .venv/bin/python bench/gpu.py                 # on a CUDA device
    .venv/bin/python bench/gpu.py --toy           # on the CPU at toy sizes (tests/test_gpu_bench.py)
    .venv/bin/python bench/gpu.py --toy --device cuda   # toy sizes on the device (the gpu-marked test)

  - `gpu_teacher` (results gpu-teacher): the cache stage's rows/s over a bare forward loop of the
    same teacher under bf16 autocast (bench/teacher_overhead.py's measure: an imported MLP teacher
    of width 4,096 and depth 6 whose last layer is the vocabulary), top-32 16-bit targets encoded
    on the device, at 32k and 128k vocabularies. Writing must hide behind compute: goal >= 0.97.
  - `gpu_encode` (results gpu-encode): rows/s of each encoding's `encode` on the device from
    bf16 logits (log_softmax included) and of `to_host`, for top-32 16-bit, top-8 8-bit and
    hybrid (top-8 8-bit + 16 tail draws) at 32k and 128k; `over_forward`: the encode's time over
    the teacher's bare forward per row (how much of the teacher's time the encoding adds).
  - `kd_overhead` (results gpu-kd_overhead): bench/kd_overhead.py on the device (step over
    plain cross-entropy; loss peak memory from torch.cuda.max_memory_allocated).

`--toy` runs every part on the CPU with tiny sizes and no timing goal, so the script cannot rot
where no GPU is lent. Figures are ratios measured side by side within this one run.
"""

from __future__ import annotations

from pipeline.core.host import tune_process

tune_process()  # the process settings the CLI's stages run under; before torch loads (libgomp reads them then)

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import kd_overhead
from common import heavy_workspace, line, record
from heavy_teacher import make
from teacher_overhead import overhead

from pipeline.format.encodings import Encoding, Hybrid, TopK

# Sizes: full (a CUDA device) and toy (the CPU, seconds).
FULL = {"vocabs": [32_000, 128_000], "rows": 131_072, "batch": 4096, "teacher": {"width": 4096, "depth": 6},
        "encode_rows": 8192, "kd_steps": 8, "kd_repeats": 3}
TOY = {"vocabs": [512, 2048], "rows": 2048, "batch": 256, "teacher": {"width": 64, "depth": 1},
       "encode_rows": 256, "kd_steps": 2, "kd_repeats": 1, "kd_vocabs": [512]}


def teacher_figures(device: torch.device, sizes: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for vocab in sizes["vocabs"]:
        rows, batch = sizes["rows"], sizes["batch"]
        ws, x = heavy_workspace(f"gpu-teacher-{vocab}", rows,
                                {"rows_per_shard": batch * 8, "chunk_rows": batch, "batch_size": batch,
                                 "device": device.type}, classes=vocab, teacher=sizes["teacher"])
        try:
            out[str(vocab)] = overhead(ws, x, device, rows, batch, 2, {"classes": vocab, **sizes["teacher"]})
        finally:
            shutil.rmtree(ws, ignore_errors=True)
    return out


def _timed(fn: Any, device: torch.device, repeats: int = 3) -> float:
    """Best seconds of `fn()` over `repeats` after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def encode_figures(device: torch.device, sizes: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rows = sizes["encode_rows"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for vocab in sizes["vocabs"]:
        teacher = make(classes=vocab, **sizes["teacher"]).to(device).eval()
        x = torch.randn(rows, 64, device=device, generator=torch.Generator(device).manual_seed(0))

        def forward(teacher: torch.nn.Module = teacher, x: torch.Tensor = x) -> torch.Tensor:
            with torch.inference_mode(), autocast:
                return teacher(x)

        t_forward = _timed(forward, device)
        logits = forward()
        encodings: dict[str, Encoding] = {"topk32": TopK(vocab, 32), "topk8_q8": TopK(vocab, 8, bits=8),
                                          "hybrid_k8_n16_q8": Hybrid(vocab, 8, 16, bits=8)}
        for name, enc in encodings.items():
            gen = torch.Generator(device).manual_seed(0)

            def encode(enc: Encoding = enc, gen: torch.Generator = gen,
                       logits: torch.Tensor = logits) -> dict[str, torch.Tensor]:
                with torch.inference_mode():
                    return enc.encode(torch.log_softmax(logits.float(), -1), gen)

            t_encode = _timed(encode, device)
            encoded = encode()
            t_host = _timed(lambda enc=enc, encoded=encoded: enc.to_host(encoded), device)
            out[f"{name}/{vocab}"] = {"encode_rows_per_s": round(rows / t_encode),
                                      "to_host_rows_per_s": round(rows / t_host),
                                      "over_forward": round(t_encode / t_forward, 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy", action="store_true", help="toy sizes, on the CPU unless --device cuda (the tests' runs)")
    ap.add_argument("--device", default=None, help="cuda (default) or, with --toy, cpu (its default)")
    ap.add_argument("--only", default="teacher,encode,kd", help="comma-separated: teacher, encode, kd")
    args = ap.parse_args()
    device = torch.device(args.device or ("cpu" if args.toy else "cuda"))
    sizes = TOY if args.toy else FULL
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no CUDA device here; run it where one is, or with --toy on the CPU")
    parts = args.only.split(",")
    common = {"device": str(device), "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
              "toy": args.toy}
    if "teacher" in parts:
        record("gpu-teacher", line("gpu_teacher", **common, encoding="topk32", rows=sizes["rows"],
                                   teacher=sizes["teacher"], vocab=teacher_figures(device, sizes), goal=0.97))
    if "encode" in parts:
        record("gpu-encode", line("gpu_encode", **common, rows=sizes["encode_rows"], teacher=sizes["teacher"],
                                  encodings=encode_figures(device, sizes)))
    if "kd" in parts:
        rows = kd_overhead.run(sizes["kd_repeats"], sizes["kd_steps"], ["lm", "classify"],
                               sizes.get("kd_vocabs", sizes["vocabs"]), device)
        record("gpu-kd_overhead", line("kd_overhead", **common, goal=kd_overhead.GOAL, steps=sizes["kd_steps"],
                                       repeats=sizes["kd_repeats"], rows=rows))


if __name__ == "__main__":
    main()
