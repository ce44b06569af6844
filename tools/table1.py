#!/usr/bin/env python
"""`make table1 DATASET=...`: the paper's Table 1 for one dataset, as markdown and CSV.

    python tools/table1.py --config-name table1_tiny dataset=synthetic          # CPU: tiny runs, minutes
    python tools/table1.py --config-name table1_paper dataset=landscape data_root=/data/landscape \\
        ae_run=outputs/runs/ae-landscape-paper dit_run=outputs/runs/dit-landscape-S

Rows as in the paper: the ground truth (a second seeded draw of real windows against the real
draw), single-modal video (MM-LDM-v, `dit.modalities=[video]`) and audio (MM-LDM-a), and the joint
model's a2v, v2a and svg, each video row at every resolution (64^2 and 256^2; frames letterboxed
before I3D), audio-only rows once. Columns FVD / KVD / FAD where the paper reports them, and the
paper's own figures beside them for Landscape and AIST++.

Runs: `ae_run`, `dit_run` (svg / a2v / v2a), `dit_video_run`, `dit_audio_run`. A folder that holds
a valid checkpoint is used as it is; otherwise the tool trains one there (conf/train_ae.yaml or
conf/train_dit.yaml with the `train_ae` / `train_dit` overrides). Samples (a2v / v2a conditioned on
evenly spread windows of the DiT's latent cache, as the paper's training-set protocol) and each
evaluation are reused while their inputs and settings are unchanged. Writes <out>/table1.md,
<out>/table1.csv and <out>/table1.json, prints the table, and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from mmldm_ae.engine.checkpoint import newest_valid_checkpoint
from mmldm_ae.engine.latent_cache import LatentCacheError
from mmldm_ae.engine.trainer import TrainingError
from mmldm_ae.train_ae import train_ae_from_config
from mmldm_ae.vae import VAELoadError
from mmldm_data.cli import user_errors
from mmldm_data.config import ConfigError, DatasetConfig, compose, dataset_config_from, to_typed
from mmldm_data.evaluation import RESOLUTIONS, EvalProtocol, EvalSets, EvaluationError, evaluate, load_models
from mmldm_data.evaluation.sources import ClipSource, scan_clip_source, select_windows
from mmldm_data.media import read_audio, write_video
from mmldm_data.metrics.fad import BACKENDS
from mmldm_data.tasks import Task
from mmldm_dit.config import register_schemas
from mmldm_dit.generate import SampleConfig, generate, load_trained_dit
from mmldm_dit.sampling import DEFAULT_GUIDANCE, SAMPLERS
from mmldm_dit.train_dit import train_dit_from_config

PROGRAM = "table1"
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# The sets a row reads (one folder of samples each, or the real clips), the metrics the paper shows
# for it, and whether it depends on the frames' resolution.
METRICS = {
    "gt": ("fvd", "kvd", "fad"),
    "video": ("fvd", "kvd"),
    "audio": ("fad",),
    "a2v": ("fvd", "kvd"),
    "v2a": ("fad",),
    "svg": ("fvd", "kvd", "fad"),
}
PER_RESOLUTION = {"gt", "video", "a2v", "svg"}
VIDEO, AUDIO, JOINT = (
    "Single-Modal Video Generation",
    "Single-Modal Audio Generation",
    "Multi-Modal Generation",
)
METHODS = {
    "gt": "Ground Truth",
    "video": "MM-LDM-v",
    "audio": "MM-LDM-a",
    "a2v": "MM-LDM-a2v",
    "v2a": "MM-LDM-v2a",
    "svg": "MM-LDM-svg",
}
SAMPLER_NAMES = {"ddim": "DDIM", "dpmsolver++": "DPM-Solver++"}
# Paper Table 1 (MM-LDM rows): (set, resolution or None) -> FVD, KVD, FAD as printed (None: "-").
PAPER = {
    "landscape": {
        ("gt", 64): (16.3, -0.015, 7.7),
        ("gt", 256): (22.4, 0.128, 7.7),
        ("video", 64): (122.1, 6.4, None),
        ("video", 256): (156.1, 13.0, None),
        ("audio", None): (None, None, 10.7),
        ("a2v", 64): (89.2, 4.2, None),
        ("v2a", None): (None, None, 9.2),
        ("svg", 64): (77.4, 3.2, 9.1),
        ("a2v", 256): (123.1, 10.4, None),
        ("svg", 256): (105.0, 8.3, 9.1),
    },
    "aist": {
        ("gt", 64): (6.8, -0.015, 8.4),
        ("gt", 256): (11.5, 0.043, 8.4),
        ("video", 64): (83.1, 13.1, None),
        ("video", 256): (120.9, 26.5, None),
        ("audio", None): (None, None, 11.7),
        ("a2v", 64): (71.0, 10.8, None),
        ("v2a", None): (None, None, 10.2),
        ("svg", 64): (55.9, 8.2, 10.2),
        ("a2v", 256): (128.5, 33.2, None),
        ("svg", 256): (105.0, 27.9, 10.2),
    },
}

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass
class Table1Sampling:
    samples: int = 2048  # per task (the paper: 2048 generated against 2048 real clips)
    batch_size: int = 16
    sampler: str = "ddim"
    steps: int = 50  # of the DiT
    ae_steps: int | None = None  # of the autoencoder's decoder (None: its ae.decode_steps)
    guidance: float = DEFAULT_GUIDANCE  # paper Eq. 9 s, both modalities
    vocoder: str = "hifigan-universal"
    seed: int = 0


@dataclass
class Table1Evaluation:
    num_clips: int = 2048  # real windows drawn (and ground-truth windows beside them)
    resolutions: list[int] = field(default_factory=lambda: list(RESOLUTIONS))
    fad_backends: list[str] = field(default_factory=lambda: ["aisfx"])
    fad_weights: dict[str, str] = field(default_factory=dict)  # backend -> weights file (vggish, audioclip)
    seed: int = 0
    batch_size: int = 8


@dataclass
class Table1Config:
    """The root config's own keys; its `dataset` group (and `data_root=`) choose the data."""

    out: str | None = None  # None: outputs/table1/<dataset name>
    ae_run: str | None = None  # None: <out>/runs/ae
    dit_run: str | None = None  # joint model (svg, a2v, v2a); None: <out>/runs/dit
    dit_video_run: str | None = None  # MM-LDM-v; None: <dit_run>-video
    dit_audio_run: str | None = None  # MM-LDM-a; None: <dit_run>-audio
    train_ae: list[str] = field(default_factory=list)  # overrides of conf/train_ae.yaml for a missing AE
    train_dit: list[str] = field(default_factory=list)  # ... of conf/train_dit.yaml for a missing DiT
    sampling: Table1Sampling = field(default_factory=Table1Sampling)
    evaluation: Table1Evaluation = field(default_factory=Table1Evaluation)

    def resolve(self, dataset: str) -> None:
        """Fill the folders left None from the dataset's name."""
        self.out = self.out or f"outputs/table1/{dataset}"
        self.ae_run = self.ae_run or f"{self.out}/runs/ae"
        self.dit_run = self.dit_run or f"{self.out}/runs/dit"
        self.dit_video_run = self.dit_video_run or f"{self.dit_run}-video"
        self.dit_audio_run = self.dit_audio_run or f"{self.dit_run}-audio"

    def validate(self) -> None:
        problems = []
        plan, evaluation = self.sampling, self.evaluation
        for name in ("samples", "batch_size", "steps"):
            if getattr(plan, name) < 1:
                problems.append(f"sampling.{name} must be >= 1, got {getattr(plan, name)}")
        if plan.samples < 2:
            problems.append("sampling.samples must be >= 2 (FVD needs two clips per side)")
        if plan.sampler not in SAMPLERS:
            problems.append(f"sampling.sampler must be one of {SAMPLERS}, got {plan.sampler!r}")
        if plan.guidance < 0:
            problems.append(f"sampling.guidance must be >= 0, got {plan.guidance}")
        if evaluation.num_clips < 2:
            problems.append(f"evaluation.num_clips must be >= 2, got {evaluation.num_clips}")
        if not evaluation.resolutions or set(evaluation.resolutions) - set(RESOLUTIONS):
            problems.append(f"evaluation.resolutions must be a non-empty subset of {list(RESOLUTIONS)}")
        if len(evaluation.fad_backends) != 1 or evaluation.fad_backends[0] not in BACKENDS:
            problems.append(f"evaluation.fad_backends must name one of {sorted(BACKENDS)} (one FAD column)")
        ConfigError.raise_if_any(problems, "invalid table1 config")


