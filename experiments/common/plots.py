"""Matplotlib helpers shared by the experiments (the Agg backend: files, no windows)."""

from __future__ import annotations

from pathlib import Path


def panels(count: int, *, width: float = 3.2, height: float = 3.0, sharey: bool = True):
    """(pyplot, figure, list of ``count`` axes in one row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, count, figsize=(width * count, height), sharey=sharey,
                             squeeze=False)
    return plt, fig, list(axes[0])


def save(plt, fig, path: Path) -> None:
    """Write the figure as a PNG (creating its folder) and close it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
