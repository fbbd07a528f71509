"""The dataset report: what each data stage kept and dropped, as PNG plots and markdown.

`check/<key>/report.md` covers ingest and check (counts and reasons, duration and
resolution distributions); `filter/<key>/report.md` adds the caption-length histogram.
Images are linked by file name, so the folder reads on its own; the Prefect task layer
publishes the same markdown as an artifact with the images inlined.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _hist(path: Path, groups: dict[str, np.ndarray], xlabel: str, title: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    values = [v for v in groups.values() if len(v)]
    if values:
        both = np.concatenate(values)
        bins = np.histogram_bin_edges(both, bins=min(30, max(5, len(both) // 3)))
        for label, v in groups.items():
            if len(v):
                ax.hist(v, bins=bins, alpha=0.7, label=f"{label} ({len(v)})")
        ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def _bars(path: Path, counts: pd.Series, title: str) -> str:
    plt = _plt()
    counts = counts.sort_values()
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(counts) + 1.2), dpi=100)
    ax.barh([label[:60] for label in counts.index], counts.to_numpy())
    ax.set_xlabel("count")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def _scatter(path: Path, videos: pd.DataFrame, title: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    sizes = videos.groupby(["width", "height"]).size()
    if len(sizes):
        w, h = zip(*sizes.index, strict=True)
        ax.scatter(w, h, s=20 + 80 * sizes.to_numpy() / sizes.max(), alpha=0.7)
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def _table(counts: pd.Series, what: str) -> list[str]:
    if not len(counts):
        return [f"No {what}.", ""]
    lines = [f"| {what} | count |", "|---|---:|"]
    lines += [f"| {str(k).replace('|', '/')} | {v} |" for k, v in counts.items()]
    return [*lines, ""]


def reason_kind(reason: str) -> str:
    """'near duplicate of X (path)' -> 'near duplicate': reasons grouped for counting."""
    first = str(reason).split("; ")[0]
    for sep in (" of ", " (", ": "):
        first = first.split(sep)[0]
    return first


def write_check_report(out: Path, manifest: pd.DataFrame, clips: pd.DataFrame) -> Path:
    """Write `report.md` and its PNGs into `out` (the check stage's folder)."""
    ok = manifest[manifest.status == "ok"]
    bad = manifest[manifest.status != "ok"]
    keep = clips.keep.astype(bool) if len(clips) else pd.Series(dtype=bool)
    lines = [
        "# Dataset report: ingest and check",
        "",
        f"- inputs: {len(manifest)} ({len(ok)} readable videos, {len(bad)} rejected)",
        f"- clips: {len(clips)} ({int(keep.sum())} kept, {int((~keep).sum())} rejected)",
    ]
    if len(clips):
        kept = clips[keep]
        lines += [
            f"- kept split: {int((kept.split == 'train').sum())} train, "
            f"{int((kept.split == 'heldout').sum())} held out",
            f"- kept footage: {kept.duration.sum():.1f}s; black-trimmed clips: "
            f"{int(clips.trimmed.astype(bool).sum())}",
        ]
    lines += ["", "## Ingest rejections", ""]
    check_reasons = clips.loc[~keep, "reasons"].map(reason_kind).value_counts()
    lines += _table(bad.reason.map(reason_kind).value_counts(), "reason")
    lines += ["## Check rejections", ""]
    lines += _table(check_reasons, "reason")
    ingest_reasons = bad.reason.map(reason_kind).value_counts()
    both = pd.concat([ingest_reasons.rename(lambda k: f"ingest: {k}"),
                      check_reasons.rename(lambda k: f"check: {k}")])  # fmt: skip
    if len(both):
        lines += [f"![rejections]({_bars(out / 'rejections.png', both, 'Rejections')})", ""]
    if len(clips):
        durations = {
            "kept": clips.duration[keep].to_numpy(),
            "rejected": clips.duration[~keep].to_numpy(),
        }
        lines += ["## Clip durations", ""]
        lines += [f"![durations]({_hist(out / 'durations.png', durations, 'seconds', 'Clip durations')})", ""]  # fmt: skip
    if len(ok):
        lines += ["## Video resolutions", ""]
        lines += [f"![resolutions]({_scatter(out / 'resolutions.png', ok, 'Video resolutions')})", ""]  # fmt: skip
        res = (ok.width.astype(str) + "x" + ok.height.astype(str)).value_counts().head(10)
        lines += _table(res, "resolution")
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


def write_caption_report(out: Path, table: pd.DataFrame) -> Path:
    """Write `report.md` with the caption-length histogram into `out` (filter's folder)."""
    words = table.caption.fillna("").map(lambda c: len(str(c).split()))
    sel = table.selected.astype(bool)
    lines = [
        "# Dataset report: captions",
        "",
        f"- captions: {len(table)} ({int(sel.sum())} selected, {int((~sel).sum())} rejected)",
        f"- words per selected caption: median {words[sel].median() if sel.any() else 0:.0f}",
        "",
    ]
    groups = {"selected": words[sel].to_numpy(), "rejected": words[~sel].to_numpy()}
    name = _hist(out / "caption_words.png", groups, "words", "Caption length")
    lines += [f"![caption length]({name})", "", "## Caption rejections", ""]
    kinds = table.loc[~sel, "reasons"].str.split("; ").explode().map(reason_kind)
    lines += _table(kinds.value_counts(), "reason")
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"
