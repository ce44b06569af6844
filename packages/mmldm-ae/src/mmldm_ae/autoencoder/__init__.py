"""The hierarchical multi-modal autoencoder of MM-LDM (paper section 3.1), one file per component.

config.py         AEConfig, DiscriminatorConfig: sizes, Table 5 toggles, loss weights
layers.py         residual blocks, attention, embeddings shared by the parts below
encoders.py       modality encoders: VAE latents -> KL posteriors (perceptual latents z_v, z_a)
semantic.py       projectors z -> semantic tokens, classification and contrastive heads
decoder.py        feature generator + signal decoder (the diffusion UNet conditioned by injection)
model.py          MultiModalAutoencoder: training losses, encode, decode
discriminator.py  cross-modal spatio-temporal discriminator (paper Eq. 2)
"""

from mmldm_ae.autoencoder.config import AEConfig, DiscriminatorConfig
from mmldm_ae.autoencoder.discriminator import (
    CrossModalDiscriminator,
    build_discriminator,
    discriminator_losses,
)
from mmldm_ae.autoencoder.model import MultiModalAutoencoder

__all__ = [
    "AEConfig",
    "CrossModalDiscriminator",
    "DiscriminatorConfig",
    "MultiModalAutoencoder",
    "build_discriminator",
    "discriminator_losses",
]
