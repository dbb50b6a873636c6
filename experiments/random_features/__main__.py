"""python -m experiments.random_features --check [--preset full|quick] [--field value ...]

Runs the checks T1..T6 of the random-features lens (P63) on its attention layer, prints one
line per check (PASS/FAIL, the numbers, the criterion), writes summary.md, results.json and
``figures/*.png`` under ``out``, and exits with status 1 if any check fails.
"""

from __future__ import annotations

import sys

from experiments.common.config import parse_config
from experiments.random_features.checks import run
from experiments.random_features.presets import PRESETS


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--check" not in argv and not {"-h", "--help"} & set(argv):
        print(__doc__, file=sys.stderr)
        return 2
    if "--check" in argv:
        argv.remove("--check")
    checks = run(parse_config(PRESETS, argv, description=__doc__))
    return 0 if all(c.passed for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
