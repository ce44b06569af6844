"""Gradient checkpointing (train.gradient_checkpointing) changes no gradient beyond float tolerance: the
DiT blocks (with the long model's previous-clip encoder), the signal decoder UNet with its injected
features, and the VAE decoder, each tiny."""

from __future__ import annotations

import torch
from conftest import preset


def gradients(module: torch.nn.Module, loss_of) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    loss_of().backward()
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def assert_same_gradients(module, loss_of, enable):
    plain = gradients(module, loss_of)
    enable()
    checkpointed = gradients(module, loss_of)
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_dit_blocks(plain_single_thread_cpu):
    from mmldm_dit.dit import MMDiT

    torch.manual_seed(0)
    model = MMDiT(preset("dit", "tiny", depth=2, previous_clip_depth=1))
    for block in model.blocks:  # adaLN-zero starts as the identity: no gradient would flow through blocks
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
    x_a, x_v, t = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 8, 8), torch.tensor([3, 700])
    prev_v = torch.randn(2, 8, 8, 8)

    def loss():
        eps_a, eps_v = model(x_a, x_v, t, prev_v=prev_v)
        return eps_a.square().mean() + eps_v.square().mean()

    assert_same_gradients(model, loss, model.enable_gradient_checkpointing)


def test_signal_decoder_unet_with_injected_features(plain_single_thread_cpu):
    from mmldm_ae.autoencoder import MultiModalAutoencoder

    torch.manual_seed(0)
    # A down block without attention, as the paper preset's last: diffusers would re-run its hooked
    # resnets in the backward pass.
    config = preset("ae", "tiny", resolution=32, vae_downsample=2, unet_cross_attention=[True, False])
    model = MultiModalAutoencoder(config, num_classes=2)
    cfg = model.cfg
    for conv in (*model.video_features.zero_convs, *model.audio_features.zero_convs):
        torch.nn.init.normal_(conv.weight, std=0.1)  # non-zero features: their gradients are compared too
    z_v = torch.randn(1, cfg.latent_channels, cfg.video_latent_size, cfg.video_latent_size)
    z_a = torch.randn(1, cfg.latent_channels, cfg.audio_latent_size, cfg.audio_latent_size)
    keep = torch.ones(1, dtype=torch.bool)
    x_t = torch.randn(3, cfg.vae_channels, cfg.latent_size, cfg.latent_size)

    def loss():
        s_v, s_a = model.semantics(z_v, z_a)
        frames = torch.tensor([[0.0, 0.5]])
        cond = model.decoder_conditions(z_v, z_a, s_v, s_a, frames, torch.tensor([1]), keep, keep)
        return model.decoder(x_t, torch.tensor([5, 300, 900]), cond).square().mean()

    assert_same_gradients(model, loss, model.decoder.enable_gradient_checkpointing)
    assert model.video_features.zero_convs[0].weight.grad.abs().sum() > 0


def test_vae_decoder(plain_single_thread_cpu):
    from mmldm_ae.vae import VAEConfig, build_vae

    torch.manual_seed(0)
    vae = build_vae(VAEConfig(preset="tiny", block_out_channels=[8, 16]))
    z = torch.randn(2, vae.latent_channels, 8, 8)
    assert_same_gradients(vae, lambda: vae.decode(z).square().mean(), vae.enable_gradient_checkpointing)


def test_train_options_reach_the_models(plain_single_thread_cpu, monkeypatch):
    """train.gradient_checkpointing and train.compile as the stages apply them (compiling itself takes
    minutes on a CPU: tools/bench_gpu.py times the compiled models on a GPU)."""
    from mmldm_ae.autoencoder import MultiModalAutoencoder
    from mmldm_ae.engine.trainer import TrainConfig
    from mmldm_ae.train_ae import apply_train_options
    from mmldm_ae.vae import VAEConfig, build_vae
    from mmldm_dit.train_dit import model_to_train

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **options: compiled.append((self, options)))
    both = TrainConfig(gradient_checkpointing=True, compile=True)
    dit = model_to_train(preset("dit", "tiny", depth=1), both)
    assert dit.gradient_checkpointing and compiled == [(dit, {"dynamic": False})]
    plain = model_to_train(preset("dit", "tiny", depth=1), TrainConfig())
    assert not plain.gradient_checkpointing and len(compiled) == 1

    ae = MultiModalAutoencoder(preset("ae", "tiny", resolution=32, vae_downsample=2), num_classes=2)
    vae = build_vae(VAEConfig(preset="tiny", block_out_channels=[8, 16]))
    apply_train_options(ae, vae, both)
    assert ae.decoder.gradient_checkpointing and vae.model.decoder.gradient_checkpointing
    assert compiled[1] == (ae.decoder.unet, {"dynamic": False})
