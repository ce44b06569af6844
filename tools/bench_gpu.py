#!/usr/bin/env python
"""The project's models against a plain PyTorch + diffusers build of the same parts, in one process.

    python tools/bench_gpu.py                       # one H100 / H200: at most --budget-min 8 minutes
    python tools/bench_gpu.py --tiny                # the same rows at the CPU presets (the test suite)
    python tools/bench_gpu.py --only dit,table2     # some sections: sampling, ae, dit, table2

Everything has random weights (nothing is downloaded). The plain anchor: diffusers'
UNet2DConditionModel with the SD-1.x configuration (the signal decoder), diffusers' AutoencoderKL with
the SD configuration, a DiT of the preset's width and depth from timm blocks, all in bf16 eager loops
(fp32 on the CPU). Per row: first-call and steady time (median of --reps; CUDA events on a GPU,
perf_counter on the CPU), peak memory, host syncs per call (torch.cuda.set_sync_debug_mode on CUDA;
mmldm_ae.engine.perf.HostSyncCounter on the CPU), the ratio to the plain anchor and the largest
difference to an fp32 reference of the same settings. Rows:

  sampling  svg samples at batch 1, 2, 4: as before (fp32, 50 + 50 DDIM steps), the new defaults,
            the few-step decoder (DPM-Solver++), and at batch 2 compiled (DiT and decoder UNet)
  ae        the autoencoder's training step at 8 and 20 clips, split by part
  dit       DiT-S and DiT-B training steps at batch 32, eager and compiled, beside the plain DiT
  table2    the paper's Table 2: training step at batch 2 and the largest batch that fits in
            --memory-gb (the paper: a 32 GB V100), time per sample at batch 2 and the largest
            sampling batch, for MM-LDM (pixels in, media out) and MM-LDM* (latents only), beside
            the figures the paper quotes for MM-Diffusion and MM-LDM

<out>/bench.json is rewritten after every row, so a run cut short still reports; <out>/bench.md,
<out>/table2.md and <out>/table2.csv are written at the end. Rows run in the order: DiT eager, Table 2,
autoencoder, sampling at batch 2, the other batches, then the compiled rows (minutes of compiling
each); rows that no longer fit in the budget are listed as skipped (`--only` runs some sections).
tools/gpu_check.py is the other GPU tool: it runs the real training and sampling tools end to end,
one process per stage.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from timm.layers import Attention, Mlp
from torch import Tensor, nn

from mmldm_ae.autoencoder import MultiModalAutoencoder, build_discriminator, discriminator_losses
from mmldm_ae.engine.diffusion import build_train_scheduler
from mmldm_ae.engine.perf import HostSyncCounter
from mmldm_ae.pipeline import AutoencoderPipeline, pixels_to_latents
from mmldm_ae.vae import VAEConfig, build_vae
from mmldm_data.audio import MelConfig
from mmldm_data.config import DatasetConfig, preset
from mmldm_dit.config import register_schemas
from mmldm_dit.dit import DiTConfig, MMDiT, modulate
from mmldm_dit.sampling import dit_training_loss, sample

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("dit", "sampling", "ae", "table2")

# The paper's Table 2 (one 32 GB V100; DDIM 50 steps; batch 2 for both times):
# method, resolution, training MBS, s/step, sampling MBS, s/sample.
PAPER_TABLE2 = [
    ("MM-Diffusion (paper)", 64, 4, 1.70, 32, 33.1),
    ("MM-Diffusion (paper)", 128, 1, 2.36, 16, 90.0),
    ("MM-LDM (paper)", 256, 9, 0.46, 4, 70.7),
    ("MM-LDM* (paper)", 256, 12, 0.38, 33, 8.7),
]


@dataclass
class Sizes:
    """What the rows run: the paper presets on a GPU, the CPU presets with --tiny."""

    ae: str = "paper"
    ae_overrides: dict = field(default_factory=dict)
    vae: VAEConfig = field(default_factory=lambda: VAEConfig(preset="sd"))
    dit_rows: tuple = (("DiT-S", "S"), ("DiT-B", "B"))
    table2_dit: str = "XL"  # the authors' generator
    dit_batch: int = 32
    ae_clips: tuple = (8, 20)
    sample_batches: tuple = (1, 2, 4)
    dit_steps: int = 50
    decoder_steps: int = 50
    few_steps: int = 10  # the few-step decoder's DPM-Solver++ steps
    mbs_limit: int = 512
    frames: int = 16  # frames per clip the signal decoder rebuilds (paper: 16)


TINY = Sizes(
    ae="tiny",
    ae_overrides={"resolution": 32, "vae_downsample": 2, "adversarial": True},
    vae=VAEConfig(preset="tiny", block_out_channels=[16, 32]),
    dit_rows=(("DiT-S", "tiny_S"), ("DiT-B", "tiny_B")),
    table2_dit="tiny",
    dit_batch=8,
    ae_clips=(1, 2),
    sample_batches=(1, 2),
    dit_steps=3,
    decoder_steps=3,
    few_steps=2,
    mbs_limit=2,
    frames=4,
)


#################################################################################
#                           Timing, memory, host syncs                          #
#################################################################################


class Clock:
    """Wall time of a call: CUDA events on a GPU (the queue drained first), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1000
        return end - start

    def time(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        if self.cuda:
            torch.cuda.synchronize()
        start = self.now()
        out = fn()
        return self.seconds(start, self.now()), out


@contextmanager
def count_host_syncs(device: torch.device):
    """Yields a list that holds one entry per host sync of the block once it ends."""
    found: list[str] = []
    if device.type == "cuda":
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield found
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        found += [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    else:
        with HostSyncCounter() as counter:
            yield found
        found += counter.ops


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error)


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


#################################################################################
#                                  The report                                   #
#################################################################################


class Report:
    """Rows as they finish, rewritten to <out>/bench.json after each; a time budget for the run."""

    def __init__(self, out: Path, device: torch.device, budget_s: float, reps: int, settings: dict):
        self.out, self.device, self.reps = out, device, reps
        self.started = time.monotonic()
        self.deadline = self.started + budget_s
        self.clock = Clock(device)
        self.rows: list[dict] = []
        self.table2: list[dict] = []
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        self.header = {"device": name, "torch": torch.__version__, "settings": settings}
        out.mkdir(parents=True, exist_ok=True)

    @property
    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def write(self) -> None:
        document = self.header | {
            "elapsed_s": round(time.monotonic() - self.started, 1),
            "rows": self.rows,
            "table2": self.table2,
        }
        (self.out / "bench.json").write_text(json.dumps(document, indent=1))

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        self.write()
        shown = f"{row['steady_s'] * 1000:.1f} ms" if row.get("steady_s") is not None else row.get("note", "")
        ratio = f" | x{row['ratio']:.2f} plain" if row.get("ratio") is not None else ""
        print(
            f"[{time.monotonic() - self.started:5.0f} s, {max(self.left_s, 0):4.0f} s left] "
            f"{row['section']:8s} {row['name']:42s} {shown}{ratio}",
            file=sys.stderr,
            flush=True,
        )
        return row

    def skip(self, section: str, name: str, why: str) -> dict:
        return self.add({"section": section, "name": name, "note": f"skipped: {why}"})

    def measure(
        self,
        section: str,
        name: str,
        fn: Callable[[], Any],
        *,
        anchor: dict | None = None,
        reference: Tensor | None = None,
        after_call: Callable[[], None] | None = None,
        **info: Any,
    ) -> dict:
        """First call, then the median of `reps` calls, peak memory over those, host syncs of one more;
        `after_call` runs after the first and each steady call."""
        if self.left_s <= 0:
            return self.skip(section, name, "out of the time budget")
        row = {"section": section, "name": name, **info}
        free(self.device)
        try:
            row["first_s"], out = self.clock.time(fn)
            if after_call is not None:
                after_call()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            steady = []
            for _ in range(self.reps):
                steady.append(self.clock.time(fn)[0])
                if after_call is not None:
                    after_call()
            row["steady_s"] = statistics.median(steady)
            row["peak_gb"] = peak_gb(self.device)
            with count_host_syncs(self.device) as syncs:
                fn()
            row["host_syncs_per_call"] = len(syncs)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_oom(error):
                raise
            free(self.device)
            return self.add(row | {"note": "out of memory"})
        if anchor is not None and anchor.get("steady_s"):
            row["anchor"] = anchor["name"]
            row["ratio"] = row["steady_s"] / anchor["steady_s"]
        if reference is not None and torch.is_tensor(out):
            row["max_diff_fp32"] = (out.float() - reference.float()).abs().max().item()
        return self.add(row)

    def markdown(self) -> str:
        lines = [
            f"# tools/bench_gpu.py on {self.header['device']} (torch {self.header['torch']})",
            "",
            "| section | row | first call s | steady ms | peak GB | host syncs / call | x plain "
            "| max diff vs fp32 | note |",
            "|---|---|---|---|---|---|---|---|---|",
        ]

        def number(value, scale=1.0, digits=2):
            return "" if value is None else f"{value * scale:.{digits}f}"

        for row in self.rows:
            lines.append(
                f"| {row['section']} | {row['name']} | {number(row.get('first_s'))} | "
                f"{number(row.get('steady_s'), 1000, 1)} | {number(row.get('peak_gb'))} | "
                f"{row.get('host_syncs_per_call', '')} | {number(row.get('ratio'))} | "
                f"{number(row.get('max_diff_fp32'), digits=4)} | {row.get('note', '')} |"
            )
            for part, seconds in row.get("parts_s", {}).items():
                lines.append(f"| | &nbsp;&nbsp;{part} | | {seconds * 1000:.1f} | | | | | |")
        return "\n".join(lines) + "\n"


#################################################################################
#                                 Plain anchors                                 #
#################################################################################


class PlainBlock(nn.Module):
    """A DiT block (adaLN-Zero) from timm's attention and MLP, nothing else."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, 4 * width, act_layer=lambda: nn.GELU(approximate="tanh"))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale, gate, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)
        x = x + gate.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift, scale))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class PlainDiT(nn.Module):
    """The MM-LDM token layout ([prompt; EOS; audio; EOS; video]) through plain blocks: eps per token."""

    def __init__(self, model: MMDiT):
        super().__init__()
        cfg = model.cfg
        width, self.cfg = cfg.hidden_size, cfg
        self.audio_in = nn.Linear(cfg.audio_latent_channels, width)
        self.video_in = nn.Linear(cfg.video_latent_channels, width)
        self.prefix = nn.Parameter(torch.zeros(1, cfg.context_tokens + 1, width))
        self.separator = nn.Parameter(torch.zeros(1, 1, width))
        self.position = nn.Parameter(torch.randn(1, cfg.sequence_length, width) * 0.02)
        self.time = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(PlainBlock(width, cfg.num_heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.audio_out = nn.Linear(width, cfg.audio_latent_channels)
        self.video_out = nn.Linear(width, cfg.video_latent_channels)

    def forward(self, x_a: Tensor, x_v: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        B, n_a = x_a.shape[0], x_a.shape[-1] ** 2
        half = torch.exp(-9.21 * torch.arange(128, device=t.device) / 128)
        frequencies = torch.cat([torch.cos(t[:, None] * half), torch.sin(t[:, None] * half)], dim=1)
        c = self.time(frequencies.to(self.prefix.dtype))
        tokens = [
            self.prefix.expand(B, -1, -1),
            self.audio_in(x_a.flatten(2).transpose(1, 2)),
            self.separator.expand(B, -1, -1),
            self.video_in(x_v.flatten(2).transpose(1, 2)),
        ]
        x = torch.cat(tokens, dim=1) + self.position
        for block in self.blocks:
            x = block(x, c)
        x = self.norm(x)
        start = self.cfg.context_tokens + 1
        eps_a = self.audio_out(x[:, start : start + n_a]).transpose(1, 2).reshape(x_a.shape)
        eps_v = self.video_out(x[:, start + n_a + 1 :]).transpose(1, 2).reshape(x_v.shape)
        return eps_a, eps_v


def plain_unet(ae: MultiModalAutoencoder) -> UNet2DConditionModel:
    """diffusers' UNet of the signal decoder's configuration (SD-1.x in the paper preset), no injection."""
    return UNet2DConditionModel.from_config(ae.decoder.unet.config, class_embed_type=None)


def plain_vae(vae) -> AutoencoderKL:
    return AutoencoderKL.from_config(vae.model.config)


#################################################################################
#                                     Setup                                     #
#################################################################################


class Build:
    """The project's models and random inputs at one set of sizes, on one device."""

    def __init__(self, sizes: Sizes, device: torch.device):
        self.sizes, self.device = sizes, device
        self.gpu = device.type == "cuda"
        self.sampling: SamplingModels | None = None  # built by the first sampling rows
        # bf16 where the project uses it (CUDA); the CPU rows run fp32, as the CPU tools do.
        self.dtype = torch.bfloat16 if self.gpu else torch.float32
        torch.manual_seed(0)
        self.ae_config = preset(REPO / "conf", "ae", sizes.ae, **sizes.ae_overrides)
        self.resolution = self.ae_config.resolution
        self.vae = build_vae(sizes.vae).freeze().to(device)
        self.dataset = DatasetConfig(
            data_root="unused",
            resolution=self.resolution,
            mel=MelConfig(image_size=self.resolution),
            num_frames=sizes.frames,
            key_frame_indices=[round(i * (sizes.frames - 1) / 3) for i in range(4)],
        )

    def autoencoder(self) -> MultiModalAutoencoder:
        torch.manual_seed(0)
        return MultiModalAutoencoder(self.ae_config, num_classes=8).to(self.device)

    def dit(self, name: str) -> MMDiT:
        torch.manual_seed(0)
        cfg = preset(REPO / "conf", "dit", name)
        return MMDiT(cfg).to(self.device)

    def pixels(self, clips: int) -> dict[str, Tensor]:
        R, g = self.resolution, torch.Generator().manual_seed(clips)
        batch = {
            "key_frames": torch.rand(clips, 4, 3, R, R, generator=g) * 2 - 1,
            "target_frames": torch.rand(clips, 2, 3, R, R, generator=g) * 2 - 1,
            "target_indices": torch.tensor([[0.0, 0.5]]).expand(clips, 2).contiguous(),
            "audio_image": torch.rand(clips, 3, R, R, generator=g) * 2 - 1,
            "class_id": torch.arange(clips) % 8,
        }
        return {k: v.to(self.device) for k, v in batch.items()}

    def latents(self, cfg: DiTConfig, batch: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(batch)
        shape = cfg.latent_shape
        z_a = torch.randn(batch, *shape("audio"), generator=g)
        return z_a.to(self.device), torch.randn(batch, *shape("video"), generator=g).to(self.device)

    def autocast(self):
        return torch.autocast("cuda", torch.bfloat16) if self.gpu else nullcontext()


def adamw(module: nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5, fused=True)


#################################################################################
#                                  DiT steps                                    #
#################################################################################


def dit_step(build: Build, model: nn.Module, batch: int, plain: bool) -> Callable[[], Tensor]:
    """One training step (loss, backward, fused AdamW) of the DiT or the plain DiT, at `batch`."""
    optimizer, scheduler = adamw(model), build_train_scheduler()
    z_a, z_v = build.latents(model.cfg, batch)
    t = torch.randint(0, 1000, (batch,), device=build.device)

    def step() -> Tensor:
        with build.autocast():
            if plain:
                eps_a, eps_v = model(z_a, z_v, t.float())
                loss = F.mse_loss(eps_a.float(), z_a) + F.mse_loss(eps_v.float(), z_v)
            else:
                loss = dit_training_loss(model, z_a, z_v, scheduler)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


COMPILE_NEEDS_S = 150  # what a compiled row needs left of the budget (compiling takes minutes)


def compile_allowed(report: Report, build: Build, section: str, name: str) -> bool:
    """Compiled rows: on a GPU while the budget allows, on the CPU only with --compile-on-cpu."""
    if not build.gpu and not report.header["settings"]["compile_on_cpu"]:
        report.skip(section, name, "torch.compile on the CPU (minutes): --compile-on-cpu")
        return False
    if report.left_s < COMPILE_NEEDS_S:
        report.skip(section, name, f"compiling needs {COMPILE_NEEDS_S} s of the budget")
        return False
    return True


def run_dit(report: Report, build: Build, compiled: bool) -> None:
    mode, batch = "compiled" if compiled else "eager", build.sizes.dit_batch
    for label, name in build.sizes.dit_rows:
        if compiled and not compile_allowed(report, build, "dit", f"{label} step b{batch} ({mode})"):
            continue
        ours = build.dit(name)
        plain = PlainDiT(ours).to(build.device)
        if compiled:
            ours.compile(dynamic=False)
            plain.compile(dynamic=False)
        anchor = report.measure(
            "dit", f"plain {label} step b{batch} ({mode})", dit_step(build, plain, batch, plain=True)
        )
        report.measure(
            "dit",
            f"{label} step b{batch} ({mode})",
            dit_step(build, ours, batch, plain=False),
            anchor=anchor,
            batch=batch,
        )
        del ours, plain
        free(build.device)


#################################################################################
#                                 svg sampling                                  #
#################################################################################


@dataclass
class SamplingVariant:
    name: str
    dtype: torch.dtype
    decoder_sampler: str
    decoder_steps: int
    guidance_fraction: float
    compiled: bool = False


def sampling_variants(build: Build) -> list[SamplingVariant]:
    sizes, defaults = build.sizes, type(build.ae_config)()
    new_fraction = getattr(defaults, "decode_guidance_fraction", 1.0)
    return [
        SamplingVariant("as before (fp32, DDIM)", torch.float32, "ddim", sizes.decoder_steps, 1.0),
        SamplingVariant(
            f"new defaults ({str(build.dtype)[6:]}, {defaults.decode_sampler})",
            build.dtype,
            defaults.decode_sampler,
            sizes.decoder_steps if build.sizes is TINY else defaults.decode_steps,
            new_fraction,
        ),
        SamplingVariant(
            f"few-step decoder (DPM-Solver++ {sizes.few_steps})",
            build.dtype,
            "dpmsolver++",
            sizes.few_steps,
            new_fraction,
        ),
        SamplingVariant(
            "few-step decoder, compiled", build.dtype, "dpmsolver++", sizes.few_steps, new_fraction, True
        ),
    ]


def svg_sampler(
    build: Build,
    dit: MMDiT,
    pipeline: AutoencoderPipeline,
    variant: SamplingVariant,
    batch: int,
    dit_steps: int | None = None,
):
    """One svg sample call: DiT (DDIM, guided) -> signal decoder -> VAE: frames, audio images [N, 3, R, R]."""

    def run() -> Tensor:
        pipeline.model.cfg.decode_guidance_fraction = variant.guidance_fraction
        with torch.no_grad():
            z_a, z_v = sample(dit, "svg", batch, steps=dit_steps or build.sizes.dit_steps, seed=0)
            decoded = pipeline.decode_clips(
                z_v,
                z_a,
                steps=variant.decoder_steps,
                sampler=variant.decoder_sampler,
                generator=torch.Generator(build.device).manual_seed(0),
            )
        return torch.cat([decoded.frames.flatten(0, 1), decoded.audio_images])

    return run


def plain_sampler(build: Build, dit: PlainDiT, unet, vae, batch: int):
    """The plain build's svg sample: DiT steps with guidance (2 passes), then the UNet over 17 images per
    clip with guidance, then the VAE decode; DDIM from diffusers, nothing else."""
    cfg, T = dit.cfg, build.sizes.frames
    L = build.ae_config.latent_size
    # The decoder's context: prompt, class token, the other modality's 2 x 2 semantic tokens.
    tokens = build.ae_config.prompt_tokens + 1 + 4
    context = torch.randn(2 * batch * (1 + T), tokens, build.ae_config.semantic_dim)
    context = context.to(build.device, build.dtype)

    @torch.no_grad()
    def run() -> Tensor:
        ddim = DDIMScheduler(num_train_timesteps=1000)
        ddim.set_timesteps(build.sizes.dit_steps)
        x_a = torch.randn(2 * batch, *cfg.latent_shape("audio"), device=build.device, dtype=build.dtype)
        x_v = torch.randn(2 * batch, *cfg.latent_shape("video"), device=build.device, dtype=build.dtype)
        for t in ddim.timesteps.tolist():
            eps_a, eps_v = dit(
                x_a, x_v, torch.full((2 * batch,), float(t), device=build.device, dtype=build.dtype)
            )
            x_a = ddim.step(eps_a, t, x_a).prev_sample
            x_v = ddim.step(eps_v, t, x_v).prev_sample
        ddim.set_timesteps(build.sizes.decoder_steps)
        x = torch.randn(2 * batch * (1 + T), unet.config.in_channels, L, L, device=build.device)
        x = x.to(build.dtype)
        for t in ddim.timesteps.tolist():
            eps = unet(x, t, encoder_hidden_states=context).sample
            x = ddim.step(eps, t, x).prev_sample
        return vae.decode(x[: batch * (1 + T)]).sample

    return run


class SamplingModels:
    """The models of the sampling rows, built once: fp32 masters (also the fp32 references), the
    working-precision copies (compiled in place for the compiled rows), the plain build."""

    def __init__(self, build: Build):
        self.dit = build.dit(build.sizes.table2_dit).eval()
        ae = build.autoencoder().eval()
        self.master = AutoencoderPipeline(ae, build.vae, build.dataset, [str(i) for i in range(8)])
        self.plain = PlainDiT(self.dit).to(build.device, build.dtype).eval()
        self.unet = plain_unet(ae).to(build.device, build.dtype).eval()
        self.vae = plain_vae(build.vae).to(build.device, build.dtype).eval()
        self.variants = sampling_variants(build)
        self.copies = {torch.float32: (self.dit, self.master)}
        if build.dtype != torch.float32:
            self.copies[build.dtype] = (
                copy.deepcopy(self.dit).to(build.dtype),
                copy.deepcopy(self.master).to_dtype(build.dtype),
            )
        self.anchors: dict[int, dict] = {}
        self.references: dict[tuple, Tensor] = {}
        self.compiled = False


def run_sampling(report: Report, build: Build, batches: tuple[int, ...], compiled: bool) -> None:
    """svg rows at `batches`: the plain anchor and every variant (compiled ones only with `compiled`,
    whose static shapes are compiled for these batches)."""
    if build.sampling is None:
        build.sampling = SamplingModels(build)
    models = build.sampling
    for batch in batches:
        if batch not in models.anchors:
            models.anchors[batch] = report.measure(
                "sampling",
                f"plain svg sample b{batch}",
                plain_sampler(build, models.plain, models.unet, models.vae, batch),
                batch=batch,
            )
        for variant in models.variants:
            name = f"svg b{batch}: {variant.name}"
            if variant.compiled != compiled or (
                compiled and not compile_allowed(report, build, "sampling", name)
            ):
                continue
            model, pipeline = models.copies[variant.dtype]
            if variant.compiled and not models.compiled:
                model.compile(dynamic=False)
                pipeline.model.decoder.unet.compile(dynamic=False)
                models.compiled = True
            key = (batch, variant.decoder_sampler, variant.decoder_steps, variant.guidance_fraction)
            if (
                key not in models.references
                and report.left_s > 0
                and batch == min(build.sizes.sample_batches)
            ):
                # The same settings in fp32: what the row's precision and compilation change.
                models.references[key] = svg_sampler(build, models.dit, models.master, variant, batch)()
            report.measure(
                "sampling",
                name,
                svg_sampler(build, model, pipeline, variant, batch),
                anchor=models.anchors[batch],
                reference=models.references.get(key),
                batch=batch,
                precision=str(variant.dtype)[6:],
                dit_steps=build.sizes.dit_steps,
                decoder=f"{variant.decoder_sampler} {variant.decoder_steps}",
            )


#################################################################################
#                            Autoencoder step by part                           #
#################################################################################


class PartTimer:
    """Time spent in named parts of one step: regions of code, module forwards (hooks) and wrapped calls."""

    def __init__(self, clock: Clock):
        self.clock, self.marks, self.active = clock, [], False

    @contextmanager
    def region(self, part: str):
        start = self.clock.now()
        yield
        self.marks.append((part, start, self.clock.now()))

    def hook(self, module: nn.Module, part: str) -> None:
        starts = []

        def before(*args):
            if self.active:
                starts.append(self.clock.now())

        def after(*args):
            if self.active and starts:
                self.marks.append((part, starts.pop(), self.clock.now()))

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)

    def wrap(self, owner: Any, method: str, part: Callable[[], str]) -> None:
        original = getattr(owner, method)

        def timed(*args, **kwargs):
            start = self.clock.now()
            out = original(*args, **kwargs)
            self.marks.append((part(), start, self.clock.now()))
            return out

        setattr(owner, method, timed)

    def read(self) -> dict[str, float]:
        parts: dict[str, float] = {}
        for part, start, end in self.marks:
            parts[part] = parts.get(part, 0.0) + self.clock.seconds(start, end)
        self.marks = []
        return parts


FORWARD = "model forward (total)"
INSIDE_FORWARD = (
    "encoders",
    "UNet (with injection)",
    "fake decode (grad)",
    "real decode",
    "discriminator (model's term)",
)


def ae_parts(parts: dict[str, float]) -> dict[str, float]:
    """The forward's own parts, and what else it spends (feature generator, projectors, losses)."""
    parts = dict(parts)
    parts["rest of the forward"] = parts.pop(FORWARD, 0.0) - sum(parts.get(k, 0.0) for k in INSIDE_FORWARD)
    return parts


def ae_step(build: Build, clips: int, timer: PartTimer | None = None, checkpointing: bool = False):
    """The autoencoder's training step as the trainer runs it: the model's loss and backward, the
    discriminator's, both fused AdamW steps; pixels encoded by the frozen VAE on the fly."""
    model = build.autoencoder().train()
    discriminator = build_discriminator(build.ae_config).to(build.device)
    vae = copy.deepcopy(build.vae).to(build.dtype)  # frozen in bf16 weights when training in bf16
    if checkpointing:  # train.gradient_checkpointing
        model.decoder.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
    optimizers = [adamw(model), adamw(discriminator)]
    batch = build.pixels(clips)
    region = timer.region if timer else lambda part: nullcontext()
    if timer:
        timer.hook(model.video_encoder, "encoders")
        timer.hook(model.audio_encoder, "encoders")
        timer.hook(model.decoder, "UNet (with injection)")
        timer.hook(discriminator, "discriminator (model's term)")
        timer.wrap(vae, "encode", lambda: "VAE encode")
        timer.wrap(vae, "decode", lambda: "fake decode (grad)" if torch.is_grad_enabled() else "real decode")

    def step() -> Tensor:
        with build.autocast():
            latents = pixels_to_latents(vae, batch)
            if timer:
                timer.active = True
            with region(FORWARD):
                losses = model(latents, vae, discriminator=discriminator)
            if timer:
                timer.active = False
        with region("backward"):
            losses["loss"].backward()
        with region("discriminator step (fwd + bwd)"):
            discriminator.zero_grad(set_to_none=True)
            with build.autocast():
                loss_d = discriminator_losses(discriminator, losses["disc_real"], losses["disc_fake"])[
                    "loss_d"
                ]
            loss_d.backward()
        with region("optimisers"):
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return losses["loss"].detach()

    return step


def plain_unet_step(build: Build, images: int):
    """Plain anchor of the step's core: the decoder-sized diffusers UNet, forward + backward + AdamW."""
    unet = plain_unet(build.autoencoder()).to(build.device).train()
    optimizer = adamw(unet)
    L, cfg = build.ae_config.latent_size, build.ae_config
    x = torch.randn(images, cfg.vae_channels, L, L, device=build.device)
    context = torch.randn(images, cfg.prompt_tokens + 1 + 4, cfg.semantic_dim, device=build.device)
    t = torch.randint(0, 1000, (images,), device=build.device)

    def step() -> Tensor:
        with build.autocast():
            loss = unet(x, t, encoder_hidden_states=context).sample.float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def measure_ae_step(
    report: Report, build: Build, clips: int, anchor: dict, checkpointing: bool = False
) -> dict:
    timer, parts = PartTimer(report.clock), []
    row = report.measure(
        "ae",
        f"autoencoder step, {clips} clips" + (", gradient checkpointing" if checkpointing else ""),
        ae_step(build, clips, timer, checkpointing),
        anchor=anchor,
        after_call=lambda: parts.append(ae_parts(timer.read())),
        clips=clips,
    )
    if row.get("steady_s"):
        steady = parts[1:]  # not the first call (allocations, compiling)
        row["parts_s"] = {k: statistics.median(p.get(k, 0.0) for p in steady) for k in steady[-1]}
        row["clips_per_s"] = clips / row["steady_s"]
        report.write()
    return row


def run_ae(report: Report, build: Build) -> None:
    for clips in build.sizes.ae_clips:
        try:
            anchor = report.measure(
                "ae", f"plain UNet step, {3 * clips} images", plain_unet_step(build, 3 * clips)
            )
            free(build.device)
            measure_ae_step(report, build, clips, anchor)
            if clips == build.sizes.ae_clips[-1]:  # the paper's 20 clips: also with less memory
                free(build.device)
                measure_ae_step(report, build, clips, anchor, checkpointing=True)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_oom(error):
                raise
            report.add({"section": "ae", "name": f"autoencoder step, {clips} clips", "note": "out of memory"})
        free(build.device)


#################################################################################
#                                 Paper Table 2                                 #
#################################################################################


def largest_batch(fits: Callable[[int], bool], limit: int) -> tuple[int, bool]:
    """The largest batch b <= limit with fits(b) (doubling, then bisection), and whether `limit` was hit."""
    good, trial = 0, 1
    while trial <= limit and fits(trial):
        good, trial = trial, trial * 2
    if good == 0:
        return 0, False
    bad = min(trial, limit + 1)
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good, good == limit


def fits_in_memory(
    make: Callable[[int], Callable[[], Any]], device: torch.device, cleanup: Callable[[], None]
) -> Callable[[int], bool]:
    def fits(batch: int) -> bool:
        try:
            make(batch)()
            return True
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_oom(error):
                raise
            cleanup()  # gradients of a backward that ran out of memory
            return False
        finally:
            free(device)

    return fits


@contextmanager
def memory_cap(device: torch.device, gb: float):
    """Only `gb` of the GPU for this process (the paper measured on a 32 GB V100); no cap on the CPU."""
    if device.type != "cuda":
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gb * 2**30 / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def run_table2(report: Report, build: Build, memory_gb: float) -> None:
    """MM-LDM* (latents in, latents out) and MM-LDM (pixels in through the frozen VAE and encoders; out
    through the signal decoder and the VAE). Under the memory cap the process holds only what the
    measured configuration needs: the training rows first (DiT, fp32 master weights and AdamW), then
    the sampling rows (the same DiT in bf16 on a GPU)."""
    sizes, dtype = build.sizes, build.dtype
    dit = build.dit(sizes.table2_dit)
    scheduler, optimizer = build_train_scheduler(), adamw(dit)
    pipeline: AutoencoderPipeline | None = None
    rows = {method: {"method": method, "resolution": build.resolution} for method in TABLE2_METHODS}

    def train(batch: int, from_pixels: bool) -> Callable[[], Tensor]:
        pixels = build.pixels(batch) if from_pixels else None
        z_a, z_v = build.latents(dit.cfg, batch)

        def step() -> Tensor:
            nonlocal z_a, z_v
            if from_pixels:  # MM-LDM: the frozen VAE and encoders make the latents every step
                z_v, z_a = pipeline.encode_clips(pixels)
            with build.autocast():
                loss = dit_training_loss(dit, z_a, z_v, scheduler)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        return step

    def sampler(batch: int, full: bool, steps: int) -> Callable[[], Any]:
        if full:
            variant = SamplingVariant("DDIM", dtype, "ddim", steps, 1.0)
            return svg_sampler(build, dit, pipeline, variant, batch, steps)
        return lambda: sample(dit, "svg", batch, steps=steps, seed=0)

    def largest(make: Callable[[int], Callable[[], Any]]) -> int | str:
        fits = fits_in_memory(make, build.device, cleanup=lambda: dit.zero_grad(set_to_none=True))
        with memory_cap(build.device, memory_gb):
            batch, capped = largest_batch(fits, sizes.mbs_limit)
        return f">={batch}" if capped else batch

    for method in TABLE2_METHODS:  # MM-LDM* first: without the autoencoder in memory
        full = method.startswith("MM-LDM ")
        if report.left_s <= 0:
            report.skip("table2", f"{method} training", "out of the time budget")
            continue
        if full:
            ae = build.autoencoder().eval().requires_grad_(False)
            pipeline = AutoencoderPipeline(ae, copy.deepcopy(build.vae), build.dataset, ["0"] * 8).to_dtype(
                dtype
            )
        step = report.measure("table2", f"{method} training step b2", train(2, full), batch=2)
        rows[method]["train_s_per_step"] = step.get("steady_s")
        rows[method]["train_mbs"] = largest(lambda b, full=full: train(b, full))
        report.table2 = [row for row in rows.values() if len(row) > 2]
        report.write()
    optimizer.state.clear()  # the AdamW moments: sampling holds none
    dit.zero_grad(set_to_none=True)
    dit.to(dtype).eval()  # sampling in the working precision
    for method in reversed(TABLE2_METHODS):  # MM-LDM while the autoencoder is in memory
        full = method.startswith("MM-LDM ")
        if report.left_s <= 0 or (full and pipeline is None):
            report.skip("table2", f"{method} sampling", "out of the time budget")
            continue
        sampled = report.measure(
            "table2", f"{method} sampling b2", sampler(2, full, sizes.dit_steps), batch=2
        )
        rows[method]["sample_s_per_sample"] = sampled["steady_s"] / 2 if sampled.get("steady_s") else None
        # One denoising step of each model holds a sampling batch's memory.
        rows[method]["sample_mbs"] = largest(lambda b, full=full: sampler(b, full, 1))
        report.table2 = [row for row in rows.values() if len(row) > 2]
        report.write()
        if full:
            pipeline = None
            free(build.device)
    free(build.device)


TABLE2_METHODS = ("MM-LDM* (here)", "MM-LDM (here)")


def table2_rows(report: Report, memory_gb: float, device_name: str) -> list[list[Any]]:
    rows = [
        [m, f"{r}^2", mbs, f"{s:.2f}", smbs, f"{ss:.1f}", "V100 32 GB"]
        for m, r, mbs, s, smbs, ss in PAPER_TABLE2
    ]
    where = f"{device_name}, capped at {memory_gb:g} GB" if device_name != "cpu" else "cpu (no cap)"
    for row in sorted(report.table2, key=lambda r: r["method"].replace("*", "~")):  # MM-LDM, then MM-LDM*
        times = [row.get(k) for k in ("train_s_per_step", "sample_s_per_sample")]
        train_s, sample_s = ("" if t is None else f"{t:.2f}" for t in times)
        rows.append(
            [
                row["method"],
                f"{row['resolution']}^2",
                row.get("train_mbs", ""),
                train_s,
                row.get("sample_mbs", ""),
                sample_s,
                where,
            ]
        )
    return rows


TABLE2_HEADER = ["Method", "HW", "Train MBS", "Time/Step (s)", "Sample MBS", "Time/Sample (s)", "GPU"]


def write_table2(report: Report, memory_gb: float) -> str:
    rows = table2_rows(report, memory_gb, report.header["device"])
    with (report.out / "table2.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([TABLE2_HEADER, *rows])
    lines = ["| " + " | ".join(TABLE2_HEADER) + " |", "|" + "---|" * len(TABLE2_HEADER)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    (report.out / "table2.md").write_text(text)
    return text


#################################################################################
#                                     Main                                      #
#################################################################################


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tiny", action="store_true", help="the CPU presets (minutes of a CPU, not of a GPU)"
    )
    parser.add_argument("--out", type=Path, default=None, help="default: outputs/bench_gpu/<paper|tiny>")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--budget-min", type=float, default=None, help="default: 8 (2 with --tiny)")
    parser.add_argument("--reps", type=int, default=3, help="steady-state calls per row (median)")
    parser.add_argument("--memory-gb", type=float, default=32.0, help="Table 2's memory (paper: V100 32 GB)")
    parser.add_argument("--compile-on-cpu", action="store_true", help="also the compiled rows on a CPU")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or args.reps < 1:
        parser.error(f"--only takes sections of {SECTIONS} (got {unknown}); --reps must be >= 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here (tools/check_env.py says why)")
    sizes = TINY if args.tiny else Sizes()
    budget = 60 * (args.budget_min or (2.0 if args.tiny else 8.0))
    out = args.out or REPO / "outputs" / "bench_gpu" / ("tiny" if args.tiny else "paper")
    register_schemas()
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: threads only wait on each other (and on a busy machine)
    torch.backends.cudnn.benchmark = True  # static shapes: the fastest convolution algorithms, found once
    settings = {
        "tiny": args.tiny,
        "sections": sections,
        "reps": args.reps,
        "memory_gb": args.memory_gb,
        "compile_on_cpu": args.compile_on_cpu,
        "budget_s": budget,
        "sizes": {k: (v if not isinstance(v, VAEConfig) else v.preset) for k, v in vars(sizes).items()},
    }
    report = Report(out, device, budget, args.reps, settings)
    print(
        f"bench_gpu on {report.header['device']}: sections {', '.join(sections)}, {budget:.0f} s budget",
        file=sys.stderr,
    )
    build = Build(sizes, device)
    # The quick and headline rows first, compiling last: a run cut short by the budget loses those.
    main, others = (2,), tuple(b for b in sizes.sample_batches if b != 2)
    plan = [
        ("dit", lambda: run_dit(report, build, compiled=False)),
        ("table2", lambda: run_table2(report, build, args.memory_gb)),
        ("ae", lambda: run_ae(report, build)),
        ("sampling", lambda: run_sampling(report, build, main, compiled=False)),
        ("sampling", lambda: run_sampling(report, build, others, compiled=False)),
        ("dit", lambda: run_dit(report, build, compiled=True)),
        ("sampling", lambda: run_sampling(report, build, main, compiled=True)),
    ]
    for section, run in plan:
        if section in sections:
            run()
    report.write()
    (out / "bench.md").write_text(report.markdown())
    print(report.markdown())
    if "table2" in sections:
        print(
            "Paper Table 2 layout: training step at batch 2, time per sample at batch 2 (DDIM "
            f"{sizes.dit_steps} + {sizes.decoder_steps} steps here), largest batches in {args.memory_gb:g} GB"
        )
        print(write_table2(report, args.memory_gb))
    done = sum(1 for row in report.rows if row.get("steady_s") is not None)
    print(
        f"{done} of {len(report.rows)} rows measured in {time.monotonic() - report.started:.0f} s; "
        f"{out / 'bench.json'}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
