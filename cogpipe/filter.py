"""Filter: a quality gate on captions — every clip scored, reasons recorded, some selected.

Rules: word-count bounds, repeated word trigrams (a looping VLM), refusal phrases. A
caption with no reasons is selected. The score (0..1) ranks selected captions for later
curation: 1 is an ideal-length caption with no repetition.

    cogpipe filter configs/demo.yaml
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pandas as pd

from cogpipe.config import FilterConfig, PipelineConfig
from cogpipe.report import write_caption_report
from cogpipe.workspace import (
    Progress,
    StageResult,
    Workspace,
    no_progress,
    read_table,
    stage_key,
    write_table,
)

VERSION = 1
WORD = re.compile(r"[\w'-]+")


def key_of(cfg: PipelineConfig, inputs: dict[str, str]) -> str:
    return stage_key("filter", VERSION, cfg.filter.key_fields(), inputs)


def repetition(words: list[str], n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier n-gram (0 = none, near 1 = a loop)."""
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def judge(caption: str | None, fc: FilterConfig) -> tuple[float, list[str]]:
    """Score one caption and list why it is rejected (empty list: accepted)."""
    if not isinstance(caption, str) or not caption.strip():  # None, or NaN read back by pandas
        return 0.0, ["empty caption"]
    words = [w.lower() for w in WORD.findall(caption)]
    reasons = []
    if len(words) < fc.min_words:
        reasons.append(f"too few words ({len(words)} < {fc.min_words})")
    if len(words) > fc.max_words:
        reasons.append(f"too many words ({len(words)} > {fc.max_words})")
    rep = repetition(words)
    if rep > fc.max_repetition:
        reasons.append(f"repetitive ({rep:.0%} of trigrams repeat)")
    low = caption.lower()
    refusals = [p for p in fc.refusal_phrases if p in low]
    if refusals:
        reasons.append(f"refusal phrase {refusals[0]!r}")
    mid = (fc.min_words + fc.max_words) / 2
    length_score = max(0.0, 1 - abs(len(words) - mid) / max(mid, 1))
    score = round(length_score * (1 - rep) * (0.0 if refusals else 1.0), 4)
    return score, reasons


def run_filter(
    ws: Workspace,
    cfg: PipelineConfig,
    upstream: dict[str, StageResult],
    progress: Progress = no_progress,
) -> StageResult:
    """Judge every caption and write `filter/<key>/curated.parquet`.

    Args:
        ws: the workspace.
        cfg: the pipeline config (uses `filter`).
        upstream: {"caption": StageResult}.
        progress: called once at the end (the stage takes milliseconds).

    Returns:
        The stage result; counts hold captions, selected and rejected.
    """
    started = time.time()
    caption = upstream["caption"]
    key = key_of(cfg, {"caption": caption.key})
    out = ws.stage_dir("filter", key)
    if ws.done(out):
        return ws.result("filter", out)

    captions = read_table(Path(caption.path) / "captions.parquet")
    judged = [judge(c, cfg.filter) for c in captions.caption]
    # A clip the captioner could not read carries the caption stage's own reason.
    errors = captions["error"] if "error" in captions else [None] * len(captions)
    judged = [
        (0.0, [f"caption failed: {err}"]) if isinstance(err, str) and err else j
        for j, err in zip(judged, errors, strict=True)
    ]
    table = pd.DataFrame(
        {
            "clip_id": captions.clip_id,
            "caption": captions.caption,
            "score": [s for s, _ in judged],
            "selected": [not r for _, r in judged],
            "reasons": ["; ".join(r) for _, r in judged],
        }
    )
    write_table(out / "curated.parquet", table)
    write_caption_report(out, table)
    progress(len(table), len(table), "judged")

    n_sel = int(table.selected.sum())
    counts = {"captions": len(table), "selected": n_sel, "rejected": len(table) - n_sel}
    # Group reasons by kind (the text before the first parenthesis) for the summary.
    kinds = table.loc[~table.selected, "reasons"].str.split("; ").explode().str.split(" \\(").str[0]
    result = StageResult(
        "filter", key, str(out), counts, stats={"rejections": kinds.value_counts().to_dict()}
    )
    return ws.finish(result, started)
