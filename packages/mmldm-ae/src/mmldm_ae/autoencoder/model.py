"""The hierarchical multi-modal autoencoder of MM-LDM (paper section 3.1, docs/design.md#autoencoder).

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

Defects of the authors' code fixed here (docs/design.md#deviations): (a) the content and cross-modal
context MLPs zero-initialise only their last layer; (b) the adversarial term reaches the model
through the frozen VAE decoder; (c) the contrastive loss takes its negatives from the whole
optimiser step, every micro-batch of every process, with exact gradients (semantic.contrastive_loss);
(d) the UNet time embedding trains; (e) semantic losses see non-detached latents unless
`detach_semantic_inputs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from itertools import accumulate

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from mmldm_ae.autoencoder.config import AEConfig
from mmldm_ae.autoencoder.decoder import DecoderConditions, FeatureGenerator, SignalDecoder, load_unet_weights
from mmldm_ae.autoencoder.encoders import DiagonalGaussian, PerceptualEncoder
from mmldm_ae.autoencoder.layers import (
    MLP,
    FrameIndexEmbedder,
    hinge_loss,
    init_weights_,
    random_normal,
    random_uniform,
    zero_module,
)
from mmldm_ae.autoencoder.semantic import (
    ClassificationHead,
    ContrastiveBank,
    ContrastiveHead,
    SemanticProjector,
    pool_content,
)
from mmldm_ae.engine.diffusion import (
    build_sampler,
    build_train_scheduler,
    denoising_steps,
    diffusion_target,
    guided_eps,
    predict_x0,
    q_sample,
    sample_timesteps,
)

#################################################################################
#                    Hierarchical multi-modal autoencoder                       #
#################################################################################

AUDIO, VIDEO = 0, 1  # rows of the modality prompts
BATCH_KEYS = ("key_latents", "target_latents", "target_indices", "audio_latents", "class_id")


@dataclass
class TrainingDraws:
    """The random draws of the model's step for B clips with T target frames each. They are drawn for
    the whole optimiser step and split over its micro-batches (`split`), so that any split draws the
    same; the contrastive bank's pass reuses them."""

    keep_audio: Tensor  # [B] bool: the clip keeps its audio condition (guidance dropout)
    keep_video: Tensor  # [B] bool
    eps_video: Tensor  # [B, C', l, l] standard normal: the sample of z_v's posterior
    eps_audio: Tensor  # [B, C', l/2, l/2]
    timesteps: Tensor  # [B + B*T] per item, items [B audio images; B*T frames]
    noise: Tensor  # [B + B*T, C, L, L]

    def split(self, sizes: Sequence[int]) -> list[TrainingDraws]:
        """The draws of consecutive groups of clips (micro-batches of these sizes, in order)."""
        B = self.keep_audio.shape[0]
        T = self.timesteps.shape[0] // B - 1
        groups = []
        for start, size in zip(accumulate(sizes[:-1], initial=0), sizes, strict=True):
            clips, frames = slice(start, start + size), slice(B + start * T, B + (start + size) * T)
            groups.append(
                TrainingDraws(
                    self.keep_audio[clips],
                    self.keep_video[clips],
                    self.eps_video[clips],
                    self.eps_audio[clips],
                    *(torch.cat([x[clips], x[frames]]) for x in (self.timesteps, self.noise)),
                )
            )
        return groups


