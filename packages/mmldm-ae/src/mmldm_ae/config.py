"""The config groups of the autoencoder stage and their dataclasses (see mmldm_data.config)."""

from __future__ import annotations

from mmldm_ae.autoencoder import AEConfig
from mmldm_ae.engine.logger import WandbConfig
from mmldm_ae.engine.trainer import TrainConfig
from mmldm_ae.vae import VAEConfig
from mmldm_data.config import SCHEMAS as DATA_SCHEMAS

# Config group -> its dataclass: the data groups and this package's.
SCHEMAS: dict[str, type] = {
    **DATA_SCHEMAS,
    "vae": VAEConfig,
    "ae": AEConfig,
    "train": TrainConfig,
    "wandb": WandbConfig,
}
