#!/usr/bin/env python
"""Gather the runs of a sweep into the paper's table for that study (markdown and CSV).

    python tools/collect_results.py outputs/sweeps/sensitivity-tiny      # Table 6 layout
    python tools/collect_results.py outputs/sweeps/ablation-aist         # Table 5 layout
    python tools/collect_results.py outputs/sweeps/scale-audioset        # Table 4 layout

A sweep folder is what `tools/train_ae.py -m +sweep=...` / `tools/train_dit.py -m +sweep=...`
writes: one folder per run (named from its overrides) with Hydra's .hydra/config.yaml and, when
the run finished, metrics.json (mmldm_ae.engine.sweeps). A run without metrics.json is listed as
failed, with the first line of its failed.txt when there is one, or as unfinished. Writes
<sweep>/results.md and <sweep>/results.csv and prints the markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from mmldm_ae.engine.sweeps import FAILED_FILE, RESULTS_FILE, STUDIES

# Paper Table 5 names each row by the component it removes, cumulatively from the full model down.
ABLATION_ROWS = {
    "7_adversarial": "MM-LDM",
    "6_vae_decoder": "Adversarial training loss",
    "5_semantic": "Finetune KL-VAE decoder",
    "4_class": "Semantic cross-modal feature",
    "3_pooling": "Learnable class embedding",
    "2_prompt": "Latent average pooling",
    "1_init": "Learnable modality prompt",
    "0_base": "Weight initialization",
}
CAPTIONS = {
    "sensitivity": "Table 6 layout: autoencoder reconstructions under each loss weighting (r = round trip).",
    "ablation": "Table 5 layout: each row removes the named component and every one above it "
    "(conf/ablation/ lists the components of each step).",
    "scale": "Table 4 layout: params and GFLOPs (multiply-accumulates of the linear layers, the paper's "
    "convention) of the DiT, FVD / KVD / FAD of its svg samples.",
}


@dataclass
class Run:
    folder: Path
    config: object  # the run's composed config (OmegaConf, interpolations resolved on access)
    choices: dict  # config group choices of the run (hydra.runtime.choices), e.g. {"dit": "S"}
    metrics: dict | None = None
    failure: str | None = None
    values: dict = field(default_factory=dict)

    def select(self, key: str):
        try:
            return OmegaConf.select(self.config, key)
        except Exception:  # an interpolation that only resolves inside Hydra (hydra:...)
            return None


class CollectError(ValueError):
    pass


def read_runs(sweep: Path) -> list[Run]:
    if not sweep.is_dir():
        raise CollectError(
            f"{sweep} is not a folder; give the sweep folder (hydra.sweep.dir, e.g. outputs/sweeps/"
            "sensitivity-tiny)"
        )
    runs = []
    for config_file in sorted(sweep.glob("*/.hydra/config.yaml")):
        folder = config_file.parent.parent
        hydra = OmegaConf.load(config_file.parent / "hydra.yaml")
        run = Run(folder, OmegaConf.load(config_file), dict(hydra.hydra.runtime.choices))
        results = folder / RESULTS_FILE
        if results.is_file():
            run.metrics = json.loads(results.read_text())["metrics"]
        elif (folder / FAILED_FILE).is_file():
            run.failure = (folder / FAILED_FILE).read_text().splitlines()[0]
        else:
            run.failure = "no metrics.json (unfinished, or evaluate.clips was 0)"
        runs.append(run)
    if not runs:
        raise CollectError(
            f"{sweep} holds no runs (no */.hydra/config.yaml): is it the folder of a Hydra multirun?"
        )
    return runs


def study_of(runs: list[Run]) -> str:
    studies = {run.select("experiment.study") for run in runs}
    if len(studies) != 1 or None in studies:
        raise CollectError(
            f"the runs name studies {sorted(map(str, studies))}; a sweep folder holds one study "
            f"(experiment.study, one of {STUDIES})"
        )
    return studies.pop()


def fad_key(runs: list[Run], prefix: str) -> str | None:
    """The metric name of the first FAD backend the runs report (e.g. rfad_aisfx)."""
    for run in runs:
        for key in run.metrics or {}:
            if key.startswith(f"{prefix}fad_"):
                return key
    return None


def table(study: str, runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the study's table; a failed run's metric cells say so."""
    prefix = "" if study == "scale" else "r"
    fad = fad_key(runs, prefix)
    metrics = [
        (f"{prefix}FVD", f"{prefix}fvd"),
        (f"{prefix}KVD", f"{prefix}kvd"),
        (f"{prefix}FAD ({fad.split('_', 1)[1]})" if fad else f"{prefix}FAD", fad),
    ]
    if study == "sensitivity":
        runs.sort(key=lambda r: (r.select("ae.w_kl"), -r.select("ae.w_cls")))
        header = ["#", "w_kl", "w_cls", "w_con", "Reso."]
        keys = [
            lambda i, r: str(i + 1),
            lambda i, r: f"{r.select('ae.w_kl'):g}",
            lambda i, r: f"{r.select('ae.w_cls'):g}",
            lambda i, r: f"{r.select('ae.w_con'):g}",
            lambda i, r: f"{r.select('evaluate.resolution')}^2",
        ]
    elif study == "ablation":
        order = list(ABLATION_ROWS)
        runs.sort(
            key=lambda r: (
                order.index(r.select("experiment.label")) if r.select("experiment.label") in order else 99
            )
        )
        header = ["Model", "step"]
        keys = [
            lambda i, r: ABLATION_ROWS.get(r.select("experiment.label"), "?"),
            lambda i, r: str(r.select("experiment.label")),
        ]
    else:
        runs.sort(key=lambda r: (r.metrics or {}).get("params") or 0)
        header = ["Model", "Params", "GFLOPs"]
        keys = [
            lambda i, r: f"MM-LDM-{r.choices.get('dit')}",
            lambda i, r: f"{r.metrics['params'] / 1e6:.2f}M" if r.metrics else "-",
            lambda i, r: f"{r.metrics['gmacs_linear']:.3g}" if r.metrics else "-",
        ]
    rows = []
    for index, run in enumerate(runs):
        cells = [key(index, run) for key in keys]
        for _, name in metrics:
            value = (run.metrics or {}).get(name) if name else None
            cells.append("failed" if run.metrics is None else "-" if value is None else f"{value:.4g}")
        rows.append(cells)
    return header + [label for label, _ in metrics], rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep", type=Path, help="the sweep folder (hydra.sweep.dir)")
    args = parser.parse_args()
    try:
        runs = read_runs(args.sweep)
        study = study_of(runs)
    except CollectError as error:
        print(f"collect_results: error: {error}", file=sys.stderr)
        return 2
    header, rows = table(study, runs)
    lines = [
        f"## {study}: {args.sweep}",
        "",
        CAPTIONS[study],
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    failed = [run for run in runs if run.metrics is None]
    if failed:
        lines += [""] + [f"- failed: `{run.folder.name}`: {run.failure}" for run in failed]
    markdown = "\n".join(lines) + "\n"
    (args.sweep / "results.md").write_text(markdown)
    with open(args.sweep / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*header, "run"])
        writer.writerows([*row, run.folder.name] for row, run in zip(rows, runs, strict=True))
    print(markdown)
    print(
        f"{len(runs)} runs ({len(failed)} failed); wrote {args.sweep / 'results.md'} and results.csv",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
