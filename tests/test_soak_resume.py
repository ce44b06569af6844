"""tools/soak_resume.py with two kills: a run SIGKILLed (once while writing a checkpoint) and resumed
ends bit for bit as an uninterrupted one."""

from __future__ import annotations

import json

import pytest
from conftest import run_tool


@pytest.mark.slow
def test_a_killed_and_resumed_run_ends_bit_identical():
    result = run_tool("soak_resume.py", "--kills", "2", "--steps", "16")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["bit_identical"] and summary["kills"] == 2
    assert summary["tensors_compared"] > 50
