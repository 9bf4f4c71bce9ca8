"""One figure writer for the probes and the red team: matplotlib without a display, PNGs written atomically."""
from __future__ import annotations

from pathlib import Path

from phf.core.io import atomic_path


def pyplot():
    """matplotlib's pyplot on the Agg backend (imported on first use: plotting is optional to most runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Lay the figure out, write it as a PNG atomically and close it."""
    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        pyplot().close(fig)
    return path
