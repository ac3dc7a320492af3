"""A library leaves its host alone: importing pipeline (and every subpackage a user's loop reaches)
changes no environment variable and calls no malloc setting; the CLI opts in."""

from __future__ import annotations

import json
import os
import subprocess
import sys

IMPORTS = """
import ctypes, json, os, sys
calls = []
real = ctypes.CDLL
class Spy:
    def __init__(self, *a, **k): self._lib = real(*a, **k)
    def __getattr__(self, name):
        if name == "mallopt": calls.append(name)
        return getattr(self._lib, name)
ctypes.CDLL = Spy
before = dict(os.environ)
import pipeline
for name in ("open_cache", "kd_loss", "CacheWriter", "TopK"):
    getattr(pipeline, name)
import pipeline.run.fanout, pipeline.tools.fidelity
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print(json.dumps({"changed": changed, "mallopt": calls}))
"""


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                         "LOGITCACHE_STEADY_HEAP")}


def test_import_pipeline_changes_neither_environment_nor_malloc():
    out = subprocess.run([sys.executable, "-c", IMPORTS], env=_clean_env(), capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"changed": [], "mallopt": []}


def test_tune_process_is_the_opt_in():
    code = IMPORTS.replace("import pipeline\n", "import pipeline\npipeline.tune_process()\n")
    out = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"changed": ["GOMP_SPINCOUNT"], "mallopt": ["mallopt"]}
    # a choice the user made is kept
    env = {**_clean_env(), "OMP_WAIT_POLICY": "passive", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"changed": [], "mallopt": []}