class MultiModalAutoencoder(nn.Module):
    """MM-LDM's autoencoder over KL-VAE latents; `num_classes` = 0 for class-free datasets.

    The discriminator is a separate module (mmldm_ae.autoencoder.discriminator) with its own optimiser; the
    model's step passes it to `training_losses`.
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
        self.video_encoder = encoder(
            channel_mult=cfg.video_encoder_mult,
            content="frame",
            temporal=True,
            per_key_frame=cfg.num_key_frames if cfg.video_latent == "key_frames" else None,
        )
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
            cfg.frame_latent_channels, cfg.video_latent_size, channels, sizes, E, cfg.dropout
        )
        self.audio_features = FeatureGenerator(
            cfg.latent_channels, cfg.audio_latent_size, channels, sizes, None, cfg.dropout
        )
        if cfg.content_embedding:
            self.video_content = MLP(cfg.content_features(cfg.video_latent_size), E, E)
            self.audio_content = MLP(cfg.content_features(cfg.audio_latent_size), E, E)
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

    def trainable_parameters(self) -> list[nn.Parameter]:
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
        """[B, K, C, L, L], [B, C, L, L] -> z_v [B, C', L/2, L/2], z_a [B, C', L/4, L/4] (posterior
        modes unless sample)."""
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
        """Class ids [B] from the classification head; -1 (no class) for class-free models. The latents
        are cast to the model's dtype (pipelines hand them over in fp32)."""
        if self.classifier is None:
            return torch.full((z_v.shape[0],), -1, dtype=torch.long, device=z_v.device)
        dtype = self.decoder.unet.dtype
        return self.classifier(*self.semantics(z_v.to(dtype), z_a.to(dtype))).argmax(dim=-1)

    # --------------------------------------------------------- decoder inputs

    def _check_class_ids(self, class_id: Tensor) -> None:
        if class_id.numel() and (class_id.max() >= self.num_classes or class_id.min() < -1):
            raise ValueError(
                f"class ids must be in [-1, {self.num_classes - 1}] (-1: none) "
                f"for num_classes={self.num_classes}, "
                f"got {class_id.tolist()}"
            )

    def _class_tokens(self, class_id: Tensor) -> Tensor:  # [B] -> [B, 1, D]
        rows = torch.where(class_id < 0, torch.full_like(class_id, self.num_classes), class_id)
        return self.class_embed(rows)[:, None]

    def _context(
        self, modality: int, keep_prompt: Tensor, class_tokens: Tensor | None, other_semantic: Tensor
    ) -> Tensor:
        """[prompt (zeroed where dropped); class token; the other modality's semantic tokens]
        -> [B, tokens, D]."""
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
        """Conditions of the items [B audio images; B*T frames] of B clips with frame indices [B, T]
        in [0, 1)."""
        frames = frame_index.shape[1]
        per_frame = partial(repeat, pattern="b ... -> (b t) ...", t=frames)
        index_embedding = self.frame_index_embed(rearrange(frame_index, "b t -> (b t)"))
        video_features = self.video_features(self._frame_latents(z_v, frame_index), index_embedding)
        features = [torch.cat(pair) for pair in zip(self.audio_features(z_a), video_features, strict=True)]
        class_tokens = self._class_tokens(class_id) if self.cfg.class_embedding else None
        audio_context = self._context(AUDIO, keep_audio_prompt, class_tokens, s_v)
        video_context = self._context(VIDEO, keep_video_prompt, class_tokens, s_a)
        context = torch.cat([audio_context, per_frame(video_context)])
        content = None
        if self.cfg.content_embedding:
            pool = partial(pool_content, pooling=self.cfg.content_pooling)
            content = torch.cat([self.audio_content(pool(z_a)), per_frame(self.video_content(pool(z_v)))])
        return DecoderConditions(features, context, content)

    def _frame_latents(self, z_v: Tensor, frame_index: Tensor) -> Tensor:
        """z_v [B, C', l, l] -> what each frame's feature generator reads [B*T, C'/K or C', l, l]:
        the whole of z_v ("clip"), or the maps of the key frames around each frame's index
        interpolated linearly at it, key frame k at index k / K ("key_frames")."""
        frames = frame_index.shape[1]
        if self.cfg.video_latent == "clip":
            return repeat(z_v, "b ... -> (b t) ...", t=frames)
        K = self.cfg.num_key_frames
        maps = rearrange(z_v, "b (k c) h w -> b k c h w", k=K)
        position = (frame_index * K).clamp(0, K - 1)
        before = position.floor().long()
        after = (before + 1).clamp(max=K - 1)
        weight = (position - before)[..., None, None, None].to(z_v.dtype)
        pick = partial(torch.take_along_dim, maps, dim=1)
        earlier, later = (pick(i[..., None, None, None]) for i in (before, after))
        return rearrange((1 - weight) * earlier + weight * later, "b t c h w -> (b t) c h w")

    # ----------------------------------------------------------------- training

    def _check_shape(self, name: str, tensor: Tensor, expected_tail: tuple[int, ...]) -> None:
        if tuple(tensor.shape[1:]) != expected_tail:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected [B, {', '.join(map(str, expected_tail))}] "
                f"for this AEConfig (resolution {self.cfg.resolution}, "
                f"vae_downsample {self.cfg.vae_downsample}, "
                f"{self.cfg.vae_channels} VAE channels)"
            )

    def training_losses(
        self,
        batch: dict[str, Tensor],
        vae: nn.Module,
        discriminator: nn.Module | None = None,
        generator: torch.Generator | None = None,
        draws: TrainingDraws | None = None,
        bank: ContrastiveBank | None = None,
    ) -> dict[str, Tensor]:
        """Losses of the model's step (not the discriminator's) on a batch of VAE latents.

        batch: key_latents [B, K, C, L, L], target_latents [B, T, C, L, L], target_indices [B, T]
        (i/16), audio_latents [B, C, L, L], class_id [B] (-1: none), and optionally the VAE decodes
        of those latents, target_reals [B, T, 3, H, W] and audio_reals [B, 3, H, W] (a latent cache
        with reals: decoded once, not every step). `vae` is the frozen KL-VAE (encode/decode/scale);
        its decoder turns the one-step x0 estimates into pixels for the adversarial term, with
        gradients, and the real latents into the discriminator's reals when the batch has none.
        Returns scalars "loss" (the total), "mse_audio", "mse_video", "kl", "kl_video", "kl_audio",
        "cls", "cls_acc", "con", "adv_g", "guidance_drop_audio", "guidance_drop_video", and with the
        adversarial loss on the discriminator step's inputs "disc_real", "disc_fake" [B, 3, 3, H, W]
        (detached, slots [audio image, frame a, frame b]).

        One micro-batch of an optimiser step (`micro_batch_plans`) passes the step's `draws` for its
        clips and the step's contrastive `bank`; by default the draws are made here (from
        `generator`) and the contrastive negatives are this batch's clips on every process.
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
                "discriminator=build_discriminator(cfg) (mmldm_ae.autoencoder.discriminator) "
                "or set ae.adversarial=false"
            )
        # Checked on the device: reading the ids back would stall every training step.
        torch._assert_async(
            ((class_id >= -1) & (class_id < self.num_classes)).all(),
            f"class ids must be in [-1, {self.num_classes - 1}] (-1: none) for {self.num_classes} classes",
        )
        device = key.device

        draws = self.training_draws(B, T, key, generator) if draws is None else draws
        keep_audio, keep_video = draws.keep_audio, draws.keep_video
        post_v, post_a, z_v, z_a = self._sample_latents(key, audio, draws)
        kl_video, kl_audio = post_v.kl().mean(), post_a.kl().mean()

        if cfg.detach_semantic_inputs:
            s_v, s_a = self.semantics(z_v.detach(), z_a.detach())
        else:
            s_v, s_a = self.semantics(z_v, z_a)
        cls, cls_acc = self._classification_loss(s_v, s_a, class_id)
        con = self.contrastive(s_v, s_a, bank)

        # Items [B audio images; B*T frames], each with its own timestep (the authors' independent t).
        cond = self.decoder_conditions(
            z_v, z_a, s_v, s_a, index.to(z_v.dtype), class_id, keep_audio, keep_video
        )
        x0 = torch.cat([audio, rearrange(targets, "b t c h w -> (b t) c h w")])
        timesteps, noise = draws.timesteps, draws.noise
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
            if "target_reals" in batch:
                real = torch.cat([batch["audio_reals"][:, None], batch["target_reals"]], 1).to(fake.dtype)
            else:
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

    # Calling the module runs the step losses: going through forward lets DDP sync the gradients.
    forward = training_losses

    def guidance_keep_masks(
        self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Which clips keep their audio / video condition: independent draws, each kept w.p. 1 - p."""
        keep_audio = random_uniform((batch_size,), device, generator) >= self.cfg.guidance_dropout
        keep_video = random_uniform((batch_size,), device, generator) >= self.cfg.guidance_dropout
        return keep_audio, keep_video

    def training_draws(
        self, clips: int, frames: int, like: Tensor, generator: torch.Generator | None = None
    ) -> TrainingDraws:
        """Fresh draws for `clips` clips of `frames` target frames, on the device and in the dtype of
        `like`: guidance dropout, posterior noise, then the items' timesteps and noise."""
        cfg = self.cfg
        keep_audio, keep_video = self.guidance_keep_masks(clips, like.device, generator)
        eps_video, eps_audio = (
            random_normal((clips, cfg.latent_channels, size, size), like, generator)
            for size in (cfg.video_latent_size, cfg.audio_latent_size)
        )
        items = clips * (1 + frames)
        timesteps = sample_timesteps(self.train_scheduler, items, like.device, generator)
        noise = random_normal((items, cfg.vae_channels, cfg.latent_size, cfg.latent_size), like, generator)
        return TrainingDraws(keep_audio, keep_video, eps_video, eps_audio, timesteps, noise)

    def _sample_latents(
        self, key: Tensor, audio: Tensor, draws: TrainingDraws
    ) -> tuple[DiagonalGaussian, DiagonalGaussian, Tensor, Tensor]:
        """Posteriors of key frames [B, K, C, L, L] and audio latents [B, C, L, L]; their samples z_v, z_a.

        Guidance dropout: a dropped modality loses its prompt and its encoder input together, which
        is exactly the unconditional branch that decode() guides against.
        """
        post_v, post_a = self.posteriors(
            key * draws.keep_video[:, None, None, None, None].to(key.dtype),
            audio * draws.keep_audio[:, None, None, None].to(audio.dtype),
        )
        return post_v, post_a, post_v.sample(noise=draws.eps_video), post_a.sample(noise=draws.eps_audio)

    @torch.no_grad()
    def micro_batch_plans(
        self, batches: list[dict[str, Tensor]]
    ) -> list[tuple[TrainingDraws, ContrastiveBank | None]]:
        """The draws and contrastive bank of each micro-batch of one optimiser step (batches of VAE
        latents as `training_losses` takes them, the same number of clips in each).

        The draws are made once for all the step's clips and split, so that k micro-batches of n
        clips draw what one batch of k*n clips draws. With more than one micro-batch, the bank holds
        every clip's contrastive embeddings (a first pass without gradients, under the same draws,
        gathered over processes); `training_losses` recomputes its own rows with gradients.
        """
        sizes = [batch["class_id"].shape[0] for batch in batches]
        first = batches[0]
        step = self.training_draws(sum(sizes), first["target_latents"].shape[1], first["key_latents"])
        draws = step.split(sizes)
        if len(batches) == 1:
            return [(draws[0], None)]  # contrastive_loss gathers its own negatives
        embeddings = []
        for batch, drawn in zip(batches, draws, strict=True):
            z_v, z_a = self._sample_latents(batch["key_latents"], batch["audio_latents"], drawn)[2:]
            embeddings.append(self.contrastive.embed(*self.semantics(z_v, z_a)))
        bank = ContrastiveBank.gather(*(torch.cat(f) for f in zip(*embeddings, strict=True)))
        return list(zip(draws, bank.split(sizes), strict=True))

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
        # Means over the labelled clips without asking the host how many there are (0: the loss is 0,
        # the head stays in the graph so that every rank reduces the same parameters).
        labelled = (class_id >= 0).float()
        count = labelled.sum().clamp(min=1.0)
        per_clip = F.cross_entropy(logits, class_id.clamp(min=0), reduction="none")
        accuracy = ((logits.argmax(-1) == class_id).float() * labelled).sum() / count
        return (per_clip * labelled).sum() / count, accuracy.detach()

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
        sampler: str | None = None,
        guidance_fraction: float | None = None,
        noise: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Reconstruction: z_v, z_a -> frame latents [B, T, C, L, L], audio latent [B, C, L, L] (fp32).

        All T frames of a clip are decoded in one batch with frame index t/T. Guidance (see
        `decoding_conditions`) runs on the first `guidance_fraction` of the steps only; the others
        evaluate the conditional branch alone, at half the batch. steps / sampler / guidance default
        to the config. `noise` [B + B*T, C, L, L] (items [audio images; frames]) replaces the initial
        noise drawn from `generator`, e.g. the same noise for every clip of a long sample decoded in
        one batch. The model runs in its weights' dtype (bf16 for inference, `mmldm_ae.pipeline`);
        the latents and the scheduler's arithmetic stay fp32, and the loop reads nothing back from
        the device.
        """
        cfg = self.cfg
        steps = steps or cfg.decode_steps
        fraction = cfg.decode_guidance_fraction if guidance_fraction is None else guidance_fraction
        B, device = z_v.shape[0], z_v.device
        frame_index = (torch.arange(num_frames, device=device) / num_frames).expand(B, num_frames)
        cond, guided, scale = self.decoding_conditions(
            z_v, z_a, frame_index, class_id, guidance_audio, guidance_video
        )
        guided_steps = round(fraction * steps) if guided is not None else 0
        scheduler = build_sampler(sampler or cfg.decode_sampler, steps, cfg.schedule)
        where = generator.device if generator is not None else device
        shape = (B * (1 + num_frames), cfg.vae_channels, cfg.latent_size, cfg.latent_size)
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
        x = noise if noise is not None else torch.randn(shape, generator=generator, device=where)
        x = x.to(device, torch.float32)
        for index, (t, t_device) in enumerate(denoising_steps(device, scheduler)):
            if index < guided_steps:
                output = self.denoise(x, t_device, guided, scale)
            else:
                output = self.denoise(x, t_device, cond)
            x = scheduler.step(output, t, x).prev_sample
        return rearrange(x[B:], "(b t) c h w -> b t c h w", b=B), x[:B]

    @torch.no_grad()
    def decoding_conditions(
        self,
        z_v: Tensor,
        z_a: Tensor,
        frame_index: Tensor,
        class_id: Tensor | None = None,
        guidance_audio: float | None = None,
        guidance_video: float | None = None,
    ) -> tuple[DecoderConditions, DecoderConditions | None, Tensor | None]:
        """What decoding the items [B audio images; B*T frames] of B clips needs, for frame indices
        [B, T] in [0, 1): their conditions; with guidance, those of both branches stacked
        [conditional; unconditional] and the per-item scale s [B + B*T] (fp32), else None, None.

        Guidance per modality by the paper's Eq. 9, eps_c + s (eps_c - eps_u) with s =
        guidance_audio / guidance_video (0: none; None: the config's; docs/design.md#guidance),
        where the unconditional branch uses zero prompts and the latents of an all-zero encoder
        input through the whole pipeline (features, content, context), as in training's guidance
        dropout. Both branches use the same class token: class_id, or the classification head's
        prediction when None.
        """
        cfg = self.cfg
        guidance_audio = cfg.guidance_audio if guidance_audio is None else guidance_audio
        guidance_video = cfg.guidance_video if guidance_video is None else guidance_video
        dtype = self.decoder.unet.dtype
        z_v, z_a, frame_index = z_v.to(dtype), z_a.to(dtype), frame_index.to(dtype)
        (B, T), device = frame_index.shape, z_v.device
        s_v, s_a = self.semantics(z_v, z_a)
        if class_id is None:
            class_id = self.predict_class(z_v, z_a)
        class_id = class_id.to(device).long()
        self._check_class_ids(class_id)
        keep = torch.ones(B, dtype=torch.bool, device=device)
        cond = self.decoder_conditions(z_v, z_a, s_v, s_a, frame_index, class_id, keep, keep)
        if guidance_audio == 0.0 and guidance_video == 0.0:
            return cond, None, None
        L = cfg.latent_size
        null_key = torch.zeros(1, cfg.num_key_frames, cfg.vae_channels, L, L, device=device, dtype=dtype)
        null_v, null_a = (z.expand(B, -1, -1, -1) for z in self.encode(null_key, null_key[:, 0]))
        null = self.decoder_conditions(
            null_v, null_a, *self.semantics(null_v, null_a), frame_index, class_id, ~keep, ~keep
        )
        scale = torch.cat(
            [
                torch.full((B,), guidance_audio, device=device),
                torch.full((B * T,), guidance_video, device=device),
            ]
        )
        return cond, cond.cat(null), scale

    def denoise(self, x: Tensor, t: Tensor, cond: DecoderConditions, scale: Tensor | None = None) -> Tensor:
        """The decoder's output (eps or v, fp32) for fp32 latents x [N, C, L, L] at timesteps t (0-d or
        [N]), in the weights' dtype; with `scale` [N], `cond` holds both branches' conditions [2N]
        and the output is guided (Eq. 9)."""
        dtype, t = self.decoder.unet.dtype, t.expand(x.shape[0])
        if scale is None:
            return self.decoder(x.to(dtype), t, cond).float()
        output_cond, output_uncond = self.decoder(torch.cat([x, x]).to(dtype), torch.cat([t, t]), cond).chunk(
            2
        )
        return guided_eps(output_uncond.float(), output_cond.float(), scale)
