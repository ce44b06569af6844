"""Stage 0: the KL-VAE that maps frames and audio images to the latents every later stage works in.

MM-LDM uses the Stable Diffusion / LDM KL-f8 autoencoder (docs/design.md#vae): 256^2 RGB -> 4x32x32,
latents multiplied by 0.18215 so that they have roughly unit variance. This module holds

- the configuration (`VAEConfig`, `Stage0Config`) and architecture presets (`VAE_PRESETS`),
- `KLVAE`, a thin wrapper over diffusers' `AutoencoderKL` with the scale applied and chunked
  encode/decode,
- loading from a local diffusers folder or an original LDM/SD single-file checkpoint, converted
  here without any hub access (diffusers' `from_single_file` fetches configs from the hub),
- the model side of stage-0 training: `vae_losses`, `PatchDiscriminator`,
  `patch_discriminator_loss`. The loop itself lives in the generic trainer.

No weights ship with the project. SD's VAE is the `vae/` folder of a Stable Diffusion v1.x
diffusers repository (e.g. `stable-diffusion-v1-5/stable-diffusion-v1-5`), or `stabilityai/sd-vae-ft-mse`
(a decoder fine-tune of it); download either once and pass the local folder as `vae.weights`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import load_file
from torch import Tensor, nn

from mmldm_data.config import ConfigError

log = logging.getLogger(__name__)

SD_SCALE = 0.18215  # LDM's scale_factor for the KL-f8 first stage

WHERE_TO_GET_SD_VAE = (
    "SD's VAE is the vae/ folder of a Stable Diffusion v1.x diffusers repository "
    "(e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) or stabilityai/sd-vae-ft-mse; download it once "
    "and set vae.weights=/local/folder (or a .ckpt/.safetensors/.pth single-file checkpoint)"
)

# AutoencoderKL keyword arguments per preset. The decoder mirrors the encoder; the spatial factor
# is 2 ** (blocks - 1) because the last encoder block does not downsample.
VAE_PRESETS: dict[str, dict] = {
    # SD / LDM KL-f8: ch 128, ch_mult (1, 2, 4, 4), 2 res blocks, mid-block attention only.
    # 256^2 -> 4x32x32; 83.7M parameters.
    "sd": dict(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=256,
        scaling_factor=SD_SCALE,
    ),
    # CPU demos, trained from scratch: 64^2 -> 4x16x16; 0.9M parameters.
    "tiny": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=SD_SCALE,
    ),
}

# Prefixes of the parts of original LDM/SD checkpoints that are not the VAE: a full SD checkpoint
# nests the VAE under `first_stage_model.`; LDM autoencoder training checkpoints carry the
# LPIPS/discriminator loss under `loss.`.
_SD_VAE_PREFIX = "first_stage_model."
_LDM_LOSS_PREFIX = "loss."
_TORCH_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin")


class VAELoadError(RuntimeError):
    """VAE weights are missing, unreadable, or do not fit the chosen architecture."""


@dataclass
class Stage0Config:
    """How stage 0 trains the VAE: from scratch (tiny) or the authors' decoder fine-tune (sd).

    Loss weights follow LDM's LPIPSWithDiscriminator (kl_weight 1e-6, disc_weight 0.5,
    disc_start 10001), without LPIPS (its weights cannot be fetched offline).
    """

    train_encoder: bool = False  # False: encoder and quant_conv frozen (fix_encoder=True)
    kl_weight: float = 1e-6
    adv_weight: float = 0.5
    adaptive_adv_weight: bool = True  # LDM's gradient-norm balancing at the decoder's last layer
    disc_start: int = 10001  # step from which the adversarial term is on
    disc_channels: int = 64
    disc_layers: int = 3


@dataclass
class VAEConfig:
    preset: str = "sd"
    # A local diffusers folder (an AutoencoderKL folder, or a pipeline folder with vae/), or an
    # original single-file checkpoint (.ckpt/.pth/.pt/.bin or .safetensors). None: random init.
    weights: str | None = None
    # Latent = posterior * scale. None: the weights' own scaling_factor (presets: 0.18215).
    scale: float | None = None
    # The authors encode with posterior.sample(); the mode is deterministic, and SD's posterior
    # std is tiny, so the two barely differ.
    sample_posterior: bool = False
    chunk_size: int = 16  # images per encoder/decoder call; bounds activation memory
    block_out_channels: list[int] | None = None  # overrides the preset's widths (and depth)
    stage0: Stage0Config = field(default_factory=Stage0Config)

    def validate(self) -> None:
        problems = []
        if self.preset not in VAE_PRESETS:
            problems.append(f"vae.preset must be one of {sorted(VAE_PRESETS)}, got {self.preset!r}")
        if self.scale is not None and self.scale <= 0:
            problems.append(f"vae.scale must be > 0 (or null), got {self.scale}")
        if self.chunk_size < 1:
            problems.append(f"vae.chunk_size must be >= 1, got {self.chunk_size}")
        if self.block_out_channels is not None and not self.block_out_channels:
            problems.append("vae.block_out_channels must be null or a non-empty list")
        ConfigError.raise_if_any(problems, "invalid vae config")


def autoencoder_config(preset: str, block_out_channels: list[int] | None = None) -> dict:
    """AutoencoderKL keyword arguments of a preset, optionally with other block widths."""
    kwargs = dict(VAE_PRESETS[preset])
    if block_out_channels is not None:
        kwargs["block_out_channels"] = tuple(block_out_channels)
    blocks = len(kwargs["block_out_channels"])
    kwargs["down_block_types"] = ("DownEncoderBlock2D",) * blocks
    kwargs["up_block_types"] = ("UpDecoderBlock2D",) * blocks
    return kwargs


class KLVAE(nn.Module):
    """`AutoencoderKL` in latent units: `encode` returns posterior * scale, `decode` inverts it.

    Images are [N, 3, H, W] in [-1, 1]; latents [N, C, H / downsample, W / downsample]. Decoded
    images are not clamped, so losses see the decoder's raw output.
    """

    def __init__(
        self,
        model: AutoencoderKL,
        scale: float | None = None,
        sample_posterior: bool = False,
        chunk_size: int = 16,
    ):
        super().__init__()
        self.model = model
        self.scale = float(scale if scale is not None else model.config.scaling_factor)
        self.sample_posterior = sample_posterior
        self.chunk_size = chunk_size

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the encoder's and decoder's block activations in backward (train.gradient_checkpointing):
        the autoencoder's adversarial term decodes 3 images per clip through the frozen VAE with gradients."""
        self.model.enable_gradient_checkpointing()

    @property
    def latent_channels(self) -> int:
        return self.model.config.latent_channels

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        return (self.latent_channels, resolution // self.downsample, resolution // self.downsample)

    def forward(
        self, x: Tensor, generator: torch.Generator | None = None, encoder_grad: bool = True
    ) -> tuple[Tensor, DiagonalGaussianDistribution]:
        """Stage-0 training pass (no chunking): the reconstruction [N, 3, H, W] of a posterior sample,
        and the unscaled posterior. Going through forward keeps a DDP-wrapped VAE synchronised."""
        self._check_images(x)
        with torch.set_grad_enabled(encoder_grad and torch.is_grad_enabled()):
            posterior = self.model.encode(x).latent_dist
        return self.model.decode(posterior.sample(generator)).sample, posterior

    def encode(
        self, x: Tensor, sample: bool | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """[N, 3, H, W] in [-1, 1] -> scaled latents [N, C, h, w]; the posterior mode unless sampling."""
        sample = self.sample_posterior if sample is None else sample
        self._check_images(x)
        latents = []
        for chunk in x.split(self.chunk_size):  # in the weights' dtype (bf16 when frozen for bf16 training)
            posterior = self.model.encode(chunk.to(self.model.dtype)).latent_dist
            latents.append(posterior.sample(generator) if sample else posterior.mode())
        return (torch.cat(latents) * self.scale).to(x.dtype)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents [N, C, h, w] -> images [N, 3, H, W]; differentiable in z."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(
                f"decode expects latents [N, {self.latent_channels}, h, w], got {tuple(z.shape)}"
            )
        dtype = self.model.dtype
        images = [
            self.model.decode((chunk / self.scale).to(dtype)).sample for chunk in z.split(self.chunk_size)
        ]
        return torch.cat(images).to(z.dtype)

    def freeze_encoder(self) -> None:
        """The authors' fine-tune recipe: only the decoder (and post_quant_conv) keep learning."""
        for module in (self.model.encoder, self.model.quant_conv):
            if module is not None:
                module.requires_grad_(False)

    def freeze(self) -> KLVAE:
        """Frozen and in eval mode, as later stages use it; gradients still flow to its inputs."""
        self.requires_grad_(False)
        return self.eval()

    def fingerprint(self) -> str:
        """A hash of architecture, scale and every weight: identifies what produced cached latents."""
        digest = hashlib.sha1()
        config = {
            k: v for k, v in self.model.config.items() if not k.startswith("_") and k != "scaling_factor"
        }
        digest.update(
            json.dumps({"config": config, "scale": self.scale}, sort_keys=True, default=list).encode()
        )
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def save_pretrained(self, path: str | Path) -> None:
        """A diffusers folder whose scaling_factor is this wrapper's scale, loadable by `load_vae`."""
        self.model.register_to_config(scaling_factor=self.scale)
        self.model.save_pretrained(path)

    @torch.no_grad()
    def fit_scale(self, images: Tensor) -> float:
        """Set the scale so that the posterior mode of `images` has unit std (VAEs trained from scratch).

        LDM's rule: 0.18215 is 1 / std of SD's latents; a new VAE needs its own.
        """
        self.scale = 1.0
        self.scale = 1.0 / self.encode(images, sample=False).float().std().item()
        return self.scale

    def _check_images(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-1] % self.downsample or x.shape[-2] % self.downsample:
            raise ValueError(
                f"the VAE expects images [N, 3, H, W] with H and W divisible by {self.downsample}, "
                f"got {tuple(x.shape)}"
            )


# --------------------------------------------------------------------------------------------
# Building and loading
# --------------------------------------------------------------------------------------------


def build_vae(cfg: VAEConfig | str) -> KLVAE:
    """The VAE a config describes: a preset name, or a VAEConfig with optional weights."""
    cfg = VAEConfig(preset=cfg) if isinstance(cfg, str) else cfg
    cfg.validate()
    if cfg.weights is None:
        model = AutoencoderKL(**autoencoder_config(cfg.preset, cfg.block_out_channels))
    else:
        model = _load_autoencoder(Path(cfg.weights), cfg.preset, cfg.block_out_channels)
    return KLVAE(model, cfg.scale, cfg.sample_posterior, cfg.chunk_size)


def load_vae(path: str | Path, preset: str = "sd", scale: float | None = None) -> KLVAE:
    """A VAE from a local diffusers folder or an original single-file checkpoint of `preset`'s shape."""
    return build_vae(VAEConfig(preset=preset, weights=str(path), scale=scale))


def _load_autoencoder(path: Path, preset: str, block_out_channels: list[int] | None) -> AutoencoderKL:
    if not path.exists():
        raise VAELoadError(f"VAE weights {str(path)!r} do not exist. {WHERE_TO_GET_SD_VAE}")
    if path.is_dir():
        return _load_diffusers_folder(path)
    model = AutoencoderKL(**autoencoder_config(preset, block_out_channels))
    state = _read_checkpoint(path)
    model.load_state_dict(convert_ldm_vae_state_dict(state, model, source=str(path)))
    return model


def _load_diffusers_folder(path: Path) -> AutoencoderKL:
    # A whole pipeline folder holds the VAE in vae/; point at it so both layouts work.
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise VAELoadError(
            f"{str(path)!r} is a folder without an AutoencoderKL config.json (nor vae/config.json). "
            f"{WHERE_TO_GET_SD_VAE}"
        )
    try:
        return AutoencoderKL.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise VAELoadError(f"cannot load the diffusers VAE folder {str(folder)!r}: {error}") from None


def _read_checkpoint(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        elif path.suffix in _TORCH_SUFFIXES:
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise VAELoadError(
                f"unknown VAE checkpoint type {str(path)!r}: expected a diffusers folder, .safetensors, "
                f"or one of {', '.join(_TORCH_SUFFIXES)}"
            )
    except pickle.UnpicklingError as error:
        raise VAELoadError(
            f"{str(path)!r} holds more than tensors and cannot be loaded safely (weights_only=True): "
            f"{error}. Re-save only its state dict: "
            "torch.save(torch.load(path, weights_only=False)['state_dict'], new_path)"
        ) from None
    except (OSError, RuntimeError) as error:
        raise VAELoadError(f"cannot read the VAE checkpoint {str(path)!r}: {error}") from None
    # Lightning checkpoints (LDM's) nest the weights under state_dict.
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


def _ldm_key_to_diffusers(key: str, num_blocks: int) -> str:
    """One original LDM AutoencoderKL key in diffusers' naming (keys already in it pass through)."""
    # LDM numbers decoder blocks from the lowest resolution up; diffusers in decoding order.
    key = re.sub(
        r"^decoder\.up\.(\d+)\.(block|upsample)\.",
        lambda m: (
            f"decoder.up_blocks.{num_blocks - 1 - int(m[1])}."
            + ("resnets." if m[2] == "block" else "upsamplers.0.")
        ),
        key,
    )
    key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", key)
    key = re.sub(r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}.", key)
    key = re.sub(r"\.mid\.attn_1\.(q|k|v)\.", r".mid_block.attentions.0.to_\1.", key)
    key = key.replace(".mid.attn_1.norm.", ".mid_block.attentions.0.group_norm.")
    key = key.replace(".mid.attn_1.proj_out.", ".mid_block.attentions.0.to_out.0.")
    key = key.replace(".nin_shortcut.", ".conv_shortcut.")
    return re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)


def convert_ldm_vae_state_dict(
    state: dict[str, Tensor], model: AutoencoderKL, source: str
) -> dict[str, Tensor]:
    """Map an original LDM/SD VAE state dict onto `model`'s keys, refusing anything that does not fit.

    Accepts a bare VAE state dict, a full SD checkpoint (VAE under `first_stage_model.`), an LDM
    autoencoder training checkpoint (its `loss.` entries are dropped), or one already in diffusers
    naming. Raises VAELoadError naming `source` and the offending keys.
    """
    if any(k.startswith(_SD_VAE_PREFIX) for k in state):
        state = {k[len(_SD_VAE_PREFIX) :]: v for k, v in state.items() if k.startswith(_SD_VAE_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(_LDM_LOSS_PREFIX)}
    target = model.state_dict()
    num_blocks = len(model.config.block_out_channels)

    converted: dict[str, Tensor] = {}
    unexpected, mismatched = [], []
    for key, tensor in state.items():
        new_key = _ldm_key_to_diffusers(key, num_blocks)
        if new_key not in target:
            unexpected.append(key)
            continue
        # LDM's attention projections are 1x1 convolutions, diffusers' are linear layers.
        if tensor.ndim == 4 and target[new_key].ndim == 2:
            tensor = tensor[:, :, 0, 0]
        if tensor.shape != target[new_key].shape:
            mismatched.append(f"{key} {tuple(tensor.shape)} vs {tuple(target[new_key].shape)}")
        converted[new_key] = tensor
    missing = sorted(set(target) - set(converted))
    if unexpected or missing or mismatched:
        shape = model.config.block_out_channels
        problems = [
            f"{label} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
            for label, keys in (
                ("unexpected keys", unexpected),
                ("missing keys", missing),
                ("shape mismatches", mismatched),
            )
            if keys
        ]
        raise VAELoadError(
            f"{source!r} does not fit a KL-VAE with block_out_channels {list(shape)}:\n  "
            + "\n  ".join(problems)
            + "\nPick the matching vae.preset / vae.block_out_channels, or use an LDM/SD KL-f8 VAE. "
            + WHERE_TO_GET_SD_VAE
        )
    return converted


# --------------------------------------------------------------------------------------------
# Stage-0 training: reconstruction + KL + patch adversarial loss (LDM's recipe without LPIPS)
# --------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix's NLayerDiscriminator, as in LDM): [N, 3, H, W] -> logits [N, 1, h', w'].

    GroupNorm instead of LDM's BatchNorm: no batch-size dependence and nothing to synchronise
    across ranks or keep as running statistics.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, num_layers + 1):
            next_width = channels * min(2**n, 8)
            stride = 2 if n < num_layers else 1  # the last layer widens the receptive field only
            layers += [
                nn.Conv2d(width, next_width, 4, stride, 1, bias=False),
                nn.GroupNorm(_num_groups(next_width), next_width),
                nn.LeakyReLU(0.2),
            ]
            width = next_width
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        self.apply(_pix2pix_init)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _num_groups(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


def _pix2pix_init(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def patch_discriminator_loss(discriminator: nn.Module, real: Tensor, fake: Tensor) -> dict[str, Tensor]:
    """The discriminator's hinge loss on real images and (detached) reconstructions."""
    logits_real = discriminator(real.detach())
    logits_fake = discriminator(fake.detach())
    return {
        "loss": hinge_discriminator_loss(logits_real, logits_fake),
        "logits_real": logits_real.detach().mean(),
        "logits_fake": logits_fake.detach().mean(),
    }


def vae_losses(
    vae: KLVAE | nn.Module,
    x: Tensor,
    discriminator: nn.Module | None = None,
    adv_weight: float = 0.0,
    kl_weight: float = 1e-6,
    train_encoder: bool = True,
    adaptive_adv_weight: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The VAE's (generator's) stage-0 loss on images x [N, 3, H, W] in [-1, 1].

    loss = L1 + MSE + kl_weight * KL / (3 H W) + adv_weight * lambda * (-D(x_rec))

    Reconstruction terms are per-pixel means; KL is LDM's per-sample sum, divided by the pixel
    count so that kl_weight means what it means in LDM (whose reconstruction NLL is a per-sample
    sum). lambda is LDM's adaptive weight (ratio of the two terms' gradient norms at the decoder's
    last layer) when `adaptive_adv_weight`, else 1. Pass adv_weight=0 (or no discriminator) before
    the adversarial phase starts. There is no LPIPS term: its weights cannot be fetched offline.

    With train_encoder=False (decoder fine-tune) the encoder runs without a graph and KL is only
    reported. `vae` and `discriminator` may be DDP-wrapped. The discriminator's parameters also
    receive gradients from this loss; its own optimizer must zero them before its step, as in any
    two-optimizer GAN loop. Returns the reconstruction for `patch_discriminator_loss`.
    """
    reconstruction, posterior = vae(x, generator=generator, encoder_grad=train_encoder)
    rec_l1 = (reconstruction - x).abs().mean()
    rec_mse = (reconstruction - x).pow(2).mean()
    kl = posterior.kl().mean()  # per-sample sum over latent elements, averaged over the batch
    loss = rec_l1 + rec_mse
    if train_encoder:
        loss = loss + kl_weight * kl / x[0].numel()

    losses = {"rec_l1": rec_l1.detach(), "rec_mse": rec_mse.detach(), "kl": kl.detach()}
    if discriminator is not None and adv_weight > 0:
        generator_loss = -discriminator(reconstruction).mean()
        scale = (
            _adaptive_weight(rec_l1 + rec_mse, generator_loss, _unwrap(vae).model.decoder.conv_out.weight)
            if adaptive_adv_weight and loss.requires_grad
            else torch.ones((), device=x.device)
        )
        loss = loss + adv_weight * scale * generator_loss
        losses |= {"adv_g": generator_loss.detach(), "adv_scale": scale}
    return losses | {"loss": loss, "reconstruction": reconstruction}


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)  # DistributedDataParallel keeps the model in .module


def _adaptive_weight(reconstruction_loss: Tensor, generator_loss: Tensor, last_layer: Tensor) -> Tensor:
    # LDM's calculate_adaptive_weight: keeps the adversarial gradient on the scale of the
    # reconstruction gradient, whatever the absolute size of either loss.
    rec_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()
