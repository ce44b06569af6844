#!/usr/bin/env python
"""Parameters and forward FLOPs of every DiT size of conf/dit/, for one sample (batch 1, full sequence).

    python tools/model_card.py

Models are built on the meta device (no weights are allocated, so L and XL cost nothing) and
FLOPs are counted by torch.utils.flop_counter.FlopCounterMode: 2 FLOPs per multiply-accumulate,
attention included. The paper's Table 4 "FLOPS" (34G / 101G / 407G) are multiply-accumulates of
the linear layers only, given here as "GMACs linear" for comparison. The last line is one JSON
object: {"S": {"params": ..., "gflops": ..., "gmacs_linear": ...}, ...}.
"""

from __future__ import annotations

import json
from pathlib import Path

from mmldm_data.config import preset
from mmldm_dit.config import register_schemas
from mmldm_dit.dit import model_card

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# Paper Table 4: parameters and FLOPS (GMACs) of MM-LDM-S/B/L.
PAPER_TABLE_4 = {"S": (131e6, 34), "B": (384e6, 101), "L": (1543e6, 407)}


def main() -> None:
    register_schemas()
    sizes = sorted(path.stem for path in (CONF_DIR / "dit").glob("*.yaml"))
    names = [*PAPER_TABLE_4, *(name for name in sizes if name not in PAPER_TABLE_4)]  # Table 4's first
    cards = {name: model_card(preset(CONF_DIR, "dit", name)) for name in names}
    header = f"{'preset':<7}{'width/depth/heads':>19}{'tokens':>8}{'params':>16}{'paper':>9}{'diff':>8}"
    header += f"{'GFLOPs':>10}{'GMACs linear':>14}{'paper':>7}"
    print(header)
    print("-" * len(header))
    for name, card in cards.items():
        paper_params, paper_gmacs = PAPER_TABLE_4.get(name, (None, None))
        paper = f"{paper_params / 1e6:.0f}M" if paper_params else "-"
        diff = f"{100 * (card['params'] / paper_params - 1):+.2f}%" if paper_params else "-"
        print(
            f"{name:<7}{card['width/depth/heads']:>19}{card['tokens']:>8}{card['params']:>16,}{paper:>9}{diff:>8}"
            f"{card['gflops']:>10.2f}{card['gmacs_linear']:>14.2f}{paper_gmacs or '-':>7}"
        )
    print(
        json.dumps(
            {
                name: {key: card[key] for key in ("params", "gflops", "gmacs_linear")}
                for name, card in cards.items()
            }
        )
    )


if __name__ == "__main__":
    main()
