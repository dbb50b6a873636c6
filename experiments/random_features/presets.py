"""Presets of ``python -m experiments.random_features --check``.

* ``full``: the notes' sizes (M=400 heads, N=8 keys, d=8, n up to 3200).
* ``quick``: fewer heads and rows with the same criteria, for the test suite.
"""

from __future__ import annotations

from experiments.random_features.checks import CheckConfig

PRESETS: dict[str, CheckConfig] = {
    "full": CheckConfig(),
    "quick": CheckConfig(num_heads=200, num_test=1000, curve_sizes=(200, 400, 800, 1600),
                         keys_n=800, keys_heads=150, bias_n=800, peak_heads=20,
                         head_counts=(25, 50, 100, 200), heads_n=1600,
                         out="results/random_features/quick"),
}
