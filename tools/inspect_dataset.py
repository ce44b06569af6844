#!/usr/bin/env python
r"""Index a sounding-video folder and print what is usable, as one JSON line.

    python tools/inspect_dataset.py dataset=aist data_root=/data/AIST++
    python tools/inspect_dataset.py dataset=landscape data_root=/data/landscape \
        dataset.split=val dataset.val_fraction=0.1

stdout: {"clips": files used, "windows": training windows, "skipped": count,
         "skipped_reasons": {reason: count}, "skipped_files": [...], "classes": {name: windows}, ...}
Indexing progress and warnings go to stderr. The index is cached; a second run re-verifies only
files that changed.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from mmldm_data.config import ConfigError, compose, dataset_config_from, register_schemas
from mmldm_data.dataset import DatasetError, SoundingVideoDataset

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def main(overrides: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    register_schemas()  # conf/data.yaml composes the data groups only
    try:
        config = dataset_config_from(compose(CONF_DIR, "data", overrides))
        dataset = SoundingVideoDataset(config, progress=sys.stderr.isatty())
    except (ConfigError, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = dataset.summary.to_json()
    summary["dataset"] = config.name
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(__doc__)
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
