"""Config loading: typed, frozen, overridable, every error reported at once and named."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from conftest import REPO, tiny_config, write_config

from pipeline.core.config import Config, default_layout, load_config
from pipeline.core.errors import ConfigError


def test_defaults_and_overrides(tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    cfg = load_config(path, ["student.temperature=3", "cache.encoding=topk", "student.models.0.hidden=[8, 4]",
                             "teachers.members.1.dropout=0.5"])
    assert cfg.student.temperature == 3.0 and isinstance(cfg.student.temperature, float)
    assert cfg.cache.encoding == "topk"
    assert cfg.student.models[0].hidden == (8, 4)
    assert cfg.teachers.members[1].dropout == 0.5
    assert cfg.cache.chunk_rows == 128  # from the file
    assert cfg.evaluate.ece_bins == 15  # default
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]


def test_layout_left_unset_follows_the_row_bytes():
    """rows_per_shard and chunk_rows left unset: a chunk is the power of two of rows nearest 2 MiB
    of stored bytes, at most 16,384 (a quarter with views); a language model's holds whole
    sequences, one at least; a shard is 16 chunks, at most 65,536 rows (131,072 tokens), one chunk
    at least, and with views views x a multiple of chunk_rows. Values that are set are kept; a
    shard set alone below a chunk gets a chunk that divides it (per view with views)."""
    top32, q8, dense100, dense8k, dense1k = 140, 107, 208, 16392, 2008  # bytes per row, sample_id included
    cases = [(("classify", 1, 0, top32), (16384, 65536)), (("classify", 1, 0, q8), (16384, 65536)),
             (("classify", 1, 0, dense100), (8192, 65536)), (("classify", 1, 0, dense1k), (1024, 16384)),
             (("classify", 1, 0, dense8k), (128, 2048)), (("classify", 1, 0, 28), (16384, 65536)),
             (("lm", 2048, 0, top32), (16384, 131_072)), (("lm", 100, 0, top32), (16300, 130_400)),
             (("lm", 10000, 0, top32), (10000, 130_000)), (("lm", 64, 0, dense8k), (128, 2048)),
             (("lm", 2048, 0, dense8k), (2048, 32768)),
             (("lm", 2048, 0, top32, 4096), (4096, 65536)), (("lm", 64, 0, top32, None, 640), (640, 640)),
             (("lm", 64, 0, top32, None, 100), (100, 100)),
             (("classify", 1, 8, top32), (4096, 65536)), (("classify", 1, 32, top32), (4096, 131_072)),
             (("classify", 1, 8, top32, None, 4096), (512, 4096)), (("classify", 1, 8, top32, None, 4800), (600, 4800)),
             (("classify", 1, 0, top32, 1000), (1000, 16000)), (("classify", 1, 0, top32, None, 100), (100, 100)),
             (("classify", 1, 0, top32, 256, 512), (256, 512))]
    for args, expected in cases:
        assert default_layout(*args) == expected, args
    for bad in ("cache.rows_per_shard=0", "cache.chunk_rows=0"):
        with pytest.raises(ConfigError, match=bad.replace("=", ": ") + " must be >= 1"):
            load_config(None, [bad])
    assert (Config().cache.chunk_rows, Config().cache.rows_per_shard) == (None, None)  # resolved with the encoding



def test_override_into_default_model_list():
    cfg = load_config(None, ["student.models.1.hidden=12"])
    assert [m.hidden for m in cfg.student.models] == [(30,), (12,)]


def test_unknown_key_lists_valid_keys(tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, cache={"encodng": "topk"}))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "cache.encodng: unknown key" in msg and "encoding" in msg and "backend" in msg
    assert "\n" not in msg


def test_wrong_types_all_reported_at_once(tmp_path):
    cfg = tiny_config(tmp_path, student={"epochs": "many", "alpha": 2.0}, cache={"backend": "hdf5"})
    with pytest.raises(ConfigError) as e:
        load_config(write_config(tmp_path / "c.yaml", cfg))
    msg = str(e.value)
    assert "student.epochs: expected an integer, got 'many'" in msg
    assert "cache.backend: 'hdf5' is not one of zarr, parquet" in msg
    assert str(tmp_path / "c.yaml") in msg


def test_value_checks(tmp_path):
    cfg = tiny_config(tmp_path, teachers={**tiny_config(tmp_path)["teachers"], "weights": [1.0]})
    with pytest.raises(ConfigError, match=r"teachers.weights: 1 weights for 2 teachers"):
        load_config(write_config(tmp_path / "c.yaml", cfg))
    with pytest.raises(ConfigError, match=r"student.alpha: .* must be in \[0, 1\]"):
        load_config(None, ["student.alpha=1.5"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["student.alpha"])
    with pytest.raises(ConfigError, match="not an index below 2"):
        load_config(None, ["student.models.5.hidden=3"])


def test_resolved_config_round_trips(tmp_path):
    from pipeline.core.config import dump_yaml

    cfg = load_config(None, ["student.alpha=0.25", "cache.k=3"])
    saved = tmp_path / "resolved.yaml"
    saved.write_text(dump_yaml(cfg))
    assert load_config(saved) == cfg
    assert isinstance(cfg, Config)


def test_loading_a_config_imports_neither_torch_nor_zarr():
    """`logitcache tokenize` runs in about 60 MB because nothing it loads imports torch (about
    180 MB more); config validation, which checks the codec, must not pull it in."""
    code = ("import sys; from pipeline.core.config import load_config; "
            "load_config('configs/demo.yaml', ['cache.codec=shuffle-lz4hc', 'cache.compression_level=2']); "
            "print(sorted(m for m in ('torch', 'zarr') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
