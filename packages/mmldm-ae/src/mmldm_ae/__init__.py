"""Autoencoder stage of MM-LDM: KL-VAE wrapper and the hierarchical multi-modal autoencoder."""
