"""Signal decoder (paper section 3.1): feature generator + the diffusion UNet it conditions by injection."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmldm_ae.autoencoder.config import AEConfig
from mmldm_ae.autoencoder.layers import (
    ResBlock,
)

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
    of `forward`.

    Gradient checkpointing (`enable_gradient_checkpointing`) must not re-run a hook during backward,
    when the features are gone: each down-path module's own `forward` is checkpointed, while its hook
    (in `__call__`, outside the recomputed region) adds the feature as an ordinary autograd op.
    diffusers checkpoints the middle and up blocks, which have no hooks.
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
            module.checkpointed = False
            module.forward = partial(checkpointable_forward, module)  # a partial follows deepcopies
        self._injection_modules = modules
        self._features: list[Tensor] | None = None
        self.gradient_checkpointing = False

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute activations block by block in the backward pass (train.gradient_checkpointing)."""
        if enabled:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()
        # diffusers checkpoints whole module calls, hooks included (re-run in backward by some torch
        # versions, when the features are gone): the down path uses ours, which leaves the hooks out.
        for block in self.unet.down_blocks:
            for module in block.modules():
                if hasattr(module, "gradient_checkpointing"):
                    module.gradient_checkpointing = False
        for module in self._injection_modules:
            module.checkpointed = enabled
        self.gradient_checkpointing = enabled

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


def checkpointable_forward(module: nn.Module, *args, **kwargs):
    """`module`'s own forward, recomputed in the backward pass when `module.checkpointed` (its hooks run
    in __call__, outside the recomputed region)."""
    forward = type(module).forward.__get__(module)
    if module.checkpointed and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def load_unet_weights(unet: UNet2DConditionModel, path: str | Path) -> None:
    """Initialise `unet` from a local diffusers UNet folder (or a pipeline folder with unet/)."""
    folder = Path(path).expanduser()
    if (folder / "unet" / "config.json").is_file():
        folder = folder / "unet"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"ae.unet_init={str(path)!r} is not a local diffusers UNet folder (config.json + weights) nor a "
            "pipeline folder with a unet/ subfolder. Download an SD-1.x repository once (e.g. "
            "stable-diffusion-v1-5/stable-diffusion-v1-5) and point ae.unet_init at it, or set "
            "ae.unet_init=null to start from random weights; nothing is downloaded at run time."
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
