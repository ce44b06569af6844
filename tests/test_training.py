"""The shared training loop: exact resume, checkpoints that survive interruption, non-finite
guarding, fp16 loss scaling, signals, config checks, EMA, W&B offline."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from mmldm_ae.engine.checkpoint import checkpoint_dirs, newest_valid_checkpoint, resolve_checkpoint
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


class NanGradient(torch.autograd.Function):
    """Identity whose gradient is NaN: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class ToyGanTask:
    """A regressor and a 'discriminator' with their own optimisers; the loss also draws from the
    global torch RNG (as diffusion noise does), so resuming must restore RNG states too.
    From `nan_from_step` on, `nan_in` ("model", "critic" or "gradient": the model's gradient under
    a finite loss) is not finite."""

    def __init__(self, width: int = 8, nan_from_step: int | None = None, nan_in: str = "model"):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, width), nn.SiLU(), nn.Linear(width, 4))
        self.critic = nn.Linear(4, 1)
        self.width, self.nan_from_step, self.nan_in = width, nan_from_step, nan_in
        self.losses: list[float] = []
        self.media_steps: list[tuple[int, bool]] = []  # (step, its checkpoint existed)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, "critic": self.critic}

    def optimizer_modules(self) -> list[str]:
        return ["model", "critic"]

    def loss(self, optimizer: str, batch: dict, step: int, modules: dict[str, nn.Module]):
        noise = 0.01 * torch.randn_like(batch["x"])
        prediction = modules["model"](batch["x"] + noise)
        broken = self.nan_from_step is not None and step >= self.nan_from_step
        if optimizer == "critic":
            critic = modules["critic"]
            loss = (
                torch.relu(1 - critic(batch["y"])).mean() + torch.relu(1 + critic(prediction.detach())).mean()
            )
            if broken and self.nan_in == "critic":
                loss = loss * float("nan")
            return loss, {"critic": loss.item()}
        if broken and self.nan_in == "gradient":
            prediction = NanGradient.apply(prediction)
        loss = (prediction - batch["y"]).square().mean()
        if broken and self.nan_in == "model":
            loss = loss * float("nan")
        self.losses.append(loss.item())
        return loss, {"mse": loss.item()}

    def architecture(self) -> dict:
        return {"width": self.width}

    def log_media(self, logger, step: int, run_dir: Path) -> None:
        self.media_steps.append((step, (run_dir / "checkpoints" / f"step_{step:07d}").is_dir()))
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
    # Steps 2-5 are skipped on the device; the host reads that at its checks (steps 3, 4 and 6).
    with pytest.raises(TrainingError, match="4 non-finite steps in a row by step 6.*Lower train.lr"):
        Trainer(task, NoisyPairs(), config(max_nonfinite_steps=3), tmp_path / "run").train()
    err = capsys.readouterr().err
    assert err.count("non-finite model loss") == 3 and "gradient" not in err


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


@pytest.mark.parametrize(
    "setting",
    [
        "precision=fp8",
        "grad_clip=-1",
        "warmup_steps=-3",
        "weight_decay=-0.1",
        "keep_checkpoints=0",
        "max_nonfinite_steps=0",
        "num_workers=-1",
    ],
)
def test_bad_train_settings_are_named(setting):
    key, value = setting.split("=")
    value = value if key == "precision" else float(value) if "." in value else int(value)
    with pytest.raises(TrainingError, match=f"train.{key} must"):
        TrainConfig(**{key: value}).validate()


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


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    final = checkpoint_dirs(run_dir)[-1]
    return {f"{p.stem}.{k}": v for p in sorted(final.glob("*.safetensors")) for k, v in load_file(p).items()}


def step_names(run_dir: Path) -> list[str]:
    return [p.name for p in checkpoint_dirs(run_dir)]


