"""The tiny ablation sweep (paper Table 5) end to end: a Hydra multirun of its cumulative rows that
collect_results tabulates, each row named by the component it removes."""

from __future__ import annotations

import pytest
from conftest import run_tool
from test_sweep_runs import FAST_AE, collect


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_ablation_sweep_gives_table_5(tmp_path, synthetic_root, tiny_vae_folder):
    sweep = tmp_path / "ablation"
    run_tool(
        "train_ae.py",
        "-m",
        "+sweep=ablation_tiny",
        f"hydra.sweep.dir={sweep}",
        f"data_root={synthetic_root}",
        f"ablation_vae.original={tiny_vae_folder}",
        f"latent_cache={tmp_path / 'vae_latents'}",
        *FAST_AE,
    )
    table = collect(sweep)
    rows = [line.split(" | ")[:2] for line in table.splitlines() if line.startswith("| ")][1:]
    # As in the paper, a row is named by the component it removes (with every one above it).
    assert rows == [
        ["| MM-LDM", "7_adversarial"],
        ["| Finetune KL-VAE decoder", "5_semantic"],
        ["| Semantic cross-modal feature", "4_class"],
        ["| Learnable class embedding", "3_pooling"],
        ["| Latent average pooling", "2_prompt"],
        ["| Weight initialization", "0_base"],
    ]
    assert "failed" not in table
