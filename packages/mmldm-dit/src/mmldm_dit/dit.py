"""The MM-LDM DiT over audio and video perceptual latents (paper section 3.2, docs/design.md#dit).

One transformer denoises both modalities at a shared timestep. With patch size p (paper: 1) the
sequence is, for the paper preset,

    [context (77)][EOS_a][audio tokens: z_a 16x8x8 -> 64][EOS_v][video tokens: z_v 16x16x16 -> 256] = 399

under full self-attention. Each modality has its own patch embedding, a fixed 2-D sin-cos
position embedding of its grid, a learnable per-token modality embedding and its own final layer;
the context is a learnable prompt (77 x 768, Linear to the width) that classifier-free guidance
drops. The timestep enters every block through adaLN-Zero; the output is epsilon (no learned sigma).

Conditions enter through zero-initialised embeddings (the paper's zero convolution), so at
initialisation they have exactly no effect:
  * a2v / v2a: the clean latent of the conditioning modality, added to that modality's tokens;
  * long generation (authors' Previous_Cond / AR_DiT): a conditioning DiT over
    [previous clip latent ; noisy current latent] whose per-block outputs, through zero-initialised
    linears, are added after the main DiT's first blocks.

Layout follows DiT's models.py: embedding layers, core blocks, the model, the long-generation
conditioning DiT. B is the batch, L the sequence length, D the width, N a modality's
token count, C its latent channels, S its latent side.

Deviations from the authors' dit_v2.py (docs/design.md#deviations): the condition embedders are
zero-initialised as the paper states (the authors' keep PyTorch's default conv init); the sizes
S/B/L (conf/dit/) follow the paper's Table 4 (the authors' file only carries DiT's image presets, which
its class cannot build); the long-generation model does not also append the previous clip's tokens
to the context (the conditioning DiT already sees them position by position), which keeps the
sequence at 399 tokens instead of 719.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from diffusers.models.embeddings import (
    get_1d_sincos_pos_embed_from_grid,
    get_2d_sincos_pos_embed,
    get_timestep_embedding,
)
from einops import rearrange
from timm.layers import Attention, Mlp, PatchEmbed
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmldm_ae.engine.diffusion import NoiseScheduleConfig
from mmldm_data.config import ConfigError

MODALITIES = ("audio", "video")  # token order in the sequence, whatever the config lists


#################################################################################
#                                   Config                                      #
#################################################################################


@dataclass
class DiTConfig:
    """Defaults: the authors' released DiT-XL/1 on the paper autoencoder's latents (conf/dit/XL.yaml);
    conf/dit/ holds the other sizes."""

    # Which modalities the model generates: both (MM-LDM) or one (the paper's MM-LDM-a / MM-LDM-v).
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    # Perceptual latents as the autoencoder makes them (AEConfig.latent_channels and
    # AEConfig.{audio,video}_latent_size): square grids of side S with C channels.
    audio_latent_channels: int = 16
    audio_latent_size: int = 8
    video_latent_channels: int = 16
    video_latent_size: int = 16
    patch_size: int = 1  # p: each token is a p x p patch of a latent grid (paper: 1)
    # z_v's layout (ae.video_latent): 0, one map for the clip (the paper's); K, K key frames of
    # video_latent_channels / K channels each (ae.video_latent=key_frames, frame-major). With K, every
    # key frame is its own grid of video tokens, audio and video tokens carry a 1-D sin-cos of their
    # time (key frame; column of the audio grid, the mel's time axis), and attention between an audio
    # and a video token is biased by their time apart (`cross_modal_time_bias`): without the bias the
    # tiny DiT took its condition's class and none of its timing (docs/design.md#deviations, 35).
    video_key_frames: int = 0
    video_patch_size: int | None = None  # the video grid's p; None: patch_size
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    # Learnable prompt tokens placed before the modalities (the authors' 77 x 768 context_emb).
    context_tokens: int = 77
    context_dim: int = 768  # width of the prompt tokens, mapped to hidden_size by a Linear
    # Blocks of the long-generation conditioning DiT (authors: 14 at XL); 0 builds the plain model.
    previous_clip_depth: int = 0
    # What the model predicts and over which noise schedule (paper: epsilon; the CPU preset predicts v,
    # which weighs the noisiest steps, where a clip's class and the condition's effect are decided).
    schedule: NoiseScheduleConfig = field(default_factory=NoiseScheduleConfig)

    @property
    def joint(self) -> bool:
        """Both modalities present, so each can condition the other (a2v / v2a)."""
        return len(self.modalities) == 2

    def latent_shape(self, modality: str) -> tuple[int, int, int]:
        """[C, S, S] of one modality's latent."""
        if modality == "audio":
            return self.audio_latent_channels, self.audio_latent_size, self.audio_latent_size
        return self.video_latent_channels, self.video_latent_size, self.video_latent_size

    def patch(self, modality: str) -> int:
        return (self.video_patch_size or self.patch_size) if modality == "video" else self.patch_size

    def frames(self, modality: str) -> int:
        """Grids of tokens the modality's latent makes: its key frames (video) or 1."""
        return self.video_key_frames if modality == "video" and self.video_key_frames else 1

    def num_tokens(self, modality: str) -> int:
        return self.frames(modality) * (self.latent_shape(modality)[1] // self.patch(modality)) ** 2

    @property
    def sequence_length(self) -> int:
        return self.context_tokens + sum(1 + self.num_tokens(m) for m in self.ordered_modalities)

    def token_slices(self) -> dict[str, slice]:
        """Where each part sits in the sequence: context, eos_<m> and <m> for each modality."""
        slices = {"context": slice(0, self.context_tokens)}
        start = self.context_tokens
        for m in self.ordered_modalities:
            slices[f"eos_{m}"] = slice(start, start + 1)
            slices[m] = slice(start + 1, start + 1 + self.num_tokens(m))
            start = slices[m].stop
        return slices

    @property
    def ordered_modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m in self.modalities)

    def validate(self) -> None:
        problems = []
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown or not self.modalities or len(set(self.modalities)) != len(self.modalities):
            problems.append(
                f"dit.modalities={self.modalities} must list audio and/or video once each, "
                "e.g. [audio, video]"
            )
        for name in (
            "audio_latent_channels",
            "audio_latent_size",
            "video_latent_channels",
            "video_latent_size",
        ):
            if getattr(self, name) < 1:
                problems.append(f"dit.{name} must be >= 1, got {getattr(self, name)}")
        if self.patch_size < 1 or (self.video_patch_size is not None and self.video_patch_size < 1):
            problems.append(
                f"dit.patch_size={self.patch_size} and dit.video_patch_size={self.video_patch_size} "
                "must be >= 1 (video_patch_size may be null)"
            )
        else:
            for modality in self.ordered_modalities:
                side, patch = self.latent_shape(modality)[1], self.patch(modality)
                key = "video_patch_size" if modality == "video" and self.video_patch_size else "patch_size"
                if side % patch:
                    problems.append(
                        f"dit.{key}={patch} does not divide the {modality} latent grid "
                        f"{side}x{side} (dit.{modality}_latent_size); "
                        "pick a patch size that divides every grid"
                    )
        if self.video_key_frames < 0 or (
            self.video_key_frames and self.video_latent_channels % self.video_key_frames
        ):
            problems.append(
                f"dit.video_key_frames={self.video_key_frames} must be 0 (one map for the clip) or split "
                f"dit.video_latent_channels={self.video_latent_channels} evenly (ae.num_key_frames)"
            )
        if self.num_heads < 1 or self.hidden_size % self.num_heads:
            problems.append(f"dit.num_heads={self.num_heads} must divide dit.hidden_size={self.hidden_size}")
        if self.hidden_size % 4:
            # 2-D sin-cos positions split the width into sin/cos halves of height and width.
            problems.append(f"dit.hidden_size={self.hidden_size} must be a multiple of 4")
        if self.depth < 1:
            problems.append(f"dit.depth must be >= 1, got {self.depth}")
        if self.mlp_ratio <= 0:
            problems.append(f"dit.mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.context_tokens < 1 or self.context_dim < 1:
            # Guidance contrasts the prompt with its absence, so there must be a prompt to drop.
            problems.append(
                "dit.context_tokens and dit.context_dim must be >= 1, "
                f"got {self.context_tokens}, {self.context_dim}"
            )
        if not 0 <= self.previous_clip_depth <= self.depth:
            problems.append(
                f"dit.previous_clip_depth={self.previous_clip_depth} must lie in 0..dit.depth={self.depth} "
                "(its outputs are added after the main DiT's first blocks)"
            )
        ConfigError.raise_if_any(problems, "invalid dit config")
        self.schedule.validate()


#################################################################################
#               Embedding Layers for Timesteps, Context and Latents             #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: DiT's 256-d sinusoid (cos first) through a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: Tensor) -> Tensor:
        # [B] -> [B, D]
        t_freq = get_timestep_embedding(
            t, self.frequency_embedding_size, flip_sin_to_cos=True, downscale_freq_shift=0
        )
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class ContextEmbedder(nn.Module):
    """The learnable prompt; dropping it (zeroing before the projection) gives the null context."""

    def __init__(self, num_tokens: int, context_dim: int, hidden_size: int):
        super().__init__()
        self.context = nn.Parameter(torch.randn(num_tokens, context_dim) * 0.1)
        self.proj = nn.Linear(context_dim, hidden_size)

    def forward(self, batch_size: int, drop_context: Tensor | None) -> Tensor:
        # -> [B, context_tokens, D]
        context = self.context.expand(batch_size, -1, -1)
        if drop_context is not None:
            context = context * (~drop_context).to(context.dtype)[:, None, None]
        return self.proj(context)


def sincos_position_embedding(hidden_size: int, grid_side: int) -> Tensor:
    """DiT's fixed 2-D sin-cos embedding of an S x S grid, rows first: [S*S, D]."""
    # base_size = side keeps the positions at integer grid coordinates, as in DiT.
    return get_2d_sincos_pos_embed(hidden_size, grid_side, base_size=grid_side, output_type="pt").float()


def time_embedding(hidden_size: int, times: Tensor) -> Tensor:
    """1-D sin-cos of times [N] (in key frames from the clip's start): [N, D]."""
    return get_1d_sincos_pos_embed_from_grid(hidden_size, times, output_type="pt").float()


class ModalityEmbedder(nn.Module):
    """One modality's latent -> [EOS ; its tokens], with an optional zero-initialised condition input.

    A latent of F key frames (DiTConfig.video_key_frames, channels frame-major) makes F grids of N
    tokens, frame after frame.
    """

    def __init__(self, cfg: DiTConfig, modality: str, channel_factor: int, with_conditions: bool):
        super().__init__()
        channels, side, _ = cfg.latent_shape(modality)
        patch, self.frames, self.channel_factor = cfg.patch(modality), cfg.frames(modality), channel_factor
        per_frame = channels // self.frames
        hidden = cfg.hidden_size
        self.patch_embed = PatchEmbed(side, patch, channel_factor * per_frame, hidden, bias=True)
        # The paper's zero convolution: a second patch embedding whose weights start at zero.
        self.condition_embed = (
            PatchEmbed(side, patch, per_frame, hidden, bias=True) if with_conditions else None
        )
        grid = side // patch
        position = sincos_position_embedding(hidden, grid).repeat(self.frames, 1)  # [F*N, D]
        if cfg.video_key_frames:
            position = position + time_embedding(hidden, self.token_times(cfg, modality, grid))
        # Saved with the weights (like DiT's frozen parameter) so meta-device builds can load it.
        self.register_buffer("pos_embed", position[None])
        # One vector per token, as the authors' mod_embed_*: it marks the modality and can also learn
        # positional detail on top of the fixed sin-cos grid.
        self.modality_embed = nn.Parameter(torch.randn(1, self.frames * grid**2, hidden) * 0.01)
        self.eos = nn.Parameter(torch.randn(1, 1, hidden))

    @staticmethod
    def token_times(cfg: DiTConfig, modality: str, grid: int) -> Tensor:
        """Each token's time in key frames: its key frame (video), the centre of its grid column (audio)."""
        if modality == "video":
            return torch.arange(cfg.video_key_frames).repeat_interleave(grid**2).double()
        column = torch.arange(grid**2) % grid
        return (column + 0.5).double() * cfg.video_key_frames / grid

    def patches(self, embed: PatchEmbed, x: Tensor, factor: int) -> Tensor:
        # [B, factor*F*C, S, S] (factor latents stacked on channels) -> [B, F*N, D]
        frames = rearrange(x, "b (f k c) h w -> (b k) (f c) h w", f=factor, k=self.frames)
        return rearrange(embed(frames), "(b k) n d -> b (k n) d", k=self.frames)

    def forward(self, x: Tensor, condition: Tensor | None) -> Tensor:
        # x: [B, C, S, S] -> [B, 1 + F*N, D]
        tokens = self.patches(self.patch_embed, x, self.channel_factor) + self.pos_embed + self.modality_embed
        if self.condition_embed is not None:
            tokens = tokens + self.patches(self.condition_embed, condition, 1)
        return torch.cat([self.eos.expand(x.shape[0], -1, -1), tokens], dim=1)


class TokenEmbedder(nn.Module):
    """Latents of the configured modalities (+ conditions) -> the whole sequence [B, L, D]."""

    def __init__(self, cfg: DiTConfig, channel_factor: int, with_conditions: bool):
        super().__init__()
        self.context = ContextEmbedder(cfg.context_tokens, cfg.context_dim, cfg.hidden_size)
        self.modalities = nn.ModuleDict(
            {m: ModalityEmbedder(cfg, m, channel_factor, with_conditions) for m in cfg.ordered_modalities}
        )

    def forward(
        self, latents: dict[str, Tensor], conditions: dict[str, Tensor] | None, drop_context: Tensor | None
    ) -> Tensor:
        batch_size = next(iter(latents.values())).shape[0]
        parts = [self.context(batch_size, drop_context)]
        for name, embedder in self.modalities.items():
            parts.append(embedder(latents[name], conditions[name] if conditions else None))
        return torch.cat(parts, dim=1)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################


def run_block(block: nn.Module, x: Tensor, c: Tensor, bias: Tensor | None, checkpointed: bool) -> Tensor:
    """block(x, c, bias); `checkpointed` (train.gradient_checkpointing) recomputes the block's activations
    in the backward pass instead of keeping them."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(block, x, c, bias, use_reentrant=False)
    return block(x, c, bias)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning on the timestep."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(
            in_features=hidden_size,
            hidden_features=int(hidden_size * mlp_ratio),
            act_layer=partial(nn.GELU, approximate="tanh"),
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor, bias: Tensor | None = None) -> Tensor:
        # x: [B, L, D], c: [B, D], bias: [1, H, L, L] added to the attention logits
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=1
        )
        attn_mask = None if bias is None else bias.to(x.dtype)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), attn_mask)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """The final layer of one modality: adaLN, then tokens -> patches of epsilon."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        # x: [B, N, D] -> [B, N, p*p*C]
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def cross_modal_time_bias(cfg: DiTConfig) -> Tensor | None:
    """[1, H, L, L] attention-logit bias between an audio and a video token: -slope_h * (time apart)^2, in
    key frames; slopes 0 (head 0, global) and, over the other heads, 1/4 ... 4 geometrically (ever more
    local, as ALiBi's). 0 for every other pair; None without key-frame tokens (dit.video_key_frames=0)."""
    if not cfg.video_key_frames or not cfg.joint:
        return None
    slices = cfg.token_slices()
    times = torch.zeros(cfg.sequence_length, dtype=torch.float64)
    is_modality = {}
    for m in cfg.ordered_modalities:
        grid = cfg.latent_shape(m)[1] // cfg.patch(m)
        times[slices[m]] = ModalityEmbedder.token_times(cfg, m, grid)
        is_modality[m] = torch.zeros(cfg.sequence_length, dtype=torch.bool)
        is_modality[m][slices[m]] = True
    audio, video = is_modality["audio"], is_modality["video"]
    cross = (audio[:, None] & video[None, :]) | (video[:, None] & audio[None, :])
    slopes = torch.cat([torch.zeros(1), torch.logspace(-1, 1, cfg.num_heads - 1, base=4)]).double()
    apart = (times[:, None] - times[None, :]).pow(2)
    return torch.where(cross, -slopes[:, None, None] * apart, 0.0)[None].float()


class MMDiT(nn.Module):
    """Joint (or single-modal) epsilon model over perceptual latents, with cross-modal and previous-clip
    conditions."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tokens = TokenEmbedder(cfg, channel_factor=1, with_conditions=cfg.joint)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        self.blocks = nn.ModuleList(
            [DiTBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)]
        )
        self.final_layers = nn.ModuleDict(
            {
                m: FinalLayer(cfg.hidden_size, cfg.patch(m), cfg.latent_shape(m)[0] // cfg.frames(m))
                for m in cfg.ordered_modalities
            }
        )
        self.previous_encoder = PreviousClipEncoder(cfg) if cfg.previous_clip_depth else None
        self.register_buffer("time_bias", cross_modal_time_bias(cfg), persistent=False)
        self.gradient_checkpointing = False
        self.initialize_weights()

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled
        if self.previous_encoder is not None:
            self.previous_encoder.gradient_checkpointing = enabled

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)

        # Patch embeddings like nn.Linear (not nn.Conv2d); condition embeddings start at zero.
        for token_embedder in self._token_embedders():
            for modality in token_embedder.modalities.values():
                w = modality.patch_embed.proj.weight.data
                nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
                nn.init.constant_(modality.patch_embed.proj.bias, 0)
                if modality.condition_embed is not None:
                    nn.init.constant_(modality.condition_embed.proj.weight, 0)
                    nn.init.constant_(modality.condition_embed.proj.bias, 0)

        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity.
        for block in self._all_blocks():
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)

        for final_layer in self.final_layers.values():
            nn.init.constant_(final_layer.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(final_layer.adaLN_modulation[-1].bias, 0)
            nn.init.constant_(final_layer.linear.weight, 0)
            nn.init.constant_(final_layer.linear.bias, 0)

        if self.previous_encoder is not None:
            for out in self.previous_encoder.outputs:
                nn.init.constant_(out.weight, 0)

    def _token_embedders(self) -> list[TokenEmbedder]:
        return [self.tokens] + ([self.previous_encoder.tokens] if self.previous_encoder is not None else [])

    def _all_blocks(self) -> list[DiTBlock]:
        extra = list(self.previous_encoder.blocks) if self.previous_encoder is not None else []
        return list(self.blocks) + extra

    def unpatchify(self, x: Tensor, modality: str) -> Tensor:
        # [B, F*N, p*p*C/F] -> [B, C, S, S]
        p, frames = self.cfg.patch(modality), self.cfg.frames(modality)
        side = self.cfg.latent_shape(modality)[1] // p
        return rearrange(x, "b (k h w) (p q c) -> b (k c) (h p) (w q)", k=frames, h=side, w=side, p=p, q=p)

    def _latents(
        self, what: str, audio: Tensor | None, video: Tensor | None, like: Tensor | None
    ) -> dict[str, Tensor]:
        """Check one pair of inputs against the config. With `like`, a missing input is the zero (null)
        latent."""
        given = {"audio": audio, "video": video}
        latents = {}
        for modality, value in given.items():
            if modality not in self.cfg.modalities:
                if value is not None:
                    raise ValueError(
                        f"{what}_{modality[0]} was given, "
                        f"but this model has dit.modalities={self.cfg.modalities}"
                    )
                continue
            if value is None:
                if like is None:
                    raise ValueError(f"{what}_{modality[0]} is required: this model generates {modality}")
                value = like.new_zeros(like.shape[0], *self.cfg.latent_shape(modality))
            expected = self.cfg.latent_shape(modality)
            if tuple(value.shape[1:]) != expected:
                raise ValueError(
                    f"{what}_{modality[0]} has shape {list(value.shape)}; "
                    f"expected [B, {', '.join(map(str, expected))}] "
                    f"(dit.{modality}_latent_channels / dit.{modality}_latent_size)"
                )
            latents[modality] = value
        return latents

    def forward(
        self,
        x_a: Tensor | None,
        x_v: Tensor | None,
        t: Tensor,
        cond_a: Tensor | None = None,
        cond_v: Tensor | None = None,
        drop_context: Tensor | None = None,
        prev_a: Tensor | None = None,
        prev_v: Tensor | None = None,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Predict epsilon for noisy latents x_a [B, Ca, Sa, Sa] and x_v [B, Cv, Sv, Sv] at timesteps t [B].

        A missing condition or previous-clip latent is the zero (null) latent, exactly as in
        training; drop_context [B] (bool) replaces the prompt by the null context for those rows.
        Returns (eps_a, eps_v) shaped like the inputs; None for a modality the model lacks.
        """
        latents = self._latents("x", x_a, x_v, like=None)
        some_latent = next(iter(latents.values()))
        conditions = None
        if self.cfg.joint:
            conditions = self._latents("cond", cond_a, cond_v, like=some_latent)
        elif cond_a is not None or cond_v is not None:
            raise ValueError(
                "cond_a / cond_v need a model of both modalities (dit.modalities=[audio, video])"
            )
        if self.previous_encoder is None and (prev_a is not None or prev_v is not None):
            raise ValueError("prev_a / prev_v need the long-generation model (dit.previous_clip_depth > 0)")

        x = self.tokens(latents, conditions, drop_context)  # [B, L, D]
        c = self.t_embedder(t)  # [B, D]
        residuals: list[Tensor] = []
        if self.previous_encoder is not None:
            previous = self._latents("prev", prev_a, prev_v, like=some_latent)
            residuals = self.previous_encoder(latents, previous, c, drop_context, self.time_bias)
        for index, block in enumerate(self.blocks):
            x = run_block(block, x, c, self.time_bias, self.gradient_checkpointing)
            if index < len(residuals):
                x = x + residuals[index]

        slices = self.cfg.token_slices()
        eps = {m: self.unpatchify(layer(x[:, slices[m]], c), m) for m, layer in self.final_layers.items()}
        return eps.get("audio"), eps.get("video")


#################################################################################
#                    Long-Generation Conditioning DiT                           #
#################################################################################


class PreviousClipEncoder(nn.Module):
    """The authors' Previous_Cond: a DiT over [previous clip latent ; noisy current latent] (channels
    concatenated, same token layout and its own prompt) whose block outputs, each through a
    zero-initialised bias-free linear, become residuals for the main DiT's first blocks."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.tokens = TokenEmbedder(cfg, channel_factor=2, with_conditions=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.previous_clip_depth)]
        )
        self.outputs = nn.ModuleList(
            [nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False) for _ in range(cfg.previous_clip_depth)]
        )
        self.gradient_checkpointing = False

    def forward(
        self,
        latents: dict[str, Tensor],
        previous: dict[str, Tensor],
        c: Tensor,
        drop_context: Tensor | None,
        time_bias: Tensor | None,
    ) -> list[Tensor]:
        stacked = {m: torch.cat([previous[m], latents[m]], dim=1) for m in latents}
        x = self.tokens(stacked, None, drop_context)
        residuals = []
        for block, out in zip(self.blocks, self.outputs, strict=True):
            x = run_block(block, x, c, time_bias, self.gradient_checkpointing)
            residuals.append(out(x))  # [B, L, D]
        return residuals


#################################################################################
#                                   Model card                                  #
#################################################################################

# Ops whose FLOPs the paper's Table 4 counts (as multiply-accumulates): the linear layers.
LINEAR_OPS = ("aten.addmm", "aten.mm", "aten.convolution")


def model_card(cfg: DiTConfig) -> dict[str, Any]:
    """Parameters and forward FLOPs for one sample (batch 1, full sequence), counted on the meta device.

    gflops: torch's FlopCounterMode (2 per multiply-accumulate, attention included); gmacs_linear:
    multiply-accumulates of the linear layers only, the paper's Table 4 "FLOPS" convention.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = MMDiT(cfg)
        x_a = torch.empty(1, *cfg.latent_shape("audio"))
        x_v = torch.empty(1, *cfg.latent_shape("video"))
        t = torch.zeros(1, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x_a, x_v, t)
    linear = sum(n for op, n in counter.get_flop_counts()["Global"].items() if str(op) in LINEAR_OPS)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "gflops": round(counter.get_total_flops() / 1e9, 3),
        "gmacs_linear": round(linear / 2e9, 3),
        "tokens": cfg.sequence_length,
        "width/depth/heads": f"{cfg.hidden_size}/{cfg.depth}/{cfg.num_heads}",
    }
