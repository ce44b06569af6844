"""Training infrastructure shared by every stage (KL-VAE, autoencoder, DiT).

trainer.py       the loop: Accelerate, accumulation, EMA, non-finite guard, status line
checkpoint.py    checkpoint folders: find, load weights / EMA, RNG state
logger.py        W&B logging (online, offline or disabled)
sweeps.py        sweep bookkeeping: a run's study, label, metrics.json, failures
diffusion.py     the DDPM noise schedule, targets and samplers' schedulers
latent_cache.py  sharded safetensors caches of encoded windows (VAE and perceptual latents)
"""
