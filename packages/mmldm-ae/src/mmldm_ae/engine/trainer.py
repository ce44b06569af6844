"""The training loop shared by every stage (KL-VAE, autoencoder, DiT), in the fast-DiT / EDM2 style.

A stage supplies a `TrainingTask`: its modules, one loss per optimiser (with a discriminator,
two: the model's, then the discriminator's) and optionally pictures to log. This module owns the rest:
Accelerate for devices and precision, gradient accumulation, clipping, EMA, a resumable data
order, non-finite-loss guarding, checkpoints that resume exactly, a status line, W&B.

Checkpoints are folders `<run_dir>/checkpoints/step_XXXXXXX/` (layout and verification:
mmldm_ae.engine.checkpoint) holding weights, optimiser, EMA and RNG states, and the loop's position.
Resuming restores all of it, so a resumed run continues with the same losses as an uninterrupted one.
Every decision is taken by all processes together. A step never waits for the device (no host sync):
whether it is skipped (a non-finite loss or gradient on any process) is all-reduced and applied on
the device, and the numbers it logs stay there. The host reads them, with the skip counts, at logging,
checkpoint and preview steps only, where it also agrees to stop (train.max_minutes, SIGTERM /
SIGUSR1) or aborts on divergence (train.max_nonfinite_steps). A skipped step counts as a step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator, DistributedType, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file, save_model
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from mmldm_ae.engine.checkpoint import (
    checkpoint_dirs,
    describe_mismatch,
    ema_state_dict,
    load_module_weights,
    newest_valid_checkpoint,
    publish_checkpoint,
    read_ema_weights,
    rng_state,
    set_rng_state,
)
from mmldm_ae.engine.logger import WandbConfig, WandbLogger

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, incompatible checkpoint, bad settings)."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    # Wall-clock budget of one invocation (None: none); a run stopped by it checkpoints and resumes.
    max_minutes: float | None = None
    batch_size: int = 4  # per process, per micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    disc_lr: float | None = None  # None: same as lr
    weight_decay: float = 0.01  # AdamW, torch defaults otherwise (the authors' setting)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    precision: str = "no"  # "no" | "bf16" | "fp16" (Accelerate mixed precision)
    ema_decay: float | None = None  # None: no EMA (the authors use none)
    checkpoint_every: int = 500
    # Checkpoints of this run kept (the newest ones); a run's final checkpoint is never deleted.
    keep_checkpoints: int = 2
    # Also how often the host reads the device: skipped steps, signals and train.max_minutes act here.
    log_every: int = 10
    sample_every: int = 0  # 0: only at the end
    sample_at_end: bool = True  # previews of the final weights (off where a caller samples them itself)
    num_workers: int = 0
    seed: int = 0
    max_nonfinite_steps: int = 5  # abort after this many skipped (non-finite) steps in a row
    resume: bool = True  # continue from the newest checkpoint in run_dir when there is one
    # Recompute the activations of the large blocks (DiT blocks, the decoder UNet, the VAE decoder)
    # in the backward pass: less memory for about a third more compute.
    gradient_checkpointing: bool = False
    # torch.compile the DiT / the decoder UNet (static shapes: one compile per run, minutes on a GPU).
    compile: bool = False
    # DDP: the autograd graph is the same every step (saves DDP's per-step search; the DiT's case).
    ddp_static_graph: bool = False

    def validate(self) -> None:
        problems = []
        if self.max_steps < 1:
            problems.append(f"train.max_steps must be >= 1, got {self.max_steps}")
        if self.batch_size < 1 or self.grad_accum < 1:
            problems.append("train.batch_size and train.grad_accum must be >= 1")
        if self.lr <= 0 or (self.disc_lr is not None and self.disc_lr <= 0):
            problems.append(
                f"train.lr (and train.disc_lr when set) must be > 0, got {self.lr} / {self.disc_lr}"
            )
        if self.precision not in ("no", "bf16", "fp16"):
            problems.append(f"train.precision must be no, bf16 or fp16, got {self.precision!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            problems.append(f"train.ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            problems.append(f"train.max_minutes must be > 0 or null, got {self.max_minutes}")
        if self.checkpoint_every < 1 or self.log_every < 1:
            problems.append("train.checkpoint_every and train.log_every must be >= 1")
        if self.grad_clip is not None and not self.grad_clip > 0:
            problems.append(f"train.grad_clip must be > 0 or null (no clipping), got {self.grad_clip}")
        if self.warmup_steps < 0:
            problems.append(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0:
            problems.append(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if self.keep_checkpoints < 1:
            problems.append(
                "train.keep_checkpoints must be >= 1 (the newest is needed to resume), "
                f"got {self.keep_checkpoints}"
            )
        if self.max_nonfinite_steps < 1:
            problems.append(f"train.max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        for key in ("num_workers", "sample_every"):
            if getattr(self, key) < 0:
                problems.append(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if problems:
            raise TrainingError("invalid train config:\n  " + "\n  ".join(problems))


def compile_static(module: nn.Module) -> nn.Module:
    """`module` torch.compiled in place for static shapes (train.compile, sampling's compile): one
    graph per input shape, traced at its first call; the weights keep their names. Compiling twice
    (a base and a long DiT share one autoencoder) keeps the first."""
    if getattr(module, "_compiled_call_impl", None) is None:
        module.compile(dynamic=False)
    return module


def processes() -> PartialState:
    """This process's place among the launched ones (rank, device), shared with the Accelerator that a
    Trainer builds later: stages use it earlier, to build indexes and caches on the main process first."""
    return PartialState(cpu=not torch.cuda.is_available())


def check_distributed_type(kind: DistributedType) -> None:
    """Refuse what the checkpoints cannot handle yet: under FSDP each rank holds a shard, while saving
    gathers whole modules on rank 0 alone and the EMA is built over whole parameters."""
    if kind == DistributedType.FSDP:
        raise TrainingError(
            "FSDP is not supported yet (checkpoints and the EMA need whole parameters on every rank): "
            "launch with conf/accelerate/multi_gpu.yaml (DDP) instead"
        )


class TrainingTask(Protocol):
    """What a stage gives the loop."""

    def modules(self) -> dict[str, nn.Module]:
        """Trained modules by name; each optimiser's parameters come from one of them."""

    def optimizer_modules(self) -> list[str]:
        """Names of the modules with an optimiser, in step order: the model first, then any discriminator."""

    def prepare_step(self, micro: list[dict], modules: dict[str, nn.Module]) -> list[Any]:
        """Optional: the micro-batches of one optimiser step as `loss` will get them, made once per
        step before any loss, for losses that need the whole step (the autoencoder's contrastive
        negatives and random draws). By default `loss` gets the batches as loaded."""
        return micro

    def loss(
        self, optimizer: str, batch: Any, step: int, modules: dict[str, nn.Module]
    ) -> tuple[torch.Tensor | None, dict[str, float]]:
        """The loss for one optimiser on one micro-batch, and numbers to log; None skips that
        optimiser at this step (a discriminator before its start step). `modules` are the
        prepared (device-placed, DDP-wrapped) modules: call them, not the raw ones, so that
        gradients are synchronised across processes. Every loss of a step is computed before any
        optimiser steps, so a later optimiser's loss must not back-propagate into an earlier
        optimiser's module (detach the fakes a discriminator sees)."""

    def architecture(self) -> dict[str, Any]:
        """Settings a checkpoint must share with the run that resumes it."""

    def log_media(self, logger: WandbLogger, step: int, run_dir: Path) -> None:
        """Write and log pictures/videos (reconstructions, samples); may do nothing."""


# --------------------------------------------------------------------------------------------
# Data order that can be saved and resumed
# --------------------------------------------------------------------------------------------


class ResumableSampler(Sampler[tuple[int, int]]):
    """An endless seeded shuffle, split over processes, that starts at any sample count.

    It yields (epoch, index) pairs. The loop counts the samples it has consumed and a resumed run
    starts the sampler there, so DataLoader workers reading ahead never shift the data order.
    """

    def __init__(self, length: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        if length < world_size:
            raise TrainingError(f"the dataset has {length} items, fewer than the {world_size} processes")
        self.length, self.seed, self.rank, self.world_size, self.start = length, seed, rank, world_size, start
        self.per_rank = length // world_size  # equal shares keep the processes in step

    def __iter__(self) -> Iterator[tuple[int, int]]:
        consumed = self.start
        while True:
            epoch, position = divmod(consumed, self.per_rank)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.length)
            for index in order[self.rank :: self.world_size][position : self.per_rank]:
                yield epoch, int(index)
            consumed = (epoch + 1) * self.per_rank


class EpochIndexed(Dataset):
    """Passes the epoch to datasets whose random draws depend on it (set_epoch), in any worker."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


def export_submitit_distributed_env() -> None:
    """Inside a multi-task SLURM job started by Hydra's submitit launcher (conf/hydra/launcher/slurm.yaml),
    set RANK / WORLD_SIZE / MASTER_ADDR ... from SLURM's variables so that Accelerate joins the tasks
    into one torch.distributed world, as `accelerate launch` would."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or int(os.environ.get("SLURM_NTASKS", "1")) < 2:
        return
    if "RANK" in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class LoopState:
    step: int = 0  # optimiser steps done
    samples_seen: int = 0  # per process
    nonfinite_in_a_row: int = 0
    skipped_steps: int = 0


class StepHealth:
    """Device-side counts of skipped steps between two checks, so that no step waits to know.

    flags per step: [non-finite loss per optimiser, non-finite gradient per optimiser] (> 0: bad)."""

    def __init__(self, num_optimizers: int, device: torch.device):
        self.why = torch.zeros(2 * num_optimizers, device=device)  # steps skipped for each reason
        self.counts = torch.zeros(3, device=device)  # skipped, latest run in a row, longest run

    def add_step(self, flags: torch.Tensor, skip: torch.Tensor) -> None:
        skipped, run, longest = self.counts.unbind()
        run = (run + 1) * skip
        self.counts = torch.stack([skipped + skip, run, torch.maximum(longest, run)])
        self.why += (flags > 0).float()

    def read(self) -> tuple[int, int, int, list[int]]:
        """(skipped, latest run in a row, longest run, steps per reason) since the last read (a host sync)."""
        values = [int(v) for v in torch.cat([self.counts, self.why]).tolist()]
        self.counts = torch.stack([torch.zeros_like(self.counts[0]), self.counts[1], self.counts[1]])
        self.why.zero_()
        return values[0], values[1], values[2], values[3:]


def native_bf16(device: str | torch.device) -> bool:
    """Whether bf16 runs natively: CUDA, or a CPU whose oneDNN has bf16 kernels (AVX512-BF16, AMX).
    Elsewhere PyTorch falls back to a plain loop for bf16 convolutions, about 10x slower than fp32."""
    return torch.device(device).type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def runtime_precision(precision: str) -> str:
    """train.precision as this machine runs it: bf16 becomes fp32 ("no") where bf16 is not native
    (`native_bf16`): a tiny VAE step took 35 s in bf16 on such a CPU instead of about 1 s."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # as the Accelerator below
    return "no" if precision == "bf16" and not native_bf16(device) else precision


class Trainer:
    def __init__(
        self,
        task: TrainingTask,
        dataset: Dataset,
        config: TrainConfig,
        run_dir: str | Path,
        wandb: WandbConfig | None = None,
        run_config: dict | None = None,
    ):
        config.validate()
        self.task, self.dataset, self.config = task, dataset, config
        self.run_dir = Path(run_dir)
        self.run_config = run_config or {}
        export_submitit_distributed_env()
        # Stages that run in one process (the demo: a bf16 VAE, then an fp32 autoencoder) each set their
        # own precision; Accelerate keeps the first one process-wide unless its state is reset. The
        # distributed state (PartialState) stays.
        AcceleratorState._reset_state()
        precision = runtime_precision(config.precision)
        if precision != config.precision:
            print(
                f"train.precision={config.precision}: this CPU has no bf16 kernels (its bf16 "
                "convolutions run ~10x slower than fp32); training in fp32",
                file=sys.stderr,
            )
        self.accelerator = Accelerator(
            mixed_precision=precision,
            cpu=not torch.cuda.is_available(),  # as processes()
            step_scheduler_with_optimizer=False,
            # Gradients live in DDP's communication buckets: no second copy of every gradient.
            kwargs_handlers=[
                DistributedDataParallelKwargs(
                    gradient_as_bucket_view=True, static_graph=config.ddp_static_graph
                )
            ],
        )
        check_distributed_type(self.accelerator.distributed_type)
        torch.manual_seed(config.seed + self.accelerator.process_index)
        if torch.cuda.is_available():
            # cuDNN's fused attention fails in the backward pass of the autoencoder's bf16 attention
            # (H100, torch 2.11: "mha_graph.execute ... is_good()"); flash / memory-efficient kernels do not.
            torch.backends.cuda.enable_cudnn_sdp(False)
        modules = task.modules()
        optimized = task.optimizer_modules()
        unknown = [name for name in optimized if name not in modules]
        if unknown:
            raise TrainingError(f"optimizer_modules names {unknown}, which are not among {sorted(modules)}")
        # The first optimiser is the model's; the others (discriminators) may use disc_lr.
        self.base_lr = {
            name: config.lr if i == 0 else config.disc_lr or config.lr for i, name in enumerate(optimized)
        }
        self.model_name = optimized[0]  # the trained model (EMA, logged lr); the rest are discriminators
        self.optimizers = {
            name: torch.optim.AdamW(
                [p for p in modules[name].parameters() if p.requires_grad],
                lr=self.base_lr[name],
                betas=tuple(config.betas),
                weight_decay=config.weight_decay,
                # One kernel for all parameters, and its found_inf input skips a step on the device.
                fused=True,
            )
            for name in optimized
        }
        prepared = self.accelerator.prepare(*modules.values(), *self.optimizers.values())
        self.modules = dict(zip(modules, prepared[: len(modules)], strict=True))
        self.optimizers = dict(zip(self.optimizers, prepared[len(modules) :], strict=True))
        self.ema = None
        if config.ema_decay is not None:
            self.ema = EMAModel(self._raw(self.model_name).parameters(), decay=config.ema_decay, foreach=True)
        self.state = LoopState()
        self._health = StepHealth(len(self.optimizers), self.accelerator.device)
        # Which run wrote a checkpoint: pruning deletes only this run's (a resume takes the checkpoint's id).
        self.run_id = uuid.uuid4().hex
        self.saved: Path | None = None  # the newest checkpoint written or resumed by this trainer
        self.stop_signal: str | None = None  # set by SIGTERM / SIGUSR1 during train()
        self.is_main = self.accelerator.is_main_process
        self.logger = WandbLogger(
            wandb or WandbConfig(mode="disabled"), self.run_dir, self.run_config, self.is_main
        )

    def _raw(self, name: str) -> nn.Module:
        return self.accelerator.unwrap_model(self.modules[name])

    # ---- checkpoints ---------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current step (see mmldm_ae.engine.checkpoint for the layout)."""
        step = self.state.step
        # Every process holds the same weights, so every process reaches the same verdict.
        nonfinite = [
            name
            for name, module in self.modules.items()
            if not torch.stack([p.isfinite().all() for p in module.parameters()]).all()
        ]
        if nonfinite:
            raise TrainingError(
                f"step {step}: the weights of {', '.join(nonfinite)} are not finite; no checkpoint written. "
                f"Lower train.lr or set train.grad_clip; the last good checkpoint is in "
                f"{self.run_dir / 'checkpoints'}"
            )
        folder = self._checkpoint_folder(step)
        partial = folder.with_name(folder.name + ".partial")
        if self.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        torch.save(rng_state(), partial / f"rng_{self.accelerator.process_index}.pt")
        if self.is_main:
            for name in self.modules:
                save_model(self._raw(name), str(partial / f"{name}.safetensors"))
            if self.ema is not None:
                ema_weights = ema_state_dict(self._raw(self.model_name), self.ema.shadow_params)
                save_file(ema_weights, partial / "ema.safetensors")
            optimizer_states = {name: opt.state_dict() for name, opt in self.optimizers.items()}
            scaler = self.accelerator.scaler
            torch.save(
                {
                    "optimizers": optimizer_states,
                    "scaler": scaler.state_dict() if scaler else None,
                    "ema_step": self.ema.optimization_step if self.ema else 0,
                },
                partial / "optimizers.pt",
            )
            state = {
                "step": step,
                "samples_seen": self.state.samples_seen,
                "skipped_steps": self.state.skipped_steps,
                "world_size": self.accelerator.num_processes,
                "run_id": self.run_id,
                "final": step >= self.config.max_steps,
                "architecture": self.task.architecture(),
                "config": self.run_config,
            }
            (partial / "state.json").write_text(json.dumps(state, indent=1, default=str))
        self.accelerator.wait_for_everyone()  # every rng_<rank>.pt is written
        if self.is_main:
            publish_checkpoint(partial, folder)
            self._prune_checkpoints()
        self.accelerator.wait_for_everyone()
        self.saved = folder
        return folder

    def _checkpoint_folder(self, step: int) -> Path:
        return self.run_dir / "checkpoints" / f"step_{step:07d}"

    def _prune_checkpoints(self) -> None:
        """Delete this run's oldest checkpoints beyond train.keep_checkpoints, never a final one, and
        the folders of saves that did not finish; other runs' checkpoints are left alone."""
        ours = []
        for folder in checkpoint_dirs(self.run_dir):
            try:
                state = json.loads((folder / "state.json").read_text())
            except (OSError, ValueError):
                continue  # not a readable checkpoint of this run
            if state.get("run_id") == self.run_id:
                ours.append((folder, state.get("final", False)))
        for folder, final in ours[: max(0, len(ours) - self.config.keep_checkpoints)]:
            if not final:
                shutil.rmtree(folder)
        for partial in (self.run_dir / "checkpoints").glob("step_*.partial"):
            shutil.rmtree(partial)

    def resume(self, checkpoint: Path) -> None:
        saved = json.loads((checkpoint / "state.json").read_text())
        mismatched = describe_mismatch(saved["architecture"], self.task.architecture())
        if mismatched:
            raise TrainingError(
                f"cannot resume {checkpoint}: the config differs in settings the checkpoint depends on:\n  "
                + "\n  ".join(mismatched)
                + "\nUse another run_dir, or set these back to the checkpoint's values."
            )
        rank = self.accelerator.process_index
        if saved["world_size"] != self.accelerator.num_processes:
            log.warning(
                "resuming with %d processes instead of %d: the data order changes",
                self.accelerator.num_processes,
                saved["world_size"],
            )
        rng_file = checkpoint / f"rng_{rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        elif rank < saved["world_size"]:
            raise TrainingError(
                f"{rng_file} is missing: the checkpoint is incomplete. Delete {checkpoint} to resume from "
                "the checkpoint before it"
            )
        else:
            log.warning(
                "process %d has no RNG state in %s: its random draws start from the seed", rank, checkpoint
            )
        for name in self.modules:
            load_module_weights(self._raw(name), checkpoint, name)
        rest = torch.load(checkpoint / "optimizers.pt", map_location="cpu", weights_only=True)
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(rest["optimizers"][name])
        if self.accelerator.scaler is not None and rest["scaler"] is not None:
            self.accelerator.scaler.load_state_dict(rest["scaler"])
        if self.ema is not None:
            ema_weights = read_ema_weights(self._raw(self.model_name), checkpoint)
            if ema_weights is None:
                raise TrainingError(f"{checkpoint} has no ema.safetensors, but train.ema_decay is set")
            for shadow, weight in zip(self.ema.shadow_params, ema_weights, strict=True):
                shadow.data.copy_(weight)
            self.ema.optimization_step = rest["ema_step"]
        self.state = LoopState(
            step=saved["step"], samples_seen=saved["samples_seen"], skipped_steps=saved["skipped_steps"]
        )
        # Checkpoints written before run ids existed belong to no run: they are never pruned.
        self.run_id = saved.get("run_id", self.run_id)
        self.saved = checkpoint

    def _start_or_resume(self) -> None:
        """Resume from the newest valid checkpoint (train.resume), refusing to mix runs otherwise."""
        existing = checkpoint_dirs(self.run_dir)
        if not self.config.resume:
            if existing:
                raise TrainingError(
                    f"{self.run_dir} already holds checkpoints of another run (newest: "
                    f"{existing[-1].name}) and train.resume=false would mix the two runs. Continue that "
                    "run with train.resume=true, give a new run_dir, or delete "
                    f"{self.run_dir / 'checkpoints'}"
                )
            return
        # One process verifies the checksums; all load what it chose.
        chosen = broadcast_object_list([newest_valid_checkpoint(self.run_dir) if self.is_main else None])[0]
        if chosen is not None:
            self.resume(chosen)
            self._print(f"resumed from {chosen} at step {self.state.step}")
        elif existing:
            self._print(f"no valid checkpoint in {self.run_dir / 'checkpoints'}: training starts at step 0")

    # ---- training ------------------------------------------------------------------------

    def _learning_rate(self, base: float) -> float:
        warmup = self.config.warmup_steps
        return base * min(1.0, (self.state.step + 1) / warmup) if warmup else base

    def _micro_batches(self) -> Iterator[dict]:
        sampler = ResumableSampler(
            len(self.dataset),
            self.config.seed,
            self.accelerator.process_index,
            self.accelerator.num_processes,
            start=self.state.samples_seen,
        )
        # Its own generator: a DataLoader otherwise draws worker seeds from the global RNG, which
        # would shift the training noise of a resumed run.
        device = self.accelerator.device
        loader = DataLoader(
            EpochIndexed(self.dataset),
            batch_size=self.config.batch_size,
            sampler=sampler,
            num_workers=self.config.num_workers,
            persistent_workers=self.config.num_workers > 0,
            generator=torch.Generator().manual_seed(self.config.seed),
            # Page-locked batches copy to the GPU asynchronously, overlapping the step before.
            pin_memory=device.type == "cuda",
        )
        for batch in loader:
            yield {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    @contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGTERM (SLURM preemption, `kill`) and SIGUSR1 (SLURM's --signal warning) end the run
        after the current step, with a checkpoint; the previous handlers come back afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return

        def request_stop(signum: int, frame: Any) -> None:
            self.stop_signal = signal.Signals(signum).name

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def train(self) -> dict[str, Any]:
        config = self.config
        self._start_or_resume()
        if self.state.step >= config.max_steps:
            self._print(f"nothing to do: step {self.state.step} >= train.max_steps={config.max_steps}")
            return self._summary(0.0, {})

        from tqdm.auto import tqdm

        batches = self._micro_batches()
        # A bar on terminals; elsewhere (logs, CI) the status line every log_every steps says the same.
        progress = tqdm(
            total=config.max_steps,
            initial=self.state.step,
            desc="train",
            unit="step",
            disable=not (self.is_main and sys.stderr.isatty()),
            dynamic_ncols=True,
            file=sys.stderr,
        )
        window_start, window_samples, last_logs = time.perf_counter(), 0, {}
        started = time.perf_counter()
        deadline = started + 60 * config.max_minutes if config.max_minutes else math.inf
        for module in self.modules.values():
            module.train()
        stop = False
        with self._stop_on_signals():
            while self.state.step < config.max_steps and not stop:
                micro = [next(batches) for _ in range(config.grad_accum)]
                logs = self._optimizer_steps(micro)
                self.state.step += 1
                self.state.samples_seen += config.batch_size * config.grad_accum
                window_samples += config.batch_size * config.grad_accum * self.accelerator.num_processes
                progress.update()
                step = self.state.step
                logging = step % config.log_every == 0 or step == config.max_steps
                checkpointing = step % config.checkpoint_every == 0 and step < config.max_steps
                previewing = bool(config.sample_every) and step % config.sample_every == 0
                if not (logging or checkpointing or previewing):
                    continue  # the host waits for the device only at the steps below
                stop = self._check(deadline)
                if logging:
                    logs = read_numbers(logs, self.accelerator.device)
                    last_logs = logs
                    elapsed = time.perf_counter() - window_start
                    logs["samples_per_s"] = window_samples / max(elapsed, 1e-9)
                    logs["peak_mem_gb"] = peak_memory_gb()
                    logs["lr"] = self.optimizers[self.model_name].param_groups[0]["lr"]
                    self.logger.log(logs, step)
                    progress.set_postfix_str(self._status(logs), refresh=False)
                    if progress.disable:
                        self._print(f"step {step}/{config.max_steps} | {self._status(logs)}")
                    window_start, window_samples = time.perf_counter(), 0
                if checkpointing:
                    self.save_checkpoint()
                # After the checkpoint of the same step, so that a failing preview loses no training;
                # the last step's come after the final checkpoint.
                if previewing and not stop and step < config.max_steps:
                    self._log_media()
            progress.close()
            stopped_by = None
            if stop:
                stopped_by = f"signal {self.stop_signal}" if self.stop_signal else "train.max_minutes"
                self._print(
                    f"{stopped_by} (on at least one process): stopping at step {self.state.step}; "
                    "a rerun resumes from the checkpoint written now"
                )
            # A stop right after a periodic checkpoint does not write the same step twice.
            done = self._checkpoint_folder(self.state.step)
            final = self.saved if self.saved == done else self.save_checkpoint()
        if self.stop_signal is None and config.sample_at_end:
            self._log_media()
        summary = self._summary(time.perf_counter() - started, last_logs)
        summary["checkpoint"] = str(final)
        summary["stopped_by"] = stopped_by
        self.logger.finish()
        return summary

    def _optimizer_steps(self, micro: list[Any]) -> dict[str, torch.Tensor]:
        """One step of every optimiser over the micro-batches, or of none when any loss or gradient is
        not finite on any process; returns the numbers to log, as device tensors.

        Nothing here waits for the device: the verdict is all-reduced and applied on the device (fused
        AdamW's found_inf, a masked EMA), and counted there for `_check` to read at logging steps."""
        logs: dict[str, Any] = {}
        names = list(self.optimizers)
        bad_loss, stepping = [], []
        if hasattr(self.task, "prepare_step"):
            with self.accelerator.autocast():
                micro = self.task.prepare_step(micro, self.modules)
        for name, optimizer in self.optimizers.items():
            for group in optimizer.param_groups:
                group["lr"] = self._learning_rate(self.base_lr[name])
            optimizer.zero_grad(set_to_none=True)
            finite = []
            for index, batch in enumerate(micro):
                sync = index == len(micro) - 1
                context = nullcontext() if sync else self.accelerator.no_sync(self.modules[name])
                with context, self.accelerator.autocast():
                    loss, numbers = self.task.loss(name, batch, self.state.step, self.modules)
                if loss is None:
                    break
                finite.append(torch.isfinite(loss.detach()).all())
                # Non-finite losses are back-propagated as well: DDP's gradient all-reduce needs every
                # process; the step is dropped below.
                self.accelerator.backward(loss / len(micro))
                for key, value in numbers.items():
                    value = value.detach().float() if torch.is_tensor(value) else value
                    logs[key] = logs.get(key, 0.0) + value / len(micro)
            if loss is not None:
                stepping.append(name)
            bad_loss.append(~torch.stack(finite).all() if loss is not None else None)
        scaler = self.accelerator.scaler
        if scaler is not None:
            # fp16: unscale every optimiser's gradients once; the scaler records overflows for update().
            self.accelerator.unscale_gradients()
        device = self.accelerator.device
        no = torch.zeros((), dtype=torch.bool, device=device)
        bad_grad = []
        for name, loss_was_bad in zip(names, bad_loss, strict=True):
            if loss_was_bad is None:
                bad_grad.append(no)
                continue
            parameters = [p for p in self.modules[name].parameters() if p.grad is not None]
            if self.config.grad_clip:
                norm = torch.nn.utils.clip_grad_norm_(parameters, self.config.grad_clip, foreach=True)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in parameters], foreach=True)
            logs[f"grad_norm_{name}"] = norm
            bad_grad.append(~torch.isfinite(norm) & ~loss_was_bad)  # the reason: the loss, if it was bad
        # [non-finite loss per optimiser, non-finite gradient per optimiser], summed over processes.
        flags = torch.stack([no if b is None else b.to(device) for b in bad_loss] + bad_grad).float()
        flags = self.accelerator.reduce(flags, reduction="sum")
        skip = (flags.sum() > 0).float()
        for name in stepping:
            self._fused_step(self.optimizers[name].optimizer, skip)
        if scaler is not None:
            scaler.update()  # an fp16 overflow (a non-finite gradient after unscaling) lowers the scale
        if self.ema is not None:
            self._update_ema(1.0 - skip)
        self._health.add_step(flags, skip)
        return logs

    @staticmethod
    def _fused_step(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
        """optimizer.step(), or nothing (not even its step count) where `skip` is 1, decided on the
        device: the fused kernels read found_inf, as they do for torch's GradScaler."""
        optimizer.grad_scale, optimizer.found_inf = None, skip
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf

    @torch.no_grad()
    def _update_ema(self, keep: torch.Tensor) -> None:
        """EMAModel.step as one multi-tensor lerp, weighted by `keep` (0 on a skipped step)."""
        ema = self.ema
        ema.optimization_step += 1
        weight = keep * (1.0 - ema.get_decay(ema.optimization_step))
        pairs = [
            (s, p)
            for s, p in zip(ema.shadow_params, self._raw(self.model_name).parameters(), strict=True)
            if p.requires_grad
        ]
        shadows = [s for s, _ in pairs]
        # shadow += weight * (param - shadow); lerp_ would read a tensor weight back to the host.
        step = torch._foreach_sub([p.detach() for _, p in pairs], shadows)
        torch._foreach_mul_(step, weight)
        torch._foreach_add_(shadows, step)

    def _check(self, deadline: float) -> bool:
        """Read what the device counted since the last check (skipped steps and why), stop on
        divergence, and agree with the other processes whether to stop (a signal, train.max_minutes).
        The only host syncs of the loop, at logging, checkpoint and preview steps."""
        asked = self.stop_signal is not None or time.perf_counter() > deadline
        stop = self.accelerator.reduce(
            torch.tensor([float(asked)], device=self.accelerator.device), reduction="sum"
        )
        skipped, in_a_row, longest, why = self._health.read()
        stop = stop.item() > 0
        self.state.skipped_steps += skipped
        self.state.nonfinite_in_a_row = in_a_row
        if not skipped:
            return stop
        names = list(self.optimizers)
        reasons = [
            f"non-finite {name} {kind} in {count}"
            for kind, counts in (("loss", why[: len(names)]), ("gradient", why[len(names) :]))
            for name, count in zip(names, counts, strict=True)
            if count
        ]
        self._print(
            f"steps up to {self.state.step}: {skipped} skipped for every optimiser ({', '.join(reasons)}) "
            f"on at least one process; latest {in_a_row} in a row"
        )
        if longest >= self.config.max_nonfinite_steps:
            raise TrainingError(
                f"{longest} non-finite steps in a row by step {self.state.step}: training diverged. "
                "Lower train.lr, raise train.warmup_steps, or use train.precision=no/bf16 instead of fp16; "
                f"the last good checkpoint is in {self.run_dir / 'checkpoints'}"
            )
        return stop

    def _log_media(self) -> None:
        if not self.is_main:
            return
        for module in self.modules.values():
            module.eval()
        if self.ema is not None:
            raw = self._raw(self.model_name)
            self.ema.store(raw.parameters())
            self.ema.copy_to(raw.parameters())
        try:
            self.task.log_media(self.logger, self.state.step, self.run_dir)
        finally:
            if self.ema is not None:
                self.ema.restore(self._raw(self.model_name).parameters())
            for module in self.modules.values():
                module.train()

    def _status(self, logs: dict[str, float]) -> str:
        losses = " ".join(
            f"{k} {v:.4g}"
            for k, v in logs.items()
            if k not in ("samples_per_s", "peak_mem_gb", "lr") and not k.startswith("grad_norm")
        )
        return f"{losses} | {logs['samples_per_s']:.1f} samples/s | peak {logs['peak_mem_gb']:.2f} GB"

    def _summary(self, seconds: float, logs: dict[str, float]) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "step": self.state.step,
            "skipped_steps": self.state.skipped_steps,
            "seconds": round(seconds, 1),
            "last": {k: round(float(v), 6) for k, v in logs.items()},
        }

    def _print(self, message: str) -> None:
        if self.is_main:
            print(message, file=sys.stderr, flush=True)


def read_numbers(numbers: dict[str, Any], device: torch.device) -> dict[str, float]:
    """Device tensors (and floats) to floats with one transfer: one host sync, not one per number."""
    if not numbers:
        return {}
    values = torch.stack([torch.as_tensor(v, device=device).float() for v in numbers.values()])
    return dict(zip(numbers, values.tolist(), strict=True))


def peak_memory_gb() -> float:
    """Peak GPU memory allocated by this process (CPU: peak resident memory), in GiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
