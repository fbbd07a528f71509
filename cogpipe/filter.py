"""Filter: a quality gate on captions, then curation — every clip scored, reasons recorded.

Rules, each with its own reason: word-count bounds; truncation (the captioner hit its
token limit, or the text stops mid-sentence); repeated word trigrams (a looping VLM);
refusal and chat-assistant phrases; still-image language ("the image shows"); text that
is not English; too few of the domain's terms; more T5 tokens than the video model
reads (226 for CogVideoX). A caption with no reasons is accepted. The score (0..1) ranks
captions: 1 is a caption of ideal length with no repetition.

Curation (`select_top` N > 0) keeps the set diverse: each caption has a category (the
domain-keyword group with the most matching terms: strike, knockout, referee, ...), and
at most N accepted captions are selected by a proportional round-robin over categories
(`curate`), so a small category gets its share instead of losing every slot to the
best-scoring one. With N = 0 every accepted caption is selected.

    cogpipe filter configs/demo.yaml
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from cogpipe.config import CaptionConfig, FilterConfig, PipelineConfig
from cogpipe.report import write_caption_report
from cogpipe.workspace import (
    Progress,
    StageResult,
    Workspace,
    model_fingerprint,
    no_progress,
    read_table,
    stage_key,
    write_table,
)

VERSION = 3  # 3: accepted, category; selected = accepted and curated
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


def matched(terms: list[str], words: list[str]) -> set[str]:
    """The terms that begin at least one of the (lowercase) words."""
    return {t for t in terms if any(w.startswith(t) for w in words)}


def category_of(caption: str | None, fc: FilterConfig) -> str:
    """The category with the most matching terms (ties: the earlier one); 'other' if none."""
    words = [w.lower() for w in WORD.findall(caption)] if isinstance(caption, str) else []
    best, most = "other", 0
    for name, terms in fc.categories.items():
        n = len(matched(terms, words))
        if n > most:
            best, most = name, n
    return best


def curate(table: pd.DataFrame, select_top: int) -> pd.Series:
    """Which rows are selected: at most `select_top` accepted ones, spread over categories.

    Proportional round-robin: inside a category, captions are ranked by score (ties by
    clip_id) and the k-th of n sits at position k / n; the lowest positions are taken
    (ties by score, then clip_id). So every category's best comes before any category's
    second, and each category gets about its share of `select_top` (rounded up), however
    much higher another category scores.

    Args:
        table: one row per caption with clip_id, score, category and accepted.
        select_top: how many to select; 0 (or at least the number accepted) selects every
            accepted row.

    Returns:
        A bool Series on the table's index.
    """
    accepted = table.accepted.astype(bool)
    if not select_top or select_top >= accepted.sum():
        return accepted.copy()
    ranked = table[accepted].sort_values(["score", "clip_id"], ascending=[False, True])
    by_category = ranked.groupby("category", sort=False)
    position = by_category.cumcount() / by_category.clip_id.transform("size")  # 0 <= k/n < 1
    order = ranked.assign(position=position).sort_values(
        ["position", "score", "clip_id"], ascending=[True, False, True]
    )
    return pd.Series(table.index.isin(order.index[:select_top]), index=table.index)


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
    terms = matched(fc.domain_terms, words)
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


def judge_captions(
    captions: pd.DataFrame, fc: FilterConfig, count: Callable[[str], int] | None
) -> list[tuple[float, list[str]]]:
    """(score, reasons) per caption row; a clip the captioner could not read keeps its error."""
    truncated = captions["truncated"] if "truncated" in captions else [False] * len(captions)
    errors = captions["error"] if "error" in captions else [None] * len(captions)
    return [
        (0.0, [f"caption failed: {err}"])
        if isinstance(err, str) and err
        else judge(c, fc, bool(t), count)
        for c, t, err in zip(captions.caption, truncated, errors, strict=True)
    ]


def retry_config(cfg: PipelineConfig, round_: int) -> CaptionConfig:
    """Round r's caption settings: the stricter prompt, no repeated trigrams; from round 2 on,
    sampled (greedy decoding would give round 1's caption again)."""
    sampled = {"temperature": 0.7, "seed": round_} if round_ > 1 else {}
    ngram = max(cfg.caption.no_repeat_ngram_size, 3)
    return cfg.caption.model_copy(
        update={"prompt": cfg.filter.retry_prompt, "no_repeat_ngram_size": ngram, **sampled}
    )


def recaption(
    ws: Workspace,
    cfg: PipelineConfig,
    caption_key: str,
    round_: int,
    clips: pd.DataFrame,
    progress: Progress = no_progress,
) -> pd.DataFrame:
    """Re-caption `clips` (round `round_`) into `caption/<its own key>/`, in resumable parts.

    The key covers the caption key, the round's settings and the clips, so a re-run with
    the same rejections reuses every committed part, and a new retry prompt keeps the old.
    """
    from cogpipe import caption as cap

    cc = retry_config(cfg, round_)
    ids = hashlib.sha256("\n".join(sorted(clips.clip_id)).encode()).hexdigest()
    fields = cc.key_fields() | {"model_fp": model_fingerprint(cc.model, cc.revision)}
    key = stage_key(
        "caption", cap.VERSION, fields, {"caption": caption_key, "retry": f"{round_}-{ids}"}
    )
    out = ws.stage_dir("caption", key)
    if not ws.done(out):
        started = time.time()
        parts, reused = cap.caption_pass(out, clips, cc, list(range(cc.shards)), progress=progress)
        write_table(out / "captions.parquet", cap.merge_parts(out, clips))
        counts = {"clips": len(clips), "round": round_, "parts": parts, "parts_reused": reused}
        ws.finish(StageResult("caption", key, str(out), counts), started)
    return read_table(out / "captions.parquet")


def run_filter(
    ws: Workspace,
    cfg: PipelineConfig,
    upstream: dict[str, StageResult],
    progress: Progress = no_progress,
) -> StageResult:
    """Judge every caption, re-caption rejected clips, curate, write `curated.parquet`.

    Args:
        ws: the workspace.
        cfg: the pipeline config (uses `filter`, and `caption` for re-caption passes).
        upstream: {"caption": StageResult, "check": StageResult}. Without check (tests of
            the gate alone) nothing is re-captioned and every clip counts as train.
        progress: called as re-caption parts commit, and once at the end.

    Returns:
        The stage result; counts hold captions, accepted, selected, rejected and
        recaptioned; stats hold rejection kinds and selected captions per category.
    """
    started = time.time()
    caption = upstream["caption"]
    check = upstream.get("check")
    key = key_of(cfg, {"caption": caption.key} | ({"check": check.key} if check else {}))
    out = ws.stage_dir("filter", key)
    if ws.done(out):
        return ws.result("filter", out)

    captions = read_table(Path(caption.path) / "captions.parquet")
    clips = read_table(Path(check.path) / "clips.parquet") if check else None
    count = token_counter(cfg)
    judged = judge_captions(captions, cfg.filter, count)
    text, attempt = list(captions.caption), [0] * len(captions)
    # A clip whose frames did not decode gets nothing from a new prompt.
    retryable = captions.error.isna().tolist() if "error" in captions else [True] * len(captions)
    for round_ in range(1, cfg.filter.retries + 1 if clips is not None else 1):
        todo = [i for i, (_, reasons) in enumerate(judged) if reasons and retryable[i]]
        if not todo:
            break
        ids = captions.clip_id.iloc[todo]
        again = recaption(ws, cfg, caption.key, round_, clips[clips.clip_id.isin(ids)], progress)
        again = again.set_index("clip_id").loc[ids].reset_index()
        for i, verdict, new in zip(
            todo, judge_captions(again, cfg.filter, count), again.caption, strict=True
        ):
            if not verdict[1]:  # accepted: the clip's caption from now on
                judged[i], text[i], attempt[i] = verdict, new, round_
    table = pd.DataFrame(
        {
            "clip_id": captions.clip_id,
            "caption": text,
            "score": [s for s, _ in judged],
            "category": [category_of(c, cfg.filter) for c in text],
            "accepted": [not r for _, r in judged],
            "reasons": ["; ".join(r) for _, r in judged],
            "attempt": attempt,
        }
    ).astype({"accepted": bool, "attempt": int})  # even when empty
    train = (
        table.clip_id.map(clips.set_index("clip_id").split).eq("train")
        if clips is not None
        else pd.Series(True, index=table.index)
    )
    # select_top counts training clips; an accepted held-out clip stays selected (evaluation).
    chosen = curate(table[train], cfg.filter.select_top)
    selected = table.accepted & ~train
    selected[chosen.index] = chosen
    table.insert(table.columns.get_loc("accepted") + 1, "selected", selected.astype(bool))
    names = [*cfg.filter.categories, "other"]
    write_table(out / "curated.parquet", table)
    write_caption_report(out, table, names)
    progress(len(table), len(table), "judged")

    n_acc, n_sel = int(table.accepted.sum()), int(table.selected.sum())
    counts = {"captions": len(table), "accepted": n_acc, "selected": n_sel}
    counts["rejected"] = len(table) - n_acc
    counts["recaptioned"] = int((table.attempt > 0).sum())
    # Group reasons by kind (the text before the first parenthesis) for the summary.
    kinds = table.loc[~table.accepted, "reasons"].str.split("; ").explode().str.split(" \\(").str[0]
    per_category = table[table.accepted].groupby("category").selected.sum()
    stats = {
        "rejections": {k: int(n) for k, n in kinds.value_counts().items()},
        "categories": {c: int(per_category[c]) for c in names if c in per_category},
    }
    result = StageResult("filter", key, str(out), counts, stats=stats)
    return ws.finish(result, started)
