"""Training loss and samplers of the MM-LDM DiT (paper sections 3.2-3.3, docs/design.md#dit-training).

Training (`dit_training_loss`): one timestep per sample shared by both modalities, MSE per modality
against the model's target (epsilon, or v with dit.schedule.prediction_type=v_prediction), and
per-sample task masks that teach one model several distributions at once:

  * context dropped (10%): the unconditional model that guidance contrasts with;
  * a2v (5%): the clean audio latent is given as a condition; v2a (5%) mirrored;
  * long-generation model only: the previous clip's video (20%, audio continuation) or audio
    (20%, video continuation) or both (10%, a first clip) replaced by the zero latent.

The masks follow the authors' draw (docs/design.md#dit-training): context p; audio condition and
video condition drawn independently at 5% among rows that keep their context; a row where both
were chosen gets neither. So the rates are exactly 10% / 4.275% / 4.275% (see `task_rates`).

Sampling (`sample`, `sample_long`): DDIM (50 steps, eta 0), DPM-Solver++ or UniPC through diffusers
schedulers (`mmldm_ae.engine.diffusion.build_sampler`), in the weights' dtype (bf16 for inference)
with fp32 latents and scheduler arithmetic, no read-back from the device per step, and guidance
per modality by the paper's Eq. 9 (`guided_eps`, the autoencoder's decoder uses the same;
docs/design.md#guidance)

    eps = eps(x_t, c) + s * (eps(x_t, c) - eps(x_t, null)),

s = 0 being the plain conditional model. The authors' CLI value 9.0, written
eps_u + w (eps_c - eps_u), is s = w - 1 = 8.0. The null branch removes everything the model is
conditioned on: the prompt, the cross-modal condition and the previous clip.

Deviations from the authors, and why:
  * their unconditional branch keeps the a2v / v2a condition and only drops the prompt, a
    combination their own masks never train (conditions are drawn only where the context is
    kept); the null branch here is the fully unconditional model, which training does see;
  * a2v / v2a keep the conditioning modality on its forward-noised trajectory
    x_t = q_sample(z_cond, t) (the paper's reformulation p(z_v, z_a^t | z_a), and exactly what
    training shows the model), instead of denoising it freely and discarding it;
  * the previous-clip masks are drawn per sample, not once per batch, and a 10% "no previous
    clip" share (also on every context-dropped row, so the null branch is trained) lets the long
    model start a sequence; set previous_all_drop=0 for the authors' 20% / 20% only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from diffusers import DDPMScheduler
from torch import Tensor
from tqdm.auto import tqdm

from mmldm_ae.engine.diffusion import SAMPLERS as SAMPLERS  # the samplers of both stages
from mmldm_ae.engine.diffusion import (
    build_sampler,
    build_train_scheduler,
    denoising_steps,
    diffusion_target,
    guided_eps,
    q_sample,
    sample_timesteps,
)
from mmldm_data.config import ConfigError
from mmldm_data.tasks import Task
from mmldm_dit.dit import MODALITIES, MMDiT

ONE_CLIP_TASKS = tuple(task for task in Task if not task.needs_long_model)  # what `sample` runs
# The paper's Eq. 9 s of the authors' CLI default, w = 9.0 in their eps_u + w (eps_c - eps_u): s = w - 1.
DEFAULT_GUIDANCE = 8.0


#################################################################################
#                               Training                                        #
#################################################################################


@dataclass
class DiTLossConfig:
    """Multi-task training of the DiT (paper Eq. 9, docs/design.md#dit-training); rates are fractions of
    the rows."""

    context_drop: float = 0.1  # trained unconditionally: the null branch of guidance
    a2v: float = 0.05  # rows that get the clean audio latent as a condition (exclusive with v2a)
    v2a: float = 0.05
    # False: a row's conditioning modality (given clean) is left out of its loss.
    loss_on_condition: bool = True  # the authors' behaviour
    # Long-generation model only (dit.previous_clip_depth > 0): the previous clip's video dropped,
    # its audio dropped, or both.
    previous_video_drop: float = 0.2  # audio continuation
    previous_audio_drop: float = 0.2  # video continuation
    previous_all_drop: float = 0.1  # the first clip of a long generation

    def validate(self) -> None:
        problems = [
            f"dit_loss.{name} must be in [0, 1], got {getattr(self, name)}"
            for name in (
                "context_drop",
                "a2v",
                "v2a",
                "previous_video_drop",
                "previous_audio_drop",
                "previous_all_drop",
            )
            if not 0.0 <= getattr(self, name) <= 1.0
        ]
        if self.previous_video_drop + self.previous_audio_drop + self.previous_all_drop > 1.0:
            problems.append("dit_loss.previous_{video,audio,all}_drop are exclusive and must sum to <= 1")
        ConfigError.raise_if_any(problems, "invalid dit_loss config")


@dataclass
class TaskMasks:
    """Per-sample choices of one training batch, each a bool tensor [B]."""

    drop_context: Tensor
    a2v: Tensor  # the audio latent is given as a condition
    v2a: Tensor
    drop_previous_audio: Tensor
    drop_previous_video: Tensor


def task_rates(cfg: DiTLossConfig) -> dict[str, float]:
    """Exact probabilities of the masks drawn by `draw_task_masks` (joint, long-generation model)."""
    keep = 1.0 - cfg.context_drop
    return {
        "drop_context": cfg.context_drop,
        "a2v": keep * cfg.a2v * (1.0 - cfg.v2a),
        "v2a": keep * cfg.v2a * (1.0 - cfg.a2v),
        "drop_previous_audio": cfg.context_drop + keep * (cfg.previous_audio_drop + cfg.previous_all_drop),
        "drop_previous_video": cfg.context_drop + keep * (cfg.previous_video_drop + cfg.previous_all_drop),
    }


def _uniform(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    where = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=where).to(device)


def _randn_like(like: Tensor, generator: torch.Generator | None) -> Tensor:
    where = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=where).to(like)


def draw_task_masks(
    batch_size: int,
    cfg: DiTLossConfig,
    device: torch.device,
    generator: torch.Generator | None = None,
    cross_modal: bool = True,
) -> TaskMasks:
    """The per-sample task choices; cross_modal=False (a single-modal model) never conditions."""
    drop_context = _uniform(batch_size, generator, device) < cfg.context_drop
    a2v = (_uniform(batch_size, generator, device) < cfg.a2v) & ~drop_context
    v2a = (_uniform(batch_size, generator, device) < cfg.v2a) & ~drop_context
    if not cross_modal:
        a2v, v2a = torch.zeros_like(a2v), torch.zeros_like(v2a)
    both = a2v & v2a
    u = _uniform(batch_size, generator, device)
    drop_all_previous = (u >= cfg.previous_video_drop + cfg.previous_audio_drop) & (
        u < cfg.previous_video_drop + cfg.previous_audio_drop + cfg.previous_all_drop
    )
    # Context-dropped rows lose the previous clip too: they train the sampler's null branch.
    drop_all_previous = drop_all_previous | drop_context
    return TaskMasks(
        drop_context=drop_context,
        a2v=a2v & ~both,
        v2a=v2a & ~both,
        drop_previous_audio=drop_all_previous
        | ((u >= cfg.previous_video_drop) & (u < cfg.previous_video_drop + cfg.previous_audio_drop)),
        drop_previous_video=drop_all_previous | (u < cfg.previous_video_drop),
    )


def _zero_rows(x: Tensor, rows: Tensor) -> Tensor:
    return x * (~rows).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def dit_training_loss(
    model: MMDiT,
    z_a: Tensor | None,
    z_v: Tensor | None,
    scheduler: DDPMScheduler,
    generator: torch.Generator | None = None,
    cfg: DiTLossConfig | None = None,
    prev_a: Tensor | None = None,
    prev_v: Tensor | None = None,
) -> dict[str, Tensor]:
    """Epsilon MSE of one batch of clean latents (and, for the long model, the previous clip's).

    Returns {"loss" (to backpropagate), "loss_audio", "loss_video" (detached; modalities the model
    has)}; each modality's loss is the mean over the rows it counts in.
    """
    cfg = cfg or DiTLossConfig()
    cfg.validate()
    # `model` may be DDP-wrapped for the call; its settings live on the module inside.
    spec: MMDiT = extract_model_from_parallel(model)
    clean = {m: z for m, z in zip(MODALITIES, (z_a, z_v), strict=True) if m in spec.cfg.modalities}
    if any(z is None for z in clean.values()):
        raise ValueError(f"dit_training_loss needs a latent for every modality in {spec.cfg.modalities}")
    some = next(iter(clean.values()))
    batch_size, device = some.shape[0], some.device

    t = sample_timesteps(scheduler, batch_size, device, generator)
    masks = draw_task_masks(batch_size, cfg, device, generator, cross_modal=spec.cfg.joint)
    noise = {m: _randn_like(z, generator) for m, z in clean.items()}
    noisy = {m: q_sample(scheduler, z, noise[m], t) for m, z in clean.items()}
    condition_rows = {"audio": masks.a2v, "video": masks.v2a}

    inputs: dict[str, Tensor | None] = {"drop_context": masks.drop_context}
    if spec.cfg.joint:
        inputs["cond_a"] = _zero_rows(clean["audio"], ~masks.a2v)
        inputs["cond_v"] = _zero_rows(clean["video"], ~masks.v2a)
    if spec.previous_encoder is not None:
        previous = {"audio": prev_a, "video": prev_v}
        for m in clean:
            if previous[m] is None:
                raise ValueError(f"the long-generation model trains on the previous clip: pass prev_{m[0]}")
        if "audio" in clean:
            inputs["prev_a"] = _zero_rows(prev_a, masks.drop_previous_audio)
        if "video" in clean:
            inputs["prev_v"] = _zero_rows(prev_v, masks.drop_previous_video)
    elif prev_a is not None or prev_v is not None:
        raise ValueError("prev_a / prev_v need the long-generation model (dit.previous_clip_depth > 0)")

    eps_a, eps_v = model(noisy.get("audio"), noisy.get("video"), t, **inputs)
    predicted = {"audio": eps_a, "video": eps_v}
    losses = {}
    for m in clean:
        target = diffusion_target(scheduler, clean[m], noise[m], t)
        per_row = (predicted[m].float() - target.float()).pow(2).mean(dim=(1, 2, 3))
        counted = torch.ones_like(per_row) if cfg.loss_on_condition else (~condition_rows[m]).float()
        losses[m] = (per_row * counted).sum() / counted.sum().clamp(min=1.0)
    result = {"loss": sum(losses.values())}
    result.update({f"loss_{m}": value.detach() for m, value in losses.items()})
    return result


#################################################################################
#                               Sampling                                        #
#################################################################################


def _with_null(value: Tensor | None) -> Tensor | None:
    """[value ; zeros]: the conditional and the null half of a guided batch."""
    return None if value is None else torch.cat([value, torch.zeros_like(value)])


def _predict_eps(
    model: MMDiT,
    noisy: dict[str, Tensor],
    t: Tensor,
    inputs: dict[str, Tensor | None],
    guidance: dict[str, float],
) -> dict[str, Tensor]:
    """Guided epsilon per modality; both branches run as one doubled batch."""
    if not any(guidance.values()):
        eps = model(noisy.get("audio"), noisy.get("video"), t, **inputs)
        return {m: e for m, e in zip(MODALITIES, eps, strict=True) if e is not None}
    batch_size = t.shape[0]
    doubled = {m: torch.cat([x, x]) for m, x in noisy.items()}
    drop_context = torch.arange(2 * batch_size, device=t.device) >= batch_size
    eps = model(
        doubled.get("audio"),
        doubled.get("video"),
        torch.cat([t, t]),
        drop_context=drop_context,
        **{name: _with_null(value) for name, value in inputs.items()},
    )
    guided = {}
    for m, e in zip(MODALITIES, eps, strict=True):
        if e is not None:
            eps_cond, eps_null = e.chunk(2)
            guided[m] = guided_eps(eps_null, eps_cond, guidance[m])
    return guided


@torch.no_grad()
def sample(
    model: MMDiT,
    task: Task | str = Task.svg,
    batch_size: int | None = None,
    *,
    cond_a: Tensor | None = None,
    cond_v: Tensor | None = None,
    prev_a: Tensor | None = None,
    prev_v: Tensor | None = None,
    guidance_audio: float = DEFAULT_GUIDANCE,
    guidance_video: float = DEFAULT_GUIDANCE,
    sampler: str = "ddim",
    steps: int = 50,
    seed: int = 0,
    progress: bool = False,
) -> tuple[Tensor | None, Tensor | None]:
    """Latents (z_a, z_v) of one clip per batch item; None for a modality the model lacks.

    task: "svg" (both modalities from noise), "a2v" (video for the audio latent cond_a, which is
    returned as z_a), "v2a" (mirrored, cond_v). prev_a / prev_v (long-generation model) continue a
    previous clip; a missing one is the zero latent, so audio continuation is prev_a alone and
    video continuation prev_v alone. Same seed, same inputs, same device: same sample (the
    initial noise is drawn on the CPU, so it is the same on every device).
    """
    task = Task.parse(task, choices=ONE_CLIP_TASKS)
    for name, value in (("guidance_audio", guidance_audio), ("guidance_video", guidance_video)):
        if value < 0:
            raise ConfigError(f"{name} must be >= 0 (0: no guidance), got {value}")
    given_conditions = {"audio": cond_a, "video": cond_v}
    for modality, value in given_conditions.items():
        if value is not None and task.given_modality != modality:
            raise ValueError(f"cond_{modality[0]} is an input of task {Task.given(modality)}, not of {task}")
    known_modality = task.given_modality
    if known_modality is not None:
        if not model.cfg.joint:
            raise ValueError(
                f"task {task} needs a model of both modalities; this one has {model.cfg.modalities}"
            )
        if given_conditions[known_modality] is None:
            raise ValueError(f"task {task} needs cond_{known_modality[0]}, the clean {known_modality} latent")
    if model.previous_encoder is None and (prev_a is not None or prev_v is not None):
        raise ValueError("prev_a / prev_v need the long-generation model (dit.previous_clip_depth > 0)")
    batch_size = _batch_size(batch_size, cond_a, cond_v, prev_a, prev_v)

    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype  # the model's; latents stay fp32
    generator = torch.Generator("cpu").manual_seed(seed)
    present = model.cfg.ordered_modalities
    noisy = {
        m: torch.randn(batch_size, *model.cfg.latent_shape(m), generator=generator).to(device)
        for m in present
    }
    known = {known_modality: given_conditions[known_modality].to(device).float()} if known_modality else {}
    known_noise = {m: torch.randn(z.shape, generator=generator).to(device) for m, z in known.items()}

    inputs: dict[str, Tensor | None] = {}
    if model.cfg.joint:
        inputs.update({f"cond_{m[0]}": z.to(dtype) for m, z in known.items()})
    if model.previous_encoder is not None:
        inputs.update(
            prev_a=None if prev_a is None else prev_a.to(device, dtype),
            prev_v=None if prev_v is None else prev_v.to(device, dtype),
        )
    guidance = {"audio": guidance_audio, "video": guidance_video}
    guidance = {m: (0.0 if m in known else guidance[m]) for m in present}

    # The model's own schedule: its outputs are epsilon or v (dit.schedule.prediction_type).
    forward_process = build_train_scheduler(model.cfg.schedule)
    schedulers = {m: build_sampler(sampler, steps, model.cfg.schedule) for m in present if m not in known}
    loop = denoising_steps(device, *schedulers.values())
    for t, t_device in tqdm(loop, total=steps, desc=f"{task} ({sampler})", disable=not progress):
        t_batch = t_device.expand(batch_size)
        for m, z in known.items():
            noisy[m] = q_sample(forward_process, z, known_noise[m], t_batch)
        eps = _predict_eps(model, {m: x.to(dtype) for m, x in noisy.items()}, t_batch, inputs, guidance)
        for m, scheduler in schedulers.items():
            noisy[m] = scheduler.step(eps[m].float(), t, noisy[m]).prev_sample
    noisy.update(known)
    return noisy.get("audio"), noisy.get("video")


def _batch_size(batch_size: int | None, *given: Tensor | None) -> int:
    sizes = {x.shape[0] for x in given if x is not None}
    if batch_size is not None:
        sizes.add(batch_size)
    if len(sizes) != 1:
        raise ValueError(
            f"batch sizes disagree or are missing: {sorted(sizes)}; "
            "pass batch_size or condition tensors of one size"
        )
    (size,) = sizes
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    return size


def sample_long(
    model: MMDiT,
    num_clips: int,
    batch_size: int | None = None,
    *,
    prev_a: Tensor | None = None,
    prev_v: Tensor | None = None,
    cond_a: Tensor | None = None,
    cond_v: Tensor | None = None,
    seed: int = 0,
    **sample_kwargs: Any,
) -> tuple[Tensor | None, Tensor | None]:
    """Autoregressive generation: clip k+1 continues clip k's generated latents.

    The first clip continues prev_a / prev_v when given (audio / video continuation of a real
    clip) and starts from zero latents otherwise. Clip k uses seed + k. Returns latents
    [B, num_clips, C, S, S] per modality; the decoded clips join in time (the authors' 4 clips =
    64 frames, 6.4 s; mmldm_dit.generate.decode_media dissolves the joins).

    cond_a / cond_v [B, num_clips, C, S, S]: a2v / v2a of a long given modality, window by window:
    clip k is conditioned on window k and continues clip k-1 (its given window and the generated
    one), as training's a2v / v2a rows with a previous clip show the model.
    """
    if model.previous_encoder is None:
        raise ValueError("long generation needs the long-generation model (dit.previous_clip_depth > 0)")
    if num_clips < 1:
        raise ConfigError(f"num_clips must be >= 1, got {num_clips}")
    given = {name: z for name, z in (("cond_a", cond_a), ("cond_v", cond_v)) if z is not None}
    if len(given) > 1:
        raise ValueError("sample_long takes cond_a or cond_v, not both")
    for name, z in given.items():
        if z.ndim != 5 or z.shape[1] != num_clips:
            raise ValueError(f"{name} must be [B, num_clips={num_clips}, C, S, S], got {tuple(z.shape)}")
    task = Task.given("audio" if cond_a is not None else "video") if given else Task.svg
    clips: dict[str, list[Tensor]] = {m: [] for m in model.cfg.ordered_modalities}
    for index in range(num_clips):
        window = {name: z[:, index] for name, z in given.items()}
        prev_a, prev_v = sample(
            model,
            task,
            batch_size,
            prev_a=prev_a,
            prev_v=prev_v,
            seed=seed + index,
            **window,
            **sample_kwargs,
        )
        for m, z in zip(MODALITIES, (prev_a, prev_v), strict=True):
            if z is not None:
                clips[m].append(z)
    stacked = {m: torch.stack(zs, dim=1) for m, zs in clips.items()}
    return stacked.get("audio"), stacked.get("video")
