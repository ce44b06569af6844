"""What a run of a sweep leaves for `tools/collect_results.py`: its final metrics, or why it failed.

Every training tool evaluates its run when asked (`evaluate.*` in its config) and writes
<run_dir>/metrics.json = {"study", "overrides", "metrics"}; a run that raised writes
<run_dir>/failed.txt instead. Runs of a Hydra multirun get their study from `experiment.study`
(set by conf/sweep/*) and their overrides from Hydra, so the results table needs nothing else.
"""

from __future__ import annotations

import json
import math
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmldm_ae.engine.logger import WandbConfig, WandbLogger
from mmldm_data.cli import hydra_overrides, in_multirun
from mmldm_data.config import ConfigError
from mmldm_data.evaluation import RESOLUTIONS, EvalProtocol

RESULTS_FILE = "metrics.json"
FAILED_FILE = "failed.txt"
STUDIES = ("sensitivity", "ablation", "scale")


@dataclass
class ExperimentConfig:
    study: str | None = None  # sensitivity | ablation | scale (conf/sweep/*); None outside sweeps
    label: str | None = None  # the row's name in the results table (e.g. an ablation step)

    def validate(self) -> None:
        if self.study is not None and self.study not in STUDIES:
            raise ConfigError(f"experiment.study must be one of {STUDIES} or null, got {self.study!r}")


# Keys that every row of a study sets itself, with what to pass instead: Hydra applies command-line
# values after the rows, so one of these on the command line would silently make all rows alike.
ROW_KEYS = {
    "ablation": {"ae.unet_init": "ablation_unet.sd=PATH (rows from 1_init start from it, 0_base never)"}
}


def check_sweep_overrides(experiment: ExperimentConfig, overrides: list[str]) -> None:
    """Refuse command-line values for keys that the rows of `experiment.study` decide."""
    row_keys = ROW_KEYS.get(experiment.study or "", {})
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key in row_keys:
            raise ConfigError(
                f"{key} is decided by each row of the {experiment.study} study and would override all "
                f"of them; pass {row_keys[key]} instead"
            )


@dataclass
class EvalPlan:
    """The evaluation a training tool runs after training (0 clips: none)."""

    clips: int = 0  # real windows round-tripped (autoencoder) or samples generated (DiT); the paper: 2048
    resolution: int = 64  # protocol resolution: frames letterboxed to 64^2 or 256^2
    fad_backends: list[str] = field(default_factory=lambda: ["aisfx"])
    seed: int = 0
    batch_size: int = 8

    def validate(self) -> None:
        if self.clips < 0 or self.clips == 1:
            raise ConfigError(
                f"evaluate.clips must be 0 (off) or >= 2 (FVD needs two clips), got {self.clips}"
            )
        if self.resolution not in RESOLUTIONS:
            raise ConfigError(f"evaluate.resolution must be one of {RESOLUTIONS}, got {self.resolution}")

    def protocol(self, fps: float, num_frames: int) -> EvalProtocol:
        return EvalProtocol(
            num_frames=num_frames,
            fps=fps,
            resolution=self.resolution,
            num_clips=self.clips,
            fad_backends=tuple(self.fad_backends),
        )


def finite(values: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe: NaN and infinities become None."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


def write_results(
    run_dir: Path,
    experiment: ExperimentConfig,
    metrics: dict[str, Any],
    wandb: WandbConfig | None = None,
    run_config: dict | None = None,
) -> Path:
    """<run_dir>/metrics.json, and the same numbers as the W&B run's summary (resumed by its id)."""
    run_dir = Path(run_dir)
    metrics = finite(metrics)
    path = run_dir / RESULTS_FILE
    path.write_text(
        json.dumps(
            {
                "study": experiment.study,
                "label": experiment.label,
                "overrides": hydra_overrides(),
                "metrics": metrics,
            },
            indent=1,
        )
    )
    (run_dir / FAILED_FILE).unlink(missing_ok=True)
    if wandb is not None and wandb.mode != "disabled":
        logger = WandbLogger(wandb, run_dir, run_config or {})
        logger.log_summary(metrics)
        logger.finish()
    return path


@contextmanager
def record_failure(run_dir: str | Path) -> Iterator[None]:
    """In a Hydra multirun, leave <run_dir>/failed.txt (the error and its traceback) when the body
    raises, for the results table; the error goes on either way."""
    try:
        yield
    except Exception as error:
        if in_multirun():
            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / FAILED_FILE).write_text(f"{type(error).__name__}: {error}\n\n{traceback.format_exc()}")
        raise
