"""Autoencoder stage of MM-LDM: KL-VAE wrapper and the hierarchical multi-modal autoencoder."""


def load_reconstructor(checkpoint, device="cpu"):
    """The evaluator's autoencoder round trip (rFVD / rKVD / rFAD); see mmldm_ae.pipeline."""
    from mmldm_ae.pipeline import load_reconstructor as load

    return load(checkpoint, device=device)
