"""Semantic space (paper section 3.1, "semantic latents"): projectors z -> tokens, class and
contrastive heads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.distributed.nn.functional import all_gather

from mmldm_ae.autoencoder.layers import (
    normalization,
    residual_levels,
)

#################################################################################
#                          Projectors and semantic heads                        #
#################################################################################


class SemanticProjector(nn.Module):
    """Perceptual latent [B, C', l, l] -> semantic features [B, D, s, s] (s*s tokens)."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        channel_mult: Sequence[int],
        blocks_per_level: int,
        head_dim: int,
        out_dim: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.body, width = residual_levels(
            channels, channel_mult, blocks_per_level, head_dim, lambda ds: ("space",), dropout=dropout
        )
        self.out = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1),
            normalization(width),
            nn.SiLU(),
            nn.Conv2d(width, out_dim, 1),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.out(self.body(self.conv_in(z)))


class ClassificationHead(nn.Module):
    """Class logits from the 2 x s*s semantic tokens of a clip (the authors' heads_v11)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.map_video = self._token_map(dim)
        self.map_audio = self._token_map(dim)
        self.head = nn.Sequential(
            nn.Conv1d(dim, dim, 1),
            normalization(dim),
            nn.SiLU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Conv1d(dim, num_classes, 1),
        )

    @staticmethod
    def _token_map(dim: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.SiLU(), nn.Conv2d(dim, dim, 3, padding=1))

    def forward(self, s_v: Tensor, s_a: Tensor) -> Tensor:  # 2 x [B, D, s, s] -> [B, num_classes]
        tokens = torch.cat(
            [
                rearrange(self.map_video(s_v), "b d h w -> b d (h w)"),
                rearrange(self.map_audio(s_a), "b d h w -> b d (h w)"),
            ],
            dim=2,
        )
        return self.head(tokens)[:, :, 0]


class ContrastiveHead(nn.Module):
    """L2-normalised clip embeddings of each modality and the two learnable CLIP temperatures."""

    def __init__(self, dim: int, embed_dim: int, temperature: float):
        super().__init__()
        self.video = self._branch(dim, embed_dim)
        self.audio = self._branch(dim, embed_dim)
        # Log-parametrised inverse temperatures (the authors divided by raw learnable scalars).
        self.log_scale_v2a = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        self.log_scale_a2v = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    @staticmethod
    def _branch(dim: int, embed_dim: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1),
            normalization(dim),
            nn.SiLU(),
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(dim, embed_dim, 1),
            nn.Flatten(),
        )

    def scales(self) -> tuple[Tensor, Tensor]:
        # CLIP's bounds: a temperature between 1 and 1/100.
        bound = math.log(100.0)
        return self.log_scale_v2a.clamp(0.0, bound).exp(), self.log_scale_a2v.clamp(0.0, bound).exp()

    def forward(self, s_v: Tensor, s_a: Tensor) -> Tensor:
        f_v = F.normalize(self.video(s_v), dim=-1)
        f_a = F.normalize(self.audio(s_a), dim=-1)
        return contrastive_loss(f_v, f_a, *self.scales())


def contrastive_loss(f_v: Tensor, f_a: Tensor, scale_v2a: Tensor, scale_a2v: Tensor) -> Tensor:
    """CLIP loss between matched video/audio embeddings [B, E]; negatives are every other clip.

    Under torch.distributed the other ranks' embeddings are gathered with autograd, so each
    rank's negatives cover the global batch and gradients reach every rank's encoders. All ranks
    must use the same per-rank batch size.
    """
    offset = 0
    all_v, all_a = f_v, f_a
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        all_v, all_a = torch.cat(all_gather(f_v)), torch.cat(all_gather(f_a))
        offset = dist.get_rank() * f_v.shape[0]
    targets = torch.arange(f_v.shape[0], device=f_v.device) + offset
    v2a = F.cross_entropy(scale_v2a * f_v @ all_a.T, targets)
    a2v = F.cross_entropy(scale_a2v * f_a @ all_v.T, targets)
    return 0.5 * (v2a + a2v)
