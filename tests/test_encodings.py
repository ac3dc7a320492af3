"""Every encoding: round trips through real Zarr and Parquet shards with error bounds, ids at the
vocabulary's width, the hybrid's unbiased loss, divergences against slow references, and caches
written by format 1 still reading to the same rows."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import slow_divergence

from pipeline.core.config import load_config
from pipeline.core.errors import ConfigError
from pipeline.format import reader as fmt
from pipeline.format.encodings import Dense, Hybrid, Sampled, TopK, encoding_from_config, encoding_from_spec, id_store
from pipeline.format.kl import divergence
from pipeline.format.manifest import FORMAT_VERSION, read_manifest, write_manifest
from pipeline.format.shards import shard_entry, shard_name, write_shard
from pipeline.train import losses

FIXTURES = Path(__file__).parent / "fixtures" / "format1"


def _logp(rows: int = 3000, classes: int = 1000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, classes, generator=g)
    z = z.scatter_add(1, torch.randint(0, classes, (rows, 3), generator=g), torch.full((rows, 3), 7.0))
    return torch.log_softmax(z * 1.5, -1)


def _write(d: Path, enc, backend: str, logp: torch.Tensor, chunk: int = 1024, seed: int = 0) -> Path:
    arrays = enc.to_host(enc.encode(logp, torch.Generator().manual_seed(seed)))
    arrays["sample_id"] = np.arange(len(logp), dtype=np.int64)
    write_shard(d / "shards" / shard_name(0, backend), arrays, {}, enc, chunk, 3)
    spec = {"format_version": FORMAT_VERSION, "num_classes": enc.num_classes, "encoding": enc.params(),
            "temperature": 1.0, "dataset": {"fingerprint": "t", "rows": len(logp)},
            "layout": {"backend": backend, "rows_per_shard": len(logp), "chunk_rows": chunk}}
    write_manifest(d, spec, [shard_entry(d, 0, backend, 0, len(logp))], {})
    return d


def _round_trip(tmp_path, enc, backend: str, logp: torch.Tensor, seed: int = 0) -> dict[str, np.ndarray]:
    d = _write(tmp_path / backend, enc, backend, logp, seed=seed)
    reader = fmt.CacheReader(d, verify=True)
    assert reader.encoding == enc  # rebuilt from the manifest's parameters
    return reader.read_all()


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_dense_round_trip(tmp_path, backend):
    logp = _logp()
    for dtype, tol in (("float32", 1e-6), ("float16", 2e-3)):
        out = _round_trip(tmp_path / dtype, Dense(1000, dtype), backend, logp)
        keep = logp > -10  # float16 is relative: compare where probabilities matter
        assert np.allclose(out["logp"].astype(np.float32)[keep.numpy()], logp[keep].numpy(), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("kind", ["topk", "hybrid"])
def test_head_round_trip_error_bounds(tmp_path, backend, bits, kind):
    logp = _logp()
    enc = TopK(1000, 10, bits) if kind == "topk" else Hybrid(1000, 10, 12, bits)
    out = _round_trip(tmp_path, enc, backend, logp)
    vals, ids = logp.topk(10, -1)
    # the same set of ids per row (8-bit keeps them ascending, 16-bit by probability)
    assert (np.sort(out["ids"], -1) == np.sort(ids.numpy(), -1)).all()
    got = np.take_along_axis(out["logp"].astype(np.float32), np.argsort(out["ids"], -1), -1)
    want = np.take_along_axis(vals.numpy(), np.argsort(ids.numpy(), -1), -1)
    inside = want > -enc.logp_range
    scale = enc.logp_range / 255
    bound = scale / 2 + 1e-6 if bits == 8 else 2e-3 * np.abs(want) + 1e-3
    assert (np.abs(got - want)[inside] <= (bound if bits == 8 else bound[inside])).all()
    tail = logp.double().scatter(-1, ids, float("-inf")).logsumexp(-1).exp().numpy()  # exact tail mass
    r = out["residual"].astype(np.float64)
    ok = tail > np.exp(-enc.logp_range)
    rel_bound = np.exp(scale / 2) - 1 + 1e-3 if bits == 8 else 1e-3
    abs_bound = 6e-8  # float16's subnormal spacing: tails below 6e-5 lose relative precision
    assert (np.abs(r - tail)[ok] <= rel_bound * tail[ok] + abs_bound).all()
    if kind == "hybrid":  # the tail mass is float16 at any bits: the tail estimate scales with it
        assert (np.abs(r - tail)[ok] <= 1e-3 * tail[ok] + abs_bound).all()
    if kind == "hybrid":  # tail draws: distinct ids outside the head, counts summing to `draws`
        assert (out["tail_counts"].astype(int).sum(-1) == 12).all()
        live = out["tail_counts"] > 0
        head = set(map(tuple, np.sort(ids.numpy(), -1)))
        for row_ids, row_live, h in zip(out["tail_ids"], live, np.sort(ids.numpy(), -1)):
            drawn = row_ids[row_live]
            assert len(set(drawn.tolist())) == len(drawn) and not set(drawn.tolist()) & set(h.tolist())
        assert head  # the head ids were compared above
        p_tail = logp.double().exp().scatter(-1, ids, 0.0)
        want_h = -(torch.xlogy(p_tail, p_tail)).sum(-1).numpy()
        assert np.allclose(out["tail_entropy"], want_h, rtol=2e-3, atol=1e-4)


def test_eight_bit_topk_is_smaller(tmp_path):
    """Top-10 of 1,000 classes at the default codec (shuffle-lz4hc): 8-bit takes 30% fewer bytes
    (35% at zstd, which stores the 16-bit columns less tightly)."""
    logp = _logp(8192)
    sizes = {}
    for bits in (16, 8):
        _round_trip(tmp_path / str(bits), TopK(1000, 10, bits), "zarr", logp)
        sizes[bits] = read_manifest(tmp_path / str(bits) / "zarr")["bytes_per_row"]
    assert sizes[8] < 0.75 * sizes[16]


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_sampled_round_trip_for_classes(tmp_path, backend):
    logp = _logp(2000, 300)
    enc = Sampled(300, 20)
    out = _round_trip(tmp_path, enc, backend, logp, seed=3)
    counts = out["counts"].astype(int)
    assert (counts.sum(-1) == 20).all()
    again = enc.decode(enc.to_host(enc.encode(logp, torch.Generator().manual_seed(3))))
    assert np.array_equal(again["ids"][counts > 0], out["ids"][counts > 0])  # same seed, same draws
    for row_ids, row_counts in zip(out["ids"][:50], counts[:50]):
        kept = row_ids[row_counts > 0]
        assert (np.diff(kept) > 0).all()  # distinct and ascending


@pytest.mark.parametrize("classes,store,id_bytes", [(10, "u8", 1), (256, "u8", 1), (257, "u16", 2),
                                                     (65536, "u16", 2), (65537, "u16+h1", 2.125),
                                                     (151936, "u16+h2", 2.25), (262144, "u16+h2", 2.25),
                                                     (262145, "u16+h3", 2.375)])
def test_ids_take_the_vocabularys_width(classes, store, id_bytes):
    assert id_store(classes) == store
    assert TopK(classes, 8).raw_bytes_per_row() == pytest.approx(8 * id_bytes + 9 * 2 + 2)  # + tail mean
    assert TopK(classes, 8, tail_mean=False).raw_bytes_per_row() == pytest.approx(8 * id_bytes + 9 * 2)


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_bit_packed_ids_round_trip_exactly(tmp_path, backend):
    """Random and extreme ids (0, V-1, around 2^16 and 2^17) of a 150k vocabulary survive packing."""
    V, rows = 151_936, 500
    enc = TopK(V, 6)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, size=(rows, 6))
    ids[0] = [0, 1, 65535, 65536, 131071, V - 1]
    stored = enc.to_host({"ids": torch.from_numpy(ids), "logp": torch.zeros(rows, 6).half(),
                          "residual": torch.zeros(rows).half()})
    assert stored["ids"].dtype == np.uint16 and stored["ids_hi"].shape == (rows, 2)  # 6 ids x 2 high bits
    stored["sample_id"] = np.arange(rows, dtype=np.int64)
    d = tmp_path / backend
    write_shard(d / "shards" / shard_name(0, backend), stored, {}, enc, 128, 3)
    spec = {"format_version": FORMAT_VERSION, "num_classes": V, "encoding": enc.params(), "temperature": 1.0,
            "dataset": {"fingerprint": "t", "rows": rows},
            "layout": {"backend": backend, "rows_per_shard": rows, "chunk_rows": 128}}
    write_manifest(d, spec, [shard_entry(d, 0, backend, 0, rows)], {})
    assert np.array_equal(fmt.CacheReader(d).read_all()["ids"], ids)


def test_256k_vocabulary_teacher_end_to_end_through_shards(tmp_path):
    """A generated 262,144-token output layer: top-k, sampled and hybrid keep every id exactly at 18 bits."""
    V = 262_144
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, V))
    with torch.no_grad():
        logp = torch.log_softmax(teacher(torch.randn(96, 16)) * 4, -1)  # (96, 262144)
    for enc in (TopK(V, 16), TopK(V, 16, bits=8), Sampled(V, 24), Hybrid(V, 8, 16, bits=8)):
        out = _round_trip(tmp_path / enc.label(), enc, "zarr", logp, seed=1)
        assert enc.ids == "u16+h2"
        if isinstance(enc, (TopK, Hybrid)):
            _, ids = logp.topk(enc.k, -1)
            assert (np.sort(out["ids"], -1) == np.sort(ids.numpy(), -1)).all()
        drawn = out.get("tail_ids", out.get("ids"))
        assert drawn.max() < V and (drawn >= 0).all()
        if not isinstance(enc, TopK):  # drawn ids are real draws: positive teacher probability, high ids too
            live = out["counts" if isinstance(enc, Sampled) else "tail_counts"] > 0
            p = logp.exp().gather(-1, torch.from_numpy(np.where(live, drawn, 0))).numpy()
            assert (p[live] > 0).all() and drawn[live].max() > 2**17


def test_format_1_caches_still_read_to_the_same_rows():
    """Caches written by format 1 (uint16/int32 ids, zero-padded sampled ids) decode unchanged."""
    expected = np.load(FIXTURES / "decoded.npz")
    names = sorted({k.split("/")[0] for k in expected.files})
    assert len(names) == 8
    for name in names:
        reader = fmt.CacheReader(FIXTURES / name, verify=True)
        assert reader.manifest["format_version"] == 1
        got = reader.read_all()
        for key in [k for k in expected.files if k.startswith(name + "/")]:
            col = key.split("/")[1]
            want = expected[key]
            assert np.array_equal(got[col], want.astype(got[col].dtype)), key
            assert np.allclose(got[col].astype(np.float64), want.astype(np.float64)), key


def test_format_2_caches_read_at_their_own_temperature_and_refuse_others_saying_how_to_rebuild():
    """Caches written by format 2 (tests/fixtures/format2/make.py at 3e5839d: no tail mean, draws
    without log-probs) decode unchanged; top-k re-tempers under the uniform-tail model as format 2
    did; sampled and hybrid serve their own temperature and refuse another in one line."""
    import pipeline as lc
    from pipeline.format.kl import retemper_topk

    root = FIXTURES.parent / "format2"
    expected = np.load(root / "decoded.npz")
    for name in sorted({k.split("/")[0] for k in expected.files}):
        reader = fmt.CacheReader(root / name, verify=True)
        assert reader.manifest["format_version"] == 2
        got = reader.read_all()
        for key in [k for k in expected.files if k.startswith(name + "/")]:
            assert np.array_equal(got[key.split("/")[1]], expected[key]), key
        cache = lc.open_cache(root / name)
        batch = next(iter(cache.dataset(batch_size=40, shuffle=False)))
        assert torch.isfinite(lc.kd_loss(torch.zeros(40, 300), batch, 1.0))
        if name.startswith("topk"):
            t = next(iter(cache.dataset(batch_size=40, shuffle=False, temperature=2.0)))["targets"]
            want = retemper_topk(batch["logp"], batch["residual"], 300, 2.0)  # the uniform tail
            assert torch.equal(t["logp"], want[0]) and torch.equal(t["residual"], want[1])
        else:
            with pytest.raises(ValueError, match=r"format 2\) holds draws .* without their log-probs and cannot be "
                                                 r"re-tempered; .* rebuild it with this logitcache"):
                cache.dataset(batch_size=8, temperature=2.0)


def test_params_round_trip_through_the_spec():
    for enc in (Dense(10, "float32"), TopK(70_000, 5, 8, 12.0), Sampled(300, 40), Hybrid(151_936, 8, 24, 16),
                TopK(300, 5, tail_mean=False), Sampled(300, 40, draw_logp=False), Hybrid(300, 4, 8, draw_logp=False)):
        spec = {"format_version": FORMAT_VERSION, "num_classes": enc.num_classes, "encoding": enc.params()}
        assert encoding_from_spec(spec) == enc


CONFIG_ENCODINGS = [["cache.encoding=dense", "cache.dtype=float32"], ["cache.encoding=topk", "cache.k=3"],
                    ["cache.encoding=topk", "cache.k=4", "cache.bits=8", "cache.logp_range=12"],
                    ["cache.encoding=sampled", "cache.draws=9"],
                    ["cache.encoding=hybrid", "cache.k=2", "cache.draws=5", "cache.bits=8"]]


@pytest.mark.parametrize("overrides", CONFIG_ENCODINGS, ids=[" ".join(o) for o in CONFIG_ENCODINGS])
def test_one_construction_path(overrides):
    """Config, stored parameters, a writer's name or dict, and an object all give the same encoding,
    which encodes a fixed input to the same bytes."""
    from pipeline.format.encodings import encoding_from_params
    from pipeline.format.writer import _encoding_arg

    enc = encoding_from_config(load_config(None, overrides).cache, 10)
    rebuilt = encoding_from_params(enc.params(), 10)
    user = {k: v for k, v in enc.params().items() if k != "ids"}  # as a user writes it: ids take their default
    assert rebuilt == enc == _encoding_arg(user, 10) == _encoding_arg(enc, 10)
    logp = torch.log_softmax(torch.randn(6, 10, generator=torch.Generator().manual_seed(0)), -1)
    a = enc.to_host(enc.encode(logp, torch.Generator().manual_seed(1)))
    b = rebuilt.to_host(rebuilt.encode(logp, torch.Generator().manual_seed(1)))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    if enc.name == "dense":
        assert _encoding_arg("dense", 10) == Dense(10)


@pytest.mark.parametrize("given,message", [
    ("topK", "encoding name: 'topK' is not one of dense, topk, sampled, hybrid"),
    ({"name": "topk", "k": 4, "width": 2}, "encoding width: not a parameter of topk; give bits, ids, k, logp_range"),
    ({"name": "topk"}, "encoding k: topk needs it"),
    ({"name": "topk", "k": 11}, "encoding k: 11 but the data has 10 classes; use k <= 10"),
    ({"name": "topk", "k": 4, "bits": 12}, "encoding bits: 12 is not 16 or 8"),
    ({"name": "sampled", "draws": 300}, "encoding draws: 300 must be in 1..255"),
    ({"name": "hybrid", "k": 10, "draws": 4}, "hybrid needs a tail to sample"),
])
def test_writer_refuses_bad_encodings(given, message):
    from pipeline.format.writer import _encoding_arg

    with pytest.raises(ValueError) as e:
        _encoding_arg(given, 10)
    assert message in str(e.value)


def test_config_refuses_settings_that_do_not_apply(tmp_path):
    cfg = load_config(None, ["cache.encoding=topk", "cache.k=11"])
    with pytest.raises(ConfigError, match="cache.k: 11 but the data has 10 classes"):
        encoding_from_config(cfg.cache, 10)
    with pytest.raises(ConfigError, match="hybrid needs a tail"):
        encoding_from_config(load_config(None, ["cache.encoding=hybrid", "cache.k=10"]).cache, 10)
    with pytest.raises(ConfigError, match="dense_max_classes"):
        encoding_from_config(load_config(None, ["cache.encoding=dense"]).cache, 5000)
    assert encoding_from_config(load_config(None, ["cache.encoding=hybrid", "cache.k=4", "cache.draws=9"]).cache,
                                10) == Hybrid(10, 4, 9)


# ---------------------------------------------------------------------------------------------
# Losses through the encodings


def _kl_estimates(enc, logp: torch.Tensor, logq: torch.Tensor, n: int) -> np.ndarray:
    """Mean-over-rows forward KL estimates from `n` independently drawn caches."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        t = enc.targets(enc.decode(enc.to_host(enc.encode(logp, g))), "cpu")
        out.append(float(enc.divergence(logq, t, "forward", "uniform").mean()))
    return np.array(out)


