"""Matplotlib helpers shared by the experiments: figures drawn and written to files without
pyplot, so a script never opens a window and a notebook's backend is left as it is."""

from __future__ import annotations

from pathlib import Path


def panels(count: int, *, width: float = 3.2, height: float = 3.0, sharey: bool = True):
    """(figure, list of ``count`` axes in one row), a ``matplotlib.figure.Figure`` that no
    pyplot state holds (display it in a notebook by evaluating it)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * count, height))
    axes = fig.subplots(1, count, sharey=sharey, squeeze=False)
    return fig, list(axes[0])


def save(fig, path: Path) -> None:
    """Write the figure as a PNG (creating its folder)."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