# ---------------------------------------------------------------------------------------------
# Runs and samples
# ---------------------------------------------------------------------------------------------


def say(message: str) -> None:
    print(f"[{PROGRAM}] {message}", file=sys.stderr, flush=True)


def find_or_train(run: str, config_name: str, overrides: list[str], train) -> Path:
    """The newest valid checkpoint of `run`, after training one there when it has none."""
    checkpoint = newest_valid_checkpoint(Path(run))
    if checkpoint is not None:
        say(f"found {run} ({checkpoint.name})")
        return checkpoint
    say(f"no checkpoint in {run}: training it (conf/{config_name}.yaml {' '.join(overrides)})")
    train(compose(CONF_DIR, config_name, [*overrides, f"run_dir={run}"]))
    return newest_valid_checkpoint(Path(run))


def key_of(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reused(folder: Path, key: str) -> bool:
    marker = folder / "table1_key.json"
    return marker.is_file() and json.loads(marker.read_text()).get("key") == key


def mark(folder: Path, key: str) -> None:
    (folder / "table1_key.json").write_text(json.dumps({"key": key}))


def sample_task(checkpoint: Path, task: Task, folder: Path, plan: Table1Sampling) -> str:
    """`plan.samples` samples of `task` into `folder` (reused when checkpoint and plan are unchanged);
    returns the folder's key."""
    key = key_of({"checkpoint": str(checkpoint.resolve()), "task": task, "plan": asdict(plan)})
    if reused(folder, key):
        say(f"samples {folder} up to date")
        return key
    say(f"sampling {plan.samples} x {task} from {checkpoint} into {folder}")
    config = SampleConfig(
        run=str(checkpoint),
        task=task,
        out_dir=str(folder),
        num_samples=plan.samples,
        batch_size=plan.batch_size,
        seed=plan.seed,
        sampler=plan.sampler,
        steps=plan.steps,
        ae_steps=plan.ae_steps,
        guidance_audio=plan.guidance,
        guidance_video=plan.guidance,
        vocoder=plan.vocoder,
    )
    dit = load_trained_dit(checkpoint, device="cuda" if torch.cuda.is_available() else "cpu")
    generate(dit, config)
    mark(folder, key)
    return key


def sounds_as_videos(folder: Path, out: Path, fps: float, frames: int, sample_rate: int, key: str) -> None:
    """The audio-only model writes wav files; the evaluator reads video files. Each sound goes into an
    mp4 with black frames, of which only the sound is scored (FAD)."""
    if reused(out, key):
        return
    out.mkdir(parents=True, exist_ok=True)
    black = np.zeros((frames, 16, 16, 3), np.uint8)
    for wav in sorted(folder.glob("*.wav")):
        write_video(out / f"{wav.stem}.mp4", black, fps, read_audio(wav, sample_rate), sample_rate)
    mark(out, key)


# ---------------------------------------------------------------------------------------------
# Evaluation and the table
# ---------------------------------------------------------------------------------------------


def layout(resolutions: list[int]) -> list[tuple[str, str, int | None]]:
    """(section, set, resolution or None) in the paper's order."""
    first = resolutions[0]
    rows = [("", "gt", r) for r in resolutions] + [(VIDEO, "video", r) for r in resolutions]
    rows.append((AUDIO, "audio", None))
    for r in resolutions:
        rows.append((JOINT, "a2v", r))
        if r == first:
            rows.append((JOINT, "v2a", None))
        rows.append((JOINT, "svg", r))
    return rows


def ground_truth(real: ClipSource, count: int, seed: int) -> ClipSource:
    """Real windows that the real draw of `seed` does not hold, a seeded draw of `count`: the GT row."""
    taken = set(select_windows(real, count, seed))
    rest = replace(real, windows=[ref for ref in real.windows if ref not in taken])
    if len(rest.windows) < 2:
        raise EvaluationError(
            f"the real set has {len(real.windows)} windows: too few for a ground-truth draw beside the "
            f"{len(taken)} real ones; lower evaluation.num_clips"
        )
    return replace(rest, windows=select_windows(rest, count, seed + 1))


def evaluate_set(
    name: str,
    generated: ClipSource,
    real: ClipSource,
    protocol: EvalProtocol,
    models,
    cfg: Table1Config,
    key: str,
) -> dict:
    """The evaluator's metrics of one set at one resolution (reused while `key` is unchanged)."""
    path = Path(cfg.out) / "evaluation" / f"{name}_{protocol.resolution}.json"
    if path.is_file() and json.loads(path.read_text()).get("key") == key:
        return json.loads(path.read_text())["metrics"]
    say(f"evaluating {name} at {protocol.resolution}^2")
    report = evaluate(
        EvalSets(real, generated, real_label=str(real.root)),
        protocol,
        models,
        seeds=[cfg.evaluation.seed],
        batch_size=cfg.evaluation.batch_size,
    )
    metrics = {k: v for k, v in report.items() if v is None or isinstance(v, int | float)}
    metrics["notes"] = report["notes"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "metrics": metrics}, indent=1))
    return metrics


