#!/usr/bin/env python
"""Progressive distillation of the autoencoder's signal decoder: a decoder of few steps and one branch.

    python tools/distill_decoder.py outputs/runs/ae-synthetic-tiny \\
        --out outputs/runs/ae-synthetic-tiny-distilled --teacher-steps 16 --student-steps 4

Progressive distillation (Salimans & Ho 2022) with the guidance distilled in (Meng et al. 2023).
Each stage halves the steps: a student, initialised from its teacher, learns to reach in one DDIM
step what its teacher reaches in two, on the "trailing" grid (t = T - 1 down in steps of T / n,
nested across halvings; ae.decode_sampler=ddim-trailing). The first teacher is the trained decoder
with the guidance of its config (Eq. 9 s per modality), so every student runs one branch: half
the batch of a guided step. Only the UNet trains; encoders, projectors and condition generators
stay the trained ones, and the conditions (with the class the head predicts, as when decoding)
come from the training clips. Loss: x0 MSE weighted by max(SNR, 1).

Writes a run folder that `load_autoencoder`, tools/reconstruct.py and tools/bench_decoder_steps.py
(--reference-run <the teacher run>) read, with ae.decode_steps = --student-steps,
decode_sampler = ddim-trailing and guidance 0. A DiT trained on the teacher's latents decodes with
it through ae_run=<this folder> only once the fingerprint check allows a replaced decoder (it hashes
every weight): not done here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_model
from torch.utils.data import DataLoader

from mmldm_ae.autoencoder import MultiModalAutoencoder
from mmldm_ae.engine.checkpoint import publish_checkpoint, resolve_checkpoint
from mmldm_ae.engine.diffusion import build_sampler, predict_x0
from mmldm_ae.pipeline import load_autoencoder, pixels_to_latents
from mmldm_ae.vae import VAELoadError
from mmldm_data.cli import user_errors
from mmldm_data.config import ConfigError, to_plain_dict
from mmldm_data.dataset import SoundingVideoDataset

PROGRAM = "distill_decoder"
SAMPLER = "ddim-trailing"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", help="run_dir of tools/train_ae.py (the teacher), or one of its checkpoints")
    parser.add_argument("--out", type=Path, required=True, help="the distilled run's folder")
    parser.add_argument("--teacher-steps", type=int, default=16, help="DDIM steps of the first teacher")
    parser.add_argument("--student-steps", type=int, default=4, help="steps of the last student")
    parser.add_argument("--iterations", type=int, default=300, help="optimiser steps per stage")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per step")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--data-root", help="train on clips from here instead of the run's dataset folder")
    args = parser.parse_args(argv)
    steps, student = args.teacher_steps, args.student_steps
    if student < 1 or steps <= student or steps % student or (steps // student) & (steps // student - 1):
        parser.error(
            f"--teacher-steps ({steps}) must be --student-steps ({student}) times a power of two (> 1)"
        )
    if min(args.iterations, args.batch_size, args.log_every) < 1 or args.lr <= 0:
        parser.error("--iterations, --batch-size and --log-every must be >= 1 and --lr > 0")
    return args


def alpha_bar(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """abar_t per item [N, 1, 1, 1]; t = -1 (past the last step) is abar_0, as diffusers' DDIM with
    set_alpha_to_one=False."""
    return alphas_cumprod[t.clamp(min=0)].reshape(-1, 1, 1, 1)


def ddim_step(x0: torch.Tensor, x_t: torch.Tensor, a_t: torch.Tensor, a_s: torch.Tensor) -> torch.Tensor:
    """x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps, with eps the noise that x_t and x0 imply (eta 0)."""
    eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    return a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps


def one_step_target(x_t: torch.Tensor, x_end: torch.Tensor, a_t: torch.Tensor, a_end: torch.Tensor):
    """The x0 whose single DDIM step from x_t (at abar_t) lands on x_end (at abar_end)."""
    ratio = ((1 - a_end) / (1 - a_t)).sqrt()
    return (x_end - ratio * x_t) / (a_end.sqrt() - ratio * a_t.sqrt())


class Distiller:
    """One stage: a student of `steps` steps learning from a teacher of 2 * steps."""

    def __init__(
        self, teacher: MultiModalAutoencoder, student: MultiModalAutoencoder, steps: int, guided: bool
    ):
        self.teacher, self.student, self.guided = teacher, student, guided
        self.schedule = teacher.train_scheduler
        grid = build_sampler(SAMPLER, steps, teacher.cfg.schedule).timesteps
        fine = build_sampler(SAMPLER, 2 * steps, teacher.cfg.schedule).timesteps
        # Per student step k: its timestep, the teacher's middle one, and where both end (-1: x0).
        self.start, self.middle = grid, fine[1::2]
        self.end = torch.cat([grid[1:], torch.tensor([-1])])

    def teacher_x0(self, x_t: torch.Tensor, t: torch.Tensor, conditions: tuple) -> torch.Tensor:
        cond, both, scale = conditions
        output = (
            self.teacher.denoise(x_t, t, both, scale) if self.guided else self.teacher.denoise(x_t, t, cond)
        )
        return predict_x0(self.schedule, x_t, output, t)

    def loss(self, latents: dict, generator: torch.Generator) -> torch.Tensor:
        teacher = self.teacher
        audio, targets = latents["audio_latents"], latents["target_latents"]
        with torch.no_grad():
            z_v, z_a = teacher.encode(latents["key_latents"], audio)
            conditions = teacher.decoding_conditions(
                z_v, z_a, latents["target_indices"].float(), None, *(() if self.guided else (0.0, 0.0))
            )
        x0 = torch.cat([audio, targets.flatten(0, 1)])
        k = torch.randint(0, len(self.start), (x0.shape[0],), generator=generator)
        t, middle, end = self.start[k], self.middle[k], self.end[k]
        alphas = self.schedule.alphas_cumprod
        a_t, a_mid, a_end = (alpha_bar(alphas, s) for s in (t, middle, end))
        x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * torch.randn(x0.shape, generator=generator)
        with torch.no_grad():
            x_mid = ddim_step(self.teacher_x0(x_t, t, conditions), x_t, a_t, a_mid)
            x_end = ddim_step(self.teacher_x0(x_mid, middle, conditions), x_mid, a_mid, a_end)
            target = one_step_target(x_t, x_end, a_t, a_end)
        estimate = predict_x0(self.schedule, x_t, self.student.denoise(x_t, t, conditions[0]), t)
        weight = (a_t / (1 - a_t)).clamp(min=1.0)
        return (weight * (estimate - target).square()).mean()


def copy_model(model: MultiModalAutoencoder, num_classes: int) -> MultiModalAutoencoder:
    """A copy by state dict (the decoder's injection wrappers are bound to their own modules)."""
    copy = MultiModalAutoencoder(model.cfg, num_classes)
    copy.load_state_dict(model.state_dict())
    return copy


def write_run(student: MultiModalAutoencoder, teacher_state: dict, out: Path, info: dict) -> Path:
    """A one-checkpoint run folder in the layout of tools/train_ae.py."""
    state = json.loads(json.dumps(teacher_state))
    state["config"]["ae"] |= {
        "decode_steps": info["student_steps"],
        "decode_sampler": SAMPLER,
        "decode_guidance_fraction": 1.0,
        "guidance_audio": 0.0,
        "guidance_video": 0.0,
    }
    state |= {"final": True, "distillation": info}
    folder = out / "checkpoints" / f"step_{info['iterations_total']:07d}"
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_model(student, str(partial / "autoencoder.safetensors"))
    (partial / "state.json").write_text(json.dumps(state, indent=1))
    publish_checkpoint(partial, folder)
    return folder


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    with user_errors(PROGRAM, VAELoadError):
        torch.manual_seed(args.seed)
        checkpoint = resolve_checkpoint(args.run, "train one with `make train-ae`")
        teacher_state = json.loads((checkpoint / "state.json").read_text())
        pipeline = load_autoencoder(checkpoint)  # fp32: training
        num_classes = teacher_state["architecture"]["num_classes"]
        cfg = pipeline.model.cfg
        if "distillation" in teacher_state:
            raise ConfigError(f"{args.run} is already distilled; distil its teacher instead")
        if args.data_root:
            pipeline.dataset = replace(pipeline.dataset, data_root=args.data_root)
        dataset = SoundingVideoDataset(pipeline.dataset)
        if len(dataset) < args.batch_size:
            raise ConfigError(f"{pipeline.dataset.data_root} has {len(dataset)} windows < --batch-size")
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)
        generator = torch.Generator().manual_seed(args.seed)
        teacher = pipeline.model.requires_grad_(False)
        steps, stages, history = args.teacher_steps // 2, [], []
        while steps >= args.student_steps:
            student = copy_model(teacher, num_classes).train()
            student.requires_grad_(False).decoder.requires_grad_(True)
            optimizer = torch.optim.AdamW(student.decoder.parameters(), lr=args.lr, weight_decay=0.0)
            distiller = Distiller(teacher, student, steps, guided=not stages)
            started, done, losses = time.perf_counter(), 0, []
            print(f"{PROGRAM}: stage {len(stages) + 1}: {2 * steps} -> {steps} steps", file=sys.stderr)
            while done < args.iterations:
                for batch in loader:
                    loss = distiller.loss(pixels_to_latents(pipeline.vae, batch), generator)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    losses.append(loss.detach())
                    done += 1
                    if done % args.log_every == 0 or done == args.iterations:
                        mean = float(torch.stack(losses[-args.log_every :]).mean())
                        left = (time.perf_counter() - started) / done * (args.iterations - done)
                        print(
                            f"  {done}/{args.iterations} loss {mean:.4f} (about {left:.0f} s left)",
                            file=sys.stderr,
                            flush=True,
                        )
                        history.append({"steps": steps, "iteration": done, "loss": mean})
                    if done == args.iterations:
                        break
            stages.append(
                {
                    "teacher_steps": 2 * steps,
                    "student_steps": steps,
                    "seconds": round(time.perf_counter() - started, 1),
                }
            )
            teacher = student.eval().requires_grad_(False)
            steps //= 2
        pipeline.model = teacher
        pipeline.model.cfg = replace(cfg, decode_steps=args.student_steps, decode_sampler=SAMPLER)
        info = {
            "teacher_run": str(args.run),
            "teacher_checkpoint": str(checkpoint),
            "teacher_guidance": {"audio": cfg.guidance_audio, "video": cfg.guidance_video},
            "teacher_steps": args.teacher_steps,
            "student_steps": args.student_steps,
            "iterations_per_stage": args.iterations,
            "iterations_total": args.iterations * len(stages),
            "batch_size": args.batch_size,
            "lr": args.lr,
            "stages": stages,
            "loss_history": history,
            "dataset": to_plain_dict(pipeline.dataset)["data_root"],
        }
        folder = write_run(teacher, teacher_state, args.out, info)
    summary = {"out": str(args.out), "checkpoint": str(folder), "stages": stages}
    summary["seconds"] = round(time.perf_counter() - began, 1)
    print(f"{PROGRAM}: wrote the {args.student_steps}-step decoder to {folder}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
