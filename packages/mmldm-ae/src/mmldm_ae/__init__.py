"""Autoencoder stage of MM-LDM: KL-VAE wrapper and the hierarchical multi-modal autoencoder.

Names are imported on first use (mmldm_data.lazy).
"""

from mmldm_data.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "AEConfig": "mmldm_ae.autoencoder",
        "MultiModalAutoencoder": "mmldm_ae.autoencoder",
        "AutoencoderPipeline": "mmldm_ae.pipeline",
        "load_autoencoder": "mmldm_ae.pipeline",
        "KLVAE": "mmldm_ae.vae",
        "VAEConfig": "mmldm_ae.vae",
        "build_vae": "mmldm_ae.vae",
        "Trainer": "mmldm_ae.engine.trainer",
        "TrainConfig": "mmldm_ae.engine.trainer",
    },
)
