"""Filter: a quality gate on captions — every clip scored, reasons recorded, some selected.

Rules, each with its own reason: word-count bounds; truncation (the captioner hit its
token limit, or the text stops mid-sentence); repeated word trigrams (a looping VLM);
refusal and chat-assistant phrases; still-image language ("the image shows"); text that
is not English; too few of the domain's terms; more T5 tokens than the video model
reads (226 for CogVideoX). A caption with no reasons is selected. The score (0..1) ranks
captions for curation: 1 is a caption of ideal length with no repetition.

    cogpipe filter configs/demo.yaml
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
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

VERSION = 2
WORD = re.compile(r"[\w'-]+")
CLOSING = tuple(".!?\"')\u201d")  # what a finished sentence ends with
# Common English function words: about half of the words of English prose.
ENGLISH = frozenset(
    "a an the and or but of to in on at by for from with into onto over under as is are was "
    "were be been being has have had he she it they his her their its him them this that "
    "these those who which while then than when where after before up down back out off "
    "not no one two both each other again".split()
)


def key_of(cfg: PipelineConfig, inputs: dict[str, str]) -> str:
    # The model is the tokenizer the token limit is counted with.
    return stage_key("filter", VERSION, cfg.filter.key_fields(), {**inputs, "model": cfg.model})


def repetition(words: list[str], n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier n-gram (0 = none, near 1 = a loop)."""
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def english_share(caption: str, words: list[str]) -> float:
    """Share of words that are common English words; 0 when under 90% of letters are ASCII."""
    letters = [ch for ch in caption if ch.isalpha()]
    if not words or sum(ch.isascii() for ch in letters) < 0.9 * len(letters):
        return 0.0
    return sum(w in ENGLISH for w in words) / len(words)


def judge(
    caption: str | None,
    fc: FilterConfig,
    truncated: bool = False,
    count_tokens: Callable[[str], int] | None = None,
) -> tuple[float, list[str]]:
    """Score one caption and list why it is rejected (empty list: accepted).

    Args:
        caption: the text.
        fc: the gate's thresholds.
        truncated: the captioner stopped at its token limit.
        count_tokens: the video model's tokenizer as a counter (None: not checked).
    """
    if not isinstance(caption, str) or not caption.strip():  # None, or NaN read back by pandas
        return 0.0, ["empty caption"]
    words = [w.lower() for w in WORD.findall(caption)]
    low = " ".join(caption.lower().split())
    reasons = []
    if len(words) < fc.min_words:
        reasons.append(f"too few words ({len(words)} < {fc.min_words})")
    if len(words) > fc.max_words:
        reasons.append(f"too many words ({len(words)} > {fc.max_words})")
    if fc.reject_truncated and truncated:
        reasons.append("truncated (hit the token limit)")
    elif fc.reject_truncated and not caption.rstrip().endswith(CLOSING):
        reasons.append("truncated (no closing punctuation)")
    rep = repetition(words)
    if rep > fc.max_repetition:
        reasons.append(f"repetitive ({rep:.0%} of trigrams repeat)")
    for kind, phrases in (("refusal", fc.refusal_phrases), ("assistant", fc.assistant_phrases),
                          ("still-image", fc.still_image_phrases)):  # fmt: skip
        found = [p for p in phrases if p in low]
        if found:
            reasons.append(f'{kind} phrase ("{found[0]}")')
    share = english_share(caption, words)
    if fc.min_english and share < fc.min_english:
        reasons.append(f"not English ({share:.0%} common English words)")
    terms = {t for t in fc.domain_terms if any(w.startswith(t) for w in words)}
    if len(terms) < fc.min_domain_terms:
        reasons.append(f"off-domain ({len(terms)} of {fc.min_domain_terms} domain terms)")
    if count_tokens is not None and fc.max_tokens:
        n = count_tokens(caption)
        if n > fc.max_tokens:
            reasons.append(f"too many tokens ({n} > {fc.max_tokens})")
    lo, hi = fc.ideal_words
    off = max(lo - len(words), len(words) - hi, 0)
    room = max(lo - fc.min_words, fc.max_words - hi, 1)
    length_score = max(0.0, 1 - off / room)
    blocked = any(r.startswith(("refusal", "assistant")) for r in reasons)
    score = round(length_score * (1 - rep) * (0.0 if blocked else 1.0), 4)
    return score, reasons


def token_counter(cfg: PipelineConfig) -> Callable[[str], int] | None:
    """The video model's T5 tokenizer as a counter (hub id or folder; `tokenizer/`)."""
    if not cfg.filter.max_tokens:
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model, subfolder="tokenizer")
    return lambda text: len(tokenizer(text, add_special_tokens=True).input_ids)


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
    count = token_counter(cfg)
    truncated = captions["truncated"] if "truncated" in captions else [False] * len(captions)
    judged = [
        judge(c, cfg.filter, bool(t), count)
        for c, t in zip(captions.caption, truncated, strict=True)
    ]
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
