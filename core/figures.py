"""PNG reports: written atomically, without matplotlib's version stamp, so a re-run gives identical bytes."""

from __future__ import annotations

from pathlib import Path

from core.io import atomic_path


def save_figure(figure, path: str | Path) -> None:
    """Save a matplotlib figure as PNG and close it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100, metadata={"Software": None})
    plt.close(figure)
