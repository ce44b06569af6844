#!/usr/bin/env python
"""`make demo` and `make synth-bench`: the whole method on CPU, from synthetic data to evaluated samples.

    python tools/demo.py                              # conf/demo.yaml: about 15 minutes, outputs/demo/
    python tools/demo.py --config-name synth_bench    # conf/synth_bench.yaml: longer training, the quality table
    python tools/demo.py "train_ae=[train.max_steps=50]"    # any key of the config can be overridden

Makes the synthetic training and held-out clips, trains the tiny KL-VAE, autoencoder, DiT and
long-generation DiT, samples svg / a2v / v2a / long, evaluates them beside real and corrupted
references, and writes <out>/report.md, <out>/metrics.json, <out>/samples/contact_sheet.png and
the mp4s. Running it again reuses every stage whose settings are unchanged (mmldm_dit.end_to_end).
Ends with the quality table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from mmldm_ae.engine.latent_cache import LatentCacheError
from mmldm_ae.engine.trainer import TrainingError
from mmldm_ae.vae import VAELoadError
from mmldm_data.cli import user_errors
from mmldm_data.config import compose, to_typed
from mmldm_data.metrics.evaluate import EvaluationError
from mmldm_dit.end_to_end import EndToEndConfig, run_end_to_end

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-name", default="demo", help="conf/<name>.yaml: demo or synth_bench")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (key=value) of that config")
    args = parser.parse_args()
    with user_errors("demo", TrainingError, VAELoadError, LatentCacheError, EvaluationError):
        cfg = compose(CONF_DIR, args.config_name, args.overrides)
        config = to_typed(EndToEndConfig, OmegaConf.to_container(cfg, resolve=True))
        metrics = run_end_to_end(config, CONF_DIR)
    out = Path(config.out)
    print(f"\n{metrics['table']}", file=sys.stderr)
    print(f"{config.title} finished in {metrics['minutes']} min\n"
          f"  report        : {out / 'report.md'}\n"
          f"  contact sheet : {out / 'samples' / 'contact_sheet.png'}\n"
          f"  samples       : {out / 'samples'}/{{svg,a2v,v2a,long}}/*.mp4 (with sound)\n"
          f"  metrics       : {out / 'metrics.json'}", file=sys.stderr)
    print(json.dumps({"out": str(out), "minutes": metrics["minutes"],
                      "quality": {row["label"]: row["value"] for row in metrics["quality"]}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
