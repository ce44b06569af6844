"""Building blocks shared by the encoders, projectors, feature generator and discriminator.

Residual blocks and attention over 2-D latents or frame stacks [B, C, T, H, W]; shapes in each docstring.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from einops import rearrange
from torch import Tensor, nn

#################################################################################
#                                   Helpers                                     #
#################################################################################


def normalization(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups (the LDM convention, also valid for widths like 48)."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def conv(
    in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1, temporal_kernel: int | None = None
) -> nn.Module:
    """A 2-D conv, or with `temporal_kernel` a 3-D one that keeps the time axis (stride 1 in time)."""
    if temporal_kernel is None:
        return nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2)
    return nn.Conv3d(
        in_channels,
        out_channels,
        (temporal_kernel, kernel, kernel),
        (1, stride, stride),
        padding=(temporal_kernel // 2, kernel // 2, kernel // 2),
    )


def random_uniform(shape: Sequence[int], device: torch.device, generator: torch.Generator | None) -> Tensor:
    where = generator.device if generator is not None else device
    return torch.rand(tuple(shape), generator=generator, device=where).to(device)


def random_normal(shape: Sequence[int], like: Tensor, generator: torch.Generator | None) -> Tensor:
    where = generator.device if generator is not None else like.device
    return torch.randn(tuple(shape), generator=generator, device=where).to(like)


def hinge_loss(logits: Tensor, sign: float | Tensor) -> Tensor:
    """mean(relu(1 - sign * logit)): sign +1 for samples to call real, -1 for fakes."""
    return F.relu(1.0 - sign * logits).mean()


#################################################################################
#                                 Embeddings                                    #
#################################################################################


class MLP(nn.Sequential):
    """Linear-SiLU-Linear; `out` is the last layer (zero-initialised where it gates a condition)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__(
            nn.Linear(in_features, hidden_features), nn.SiLU(), nn.Linear(hidden_features, out_features)
        )

    @property
    def out(self) -> nn.Linear:
        return self[-1]


class FrameIndexEmbedder(nn.Module):
    """Fractional frame index i/T -> sinusoid -> MLP; the embedding of the video feature ResBlocks."""

    def __init__(self, frequency_dim: int, embed_dim: int, scale: float):
        super().__init__()
        self.frequency_dim, self.scale = frequency_dim, scale
        self.mlp = MLP(frequency_dim, embed_dim, embed_dim)

    def forward(self, index: Tensor) -> Tensor:  # [N] -> [N, E]
        frequencies = get_timestep_embedding(
            index * self.scale, self.frequency_dim, flip_sin_to_cos=True, downscale_freq_shift=0
        )
        return self.mlp(frequencies.to(self.mlp.out.weight.dtype))


#################################################################################
#                                   Blocks                                      #
#################################################################################


