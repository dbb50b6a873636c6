"""python -m experiments.long_context --preset quick|full [--field value ...]

Train a small attention LM on the passkey task at 256 tokens, then evaluate it at up to 64k
tokens with ring attention over 8 devices (simulated host devices on a CPU): accuracy,
forward time and per-device compiled memory at each length, one training step at the
longest, and what materialised attention would need there. Writes results.json, summary.md
and figures/ under the preset's ``out``.
"""

from __future__ import annotations

import sys

from experiments.common.config import parse_config, print_summary
from experiments.common.trainer import use_host_devices
from experiments.long_context.run import PRESETS, run_long_context


def main(argv: list[str] | None = None) -> int:
    config = parse_config(PRESETS, argv, description=__doc__)
    use_host_devices(config.devices)  # before JAX starts: the ring's devices on a CPU
    run_long_context(config)
    print_summary(config.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
