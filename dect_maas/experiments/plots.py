"""What every report plot shares: a figure without a display, the accuracy band, the finish.

matplotlib is optional (``dect-maas[plots]``): without it (:func:`available`) the reports say the
plots were skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["accuracy_band", "available", "axes", "finish"]


def available() -> bool:
    """Whether matplotlib can be imported (it is, only when a report draws its plots)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        return False
    return True


def axes(width: float, height: float) -> tuple[Any, Any]:
    """A figure drawn off screen (Agg) and its one axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def accuracy_band(
    ax: Any,
    xs: Sequence[float],
    stats: npt.NDArray[np.float64],
    *,
    color: str,
    label: str,
    style: str = "-",
) -> None:
    """Mean accuracy per x (``stats[:, 0]``, %) as a line, ± one std (``stats[:, 1]``) as a band."""
    ax.plot(xs, stats[:, 0], style, marker="o", color=color, label=label)
    ax.fill_between(
        xs, stats[:, 0] - stats[:, 1], stats[:, 0] + stats[:, 1], alpha=0.2, color=color
    )


def finish(fig: Any, ax: Any, path: Path, *, title: str, xlabel: str, **title_kw: Any) -> Path:
    """Label the axes, add the grid and the legend (if anything is labelled); save at 120 dpi."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, **title_kw)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
