"""Two processes through torchrun (gloo, CPU): the ranks agree on every step, skip and resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def torchrun(run_dir: Path, max_steps: int, *nan: int) -> list[dict]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--standalone",
            str(REPO_ROOT / "tests" / "distributed_worker.py"),
            str(run_dir),
            str(max_steps),
            *map(str, nan),
        ],
        cwd=REPO_ROOT / "tests",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((run_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def test_two_ranks_agree_resume_exactly_and_skip_a_nan_together(tmp_path):
    straight = torchrun(tmp_path / "straight", 6)
    assert straight[0]["weights"] == straight[1]["weights"]
    assert straight[0]["summary"]["step"] == 6

    torchrun(tmp_path / "split", 3)
    resumed = torchrun(tmp_path / "split", 6)
    assert resumed[0]["weights"] == resumed[1]["weights"] == straight[0]["weights"]

    nan = torchrun(tmp_path / "nan", 6, 1, 2)  # rank 1's loss is NaN once, at step 2
    assert [r["summary"]["skipped_steps"] for r in nan] == [1, 1]
    assert [r["summary"]["step"] for r in nan] == [6, 6]
    assert nan[0]["weights"] == nan[1]["weights"] != straight[0]["weights"]
