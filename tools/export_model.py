#!/usr/bin/env python
r"""Export trained DiT runs as one self-contained model folder (`MMLDMPipeline.from_pretrained`).

    python tools/export_model.py outputs/runs/dit-synthetic-tiny --out outputs/models/synthetic-tiny
    python tools/export_model.py outputs/demo/runs/dit --long outputs/demo/runs/dit_long \
        --out outputs/demo/model --wandb offline          # also a W&B artifact of type "model"

RUN is a tools/train_dit.py run (or one of its checkpoints/step_* folders); its state.json names
the autoencoder run, whose config names the VAE. The folder holds the DiT(s), the autoencoder and
the VAE (safetensors, EMA weights by parameter name), latent statistics, the clip / mel / vocoder
settings, the training configs, and a model card (README.md: data, steps, metrics, licences). It
points at nothing outside itself, so it can be moved or copied anywhere. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mmldm_ae.engine.logger import WandbConfig, WandbLogger
from mmldm_ae.vae import VAELoadError
from mmldm_data.cli import user_errors
from mmldm_dit.pipeline import export_model


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "run", help="a tools/train_dit.py run_dir (the one-clip or the long-generation model)"
    )
    parser.add_argument("--out", required=True, help="the model folder to write")
    parser.add_argument("--long", help="the long-generation run to put beside RUN (long, continuations)")
    parser.add_argument("--ae-run", help="the autoencoder run, when it moved since the DiT was trained")
    parser.add_argument("--no-ema", action="store_true", help="the trained weights instead of the EMA ones")
    parser.add_argument("--title", help="the model card's title")
    parser.add_argument("--metrics", help='a JSON file {"source": {"metric": value}} for the model card')
    parser.add_argument("--wandb", default="disabled", choices=("online", "offline", "disabled"))
    parser.add_argument("--wandb-project", default="mmldm-models")
    args = parser.parse_args()
    started = time.perf_counter()
    with user_errors("export_model", VAELoadError):
        metrics = json.loads(Path(args.metrics).read_text()) if args.metrics else None
        print(f"loading {args.run}" + (f" and {args.long}" if args.long else "") + " ...", file=sys.stderr)
        pipe = export_model(args.run, args.out, args.long, args.ae_run, not args.no_ema, args.title, metrics)
    out = Path(args.out)
    size = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    if args.wandb != "disabled":
        logger = WandbLogger(WandbConfig(mode=args.wandb, project=args.wandb_project), out, pipe.info)
        logger.log_model(out, out.name, {"tasks": list(pipe.tasks), **pipe.info["card"]["stages"]})
        logger.finish()
    print(
        f"exported {out} ({size / 1e6:.1f} MB, tasks {', '.join(pipe.tasks)}) in "
        f"{time.perf_counter() - started:.1f} s; model card {out / 'README.md'}",
        file=sys.stderr,
    )
    print(json.dumps({"out": str(out), "tasks": list(pipe.tasks), "megabytes": round(size / 1e6, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
