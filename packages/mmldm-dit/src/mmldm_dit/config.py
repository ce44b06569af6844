"""Every config group of the project and its dataclass, registered with Hydra in one call.

Entry points call `register_schemas()` before composing (tools before `@hydra.main` or
`mmldm_data.config.compose`, the tests' conftest once per session): each preset under conf/<group>/
starts from `<group>/schema`, so it composes only once its dataclass is registered. Tools that
compose conf/data.yaml alone register the data groups only (`mmldm_data.config.register_schemas()`).
"""

from __future__ import annotations

from mmldm_ae.config import SCHEMAS as AE_SCHEMAS
from mmldm_data import config
from mmldm_dit.dit import DiTConfig
from mmldm_dit.sampling import DiTLossConfig

# Config group -> its dataclass: the data and autoencoder groups and this package's.
SCHEMAS: dict[str, type] = {**AE_SCHEMAS, "dit": DiTConfig, "dit_loss": DiTLossConfig}


def register_schemas() -> None:
    """Store every group's dataclass in Hydra's ConfigStore as `<group>/schema`."""
    config.register_schemas(SCHEMAS)