def test_an_unfinished_save_is_never_taken_for_a_checkpoint(tmp_path, caplog):
    run = tmp_path / "run"
    Trainer(ToyGanTask(), NoisyPairs(), config(max_steps=3), run).train()
    # A save killed after state.json but before its rename.
    torn = run / "checkpoints" / "step_0000006.partial"
    shutil.copytree(run / "checkpoints" / "step_0000003", torn)
    (torn / "manifest.json").unlink(missing_ok=True)
    assert step_names(run) == ["step_0000003"]
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint(run, "train one") == run / "checkpoints" / "step_0000003"
    assert "step_0000006.partial: a checkpoint save that did not finish" in caplog.text
    summary = Trainer(ToyGanTask(), NoisyPairs(), config(max_steps=6), run).train()
    assert summary["step"] == 6 and not torn.exists()  # cleaned up once a save succeeds


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("truncate model.safetensors", "model.safetensors has .* bytes instead of .* \\(truncated\\)"),
        ("truncate optimizers.pt", "optimizers.pt has .* \\(truncated\\)"),
        ("flip state.json", "state.json does not match its checksum"),
        ("delete rng_0.pt", "rng_0.pt is missing"),
    ],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog, damage, reason):
    Trainer(ToyGanTask(), NoisyPairs(), config(), tmp_path / "straight").train()
    run = tmp_path / "run"
    Trainer(ToyGanTask(), NoisyPairs(), config(max_steps=5, checkpoint_every=2), run).train()
    assert step_names(run) == ["step_0000004", "step_0000005"]
    action, name = damage.split()
    path = run / "checkpoints" / "step_0000005" / name
    if action == "truncate":
        path.write_bytes(path.read_bytes()[:-7])
    elif action == "flip":
        text = path.read_text()
        path.write_text(text.replace('"step": 5', '"step": 6'))
    else:
        path.unlink()
    with caplog.at_level(logging.WARNING):
        assert newest_valid_checkpoint(run).name == "step_0000004"
    assert caplog.records and caplog.records[-1].levelno == logging.WARNING
    assert "skipping checkpoint" in caplog.text
    assert __import__("re").search(reason, caplog.text)
    with pytest.raises(FileNotFoundError, match="cannot be used: " + reason.split(" ")[0]):
        resolve_checkpoint(run / "checkpoints" / "step_0000005", "train one")
    # The run goes on from step 4 and ends as if nothing had happened.
    Trainer(ToyGanTask(), NoisyPairs(), config(), run).train()
    for key, value in weights(tmp_path / "straight").items():
        torch.testing.assert_close(weights(run)[key], value, rtol=0, atol=0)


def test_a_missing_rng_state_is_an_error(tmp_path):
    run = tmp_path / "run"
    Trainer(ToyGanTask(), NoisyPairs(), config(max_steps=3), run).train()
    final = checkpoint_dirs(run)[-1]
    (final / "rng_0.pt").unlink()
    with pytest.raises(TrainingError, match="rng_0.pt is missing: the checkpoint is incomplete"):
        Trainer(ToyGanTask(), NoisyPairs(), config(max_steps=6), run).resume(final)


def test_a_nonfinite_gradient_under_a_finite_loss_is_skipped_without_clipping(tmp_path, capsys):
    run = tmp_path / "run"
    task = ToyGanTask(nan_from_step=2, nan_in="gradient")
    with pytest.raises(TrainingError, match="2 non-finite steps in a row by step 4"):
        Trainer(
            task, NoisyPairs(), config(grad_clip=None, max_nonfinite_steps=2, checkpoint_every=1), run
        ).train()
    assert capsys.readouterr().err.count("non-finite model gradient") == 2  # read at steps 3 and 4
    assert step_names(run)[-1] == "step_0000003"  # steps 2 and 3 skipped: the weights of step 2
    assert all(value.isfinite().all() for value in weights(run).values())


def test_a_checkpoint_with_nonfinite_weights_is_refused(tmp_path):
    trainer = Trainer(ToyGanTask(), NoisyPairs(), config(), tmp_path / "run")
    with torch.no_grad():
        trainer._raw("critic").weight[0, 0] = float("inf")
    with pytest.raises(TrainingError, match="the weights of critic are not finite; no checkpoint written"):
        trainer.save_checkpoint()
    assert step_names(tmp_path / "run") == []


