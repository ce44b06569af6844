"""Configuration of the multi-modal autoencoder (paper section 3.1): sizes, Table 5 toggles, loss weights.

The defaults are the paper preset (conf/ae/paper.yaml); conf/ae/tiny.yaml lists what the CPU preset changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmldm_ae.engine.diffusion import SAMPLERS, NoiseScheduleConfig
from mmldm_data.config import ConfigError

#################################################################################
#                                   Config                                      #
#################################################################################

CONTENT_POOLINGS = ("flatten", "avg")  # the authors' code, the paper's text
VIDEO_LATENTS = ("clip", "key_frames")


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
    # What z_v's channels hold: "clip", one map for the whole clip, read at the encoder's content
    # frame (the authors'); "key_frames", latent_channels / num_key_frames channels per key frame,
    # and frame t decoded from the two key frames around it, interpolated at t. With "clip" a small
    # autoencoder keeps the object's appearance but not where it is at each frame (README, "Does it
    # learn?"): the key frames must lie evenly from frame 0, num_frames / num_key_frames apart.
    video_latent: str = "clip"
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
    # which leaves it almost constant over [0, 1); scaling by 1000 spreads it over all frequencies
    # (the authors' code: 1.0).
    frame_index_scale: float = 1000.0
    # Local diffusers folder of an SD-1.x UNet (or a whole pipeline with a unet/ subfolder).
    unet_init: str | None = None

    # Ablation toggles of paper Table 5 (weight initialisation is `unet_init`).
    learnable_prompt: bool = True  # off: the prompt slots hold fixed zeros
    content_embedding: bool = True  # own latent -> pooling -> MLP -> added to the time embedding
    # How the content embedding pools the latent (Table 5 "latent average pooling"). "flatten" (default):
    # the authors' code, all C' x l x l values into the MLP; it keeps where things are, and runs trained
    # before this key existed load unchanged. "avg": the paper's text, the spatial mean (C' values). The
    # published numbers do not decide: in the authors' code this path output a constant
    # (docs/design.md#deviations, rows 1 and 24).
    content_pooling: str = "flatten"
    class_embedding: bool = True  # learnable class token in the context
    semantic_context: bool = True  # the other modality's semantic tokens in the context
    adversarial: bool = True
    detach_semantic_inputs: bool = False  # True: the authors' behaviour (semantic losses stop at the latents)

    # Loss weights: the paper's. w_kl is its AIST++ value; conf/train_ae.yaml takes it from the dataset
    # preset (dataset.ae_w_kl, Landscape 1e-9). The authors' configs: w_con 0.03, w_kl 1e-9 (AIST++) /
    # 1e-6 (Landscape).
    w_kl: float = 1e-8
    w_cls: float = 0.1
    w_con: float = 0.1
    w_adv: float = 0.1
    guidance_dropout: float = 0.1  # per modality: its prompt and its encoder input are zeroed

    # Decoding: classifier-free guidance per modality by the paper's Eq. 9,
    # eps_c + s (eps_c - eps_u), s = 0: none (docs/design.md#guidance). The authors write
    # eps_u + w (eps_c - eps_u) with w = 2.5, i.e. s = 1.5 here (their AudioSet: w = 1.5 / 3.0 for
    # audio / video, i.e. s = 0.5 / 2.0). The authors decode with 50 DDIM steps (decode_sampler=ddim,
    # decode_steps=50); DPM-Solver++ matches them in far fewer (docs/decoder_steps.md: 10 on the tiny
    # preset). 20 here is not measured on the paper preset: DPM-Solver++'s usual count for SD-sized UNets.
    decode_steps: int = 20
    decode_sampler: str = "dpmsolver++"  # a sampler of mmldm_ae.engine.diffusion.SAMPLERS
    # Guidance only on the first (noisiest) fraction of the steps; the rest run the conditional
    # branch alone, at half the batch.
    decode_guidance_fraction: float = 1.0
    guidance_audio: float = 1.5
    guidance_video: float = 1.5

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
    def frame_latent_channels(self) -> int:
        """Channels of z_v that one decoded frame reads (`video_latent`)."""
        return self.latent_channels // (self.num_key_frames if self.video_latent == "key_frames" else 1)

    @property
    def audio_latent_size(self) -> int:
        return self.latent_size // 2 ** (len(self.audio_encoder_mult) - 1)

    def content_features(self, side: int) -> int:
        """Inputs of the content embedding's MLP for a C' x side x side latent (`content_pooling`)."""
        return self.latent_channels * (side**2 if self.content_pooling == "flatten" else 1)

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
                f"ae.resolution={self.resolution} is not a multiple of "
                f"ae.vae_downsample={self.vae_downsample}"
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
                f"the projectors must end at the same size: video {self.semantic_size}, "
                f"audio {audio_semantic} "
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
        problems += [
            f"ae.{name} must be >= 0 (paper Eq. 9 s; 0: no guidance), got {getattr(self, name)}"
            for name in ("guidance_audio", "guidance_video")
            if getattr(self, name) < 0
        ]
        if not 0.0 < self.contrastive_temperature <= 1.0:
            problems.append(
                f"ae.contrastive_temperature must be in (0, 1], got {self.contrastive_temperature}"
            )
        problems += [
            f"loss weight ae.{name} must be >= 0, got {getattr(self, name)}"
            for name in ("w_kl", "w_cls", "w_con", "w_adv")
            if getattr(self, name) < 0
        ]
        if self.adversarial and self.num_target_frames != 2:
            problems.append(
                "the discriminator compares [audio, frame a, frame b]: ae.num_target_frames must be 2"
            )
        if self.decode_steps < 1:
            problems.append("ae.decode_steps must be >= 1")
        if self.content_pooling not in CONTENT_POOLINGS:
            problems.append(
                f"ae.content_pooling must be one of {CONTENT_POOLINGS}, got {self.content_pooling!r}"
            )
        if self.video_latent not in VIDEO_LATENTS:
            problems.append(f"ae.video_latent must be one of {VIDEO_LATENTS}, got {self.video_latent!r}")
        elif self.video_latent == "key_frames" and self.latent_channels % self.num_key_frames:
            problems.append(
                f"ae.video_latent=key_frames splits ae.latent_channels ({self.latent_channels}) over "
                f"ae.num_key_frames ({self.num_key_frames}): make it a multiple"
            )
        if self.decode_sampler not in SAMPLERS:
            problems.append(f"ae.decode_sampler must be one of {SAMPLERS}, got {self.decode_sampler!r}")
        if not 0.0 <= self.decode_guidance_fraction <= 1.0:
            problems.append(
                f"ae.decode_guidance_fraction must be in [0, 1], got {self.decode_guidance_fraction}"
            )
        ConfigError.raise_if_any(problems, "invalid autoencoder config")
        self.schedule.validate()
