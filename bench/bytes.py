"""Bytes per row of each encoding at 1000 classes and at a 32k vocabulary, with fidelity figures
measured against the full distribution: KL(full || cached as the student models it), probability
mass kept, and top-1 agreement.

    .venv/bin/python bench/bytes.py [--rows 20000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, lm_logits, synthetic_logits, workdir

from pipeline import cache as fmt
from pipeline import losses


def fidelity(logp_full: torch.Tensor, data: dict[str, np.ndarray], enc: fmt.Encoding) -> dict[str, float]:
    """Mean over rows of KL(p || p_cached), mass kept and top-1 agreement."""
    V = logp_full.shape[-1]
    if enc.name == "dense":
        cached = torch.log_softmax(torch.from_numpy(data["logp"]).float(), -1)
        kept = 1.0
        top1 = cached.argmax(-1)
    elif enc.name == "topk":
        ids = torch.from_numpy(data["ids"].astype(np.int64))
        cached = losses.topk_full_logp(ids, torch.from_numpy(data["logp"]).float(),
                                       torch.from_numpy(data["residual"]).float(), V)
        kept = float(logp_full.exp().gather(-1, ids).sum(-1).mean())
        top1 = ids.gather(-1, torch.from_numpy(data["logp"]).float().argmax(-1, keepdim=True)).squeeze(-1)
    else:  # sampled: unbiased, not a distribution to compare; report the loss estimate's error
        ids = torch.from_numpy(data["ids"].astype(np.int64))
        counts = torch.from_numpy(data["counts"].astype(np.float32))
        w = counts / enc.draws
        kept = float((logp_full.exp().gather(-1, ids) * (counts > 0)).sum(-1).mean())
        top1 = ids.gather(-1, counts.argmax(-1, keepdim=True)).squeeze(-1)
        q = torch.log_softmax(logp_full + torch.randn_like(logp_full), -1)  # a student near the teacher
        exact = float((logp_full.exp() * (logp_full - q)).sum(-1).mean())
        est = float((-(w * q.gather(-1, ids)).sum(-1) - torch.from_numpy(data["entropy"]).float()).mean())
        return {"kl": None, "loss_estimate_rel_error": round(abs(est - exact) / exact, 4), "mass_kept": round(kept, 4),
                "top1_agreement": round(float((top1 == logp_full.argmax(-1)).float().mean()), 4)}
    p = logp_full.exp()
    kl = float((torch.xlogy(p, p) - p * cached).sum(-1).mean())
    return {"kl": round(kl, 4), "mass_kept": round(kept, 4),
            "top1_agreement": round(float((top1 == logp_full.argmax(-1)).float().mean()), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20_000)
    args = ap.parse_args()
    ws = workdir("bytes")
    results = {}
    cases = [
        (1000, fmt.Encoding("dense", 1000, "float16"), args.rows),
        (1000, fmt.Encoding("topk", 1000, k=10), args.rows),
        (1000, fmt.Encoding("topk", 1000, k=10, bits=8), args.rows),
        (1000, fmt.Encoding("topk", 1000, k=16, bits=8), args.rows),
        (1000, fmt.Encoding("topk", 1000, k=32), args.rows),
        (32000, fmt.Encoding("topk", 32000, k=32, token_rows=True), args.rows // 4),
        (32000, fmt.Encoding("topk", 32000, k=8, token_rows=True), args.rows // 4),
        (32000, fmt.Encoding("topk", 32000, k=32, token_rows=True, bits=8), args.rows // 4),
        (32000, fmt.Encoding("sampled", 32000, draws=32, token_rows=True), args.rows // 4),
        (32000, fmt.Encoding("sampled", 32000, draws=16, token_rows=True), args.rows // 4),
    ]
    for classes, enc, rows in cases:
        label = f"{classes}:{enc.name}" + {"topk": f"-k{enc.k}" + ("-q8" if enc.bits == 8 else ""),
                                            "sampled": f"-n{enc.draws}"}.get(enc.name, f"-{enc.dtype}")
        z = synthetic_logits(rows, classes, seed=1) if classes == 1000 else lm_logits(rows, classes, seed=1)
        logp = torch.log_softmax(z, -1)
        stored = fmt.to_host(fmt.encode(logp, enc, torch.Generator().manual_seed(0)), enc)
        data = fmt.decode(stored, enc)
        stored["sample_id"] = np.arange(rows, dtype=np.int64) // (64 if enc.token_rows else 1)
        if enc.token_rows:
            stored["position"] = (np.arange(rows) % 64).astype(np.int16)
        path = ws / f"{label.replace(':', '_')}.zarr"
        fmt.write_shard(path, stored, {}, enc, 4096, 3)
        nbytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        results[label] = {"bytes_per_row": round(nbytes / rows, 2), **fidelity(logp, data, enc)}
    emit("bytes", rows=args.rows, results=results, goals={"1000_classes_bytes_per_view": 32,
                                                           "32k_sampled_bytes_per_token": 40})


if __name__ == "__main__":
    main()