def test_a_skip_in_the_second_optimiser_undoes_the_whole_step(tmp_path):
    settings = dict(max_steps=2, ema_decay=0.9, checkpoint_every=100)
    before = Trainer(ToyGanTask(), NoisyPairs(), config(**settings), tmp_path / "two")
    before.train()
    skipped = Trainer(
        ToyGanTask(nan_from_step=2, nan_in="critic"),
        NoisyPairs(),
        config(**{**settings, "max_steps": 4, "max_nonfinite_steps": 1}),
        tmp_path / "skipped",
    )
    with pytest.raises(TrainingError, match="2 non-finite steps in a row by step 4"):
        skipped.train()
    for name in ("model", "critic"):
        for a, b in zip(before._raw(name).parameters(), skipped._raw(name).parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(before.ema.shadow_params, skipped.ema.shadow_params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_pruning_keeps_final_checkpoints_and_other_runs(tmp_path):
    run = tmp_path / "run"
    summary = Trainer(ToyGanTask(), NoisyPairs(), config(keep_checkpoints=1), run).train()
    assert step_names(run) == ["step_0000006"] and Path(summary["checkpoint"]).is_dir()
    Trainer(ToyGanTask(), NoisyPairs(), config(keep_checkpoints=1, max_steps=12), run).train()
    assert step_names(run) == ["step_0000006", "step_0000012"]  # step 9 pruned, both finals kept

    # Another run's (damaged, so not resumed) checkpoint in the folder is neither taken nor pruned.
    other = tmp_path / "other"
    shutil.copytree(run / "checkpoints" / "step_0000012", other / "checkpoints" / "step_0000020")
    (other / "checkpoints" / "step_0000020" / "model.safetensors").write_bytes(b"torn")
    summary = Trainer(ToyGanTask(), NoisyPairs(), config(keep_checkpoints=1), other).train()
    assert summary["step"] == 6
    assert step_names(other) == ["step_0000006", "step_0000020"]


def test_a_fresh_run_refuses_a_folder_holding_another_runs_checkpoints(tmp_path):
    Trainer(ToyGanTask(), NoisyPairs(), config(max_steps=3), tmp_path / "run").train()
    with pytest.raises(TrainingError, match="train.resume=false would mix the two runs.*train.resume=true"):
        Trainer(ToyGanTask(), NoisyPairs(), config(resume=False), tmp_path / "run").train()
    assert step_names(tmp_path / "run") == ["step_0000003"]


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate keeps one precision per process: let a test pick another, then set it back."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_fp16_overflow_lowers_the_loss_scale_and_training_goes_on(tmp_path, capsys, fresh_accelerator_state):
    trainer = Trainer(ToyGanTask(), NoisyPairs(), config(precision="fp16", max_steps=4), tmp_path / "run")
    # Accelerate gives CPUs no grad scaler; torch's, at its default scale, overflows in fp16 at first.
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    trainer.accelerator.native_amp = True
    summary = trainer.train()
    assert summary["step"] == 4 and summary["skipped_steps"] >= 1
    assert trainer.accelerator.scaler.get_scale() < 2.0**16
    assert re.search(
        "non-finite (model|critic) gradient in 1.*on at least one process", capsys.readouterr().err
    )


class SignalledTask(ToyGanTask):
    def __init__(self, signal_number: int, at_step: int):
        super().__init__()
        self.signal_number, self.at_step = signal_number, at_step

    def loss(self, optimizer, batch, step, modules):
        if step == self.at_step and optimizer == "model" and not self.media_steps:
            self.media_steps.append((-1, False))  # once
            os.kill(os.getpid(), self.signal_number)
        return super().loss(optimizer, batch, step, modules)


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_writes_a_checkpoint_and_stops_cleanly(tmp_path, signal_number):
    straight = ToyGanTask()
    Trainer(straight, NoisyPairs(), config(), tmp_path / "straight").train()
    run = tmp_path / "run"
    first = SignalledTask(signal_number, at_step=1)
    summary = Trainer(first, NoisyPairs(), config(checkpoint_every=100), run).train()
    assert summary["step"] == 2 and summary["stopped_by"] == f"signal {signal.Signals(signal_number).name}"
    assert summary["checkpoint"].endswith("step_0000002") and step_names(run) == ["step_0000002"]
    assert signal.getsignal(signal_number) is signal.SIG_DFL  # handlers restored
    assert not (run / "media").exists()  # no previews on the way out
    second = ToyGanTask()
    Trainer(second, NoisyPairs(), config(), run).train()
    assert first.losses + second.losses == pytest.approx(straight.losses, rel=0, abs=0)


def test_previews_come_after_the_checkpoint_of_their_step(tmp_path):
    task = ToyGanTask()
    Trainer(task, NoisyPairs(), config(sample_every=3), tmp_path / "run").train()
    assert task.media_steps == [(3, True), (6, True)]


def test_sample_at_end_false_writes_only_the_periodic_previews(tmp_path):
    task = ToyGanTask()
    Trainer(
        task, NoisyPairs(), config(sample_every=3, max_steps=7, sample_at_end=False), tmp_path / "run"
    ).train()
    assert [step for step, _ in task.media_steps] == [3, 6]  # not 7, the last


def test_fsdp_is_refused_with_the_launch_config_to_use():
    from accelerate import DistributedType

    from mmldm_ae.engine.trainer import check_distributed_type

    with pytest.raises(TrainingError, match="FSDP is not supported yet.*multi_gpu.yaml"):
        check_distributed_type(DistributedType.FSDP)
    check_distributed_type(DistributedType.MULTI_GPU)
