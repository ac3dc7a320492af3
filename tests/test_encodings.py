"""Round trips of every encoding, with error bounds, through real Zarr and Parquet shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import cache as fmt


def _logp(rows: int = 3000, classes: int = 1000) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(rows, classes, generator=g)
    z = z.scatter_add(1, torch.randint(0, classes, (rows, 3), generator=g), torch.full((rows, 3), 7.0))
    return torch.log_softmax(z * 1.5, -1)


def _round_trip(tmp_path, enc: fmt.Encoding, backend: str, logp: torch.Tensor) -> dict[str, np.ndarray]:
    arrays = fmt.to_host(fmt.encode(logp, enc), enc)
    arrays["sample_id"] = np.arange(len(logp), dtype=np.int64)
    d = tmp_path / backend
    fmt.write_shard(d / "shards" / fmt.shard_name(0, backend), arrays, {}, enc, 1024, 3)
    spec = {"format_version": fmt.FORMAT_VERSION, "num_classes": enc.num_classes, "encoding": enc.describe(),
            "temperature": 1.0, "dataset": {"fingerprint": "t", "rows": len(logp)},
            "layout": {"backend": backend, "rows_per_shard": len(logp), "chunk_rows": 1024}}
    fmt.write_manifest(d, spec, [fmt.shard_entry(d, 0, backend, 0, len(logp))], {})
    return fmt.CacheReader(d, verify=True).read_all()


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_dense_round_trip(tmp_path, backend):
    logp = _logp()
    for dtype, tol in (("float32", 1e-6), ("float16", 2e-3)):
        out = _round_trip(tmp_path / dtype, fmt.Encoding("dense", 1000, dtype), backend, logp)
        keep = logp > -10  # float16 is relative: compare where probabilities matter
        assert np.allclose(out["logp"].astype(np.float32)[keep.numpy()], logp[keep].numpy(), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
@pytest.mark.parametrize("bits", [16, 8])
def test_topk_round_trip_error_bounds(tmp_path, backend, bits):
    logp = _logp()
    enc = fmt.Encoding("topk", 1000, k=10, bits=bits)
    out = _round_trip(tmp_path, enc, backend, logp)
    vals, ids = logp.topk(10, -1)
    # the same set of ids per row (8-bit keeps them ascending, 16-bit by probability)
    assert (np.sort(out["ids"].astype(np.int64), -1) == np.sort(ids.numpy(), -1)).all()
    got = np.take_along_axis(out["logp"].astype(np.float32), np.argsort(out["ids"], -1), -1)
    want = np.take_along_axis(vals.numpy(), np.argsort(ids.numpy(), -1), -1)
    inside = want > -enc.logp_range
    bound = enc.scale / 2 + 1e-6 if bits == 8 else 2e-3 * np.abs(want) + 1e-3
    assert (np.abs(got - want)[inside] <= (bound if bits == 8 else bound[inside])).all()
    tail = logp.double().scatter(-1, ids, float("-inf")).logsumexp(-1).exp().numpy()  # exact tail mass
    r = out["residual"].astype(np.float64)
    ok = tail > np.exp(-enc.logp_range)
    rel_bound = np.exp(enc.scale / 2) - 1 + 1e-3 if bits == 8 else 1e-3
    abs_bound = 6e-8  # float16's subnormal spacing: tails below 6e-5 lose relative precision
    assert (np.abs(r - tail)[ok] <= rel_bound * tail[ok] + abs_bound).all()


def test_eight_bit_topk_is_smaller(tmp_path):
    logp = _logp(8192)
    sizes = {}
    for bits in (16, 8):
        enc = fmt.Encoding("topk", 1000, k=10, bits=bits)
        _round_trip(tmp_path / str(bits), enc, "zarr", logp)
        sizes[bits] = fmt.read_manifest(tmp_path / str(bits) / "zarr")["bytes_per_row"]
    assert sizes[8] < 0.7 * sizes[16]


def test_sampled_round_trip(tmp_path):
    logp = _logp(2000, 300)
    enc = fmt.Encoding("sampled", 300, draws=20, token_rows=True)
    arrays = fmt.to_host(fmt.encode(logp, enc, torch.Generator().manual_seed(3)), enc)
    arrays["position"] = np.zeros(2000, np.int16)
    arrays["sample_id"] = np.arange(2000, dtype=np.int64)
    fmt.write_shard(tmp_path / "s.parquet", arrays, {}, enc, 500, 3)
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "s.parquet")
    counts = np.asarray(table.column("counts").to_pylist())
    assert (counts.sum(-1) == 20).all()
    assert np.array_equal(np.asarray(table.column("ids").to_pylist()), arrays["ids"])
