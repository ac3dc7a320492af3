"""Four gloo ranks x two DataLoader workers (examples/distributed.py): every row exactly once per
epoch with equal batch counts (a DDP model steps through both epochs), ranks resolved in the
workers of a dataset built before init_process_group, a run stopped on 4 ranks resumed on 2 and on
3 with every row once, and batch size 1 on an uneven split stepping together."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO

COVER = r"rows (\d+), seen (\d+), distinct (\d+), duplicates (\d+), missing (\d+), batches per rank \[([\d, ]+)\]"


def test_four_ranks_cover_every_row_once_and_resume_on_two_and_three(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "examples/distributed.py", str(tmp_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout)

    def lines(prefix):
        return [(m.groups()[:5], [int(b) for b in m.group(6).split(", ")])
                for m in re.finditer(prefix + COVER, out.stdout)]

    epochs = lines(r"epoch \d on 4 ranks: ")
    assert epochs == [(("1000", "1000", "1000", "0", "0"), [7, 7, 7, 7])] * 2
    assert "epoch order differs between epochs: True" in out.stdout
    resumed = lines(r"resumed on \d ranks: ")
    assert resumed == [(("1000", "1000", "1000", "0", "0"), [8, 8]), (("1000", "1000", "1000", "0", "0"), [6, 6, 6])]
    uneven = lines(r"batch size 1 on 4 ranks: ")
    assert uneven == [(("1001", "1001", "1001", "0", "0"), [251] * 4)]
    assert "padding batches 3" in out.stdout