def _peaked(rows: int, classes: int, seed: int) -> torch.Tensor:
    """Three likely classes holding about 2/3 of the mass, a long tail: where top-k alone is biased."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, classes, generator=g)
    hot = torch.randint(0, classes, (rows, 3), generator=g)
    return torch.log_softmax(z.scatter_add(1, hot, torch.full((rows, 3), 6.0)), -1)


def test_hybrid_kl_is_unbiased_and_less_noisy_than_sampled_at_equal_bytes(tmp_path):
    big = _peaked(2048, 500, seed=2)
    hybrid = Hybrid(500, 4, 12)
    bytes_h = read_manifest(_write(tmp_path / "h", hybrid, "zarr", big))["bytes_per_row"]
    for draws in (24, 32, 40, 48, 64, 96):  # the smallest sampled cache at least as large as the hybrid
        sampled = Sampled(500, draws)
        if read_manifest(_write(tmp_path / f"s{draws}", sampled, "zarr", big))["bytes_per_row"] >= bytes_h:
            break
    logp = big[:64]
    logq = torch.log_softmax(logp + torch.randn(logp.shape, generator=torch.Generator().manual_seed(3)), -1)
    exact = float(divergence(logp.double(), logq.double(), "forward").mean())
    est_h = _kl_estimates(hybrid, logp, logq, 300)
    est_s = _kl_estimates(sampled, logp, logq, 300)
    for est in (est_h, est_s):
        # unbiased: the mean over many caches is the full KL within sampling error (+ float16 entropy)
        assert abs(est.mean() - exact) < 4 * est.std(ddof=1) / math.sqrt(len(est)) + 2e-3 * exact
    assert est_h.var() < 0.5 * est_s.var(), (sampled.label(), est_h.var(), est_s.var())


def test_hybrid_gradient_equals_the_full_kl_gradient_in_expectation():
    logp = _logp(8, 60, seed=4)
    student = torch.randn(8, 60, generator=torch.Generator().manual_seed(5), requires_grad=True)
    full = divergence(logp, torch.log_softmax(student, -1), "forward").sum()
    (g_full,) = torch.autograd.grad(full, student)
    enc, gen = Hybrid(60, 3, 20), torch.Generator().manual_seed(6)
    total = torch.zeros_like(student)
    for _ in range(400):
        t = enc.targets(enc.decode(enc.to_host(enc.encode(logp, gen))), "cpu")
        (g,) = torch.autograd.grad(enc.divergence(torch.log_softmax(student, -1), t, "forward", "").sum(), student)
        total += g
    assert torch.allclose(total / 400, g_full, atol=0.02)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("name", ["topk", "hybrid"])
def test_bucket_tail_divergences_against_a_slow_reference(kind, name):
    """tail=bucket: the classes outside the head are one outcome, for every divergence."""
    g = torch.Generator().manual_seed(1)
    z, s = torch.randn(5, 40, generator=g) * 2.5, torch.randn(5, 40, generator=g)
    T, k = 2.0, 6
    logp = torch.log_softmax(z / T, -1)
    enc = TopK(40, k) if name == "topk" else Hybrid(40, k, 8)
    t = enc.targets(enc.decode(enc.to_host(enc.encode(logp, torch.Generator().manual_seed(0)))), "cpu")
    q = torch.softmax(s.double() / T, -1)
    p_b, q_b = [], []
    for prow, qrow, irow in zip(logp.double().exp(), q, t["ids"]):
        head = set(irow.tolist())
        rest = [i for i in range(40) if i not in head]
        p_b.append([float(prow[i]) for i in irow] + [float(prow[rest].sum())])
        q_b.append([float(qrow[i]) for i in irow] + [float(qrow[rest].sum())])
    st = {"alpha": 0.0, "temperature": T, "divergence": kind, "tail": "bucket"}
    got = losses.row_losses(s, t, None, st, enc) / 5
    if name == "hybrid" and kind == "forward":  # forward uses the sampled tail, not the bucket
        return
    assert float(got) == pytest.approx(T**2 * slow_divergence(p_b, q_b, kind), rel=2e-3)


def test_sampled_refuses_divergences_it_cannot_estimate():
    enc = Sampled(40, 8)
    logp = torch.log_softmax(torch.randn(3, 40), -1)
    t = enc.targets(enc.decode(enc.to_host(enc.encode(logp))), "cpu")
    with pytest.raises(ConfigError, match="student.divergence: reverse .* forward only"):
        enc.divergence(logp, t, "reverse", "uniform")
    old = Sampled(40, 8, draw_logp=False)  # format 2: draws without their log-probs
    with pytest.raises(ConfigError, match="cannot be re-tempered.*rebuild it"):
        old.targets(old.decode(old.to_host(old.encode(logp))), "cpu", tau=2.0)


def _allocated_peak(events: list[dict]) -> int:
    """Peak bytes allocated over a profile's memory events, above the running total before the
    first (the total carries over from earlier profiles in the process)."""
    memory = [e["args"] for e in events if e.get("name") == "[memory]"]
    return max(m["Total Allocated"] for m in memory) - (memory[0]["Total Allocated"] - memory[0]["Bytes"])


@pytest.mark.parametrize("bits", [16, 8])
def test_topk_encoding_of_a_large_vocabulary_adds_no_full_size_temporaries(bits):
    """Top-8 of 512 token rows over a 32k vocabulary (logp: 64 MB): the residual mass outside the
    head is exactly the slow way's (scatter -inf, logsumexp, exp over whole rows), and the tail's
    mean log-prob equal to it to float16, while the
    tensors the encoder allocates beside logp stay under 10 MB. Computed on the whole (B, C) at
    once, the residual alone took two more 64 MB tensors. Blocks never hold a single row of several
    (torch sums a lone long row in another order): 17 rows at 128k (blocks of 8, 9) give the slow way's bits too."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    n, V, k = 512, 32_000, 8
    logp = torch.log_softmax(torch.randn(n, V, generator=torch.Generator().manual_seed(0)) * 3, -1)
    enc = TopK(V, k, bits=bits)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = enc.encode(logp)
    with tempfile.TemporaryDirectory() as d:
        prof.export_chrome_trace(f"{d}/trace.json")
        events = json.loads(Path(f"{d}/trace.json").read_text())["traceEvents"]
    peak = _allocated_peak(events)
    assert peak < 10 << 20, peak

    vals, ids = logp.topk(k, -1)
    slow = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1).exp()
    wide = torch.log_softmax(torch.randn(17, 131_072, generator=torch.Generator().manual_seed(1)) * 3, -1)
    wide_ids = wide.topk(k, -1)[1]
    from pipeline.format.encodings.base import tail_summary
    assert torch.equal(tail_summary(wide, wide_ids)[0],
                       torch.logsumexp(wide.scatter(-1, wide_ids, float("-inf")), dim=-1).exp())
    assert tail_summary(wide[:0], wide_ids[:0])[0].shape == (0,)
    tail = logp.scatter(-1, ids, float("-inf"))
    slow_mean = (tail.exp() * tail.nan_to_num(neginf=0.0)).sum(-1) / slow  # sum p log p / R
    torch.testing.assert_close(out["tail_mean_logp"].float(), slow_mean, rtol=1e-3, atol=0)
    if bits == 16:
        assert torch.equal(out["residual"], slow.half())
    else:
        from pipeline.format.encodings.base import quantize as _quantize
        assert torch.equal(out["residual"], _quantize(-slow.clamp(min=1e-30).log(), enc.logp_range))


