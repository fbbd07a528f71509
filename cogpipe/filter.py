"""Filter: a quality gate on captions, then curation — every clip scored, reasons recorded.

Rules, each with its own reason: word-count bounds; truncation (the captioner hit its
token limit, or the text stops mid-sentence); repeated word trigrams (a looping VLM);
refusal and chat-assistant phrases; still-image language ("the image shows"); text that
is not English; too few of the domain's terms; more T5 tokens than the video model
reads (226 for CogVideoX). A caption with no reasons is accepted. The score (0..1) ranks
captions: 1 is a caption of ideal length with no repetition. The rules live here only:
the recaption stage, which captions rejected clips again with `retry_prompt` before this
stage, judges with `judge_captions` too. This stage loads no captioner.

A person's corrections (`filter.overrides`, see cogpipe.overrides) are applied after the
gate: a caption they write is the clip's caption and accepts it, a reject entry rejects
it with their reason; the report lists them.

Curation (`select_top` N > 0) keeps the set diverse: each caption has a category (the
domain-keyword group with the most matching terms: strike, knockout, referee, ...) and a
motion group (a quantile of check's motion score among the accepted training clips,
`motion_groups`), and at most N accepted training samples are selected by a proportional
round-robin over (category, motion group) (`curate`), so a small group gets its share
instead of losing every slot to the best-scoring one. With N = 0 every accepted caption is
selected.

    cogpipe filter demo/demo.yaml
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from cogpipe.config import FilterConfig, PipelineConfig
from cogpipe.errors import EmptyStage
from cogpipe.models.cogvideox import component_fingerprint
from cogpipe.overrides import apply_overrides, resolve
from cogpipe.report import reason_kind, write_caption_report
from cogpipe.workspace import (
    Progress,
    StageResult,
    Workspace,
    no_progress,
    read_table,
    stage_key,
    write_table,
)

VERSION = 4  # 4: captions from recaption, with attempt and source; 3: accepted, category
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
    # The video model's tokenizer counts the token limit: by fingerprint, never by path.
    fields = cfg.filter.key_fields() | {"tokenizer": component_fingerprint(cfg.model, "tokenizer")}
    return stage_key("filter", VERSION, fields, inputs)


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


def motion_groups(motion: pd.Series, groups: int) -> pd.Series:
    """Motion group 0..groups-1 of each value: its quantile among the values (by rank, ties
    by position), so each group holds about as many clips; all 0 for `groups` 1 or no value."""
    if groups <= 1 or motion.isna().all():
        return pd.Series(0, index=motion.index)
    rank = motion.rank(method="first", na_option="bottom") - 1  # 0..n-1
    return (rank * groups // len(motion)).astype(int)


def curate(table: pd.DataFrame, select_top: int, groups: int = 1) -> pd.Series:
    """Which rows are selected: at most `select_top` accepted ones, spread over categories
    and over motion.

    Proportional round-robin over groups: a group is a caption category, crossed with a
    motion group (`motion_groups` of the table's `motion` column, among the accepted rows)
    when `groups` > 1. Inside a group, captions are ranked by score (ties by clip_id) and
    the k-th of n sits at position k / n; the lowest positions are taken (ties by score,
    then clip_id). So every group's best comes before any group's second, and each group
    gets about its share of `select_top` (rounded up), however much higher another scores.

    Args:
        table: one row per caption with clip_id, score, category, accepted (and motion).
        select_top: how many to select; 0 (or at least the number accepted) selects every
            accepted row.
        groups: motion groups (1: categories alone).

    Returns:
        A bool Series on the table's index.
    """
    accepted = table.accepted.astype(bool)
    if not select_top or select_top >= accepted.sum():
        return accepted.copy()
    ranked = table[accepted].sort_values(["score", "clip_id"], ascending=[False, True])
    motion = ranked["motion"] if "motion" in ranked else pd.Series(float("nan"), ranked.index)
    keys = [ranked.category, motion_groups(motion, groups)]
    by_group = ranked.groupby(keys, sort=False)
    position = by_group.cumcount() / by_group.clip_id.transform("size")  # 0 <= k/n < 1
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
    for kind, phrases in (
        ("refusal", fc.refusal_phrases),
        ("assistant", fc.assistant_phrases),
        ("still-image", fc.still_image_phrases),
    ):
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
    """The video model's T5 tokenizer as a counter (hub id or folder; `tokenizer/`).

    Counting is the point: a caption over the model's length is measured, not encoded, so
    the tokenizer's "sequence length is longer than the specified maximum" warning is
    turned off for the call (`verbose=False`); `judge` names the excess in its reason.
    """
    if not cfg.filter.max_tokens:
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model, subfolder="tokenizer")
    return lambda text: len(tokenizer(text, add_special_tokens=True, verbose=False).input_ids)


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


def judged_table(
    captions: pd.DataFrame, judged: list[tuple[float, list[str]]], fc: FilterConfig
) -> pd.DataFrame:
    """One row per caption: its verdict, category, and where it came from (`attempt`: the
    re-caption round, 0 for the caption stage's; `source`: model, dataset or import;
    `truncated`: the captioner stopped at its token limit)."""
    n = len(captions)
    return pd.DataFrame(
        {
            "clip_id": captions.clip_id,
            "caption": captions.caption,
            "score": [s for s, _ in judged],
            "category": [category_of(c, fc) for c in captions.caption],
            "accepted": [not r for _, r in judged],
            "reasons": ["; ".join(r) for _, r in judged],
            "attempt": captions["attempt"] if "attempt" in captions else [0] * n,
            "source": captions["source"] if "source" in captions else ["model"] * n,
            "truncated": captions["truncated"].eq(True) if "truncated" in captions else False,
        }
    ).astype({"accepted": bool, "attempt": int, "reasons": str, "truncated": bool})  # if empty


def select(table: pd.DataFrame, clips: pd.DataFrame | None, fc: FilterConfig) -> pd.DataFrame:
    """The table with `selected` after `accepted`: curation over the training clips, spread
    over categories and check's motion (`motion` and `motion_group` columns); an accepted
    held-out clip stays selected (evaluation). Without clips every clip is train."""
    by_clip = clips.set_index("clip_id") if clips is not None else None
    train = (
        table.clip_id.map(by_clip.split).eq("train")
        if by_clip is not None
        else pd.Series(True, index=table.index)
    )
    if by_clip is not None and "motion" in by_clip:
        table["motion"] = table.clip_id.map(by_clip.motion).astype(float)
        pool = train & table.accepted  # groups are quantiles of the candidates' motion
        table["motion_group"] = pd.Series(pd.NA, index=table.index, dtype="Int64")
        table.loc[pool, "motion_group"] = motion_groups(table.motion[pool], fc.motion_groups)
    chosen = curate(table[train], fc.select_top, fc.motion_groups)  # counts training clips
    selected = table.accepted & ~train
    selected[chosen.index] = chosen
    table.insert(table.columns.get_loc("accepted") + 1, "selected", selected.astype(bool))
    return table


def overridden(table: pd.DataFrame, clips: pd.DataFrame | None, cfg: PipelineConfig, count):
    """The judged table after `filter.overrides` (with an `override` column)."""
    table = table.assign(override=False)
    if cfg.filter.overrides is None or clips is None:
        return table
    entries = resolve(cfg.filter.overrides, clips, cfg.ingest.source)
    table = apply_overrides(table, entries, lambda text: judge(text, cfg.filter, False, count)[0])
    table["category"] = [category_of(c, cfg.filter) for c in table.caption]
    return table


def filter_result(key: str, out: Path, table: pd.DataFrame, names: list[str]) -> StageResult:
    """Counts (captions, accepted, selected, rejected, recaptioned, overrides); stats: rejection kinds
    and selected captions per category."""
    n_acc, n_sel = int(table.accepted.sum()), int(table.selected.sum())
    counts = {"captions": len(table), "accepted": n_acc, "selected": n_sel}
    counts["rejected"] = len(table) - n_acc
    counts["recaptioned"] = int((table.attempt > 0).sum())
    counts["overrides"] = int(table.override.sum())
    # Group reasons by kind (the text before the first parenthesis) for the summary.
    kinds = table.loc[~table.accepted, "reasons"].str.split("; ").explode().str.split(" \\(").str[0]
    per_category = table[table.accepted].groupby("category").selected.sum()
    stats = {
        "rejections": {k: int(n) for k, n in kinds.value_counts().items()},
        "categories": {c: int(per_category[c]) for c in names if c in per_category},
    }
    return StageResult("filter", key, str(out), counts, stats=stats)


def run_filter(
    ws: Workspace,
    cfg: PipelineConfig,
    upstream: dict[str, StageResult],
    progress: Progress = no_progress,
) -> StageResult:
    """Judge every caption of the recaption stage, curate, write `curated.parquet`.

    Loads no captioner: rejected captions were captioned again upstream (recaption); here
    the gate only records its verdict (cheap) for curation and the report.

    Args:
        ws: the workspace.
        cfg: the pipeline config (uses `filter`).
        upstream: {"recaption": StageResult, "check": StageResult}. Without check (tests
            of the gate alone) every clip counts as train.
        progress: called once at the end.

    Returns:
        The stage result (see `filter_result`).

    Raises:
        EmptyStage: no caption is selected (curated.parquet and the report are written,
            the stage is not done).
    """
    started = time.time()
    captions_in, check = upstream["recaption"], upstream.get("check")
    key = key_of(cfg, {"recaption": captions_in.key} | ({"check": check.key} if check else {}))
    out = ws.stage_dir("filter", key)
    if ws.done(out):
        return ws.result("filter", out)

    captions = _with_columns(read_table(Path(captions_in.path) / "captions.parquet"))
    clips = read_table(Path(check.path) / "clips.parquet") if check else None
    count = token_counter(cfg)
    table = judged_table(captions, judge_captions(captions, cfg.filter, count), cfg.filter)
    table = overridden(table, clips, cfg, count)  # a person's corrections, after the gate
    table = select(table, clips, cfg.filter)
    names = [*cfg.filter.categories, "other"]
    write_table(out / "curated.parquet", table)
    write_caption_report(out, table, names, notes=headline(table, cfg))
    progress(len(table), len(table), "judged")
    result = filter_result(key, out, table, names)
    if not result.counts["selected"]:  # written for a look, but not done
        raise _nothing_selected(result)
    return ws.finish(result, started)


# The setting behind each kind of rejection (`report.reason_kind`), named in the report
# when that kind rejected most of the rejected captions.
REASON_SETTINGS = {
    "empty caption": "caption.prompt and caption.model",
    "caption failed": "the caption stage's errors (its captions.parquet, column error)",
    "too few words": "filter.min_words",
    "too many words": "filter.max_words",
    "truncated": "caption.max_new_tokens, or filter.reject_truncated",
    "repetitive": "filter.max_repetition, or caption.no_repeat_ngram_size",
    "refusal phrase": "filter.refusal_phrases",
    "assistant phrase": "filter.assistant_phrases",
    "still-image phrase": "filter.still_image_phrases",
    "not English": "filter.min_english",
    "off-domain": "filter.domain_terms and filter.min_domain_terms",
    "too many tokens": "filter.max_tokens (what the video model reads)",
}
DOMINANT_MIN = 3  # rejected captions before one kind of rejection is worth a headline


def headline(table: pd.DataFrame, cfg: PipelineConfig) -> list[str]:
    """Plain sentences for the top of the report, on what a reader would otherwise miss in
    the tables: most captions were cut at the captioner's token limit, or one kind of
    rejection rejected most of the rejected captions (and which setting governs it)."""
    notes = truncation_note(table, cfg)
    kinds = table.loc[~table.accepted.astype(bool), "reasons"].map(
        lambda r: set(map(reason_kind, str(r).split("; ")))
    )
    counts = pd.Series([k for row in kinds for k in row], dtype=object).value_counts()
    if len(kinds) >= DOMINANT_MIN and counts.iloc[0] * 2 > len(kinds):
        kind, n = counts.index[0], int(counts.iloc[0])
        if not (kind == "truncated" and notes):  # already said
            setting = REASON_SETTINGS.get(kind, "the filter section of the config")
            notes.append(
                f"**{n} of {len(kinds)} rejected captions ({n / len(kinds):.0%}) "
                f"were rejected as {kind}**; the setting behind it: {setting}."
            )
    return notes


def truncation_note(table: pd.DataFrame, cfg: PipelineConfig) -> list[str]:
    """The sentence saying most captions were truncated (none when half or fewer were)."""
    if "truncated" not in table or not len(table):
        return []
    cut = table.truncated.astype(bool)
    if "override" in table:  # a caption a person wrote is whole
        cut &= ~table.override.astype(bool)
    n, total = int(cut.sum()), len(table)
    if n * 2 <= total:
        return []
    verdict = (
        "they were rejected (filter.reject_truncated)"
        if cfg.filter.reject_truncated
        else "they were kept, cut mid-sentence, because filter.reject_truncated is off"
    )
    return [
        f"**{n} of {total} captions ({n / total:.0%}) were truncated**: the captioner hit its "
        f"token limit (caption.max_new_tokens = {cfg.caption.max_new_tokens}) before it "
        f"finished, and {verdict}. Raise caption.max_new_tokens, or ask for a shorter "
        "caption in caption.prompt."
    ]


def _with_columns(captions: pd.DataFrame) -> pd.DataFrame:
    """The captions with at least clip_id and caption: a table of no rows may have been
    written with no columns at all."""
    for name in ("clip_id", "caption"):
        if name not in captions:
            captions[name] = pd.Series(dtype=object)
    return captions


def _nothing_selected(result: StageResult) -> EmptyStage:
    """The error of a filter that selected no caption, with the commonest reasons."""
    n = result.counts["captions"]
    if not n:
        return EmptyStage("filter: no caption to judge (no clip reached the caption stage)")
    kinds = sorted(result.stats["rejections"].items(), key=lambda kv: -kv[1])[:3]
    top = ", ".join(f"{kind} ({count})" for kind, count in kinds)
    return EmptyStage(f"filter: no caption selected: {n} captions, every one rejected ({top})")
