"""python -m experiments.zoology --preset quick|cpu|paper [--field value ...]

Trains the grid of the preset (resuming where it stopped) and writes results.jsonl,
summary.md, figures/figure2.png and figures/curves.png under its ``out`` directory. Mixers:
attention, sliding_window, base_conv, hyena, h3, mamba, rwkv (RWKV-4 time mixing), linear
(elu+1 linear attention), based (BaseConv + Based linear attention), sparse (BaseConv +
top-ceil(sqrt(L)) attention).
"""

from __future__ import annotations

import sys
from pathlib import Path

from experiments.common.config import parse_config
from experiments.common.trainer import initialize_distributed, use_host_devices
from experiments.zoology.presets import PRESETS
from experiments.zoology.sweep import sweep


def main(argv: list[str] | None = None) -> None:
    config = parse_config(PRESETS, argv, description=__doc__)
    use_host_devices()  # before JAX starts: every core of a CPU (trainer docs)
    initialize_distributed()
    sweep(config)
    out = Path(config.out)
    print((out / "summary.md").read_text())
    print(f"figure: {out / 'figures' / 'figure2.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
