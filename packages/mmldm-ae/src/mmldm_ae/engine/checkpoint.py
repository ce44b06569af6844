"""Checkpoint folders of a run: finding them, RNG state, loading weights and EMA weights.

Layout of `<run_dir>/checkpoints/step_XXXXXXX/` (written by `mmldm_ae.engine.trainer.Trainer`):
    <module>.safetensors   weights of each trained module (and `ema.safetensors`)
    optimizers.pt          optimiser and grad-scaler states (tensors only: loads with weights_only=True)
    rng_<rank>.pt          python / numpy / torch / cuda RNG states of each process
    state.json             step, data position, counters, and the config the run was started with
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model
from torch import nn

log = logging.getLogger(__name__)


def rng_state() -> dict[str, torch.Tensor]:
    numpy_state = np.random.get_state()
    state = {
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
        "python_position": torch.tensor(random.getstate()[2] if random.getstate()[2] is not None else -1),
        "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_position": torch.tensor([numpy_state[2], numpy_state[3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor(numpy_state[4], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    position = int(state["python_position"])
    random.setstate((3, tuple(int(v) for v in state["python"]), None if position == -1 else position))
    pos, has_gauss = state["numpy_position"].tolist()
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            pos,
            has_gauss,
            float(state["numpy_gauss"]),
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first."""
    folder = run_dir / "checkpoints"
    found = [p for p in folder.glob("step_*") if (p / "state.json").is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def load_module_weights(module: nn.Module, checkpoint: Path, name: str) -> None:
    """Load `<checkpoint>/<name>.safetensors` into a module, naming the file when it is missing."""
    path = checkpoint / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint weights {path} do not exist: give the folder of a finished checkpoint"
        )
    load_model(module, str(path))


def resolve_checkpoint(run_or_checkpoint: str | Path, how_to_train: str) -> Path:
    """A checkpoint folder: the given one, or the newest finished one of a run_dir."""
    path = Path(run_or_checkpoint)
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist: give a run_dir or one of its checkpoints/step_* "
            f"folders ({how_to_train})"
        )
    if (path / "state.json").is_file():
        return path
    finished = checkpoint_dirs(path)
    if not finished:
        raise FileNotFoundError(
            f"{path} holds no finished checkpoint (checkpoints/step_*/state.json): {how_to_train}"
        )
    return finished[-1]


def load_ema_weights(module: nn.Module, checkpoint: Path) -> bool:
    """Copy the EMA weights of a checkpoint (stored in parameter order) into `module`; False when
    it has none.
    """
    path = checkpoint / "ema.safetensors"
    if not path.is_file():
        return False
    shadow = load_file(path)
    with torch.no_grad():
        for index, parameter in enumerate(module.parameters()):
            parameter.copy_(shadow[f"{index}"])
    return True


def describe_mismatch(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between two nested settings dicts, as 'key: saved -> current'."""
    differences = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        old, new = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(old, dict) and isinstance(new, dict):
            differences += describe_mismatch(old, new, f"{name}.")
        elif old != new:
            differences.append(f"{name}: {old!r} -> {new!r}")
    return differences
