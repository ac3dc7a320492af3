"""Two gloo ranks x two DataLoader workers (examples/distributed.py): every row exactly once per
epoch, equal batch counts (a DDP model steps through both epochs), exact resume from state_dict()."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO


def test_two_ranks_two_workers_cover_every_row_once_and_resume_exactly(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "examples/distributed.py", str(tmp_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout)
    epochs = re.findall(r"epoch (\d): rows (\d+), seen (\d+), distinct (\d+), duplicates (\d+), missing (\d+), "
                        r"batches per rank \[(\d+), (\d+)\]", out.stdout)
    assert len(epochs) == 2
    for _, rows, seen, distinct, dup, missing, b0, b1 in epochs:
        assert rows == seen == distinct == "1000" and dup == missing == "0" and b0 == b1 == "14"
    assert "epoch order differs between epochs: True" in out.stdout
    resumes = re.findall(r"resume rank (\d): .* resumed (\d+) batches, equal to the uninterrupted epoch: (\w+)",
                         out.stdout)
    assert resumes == [("0", "11", "True"), ("1", "11", "True")]
