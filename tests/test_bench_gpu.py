"""tools/bench_gpu.py: every section at the CPU presets end to end (slow), its report written row by row,
and its largest-batch search."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import load_tool, run_tool_in_process


@pytest.mark.slow
def test_tiny_run_measures_every_section(tmp_path):
    # A generous budget: on a loaded machine the default 2 minutes could skip rows this test expects.
    # One steady call per row: what is checked is that each row is measured, not how steadily.
    run_tool_in_process("bench_gpu.py", "--tiny", "--budget-min", "4", "--reps", "1", "--out", str(tmp_path))
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    measured = [row for row in report["rows"] if row.get("steady_s") is not None]
    assert {row["section"] for row in measured} == {"dit", "sampling", "ae", "table2"}
    skipped = [row["name"] for row in report["rows"] if row.get("steady_s") is None]
    assert all("compiled" in name for name in skipped), skipped  # the budget held everything else
    for row in measured:
        assert row["first_s"] > 0 and row["steady_s"] > 0 and row["host_syncs_per_call"] >= 0
    # The training steps wait for nothing; the ratios are to the plain build of the same row.
    for name in ("DiT-S step b8 (eager)", "DiT-B step b8 (eager)", "autoencoder step, 2 clips"):
        assert rows[name]["host_syncs_per_call"] == 0 and rows[name]["ratio"] > 0
    parts = rows["autoencoder step, 2 clips"]["parts_s"]
    assert {"VAE encode", "UNet (with injection)", "fake decode (grad)", "backward", "optimisers"} <= set(
        parts
    )
    assert rows["svg b1: as before (fp32, DDIM)"]["max_diff_fp32"] == 0.0  # it is the fp32 reference
    with (tmp_path / "table2.csv").open() as handle:
        table = list(csv.reader(handle))
    assert table[0][:2] == ["Method", "HW"] and [r[0] for r in table[1:]][-2:] == [
        "MM-LDM (here)",
        "MM-LDM* (here)",
    ]
    assert "MM-Diffusion (paper)" in (tmp_path / "table2.md").read_text()


def test_the_report_is_written_after_every_row(tmp_path):
    import torch

    bench = load_tool("bench_gpu.py")
    report = bench.Report(tmp_path, torch.device("cpu"), budget_s=60, reps=3, settings={})
    report.measure("dit", "a row", lambda: torch.ones(2).sum())
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [row["name"] for row in rows] == ["a row"] and rows[0]["host_syncs_per_call"] == 0
    report.measure("dit", "a syncing row", lambda: torch.ones(2).sum().item())
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][1]["host_syncs_per_call"] == 1


@pytest.mark.parametrize(
    ("fits_up_to", "limit", "expected"),
    [(0, 64, (0, False)), (37, 64, (37, False)), (100, 64, (64, True)), (1, 1, (1, True))],
)
def test_largest_batch_search(fits_up_to, limit, expected):
    bench = load_tool("bench_gpu.py")
    tried = []

    def fits(batch):
        tried.append(batch)
        return batch <= fits_up_to

    assert bench.largest_batch(fits, limit) == expected
    assert len(tried) <= 2 * limit.bit_length() + 1
