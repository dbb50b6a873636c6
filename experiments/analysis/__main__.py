"""python -m experiments.analysis --preset quick|full [--field value ...]

Train a small attention LM on needle copy and MQAR, then show the analysis papers' claims on
it with jattn.analysis: retrieval heads and masking them (P41), direct logit attribution,
activation patching and the two tasks' circuit overlap (P25, P32), sinks and ACT (P50), and
pruning context tokens by attention rank (P66, P40). Resumable; writes the run, results.json,
summary.md and figures/ under the preset's ``out``.
"""

from __future__ import annotations

import sys

from experiments.analysis.run import PRESETS, run_analysis
from experiments.common.config import parse_config, print_summary
from experiments.common.trainer import use_host_devices


def main(argv: list[str] | None = None) -> int:
    config = parse_config(PRESETS, argv, description=__doc__)
    use_host_devices()  # before JAX starts: every core of a CPU (trainer docs)
    run_analysis(config)
    print_summary(config.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
