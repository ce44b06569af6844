"""Gradient accumulation in the autoencoder's step: k micro-batches of n clips give the losses and
gradients of one batch of k*n clips, contrastive negatives and the discriminator included."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import preset

from mmldm_ae.autoencoder import MultiModalAutoencoder, build_discriminator
from mmldm_ae.autoencoder.semantic import ContrastiveBank, contrastive_loss
from mmldm_ae.engine.trainer import TrainConfig, Trainer
from mmldm_ae.pipeline import AutoencoderPipeline
from mmldm_ae.train_ae import AETrainingTask
from mmldm_ae.vae import VAEConfig, build_vae
from mmldm_data.config import DatasetConfig

pytestmark = pytest.mark.usefixtures("plain_single_thread_cpu")

NUM_CLASSES = 3


def latent_batch(clips: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random VAE latents of `clips` clips at 16x16 (the tiny preset at 32^2 through a 2x VAE)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "key_latents": torch.randn(clips, 4, 4, 16, 16, generator=g),
        "target_latents": torch.randn(clips, 2, 4, 16, 16, generator=g),
        "target_indices": torch.rand(clips, 2, generator=g),
        "audio_latents": torch.randn(clips, 4, 16, 16, generator=g),
        "class_id": torch.randint(0, NUM_CLASSES, (clips,), generator=g),
    }


def one_step(micro: list[dict], tmp_path) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The logged losses of one optimiser step over `micro`, and the gradients it stepped with."""
    torch.manual_seed(0)
    cfg = preset("ae", "tiny", resolution=32, vae_downsample=2, adversarial=True)
    model = MultiModalAutoencoder(cfg, NUM_CLASSES)
    vae = build_vae(VAEConfig(preset="tiny", block_out_channels=[16, 32]))
    pipeline = AutoencoderPipeline(
        model, vae, DatasetConfig(resolution=32), [str(i) for i in range(NUM_CLASSES)]
    )
    model.train()
    task = AETrainingTask(pipeline, build_discriminator(cfg), {}, {})
    clips = micro[0]["class_id"].shape[0]
    config = TrainConfig(batch_size=clips, grad_accum=len(micro), grad_clip=None)
    trainer = Trainer(task, [], config, tmp_path / f"{len(micro)}x{clips}")
    torch.manual_seed(1)  # the step's draws: guidance dropout, posterior noise, timesteps, noise
    logs = trainer._optimizer_steps(micro)
    grads = {
        f"{name}.{key}": p.grad.clone()
        for name, module in task.modules().items()
        for key, p in module.named_parameters()
        if p.grad is not None
    }
    return {k: float(v) for k, v in logs.items()}, grads


