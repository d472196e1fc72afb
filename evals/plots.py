"""The figures' common frame: matplotlib without a display, and the finish every chart shares
(title, legend, grid, tight layout, saved at one resolution, closed)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    import matplotlib.pyplot as plt

    return plt


def finish(fig, ax, path: Path, title: str, grid_axis: str = "both", legend_fontsize: int | None = 8) -> None:
    """Title, legend and grid on `ax`, then the figure saved to `path` and closed."""
    ax.set_title(title)
    ax.legend(fontsize=legend_fontsize)
    ax.grid(axis=grid_axis, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
