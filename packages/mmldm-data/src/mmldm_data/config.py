"""Typed configuration objects and the one bridge from Hydra/OmegaConf nodes to them.

Hydra composes YAML groups under `conf/`; code below the entry points only ever sees the plain
dataclasses defined in the packages. The dataclasses are the schema: `register_schemas` stores each
as the option `schema` of its group, every YAML preset starts from it (`defaults: [schema, _self_]`)
and holds only what differs from the dataclass defaults. `to_typed` validates a node against its
dataclass, so a misspelt key fails at start-up with a message naming it, before any model or index
is built.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mmldm_data.audio import MelConfig

T = TypeVar("T")

FRAME_MODES = ("letterbox", "center_crop")
CLASS_SOURCES = ("folder", "label_file", "pattern", "none")
SPLITS = ("all", "train", "val")


class ConfigError(ValueError):
    """A configuration value is missing, misspelt or out of range."""

    @classmethod
    def raise_if_any(cls, problems: list[str], title: str) -> None:
        """One error listing every problem found, so that a user fixes them all in one go."""
        if problems:
            raise cls(f"{title}:\n  " + "\n  ".join(problems))


@dataclass
class DatasetConfig:
    """A folder of sounding videos cut into fixed-length windows (docs/design.md#data)."""

    name: str = "synthetic"
    data_root: str = "data/synthetic"
    fps: float = 10.0
    num_frames: int = 16  # frames per window: 16 @ 10 fps = 1.6 s
    window_stride: int = 1  # in frames at `fps`
    key_frame_indices: list[int] = field(default_factory=lambda: [0, 5, 10, 15])
    num_target_frames: int = 2  # frames the signal decoder learns to reconstruct per clip
    resolution: int = 256
    frame_mode: str = "letterbox"
    # Horizontal flips of a clip's frames (never its sound), drawn per item from (seed, epoch, index).
    # The presets hold the authors' 0.5 of stages 0 and 1; the generator trains on unflipped clips
    # (conf/train_dit.yaml); a VAE-latent cache built with flips stores both orientations.
    flip_p: float = 0.0
    # The autoencoder's KL weight on this dataset (paper section 4.1: 1e-9 Landscape, 1e-8 AIST++);
    # conf/train_ae.yaml passes it to ae.w_kl.
    ae_w_kl: float = 1e-8
    mel: MelConfig = field(default_factory=MelConfig)
    # Classes come from the first-level folder, a CSV/JSON label file, a regular expression over
    # the file name (its first group is the class, e.g. AIST++ music ids), or not at all.
    class_source: str = "folder"
    label_file: str | None = None
    class_pattern: str | None = None
    num_classes: int | None = None  # expected count; a mismatch is reported, not fatal
    # Held-out split by source file (windows of one video never straddle the split).
    split: str = "all"
    val_fraction: float = 0.0
    split_seed: int = 0
    extensions: list[str] = field(
        default_factory=lambda: [".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".flv", ".mpg", ".mpeg"]
    )
    # Where the file index is cached; None: `<data_root>/.mmldm_cache`, or ~/.cache/mmldm when
    # the data folder is read-only.
    cache_dir: str | None = None
    # Decode each file once and keep its frames and sound in memory (each DataLoader worker its own
    # copy): for small sets read many times, e.g. 60 MB per 100 synthetic clips (3.2 s at 64^2).
    keep_decoded: bool = False
    index_workers: int = 0  # processes used to verify files while indexing (0: in-process)
    seed: int = 0  # target-frame and flip draws are a pure function of (seed, epoch, item)

    @property
    def clip_seconds(self) -> float:
        return self.num_frames / self.fps

    @property
    def clip_samples(self) -> int:
        return round(self.clip_seconds * self.mel.sample_rate)

    def validate(self) -> None:
        problems = []
        if self.fps <= 0:
            problems.append(f"dataset.fps must be > 0, got {self.fps}")
        if self.num_frames < 1:
            problems.append(f"dataset.num_frames must be >= 1, got {self.num_frames}")
        if self.window_stride < 1:
            problems.append(f"dataset.window_stride must be >= 1, got {self.window_stride}")
        bad_keys = [i for i in self.key_frame_indices if not 0 <= i < self.num_frames]
        if bad_keys:
            problems.append(f"dataset.key_frame_indices {bad_keys} lie outside 0..{self.num_frames - 1}")
        if not 1 <= self.num_target_frames <= self.num_frames:
            problems.append(f"dataset.num_target_frames must be in 1..{self.num_frames}")
        if self.resolution < 8:
            problems.append(f"dataset.resolution must be >= 8, got {self.resolution}")
        if self.frame_mode not in FRAME_MODES:
            problems.append(f"dataset.frame_mode must be one of {FRAME_MODES}, got {self.frame_mode!r}")
        if self.class_source not in CLASS_SOURCES:
            problems.append(f"dataset.class_source must be one of {CLASS_SOURCES}, got {self.class_source!r}")
        if self.class_source == "label_file" and not self.label_file:
            problems.append("dataset.class_source=label_file needs dataset.label_file=PATH (CSV or JSON)")
        if self.class_source == "pattern":
            try:
                if re.compile(self.class_pattern or "").groups < 1:
                    problems.append("dataset.class_pattern needs one group (...) that captures the class")
            except re.error as error:
                problems.append(f"dataset.class_pattern {self.class_pattern!r} is not a valid regex: {error}")
        if self.split not in SPLITS:
            problems.append(f"dataset.split must be one of {SPLITS}, got {self.split!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"dataset.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.split != "all" and self.val_fraction == 0.0:
            problems.append(f"dataset.split={self.split} needs dataset.val_fraction > 0")
        if not 0.0 <= self.flip_p <= 1.0:
            problems.append(f"dataset.flip_p must be in [0, 1], got {self.flip_p}")
        if self.ae_w_kl < 0:
            problems.append(f"dataset.ae_w_kl must be >= 0, got {self.ae_w_kl}")
        ConfigError.raise_if_any(problems, "invalid dataset config")


# Config group -> its dataclass, for the groups of this package (the packages above add theirs).
SCHEMAS: dict[str, type] = {"dataset": DatasetConfig, "mel": MelConfig}


def register_schemas(schemas: Mapping[str, type] = SCHEMAS) -> None:
    """Store each group's dataclass in Hydra's ConfigStore as `<group>/schema`, before composing."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group, schema in schemas.items():
        store.store(group=group, name="schema", node=_schema_node(schema))


def to_typed(schema: type[T], node: Mapping[str, Any] | DictConfig | None) -> T:
    """Validate `node` against the dataclass `schema` and return an instance of it.

    Unknown keys and values of the wrong type raise ConfigError naming the key.
    """
    structured = _schema_node(schema)
    try:
        if isinstance(node, DictConfig):  # resolve ${...} against the whole composed config
            node = OmegaConf.to_container(node, resolve=True)
        merged = OmegaConf.merge(structured, node or {})
        typed = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        first_line = str(error).splitlines()[0]
        key = getattr(error, "full_key", None)
        where = f" (key: {key})" if key else ""
        raise ConfigError(f"{schema.__name__}: {first_line}{where}") from None
    validate = getattr(typed, "validate", None)
    if callable(validate):
        validate()
    return typed


def to_plain_dict(obj: Any) -> dict[str, Any]:
    """A dataclass config as plain builtins, for hashing, logging and checkpoints."""
    return dataclasses.asdict(obj)


def _schema_node(schema: type) -> DictConfig:
    """The structured node of a dataclass, writable: frozen (nested) dataclasses would otherwise
    refuse every merge and override."""
    node = OmegaConf.structured(schema)
    _make_writable(node)
    return node


def _make_writable(node: DictConfig) -> None:
    node._set_flag("readonly", False)
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _make_writable(child)


def compose(config_dir: str | os.PathLike, config_name: str | None, overrides: list[str]) -> DictConfig:
    """Compose a Hydra config outside `@hydra.main`, turning Hydra's errors into ConfigError.

    Used by command-line tools that take `key=value` overrides but no multirun, after
    `register_schemas`.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as error:
        # A value that does not fit its schema: Hydra's message names the override, its cause says why.
        why = f" ({str(error.__cause__).splitlines()[0]})" if error.__cause__ else ""
        raise ConfigError(f"cannot compose config {config_name!r} with {overrides}: {error}{why}") from None


def preset(config_dir: str | os.PathLike, group: str, name: str, **overrides: Any) -> Any:
    """The typed dataclass of preset `name` of a config group (conf/<group>/<name>.yaml), with some
    fields replaced (a nested dataclass's by a dict of its fields). Needs the group's schema registered."""
    node = compose(config_dir, None, [f"+{group}={name}"])[group]
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        raise ConfigError(f"config group {group!r} has no schema: call register_schemas() before composing")
    return to_typed(schema, OmegaConf.merge(OmegaConf.to_container(node), overrides))


def dataset_config_from(cfg: DictConfig) -> DatasetConfig:
    """The typed dataset config of a composed root config, honouring the `data_root=` shorthand."""
    node = OmegaConf.to_container(cfg.dataset, resolve=True)
    if cfg.get("data_root"):
        node["data_root"] = str(cfg.data_root)
    return to_typed(DatasetConfig, node)
