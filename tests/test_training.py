"""The shared training loop: exact resume, non-finite guarding, config checks, EMA, W&B offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from mmldm_ae.engine.checkpoint import checkpoint_dirs
from mmldm_ae.engine.logger import WandbConfig
from mmldm_ae.engine.trainer import ResumableSampler, TrainConfig, Trainer, TrainingError


class NoisyPairs(Dataset):
    """x -> 3x + 1 with per-item noise that depends on the epoch, like the real datasets' draws."""

    def __init__(self, length: int = 24):
        self.length, self.epoch = length, 0

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(1000 * self.epoch + index)
        x = torch.randn(4, generator=generator)
        return {"x": x, "y": 3 * x + 1 + 0.1 * torch.randn(4, generator=generator), "clip_id": f"item{index}"}


class ToyGanTask:
    """A regressor and a 'discriminator' with their own optimisers; the loss also draws from the
    global torch RNG (as diffusion noise does), so resuming must restore RNG states too."""

    def __init__(self, width: int = 8, nan_from_step: int | None = None):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, width), nn.SiLU(), nn.Linear(width, 4))
        self.critic = nn.Linear(4, 1)
        self.width, self.nan_from_step = width, nan_from_step
        self.losses: list[float] = []

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, "critic": self.critic}

    def optimizer_modules(self) -> list[str]:
        return ["model", "critic"]

    def loss(self, optimizer: str, batch: dict, step: int, modules: dict[str, nn.Module]):
        noise = 0.01 * torch.randn_like(batch["x"])
        prediction = modules["model"](batch["x"] + noise)
        if optimizer == "critic":
            critic = modules["critic"]
            loss = (
                torch.relu(1 - critic(batch["y"])).mean() + torch.relu(1 + critic(prediction.detach())).mean()
            )
            return loss, {"critic": loss.item()}
        loss = (prediction - batch["y"]).square().mean()
        if self.nan_from_step is not None and step >= self.nan_from_step:
            loss = loss * float("nan")
        self.losses.append(loss.item())
        return loss, {"mse": loss.item()}

    def architecture(self) -> dict:
        return {"width": self.width}

    def log_media(self, logger, step: int, run_dir: Path) -> None:
        (run_dir / "media").mkdir(exist_ok=True)
        (run_dir / "media" / f"step_{step}.txt").write_text("ok")


def config(**overrides) -> TrainConfig:
    base = dict(max_steps=6, batch_size=4, lr=1e-2, checkpoint_every=3, log_every=2, grad_accum=2)
    return TrainConfig(**{**base, **overrides})


def test_resumed_run_continues_with_the_same_losses(tmp_path):
    straight = ToyGanTask()
    Trainer(straight, NoisyPairs(), config(), tmp_path / "straight").train()

    first = ToyGanTask()
    Trainer(first, NoisyPairs(), config(max_steps=3), tmp_path / "split").train()
    torch.manual_seed(12345)  # the process state a new run starts from must not matter
    second = ToyGanTask()
    summary = Trainer(second, NoisyPairs(), config(max_steps=6), tmp_path / "split").train()

    assert summary["step"] == 6
    assert len(straight.losses) == 12  # 6 steps x 2 micro-batches
    assert first.losses + second.losses == pytest.approx(straight.losses, rel=0, abs=0)
    final = checkpoint_dirs(tmp_path / "split")[-1]
    assert final.name == "step_0000006"
    assert {p.name for p in final.iterdir()} >= {
        "model.safetensors",
        "critic.safetensors",
        "optimizers.pt",
        "rng_0.pt",
        "state.json",
    }
    assert json.loads((final / "state.json").read_text())["samples_seen"] == 6 * 4 * 2
    assert (tmp_path / "split" / "media" / "step_6.txt").is_file()


def test_sampler_starts_anywhere_in_the_shuffle():
    full = ResumableSampler(10, seed=3)
    stream = iter(full)
    expected = [next(stream) for _ in range(25)]
    resumed = iter(ResumableSampler(10, seed=3, start=13))
    assert [next(resumed) for _ in range(12)] == expected[13:]
    assert sorted(i for _, i in expected[:10]) == list(range(10))
    assert expected[0][0] == 0 and expected[10][0] == 1
    ranks = [ResumableSampler(10, seed=3, rank=r, world_size=2) for r in (0, 1)]
    first_epoch = [index for sampler in ranks for _, (_, index) in zip(range(5), iter(sampler), strict=False)]
    assert sorted(first_epoch) == list(range(10))


def test_nonfinite_losses_skip_steps_then_abort(tmp_path, capsys):
    task = ToyGanTask(nan_from_step=2)
    with pytest.raises(TrainingError, match="3 non-finite losses in a row at step 2.*Lower train.lr"):
        Trainer(task, NoisyPairs(), config(max_nonfinite_steps=3), tmp_path / "run").train()
    assert capsys.readouterr().err.count("non-finite model loss") == 3


def test_resume_with_an_incompatible_config_names_the_keys(tmp_path):
    Trainer(ToyGanTask(width=8), NoisyPairs(), config(max_steps=3), tmp_path / "run").train()
    with pytest.raises(TrainingError, match=r"width: 8 -> 16"):
        Trainer(ToyGanTask(width=16), NoisyPairs(), config(max_steps=6), tmp_path / "run").train()


def test_ema_is_checkpointed_and_used_for_media(tmp_path):
    task = ToyGanTask()
    trainer = Trainer(task, NoisyPairs(), config(max_steps=3, ema_decay=0.9), tmp_path / "run")
    trainer.train()
    final = checkpoint_dirs(tmp_path / "run")[-1]
    assert (final / "ema.safetensors").is_file()
    resumed = Trainer(ToyGanTask(), NoisyPairs(), config(max_steps=3, ema_decay=0.9), tmp_path / "run")
    resumed.resume(final)
    for saved, loaded in zip(trainer.ema.shadow_params, resumed.ema.shadow_params, strict=True):
        torch.testing.assert_close(saved, loaded)


def test_bad_train_settings_are_named():
    with pytest.raises(TrainingError, match="train.precision"):
        TrainConfig(precision="fp8").validate()


def test_wandb_offline_run_is_written_under_the_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    Trainer(
        ToyGanTask(),
        NoisyPairs(),
        config(max_steps=2),
        run_dir,
        wandb=WandbConfig(mode="offline", project="mmldm-test"),
    ).train()
    assert list((run_dir / "wandb").glob("offline-run-*"))
