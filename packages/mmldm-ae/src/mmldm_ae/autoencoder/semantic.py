"""Semantic space (paper section 3.1, "semantic latents"): projectors z -> tokens, class and
contrastive heads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import accumulate

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

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


def pool_content(z: Tensor, pooling: str) -> Tensor:
    """Perceptual latent [B, C', l, l] -> the content embedding's input: [B, C' l l] flattened (the
    authors' code) or [B, C'] averaged over space (the paper's "latent average pooling")."""
    return z.flatten(1) if pooling == "flatten" else z.mean(dim=(2, 3))


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

    def embed(self, s_v: Tensor, s_a: Tensor) -> tuple[Tensor, Tensor]:
        """Semantic features 2 x [B, D, s, s] -> unit-length clip embeddings f_v, f_a [B, E]."""
        return F.normalize(self.video(s_v), dim=-1), F.normalize(self.audio(s_a), dim=-1)

    def forward(self, s_v: Tensor, s_a: Tensor, bank: ContrastiveBank | None = None) -> Tensor:
        return contrastive_loss(*self.embed(s_v, s_a), *self.scales(), bank=bank)


@dataclass
class ContrastiveBank:
    """Detached embeddings of every clip of an optimiser step, all micro-batches of all processes
    (video, audio [N, E]), and the row where the clips of the micro-batch being trained start."""

    video: Tensor
    audio: Tensor
    offset: int

    @classmethod
    def gather(cls, f_v: Tensor, f_a: Tensor) -> ContrastiveBank:
        """The bank of this process's embeddings [n, E] and those of the other processes (which
        must hold as many), rows in process order; offset: this process's first row."""
        f_v, f_a = f_v.detach(), f_a.detach()
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return cls(f_v, f_a, 0)
        gathered = []
        for local in (f_v, f_a):
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, local.contiguous())
            gathered.append(torch.cat(parts))
        return cls(*gathered, dist.get_rank() * f_v.shape[0])

    def split(self, sizes: Sequence[int]) -> list[ContrastiveBank]:
        """The bank as each of this process's micro-batches sees it, their clips in order (sizes)."""
        starts = accumulate(sizes[:-1], initial=0)
        return [replace(self, offset=self.offset + start) for start in starts]


def contrastive_loss(
    f_v: Tensor, f_a: Tensor, scale_v2a: Tensor, scale_a2v: Tensor, bank: ContrastiveBank | None = None
) -> Tensor:
    """CLIP loss between matched video/audio embeddings [n, E]; negatives are every other clip of
    the bank (None: this micro-batch on every process, ContrastiveBank.gather).

    The value is the mean loss over the whole bank. The gradient is exact however the bank is split
    into micro-batches and processes (GradCache-style): all N rows are computed with this
    micro-batch's embeddings live at their rows and the others detached, and each temperature is
    live only in this micro-batch's rows. The gradient returned is that of sum(rows) / n, so that
    the trainer's mean over micro-batches and DDP's mean over processes (N / n shares together)
    give the gradient of the bank's mean. One micro-batch on one process: the plain CLIP loss.
    """
    bank = ContrastiveBank.gather(f_v, f_a) if bank is None else bank
    n, N = f_v.shape[0], bank.video.shape[0]
    start, stop = bank.offset, bank.offset + n
    all_v = torch.cat([bank.video[:start], f_v, bank.video[stop:]]).to(f_v.dtype)
    all_a = torch.cat([bank.audio[:start], f_a, bank.audio[stop:]]).to(f_a.dtype)
    own = torch.zeros(N, dtype=torch.bool, device=f_v.device)
    own[start:stop] = True
    row_v2a = torch.where(own, scale_v2a, scale_v2a.detach())[:, None]
    row_a2v = torch.where(own, scale_a2v, scale_a2v.detach())[:, None]
    targets = torch.arange(N, device=f_v.device)
    rows = 0.5 * (
        F.cross_entropy(row_v2a * all_v @ all_a.T, targets, reduction="none")
        + F.cross_entropy(row_a2v * all_a @ all_v.T, targets, reduction="none")
    )
    share = rows.sum() / n
    # Straight-through: the bank's loss as the value, this share's gradient.
    return rows.mean().detach() + (share - share.detach())
