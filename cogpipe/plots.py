"""The reports' plots, drawn one way: a figure on the Agg canvas, saved atomically.

What is notable:
- No pyplot: a `Figure` with its own Agg canvas holds no global state, needs no close,
  and draws the same in a worker thread, a subprocess or a headless server.
- Every count axis ticks on integers (`count_axis`): 0, 1, 2 clips, never 0.5 of one.
- Histograms of several groups put the groups' bars side by side in each bin, with a
  legend, so they never read as stacked (`histogram`).
- Sizes read as `128x96`, not `128.0x96.0` (`dims`): a table read back with a missing
  value stores its widths and heights as floats.

Used by `cogpipe.report` (check and filter reports) and `cogpipe.eval_report`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cogpipe.video import even_indices
from cogpipe.workspace import atomic_path

DPI = 100
MAX_BINS = 30
FEW_VALUES = 8  # distinct values a histogram shows as bars on the values themselves


def figure(width: float, height: float):
    """A matplotlib figure on the Agg canvas (no pyplot: nothing global, nothing to close)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")  # legends, labels fit
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: Path) -> str:
    """Write `fig` as a PNG at `path` (atomically); return the file's name."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path.name


def count_axis(axis) -> None:
    """Ticks on whole numbers only: the axis counts clips, captions or steps."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def frame_strip(frames: np.ndarray, count: int, width: int) -> np.ndarray:
    """[F, H, W, 3] -> [h, count * w, 3]: `count` frames spread over the video, side by side,
    each at most `width` pixels wide (never upscaled): a contact sheet's or a grid's row."""
    from PIL import Image

    f, h, w, _ = frames.shape
    tw = min(width, w)
    th = max(round(h * tw / w), 1)
    picks = [Image.fromarray(frames[i]).resize((tw, th)) for i in even_indices(0, f, count)]
    return np.concatenate([np.asarray(p) for p in picks], axis=1)


def dims(width: float, height: float) -> str:
    """`128x96`: a frame size as whole pixels, whatever the column's dtype."""
    return f"{int(round(float(width)))}x{int(round(float(height)))}"


def bin_edges(values: np.ndarray) -> np.ndarray:
    """Shared bin edges for every group: 5 to 30 bins, about 3 values per bin; whole-number
    data (words, frames) gets bins one unit wide or wider, centred on the integers."""
    bins = min(MAX_BINS, max(5, len(values) // 3))
    lo, hi = float(values.min()), float(values.max())
    if np.allclose(values, np.round(values)):  # counts: edges at half-integers
        width = max(1, int(np.ceil((hi - lo + 1) / bins)))
        return np.arange(lo - 0.5, hi + width + 0.5, width)
    return np.histogram_bin_edges(values, bins=bins)


def _grouped_bars(ax, shown: dict[str, np.ndarray], values: np.ndarray) -> None:
    """Few distinct values (every demo clip lasts 3.0 s): one bar per group at each value,
    side by side around it, and a tick on each value, instead of bins that would place a
    group's bar beside the value rather than on it."""
    gap = float(np.diff(values).min()) if len(values) > 1 else 1.0
    width = 0.8 * gap / len(shown)
    for i, (label, v) in enumerate(shown.items()):
        counts = [int(np.isclose(v, x).sum()) for x in values]
        ax.bar(values + (i - (len(shown) - 1) / 2) * width, counts, width, label=label)
    ax.set_xticks(values, [f"{x:g}" for x in values])
    ax.set_xlim(values[0] - gap, values[-1] + gap)  # one value: its bars fill 40%, not all


def histogram(path: Path, groups: dict[str, np.ndarray], xlabel: str, title: str) -> str:
    """Histograms of several groups side by side in each bin (never stacked), with a legend
    that gives each group's size; return the PNG's name."""
    fig = figure(6, 3.2)
    ax = fig.subplots()
    shown = {f"{label} ({len(v)})": np.asarray(v, float) for label, v in groups.items() if len(v)}
    if shown:
        values = np.concatenate(list(shown.values()))
        distinct = np.unique(values)
        if len(distinct) <= FEW_VALUES:
            _grouped_bars(ax, shown, distinct)
        else:
            ax.hist(list(shown.values()), bins=bin_edges(values), label=list(shown), rwidth=0.9)
        ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    count_axis(ax.yaxis)
    ax.set_title(title)
    return save(fig, path)


def hbars(path: Path, counts: pd.Series, title: str) -> str:
    """Horizontal bars of counts (largest on top), each labelled with its number."""
    counts = counts.sort_values()
    fig = figure(7, 0.4 * len(counts) + 1.2)
    ax = fig.subplots()
    bars = ax.barh([str(label)[:60] for label in counts.index], counts.to_numpy())
    ax.bar_label(bars, padding=2)
    ax.set_xlabel("count")
    count_axis(ax.xaxis)
    ax.margins(x=0.08)  # room for the labels
    ax.set_title(title)
    return save(fig, path)


def sizes(path: Path, videos: pd.DataFrame, title: str) -> str:
    """Frame sizes as points (area by number of videos), each labelled `WxH (n)`."""
    fig = figure(5, 4)
    ax = fig.subplots()
    counts = videos.groupby(["width", "height"]).size()
    if len(counts):
        w, h = (np.array(a, float) for a in zip(*counts.index, strict=True))
        ax.scatter(w, h, s=20 + 80 * counts.to_numpy() / counts.max(), alpha=0.7)
        for x, y, n in zip(w, h, counts.to_numpy(), strict=True):
            ax.annotate(
                f"{dims(x, y)} ({n})", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8
            )
        ax.margins(0.25)  # the labels stay inside
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    count_axis(ax.xaxis)
    count_axis(ax.yaxis)
    ax.set_title(title)
    return save(fig, path)
