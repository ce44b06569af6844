"""Helpers for command-line entry points: one way to report a bad input and stop."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from mmldm_data.config import ConfigError
from mmldm_data.dataset import DatasetError
from mmldm_data.media import MediaError

# Errors whose message already says what is wrong and what to do: no traceback for these.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DatasetError, MediaError, FileNotFoundError)


@contextmanager
def user_errors(program: str, *more: type[BaseException]) -> Iterator[None]:
    """Turn the expected errors of a tool into `program: error: message` and exit status 2.

    In a Hydra multirun the error is re-raised after the message instead, so that Hydra records
    the failed job and goes on with the others.
    """
    try:
        yield
    except (*USER_ERRORS, *more) as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        if in_multirun():
            raise
        sys.exit(2)


def in_multirun() -> bool:
    """Whether this process runs jobs of a Hydra multirun (`-m`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def hydra_overrides() -> list[str]:
    """The command-line overrides of the running Hydra job ([] outside one)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def collate(items: list[dict]) -> dict:
    """Stack a list of dataset items into a batch, as the DataLoader's default collate does."""
    from torch.utils.data import default_collate

    return default_collate(items)
