"""Modality encoders (paper section 3.1, "perceptual latents"): VAE latents -> KL posteriors z_v, z_a."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from mmldm_ae.autoencoder.layers import (
    conv,
    normalization,
    random_normal,
    residual_levels,
)

#################################################################################
#                                  Encoders                                     #
#################################################################################


class DiagonalGaussian:
    """KL posterior N(mean, exp(logvar)) over a perceptual latent [B, C', h, w]."""

    def __init__(self, mean: Tensor, logvar: Tensor):
        self.mean, self.logvar = mean, logvar.clamp(-30.0, 20.0)

    def sample(self, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """mean + std * noise, with standard normal `noise` [B, C', h, w] drawn here when None."""
        noise = random_normal(self.mean.shape, self.mean, generator) if noise is None else noise
        return self.mean + (0.5 * self.logvar).exp() * noise.to(self.mean)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL to N(0, I) per item, summed over C', h, w: [B]."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class PerceptualEncoder(nn.Module):
    """VAE latents of key frames (or one audio image) -> KL posterior of a perceptual latent.

    A learnable content map is prepended as frame 0 ("frame", video) or concatenated on channels
    ("channels", audio); after the 3-D body only time position 0 is kept, so the posterior is read
    at the content frame's slot. The audio encoder's time axis has length 1, so its convs are
    2-D in effect: they use temporal kernel 1 rather than carrying weights that never see data.
    With `per_key_frame` (video, `ae.video_latent=key_frames`) the heads instead make
    out_channels / K channels at each of the K key frames' slots, stacked on channels.
    """

    def __init__(
        self,
        in_channels: int,
        latent_size: int,
        out_channels: int,
        channels: int,
        channel_mult: Sequence[int],
        blocks_per_level: int,
        head_dim: int,
        content: str,
        temporal: bool,
        dropout: float = 0.0,
        per_key_frame: int | None = None,
    ):
        super().__init__()
        if content not in ("frame", "channels"):
            raise ValueError(f"content must be 'frame' or 'channels', got {content!r}")
        self.content_mode = content
        self.content = nn.Parameter(torch.randn(in_channels, latent_size, latent_size))
        kt = 3 if temporal else 1
        axes = ("space", "time") if temporal else ("space",)
        stem_channels = in_channels * (2 if content == "channels" else 1)
        self.conv_in = conv(stem_channels, channels, temporal_kernel=kt)
        self.body, width = residual_levels(
            channels,
            channel_mult,
            blocks_per_level,
            head_dim,
            lambda ds: axes,
            temporal_kernel=kt,
            dropout=dropout,
        )
        self.per_key_frame = per_key_frame
        head_channels = out_channels // per_key_frame if per_key_frame else out_channels
        self.mean_head = self._head(width, head_channels, kt)
        # last conv zero-initialised: start at unit variance
        self.logvar_head = self._head(width, head_channels, kt)

    @staticmethod
    def _head(width: int, out_channels: int, kt: int) -> nn.Sequential:
        return nn.Sequential(
            conv(width, out_channels, temporal_kernel=kt),
            normalization(out_channels),
            nn.SiLU(),
            conv(out_channels, out_channels, kernel=1, temporal_kernel=1),
        )

    def forward(self, x: Tensor) -> DiagonalGaussian:  # [B, T, C, L, L] -> posterior over [B, C', l, l]
        content = repeat(self.content, "c h w -> b 1 c h w", b=x.shape[0])
        x = torch.cat([content, x], dim=1 if self.content_mode == "frame" else 2)
        h = self.body(self.conv_in(rearrange(x, "b t c h w -> b c t h w")))
        if self.per_key_frame:  # slot 0 is the content frame
            read = partial(rearrange, pattern="b c t h w -> b (t c) h w")
            return DiagonalGaussian(read(self.mean_head(h)[:, :, 1:]), read(self.logvar_head(h)[:, :, 1:]))
        return DiagonalGaussian(self.mean_head(h)[:, :, 0], self.logvar_head(h)[:, :, 0])
