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
    """Turn the expected errors of a tool into `program: error: message` and exit status 2."""
    try:
        yield
    except (*USER_ERRORS, *more) as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        sys.exit(2)


def collate(items: list[dict]) -> dict:
    """Stack a list of dataset items into a batch, as the DataLoader's default collate does."""
    from torch.utils.data import default_collate

    return default_collate(items)
