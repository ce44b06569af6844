"""Kill a training run again and again; check that it still ends bit for bit as an uninterrupted one.

A tiny model (a regressor and a critic: two optimisers, EMA, gradient accumulation, random noise in
the loss) trains with the shared Trainer in a subprocess that checkpoints every other step. The
soak SIGKILLs it `--kills` times, resuming each time: every other kill waits until a checkpoint is
being written (a step_*.partial folder exists) and strikes a few milliseconds later, the others
strike a random moment after a random step. Finally every weight, optimiser, EMA and grad-scaler
tensor of the final checkpoint is compared with those of a run that was never interrupted.

    .venv/bin/python tools/soak_resume.py --kills 20

Prints one line per kill and a JSON summary; the exit status is 1 when anything differs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

WIDTH = 512  # about 1.6 M parameters: checkpoint writes last long enough to be hit


def train_worker(run_dir: Path, steps: int) -> None:
    """Train the tiny model in this process up to `steps` (resuming from run_dir)."""
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from mmldm_ae.engine.trainer import TrainConfig, Trainer

    torch.set_num_threads(1)  # the same kernels in every process

    class Pairs(Dataset):
        def __init__(self):
            self.epoch = 0

        def __len__(self) -> int:
            return 64

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __getitem__(self, index: int) -> dict:
            generator = torch.Generator().manual_seed(1000 * self.epoch + index)
            x = torch.randn(16, generator=generator)
            return {"x": x, "y": x.flip(0) + 0.1 * torch.randn(16, generator=generator)}

    class Task:
        def __init__(self):
            torch.manual_seed(0)
            self.model = nn.Sequential(nn.Linear(16, WIDTH), nn.SiLU(), nn.Linear(WIDTH, WIDTH), nn.SiLU())
            self.model.append(nn.Linear(WIDTH, 16))
            self.critic = nn.Sequential(nn.Linear(16, WIDTH), nn.SiLU(), nn.Linear(WIDTH, 1))

        def modules(self) -> dict[str, nn.Module]:
            return {"model": self.model, "critic": self.critic}

        def optimizer_modules(self) -> list[str]:
            return ["model", "critic"]

        def loss(self, optimizer: str, batch: dict, step: int, modules: dict[str, nn.Module]):
            prediction = modules["model"](batch["x"] + 0.01 * torch.randn_like(batch["x"]))
            if optimizer == "critic":
                critic = modules["critic"]
                real, fake = critic(batch["y"]), critic(prediction.detach())
                loss = torch.relu(1 - real).mean() + torch.relu(1 + fake).mean()
                return loss, {}
            return (prediction - batch["y"]).square().mean() - 0.01 * modules["critic"](prediction).mean(), {}

        def architecture(self) -> dict:
            return {"width": WIDTH}

        def log_media(self, logger, step: int, run_dir: Path) -> None:
            pass

    config = TrainConfig(
        max_steps=steps,
        batch_size=8,
        grad_accum=2,
        lr=1e-3,
        warmup_steps=5,
        ema_decay=0.9,
        checkpoint_every=2,
        keep_checkpoints=2,
        log_every=1,
    )
    Trainer(Task(), Pairs(), config, run_dir).train()


def start_worker(run_dir: Path, steps: int) -> tuple[subprocess.Popen, list[str]]:
    """The worker process and the list its stderr lines are appended to as they come."""
    process = subprocess.Popen(
        [sys.executable, __file__, "--worker", str(run_dir), "--steps", str(steps)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True).start()
    return process, lines


def last_step(lines: list[str]) -> int:
    """The newest step a worker reported ("step k/N" status lines), 0 before the first."""
    for line in reversed(lines):
        found = re.match(r"step (\d+)/\d+ \|", line)
        if found:
            return int(found.group(1))
    return 0


def final_tensors(run_dir: Path) -> dict[str, object]:
    import torch
    from safetensors.torch import load_file

    from mmldm_ae.engine.checkpoint import resolve_checkpoint

    final = resolve_checkpoint(run_dir, "the soak's run did not finish")
    tensors: dict[str, object] = {}
    for path in sorted(final.glob("*.safetensors")):
        tensors.update({f"{path.stem}/{key}": value for key, value in load_file(path).items()})

    def flatten(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                flatten(f"{prefix}/{key}", item)
        elif isinstance(value, list | tuple):
            for index, item in enumerate(value):
                flatten(f"{prefix}/{index}", item)
        else:
            tensors[prefix] = value

    flatten("optimizers.pt", torch.load(final / "optimizers.pt", weights_only=True))
    state = json.loads((final / "state.json").read_text())
    tensors.update({f"state/{key}": state[key] for key in ("step", "samples_seen", "skipped_steps")})
    return tensors


def differences(expected: dict[str, object], actual: dict[str, object]) -> list[str]:
    import torch

    found = [f"{key}: missing" for key in sorted(set(expected) ^ set(actual))]
    for key in sorted(set(expected) & set(actual)):
        a, b = expected[key], actual[key]
        same = torch.equal(a, b) if torch.is_tensor(a) and torch.is_tensor(b) else a == b
        if not same:
            found.append(key)
    return found


def soak(kills: int, steps: int, seed: int, work_dir: Path) -> dict:
    rng = random.Random(seed)
    started = time.perf_counter()
    reference_dir, soaked_dir = work_dir / "uninterrupted", work_dir / "soaked"
    process, lines = start_worker(reference_dir, steps)
    if process.wait() != 0:
        raise SystemExit("the uninterrupted run failed:\n" + "".join(lines[-20:]))
    reference_seconds = time.perf_counter() - started

    during_write = trained = warnings = 0
    for kill in range(kills):
        process, lines = start_worker(soaked_dir, steps)
        while (
            not any(line.startswith(("resumed from", "step ")) for line in lines) and process.poll() is None
        ):
            time.sleep(0.001)
        resumed = next(
            (int(m.group(1)) for m in map(re.compile(r"resumed from .* at step (\d+)").match, lines) if m), 0
        )
        # Aim at a step that leaves room for the kills still to come.
        room = max(1, (steps - resumed) // (kills - kill + 1))
        target = resumed + rng.randint(1, 2 * room - 1)
        wait_for_write = kill % 2 == 0
        while process.poll() is None and last_step(lines) < target:
            time.sleep(0.0005)
        partial = soaked_dir / "checkpoints"
        while wait_for_write and process.poll() is None and not any(partial.glob("*.partial")):
            time.sleep(0.0002)
        time.sleep(rng.uniform(0, 0.004 if wait_for_write else 0.03))
        writing = any(partial.glob("*.partial"))
        if process.poll() is not None:
            raise SystemExit(
                f"the run ended before kill {kill + 1}; give more --steps:\n" + "".join(lines[-20:])
            )
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed_at = last_step(lines)
        during_write += writing
        trained += max(0, killed_at - resumed)
        warnings += sum("skipping checkpoint" in line or "did not finish" in line for line in lines)
        moment = "during a checkpoint write" if writing else "between writes"
        print(f"kill {kill + 1}/{kills}: resumed at step {resumed}, killed after step {killed_at} ({moment})")

    process, lines = start_worker(soaked_dir, steps)
    if process.wait() != 0:
        raise SystemExit("the last resume failed:\n" + "".join(lines[-20:]))
    warnings += sum("skipping checkpoint" in line or "did not finish" in line for line in lines)
    different = differences(final_tensors(reference_dir), final_tensors(soaked_dir))
    return {
        "kills": kills,
        "kills_during_checkpoint_write": during_write,
        "steps": steps,
        "steps_between_resume_and_kill": trained,
        "warnings_about_unfinished_or_invalid_checkpoints": warnings,
        "uninterrupted_run_s": round(reference_seconds, 1),
        "total_s": round(time.perf_counter() - started, 1),
        "tensors_compared": len(final_tensors(reference_dir)),
        "bit_identical": not different,
        "differences": different[:20],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs before the run may finish")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: 6 per kill + 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="keep the runs here (default: a temp dir)"
    )
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or 6 * args.kills + 10
    if args.worker is not None:
        train_worker(args.worker, steps)
        return
    if args.kills < 1:
        parser.error(f"--kills must be >= 1, got {args.kills}")
    os.environ.setdefault("WANDB_MODE", "disabled")
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="soak-resume-"))
    try:
        summary = soak(args.kills, steps, args.seed, work_dir)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(json.dumps(summary))
    sys.exit(0 if summary["bit_identical"] else 1)


if __name__ == "__main__":
    main()
