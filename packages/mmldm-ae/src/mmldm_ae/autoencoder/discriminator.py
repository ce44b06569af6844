"""Cross-modal spatio-temporal discriminator of the MM-LDM autoencoder and its hinge losses.

A sample is three pixel-space "slots" [audio image, frame a, frame b] of one clip, [N, 3, 3, H, W]
(slot, RGB, H, W). The discriminator judges single-modal realism and audio-video consistency at
once: besides the all-fake sample it is shown fakes that mix real and reconstructed parts and
temporally swapped frames (paper Eq. 2, authors' `disc_manager.audio_video`):

    real          [a,  v0,  v1 ]   label real
    all_fake      [a^, v0^, v1^]   label fake   (the generator wants this one called real)
    real_frame_b  [a^, v0^, v1 ]   label fake
    real_frame_a  [a^, v0,  v1^]   label fake
    swapped       [a^, v1^, v0^]   label fake

Reals are VAE decodes of the true latents and fakes VAE decodes of the one-step x0 estimates, as
in the authors' code, so both pass through the same decoder.

The discriminator is a separate module with its own optimiser: the generator step calls it inside
`MultiModalAutoencoder.training_losses`, the discriminator step calls `discriminator_losses`.
Both go through the module's forward, so wrapping it in DDP keeps its gradients in sync. The
generator step's backward also leaves gradients on the discriminator's parameters: zero them
before the discriminator step's backward (its optimiser's zero_grad). Every sample is judged on its
own (no batch statistics), so under gradient accumulation the mean of the micro-batches' losses is
the loss of the whole step's batch (docs/design.md#accumulation).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from mmldm_ae.autoencoder.config import AEConfig, DiscriminatorConfig
from mmldm_ae.autoencoder.layers import (
    hinge_loss,
    init_weights_,
    normalization,
    residual_levels,
)

SLOTS = 3  # audio image, frame a, frame b
FAKE_KINDS = ("all_fake", "real_frame_b", "real_frame_a", "swapped")


class CrossModalDiscriminator(nn.Module):
    """[N, 3 slots, 3, H, W] in [-1, 1] -> one logit per sample [N].

    A learnable per-slot, per-pixel embedding tells the slots apart; 3-D convs mix the slots;
    residual blocks work per slot; attention over the slots ("temporal") or over slots and space
    jointly ("full") at the configured downsampling factors; global average pooling; linear logit.
    """

    def __init__(self, cfg: DiscriminatorConfig, resolution: int):
        super().__init__()
        levels = len(cfg.channel_mult)
        if resolution % 2 ** (levels - 1):
            raise ValueError(
                f"resolution {resolution} is not divisible by the discriminator's "
                f"{2 ** (levels - 1)}x downsampling"
            )
        self.resolution = resolution
        self.slot_embed = nn.Parameter(torch.zeros(1, SLOTS, 3, resolution, resolution))
        self.conv_in = nn.Conv3d(3, cfg.channels, 3, padding=1)

        def attention_axes(ds: int) -> list[str]:
            return (["spacetime"] if ds in cfg.full_attention_ds else []) + (
                ["time"] if ds in cfg.temporal_attention_ds else []
            )

        self.body, width = residual_levels(
            cfg.channels,
            cfg.channel_mult,
            cfg.blocks_per_level,
            cfg.head_dim,
            attention_axes,
            temporal_kernel=3,
        )
        self.out = nn.Sequential(
            nn.Conv3d(width, cfg.channels, 3, padding=1), normalization(cfg.channels), nn.SiLU()
        )
        self.logit = nn.Linear(cfg.channels, 1)
        init_weights_(self)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 5 or tuple(x.shape[1:]) != (SLOTS, 3, self.resolution, self.resolution):
            raise ValueError(
                f"discriminator input has shape {tuple(x.shape)}, expected "
                f"[N, {SLOTS}, 3, {self.resolution}, {self.resolution}] "
                "(slots: audio image, frame a, frame b)"
            )
        h = self.conv_in(rearrange(x + self.slot_embed, "n s c h w -> n c s h w"))
        h = self.out(self.body(h))
        return self.logit(h.mean(dim=(2, 3, 4)))[:, 0]


def build_discriminator(cfg: AEConfig) -> CrossModalDiscriminator | None:
    """The discriminator matching an autoencoder config; None when the adversarial loss is off."""
    return CrossModalDiscriminator(cfg.discriminator, cfg.resolution) if cfg.adversarial else None


def discriminator_samples(real: Tensor, fake: Tensor) -> dict[str, Tensor]:
    """The real sample and every kind of fake, each [N, 3, 3, H, W], from real and fake slots."""
    if real.shape != fake.shape or real.shape[1] != SLOTS:
        raise ValueError(
            f"real {tuple(real.shape)} and fake {tuple(fake.shape)} must both be [N, {SLOTS}, 3, H, W]"
        )
    a, v0, v1 = real.unbind(1)
    a_hat, v0_hat, v1_hat = fake.unbind(1)
    kinds = {
        "real": (a, v0, v1),
        "all_fake": (a_hat, v0_hat, v1_hat),
        "real_frame_b": (a_hat, v0_hat, v1),
        "real_frame_a": (a_hat, v0, v1_hat),
        "swapped": (a_hat, v1_hat, v0_hat),
    }
    return {name: torch.stack(slots, dim=1) for name, slots in kinds.items()}


def discriminator_losses(discriminator: nn.Module, real: Tensor, fake: Tensor) -> dict[str, Tensor]:
    """Hinge loss of the discriminator step on detached real and fake slots [N, 3, 3, H, W].

    All samples go through one forward; the loss is the mean of relu(1 -/+ logit) over all of
    them (the authors' formula: the real sample weighs 1/5). Returns "loss_d" and the mean
    logit of each kind ("logit_<kind>") for logging.
    """
    samples = discriminator_samples(real.detach(), fake.detach())
    logits = discriminator(torch.cat(list(samples.values()))).chunk(len(samples))
    signs = torch.cat(
        [
            torch.full_like(chunk, 1.0 if name == "real" else -1.0)
            for name, chunk in zip(samples, logits, strict=True)
        ]
    )
    losses = {"loss_d": hinge_loss(torch.cat(logits), signs)}
    losses.update(
        {f"logit_{name}": chunk.detach().mean() for name, chunk in zip(samples, logits, strict=True)}
    )
    return losses