@pytest.mark.parametrize("name", ["sampled", "hybrid"])
def test_drawing_encodings_go_by_row_blocks_with_the_same_draws(name):
    """Sampled and hybrid encode 257 rows of a 32k vocabulary (logp: 32 MB) in row blocks: the
    tensors they allocate beside logp stay under 40 MB (over whole rows, with their probabilities,
    masked tail, uniform fallback and entropy terms: 62 and 94 MB), and the stored columns are those of the
    whole tensor encoded at once, draws included, bit for bit (257 rows: blocks of 32, the last 33)."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    n, V = 257, 32_000
    logp = torch.log_softmax(torch.randn(n, V, generator=torch.Generator().manual_seed(0)) * 3, -1)
    enc = Sampled(V, 24) if name == "sampled" else Hybrid(V, 8, 16, 8)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = enc.encode(logp, torch.Generator().manual_seed(5))
    with tempfile.TemporaryDirectory() as d:
        prof.export_chrome_trace(f"{d}/trace.json")
        events = json.loads(Path(f"{d}/trace.json").read_text())["traceEvents"]
    peak = _allocated_peak(events)
    assert peak < 40 << 20, peak
    whole = enc._encode_rows(logp, torch.Generator().manual_seed(5))
    assert out.keys() == whole.keys()
    for k in out:
        assert torch.equal(out[k], whole[k]), k
