#!/usr/bin/env python
"""`make demo` and `make synth-bench`: the whole method on CPU, from synthetic data to evaluated samples.

    python tools/demo.py                              # conf/demo.yaml: about 13 min on 2 cores, outputs/demo/
    python tools/demo.py --config-name synth_bench    # conf/synth_bench.yaml: longer training,
                                                      # the quality table
    python tools/demo.py --config-name shape_check    # conf/shape_check.yaml: classes that differ
                                                      # only by shape and timbre (a held-apart check)
    python tools/demo.py "train_ae=[train.max_steps=50]"    # any key of the config can be overridden

Stages, each in its own folder under `out`:
    synthetic   training clips; heldout: other clips of the same classes (another seed)
    previews    a contact sheet and one mp4 per class of the training set
    vae         stage 0: the tiny KL-VAE: `pretrained_vae` (a VAE folder, assets/tiny_vae) as it is,
                fine-tuned on the training clips (finetune_vae=true), or with pretrained_vae=null
                trained here                                 (conf/train_vae.yaml + `train_vae` overrides)
    ae          stage 1: the multi-modal autoencoder         (conf/train_ae.yaml + `train_ae`)
    dit         stage 2: the DiT for svg / a2v / v2a         (conf/train_dit.yaml + `train_dit`)
    dit_long    the long-generation DiT                      (conf/train_dit_long.yaml + `train_dit_long`)
    samples     svg, a2v and v2a (conditioned on held-out clips) and long, as mp4 + wav + png
    evaluation  svg / a2v / v2a samples and three references against the training clips: held-out
                real clips (the floor), the same with their frames shuffled in time (an FVD
                baseline) and with the sound of another clip (an AV-Align baseline)
    model       both DiTs, the autoencoder and the VAE exported as one model folder
                (tools/export_model.py; `MMLDMPipeline.from_pretrained(<out>/model)`)
A stage whose settings (its config and everything upstream) are unchanged is reused; an
interrupted training stage with unchanged settings resumes from its last checkpoint.

Writes <out>/report.md, <out>/metrics.json, <out>/samples/contact_sheet.png and the mp4s, exports
the model to <out>/model/, and ends with the quality table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from mmldm_ae.engine.latent_cache import LatentCacheError
from mmldm_ae.engine.trainer import TrainingError
from mmldm_ae.pipeline import PRECISIONS
from mmldm_ae.train_ae import train_ae_from_config
from mmldm_ae.train_vae import train_vae_from_config
from mmldm_ae.vae import VAELoadError, load_vae
from mmldm_data.audio import audio_image_to_logmel, mel_spectrogram
from mmldm_data.cli import user_errors
from mmldm_data.config import ConfigError, DatasetConfig, compose, preset, to_typed
from mmldm_data.dataset import SoundingVideoDataset
from mmldm_data.evaluation import EvaluationError, evaluate_sets, write_references
from mmldm_data.media import read_audio, read_video, write_video
from mmldm_data.preview import contact_sheet, save_png, spectrogram_rgb
from mmldm_data.synthetic import (
    CLASS_NAMES,
    CLASS_SETS,
    COLOUR_PITCH,
    SHAPE_TIMBRE,
    SyntheticConfig,
    write_synthetic_dataset,
)
from mmldm_data.tasks import Task
from mmldm_data.video import to_uint8_frames
from mmldm_dit.config import register_schemas
from mmldm_dit.generate import SampleConfig, conditioning_from_items, generate, load_trained_dit
from mmldm_dit.pipeline import export_model
from mmldm_dit.train_dit import train_dit_from_config

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

SAMPLED_TASKS = (Task.svg, Task.a2v, Task.v2a, Task.long)
# Long samples are left out of the evaluation: the evaluator reads one window per file, too few for FVD.
EVALUATED_TASKS = tuple(task for task in SAMPLED_TASKS if not task.needs_long_model)

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass
class SamplingPlan:
    per_class: int = 1  # a2v / v2a: held-out windows per class to condition on
    svg_samples: int = 6
    long_samples: int = 1
    long_clips: int = 4  # clips of 16 frames per long sample
    batch_size: int = 6
    steps: int = 25  # DDIM steps of the DiT
    ae_steps: int = 25  # DDIM steps of the autoencoder's decoder
    guidance: float = 3.0  # paper Eq. 9 s, both modalities
    vocoder: str = "hifigan-universal"
    # of the DiT, the autoencoder and the VAE while sampling: fp32, bf16, or null: bf16 where it runs
    # natively (CUDA, CPUs with AVX512-BF16 / AMX), fp32 elsewhere (mmldm_ae.engine.trainer.native_bf16)
    precision: str | None = None


@dataclass
class EvaluationPlan:
    real_clips: int = 64  # windows of the training clips drawn as the real set
    reference_clips: int = 12  # held-out windows behind each reference set
    batch_size: int = 8


@dataclass
class QualityBars:
    """What the quality table requires (None: the row is reported without a bar)."""

    svg_agreement: float | None = 0.8  # joint samples whose video and sound read as one class
    a2v_accuracy: float | None = 0.8
    v2a_accuracy: float | None = 0.8
    onset_error_frames: float | None = 1.0  # median, svg; at most
    fvd_below_shuffled: bool = True  # svg's FVD below that of held-out clips with shuffled frames


@dataclass
class EndToEndConfig:
    title: str = "demo"
    out: str = "outputs/demo"
    num_clips: int = 48  # training clips, balanced over the classes
    heldout_clips: int = 12
    seed: int = 0
    # Stage 0 from a pretrained VAE, as the paper starts from SD's: a finished VAE folder
    # (tools/train_vae.py's <run_dir>/vae), used as it is; null trains one on the training clips.
    pretrained_vae: str | None = None
    # true: fine-tune `pretrained_vae` on the training clips (from its weights, with `train_vae`) instead
    # of using it as it is (measured for synth-bench, not adopted: docs/design.md#vae-fine-tuning)
    finetune_vae: bool = False
    train_vae: list[str] = field(default_factory=list)  # Hydra overrides of conf/train_vae.yaml
    train_ae: list[str] = field(default_factory=list)  # ... of conf/train_ae.yaml
    train_dit: list[str] = field(default_factory=list)  # ... of conf/train_dit.yaml
    train_dit_long: list[str] = field(default_factory=list)  # ... of conf/train_dit_long.yaml
    sampling: SamplingPlan = field(default_factory=SamplingPlan)
    evaluation: EvaluationPlan = field(default_factory=EvaluationPlan)
    bars: QualityBars = field(default_factory=QualityBars)
    classes: str = COLOUR_PITCH  # synthetic class set: colour_pitch or shape_timbre (conf/shape_check.yaml)
    # Also write the quality table, stage times and settings here (synth-bench: docs/synth_bench.json)
    results_json: str | None = None

    def validate(self) -> None:
        problems = []
        if self.classes not in CLASS_SETS:
            problems.append(f"classes must be one of {', '.join(CLASS_SETS)}, got {self.classes!r}")
        classes = len(CLASS_NAMES)  # every class set has as many
        if self.num_clips < classes or self.heldout_clips < classes:
            problems.append(
                f"num_clips ({self.num_clips}) and heldout_clips ({self.heldout_clips}) must be at "
                f"least {classes}, one per class"
            )
        plan = self.sampling
        for name in (
            "per_class",
            "svg_samples",
            "long_samples",
            "long_clips",
            "batch_size",
            "steps",
            "ae_steps",
        ):
            if getattr(plan, name) < 1:
                problems.append(f"sampling.{name} must be >= 1, got {getattr(plan, name)}")
        if plan.guidance < 0:
            problems.append(f"sampling.guidance must be >= 0, got {plan.guidance}")
        if plan.precision not in (*PRECISIONS, None):
            problems.append(f"sampling.precision must be fp32, bf16 or null, got {plan.precision!r}")
        for name in ("svg_agreement", "a2v_accuracy", "v2a_accuracy"):
            value = getattr(self.bars, name)
            if value is not None and not 0.0 <= value <= 1.0:
                problems.append(f"bars.{name} must be in [0, 1] or null, got {value}")
        if self.bars.onset_error_frames is not None and self.bars.onset_error_frames < 0:
            problems.append(
                f"bars.onset_error_frames must be >= 0 or null, got {self.bars.onset_error_frames}"
            )
        if self.evaluation.real_clips < 2 or self.evaluation.reference_clips < 2:
            problems.append(
                "evaluation.real_clips and evaluation.reference_clips must be >= 2 (FVD needs two clips)"
            )
        vae_files = ("config.json", "diffusion_pytorch_model.safetensors")
        if self.pretrained_vae is not None and not all(
            (Path(self.pretrained_vae) / name).is_file() for name in vae_files
        ):
            problems.append(
                f"pretrained_vae: {self.pretrained_vae} is not a VAE folder (config.json and "
                "diffusion_pytorch_model.safetensors, as tools/train_vae.py writes to <run_dir>/vae; a "
                "relative path is from the current folder, make demo runs in the repository root); "
                "pretrained_vae=null trains one on the training clips"
            )
        if self.finetune_vae and self.pretrained_vae is None:
            problems.append("finetune_vae=true needs a pretrained_vae to fine-tune (a VAE folder)")
        ConfigError.raise_if_any(problems, "invalid end-to-end config")


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def stage_key(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def run_stage(folder: Path, settings: dict, work: Callable[[Path], dict], resumable: bool = False) -> dict:
    """Run `work(folder)` unless the folder holds a finished run with the same settings.

    The result carries the stage's key, so that a downstream stage that puts it in its settings
    reruns whenever this one changed. A resumable stage (training) interrupted with the same
    settings keeps its folder, and its trainer resumes from the last checkpoint.
    """
    marker = folder / ".stage.json"
    key = stage_key(settings)
    saved = json.loads(marker.read_text()) if marker.is_file() else {}
    if saved.get("key") == key and saved.get("finished"):
        print(f"[{folder.name}] up to date, reusing {folder}", file=sys.stderr)
        return saved["result"]
    if folder.exists() and not (resumable and saved.get("key") == key):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"key": key, "settings": settings, "finished": False}, indent=1))
    started = time.perf_counter()
    print(f"[{folder.name}] running ...", file=sys.stderr, flush=True)
    result = work(folder) | {"key": key}
    result["seconds"] = round(time.perf_counter() - started, 1)
    marker.write_text(
        json.dumps({"key": key, "settings": settings, "finished": True, "result": result}, indent=1)
    )
    print(f"[{folder.name}] done in {result['seconds']} s", file=sys.stderr, flush=True)
    return result


def synthetic_dataset_config(root: Path) -> DatasetConfig:
    """The synthetic preset (conf/dataset/synthetic.yaml) on `root`."""
    return preset(CONF_DIR, "dataset", "synthetic", data_root=str(root))


def write_previews(folder: Path, dataset: SoundingVideoDataset) -> dict:
    """One window per class: a contact-sheet row, a spectrogram PNG and an mp4 with its sound."""
    config = dataset.config
    first_window_of_class: dict[int, int] = {}
    for index, (file_position, _) in enumerate(dataset.windows):
        first_window_of_class.setdefault(dataset.file_classes[file_position], index)
    rows, labels, videos = [], [], []
    num_mel_frames = config.mel.num_frames(config.clip_samples)
    for class_id, index in sorted(first_window_of_class.items()):
        item = dataset[index]
        name = dataset.class_names[class_id]
        logmel = audio_image_to_logmel(item["audio_image"][None], num_mel_frames, config.mel)[0]
        spectrogram = spectrogram_rgb(logmel)
        save_png(contact_sheet([[spectrogram]], cell=160), folder / f"spectrogram_{name}.png")
        audio_image = to_uint8_frames(item["audio_image"][None])[0]
        rows.append([*to_uint8_frames(item["key_frames"]), audio_image, spectrogram])
        labels.append(name)
        video = folder / f"window_{name}.mp4"
        write_video(
            video, to_uint8_frames(item["frames"]), config.fps, item["audio"].numpy(), config.mel.sample_rate
        )
        videos.append(str(video))
    sheet = save_png(contact_sheet(rows, labels), folder / "contact_sheet.png")
    return {"contact_sheet": str(sheet), "videos": videos, "classes": labels}


def pretrained_vae_stage(source: Path) -> tuple[dict, Callable[[Path], dict]]:
    """The settings and work of a vae stage that copies the finished VAE folder `source` to <folder>/vae."""

    def work(folder: Path) -> dict:
        shutil.copytree(source, folder / "vae")
        load_vae(folder / "vae", preset="tiny")  # fails here, naming the folder, on weights that do not load
        return {"step": 0, "pretrained": str(source), "vae": str(folder / "vae")}

    return pretrained_vae_settings(source), work


def pretrained_vae_settings(source: Path) -> dict:
    """What a stage built on the VAE folder `source` depends on: its weights' hash and its config."""
    weights = hashlib.sha1((source / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    return {"pretrained": weights, "config": json.loads((source / "config.json").read_text())}


def stage_steps(stage: dict) -> str:
    """A training stage's steps for the report: as trained, pretrained as it is, or fine-tuned from one."""
    if not stage.get("pretrained"):
        return str(stage["step"])
    if stage["step"] == 0:
        return f"pretrained {stage['pretrained']}"
    return f"{stage['step']} from {stage['pretrained']}"


def train_stage(
    config_name: str, overrides: list[str], train: Callable[[object], dict]
) -> Callable[[Path], dict]:
    """The work of a training stage: conf/<config_name>.yaml with `overrides`, run into the stage's folder."""

    def work(folder: Path) -> dict:
        summary = train(compose(CONF_DIR, config_name, [*overrides, f"run_dir={folder}"]))
        summary.pop("is_main", None)
        return summary

    return work


def heldout_windows(dataset: SoundingVideoDataset, per_class: int) -> list[int]:
    """`per_class` windows of every class, each from a different file where there are enough files."""
    chosen = []
    for class_id in range(len(dataset.class_names)):
        files = [f for f, c in enumerate(dataset.file_classes) if c == class_id]
        windows = [i for i, (f, _) in enumerate(dataset.windows) if f in files]
        picks = np.linspace(0, len(windows) - 1, min(per_class, len(windows))).round().astype(int)
        chosen += [windows[p] for p in picks]
    return chosen


def write_samples(
    folder: Path, dit_run: Path, long_run: Path, heldout: SoundingVideoDataset, plan: SamplingPlan, seed: int
) -> dict:
    """Every task's samples under folder/<task>/, a contact sheet (first sample of each task) and
    spectrograms."""
    common = dict(
        steps=plan.steps,
        ae_steps=plan.ae_steps,
        guidance_audio=plan.guidance,
        guidance_video=plan.guidance,
        vocoder=plan.vocoder,
        seed=seed,
        batch_size=plan.batch_size,
    )
    dit = load_trained_dit(dit_run, precision=plan.precision)
    windows = heldout_windows(heldout, plan.per_class)
    items = [heldout[w] for w in windows]
    sources = [f"{heldout.files[heldout.windows[w][0]].path}@{heldout.windows[w][1]}" for w in windows]
    summaries = {}
    for task in EVALUATED_TASKS:
        out_dir = folder / task
        if task.given_modality is None:
            config = SampleConfig(
                run=str(dit_run), task=task, out_dir=str(out_dir), num_samples=plan.svg_samples, **common
            )
            summaries[task] = generate(dit, config)
        else:
            config = SampleConfig(
                run=str(dit_run), task=task, out_dir=str(out_dir), num_samples=len(items), **common
            )
            conditioning = conditioning_from_items(dit, items, task.given_modality, sources)
            summaries[task] = generate(dit, config, conditioning)
    long_config = SampleConfig(
        run=str(long_run),
        task=Task.long,
        out_dir=str(folder / Task.long),
        num_samples=plan.long_samples,
        num_clips=plan.long_clips,
        **common,
    )
    summaries[Task.long] = generate(load_trained_dit(long_run, precision=plan.precision), long_config)

    rows, labels = [], []
    for task in SAMPLED_TASKS:
        video = sorted((folder / task).glob("*.mp4"))[0]
        frames = read_video(video, fps=heldout.config.fps).frames
        wave = read_audio(video, heldout.config.mel.sample_rate)
        spectrogram = spectrogram_rgb(mel_spectrogram(torch.from_numpy(wave)[None], heldout.config.mel)[0])
        save_png(contact_sheet([[spectrogram]], cell=160), folder / f"spectrogram_{task}.png")
        picks = np.linspace(0, len(frames) - 1, 8).round().astype(int)
        rows.append([*frames[picks], spectrogram])
        labels.append(task)
    sheet = save_png(contact_sheet(rows, labels, cell=96), folder / "contact_sheet.png")
    return {
        "tasks": summaries,
        "contact_sheet": str(sheet),
        "spectrograms": [str(folder / f"spectrogram_{task}.png") for task in SAMPLED_TASKS],
    }


# ---------------------------------------------------------------------------------------------
# The quality table
# ---------------------------------------------------------------------------------------------

# (label, metric, which generated set, reference set or None, the QualityBars field of its bar or None)
QUALITY_ROWS = (
    ("joint (svg) cross-modal class agreement", "oracle_class_agreement", Task.svg, "real", "svg_agreement"),
    ("a2v oracle accuracy", "oracle_a2v_accuracy", Task.a2v, None, "a2v_accuracy"),
    ("v2a oracle accuracy", "oracle_v2a_accuracy", Task.v2a, None, "v2a_accuracy"),
    # What bounds the two above: the given clip as the DiT sees it (its latent, decoded beside the
    # generated modality, whose semantic tokens the decoder also reads, so not a strict ceiling) and
    # whether the generated modality follows that.
    (
        "a2v: given sound read right as decoded with the sample",
        "oracle_a2v_given_accuracy",
        Task.a2v,
        None,
        None,
    ),
    ("a2v: video matches the given sound as decoded", "oracle_a2v_agreement", Task.a2v, None, None),
    (
        "v2a: given video read right as decoded with the sample",
        "oracle_v2a_given_accuracy",
        Task.v2a,
        None,
        None,
    ),
    ("v2a: sound matches the given video as decoded", "oracle_v2a_agreement", Task.v2a, None, None),
    (
        "median onset-to-impact error (frames), svg",
        "oracle_onset_error_frames",
        Task.svg,
        "real",
        "onset_error_frames",
    ),
    ("FVD vs training clips, svg", "fvd", Task.svg, "real", "fvd_below_shuffled"),
    ("FVD, time-shuffled held-out frames", "fvd", "shuffled", None, None),
    ("AV-Align, svg", "av_align", Task.svg, "real", None),
    ("AV-Align, held-out frames with another clip's sound", "av_align", "swapped", None, None),
    ("FAD (aisfx stand-in, not comparable to papers), svg", "fad_aisfx", Task.svg, "real", None),
)
AT_MOST = ("onset_error_frames",)


def bar_of(name: str | None, bars: QualityBars, reports: dict[str, dict]) -> tuple[str, float] | None:
    """(">=" or "<=", value) of a row's bar, or None; the FVD bar is the shuffled set's FVD."""
    if name is None:
        return None
    if name == "fvd_below_shuffled":
        shuffled = reports.get("shuffled", {}).get("fvd")
        return ("<", shuffled) if bars.fvd_below_shuffled and shuffled is not None else None
    value = getattr(bars, name)
    return None if value is None else ("<=" if name in AT_MOST else ">=", value)


def quality_table(reports: dict[str, dict], bars: QualityBars | None = None) -> tuple[list[dict], str]:
    """Rows {label, value, floor, bar, passed} and the same as a markdown table."""
    bars = bars or QualityBars()
    checks = {">=": float.__ge__, "<=": float.__le__, "<": float.__lt__}
    rows = []
    for label, metric, generated, reference, bar_name in QUALITY_ROWS:
        value = reports.get(generated, {}).get(metric)
        floor = reports.get(reference, {}).get(metric) if reference else None
        bar = bar_of(bar_name, bars, reports)
        passed = None
        if bar is not None and value is not None:
            passed = checks[bar[0]](float(value), float(bar[1]))
        rows.append(
            {
                "label": label,
                "metric": metric,
                "set": generated,
                "value": value,
                "real_floor": floor,
                "bar": f"{bar[0]} {bar[1]:.3g}" if bar else None,
                "passed": passed,
            }
        )

    def shown(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3g}"

    lines = ["| metric | generated | real held-out clips | bar | met |", "|---|---|---|---|---|"]
    for row in rows:
        met = {True: "yes", False: "**no**", None: ""}[row["passed"]]
        lines.append(
            f"| {row['label']} | {shown(row['value'])} | {shown(row['real_floor'])} "
            f"| {row['bar'] or ''} | {met} |"
        )
    return rows, "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------


def run_end_to_end(cfg: EndToEndConfig) -> dict:
    """Every stage into cfg.out; writes metrics.json and report.md there and returns the metrics."""
    cfg.validate()
    out = Path(cfg.out)
    started = time.perf_counter()
    data = {}
    synthetic = SyntheticConfig(classes=cfg.classes)
    for name, clips, seed in (
        ("synthetic", cfg.num_clips, cfg.seed),
        ("heldout", cfg.heldout_clips, cfg.seed + 1000),
    ):
        data[name] = run_stage(
            out / name,
            {"clips": clips, "seed": seed, "synthetic": asdict(synthetic)},
            lambda folder, c=clips, s=seed: write_synthetic_dataset(folder, c, s, synthetic, progress=True),
        )
    train_root, heldout_root = out / "synthetic", out / "heldout"
    training = SoundingVideoDataset(
        synthetic_dataset_config(train_root), return_all_frames=True, progress=True
    )
    previews = run_stage(
        out / "previews", {"data": data["synthetic"]["key"]}, lambda folder: write_previews(folder, training)
    )

    runs = out / "runs"
    data_override = [f"data_root={train_root}"]
    if cfg.pretrained_vae is not None and not cfg.finetune_vae:
        vae = run_stage(runs / "vae", *pretrained_vae_stage(Path(cfg.pretrained_vae)))
    else:
        vae_settings = {"data": data["synthetic"]["key"], "overrides": cfg.train_vae}
        start = []
        if cfg.pretrained_vae is not None:
            vae_settings["pretrained"] = pretrained_vae_settings(Path(cfg.pretrained_vae))
            start = [f"vae.weights={cfg.pretrained_vae}"]
        train = train_stage("train_vae", [*data_override, *start, *cfg.train_vae], train_vae_from_config)
        vae = run_stage(
            runs / "vae",
            vae_settings,
            lambda folder: train(folder) | {"pretrained": cfg.pretrained_vae},
            resumable=True,
        )
    ae = run_stage(
        runs / "ae",
        {"vae": vae["key"], "overrides": cfg.train_ae},
        train_stage(
            "train_ae",
            [
                *data_override,
                f"vae.weights={runs / 'vae' / 'vae'}",
                f"latent_cache={runs / 'vae_latents'}",
                *cfg.train_ae,
            ],
            train_ae_from_config,
        ),
        resumable=True,
    )
    dits = {}
    # The long model starts from the base DiT's weights, as the authors' did (conf/train_dit_long.yaml).
    for name, config_name, overrides, base in (
        ("dit", "train_dit", cfg.train_dit, []),
        ("dit_long", "train_dit_long", cfg.train_dit_long, ["dit"]),
    ):
        dits[name] = run_stage(
            runs / name,
            {"ae": ae["key"], "overrides": overrides, "init_from": [dits[b]["key"] for b in base]},
            train_stage(
                config_name,
                [
                    *data_override,
                    f"ae_run={runs / 'ae'}",
                    f"init_from={runs / base[0] if base else 'null'}",
                    *overrides,
                ],
                train_dit_from_config,
            ),
            resumable=True,
        )

    heldout = SoundingVideoDataset(synthetic_dataset_config(heldout_root), return_all_frames=True)
    samples = run_stage(
        out / "samples",
        {
            "dits": [d["key"] for d in dits.values()],
            "heldout": data["heldout"]["key"],
            "plan": asdict(cfg.sampling),
            "seed": cfg.seed,
        },
        lambda folder: write_samples(
            folder, runs / "dit", runs / "dit_long", heldout, cfg.sampling, cfg.seed
        ),
    )

    def evaluation(folder: Path) -> dict:
        references = write_references(
            folder / "references", heldout, cfg.evaluation.reference_clips, cfg.seed
        )
        sets = {task: out / "samples" / task for task in EVALUATED_TASKS} | references
        return {
            "reports": evaluate_sets(
                folder, train_root, sets, cfg.evaluation.real_clips, cfg.evaluation.batch_size
            )
        }

    evaluated = run_stage(
        out / "evaluation", {"samples": samples["key"], "plan": asdict(cfg.evaluation)}, evaluation
    )
    rows, table = quality_table(evaluated["reports"], cfg.bars)
    model = run_stage(
        out / "model",
        {"dits": [d["key"] for d in dits.values()], "evaluation": evaluated["key"], "title": cfg.title},
        lambda folder: export_demo_model(folder, runs, cfg.title, rows),
    )
    minutes = (time.perf_counter() - started) / 60

    metrics = {
        "quality": rows,
        "reports": evaluated["reports"],
        "training": {
            name: {key: stage.get(key) for key in ("step", "seconds", "last", "pretrained")}
            for name, stage in (
                ("vae", vae),
                ("ae", ae),
                ("dit", dits["dit"]),
                ("dit_long", dits["dit_long"]),
            )
        },
        "sampling": samples["tasks"],
        "model": model["folder"],
        "config": {
            "num_clips": cfg.num_clips,
            "heldout_clips": cfg.heldout_clips,
            "seed": cfg.seed,
            "pretrained_vae": cfg.pretrained_vae,
            "finetune_vae": cfg.finetune_vae,
            "train_vae": cfg.train_vae,
            "train_ae": cfg.train_ae,
            "train_dit": cfg.train_dit,
            "train_dit_long": cfg.train_dit_long,
            "sampling": asdict(cfg.sampling),
            "evaluation": asdict(cfg.evaluation),
            "classes": cfg.classes,
        },
        "minutes": round(minutes, 1),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if cfg.results_json is not None:
        keep = ("quality", "training", "config", "minutes")
        results = {"title": cfg.title} | {key: metrics[key] for key in keep}
        Path(cfg.results_json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.results_json).write_text(json.dumps(results, indent=1) + "\n")
    report = report_markdown(cfg.title, out, metrics, table, previews, samples)
    (out / "report.md").write_text(report)
    return metrics | {"table": table}


def export_demo_model(folder: Path, runs: Path, title: str, quality: list[dict]) -> dict:
    """Both DiTs with their autoencoder and VAE as one model folder, the quality table in its card."""
    metrics = {f"{title} quality table": {row["label"]: row["value"] for row in quality}}
    pipe = export_model(
        runs / "dit", folder, long_run=runs / "dit_long", title=f"MM-LDM {title} (synthetic)", metrics=metrics
    )
    return {"folder": str(folder), "tasks": list(pipe.tasks)}


# Per class set: what its classes are, and what its oracles read (the report's wording).
CLASS_SET_WORDING = {
    COLOUR_PITCH: (
        "coloured shapes, each with its own sound",
        "the colour of the moving object and the pitch of the sound",
    ),
    SHAPE_TIMBRE: (
        "shapes of one colour, each with its own timbre in a shared pitch range",
        "the silhouette of the moving object and the spectral envelope of the sound",
    ),
}


def report_markdown(title: str, out: Path, metrics: dict, table: str, previews: dict, samples: dict) -> str:
    def relative(path: str) -> str:
        return str(Path(path).relative_to(out)) if Path(path).is_relative_to(out) else path

    training = metrics["training"]
    config = metrics["config"]
    classes, oracles_read = CLASS_SET_WORDING[config["classes"]]
    lines = [
        f"# MM-LDM {title} on the synthetic dataset",
        "",
        f"{config['num_clips']} training clips and {config['heldout_clips']} held-out clips "
        f"of {len(CLASS_NAMES)} "
        f"classes ({classes}; bounces make the sound onsets).",
        f"This run took {metrics['minutes']} min (stages reused from an earlier run count as 0).",
        "",
        "## Training",
        "",
        "| stage | steps | seconds |",
        "|---|---|---|",
        *[f"| {name} | {stage_steps(stage)} | {stage['seconds']} |" for name, stage in training.items()],
        "",
        "## Samples",
        "",
        f"![samples]({relative(samples['contact_sheet'])})",
        "",
        "Rows: svg (sound and video from noise), a2v (video for a held-out clip's sound), v2a (sound for a "
        "held-out clip's video), long (autoregressive); 8 frames, then the spectrogram of the sound.",
        "",
        *[
            f"- {task}: `{relative(summary['out_dir'])}/` ({summary['samples']} samples of "
            f"{summary['frames_per_sample']} frames, {summary['seconds_per_sample']} s each)"
            for task, summary in metrics["sampling"].items()
        ],
        f"- training clips, one per class: `{relative(str(Path(previews['contact_sheet']).parent))}/`",
        "",
        "## Quality (synthetic oracles, FVD, AV-Align)",
        "",
        table,
        f"The oracles read the class from {oracles_read}; "
        f"chance is 1/{len(CLASS_NAMES)} = {1 / len(CLASS_NAMES):.3f}. FVD and FAD use few clips here, so "
        "they compare runs of this table only. All numbers: `metrics.json`.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config-name", default="demo", help="conf/<name>.yaml: demo, synth_bench or shape_check"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (key=value) of that config")
    args = parser.parse_args()
    register_schemas()  # before composing conf/: every group preset starts from its schema
    with user_errors("demo", TrainingError, VAELoadError, LatentCacheError, EvaluationError):
        cfg = compose(CONF_DIR, args.config_name, args.overrides)
        config = to_typed(EndToEndConfig, OmegaConf.to_container(cfg, resolve=True))
        metrics = run_end_to_end(config)
    out = Path(config.out)
    print(f"\n{metrics['table']}", file=sys.stderr)
    print(
        f"{config.title} finished in {metrics['minutes']} min\n"
        f"  report        : {out / 'report.md'}\n"
        f"  contact sheet : {out / 'samples' / 'contact_sheet.png'}\n"
        f"  samples       : {out / 'samples'}/{{svg,a2v,v2a,long}}/*.mp4 (with sound)\n"
        f"  metrics       : {out / 'metrics.json'}\n"
        f"  model         : {metrics['model']} (MMLDMPipeline.from_pretrained; model card README.md)",
        file=sys.stderr,
    )
    print(
        json.dumps(
            {
                "out": str(out),
                "model": metrics["model"],
                "minutes": metrics["minutes"],
                "quality": {row["label"]: row["value"] for row in metrics["quality"]},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