def test_two_micro_batches_of_two_equal_one_batch_of_four(tmp_path):
    batch = latent_batch(4)
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    whole_logs, whole_grads = one_step([batch], tmp_path)
    split_logs, split_grads = one_step(halves, tmp_path)

    assert whole_logs.keys() == split_logs.keys()
    assert {"con", "adv_g", "loss_d", "logit_real", "grad_norm_discriminator"} <= whole_logs.keys()
    for key, value in whole_logs.items():
        assert split_logs[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert whole_grads.keys() == split_grads.keys()
    # Among them the contrastive head's temperatures and every discriminator weight.
    assert {"autoencoder.contrastive.log_scale_v2a", "discriminator.logit.weight"} <= whole_grads.keys()
    for key, grad in whole_grads.items():
        torch.testing.assert_close(split_grads[key], grad, rtol=1e-4, atol=1e-6, msg=key)


def test_contrastive_loss_over_a_bank_in_micro_batches_is_the_whole_batch_loss():
    g = torch.Generator().manual_seed(5)
    f_v = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    f_a = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scales = [torch.tensor(14.0, requires_grad=True), torch.tensor(9.0, requires_grad=True)]

    whole_v, whole_a = f_v.clone().requires_grad_(True), f_a.clone().requires_grad_(True)
    whole = contrastive_loss(whole_v, whole_a, *scales)
    whole.backward()
    whole_grads = [whole_v.grad, whole_a.grad, *(s.grad.clone() for s in scales)]

    for s in scales:
        s.grad = None
    grads_v, grads_a = [], []
    for start in (0, 2, 4):  # three micro-batches of two, the trainer's mean over them
        own_v = f_v[start : start + 2].clone().requires_grad_(True)
        own_a = f_a[start : start + 2].clone().requires_grad_(True)
        share = contrastive_loss(own_v, own_a, *scales, bank=ContrastiveBank(f_v, f_a, start))
        torch.testing.assert_close(share, whole.detach())  # the value is the whole batch's loss
        (share / 3).backward()
        grads_v.append(own_v.grad)
        grads_a.append(own_a.grad)
    split_grads = [torch.cat(grads_v), torch.cat(grads_a), *(s.grad for s in scales)]
    for split, reference in zip(split_grads, whole_grads, strict=True):
        torch.testing.assert_close(split, reference, rtol=1e-5, atol=1e-7)


_RANK_SCRIPT = """
import sys, torch, torch.distributed as dist
from mmldm_ae.autoencoder.semantic import ContrastiveBank, contrastive_loss
rank, port, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
f_v, f_a = (f.chunk(2)[rank] for f in torch.load(f"{folder}/features.pt"))
scales = [torch.tensor(14.0, requires_grad=True), torch.tensor(9.0, requires_grad=True)]
out = {}
for micro in (1, 2):  # one micro-batch of 4 clips (bank=None: gathered here), two of 2
    size = 4 // micro
    banks = ContrastiveBank.gather(f_v, f_a).split([size] * micro) if micro > 1 else [None]
    values, grads_v, grads_a = [], [], []
    for start, bank in zip(range(0, 4, size), banks):
        own_v = f_v[start : start + size].clone().requires_grad_(True)
        own_a = f_a[start : start + size].clone().requires_grad_(True)
        loss = contrastive_loss(own_v, own_a, *scales, bank=bank)
        (loss / micro).backward()
        values.append(loss.detach())
        grads_v.append(own_v.grad)
        grads_a.append(own_a.grad)
    out[micro] = (values, [torch.cat(grads_v), torch.cat(grads_a), *(s.grad for s in scales)])
    for s in scales:
        s.grad = None
torch.save(out, f"{folder}/rank{rank}.pt")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_contrastive_loss_over_two_ranks_is_the_whole_batch(tmp_path):
    """2 gloo ranks x 4 clips, as one micro-batch and as two: every value is the 8-clip loss, and
    the gradients, averaged over ranks as DDP does, are the 8-clip ones."""
    g = torch.Generator().manual_seed(6)
    f_v = F.normalize(torch.randn(8, 8, generator=g), dim=-1)
    f_a = F.normalize(torch.randn(8, 8, generator=g), dim=-1)
    torch.save((f_v, f_a), tmp_path / "features.pt")
    (tmp_path / "rank.py").write_text(_RANK_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [
        subprocess.Popen(
            [sys.executable, str(tmp_path / "rank.py"), str(r), str(port), str(tmp_path)],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for r in range(2)
    ]
    assert all(p.wait(timeout=120) == 0 for p in ranks)
    outputs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    scales = [torch.tensor(14.0, requires_grad=True), torch.tensor(9.0, requires_grad=True)]
    whole_v, whole_a = f_v.clone().requires_grad_(True), f_a.clone().requires_grad_(True)
    whole = contrastive_loss(whole_v, whole_a, *scales)
    whole.backward()
    for micro in (1, 2):
        for rank, (values, grads) in enumerate(output[micro] for output in outputs):
            for value in values:
                torch.testing.assert_close(value, whole.detach())
            # DDP's mean over ranks: each rank's embedding gradient is half of its rows' full-batch one.
            rows = slice(4 * rank, 4 * rank + 4)
            torch.testing.assert_close(grads[0] / 2, whole_v.grad[rows], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(grads[1] / 2, whole_a.grad[rows], rtol=1e-5, atol=1e-7)
        for index in (2, 3):  # the temperatures: the ranks' mean
            mean = (outputs[0][micro][1][index] + outputs[1][micro][1][index]) / 2
            torch.testing.assert_close(mean, scales[index - 2].grad)
