"""The tiny sweeps end to end (issue 7): Table 6's and Table 4's as Hydra multiruns (Table 6's with W&B
offline) that collect_results tabulates, and a failed run marked in its table. Table 5's:
test_sweep_ablation.py (a file each, so that the two test workers share them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_tool, run_tool_in_process

# Every run: a step, no previews, 2 clips evaluated, at 32^2 through a 2-block VAE (the tiny DiT's latents,
# as conftest's tiny_ae_run): the tables' layout does not depend on the size, and each run is cheaper.
FAST = [
    "train.max_steps=1",
    "train.log_every=1",
    "train.checkpoint_every=1",
    "train.sample_at_end=false",
    "evaluate.clips=2",
    "evaluate.batch_size=2",
    "dataset.window_stride=8",
    "dataset.resolution=32",
    "dataset.mel.image_size=32",
]
# The autoencoder's runs also: round trips vocoded by Griffin-Lim (HiFi-GAN takes seconds a clip on a CPU).
FAST_AE = [
    *FAST,
    "ae.resolution=32",
    "ae.vae_downsample=2",
    "ae.decode_steps=2",
    "vocoder=griffinlim",
]


def collect(sweep_dir: Path) -> str:
    result = run_tool_in_process("collect_results.py", str(sweep_dir))
    assert (sweep_dir / "results.md").read_text() in result.stdout
    assert (sweep_dir / "results.csv").is_file()
    return result.stdout


def sensitivity_sweep_args(sweep: Path, data: Path, vae: Path, cache: Path) -> list[str]:
    """tools/train_ae.py's tiny Table 6 sweep into `sweep`, at test speed, with W&B offline: its w_kl = 1e-8
    half (3 runs; test_sweeps.py composes the whole 2 x 3 grid)."""
    return [
        *("train_ae.py", "-m", "+sweep=sensitivity_tiny", f"hydra.sweep.dir={sweep}", f"data_root={data}"),
        *(f"vae.weights={vae}", f"latent_cache={cache}", "wandb.mode=offline", "ae.w_kl=1e-8", *FAST_AE),
    ]


@pytest.fixture(scope="module")
def sensitivity_sweep(tmp_path_factory, synthetic_root, tiny_vae_folder) -> Path:
    sweep = tmp_path_factory.mktemp("sweeps") / "sensitivity"
    run_tool(*sensitivity_sweep_args(sweep, synthetic_root, tiny_vae_folder, sweep.parent / "vae_latents"))
    return sweep


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_sensitivity_sweep_gives_table_6(sensitivity_sweep):
    runs = sorted(p.parent for p in sensitivity_sweep.glob("*/metrics.json"))
    # Folders are named from the overrides (Hydra's override_dirname, paths and presets left out).
    grid = {
        tuple(part for part in run.name.split(",") if part.startswith(("ae.w_kl=", "ae.w_cls=")))
        for run in runs
    }
    assert grid == {(f"ae.w_cls={c}", "ae.w_kl=1e-08") for c in ("0.1", "0.3", "1.0")}
    assert not any("data_root" in run.name or "vae.weights" in run.name for run in runs)
    record = json.loads((runs[0] / "metrics.json").read_text())
    assert record["study"] == "sensitivity" and "ae.w_kl=1e-08" in record["overrides"]
    assert {"rfvd", "rkvd", "rfad_aisfx"} <= set(record["metrics"])
    assert list((runs[0] / "wandb").glob("offline-run-*")), "W&B offline run missing"
    table = collect(sensitivity_sweep)
    assert "| # | w_kl | w_cls | w_con | Reso. | rFVD | rKVD | rFAD (aisfx) |" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[1:4] for row in rows] == [
        ["1e-08", "1", "1"],
        ["1e-08", "0.3", "0.3"],
        ["1e-08", "0.1", "0.1"],
    ]
    assert "failed" not in table


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_scale_sweep_gives_table_4(tmp_path, synthetic_root, sensitivity_sweep):
    ae_run = next(sensitivity_sweep.glob("*/metrics.json")).parent
    sweep = tmp_path / "scale"
    run_tool(
        "train_dit.py",
        "-m",
        "+sweep=scale_tiny",
        f"hydra.sweep.dir={sweep}",
        f"data_root={synthetic_root}",
        f"ae_run='{ae_run}'",  # quoted: = and ,
        "evaluate_sampling.steps=2",
        "evaluate_sampling.ae_steps=2",
        "evaluate_sampling.vocoder=griffinlim",
        *FAST,
    )
    table = collect(sweep)
    assert "| Model | Params | GFLOPs | FVD | KVD | FAD (aisfx) |" in table
    models = [
        line.split(" | ")[0].removeprefix("| ") for line in table.splitlines() if line.startswith("| MM-LDM")
    ]
    assert models == ["MM-LDM-tiny_S", "MM-LDM-tiny_B", "MM-LDM-tiny_L"]  # sorted by size


@pytest.mark.slow
def test_collect_results_marks_a_failed_run(tmp_path, synthetic_root, tiny_vae_folder, sensitivity_sweep):
    # A job with a bad value beside finished runs (the sensitivity sweep's): it fails before any model.
    sweep = tmp_path / "sensitivity"
    shutil.copytree(sensitivity_sweep, sweep)
    args = sensitivity_sweep_args(sweep, synthetic_root, tiny_vae_folder, tmp_path / "latents")
    result = run_tool_in_process(*args, "ae.w_kl=-1", "ae.w_cls=0.1", check=False)
    assert result.returncode != 0  # Hydra reports the failed job
    failed = next(sweep.glob("*ae.w_kl=-1*"))
    assert "w_kl" in (failed / "failed.txt").read_text()
    table = collect(sweep)
    assert table.count("| failed | failed | failed |") == 1
    assert f"- failed: `{failed.name}`: ConfigError" in table


@pytest.mark.slow
def test_collect_results_refuses_a_folder_without_runs(tmp_path):
    result = run_tool_in_process("collect_results.py", str(tmp_path), check=False)
    assert result.returncode == 2 and "no runs" in result.stderr
