"""The authors' per-dataset settings in the dataset presets: the autoencoder's KL weight (paper section
4.1: Landscape 1e-9, AIST++ 1e-8) and horizontal flips (0.5 in stages 0 and 1, none for the generator)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import REPO_ROOT

from mmldm_ae.autoencoder import AEConfig
from mmldm_data.config import compose, dataset_config_from, to_typed
from mmldm_data.dataset import SoundingVideoDataset

CONF = REPO_ROOT / "conf"


def composed(root: str, *overrides: str):
    cfg = compose(CONF, root, ["run_dir=unused", *overrides])
    return cfg, dataset_config_from(cfg)


@pytest.mark.parametrize(
    ("dataset", "w_kl", "flip_p"),
    [("landscape", 1e-9, 0.5), ("aist", 1e-8, 0.5), ("audioset", 1e-7, 0.5), ("synthetic", 1e-8, 0.0)],
)
def test_train_ae_takes_w_kl_and_flips_from_the_dataset(dataset, w_kl, flip_p):
    cfg, data = composed("train_ae", f"dataset={dataset}")
    assert to_typed(AEConfig, cfg.ae).w_kl == w_kl
    assert data.flip_p == flip_p
    assert composed("train_vae", f"dataset={dataset}")[1].flip_p == flip_p  # the VAE fine-tune flips too


def test_w_kl_on_the_command_line_still_wins():
    cfg, _ = composed("train_ae", "dataset=landscape", "ae.w_kl=1e-7")  # e.g. the Table 6 sweep
    assert to_typed(AEConfig, cfg.ae).w_kl == 1e-7


@pytest.mark.parametrize("root", ["train_dit", "train_dit_long"])
def test_the_generator_trains_on_unflipped_clips(root):
    assert composed(root, "dataset=landscape")[1].flip_p == 0.0


def test_flips_turn_frames_only_and_follow_the_seed(synthetic_root):
    plain = dataset_config_from(compose(CONF, "data", ["dataset=synthetic", f"data_root={synthetic_root}"]))
    straight = SoundingVideoDataset(plain, return_all_frames=True)
    unflipped = {i: straight[i] for i in range(0, len(straight), len(straight) // 6)[:6]}  # one per class

    def flips(seed: int) -> list[bool]:
        dataset = SoundingVideoDataset(replace(plain, flip_p=0.5, seed=seed), return_all_frames=True)
        flipped = []
        for index, a in unflipped.items():
            b = dataset[index]
            torch.testing.assert_close(b["audio_image"], a["audio_image"])  # the sound is never flipped
            flipped.append(torch.equal(b["frames"], a["frames"].flip(-1)))
            assert flipped[-1] or torch.equal(b["frames"], a["frames"])
        return flipped

    drawn = flips(seed=0)
    assert 0 < sum(drawn) < len(drawn) and flips(seed=1) != drawn