class ResBlock(nn.Module):
    """LDM residual block: GN-SiLU-conv3x3 (+ embedding), GN-SiLU-dropout-conv3x3, plus a skip.

    Works per frame: a 5-D input [B, C, T, H, W] is folded to (B T). `resample` = n > 0
    upsamples by 2**n (nearest), n < 0 average-pools by 2**-n, before the first conv (the
    authors' ResBlock2n). With `zero_init_output` the block starts as its skip path.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        emb_channels: int | None = None,
        resample: int = 0,
        dropout: float = 0.0,
        zero_init_output: bool = True,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        self.resample, self.zero_init_output = resample, zero_init_output
        self.in_layers = nn.Sequential(normalization(in_channels), nn.SiLU())
        self.in_conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = (
            nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels)) if emb_channels else None
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    @property
    def output_layer(self) -> nn.Module:
        return self.out_layers[-1]

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample > 0:
            return F.interpolate(x, scale_factor=2**self.resample, mode="nearest")
        if self.resample < 0:
            return F.avg_pool2d(x, 2**-self.resample)
        return x

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        if x.ndim == 5:
            if emb is not None:
                raise ValueError("ResBlock takes an embedding only for 4-D inputs")
            frames = x.shape[2]
            y = self.forward(rearrange(x, "b c t h w -> (b t) c h w"))
            return rearrange(y, "(b t) c h w -> b c t h w", t=frames)
        h = self.in_conv(self._resample(self.in_layers(x)))
        if self.emb_proj is not None:
            h = h + self.emb_proj(emb)[:, :, None, None]
        return self.skip(self._resample(x)) + self.out_layers(h)


_ATTENTION_TOKENS = {
    "space": ("b c t h w -> (b t) (h w) c", "(b t) (h w) c -> b c t h w"),
    "time": ("b c t h w -> (b h w) t c", "(b h w) t c -> b c t h w"),
    "spacetime": ("b c t h w -> b (t h w) c", "b (t h w) c -> b c t h w"),
}


# CUDA attention kernels put the batch on a grid axis of at most 65,535 blocks; temporal attention
# over every pixel of a batch (the discriminator: 16 clips x 64 x 64 positions) passes that.
MAX_ATTENTION_BATCH = 32768


def _batched_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """scaled_dot_product_attention over [N, heads, L, d], in slices of MAX_ATTENTION_BATCH along N."""
    if q.shape[0] <= MAX_ATTENTION_BATCH:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat(
        [
            F.scaled_dot_product_attention(*(y[start : start + MAX_ATTENTION_BATCH] for y in (q, k, v)))
            for start in range(0, q.shape[0], MAX_ATTENTION_BATCH)
        ]
    )


class Attention(nn.Module):
    """Residual multi-head self-attention over space, time, or both; zero-initialised output.

    Takes [B, C, H, W] or [B, C, T, H, W]; normalisation is per frame, like the ResBlocks.
    """

    def __init__(self, channels: int, head_dim: int, axis: str = "space"):
        super().__init__()
        if axis not in _ATTENTION_TOKENS:
            raise ValueError(f"attention axis must be one of {sorted(_ATTENTION_TOKENS)}, got {axis!r}")
        self.axis, self.heads, self.zero_init_output = axis, max(1, channels // head_dim), True
        self.norm = normalization(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    @property
    def output_layer(self) -> nn.Module:
        return self.proj

    def forward(self, x: Tensor) -> Tensor:
        image = x.ndim == 4
        if image:
            x = x.unsqueeze(2)
        b, _, t, h, w = x.shape
        normed = rearrange(
            self.norm(rearrange(x, "b c t h w -> (b t) c h w")), "(b t) c h w -> b c t h w", t=t
        )
        to_tokens, from_tokens = _ATTENTION_TOKENS[self.axis]
        q, k, v = self.qkv(rearrange(normed, to_tokens)).chunk(3, dim=-1)
        q, k, v = (rearrange(y, "n l (heads d) -> n heads l d", heads=self.heads) for y in (q, k, v))
        out = rearrange(_batched_attention(q, k, v), "n heads l d -> n l (heads d)")
        x = x + rearrange(self.proj(out), from_tokens, b=b, t=t, h=h, w=w)
        return x.squeeze(2) if image else x


def residual_levels(
    channels: int,
    channel_mult: Sequence[int],
    blocks_per_level: int,
    head_dim: int,
    attention_axes: Callable[[int], Sequence[str]],
    temporal_kernel: int | None = None,
    dropout: float = 0.0,
) -> tuple[nn.Sequential, int]:
    """Levels of [ResBlock, attention...] x blocks with a stride-2 conv between levels.

    `attention_axes(ds)` names the attentions of a level at spatial downsampling ds. Returns the
    body and its output width. 3-D when `temporal_kernel` is given (time is never downsampled).
    """
    layers: list[nn.Module] = []
    width = channels
    for level, mult in enumerate(channel_mult):
        ds = 2**level
        for _ in range(blocks_per_level):
            layers.append(ResBlock(width, channels * mult, dropout=dropout))
            width = channels * mult
            layers.extend(Attention(width, head_dim, axis) for axis in attention_axes(ds))
        if level < len(channel_mult) - 1:
            layers.append(conv(width, width, stride=2, temporal_kernel=temporal_kernel))
    return nn.Sequential(*layers), width


def init_weights_(module: nn.Module) -> None:
    """DiT-style: xavier-uniform Linear layers with zero bias, then zero every residual branch output."""

    def _basic_init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    module.apply(_basic_init)
    for m in module.modules():
        if isinstance(m, (ResBlock, Attention)) and m.zero_init_output:
            zero_module(m.output_layer)
