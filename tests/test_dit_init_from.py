"""The long-generation DiT starts from a trained base DiT (`init_from=`), as the authors' does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, preset
from safetensors.torch import load_model
from test_dit import as_if_trained

from mmldm_ae.engine.trainer import TrainConfig, Trainer
from mmldm_ae.pipeline import load_autoencoder
from mmldm_data.config import ConfigError, compose, to_plain_dict
from mmldm_dit.dit import MMDiT
from mmldm_dit.latents import LatentStats
from mmldm_dit.sampling import DiTLossConfig
from mmldm_dit.train_dit import DiTTrainingTask, PreviewConfig, init_from_run, train_dit_from_config

pytestmark = pytest.mark.usefixtures("plain_single_thread_cpu")


@pytest.fixture(scope="module")
def pipeline(tiny_ae_run):
    return load_autoencoder(tiny_ae_run)


def save_dit_run(
    pipeline,
    ae_run: Path,
    run_dir: Path,
    latent_cache: Path | None = None,
    moved_after_ema: bool = False,
    **dit,
) -> MMDiT:
    """A tools/train_dit.py run of a tiny DiT whose zero-initialised output layers got random weights,
    saved without training. With moved_after_ema it keeps an EMA, and the saved live weights move on
    after the EMA's snapshot. Returns a model with the weights sampling uses (the EMA's)."""
    model = as_if_trained(MMDiT(preset("dit", "tiny", **dit)), seed=3)
    stats = LatentStats(0.0, 1.0, 0.0, 1.0)
    architecture = {
        "dit": to_plain_dict(model.cfg),
        "latent_stats": stats.to_dict(),
        "autoencoder_fingerprint": pipeline.fingerprint(),
    }
    task = DiTTrainingTask(model, stats, DiTLossConfig(), architecture, pipeline, PreviewConfig())
    run_config = {"dit": to_plain_dict(model.cfg), "ae_run": str(ae_run), "latent_cache": str(latent_cache)}
    config = TrainConfig(ema_decay=0.9 if moved_after_ema else None)
    trainer = Trainer(task, [], config, run_dir, run_config=run_config)
    sampled = MMDiT(model.cfg)
    sampled.load_state_dict(model.state_dict())
    if moved_after_ema:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1.0)
    trainer.save_checkpoint()
    return sampled.eval()


@pytest.fixture(scope="module")
def base(pipeline, tiny_ae_run, tmp_path_factory) -> tuple[MMDiT, str]:
    """A base DiT run whose EMA weights differ from its live weights: (its EMA weights, the run)."""
    run = tmp_path_factory.mktemp("base-dit") / "run"
    torch.manual_seed(0)
    return save_dit_run(pipeline, tiny_ae_run, run, moved_after_ema=True), str(run)


def test_the_long_model_starts_as_the_base_model(base, pipeline):
    ema, run = base
    torch.manual_seed(1)
    long = MMDiT(preset("dit", "tiny", previous_clip_depth=2)).eval()
    fresh = init_from_run(long, run, pipeline)
    assert fresh and all(name.startswith("previous_encoder.") for name in fresh)
    weights = long.state_dict()
    for name, tensor in ema.state_dict().items():
        torch.testing.assert_close(weights[name], tensor, msg=name)
    # The previous-clip encoder adds zero at the start: the long model predicts what the base does.
    g = torch.Generator().manual_seed(0)
    x_a, x_v = torch.randn(2, 8, 4, 4, generator=g), torch.randn(2, 8, 8, 8, generator=g)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        expected = ema(x_a, x_v, t)
        got = long(x_a, x_v, t, prev_a=torch.randn_like(x_a), prev_v=torch.randn_like(x_v))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_a_weight_of_another_shape_is_named_with_the_setting_behind_it(base, pipeline):
    wider = MMDiT(preset("dit", "tiny", context_tokens=4, previous_clip_depth=2))
    with pytest.raises(ConfigError, match=r"context.*\(8, .*\(4, .*dit.context_tokens: 8 -> 4"):
        init_from_run(wider, base[1], pipeline)


def test_a_base_trained_on_another_autoencoder_is_refused(base):
    class OtherAutoencoder:
        def fingerprint(self) -> str:
            return "another"

    with pytest.raises(ConfigError, match="another autoencoder"):
        init_from_run(MMDiT(preset("dit", "tiny")), base[1], OtherAutoencoder())
    with pytest.raises(FileNotFoundError, match="make train-dit"):
        init_from_run(MMDiT(preset("dit", "tiny")), "/nonexistent/run", OtherAutoencoder())


@pytest.mark.slow
def test_train_dit_long_with_init_from(base, tiny_ae_run, synthetic_root, tiny_dit_cache, tmp_path, capsys):
    run_dir = tmp_path / "long"
    cfg = compose(
        REPO_ROOT / "conf",
        "train_dit_long",
        [
            f"ae_run={tiny_ae_run}",
            f"data_root={synthetic_root}",
            f"run_dir={run_dir}",
            f"latent_cache={tiny_dit_cache}",
            f"init_from={base[1]}",
            "dit.previous_clip_depth=2",
            "dataset.resolution=32",
            "dataset.mel.image_size=32",
            "dataset.window_stride=8",
            "train.max_steps=1",
            "train.batch_size=4",
            "train.lr=1e-6",
            "preview.samples=1",
            "preview.steps=2",
            "preview.ae_steps=2",
            "preview.clips=1",
            "preview.vocoder=griffinlim",
        ],
    )
    train_dit_from_config(cfg)
    assert f"initialised from {base[1]}" in capsys.readouterr().err
    checkpoint = run_dir / "checkpoints" / "step_0000001"
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 1
    trained = MMDiT(preset("dit", "tiny", previous_clip_depth=2))
    load_model(trained, checkpoint / "dit.safetensors")
    weights = trained.state_dict()
    for name, tensor in base[0].state_dict().items():  # one step at lr 1e-6 from the base's weights
        torch.testing.assert_close(weights[name], tensor, atol=1e-4, rtol=0, msg=name)
