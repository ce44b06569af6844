"""The hierarchical multi-modal autoencoder of MM-LDM (paper section 3.1, DESIGN section 4).

Frames and audio images arrive as KL-VAE latents (4 x 32 x 32 at 256^2). Two modality-specific
encoders compress them into perceptual latents (KL posteriors; z_v 16 x 16 x 16, z_a 16 x 8 x 8 in
the paper preset). Two projectors lift each perceptual latent to four semantic tokens in a shared
768-d space, trained by a classification head and a CLIP-style contrastive head. One diffusion
UNet (diffusers `UNet2DConditionModel`, SD-1.x sized) reconstructs both modalities' VAE latents,
conditioned on:

  * multi-scale features of the item's own perceptual latent, added to the UNet encoder stream
    after every down-path layer (video features also depend on the frame index);
  * a content embedding of the own perceptual latent, added to the time embedding;
  * cross-attention context = [modality prompt (77); class token (1); the OTHER modality's
    semantic tokens (4)] = 82 tokens.

Layout: config, helpers, embeddings, blocks, encoders, feature generator, projectors and heads,
signal decoder, the model, presets. Tensor shapes are given with B clips, T frames per clip,
K key frames, C VAE channels, L the VAE latent side, D the semantic / context width.

Defects of the authors' code fixed here (DESIGN section 4): (a) the content and cross-modal
context MLPs zero-initialise only their last layer; (b) the adversarial term reaches the model
through the frozen VAE decoder; (c) the contrastive loss works on one device and gathers
negatives with gradients across ranks; (d) the UNet time embedding trains; (e) semantic losses
see non-detached latents unless `detach_semantic_inputs`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding
from einops import rearrange, repeat
from torch import Tensor, nn
from torch.distributed.nn.functional import all_gather

from mmldm_ae.diffusion import (
    NoiseScheduleConfig,
    build_sampling_scheduler,
    build_train_scheduler,
    diffusion_target,
    guided_eps,
    predict_x0,
    q_sample,
    sample_timesteps,
)
from mmldm_data.config import ConfigError

#################################################################################
#                                   Config                                      #
#################################################################################


@dataclass
class DiscriminatorConfig:
    """Cross-modal spatio-temporal discriminator over [audio image, frame a, frame b] in pixels.

    Level i works at spatial downsampling 2**i; attention kinds are chosen by that factor.
    """

    channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 4, 6, 6])
    blocks_per_level: int = 1
    full_attention_ds: list[int] = field(default_factory=lambda: [32])  # over (slot, h, w)
    temporal_attention_ds: list[int] = field(default_factory=lambda: [4, 8, 16])  # over slots
    head_dim: int = 32


@dataclass
class AEConfig:
    # Inputs: frames and audio images of resolution^2 pixels, seen as frozen KL-VAE latents.
    resolution: int = 256
    vae_downsample: int = 8  # spatial factor of the KL-VAE (SD KL-f8)
    vae_channels: int = 4
    num_key_frames: int = 4
    num_target_frames: int = 2  # frames per clip the decoder learns to reconstruct per step

    # Perceptual latents (KL posteriors).
    latent_channels: int = 16
    # Log-variance the posteriors start at (LDM: 0, unit variance). With w_kl ~ 1e-8 the variance
    # is effectively free, but at unit variance the first thousands of steps decode latents that
    # are about half noise; a short CPU run learns much faster from nearly deterministic latents.
    initial_posterior_logvar: float = 0.0
    encoder_channels: int = 320
    video_encoder_mult: list[int] = field(default_factory=lambda: [1, 2])
    audio_encoder_mult: list[int] = field(default_factory=lambda: [1, 2, 4])
    encoder_blocks: int = 2  # residual blocks per level
    encoder_head_dim: int = 64
    dropout: float = 0.0

    # Shared semantic space (its width is also the UNet's cross-attention width).
    semantic_dim: int = 768
    projector_channels: int = 128
    video_projector_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    audio_projector_mult: list[int] = field(default_factory=lambda: [1, 2, 4])
    video_projector_blocks: int = 3
    audio_projector_blocks: int = 4
    projector_head_dim: int = 32
    contrastive_dim: int = 256
    contrastive_temperature: float = 0.07  # initial value of both learnable temperatures

    # Signal decoder: diffusers UNet2DConditionModel (defaults: SD-1.x).
    unet_channels: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    unet_cross_attention: list[bool] = field(default_factory=lambda: [True, True, True, False])
    unet_layers_per_block: int = 2
    unet_heads: int = 8
    unet_norm_groups: int = 32
    prompt_tokens: int = 77
    # The authors embed the fractional index i/16 with a timestep sinusoid made for [0, 1000),
    # which leaves it almost constant over [0, 1); scaling by 1000 spreads it over all frequencies.
    frame_index_scale: float = 1000.0
    # Local diffusers folder of an SD-1.x UNet (or a whole pipeline with a unet/ subfolder).
    unet_init: str | None = None

    # Ablation toggles of paper Table 5 (weight initialisation is `unet_init`).
    learnable_prompt: bool = True  # off: the prompt slots hold fixed zeros
    content_embedding: bool = True  # own latent -> MLP -> added to the time embedding
    class_embedding: bool = True  # learnable class token in the context
    semantic_context: bool = True  # the other modality's semantic tokens in the context
    adversarial: bool = True
    detach_semantic_inputs: bool = False  # True: the authors' behaviour (semantic losses stop at the latents)

    # Loss weights (paper: w_kl 1e-8 AIST++ / 1e-9 Landscape; authors' configs: con 0.03).
    w_kl: float = 1e-8
    w_cls: float = 0.1
    w_con: float = 0.1
    w_adv: float = 0.1
    guidance_dropout: float = 0.1  # per modality: its prompt and its encoder input are zeroed

    # Decoding.
    decode_steps: int = 50
    guidance_audio: float = 2.5
    guidance_video: float = 2.5

    schedule: NoiseScheduleConfig = field(default_factory=NoiseScheduleConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)

    @property
    def latent_size(self) -> int:
        """Side of the VAE latent of one frame or audio image."""
        return self.resolution // self.vae_downsample

    @property
    def video_latent_size(self) -> int:
        return self.latent_size // 2 ** (len(self.video_encoder_mult) - 1)

    @property
    def audio_latent_size(self) -> int:
        return self.latent_size // 2 ** (len(self.audio_encoder_mult) - 1)

    @property
    def semantic_size(self) -> int:
        return self.video_latent_size // 2 ** (len(self.video_projector_mult) - 1)

    @property
    def semantic_tokens(self) -> int:
        return self.semantic_size**2

    @property
    def context_tokens(self) -> int:
        return (
            self.prompt_tokens
            + int(self.class_embedding)
            + (self.semantic_tokens if self.semantic_context else 0)
        )

    def validate(self) -> None:
        problems = []
        if self.resolution % self.vae_downsample:
            problems.append(
                f"ae.resolution={self.resolution} is not a multiple of ae.vae_downsample={self.vae_downsample}"
            )
        unet_factor = 2 ** (len(self.unet_channels) - 1)
        if self.latent_size % unet_factor:
            problems.append(
                f"latent side {self.latent_size} is not divisible by the UNet's {unet_factor}x downsampling"
            )
        for name, mult in (
            ("video_encoder_mult", self.video_encoder_mult),
            ("audio_encoder_mult", self.audio_encoder_mult),
        ):
            if not mult or self.latent_size % 2 ** (len(mult) - 1):
                problems.append(f"ae.{name}={mult} does not divide the latent side {self.latent_size}")
        if self.video_latent_size % 2 ** (len(self.video_projector_mult) - 1):
            problems.append(
                f"ae.video_projector_mult={self.video_projector_mult} does not divide the video latent side "
                f"{self.video_latent_size}"
            )
        audio_semantic = self.audio_latent_size // 2 ** (len(self.audio_projector_mult) - 1)
        if self.semantic_size < 1 or audio_semantic != self.semantic_size:
            problems.append(
                f"the projectors must end at the same size: video {self.semantic_size}, audio {audio_semantic} "
                "(adjust ae.video_projector_mult / ae.audio_projector_mult)"
            )
        if len(self.unet_cross_attention) != len(self.unet_channels):
            problems.append("ae.unet_cross_attention needs one flag per entry of ae.unet_channels")
        if self.unet_channels[0] % self.unet_norm_groups:
            problems.append(f"ae.unet_norm_groups={self.unet_norm_groups} must divide ae.unet_channels")
        if self.prompt_tokens < 1:
            problems.append(
                "ae.prompt_tokens must be >= 1 (the prompt slots also carry the unconditional branch)"
            )
        if not 0.0 <= self.guidance_dropout < 1.0:
            problems.append(f"ae.guidance_dropout must be in [0, 1), got {self.guidance_dropout}")
        if not 0.0 < self.contrastive_temperature <= 1.0:
            problems.append(
                f"ae.contrastive_temperature must be in (0, 1], got {self.contrastive_temperature}"
            )
        problems += [f"loss weight ae.{name} must be >= 0, got {getattr(self, name)}"
                     for name in ("w_kl", "w_cls", "w_con", "w_adv") if getattr(self, name) < 0]
        if self.adversarial and self.num_target_frames != 2:
            problems.append(
                "the discriminator compares [audio, frame a, frame b]: ae.num_target_frames must be 2"
            )
        if self.decode_steps < 1:
            problems.append("ae.decode_steps must be >= 1")
        if problems:
            raise ConfigError("invalid autoencoder config:\n  " + "\n  ".join(problems))
        self.schedule.validate()


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
    return torch.cat([F.scaled_dot_product_attention(*(y[start : start + MAX_ATTENTION_BATCH] for y in (q, k, v)))
                      for start in range(0, q.shape[0], MAX_ATTENTION_BATCH)])


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


#################################################################################
#                                  Encoders                                     #
#################################################################################


class DiagonalGaussian:
    """KL posterior N(mean, exp(logvar)) over a perceptual latent [B, C', h, w]."""

    def __init__(self, mean: Tensor, logvar: Tensor):
        self.mean, self.logvar = mean, logvar.clamp(-30.0, 20.0)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        return self.mean + (0.5 * self.logvar).exp() * random_normal(self.mean.shape, self.mean, generator)

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
        self.mean_head = self._head(width, out_channels, kt)
        self.logvar_head = self._head(
            width, out_channels, kt
        )  # last conv zero-initialised: start at unit variance

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
        return DiagonalGaussian(self.mean_head(h)[:, :, 0], self.logvar_head(h)[:, :, 0])


#################################################################################
#                              Feature generator                                #
#################################################################################


class FeatureGenerator(nn.Module):
    """Perceptual latent -> one feature map per UNet down-path position, each behind a zero 1x1 conv.

    Position p gets ResBlock(latent -> channels[p]) resampled from the latent's side to sizes[p],
    then a zero-initialised 1x1 conv, so the injection starts as an exact no-op. The ResBlocks do
    not zero their own output as well: with two zero layers in series the layers before them would
    get no gradient until the second optimiser step.
    """

    def __init__(
        self,
        latent_channels: int,
        latent_size: int,
        channels: Sequence[int],
        sizes: Sequence[int],
        emb_channels: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        steps = [math.log2(size / latent_size) for size in sizes]
        if any(s != int(s) for s in steps):
            raise ValueError(
                f"feature sizes {list(sizes)} are not power-of-two multiples of the latent side {latent_size}"
            )
        self.blocks = nn.ModuleList(
            ResBlock(
                latent_channels, ch, emb_channels, resample=int(s), dropout=dropout, zero_init_output=False
            )
            for ch, s in zip(channels, steps, strict=True)
        )
        self.zero_convs = nn.ModuleList(nn.Conv2d(ch, ch, 1) for ch in channels)

    def forward(
        self, z: Tensor, emb: Tensor | None = None
    ) -> list[Tensor]:  # [N, C', l, l] -> P x [N, ch_p, s_p, s_p]
        return [out(block(z, emb)) for block, out in zip(self.blocks, self.zero_convs, strict=True)]


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


#################################################################################
#                               Signal decoder                                  #
#################################################################################


@dataclass
class DecoderConditions:
    """Everything the UNet sees besides x_t and t, for a stack of N items."""

    features: list[Tensor]  # P x [N, ch_p, s_p, s_p], added after each down-path position
    context: Tensor  # [N, context_tokens, D]
    content: Tensor | None  # [N, time_embed_dim], added to the time embedding

    def cat(self, other: DecoderConditions) -> DecoderConditions:
        return DecoderConditions(
            [torch.cat(pair) for pair in zip(self.features, other.features, strict=True)],
            torch.cat([self.context, other.context]),
            None if self.content is None else torch.cat([self.content, other.content]),
        )


class SignalDecoder(nn.Module):
    """diffusers `UNet2DConditionModel` whose encoder stream receives one feature per position.

    The authors run `h = input_block[i](h); h = h + feature[i]` for the 12 SD input blocks, so
    each feature changes the stream that the next block sees and the skip connection alike.
    diffusers' `down_block_additional_residuals` only adds to the skips, so instead a forward hook
    on every down-path module (conv_in, each down block's attention or resnet, each downsampler)
    adds that position's feature to the module's output. The features live only for the duration
    of `forward`; diffusers' per-block gradient checkpointing (which would re-run the hooks during
    backward) is therefore not supported.
    The content embedding enters as an identity "class embedding", which diffusers adds to the
    time embedding after the time MLP, as the authors do.
    """

    def __init__(self, cfg: AEConfig):
        super().__init__()
        attention = cfg.unet_cross_attention
        self.unet = UNet2DConditionModel(
            sample_size=cfg.latent_size,
            in_channels=cfg.vae_channels,
            out_channels=cfg.vae_channels,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
            block_out_channels=tuple(cfg.unet_channels),
            layers_per_block=cfg.unet_layers_per_block,
            cross_attention_dim=cfg.semantic_dim,
            attention_head_dim=cfg.unet_heads,  # diffusers' name for the number of heads (SD: 8)
            norm_num_groups=cfg.unet_norm_groups,
            class_embed_type="identity" if cfg.content_embedding else None,
        )
        modules, self.injection_channels, self.injection_sizes = self._injection_points(cfg)
        for position, module in enumerate(modules):
            module.register_forward_hook(partial(self._add_feature, position))
        self._features: list[Tensor] | None = None

    def _injection_points(self, cfg: AEConfig) -> tuple[list[nn.Module], list[int], list[int]]:
        size = cfg.latent_size
        modules, channels, sizes = [self.unet.conv_in], [cfg.unet_channels[0]], [size]
        for block, width in zip(self.unet.down_blocks, cfg.unet_channels, strict=True):
            layers = block.attentions if getattr(block, "attentions", None) is not None else block.resnets
            modules += list(layers)
            channels += [width] * len(layers)
            sizes += [size] * len(layers)
            if block.downsamplers is not None:
                size //= 2
                modules.append(block.downsamplers[0])
                channels.append(width)
                sizes.append(size)
        return modules, channels, sizes

    @property
    def time_embed_dim(self) -> int:
        return self.unet.time_embedding.linear_2.out_features

    def _add_feature(
        self, position: int, module: nn.Module, inputs: tuple, output: Tensor | tuple
    ) -> Tensor | tuple:
        if self._features is None:
            raise RuntimeError(
                "a UNet down-path module ran outside SignalDecoder.forward (called the UNet directly, or "
                "diffusers gradient checkpointing re-ran it during backward): call SignalDecoder instead"
            )
        feature = self._features[position]
        if isinstance(output, tuple):  # Transformer2DModel with return_dict=False
            return (output[0] + feature, *output[1:])
        return output + feature

    def forward(
        self, x_t: Tensor, timesteps: Tensor, cond: DecoderConditions
    ) -> Tensor:  # [N, C, L, L] -> eps [N, C, L, L]
        if len(cond.features) != len(self.injection_channels):
            raise ValueError(
                f"expected {len(self.injection_channels)} injected features, got {len(cond.features)}"
            )
        self._features = cond.features
        try:
            return self.unet(
                x_t, timesteps, encoder_hidden_states=cond.context, class_labels=cond.content
            ).sample
        finally:
            self._features = None


def load_unet_weights(unet: UNet2DConditionModel, path: str | Path) -> None:
    """Initialise `unet` from a local diffusers UNet folder (or a pipeline folder with unet/)."""
    folder = Path(path).expanduser()
    if (folder / "unet" / "config.json").is_file():
        folder = folder / "unet"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"ae.unet_init={str(path)!r} is not a local diffusers UNet folder (config.json + weights) nor a "
            "pipeline folder with a unet/ subfolder. Download an SD-1.x repository once (e.g. "
            "stable-diffusion-v1-5/stable-diffusion-v1-5) and point ae.unet_init at it, or set ae.unet_init=null "
            "to start from random weights; nothing is downloaded at run time."
        )
    pretrained = UNet2DConditionModel.from_pretrained(folder, local_files_only=True)
    ours, theirs = unet.state_dict(), pretrained.state_dict()
    mismatched = sorted(k for k in ours.keys() & theirs.keys() if ours[k].shape != theirs[k].shape)
    missing, unexpected = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
    if mismatched or missing or unexpected:
        raise ValueError(
            f"the UNet in {folder} does not match the ae config's signal decoder: "
            f"shape mismatches {mismatched[:5]}, missing {missing[:5]}, unexpected {unexpected[:5]} "
            "(ae.unet_init needs an SD-1.x UNet and the paper preset's unet_* settings)"
        )
    unet.load_state_dict(theirs)


#################################################################################
#                    Hierarchical multi-modal autoencoder                       #
#################################################################################

AUDIO, VIDEO = 0, 1  # rows of the modality prompts
BATCH_KEYS = ("key_latents", "target_latents", "target_indices", "audio_latents", "class_id")


class MultiModalAutoencoder(nn.Module):
    """MM-LDM's autoencoder over KL-VAE latents; `num_classes` = 0 for class-free datasets.

    The discriminator is a separate module (mmldm_ae.discriminator) with its own optimiser; the
    generator step passes it to `training_losses`.
    """

    def __init__(self, cfg: AEConfig, num_classes: int):
        super().__init__()
        cfg.validate()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: no class labels), got {num_classes}")
        self.cfg, self.num_classes = cfg, num_classes
        C, D = cfg.vae_channels, cfg.semantic_dim

        # Encoders: [B, K, C, L, L] -> z_v [B, C', L/2, L/2]; [B, C, L, L] -> z_a [B, C', L/4, L/4].
        encoder = partial(
            PerceptualEncoder,
            C,
            cfg.latent_size,
            cfg.latent_channels,
            cfg.encoder_channels,
            blocks_per_level=cfg.encoder_blocks,
            head_dim=cfg.encoder_head_dim,
            dropout=cfg.dropout,
        )
        self.video_encoder = encoder(channel_mult=cfg.video_encoder_mult, content="frame", temporal=True)
        self.audio_encoder = encoder(channel_mult=cfg.audio_encoder_mult, content="channels", temporal=False)

        # Semantic space: z -> [B, D, s, s]; heads over it.
        projector = partial(
            SemanticProjector,
            cfg.latent_channels,
            cfg.projector_channels,
            head_dim=cfg.projector_head_dim,
            out_dim=D,
            dropout=cfg.dropout,
        )
        self.video_projector = projector(cfg.video_projector_mult, cfg.video_projector_blocks)
        self.audio_projector = projector(cfg.audio_projector_mult, cfg.audio_projector_blocks)
        self.classifier = ClassificationHead(D, num_classes) if num_classes > 0 else None
        self.contrastive = ContrastiveHead(D, cfg.contrastive_dim, cfg.contrastive_temperature)

        # Signal decoder and its conditions.
        self.decoder = SignalDecoder(cfg)
        E = self.decoder.time_embed_dim
        channels, sizes = self.decoder.injection_channels, self.decoder.injection_sizes
        self.frame_index_embed = FrameIndexEmbedder(cfg.unet_channels[0], E, cfg.frame_index_scale)
        self.video_features = FeatureGenerator(
            cfg.latent_channels, cfg.video_latent_size, channels, sizes, E, cfg.dropout
        )
        self.audio_features = FeatureGenerator(
            cfg.latent_channels, cfg.audio_latent_size, channels, sizes, None, cfg.dropout
        )
        if cfg.content_embedding:
            self.video_content = MLP(cfg.latent_channels * cfg.video_latent_size**2, E, E)
            self.audio_content = MLP(cfg.latent_channels * cfg.audio_latent_size**2, E, E)
        prompt = torch.randn(2, cfg.prompt_tokens, D) * 0.1
        if cfg.learnable_prompt:
            self.prompts = nn.Parameter(prompt)  # [AUDIO, VIDEO]
        else:
            self.register_buffer("prompts", torch.zeros_like(prompt))
        if cfg.class_embedding:
            self.class_embed = nn.Embedding(num_classes + 1, D)  # last row: no / unknown class
        if cfg.semantic_context:
            self.context_from_video = MLP(D, D, D)  # video semantic tokens -> audio items' context
            self.context_from_audio = MLP(D, D, D)

        self.train_scheduler = build_train_scheduler(cfg.schedule)
        self.initialize_weights()
        if cfg.unet_init:
            load_unet_weights(self.decoder.unet, cfg.unet_init)

    def initialize_weights(self) -> None:
        for name, module in self.named_children():
            if name != "decoder":  # the UNet keeps diffusers' initialisation (or SD weights)
                init_weights_(module)
        nn.init.normal_(self.frame_index_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.frame_index_embed.mlp[2].weight, std=0.02)
        if self.cfg.class_embedding:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        # Posteriors start at exp(initial_posterior_logvar) variance around the mean head's output.
        for head in (self.video_encoder.logvar_head[-1], self.audio_encoder.logvar_head[-1]):
            zero_module(head)
            nn.init.constant_(head.bias, self.cfg.initial_posterior_logvar)
        # Conditions that start as exact no-ops: only their LAST layer is zero, so every earlier
        # layer gets a gradient as soon as that layer moves (the authors zeroed whole MLPs).
        for conv_out in (*self.video_features.zero_convs, *self.audio_features.zero_convs):
            zero_module(conv_out)
        if self.cfg.content_embedding:
            zero_module(self.video_content.out)
            zero_module(self.audio_content.out)
        if self.cfg.semantic_context:
            zero_module(self.context_from_video.out)
            zero_module(self.context_from_audio.out)

    def generator_parameters(self) -> list[nn.Parameter]:
        """Everything this module trains (the discriminator is a separate module)."""
        return [p for p in self.parameters() if p.requires_grad]

    # ----------------------------------------------------------------- encoding

    def posteriors(
        self, key_latents: Tensor, audio_latents: Tensor
    ) -> tuple[DiagonalGaussian, DiagonalGaussian]:
        return self.video_encoder(key_latents), self.audio_encoder(audio_latents.unsqueeze(1))

    def encode(
        self,
        key_latents: Tensor,
        audio_latents: Tensor,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """[B, K, C, L, L], [B, C, L, L] -> z_v [B, C', L/2, L/2], z_a [B, C', L/4, L/4] (posterior modes unless sample)."""
        self._check_shape(
            "key_latents",
            key_latents,
            (self.cfg.num_key_frames, self.cfg.vae_channels, self.cfg.latent_size, self.cfg.latent_size),
        )
        self._check_shape(
            "audio_latents",
            audio_latents,
            (self.cfg.vae_channels, self.cfg.latent_size, self.cfg.latent_size),
        )
        post_v, post_a = self.posteriors(key_latents, audio_latents)
        if sample:
            return post_v.sample(generator), post_a.sample(generator)
        return post_v.mode(), post_a.mode()

    def semantics(self, z_v: Tensor, z_a: Tensor) -> tuple[Tensor, Tensor]:
        """Perceptual latents -> semantic features s_v, s_a [B, D, s, s]."""
        return self.video_projector(z_v), self.audio_projector(z_a)

    def predict_class(self, z_v: Tensor, z_a: Tensor) -> Tensor:
        """Class ids [B] from the classification head; -1 (no class) for class-free models."""
        if self.classifier is None:
            return torch.full((z_v.shape[0],), -1, dtype=torch.long, device=z_v.device)
        return self.classifier(*self.semantics(z_v, z_a)).argmax(dim=-1)

    # --------------------------------------------------------- decoder inputs

    def _check_class_ids(self, class_id: Tensor) -> None:
        if class_id.numel() and (class_id.max() >= self.num_classes or class_id.min() < -1):
            raise ValueError(
                f"class ids must be in [-1, {self.num_classes - 1}] (-1: none) for num_classes={self.num_classes}, "
                f"got {class_id.tolist()}"
            )

    def _class_tokens(self, class_id: Tensor) -> Tensor:  # [B] -> [B, 1, D]
        rows = torch.where(class_id < 0, torch.full_like(class_id, self.num_classes), class_id)
        return self.class_embed(rows)[:, None]

    def _context(
        self, modality: int, keep_prompt: Tensor, class_tokens: Tensor | None, other_semantic: Tensor
    ) -> Tensor:
        """[prompt (zeroed where dropped); class token; the other modality's semantic tokens] -> [B, tokens, D]."""
        prompt = self.prompts[modality] * keep_prompt[:, None, None].to(self.prompts.dtype)
        parts = [prompt]
        if class_tokens is not None:
            parts.append(class_tokens)
        if self.cfg.semantic_context:
            mlp = self.context_from_video if modality == AUDIO else self.context_from_audio
            parts.append(mlp(rearrange(other_semantic, "b d h w -> b (h w) d")))
        return torch.cat(parts, dim=1)

    def decoder_conditions(
        self,
        z_v: Tensor,
        z_a: Tensor,
        s_v: Tensor,
        s_a: Tensor,
        frame_index: Tensor,
        class_id: Tensor,
        keep_audio_prompt: Tensor,
        keep_video_prompt: Tensor,
    ) -> DecoderConditions:
        """Conditions of the items [B audio images; B*T frames] of B clips with frame indices [B, T] in [0, 1)."""
        frames = frame_index.shape[1]
        per_frame = partial(repeat, pattern="b ... -> (b t) ...", t=frames)
        video_features = self.video_features(
            per_frame(z_v), self.frame_index_embed(rearrange(frame_index, "b t -> (b t)"))
        )
        features = [torch.cat(pair) for pair in zip(self.audio_features(z_a), video_features, strict=True)]
        class_tokens = self._class_tokens(class_id) if self.cfg.class_embedding else None
        audio_context = self._context(AUDIO, keep_audio_prompt, class_tokens, s_v)
        video_context = self._context(VIDEO, keep_video_prompt, class_tokens, s_a)
        context = torch.cat([audio_context, per_frame(video_context)])
        content = None
        if self.cfg.content_embedding:
            content = torch.cat(
                [self.audio_content(z_a.flatten(1)), per_frame(self.video_content(z_v.flatten(1)))]
            )
        return DecoderConditions(features, context, content)

    # ----------------------------------------------------------------- training

    def _check_shape(self, name: str, tensor: Tensor, expected_tail: tuple[int, ...]) -> None:
        if tuple(tensor.shape[1:]) != expected_tail:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected [B, {', '.join(map(str, expected_tail))}] "
                f"for this AEConfig (resolution {self.cfg.resolution}, vae_downsample {self.cfg.vae_downsample}, "
                f"{self.cfg.vae_channels} VAE channels)"
            )

    def forward(
        self,
        batch: dict[str, Tensor],
        vae: nn.Module,
        discriminator: nn.Module | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """The generator step's losses (see `training_losses`); going through forward lets DDP sync it."""
        return self.training_losses(batch, vae, discriminator=discriminator, generator=generator)

    def training_losses(
        self,
        batch: dict[str, Tensor],
        vae: nn.Module,
        discriminator: nn.Module | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Losses of one generator step on a batch of VAE latents.

        batch: key_latents [B, K, C, L, L], target_latents [B, T, C, L, L], target_indices [B, T]
        (i/16), audio_latents [B, C, L, L], class_id [B] (-1: none). `vae` is the frozen KL-VAE
        (encode/decode/scale); its decoder turns the one-step x0 estimates into pixels for the
        adversarial term, with gradients. Returns scalars "loss" (the total), "mse_audio",
        "mse_video", "kl", "kl_video", "kl_audio", "cls", "cls_acc", "con", "adv_g",
        "guidance_drop_audio", "guidance_drop_video", and with the adversarial loss on the
        discriminator step's inputs "disc_real", "disc_fake" [B, 3, 3, H, W] (detached,
        slots [audio image, frame a, frame b]).
        """
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"training batch lacks {missing}; it needs {list(BATCH_KEYS)}")
        cfg = self.cfg
        L = cfg.latent_size
        key, targets, index = batch["key_latents"], batch["target_latents"], batch["target_indices"]
        audio, class_id = batch["audio_latents"], batch["class_id"].long()
        self._check_shape("batch['key_latents']", key, (cfg.num_key_frames, cfg.vae_channels, L, L))
        self._check_shape("batch['target_latents']", targets, (targets.shape[1], cfg.vae_channels, L, L))
        self._check_shape("batch['audio_latents']", audio, (cfg.vae_channels, L, L))
        B, T = targets.shape[:2]
        if tuple(index.shape) != (B, T):
            raise ValueError(f"batch['target_indices'] has shape {tuple(index.shape)}, expected [{B}, {T}]")
        if cfg.adversarial and discriminator is None:
            raise ValueError(
                "ae.adversarial is on but training_losses got no discriminator: pass "
                "discriminator=build_discriminator(cfg) (mmldm_ae.discriminator) or set ae.adversarial=false"
            )
        self._check_class_ids(class_id)
        device = key.device

        # Guidance dropout: a dropped modality loses its prompt and its encoder input together,
        # which is exactly the unconditional branch that decode() guides against.
        keep_audio, keep_video = self.guidance_keep_masks(B, device, generator)
        post_v, post_a = self.posteriors(
            key * keep_video[:, None, None, None, None].to(key.dtype),
            audio * keep_audio[:, None, None, None].to(audio.dtype),
        )
        z_v, z_a = post_v.sample(generator), post_a.sample(generator)
        kl_video, kl_audio = post_v.kl().mean(), post_a.kl().mean()

        if cfg.detach_semantic_inputs:
            s_v, s_a = self.semantics(z_v.detach(), z_a.detach())
        else:
            s_v, s_a = self.semantics(z_v, z_a)
        cls, cls_acc = self._classification_loss(s_v, s_a, class_id)
        con = self.contrastive(s_v, s_a)

        # Items [B audio images; B*T frames], each with its own timestep (the authors' independent t).
        cond = self.decoder_conditions(
            z_v, z_a, s_v, s_a, index.to(z_v.dtype), class_id, keep_audio, keep_video
        )
        x0 = torch.cat([audio, rearrange(targets, "b t c h w -> (b t) c h w")])
        timesteps = sample_timesteps(self.train_scheduler, x0.shape[0], device, generator)
        noise = random_normal(x0.shape, x0, generator)
        x_t = q_sample(self.train_scheduler, x0, noise, timesteps)
        target = diffusion_target(self.train_scheduler, x0, noise, timesteps)
        prediction = self.decoder(x_t, timesteps, cond)
        mse_audio = F.mse_loss(prediction[:B], target[:B])
        mse_video = F.mse_loss(prediction[B:], target[B:])

        losses = {
            "mse_audio": mse_audio,
            "mse_video": mse_video,
            "kl_video": kl_video,
            "kl_audio": kl_audio,
            "kl": kl_video + kl_audio,
            "cls": cls,
            "cls_acc": cls_acc,
            "con": con,
            "adv_g": torch.zeros((), device=device),
            "guidance_drop_audio": (~keep_audio).float().mean(),
            "guidance_drop_video": (~keep_video).float().mean(),
        }
        if cfg.adversarial:
            # Fakes are the one-step x0 estimates decoded through the frozen VAE WITH gradients
            # (the authors decoded under no_grad, leaving this term without effect). Reals are
            # VAE decodes of the true latents, as the authors', so that D cannot win on VAE artefacts.
            x0_hat = predict_x0(self.train_scheduler, x_t, prediction, timesteps)
            fake = self._slots(vae.decode(x0_hat), B)
            with torch.no_grad():
                real = self._slots(vae.decode(x0), B)
            losses["adv_g"] = hinge_loss(discriminator(fake), 1.0)
            losses["disc_real"], losses["disc_fake"] = real, fake.detach()
        losses["loss"] = (
            mse_audio
            + mse_video
            + cfg.w_kl * losses["kl"]
            + cfg.w_cls * cls
            + cfg.w_con * con
            + cfg.w_adv * losses["adv_g"]
        )
        return losses

    def guidance_keep_masks(
        self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Which clips keep their audio / video condition: independent draws, each kept w.p. 1 - p."""
        keep_audio = random_uniform((batch_size,), device, generator) >= self.cfg.guidance_dropout
        keep_video = random_uniform((batch_size,), device, generator) >= self.cfg.guidance_dropout
        return keep_audio, keep_video

    @staticmethod
    def _slots(pixels: Tensor, clips: int) -> Tensor:
        """Decoded items [B + B*T, 3, H, W] -> [B, 1 + T, 3, H, W] = [audio image, frames...] per clip."""
        audio, frames = pixels[:clips], rearrange(pixels[clips:], "(b t) c h w -> b t c h w", b=clips)
        return torch.cat([audio[:, None], frames], dim=1)

    def _classification_loss(self, s_v: Tensor, s_a: Tensor, class_id: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-entropy over labelled clips (class_id -1 ignored) and their accuracy."""
        if self.classifier is None:
            zero = s_v.sum() * 0.0
            return zero, zero.detach()
        logits = self.classifier(s_v, s_a)
        labelled = class_id >= 0
        if not labelled.any():  # keep the head in the graph so that every rank reduces the same parameters
            return logits.sum() * 0.0, torch.zeros((), device=logits.device)
        accuracy = (logits.argmax(-1) == class_id)[labelled].float().mean()
        return F.cross_entropy(logits, class_id, ignore_index=-1), accuracy

    # ----------------------------------------------------------------- decoding

    @torch.no_grad()
    def decode(
        self,
        z_v: Tensor,
        z_a: Tensor,
        num_frames: int = 16,
        steps: int | None = None,
        guidance_audio: float | None = None,
        guidance_video: float | None = None,
        generator: torch.Generator | None = None,
        class_id: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """DDIM reconstruction: z_v, z_a -> frame latents [B, T, C, L, L], audio latent [B, C, L, L].

        All T frames of a clip are decoded in one batch with frame index t/T. Guidance per modality:
        eps_u + s (eps_c - eps_u), where the unconditional branch uses zero prompts and the latents
        of an all-zero encoder input through the whole pipeline (features, content, context), as
        in training's guidance dropout. Both branches use the same class token: class_id, or the
        classification head's prediction when None. steps / guidance default to the config.
        """
        cfg = self.cfg
        steps = steps or cfg.decode_steps
        guidance_audio = cfg.guidance_audio if guidance_audio is None else guidance_audio
        guidance_video = cfg.guidance_video if guidance_video is None else guidance_video
        B, device = z_v.shape[0], z_v.device
        frame_index = (torch.arange(num_frames, device=device, dtype=z_v.dtype) / num_frames).expand(
            B, num_frames
        )
        s_v, s_a = self.semantics(z_v, z_a)
        if class_id is None:
            class_id = self.predict_class(z_v, z_a)
        class_id = class_id.to(device).long()
        self._check_class_ids(class_id)
        keep = torch.ones(B, dtype=torch.bool, device=device)
        cond = self.decoder_conditions(z_v, z_a, s_v, s_a, frame_index, class_id, keep, keep)
        guided = guidance_audio != 1.0 or guidance_video != 1.0
        if guided:
            L = cfg.latent_size
            null_key = torch.zeros(
                1, cfg.num_key_frames, cfg.vae_channels, L, L, device=device, dtype=z_v.dtype
            )
            null_v, null_a = (z.expand(B, -1, -1, -1) for z in self.encode(null_key, null_key[:, 0]))
            cond = cond.cat(
                self.decoder_conditions(
                    null_v, null_a, *self.semantics(null_v, null_a), frame_index, class_id, ~keep, ~keep
                )
            )
            scale = torch.cat(
                [torch.full((B,), guidance_audio), torch.full((B * num_frames,), guidance_video)]
            )

        scheduler = build_sampling_scheduler(cfg.schedule, steps)
        x = random_normal(
            (B * (1 + num_frames), cfg.vae_channels, cfg.latent_size, cfg.latent_size), z_v, generator
        )
        for t in scheduler.timesteps:
            model_input = torch.cat([x, x]) if guided else x
            output = self.decoder(model_input, t.to(device).expand(model_input.shape[0]), cond)  # eps or v
            if guided:
                output_cond, output_uncond = output.chunk(2)
                output = guided_eps(output_uncond, output_cond, scale)
            x = scheduler.step(output, t, x, eta=0.0).prev_sample
        return rearrange(x[B:], "(b t) c h w -> b t c h w", b=B), x[:B]


#################################################################################
#                                   Presets                                     #
#################################################################################

AE_PRESETS: dict[str, AEConfig] = {
    # Paper / authors' configs: 256^2 frames -> SD KL-f8 latents 4x32x32; z_v 16x16x16,
    # z_a 16x8x8, semantic 768x2x2, SD-1.x UNet, 77 + 1 + 4 = 82 context tokens, 12 injections.
    "paper": AEConfig(),
    # CPU: 64^2 frames through the tiny KL-VAE (4x16x16); z_v 8x8x8, z_a 8x4x4, semantic 64x2x2,
    # a two-level UNet, 8 + 1 + 4 = 13 context tokens, 4 injections.
    # Three settings differ from the paper's so that it learns within minutes on a CPU: v prediction,
    # posteriors that start nearly deterministic, and no adversarial term (the discriminator made
    # each step 5x slower); ae.adversarial=true etc. restore them.
    "tiny": AEConfig(
        resolution=64,
        vae_downsample=4,
        latent_channels=8,
        initial_posterior_logvar=-6.0,
        encoder_channels=32,
        video_encoder_mult=[1, 2],
        audio_encoder_mult=[1, 2, 4],
        encoder_blocks=1,
        encoder_head_dim=32,
        semantic_dim=64,
        projector_channels=32,
        video_projector_mult=[1, 2, 2],
        audio_projector_mult=[1, 2],
        video_projector_blocks=1,
        audio_projector_blocks=1,
        projector_head_dim=32,
        contrastive_dim=32,
        unet_channels=[32, 64],
        unet_cross_attention=[True, True],
        unet_layers_per_block=1,
        unet_heads=4,
        unet_norm_groups=8,
        prompt_tokens=8,
        adversarial=False,
        schedule=NoiseScheduleConfig(prediction_type="v_prediction"),
        discriminator=DiscriminatorConfig(
            channels=16,
            channel_mult=[1, 2, 2, 4],
            full_attention_ds=[8],
            temporal_attention_ds=[2, 4],
            head_dim=16,
        ),
    ),
}


def ae_preset(name: str, **overrides) -> AEConfig:
    """A copy of a preset with some fields replaced."""
    if name not in AE_PRESETS:
        raise KeyError(f"unknown autoencoder preset {name!r}; choose one of {sorted(AE_PRESETS)}")
    return replace(copy.deepcopy(AE_PRESETS[name]), **overrides)
