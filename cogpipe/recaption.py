"""Recaption: clips whose caption fails the filter's gate are captioned again with the
stricter `filter.retry_prompt`, between caption and filter, on a GPU like captioning.

What is notable:
- The gate is the filter's own (`judge_captions`, `token_counter`): its rules live in one
  place. A clip whose frames did not decode is not captioned again (a new prompt gives it
  nothing); an empty caption is.
- Round 1 re-captions every rejected clip (greedy), its batches dealt to `caption.shards`
  shards the way captioning deals them. Rounds 2..`retries` re-caption what the previous
  round left rejected, sampled (`retry_config`). A clip's rounds depend only on its own
  earlier captions, so shard K runs every round of its clips alone
  (`cogpipe recaption CONFIG --shard K`), and the merge loads no model. A clip keeps its
  first accepted caption; one never accepted keeps the caption stage's.
- Each round's parts live in a content-keyed folder, `cache/recaption/<pass key>/`, the
  pass key being the round's caption settings and the clips it re-captions: a re-run, or
  another gate that rejects the same clips, reuses every committed part.
- retries 0 (or `caption.existing: use`) copies the caption table: no model, no tokenizer.
- Parts have one writer across processes, as in captioning (`caption_pass`), and so does
  the merged table: two runs of one config share the rounds' parts and one merges.

    cogpipe recaption demo/demo.yaml             # every shard, then the merge
    cogpipe recaption demo/demo.yaml --shard 1   # one shard's rounds (one GPU worker)
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from cogpipe.caption import caption_pass, merge_parts, shard_batches
from cogpipe.config import CaptionConfig, ConfigError, FilterConfig, PipelineConfig
from cogpipe.filter import judge_captions, token_counter
from cogpipe.models.cogvideox import component_fingerprint
from cogpipe.workspace import (
    Progress,
    ShardsIncomplete,
    StageResult,
    Workspace,
    model_fingerprint,
    no_progress,
    read_parts,
    read_table,
    resolve_device,
    stage_key,
    write_table,
)

VERSION = 1
Counter = Callable[[str], int] | None


def key_of(cfg: PipelineConfig, inputs: dict[str, str]) -> str:
    # Models by fingerprint, never by path: the captioner, and the video model's tokenizer
    # (the gate's token limit). The caption settings come in through the caption key.
    fields = cfg.filter.gate_fields() | {
        "model_fp": model_fingerprint(cfg.caption.model, cfg.caption.revision),
        "tokenizer": component_fingerprint(cfg.model, "tokenizer"),
    }
    return stage_key("recaption", VERSION, fields, inputs)


def retry_config(cfg: PipelineConfig, round_: int) -> CaptionConfig:
    """Round r's caption settings: the stricter prompt, no repeated trigrams; from round 2 on,
    sampled (greedy decoding would give round 1's caption again)."""
    sampled = {"temperature": 0.7, "seed": round_} if round_ > 1 else {}
    ngram = max(cfg.caption.no_repeat_ngram_size, 3)
    return cfg.caption.model_copy(
        update={"prompt": cfg.filter.retry_prompt, "no_repeat_ngram_size": ngram, **sampled}
    )


def pass_dir(ws: Workspace, cc: CaptionConfig, round_: int, clip_ids: list[str]) -> Path:
    """`cache/recaption/<pass key>/`: a round's parts, keyed by its settings and its clips."""
    ids = hashlib.sha256("\n".join(sorted(clip_ids)).encode()).hexdigest()
    fields = cc.key_fields() | {"model_fp": model_fingerprint(cc.model, cc.revision)}
    key = stage_key("recaption-pass", VERSION, fields, {"round": str(round_), "clips": ids})
    return ws.cache_dir("recaption") / key


def rejected_ids(captions: pd.DataFrame, verdicts: list) -> list[str]:
    """The clips the gate rejected (`verdicts`: judge_captions') that a new caption may
    help: not those whose frames did not decode (their `error`), but an empty caption."""
    if not len(captions):
        return []
    bad = pd.Series([bool(r) for _, r in verdicts], captions.index)
    error = captions["error"] if "error" in captions else pd.Series(None, captions.index)
    retryable = error.isna() | (error == "empty caption")
    return sorted(captions.clip_id[bad & retryable])


def shard_rows(folder: Path, shard: int, ids: list[str]) -> pd.DataFrame:
    """Shard `shard`'s committed rows of a pass, one per clip of `ids`.

    Raises:
        RuntimeError: its parts do not cover `ids` exactly once.
    """
    table = read_parts(folder, f"part-{shard:03d}-*.parquet")
    found = sorted(table.clip_id) if len(table) else []
    if found != sorted(ids):
        raise RuntimeError(
            f"recaption parts of shard {shard} in {folder} do not cover its {len(ids)} clips"
            f" exactly once ({len(found)} rows); remove the folder and run again"
        )
    return table


def on_shard_device(cc: CaptionConfig, shard: int) -> CaptionConfig:
    """Shard K's later rounds on the GPU caption_pass gives shard K (K mod GPUs)."""
    if resolve_device(cc.device) != "cuda":
        return cc
    import torch

    return cc.model_copy(update={"device": f"cuda:{shard % max(torch.cuda.device_count(), 1)}"})


def later_rounds(
    ws: Workspace,
    cfg: PipelineConfig,
    clips: pd.DataFrame,
    first: pd.DataFrame,
    shard: int,
    count: Counter,
    progress: Progress,
    merge_only: bool,
) -> tuple[list[pd.DataFrame], int, int]:
    """Rounds 2..retries of one shard: each re-captions what the round before left rejected.

    Returns:
        (every round's rows with `attempt`, round 1's included; parts; parts reused).

    Raises:
        ShardsIncomplete: with `merge_only`, a part of a round is missing.
    """
    rows, rounds, parts, reused = first, [first.assign(attempt=1)], 0, 0
    for round_ in range(2, cfg.filter.retries + 1):
        still = rejected_ids(rows, judge_captions(rows, cfg.filter, count))
        if not still:
            break
        cc = on_shard_device(retry_config(cfg, round_).model_copy(update={"shards": 1}), shard)
        folder, todo = pass_dir(ws, cc, round_, still), clips[clips.clip_id.isin(still)]
        try:
            n, r = caption_pass(ws, folder, todo, cc, [0], progress=progress, merge_only=merge_only)
        except ShardsIncomplete as e:  # its parts are all "shard 0" of the round's folder
            raise ShardsIncomplete(f"recaption shard {shard}, round {round_}: {e}") from None
        rows, parts, reused = merge_parts(folder, todo), parts + n, reused + r
        rounds.append(rows.assign(attempt=round_))
    return rounds, parts, reused


def run_rounds(
    ws: Workspace,
    cfg: PipelineConfig,
    check: StageResult,
    rejected: list[str],
    shards: list[int],
    count: Counter,
    progress: Progress,
    merge_only: bool,
) -> tuple[pd.DataFrame, int, int]:
    """Every round of the given shards over the `rejected` clips of `check`'s table (round 1
    of them all with one model load); nothing when no clip is rejected.

    Returns:
        (the re-captions with `attempt`, the round; parts; parts that were committed).

    Raises:
        ShardsIncomplete: with `merge_only`, a part is missing (nothing is loaded).
    """
    if not rejected:
        return pd.DataFrame(), 0, 0
    clips = read_table(Path(check.path) / "clips.parquet")
    cc = retry_config(cfg, 1)
    todo = clips[clips.clip_id.isin(rejected)]
    folder = pass_dir(ws, cc, 1, rejected)
    parts, reused = caption_pass(
        ws, folder, todo, cc, shards, progress=progress, merge_only=merge_only
    )
    rounds = []
    for s in shards:
        ids = [c for batch in shard_batches(todo, cc, s) for c in batch.clip_id]
        if not ids:  # fewer batches than shards
            continue
        first = shard_rows(folder, s, ids)
        more, n, r = later_rounds(ws, cfg, clips, first, s, count, progress, merge_only)
        rounds, parts, reused = rounds + more, parts + n, reused + r
    return pd.concat(rounds, ignore_index=True) if rounds else pd.DataFrame(), parts, reused


def assemble(
    captions: pd.DataFrame, retried: pd.DataFrame, fc: FilterConfig, count: Counter
) -> pd.DataFrame:
    """The caption table with `attempt` and `source`, each clip's first accepted re-caption
    (at most one per clip: a round re-captions only what the one before rejected) in place."""
    table = captions.assign(attempt=0)
    if "source" not in table:  # a caption table from before `source`: the model's
        table["source"] = "model"
    table = table.set_index("clip_id")
    if len(retried):
        ok = [not reasons for _, reasons in judge_captions(retried, fc, count)]
        new = retried[ok].set_index("clip_id")
        cols = [c for c in new.columns if c in table.columns]
        table.loc[new.index, cols] = new[cols]
        table.loc[new.index, "source"] = "model"
    return table.reset_index().astype({"attempt": int})


def recaption_counts(
    table: pd.DataFrame, retried: pd.DataFrame, verdicts: list, parts: int, reused: int
) -> dict[str, int]:
    """clips, rejected_before, recaptioned, accepted_after, parts; per round: the clips
    re-captioned (`round<r>`) and the re-captions accepted (`round<r>_accepted`)."""
    rejected = sum(bool(r) for _, r in verdicts)
    replaced = int((table.attempt > 0).sum())
    counts = {
        "clips": len(table),
        "rejected_before": rejected,
        "recaptioned": retried.clip_id.nunique() if len(retried) else 0,
        "accepted_after": len(table) - rejected + replaced,
        "parts": parts,
        "parts_reused": reused,
    }
    for r in sorted(set(retried.attempt)) if len(retried) else []:
        counts[f"round{r}"] = int((retried.attempt == r).sum())
        counts[f"round{r}_accepted"] = int((table.attempt == r).sum())
    return counts


def rejection_kinds(verdicts: list) -> dict[str, int]:
    """Reasons by kind (the text before the first parenthesis), as the filter counts them."""
    kinds = pd.Series([r.split(" (")[0] for _, reasons in verdicts for r in reasons])
    return {k: int(n) for k, n in kinds.value_counts().items()}


def copy_captions(
    ws: Workspace, key: str, out: Path, captions: pd.DataFrame, started: float
) -> StageResult:
    """Nothing to re-caption by config: the caption table with attempt 0."""
    with ws.hold(f"recaption-{key}-merge"):
        if ws.done(out):
            return ws.result("recaption", out)
        table = assemble(captions, pd.DataFrame(), FilterConfig(), count=None)
        write_table(out / "captions.parquet", table)
        result = StageResult("recaption", key, str(out), {"clips": len(table), "recaptioned": 0})
        return ws.finish(result, started)


def run_recaption(
    ws: Workspace,
    cfg: PipelineConfig,
    upstream: dict[str, StageResult],
    progress: Progress = no_progress,
    shard: int | None = None,
    merge_only: bool = False,
) -> StageResult | None:
    """Re-caption the clips whose caption the gate rejects; write `recaption/<key>/captions.parquet`.

    Args:
        ws: the workspace.
        cfg: the pipeline config (uses `filter`'s gate, `retries` and `retry_prompt`, and
            `caption`'s model, batching and shards).
        upstream: {"caption": StageResult, "check": StageResult}.
        progress: called as (clips done, clips total, note) after every committed part.
        shard: run only this shard's rounds and return None (a GPU worker's run).
        merge_only: only merge: every shard's runs have committed their parts (no model).

    Returns:
        The stage result (None for a single shard). The table has one row per row of the
        caption table, with `attempt` (0: the caption stage's caption, r: round r's) and
        `source`; counts as `recaption_counts`.

    Raises:
        ConfigError: `shard` is not in [0, caption.shards).
        ShardsIncomplete: `merge_only`, and a part is not committed.
        RuntimeError: the committed parts do not cover their clips exactly once.
    """
    started = time.time()
    if shard is not None and not 0 <= shard < cfg.caption.shards:
        raise ConfigError(f"shard {shard} is not in [0, {cfg.caption.shards}) (caption.shards)")
    caption, check = upstream["caption"], upstream["check"]
    key = key_of(cfg, {"caption": caption.key, "check": check.key})
    out = ws.stage_dir("recaption", key)
    if ws.done(out):
        return None if shard is not None else ws.result("recaption", out)

    captions = read_table(Path(caption.path) / "captions.parquet")
    if not cfg.filter.retries or cfg.caption.existing == "use":  # `use`: never caption
        return None if shard is not None else copy_captions(ws, key, out, captions, started)
    count = token_counter(cfg)
    verdicts = judge_captions(captions, cfg.filter, count)
    rejected = rejected_ids(captions, verdicts)
    shards = [shard] if shard is not None else list(range(cfg.caption.shards))
    retried, parts, reused = run_rounds(
        ws, cfg, check, rejected, shards, count, progress, merge_only
    )
    if shard is not None:
        return None
    with ws.hold(f"recaption-{key}-merge"):  # one writer of the table; a second finds it done
        if ws.done(out):
            return ws.result("recaption", out)
        table = assemble(captions, retried, cfg.filter, count)
        write_table(out / "captions.parquet", table)
        counts = recaption_counts(table, retried, verdicts, parts, reused)
        stats = {"rejections": rejection_kinds(verdicts)}
        return ws.finish(StageResult("recaption", key, str(out), counts, stats=stats), started)