def shown(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def table_rows(cfg: Table1Config, results: dict, dataset: str) -> list[dict]:
    backend = cfg.evaluation.fad_backends[0]
    paper = PAPER.get(dataset, {})
    rows = []
    for section, name, resolution in layout(cfg.evaluation.resolutions):
        metrics = results[(name, resolution or cfg.evaluation.resolutions[0])]
        values = {
            "fvd": metrics.get("fvd"),
            "kvd": metrics.get("kvd"),
            "fad": metrics.get(f"fad_{backend}"),
        }
        rows.append(
            {
                "section": section,
                "method": METHODS[name],
                "resolution": f"{resolution}^2" if resolution else "-",
                "sampler": "-" if name == "gt" else SAMPLER_NAMES[cfg.sampling.sampler],
                **{m: values[m] if m in METRICS[name] else None for m in ("fvd", "kvd", "fad")},
                "paper": paper.get((name, resolution)),
                "clips": f"{metrics.get('generated_clips')} vs {metrics.get('real_clips')}",
            }
        )
    return rows


def markdown(cfg: Table1Config, rows: list[dict], dataset: str) -> str:
    backend = BACKENDS[cfg.evaluation.fad_backends[0]]
    has_paper = any(row["paper"] for row in rows)
    header = ["Method", "Resolution", "Sampler", "FVD", "KVD", f"FAD ({cfg.evaluation.fad_backends[0]})"]
    header += ["paper FVD / KVD / FAD"] if has_paper else []
    header += ["clips (generated vs real)"]
    lines = [
        f"## Table 1 layout: {dataset}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    section = ""
    for row in rows:
        if row["section"] != section:
            section = row["section"]
            lines.append(f"| *{section}* |" + " |" * (len(header) - 1))
        cells = [
            row["method"],
            row["resolution"],
            row["sampler"],
            *(shown(row[m]) for m in ("fvd", "kvd", "fad")),
        ]
        if has_paper:
            cells.append(" / ".join(shown(v) for v in row["paper"]) if row["paper"] else "")
        cells.append(row["clips"])
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Ground truth: a second seeded draw of real windows against the real draw. KVD is unscaled "
        "(docs/design.md#evaluation). Frames are letterboxed to the row's resolution before I3D.",
    ]
    if not backend.comparable:
        lines.append(f"FAD: {backend.label}.")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "section",
                "method",
                "resolution",
                "sampler",
                "fvd",
                "kvd",
                "fad",
                "paper_fvd",
                "paper_kvd",
                "paper_fad",
            ]
        )
        for row in rows:
            paper = row["paper"] or (None, None, None)
            writer.writerow(
                [row["section"], row["method"], row["resolution"], row["sampler"]]
                + ["" if v is None else v for v in (row["fvd"], row["kvd"], row["fad"], *paper)]
            )


