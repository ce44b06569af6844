"""Checkpoint folders of a run: writing them atomically, finding the newest valid one, RNG state,
loading weights and EMA weights.

Layout of `<run_dir>/checkpoints/step_XXXXXXX/` (written by `mmldm_ae.engine.trainer.Trainer`):
    <module>.safetensors   weights of each trained module (and `ema.safetensors`, keyed by parameter name)
    optimizers.pt          optimiser and grad-scaler states (tensors only: loads with weights_only=True)
    rng_<rank>.pt          python / numpy / torch / cuda RNG states of each process
    state.json             step, data position, counters, run id, whether it is the run's final
                           checkpoint, and the config the run was started with
    manifest.json          size and SHA-256 of every other file, written last
A checkpoint is written as `step_XXXXXXX.partial/`, every file fsynced, then renamed: a folder
with the final name is complete, and its manifest tells whether a file was truncated or altered
since. Readers verify it and fall back to the newest checkpoint that passes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
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


MANIFEST = "manifest.json"
_STEP_FOLDER = re.compile(r"step_(\d+)")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run (named step_<digits>; `.partial` ones never), oldest first.
    They are not verified: `newest_valid_checkpoint` does that."""
    folder = Path(run_dir) / "checkpoints"
    found = (
        [p for p in folder.iterdir() if p.is_dir() and _STEP_FOLDER.fullmatch(p.name)]
        if folder.is_dir()
        else []
    )
    return sorted(found, key=lambda p: int(_STEP_FOLDER.fullmatch(p.name).group(1)))


def _sync_and_digest(path: Path) -> dict[str, int | str]:
    """fsync a written file and return its size and SHA-256 (one read)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 24), b""):
            digest.update(chunk)
        os.fsync(file.fileno())
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publish_checkpoint(partial: Path, folder: Path) -> None:
    """Turn a fully written `partial` folder into the checkpoint `folder`: every file fsynced and
    listed in manifest.json (written and fsynced last), then one rename, itself made durable."""
    files = {p.name: _sync_and_digest(p) for p in sorted(partial.iterdir()) if p.name != MANIFEST}
    (partial / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
    _sync_and_digest(partial / MANIFEST)
    _fsync_dir(partial)
    # Only an invalid folder of the same step can be here (a valid one is never saved twice).
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    _fsync_dir(folder.parent)


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a usable checkpoint (a file missing, truncated or not matching its
    checksum), or None when it is."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        if (folder / "state.json").is_file():
            log.warning("%s was written before checkpoints had checksums: it is loaded unverified", folder)
            return None
        return f"it has no {MANIFEST} (its save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as error:
        return f"its {MANIFEST} cannot be read ({error})"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes instead of {expected['bytes']} (truncated)"
    for name, expected in files.items():
        if _sync_and_digest(folder / name)["sha256"] != expected["sha256"]:
            return f"{name} does not match its checksum (corrupted)"
    return None


def newest_valid_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of a run that passes `checkpoint_problem`, with a warning for each newer
    one skipped and for each unfinished save; None when there is none."""
    for partial in sorted((Path(run_dir) / "checkpoints").glob("step_*.partial")):
        log.warning("ignoring %s: a checkpoint save that did not finish", partial)
    for folder in reversed(checkpoint_dirs(run_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        log.warning("skipping checkpoint %s: %s; trying the one before it", folder, problem)
    return None


def load_module_weights(module: nn.Module, checkpoint: Path, name: str) -> None:
    """Load `<checkpoint>/<name>.safetensors` into a module, naming the file when it is missing."""
    path = checkpoint / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint weights {path} do not exist: give the folder of a finished checkpoint"
        )
    load_model(module, str(path))


def resolve_checkpoint(run_or_checkpoint: str | Path, how_to_train: str) -> Path:
    """A verified checkpoint folder: the given one, or the newest valid one of a run_dir."""
    path = Path(run_or_checkpoint)
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist: give a run_dir or one of its checkpoints/step_* "
            f"folders ({how_to_train})"
        )
    if (path / MANIFEST).is_file() or (path / "state.json").is_file() or _STEP_FOLDER.fullmatch(path.name):
        problem = checkpoint_problem(path)
        if problem:
            raise FileNotFoundError(
                f"checkpoint {path} cannot be used: {problem}. Give its run_dir to take the newest "
                "valid checkpoint, or another checkpoints/step_* folder"
            )
        return path
    newest = newest_valid_checkpoint(path)
    if newest is None:
        raise FileNotFoundError(f"{path} holds no valid checkpoint (checkpoints/step_*): {how_to_train}")
    return newest


def ema_state_dict(module: nn.Module, shadow_params: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """EMA shadows (in `module.parameters()` order, as EMAModel keeps them) keyed by parameter name,
    so that a reordered or renamed module fails to load instead of loading the wrong tensors."""
    names = [name for name, _ in module.named_parameters()]
    if len(names) != len(shadow_params):
        raise ValueError(f"{len(shadow_params)} EMA shadows for a module of {len(names)} parameters")
    return {name: p.detach().contiguous() for name, p in zip(names, shadow_params, strict=True)}


def read_ema_weights(module: nn.Module, checkpoint: Path) -> list[torch.Tensor] | None:
    """The EMA weights of a checkpoint in `module.parameters()` order; None when it has none.

    Checkpoints written before EMA weights were keyed by name hold keys "0", "1", ...: they are
    read in parameter order. Names missing from (or unknown to) the module are an error.
    """
    path = checkpoint / "ema.safetensors"
    if not path.is_file():
        return None
    shadow = load_file(path)
    names = [name for name, _ in module.named_parameters()]
    if all(key.isdigit() for key in shadow):
        names = [f"{index}" for index in range(len(names))]
    missing, unexpected = sorted(set(names) - set(shadow)), sorted(set(shadow) - set(names))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]} "
            f"({len(missing)} / {len(unexpected)} names)"
        )
    return [shadow[name] for name in names]


def load_ema_weights(module: nn.Module, checkpoint: Path) -> bool:
    """Copy the EMA weights of a checkpoint into `module`; False when it has none."""
    weights = read_ema_weights(module, checkpoint)
    if weights is None:
        return False
    with torch.no_grad():
        for parameter, weight in zip(module.parameters(), weights, strict=True):
            parameter.copy_(weight)
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
