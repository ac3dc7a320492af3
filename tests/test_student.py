"""Students: killed and resumed equals uninterrupted; many students from one cache; refusals."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, TESTS, tiny_config, write_config

from pipeline.core.config import load_config
from pipeline.core.errors import CacheError, ConfigError, ModelError
from pipeline.format import manifest as fmt
from pipeline.run import identity as spec
from stages import cache as cache_stage
from stages import student as student_stage
from stages import teachers as teacher_stage


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    cfg = tiny_config(ws, student={"epochs": 25, "batch_size": 100, "baseline": True, "checkpoint_every": 1,
                                   "models": [{"name": "s", "arch": "mlp", "hidden": [16], "dropout": 0.1}]},
                      cache={"encoding": "topk", "k": 3, "rows_per_shard": 400, "chunk_rows": 128})
    path = write_config(ws / "c.yaml", cfg)
    c = load_config(path)
    teacher_stage.main(c)
    cache_stage.main(c)
    return ws, path


def _student_process(path, run_name):
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    return subprocess.Popen([sys.executable, "-m", "pipeline", "student", str(path), f"run_name={run_name}",
                             "student.baseline=false"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _losses(ws, run_name):
    return json.loads((ws / "runs" / run_name / "students" / "s-kd-s0" / "history.json").read_text())["losses"]


def test_killed_student_resumes_with_identical_losses(built):
    ws, path = built
    full = _student_process(path, "straight")
    assert full.wait(timeout=300) == 0, full.stderr.read()
    reference = _losses(ws, "straight")
    assert len(reference) == 25 * 14

    rng = random.Random(7)
    ckpt = ws / "runs" / "killed" / "students" / "s-kd-s0" / "checkpoint.pt"
    kills = 0
    for _ in range(3):  # several kills at random moments, then finish
        p = _student_process(path, "killed")
        deadline = time.time() + 120
        while not ckpt.exists() and p.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
    assert kills >= 1
    done = _student_process(path, "killed")
    _out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    assert "resuming at epoch" in err or kills == 0
    assert _losses(ws, "killed") == reference
    assert not ckpt.exists()


def test_many_students_from_one_cache_without_teachers(built, tmp_path, capsys):
    ws, path = built
    cfg = load_config(path, [f"workspace={ws}", "run_name=many", "student.epochs=8", "student.lr=0.01",
                             "student.models=[{name: x, hidden: [8]}, {name: y, hidden: [32, 16]}]",
                             "student.seeds=[0, 1]"])
    cache_dir = spec.cache_dir(cfg)
    moved = tmp_path / "teachers"
    shutil.move(str(ws / "teachers"), moved)  # teachers are gone: students must not need them
    try:
        results = student_stage.main(load_config(path, ["run_name=many", "student.epochs=8", "student.lr=0.01", f"student.cache={cache_dir}",
                                                        "student.models=[{name: x, hidden: [8]}, {name: y, hidden: [32, 16]}]",
                                                        "student.seeds=[0, 1]"]))
    finally:
        shutil.move(str(moved), ws / "teachers")
    assert sorted(r.job for r in results) == sorted(
        f"{m}-{k}-s{s}" for m in "xy" for k in ("kd", "hard") for s in (0, 1))
    assert all(r.final_accuracy > 0.7 for r in results)
    # kd and hard-label twins see the same batches; kd differs only through the soft targets
    kd = json.loads((ws / "runs/many/students/x-kd-s0/history.json").read_text())
    hard = json.loads((ws / "runs/many/students/x-hard-s0/history.json").read_text())
    assert kd["settings"]["alpha"] == 0.1 and hard["settings"]["alpha"] == 1.0
    assert kd["losses"] != hard["losses"]


def test_student_refuses_a_cache_made_for_other_data(built, tmp_path):
    _ws, path = built
    cache_dir = spec.cache_dir(load_config(path))
    other = load_config(path, ["data.test_fraction=0.3", f"student.cache={cache_dir}"])
    with pytest.raises(CacheError, match="cache was made for dataset .* but this config's transfer set"):
        student_stage.main(other)


def test_student_with_wrong_class_count_is_refused(built):
    _ws, path = built
    cfg = load_config(path, ["student.models=[{name: u, arch: import, factory: 'userzoo:mlp', kwargs: {classes: 7}}]"])
    with pytest.raises(ModelError, match=r"student.models.0 \(u\): output width \(7,\) but the data has 10 classes"):
        student_stage.main(cfg)


@pytest.mark.parametrize("over", [["cache.encoding=sampled", "cache.draws=16"],
                                  ["cache.encoding=hybrid", "cache.k=2", "cache.draws=8", "cache.bits=8"]])
def test_students_learn_from_sampled_and_hybrid_class_caches(built, over):
    """Draw-based targets work for classification too, and train as well as the exact top-k cache."""
    _, path = built
    name = over[0].split("=")[1]
    common = ["student.baseline=false", "student.alpha=0"]
    cfg = load_config(path, [f"run_name={name}", *common, *over])
    d = cache_stage.main(cfg)
    assert fmt.read_manifest(d)["spec"]["encoding"]["name"] == name
    (drawn,) = student_stage.main(cfg)
    (exact,) = student_stage.main(load_config(path, ["run_name=exact-topk", *common]))
    assert drawn.final_accuracy > 0.8 and drawn.final_accuracy > exact.final_accuracy - 0.05
    old = load_config(path, [f"run_name={name}-T", *common, *over, "cache.draw_logp=false", "student.temperature=5"])
    cache_stage.main(old)  # draws without their log-probs, as format 2 stored them
    with pytest.raises(ConfigError, match="without their log-probs .* cannot be re-tempered; .* rebuild the cache"):
        student_stage.main(old)


# a mean_logprobs ensemble tempered to T is its cache at another temperature re-tempered, exactly
AT_T2 = ["teachers.ensemble=mean_logprobs", "student.baseline=false", "student.alpha=0", "student.epochs=4",
         "student.temperature=2"]


@pytest.mark.parametrize("over,rel", [(["cache.encoding=dense"], 2e-3), (["cache.encoding=topk", "cache.k=3"], 0.04),
                                      (["cache.encoding=topk", "cache.k=3", "cache.bits=8"], 0.04),
                                      (["cache.encoding=sampled", "cache.draws=64"], 0.2),
                                      (["cache.encoding=hybrid", "cache.k=2", "cache.draws=16"], 0.1)],
                         ids=["dense", "topk", "topk-8bit", "sampled", "hybrid"])
def test_a_student_at_T2_trains_from_a_cache_written_at_T1_in_every_encoding(built, over, rel):
    """student.temperature=2 from a cache written at teachers.temperature=1, against the same
    student (same initial weights, same first batch) from the same encoding written at T = 2: the
    first step's loss is the same to float16 for dense, within the tail model's error for top-k
    (3% on a tail of 7 classes) and within the importance weights' bias and noise for sampled and
    hybrid (peaked 10-class teachers; 100 rows); both students end about as accurate (4 epochs)."""
    ws, path = built
    name = "-".join(o.split("=")[1] for o in over)
    runs = {}
    for T in (1, 2):
        cfg = load_config(path, [f"run_name={name}-T{T}", *AT_T2, *over, f"teachers.temperature={T}"])
        assert fmt.read_manifest(cache_stage.main(cfg))["spec"]["temperature"] == T
        (result,) = student_stage.main(cfg)
        runs[T] = (_losses(ws, f"{name}-T{T}")[0], result.final_accuracy)
    assert runs[1][0] == pytest.approx(runs[2][0], rel=rel)
    assert runs[1][1] == pytest.approx(runs[2][1], abs=0.03 if name == "dense" else 0.1)


@pytest.mark.parametrize("kind", ["reverse", "jsd"])
def test_reverse_kl_and_jsd_with_a_bucket_tail_train_classifiers(built, kind):
    ws, path = built
    cfg = load_config(path, [f"run_name={kind}", "student.baseline=false",
                             f"student.divergence={kind}", "student.tail=bucket"])
    (result,) = student_stage.main(cfg)
    history = json.loads((ws / "runs" / kind / "students" / "s-kd-s0" / "history.json").read_text())
    assert history["settings"]["divergence"] == kind and result.final_accuracy > 0.8


def test_the_stage_trains_on_the_apis_batches(built, monkeypatch):
    """One data path: `logitcache student` trains on exactly the batches a user's loop gets from
    `open_cache(...).dataset(...)` for the same seed and epoch, inputs and labels joined alike."""
    import numpy as np
    import torch

    import pipeline as lc
    from pipeline.inputs.splits import load_splits
    from pipeline.run.jobs import Shard
    from pipeline.train.tasks import Classification

    _, path = built
    cfg = load_config(path, ["run_name=same-batches", "student.epochs=2", "student.seeds=[4]"])
    seen: list[dict] = []
    real = Classification.student_loss

    def spy(self, model, batch, dev, **settings):
        seen.append({k: batch[k].clone() for k in ("sample_id", "inputs", "labels")})
        return real(self, model, batch, dev, **settings)

    monkeypatch.setattr(Classification, "student_loss", spy)
    student_stage.run_shard(cfg, Shard(model=0, seed=4, kind="kd"))
    transfer = load_splits(cfg).transfer
    cache = lc.open_cache(spec.find_cache(cfg))
    by_id = np.zeros((int(transfer.ids.max()) + 1, *transfer.x.shape[1:]), np.float32)
    by_id[transfer.ids] = transfer.x
    labels = np.zeros(len(by_id), np.int64)
    labels[transfer.ids] = transfer.y
    ds = cache.dataset(batch_size=100, seed=4, shuffle_chunks=cfg.student.shuffle_chunks, inputs=by_id,
                       labels=labels)  # a user's loop, plain arrays
    expected = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        expected += list(ds)
    assert len(seen) == len(expected) == 2 * 14
    for got, want in zip(seen, expected):
        assert torch.equal(got["sample_id"], want["sample_id"])
        assert torch.equal(got["inputs"], want["inputs"]) and torch.equal(got["labels"], want["labels"])
