"""python -m experiments.titans --experiment capacity|recall --preset quick|full [--field value ...]

Experiments of the Titans neural memory (issue 7).

* ``capacity``: store N random unit (k, v) pairs (d = 32) with fixed gates, no outer
  training, and read every stored key back; Hebbian linear attention vs the linear (L_M = 1)
  and deep (L_M = 2) memories, each with and without momentum and forgetting. Writes
  config.json, metrics.jsonl, figures/recall.png, figures/inner_loss.png and summary.md.
* ``recall``: train small models on a passkey (needle in noise) task and MQAR at length 256,
  evaluate them at 256 .. 2048; sliding-window and linear attention vs Titans LMM, MAC, MAG,
  MAL and the LMM ablations. Resumable; writes runs/, results.jsonl, summary.md and
  figures/recall.png.

Outputs go under the preset's ``out``.
"""

from __future__ import annotations

import argparse
import sys

from experiments.common.config import parse_config, print_summary
from experiments.common.trainer import use_host_devices
from experiments.titans import capacity, recall

# name -> (presets, run(config) -> rows)
EXPERIMENTS = {"capacity": (capacity.PRESETS, capacity.run_capacity),
               "recall": (recall.PRESETS, recall.run_recall)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chooser = argparse.ArgumentParser(add_help=False)
    chooser.add_argument("--experiment", choices=list(EXPERIMENTS), default="capacity")
    known, rest = chooser.parse_known_args(argv)
    presets, run = EXPERIMENTS[known.experiment]
    config = parse_config(presets, rest, description=__doc__)
    use_host_devices()  # before JAX starts: every core of a CPU (trainer docs)
    run(config)
    print_summary(config.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
