"""Noise schedule helpers shared by the autoencoder's signal decoder and the DiT stage.

Both stages use the LDM schedule (docs/design.md#schedule): T = 1000, scaled-linear betas
0.00085 -> 0.012 (LDM calls it "linear": sqrt(beta) is linearly spaced), epsilon prediction, and
DDIM sampling with 50 uniform steps (timesteps 981, 961, ..., 1) and eta = 0. The schedules
themselves come from diffusers; this module only fixes their settings and adds the small tensor
helpers that training, sampling and guidance need. Few-step samplers (DPM-Solver++, UniPC) serve
both stages through `build_sampler`; `denoising_steps` lays a sampler's timesteps out so that a
sampling loop reads nothing back from the device.

`prediction_type: v_prediction` (SD 2.x) is an option for the autoencoder's decoder: under the
epsilon loss the noisiest steps, where a conditional decoder must take its content from the
condition, weigh about abar_t / (1 - abar_t) ~ 0.01 as much as the rest, so a short run (the
CPU preset) learns to use the condition far faster when the model predicts v = sqrt(abar) eps -
sqrt(1 - abar) x0, which is mostly -x0 at those steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from mmldm_data.config import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction")
# Samplers of both stages: DDIM (eta 0, the paper's), DDIM whose steps end at t = T - 1 ("trailing":
# the grid of tools/distill_decoder.py, nested across halvings), and the multistep solvers that reach
# DDIM's quality in far fewer steps (docs/decoder_steps.md measures them on the autoencoder's decoder).
SAMPLERS = ("ddim", "ddim-trailing", "dpmsolver++", "unipc")


@dataclass
class NoiseScheduleConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"  # or "v_prediction"

    def validate(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"schedule.prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}"
            )
        if self.num_train_timesteps < 2:
            raise ConfigError(f"schedule.num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise ConfigError(
                "schedule betas must satisfy 0 < beta_start < beta_end < 1, "
                f"got {self.beta_start}, {self.beta_end}"
            )


def build_train_scheduler(cfg: NoiseScheduleConfig | None = None) -> DDPMScheduler:
    """The forward (noising) process used for training; its config carries the prediction type."""
    cfg = cfg or NoiseScheduleConfig()
    cfg.validate()
    # The schedule's tables are real CPU tensors even when a model is being built on the meta device.
    with torch.device("cpu"):
        return DDPMScheduler(
            num_train_timesteps=cfg.num_train_timesteps,
            beta_start=cfg.beta_start,
            beta_end=cfg.beta_end,
            beta_schedule=cfg.beta_schedule,
            prediction_type=cfg.prediction_type,
            clip_sample=False,
        )


def build_sampling_scheduler(
    cfg: NoiseScheduleConfig | None = None, steps: int = 50, spacing: str = "leading"
) -> DDIMScheduler:
    """DDIM over the training schedule; by default the LDM/SD step layout ("leading" spacing, offset 1:
    981, 961, ..., 1), "trailing": T - 1 down in steps of T / steps (999, 979, ..., 19)."""
    if steps < 1:
        raise ValueError(f"number of DDIM steps must be >= 1, got {steps}")
    train = build_train_scheduler(cfg)
    with torch.device("cpu"):
        scheduler = DDIMScheduler.from_config(
            train.config,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1 if spacing == "leading" else 0,
            timestep_spacing=spacing,
        )
    scheduler.set_timesteps(steps)
    return scheduler


def build_sampler(sampler: str, steps: int, cfg: NoiseScheduleConfig | None = None) -> SchedulerMixin:
    """A fresh sampling scheduler (the multistep ones keep per-run state: one per run and modality)."""
    if steps < 1:
        raise ConfigError(f"sampling steps must be >= 1, got {steps}")
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if sampler.startswith("ddim"):
        return build_sampling_scheduler(cfg, steps, "trailing" if sampler == "ddim-trailing" else "leading")
    train = build_train_scheduler(cfg)
    with torch.device("cpu"):
        if sampler == "dpmsolver++":
            scheduler = DPMSolverMultistepScheduler.from_config(
                train.config, algorithm_type="dpmsolver++", solver_order=2
            )
        else:
            scheduler = UniPCMultistepScheduler.from_config(train.config, solver_order=2)
    scheduler.set_timesteps(steps)
    return scheduler


def denoising_steps(device: torch.device, *schedulers: SchedulerMixin) -> Iterator[tuple[int, torch.Tensor]]:
    """(timestep for `scheduler.step`, the same timestep as a 0-d long tensor on `device`) per step of
    schedulers that share one set of timesteps.

    The loop then reads nothing back from the device: the timesteps go to the device in one copy
    before the first step, and the schedulers get Python ints (diffusers' DDIM step compares a
    tensor timestep on the host, and the multistep solvers look theirs up unless told where to
    begin).
    """
    for scheduler in schedulers:
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
    timesteps = schedulers[0].timesteps
    on_device = timesteps.to(device)
    for index, t in enumerate(timesteps.tolist()):
        yield t, on_device[index]


def _per_item(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] broadcast over the non-batch dimensions of `like`."""
    picked = values.to(like.device)[timesteps.to(like.device)].to(like.dtype)
    return picked.reshape(-1, *([1] * (like.ndim - 1)))


def q_sample(
    scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, one timestep per item."""
    return scheduler.add_noise(x0, noise, timesteps.to(x0.device))


def diffusion_target(
    scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the model learns to output: the noise, or v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps.to(x0.device))
    return noise


def predict_x0(
    scheduler: DDPMScheduler, x_t: torch.Tensor, output: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The one-step clean estimate from the model's output; differentiable.

    epsilon: x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t); v: x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v.
    """
    alpha_bar = _per_item(scheduler.alphas_cumprod, timesteps, x_t)
    if scheduler.config.prediction_type == "v_prediction":
        return alpha_bar.sqrt() * x_t - (1.0 - alpha_bar).sqrt() * output
    return (x_t - (1.0 - alpha_bar).sqrt() * output) / alpha_bar.sqrt()


def guided_eps(eps_u: torch.Tensor, eps_c: torch.Tensor, s: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance, the paper's Eq. 9 for both stages: eps = eps_c + s (eps_c - eps_u).

    s = 0 is the plain conditional model (no guidance); the other common form
    eps_u + w (eps_c - eps_u), in which the authors give their values, is w = 1 + s
    (docs/design.md#guidance). s may be a per-item tensor. Also for v outputs.
    """
    if isinstance(s, torch.Tensor):
        s = s.to(eps_c).reshape(-1, *([1] * (eps_c.ndim - 1)))
    return eps_c + s * (eps_c - eps_u)


def sample_timesteps(
    scheduler: DDPMScheduler, n: int, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """n training timesteps drawn uniformly from [0, T)."""
    where = generator.device if generator is not None else device
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator, device=where)
    return t.to(device)
