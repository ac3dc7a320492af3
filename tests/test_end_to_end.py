"""The whole pipeline through the CLI: run, make-like reruns, report, cache listing, user data."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import tiny_config, write_config


def test_run_all_stages_then_rerun_does_nothing(cli_run, tmp_path):
    cfg = tiny_config(tmp_path, student={"epochs": 3, "batch_size": 100, "baseline": True,
                                         "models": [{"name": "s", "arch": "mlp", "hidden": [16]}]})
    path = write_config(tmp_path / "c.yaml", cfg)
    first = cli_run("run", str(path))
    run = tmp_path / "runs" / "t"
    report = json.loads((run / "report.json").read_text())
    roles = [(r["model"], r["role"]) for r in report["rows"]]
    assert roles == [("a", "teacher"), ("b", "teacher"), ("ensemble", "ensemble"),
                     ("s-kd-s0", "distilled"), ("s-hard-s0", "hard-label")]
    ens = report["rows"][2]
    assert ens["agreement"] == 1.0 and ens["accuracy"] > 0.85
    for r in report["rows"]:
        assert 0 <= r["ece"] <= 1 and r["nll"] > 0
    assert report["cache"]["rows"] == 1348 and report["cache"]["bytes_per_row"] > 0
    for name in ("report.md", "learning_curves.png", "reliability.png", "config.yaml"):
        assert (run / name).stat().st_size > 0
    assert (run / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "s-kd-s0" in first.output and "ensemble" in first.output  # the printed table

    second = cli_run("run", str(path))
    assert "teachers: all 2 ready, nothing to do" in second.output
    assert "complete (1348 rows), nothing to do" in second.output
    assert "s-kd-s0: up to date" in second.output
    assert "report up to date" in second.output

    # changing a student setting retrains the students only
    third = cli_run("run", str(path), "student.alpha=0.5")
    assert "nothing to do" in third.output and "s-kd-s0: trained" in third.output
    assert "s-hard-s0: up to date" in third.output  # alpha does not affect the hard-label twin

    listing = cli_run("caches", "ls", "--root", str(tmp_path / "caches")).output
    cache_id = report["cache"]["cache_id"]
    assert cache_id in listing and "complete" in listing and "dense-float16" in listing and "t" in listing
    manifest = json.loads(cli_run("caches", "inspect", cache_id[:6], "--root", str(tmp_path / "caches"),
                                  "--verify").output)
    assert manifest["status"] == "complete" and manifest["verified"] is True and manifest["rows"] == 1348


def test_user_npz_and_parquet_data(cli_run, tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 6)) * 3
    y = rng.integers(0, 4, size=600)
    x = (centers[y] + rng.normal(size=(600, 6))).astype(np.float32)
    np.savez(tmp_path / "blobs.npz", x=x[:500], y=y[:500], x_test=x[500:], y_test=y[500:])
    table = pa.table({"features": pa.array(x[:500].tolist()), "label": y[:500]})
    pq.write_table(table, tmp_path / "blobs.parquet")
    test = pa.table({**{f"f{i}": x[500:, i] for i in range(6)}, "label": y[500:]})
    pq.write_table(test, tmp_path / "blobs_test.parquet")
    student = {"epochs": 5, "batch_size": 50, "models": [{"name": "s", "arch": "mlp", "hidden": [8]}]}
    for data in ({"source": str(tmp_path / "blobs.npz")},
                 {"source": str(tmp_path / "blobs.parquet"), "test_source": str(tmp_path / "blobs_test.parquet")}):
        cfg = tiny_config(tmp_path, data=data, student=student, cache={"encoding": "topk", "k": 2, "bits": 8})
        cli_run("run", str(write_config(tmp_path / "c.yaml", cfg)))
        report = json.loads((tmp_path / "runs" / "t" / "report.json").read_text())
        assert report["num_classes"] == 4 and report["test_rows"] == 100
        assert report["cache"]["encoding"]["name"] == "topk"
        assert all(r["accuracy"] > 0.8 for r in report["rows"])


def test_transfer_set_without_a_class_still_teaches_it(cli_run, tmp_path):
    """Hinton et al.'s omitted-class experiment: no 3s in the transfer set, yet the distilled
    student recognizes some 3s from the soft targets, while the hard-label twin cannot."""
    cfg = tiny_config(tmp_path, data={"source": "digits", "transfer": {"exclude_classes": [3]}},
                      teachers={**tiny_config(tmp_path)["teachers"], "epochs": 20},
                      student={"epochs": 30, "batch_size": 64, "baseline": True, "alpha": 0.0, "lr": 0.01,
                               "models": [{"name": "s", "arch": "mlp", "hidden": [64]}]})
    path = write_config(tmp_path / "c.yaml", cfg)
    cli_run("run", str(path))
    import torch

    from pipeline.core.config import load_config
    from pipeline.inputs.splits import load_splits
    from pipeline.models.builders import build_model, load_state

    c = load_config(path)
    splits = load_splits(c)
    assert 3 not in set(splits.transfer.y.tolist())
    threes = splits.test.x[splits.test.y == 3]
    recall = {}
    for kind in ("kd", "hard"):
        model = build_model(c.student.models[0], splits.input_shape, 10, "s")
        load_state(model, tmp_path / "runs" / "t" / "students" / f"s-{kind}-s0" / "model.pt", "s")
        with torch.no_grad():
            recall[kind] = float((model.eval()(torch.from_numpy(threes)).argmax(-1) == 3).float().mean())
    assert recall["hard"] == 0.0
    assert recall["kd"] > 0.3, recall
