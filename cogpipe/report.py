"""The dataset report: what each data stage kept and dropped, as PNG plots and markdown.

`check/<key>/report.md` covers ingest and check (counts and reasons, duration and
resolution distributions); `filter/<key>/report.md` adds the caption-length histogram,
the selected captions per category and a table of every rejected caption with its reasons,
under a plain headline when most captions were truncated or one rejection dominates.
Plots come from `cogpipe.plots` (integer count axes, groups side by side, `128x96`).
Images are linked by file name, so the folder reads on its own; the Prefect task layer
publishes the same markdown as an artifact with the images inlined.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from cogpipe.plots import dims, hbars, histogram, sizes


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
    both = pd.concat(
        [
            ingest_reasons.rename(lambda k: f"ingest: {k}"),
            check_reasons.rename(lambda k: f"check: {k}"),
        ]
    )
    if len(both):
        lines += [f"![rejections]({hbars(out / 'rejections.png', both, 'Rejections')})", ""]
    if len(clips):
        durations = {
            "kept": clips.duration[keep].to_numpy(),
            "rejected": clips.duration[~keep].to_numpy(),
        }
        lines += ["## Clip durations", ""]
        lines += [
            f"![durations]({histogram(out / 'durations.png', durations, 'seconds', 'Clip durations')})",
            "",
        ]
    if len(ok):
        lines += ["## Video resolutions", ""]
        lines += [f"![resolutions]({sizes(out / 'resolutions.png', ok, 'Video resolutions')})", ""]
        res = pd.Series(map(dims, ok.width, ok.height)).value_counts().head(10)
        lines += _table(res, "resolution")
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


def _cell(text: object, limit: int | None = None) -> str:
    """Text for a markdown table cell: one line, `|` escaped, cut to `limit` characters."""
    text = " ".join(str(text).split()) if isinstance(text, str) else ""
    if limit is not None and len(text) > limit:
        text = text[: limit - 1].rstrip() + "\u2026"
    return text.replace("|", "\\|")


MOTION_NAMES = {2: ("low", "high"), 3: ("low", "mid", "high")}


def _motion_lines(table: pd.DataFrame, acc: pd.Series, sel: pd.Series) -> list[str]:
    """The selection per motion group (check's motion score) against all accepted clips."""
    if "motion_group" not in table or not acc.any():
        return []
    groups = sorted(table.loc[acc, "motion_group"].dropna().unique())
    names = MOTION_NAMES.get(len(groups), [f"group {int(g)}" for g in groups])
    lines = ["## Selection by motion", "", "| motion | score range | accepted | selected |"]
    lines += ["|---|---|---:|---:|"]
    for name, g in zip(names, groups, strict=True):
        mine = acc & (table.motion_group == g).fillna(False).astype(bool)
        low, high = table.motion[mine].min(), table.motion[mine].max()
        lines += [
            f"| {name} | {low:.2f}-{high:.2f} | {int(mine.sum())} | {int((mine & sel).sum())} |"
        ]
    return [*lines, ""]


def _source_lines(table: pd.DataFrame, acc: pd.Series, sel: pd.Series) -> list[str]:
    """Captions per source (dataset, import, model, override): how many passed, were picked."""
    if "source" not in table or not len(table):
        return []
    source = table.source.fillna("none")
    lines = ["## Captions by source", "", "| source | captions | accepted | selected |"]
    lines += ["|---|---:|---:|---:|"]
    for name in sorted(source.unique()):
        mine = source == name
        lines += [
            f"| {name} | {int(mine.sum())} | {int((mine & acc).sum())} | {int((mine & sel).sum())} |"
        ]
    return [*lines, ""]


def _override_lines(table: pd.DataFrame) -> list[str]:
    """Every clip a person's override changed (filter.overrides)."""
    if "override" not in table or not table.override.any():
        return []
    lines = ["## Overrides", "", "| clip_id | verdict | caption or reason |", "|---|---|---|"]
    for r in table[table.override.astype(bool)].itertuples():
        verdict, text = ("caption", r.caption) if r.accepted else ("reject", r.reasons)
        lines += [f"| {_cell(r.clip_id)} | {verdict} | {_cell(text, 80)} |"]
    return [*lines, ""]


def _category_lines(table: pd.DataFrame, categories: Sequence[str]) -> list[str]:
    """Accepted and selected captions per category with any accepted: `categories` first,
    in their order, then the others by name."""
    lines = ["## Selection by category", ""]
    names = [*categories, *sorted(set(table.category) - set(categories))]
    by = table.groupby("category")
    rows = [(c, int(by.accepted.sum().get(c, 0)), int(by.selected.sum().get(c, 0))) for c in names]
    rows = [r for r in rows if r[1]]
    if not rows:
        return [*lines, "No accepted captions.", ""]
    lines += ["| category | accepted | selected |", "|---|---:|---:|"]
    lines += [f"| {c} | {a} | {s} |" for c, a, s in rows]
    return [*lines, ""]


def _rejection_lines(rejected: pd.DataFrame, max_rows: int) -> list[str]:
    """Rejected captions counted by kind, then the first `max_rows` one per row."""
    lines = ["## Caption rejections", ""]
    kinds = rejected.reasons.str.split("; ").explode().map(reason_kind)
    lines += _table(kinds.value_counts(), "reason")
    if not len(rejected):
        return lines
    lines += ["| clip_id | reasons | caption |", "|---|---|---|"]
    lines += [
        f"| {_cell(r.clip_id)} | {_cell(r.reasons)} | {_cell(r.caption, 80)} |"
        for r in rejected.head(max_rows).itertuples()
    ]
    if len(rejected) > max_rows:
        lines += ["", f"{len(rejected) - max_rows} more rejected clips: see curated.parquet."]
    return [*lines, ""]


def write_caption_report(
    out: Path,
    table: pd.DataFrame,
    categories: Sequence[str] = (),
    max_rows: int = 200,
    notes: Sequence[str] = (),
) -> Path:
    """Write `report.md` into `out` (filter's folder): the caption-length histogram, the
    rejections (counted by kind, then one row per clip) and the selection per category.

    Args:
        out: the folder.
        table: the curated table (clip_id, caption, category, accepted, selected, reasons).
        categories: category names in the order to list them (others follow by name).
        max_rows: rejected clips listed one per row; the rest are counted.
        notes: sentences to put right under the counts (`filter.headline`: most captions
            truncated, one rejection kind dominating).
    """
    words = table.caption.map(lambda c: len(c.split()) if isinstance(c, str) else 0)
    acc, sel = table.accepted.astype(bool), table.selected.astype(bool)
    lines = [
        "# Dataset report: captions",
        "",
        f"- captions: {len(table)} ({int(acc.sum())} accepted, {int(sel.sum())} selected, "
        f"{int((~acc).sum())} rejected)",
        f"- words per selected caption: median {words[sel].median() if sel.any() else 0:.0f}",
        "",
    ]
    lines += [line for note in notes for line in (note, "")]
    groups = {
        "selected": words[sel].to_numpy(),
        "accepted, not selected": words[acc & ~sel].to_numpy(),
        "rejected": words[~acc].to_numpy(),
    }
    name = histogram(out / "caption_words.png", groups, "words", "Caption length")
    lines += [f"![caption length]({name})", ""]
    lines += _category_lines(table, categories)
    lines += _motion_lines(table, acc, sel)
    lines += _source_lines(table, acc, sel)
    lines += _override_lines(table)
    lines += _rejection_lines(table[~acc], max_rows)
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"
