"""`caches fidelity`: teachers re-run on sampled rows, compared with what the cache holds."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config, write_config


def test_fidelity_of_exact_and_topk_caches(cli_run, tmp_path):
    path = str(write_config(tmp_path / "c.yaml", tiny_config(tmp_path)))
    cli_run("teachers", path)
    root = str(tmp_path / "caches")
    cli_run("cache", path, "cache.dtype=float32")
    dense_id = next((tmp_path / "caches").iterdir()).name
    out = cli_run("caches", "fidelity", dense_id, "--root", root, "--rows", "500").output
    assert "this cache" in out and "topk-k4-q8" in out
    dense = json.loads((tmp_path / "fidelity" / dense_id / "fidelity.json").read_text())
    assert dense["rows"] >= 500
    assert dense["cache"]["kl"] == pytest.approx(0.0, abs=1e-5)  # float32 dense: exact
    assert dense["cache"]["mass_kept"] == 1.0 and dense["cache"]["top1_agreement"] == 1.0
    assert abs(dense["cache"]["loss_bias"]) < 1e-4
    kls = [s["kl"] for s in dense["sweep"] if s.get("bits") == 16]
    assert kls == sorted(kls, reverse=True) and kls[0] > 10 * kls[-1]  # more k, closer to the teacher
    assert (tmp_path / "fidelity" / dense_id / "fidelity.png").read_bytes()[:4] == b"\x89PNG"
    sweep = {s["encoding"]: s for s in dense["sweep"]}
    # an exact head with a sampled tail: more mass seen, less loss bias than the same head alone
    assert sweep["hybrid-k4-n16"]["mass_kept"] > sweep["topk-k4"]["mass_kept"]
    assert abs(sweep["hybrid-k4-n16"]["loss_bias"]) < abs(sweep["topk-k4"]["loss_bias"])
    assert sweep["hybrid-k4-n16"]["kl"] is None and sweep["sampled-n16"]["kl"] is None

    cli_run("cache", path, "cache.encoding=topk", "cache.k=4")
    topk_id = next(d.name for d in (tmp_path / "caches").iterdir() if d.name != dense_id)
    cli_run("caches", "fidelity", topk_id, "--root", root, "--rows", "500")
    topk = json.loads((tmp_path / "fidelity" / topk_id / "fidelity.json").read_text())
    same = next(s for s in topk["sweep"] if s["encoding"] == "topk-k4")
    for key in ("kl", "mass_kept", "top1_agreement"):  # the cache measures like its own encoding
        assert topk["cache"][key] == pytest.approx(same[key], abs=2e-3)
    assert 0 < topk["cache"]["kl"] and topk["cache"]["mass_kept"] < 1


def test_fidelity_refuses_a_cache_whose_teachers_changed(cli_run, tmp_path):
    path = str(write_config(tmp_path / "c.yaml", tiny_config(tmp_path)))
    cli_run("teachers", path)
    cli_run("cache", path)
    cache_id = next((tmp_path / "caches").iterdir()).name
    for ckpt in (tmp_path / "teachers").rglob("model.pt"):
        ckpt.write_bytes(ckpt.read_bytes()[:-1] + b"x")  # a retrained or edited teacher
    result = cli_run("caches", "fidelity", cache_id, "--root", str(tmp_path / "caches"), expect=1)
    assert "no saved config reproduces this cache" in result.output


def test_fidelity_a_few_rows_at_a_time_equals_all_rows_at_once(cli_run, tmp_path):
    from pipeline.tools.fidelity import fidelity

    path = str(write_config(tmp_path / "c.yaml", tiny_config(tmp_path)))
    cli_run("teachers", path)
    cli_run("cache", path, "cache.encoding=topk", "cache.k=4")
    cache_id = next((tmp_path / "caches").iterdir()).name
    # 100 rows of full log-probs at a time: fewer than the rows sampled, and not a multiple of the
    # 256-row measuring block, so blocks straddle the teacher batches
    few = fidelity(cache_id, tmp_path / "caches", 500, tmp_path / "few", logit_rows=100)
    whole = fidelity(cache_id, tmp_path / "caches", 500, tmp_path / "whole", logit_rows=10**6)
    assert few["rows"] == whole["rows"] > 256
    assert few == whole
