"""Shared fixtures. Tests run offline: no hub downloads, W&B disabled, caches in temp folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "mmldm-cache"
    monkeypatch.setenv("MMLDM_CACHE", str(cache))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path_factory.getbasetemp() / "wandb"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic sounding-video dataset (6 classes x 2 clips, 64^2, 3.2 s), made once."""
    from mmldm_data.synthetic import SyntheticConfig, write_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(root, num_clips=12, seed=0, cfg=SyntheticConfig(), progress=False)
    return root


def run_tool(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run tools/<script> with this interpreter, as a user would from the repository root."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / script), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result
