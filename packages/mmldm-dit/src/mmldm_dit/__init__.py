"""Generator stage of MM-LDM: DiT over audio + video perceptual latents, cross-modal guidance, sampling."""