# ---------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------


def run_table1(cfg: Table1Config, dataset: DatasetConfig) -> dict:
    cfg.validate()
    cfg.resolve(dataset.name)
    started = time.perf_counter()
    out = Path(cfg.out)
    data = [f"dataset={dataset.name}", f"data_root={dataset.data_root}"]  # for every stage
    real_root = Path(dataset.data_root)

    find_or_train(cfg.ae_run, "train_ae", [*data, *cfg.train_ae], train_ae_from_config)
    dit_overrides = [*data, f"ae_run={cfg.ae_run}", *cfg.train_dit]
    checkpoints = {
        "joint": find_or_train(cfg.dit_run, "train_dit", dit_overrides, train_dit_from_config),
        "video": find_or_train(
            cfg.dit_video_run, "train_dit", [*dit_overrides, "dit.modalities=[video]"], train_dit_from_config
        ),
        "audio": find_or_train(
            cfg.dit_audio_run, "train_dit", [*dit_overrides, "dit.modalities=[audio]"], train_dit_from_config
        ),
    }
    samples = out / "samples"
    keys = {
        task: sample_task(checkpoints["joint"], task, samples / task, cfg.sampling)
        for task in ("svg", "a2v", "v2a")
    }
    keys["video"] = sample_task(checkpoints["video"], Task.svg, samples / "video", cfg.sampling)
    audio_key = sample_task(checkpoints["audio"], Task.svg, samples / "audio", cfg.sampling)
    sounds_as_videos(
        samples / "audio",
        samples / "audio_mp4",
        dataset.fps,
        dataset.num_frames,
        dataset.mel.sample_rate,
        audio_key,
    )
    keys["audio"] = audio_key
    folders = {name: samples / name for name in ("svg", "a2v", "v2a", "video")} | {
        "audio": samples / "audio_mp4"
    }

    evaluation = cfg.evaluation
    protocols = {
        r: EvalProtocol(
            num_frames=dataset.num_frames,
            fps=dataset.fps,
            resolution=r,
            num_clips=evaluation.num_clips,
            fad_backends=tuple(evaluation.fad_backends),
            extensions=tuple(dataset.extensions),
        )
        for r in evaluation.resolutions
    }
    first = protocols[evaluation.resolutions[0]]
    real = scan_clip_source(real_root, first, every_window=True, role="real")
    say(
        f"real set: {len(real.windows)} windows of {real_root}; "
        f"loading I3D and FAD ({evaluation.fad_backends[0]})"
    )
    models = load_models(first, "cuda" if torch.cuda.is_available() else "cpu", evaluation.fad_weights)
    generated = {"gt": ground_truth(real, evaluation.num_clips, evaluation.seed)} | {
        name: scan_clip_source(folder, first, every_window=False, role="generated")
        for name, folder in folders.items()
    }
    results = {}
    for _, name, resolution in layout(evaluation.resolutions):
        protocol = protocols[resolution or evaluation.resolutions[0]]
        key = key_of(
            {
                "set": keys.get(name, "gt"),
                "real": real.fingerprint,
                "protocol": asdict(protocol),
                "evaluation": asdict(evaluation),
            }
        )
        results[(name, protocol.resolution)] = evaluate_set(
            name, generated[name], real, protocol, models, cfg, key
        )

    rows = table_rows(cfg, results, dataset.name)
    table = markdown(cfg, rows, dataset.name)
    (out / "table1.md").write_text(table)
    write_csv(out / "table1.csv", rows)
    (out / "table1.json").write_text(
        json.dumps(
            {
                "rows": rows,
                "runs": {name: str(path) for name, path in checkpoints.items()} | {"ae": cfg.ae_run},
                "config": asdict(cfg),
            },
            indent=1,
        )
    )
    return {"table": table, "rows": rows, "minutes": round((time.perf_counter() - started) / 60, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config-name", default="table1_paper", help="conf/<name>.yaml: table1_paper or table1_tiny"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (key=value) of that config")
    args = parser.parse_args(argv)
    register_schemas()  # the stages compose conf/ groups that start from their schemas
    with user_errors(PROGRAM, TrainingError, VAELoadError, LatentCacheError, EvaluationError):
        composed = compose(CONF_DIR, args.config_name, args.overrides)
        dataset = dataset_config_from(composed)
        own = {k: v for k, v in OmegaConf.to_container(composed).items() if k not in ("dataset", "data_root")}
        cfg = to_typed(Table1Config, own)
        result = run_table1(cfg, dataset)
    print(result["table"])
    out = Path(cfg.out)
    say(
        f"{len(result['rows'])} rows in {result['minutes']} min; wrote {out / 'table1.md'}, "
        f"{out / 'table1.csv'} and {out / 'table1.json'}"
    )
    print(
        json.dumps(
            {"table1": str(out / "table1.md"), "csv": str(out / "table1.csv"), "minutes": result["minutes"]}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
