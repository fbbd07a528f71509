"""Caption: every kept clip gets a caption from a vision-language model, in resumable batches.

What is notable:
- Clips are ordered by frame size, then `clip_id`, and cut into batches of `batch_size`:
  clips of one size get the same number of image tokens (LLaVA-NeXT's "anyres" tiles
  depend on it), so a batch pads little.
- Batch b belongs to shard b mod `shards`, so N shards differ by at most one batch (the
  slowest shard sets the wall time of N workers). Each shard is its own run:
  `cogpipe caption CONFIG --shard K` on N GPU workers captions N shards at once; the
  stage merges once every shard's parts are committed. The i-th batch of shard s is
  committed as `part-{s:03d}-{i:05d}.parquet`. The batches are a pure function of the
  kept clips, so a restart skips committed parts (a crash loses at most the batch in
  flight), never loads the model when none is left, and gives the same captions as an
  uninterrupted run (with left padding a caption can depend on its batch: `batch_size`
  is part of the key, and `shards`, which names the parts).
- One writer per part across processes and hosts sharing the workspace: a part is held
  (`Workspace.hold`, freed when its holder dies) from before its frames are decoded until
  it is committed. Two runs of one config share the parts; each waits for the parts the
  other holds before the merge, and captions those the other did not commit.
- Frames are decoded in background threads a few batches ahead (PyAV releases the GIL),
  so the GPU does not wait on the CPU; the processor and `generate` run on the main thread.
- Video-native models (LLaVA-NeXT-Video, LLaVA-OneVision) get the frames as one video;
  image models (LLaVA, LLaVA-NeXT) get them as a sequence of images (see cogpipe.vlm).
- A clip whose frames cannot be decoded is a row with `error` and no caption, and so is
  an empty caption; the stage goes on. A failure of `generate` itself (out of memory)
  stops the stage and leaves every committed part intact.

    cogpipe caption demo/demo.yaml             # every shard, then the merge
    cogpipe caption demo/demo.yaml --shard 3   # one shard (one GPU worker)
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pandas as pd

from cogpipe.captions_in import existing_captions
from cogpipe.config import CaptionConfig, ConfigError, PipelineConfig
from cogpipe.errors import first_line
from cogpipe.video import even_times, read_frames
from cogpipe.vlm import Captioner, chat_text, release
from cogpipe.vlm import load_captioner as _load
from cogpipe.workspace import (
    Busy,
    Progress,
    ShardsIncomplete,
    StageResult,
    Workspace,
    clean_stale_tmp,
    model_fingerprint,
    no_progress,
    read_parts,
    read_table,
    resolve_device,
    stage_key,
    write_table,
)

VERSION = 3  # 3: batches dealt to shards in turn (was: clips by a hash of clip_id)
EXISTING_COLUMNS = {
    "error": None,
    "model": None,
    "prompt_hash": None,
    "tokens": 0,
    "truncated": False,
    "seconds": 0.0,
}
COLUMNS = [
    "clip_id",
    "caption",
    "error",
    "model",
    "prompt_hash",
    "tokens",
    "truncated",
    "seconds",
    "source",
]
DECODE_AHEAD = 3  # batches decoded ahead of the one generating


def key_of(cfg: PipelineConfig, inputs: dict[str, str]) -> str:
    fields = cfg.caption.key_fields() | {
        "model_fp": model_fingerprint(cfg.caption.model, cfg.caption.revision)
    }
    return stage_key("caption", VERSION, fields, inputs)


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def part_path(out: Path, shard: int, index: int) -> Path:
    return out / f"part-{shard:03d}-{index:05d}.parquet"


def part_lock(ws: Workspace, out: Path, shard: int, index: int) -> str:
    """The lock (`ws.hold`) of a part: its path below the workspace, e.g.
    `caption-<key>-part-000-00012` or `cache-recaption-<pass key>-part-000-00003`."""
    return "-".join([*out.relative_to(ws.root).parts, part_path(out, shard, index).stem])


def make_batches(clips: pd.DataFrame, batch_size: int) -> list[pd.DataFrame]:
    """Clips ordered by frame size (when known), then clip_id, cut into consecutive batches."""
    order = [c for c in ("width", "height") if c in clips] + ["clip_id"]
    clips = clips.sort_values(order, kind="stable").reset_index(drop=True)
    return [clips.iloc[i : i + batch_size] for i in range(0, len(clips), batch_size)]


def shard_batches(clips: pd.DataFrame, cc: CaptionConfig, shard: int) -> list[pd.DataFrame]:
    """Shard `shard`'s batches: every `cc.shards`-th batch of the whole set (make_batches)."""
    return make_batches(clips, cc.batch_size)[shard :: cc.shards]


# --------------------------------------------------------------------------- model


def load_captioner(cc: CaptionConfig, device: str | None = None) -> Captioner:
    """The config's captioner (hub id or folder) on `device` (default: the config's)."""
    return _load(cc.model, cc.revision, device or resolve_device(cc.device), cc.dtype)


# --------------------------------------------------------------------------- frames


def decode_clip(clip, num_frames: int) -> np.ndarray:
    """`num_frames` RGB frames [F, H, W, 3] spread evenly over the clip's span [start, end).

    Raises:
        Exception: whatever the decoder raises for an unreadable file.
    """
    return read_frames(clip.path, even_times(clip.start, clip.end, num_frames))


def decode_batch(
    batch: pd.DataFrame, num_frames: int
) -> list[tuple[np.ndarray | None, str | None]]:
    """(frames, None) for every clip that decodes, (None, reason) for every clip that does not."""
    out = []
    for clip in batch.itertuples(index=False):
        try:
            out.append((decode_clip(clip, num_frames), None))
        except Exception as e:  # VideoError, OSError...
            out.append((None, f"cannot decode frames: {first_line(e)}"))
    return out


def decode_threads(configured: int = 0) -> int:
    """Threads for frame decoding: the configured count, else one per usable core."""
    return configured or max(len(os.sched_getaffinity(0)), 1)


def prefetch(
    batches: Iterable[tuple[int, pd.DataFrame]],
    num_frames: int,
    workers: int = 0,
    ahead: int = DECODE_AHEAD,
) -> Iterator[tuple[int, pd.DataFrame, list]]:
    """Yield (index, batch, decoded) in order, decoding up to `ahead` batches ahead.

    Clips, not batches, are the unit of work, so the threads (`workers`, 0: one per core;
    PyAV decodes without the GIL) share every batch.
    """
    workers = decode_threads(workers)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="caption-decode") as pool:
        pending: deque[tuple[int, pd.DataFrame, list[Future]]] = deque()

        def submit(index: int, batch: pd.DataFrame) -> None:
            futures = [
                pool.submit(decode_batch, batch.iloc[[j]], num_frames) for j in range(len(batch))
            ]
            pending.append((index, batch, futures))

        def take() -> tuple[int, pd.DataFrame, list]:
            i, b, futures = pending.popleft()
            return i, b, [f.result()[0] for f in futures]

        for index, batch in batches:
            submit(index, batch)
            if len(pending) > ahead:
                yield take()
        while pending:
            yield take()


# --------------------------------------------------------------------------- generation


def generate(
    cap: Captioner, clips_frames: list[np.ndarray], cc: CaptionConfig, prompt: str | None = None
) -> list[tuple[str, int, bool]]:
    """Greedy captions for a batch of clips.

    Args:
        cap: the loaded captioner.
        clips_frames: per clip, its frames [F, H, W, 3] uint8.
        cc: the caption config (prompt, max_new_tokens, no_repeat_ngram_size).
        prompt: the instruction, when not `cc.prompt` (a re-caption pass).

    Returns:
        Per clip: (caption, new tokens up to and including EOS, truncated without EOS).
    """
    import torch

    if cc.temperature > 0:  # the same batch samples the same captions on a restart
        torch.manual_seed(cc.seed)
    text = chat_text(cap, len(clips_frames[0]), prompt or cc.prompt)
    media = {"videos": clips_frames} if cap.video else {"images": [list(f) for f in clips_frames]}
    inputs = cap.processor(
        text=[text] * len(clips_frames), return_tensors="pt", padding=True, **media
    )
    inputs = inputs.to(cap.device, cap.model.dtype)  # casts only floating tensors
    with torch.inference_mode():
        out = cap.model.generate(
            **inputs,
            max_new_tokens=cc.max_new_tokens,
            do_sample=cc.temperature > 0,
            **({"temperature": cc.temperature, "top_p": 0.95} if cc.temperature > 0 else {}),
            no_repeat_ngram_size=cc.no_repeat_ngram_size or None,
        )
    new = out[:, inputs["input_ids"].shape[1] :].cpu()  # [B, T] only the generated tokens
    captions = cap.processor.batch_decode(new, skip_special_tokens=True)
    results = []
    for ids, text in zip(new.tolist(), captions, strict=True):
        ends = [t for t, tok in enumerate(ids) if tok in cap.eos_ids]
        tokens = ends[0] + 1 if ends else len(ids)
        results.append((text.strip(), tokens, not ends))
    return results


def caption_batch(
    cap: Captioner, batch: pd.DataFrame, decoded: list, cc: CaptionConfig, prompt: str | None = None
) -> pd.DataFrame:
    """One part's rows: a caption for every decoded clip, an error for every other.

    Args:
        cap: the loaded captioner.
        batch: clips.parquet rows of the batch.
        decoded: `decode_batch(batch, ...)`, aligned with `batch`.
        cc: the caption config.
        prompt: the instruction, when not `cc.prompt`.

    Returns:
        A table with COLUMNS, one row per clip of the batch, in batch order.
    """
    started = time.time()
    prompt = prompt or cc.prompt
    ok = [i for i, (frames, _) in enumerate(decoded) if frames is not None]
    results = generate(cap, [decoded[i][0] for i in ok], cc, prompt) if ok else []
    generated = dict(zip(ok, results, strict=True))  # position in batch -> result
    per_clip = round((time.time() - started) / max(len(ok), 1), 4)  # s, share of the batch
    rows, phash = [], prompt_hash(prompt)
    for i, clip_id in enumerate(batch.clip_id):
        row = {"clip_id": clip_id, "model": cc.model, "prompt_hash": phash, "source": "model"}
        if i in generated:
            text, tokens, truncated = generated[i]
            error = None if text else "empty caption"
            row |= {
                "caption": text or None,
                "error": error,
                "tokens": tokens,
                "truncated": truncated,
                "seconds": per_clip,
            }
        else:
            row |= {
                "caption": None,
                "error": decoded[i][1],
                "tokens": 0,
                "truncated": False,
                "seconds": 0.0,
            }
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def caption_clips(
    cap: Captioner, clips: pd.DataFrame, cc: CaptionConfig, prompt: str | None = None
) -> pd.DataFrame:
    """Caption clips in memory (no workspace, no parts), batched exactly as one shard is;
    rows sorted by clip_id."""
    parts = [
        caption_batch(cap, b, decode_batch(b, cc.num_frames), cc, prompt)
        for b in make_batches(clips, cc.batch_size)
    ]
    if not parts:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat(parts, ignore_index=True).sort_values("clip_id", ignore_index=True)


# --------------------------------------------------------------------------- passes


def caption_pass(
    ws: Workspace,
    out: Path,
    clips: pd.DataFrame,
    cc: CaptionConfig,
    shards: list[int],
    prompt: str | None = None,
    progress: Progress = no_progress,
    merge_only: bool = False,
) -> tuple[int, int]:
    """Commit every missing part of the given shards of `clips` into `out`.

    Each part has one writer across processes (`ws.hold`): parts another process holds
    are skipped, then waited for, and encoded here if it ended without committing them.
    The model is loaded only if this process captions a part, once for all the shards.

    Returns:
        (parts in those shards, parts that were already committed when the pass began).

    Raises:
        ShardsIncomplete: with `merge_only`, a part is missing (nothing is loaded).
    """
    batches = [(s, i, b) for s in shards for i, b in enumerate(shard_batches(clips, cc, s))]
    todo = [(s, i, b) for s, i, b in batches if not part_path(out, s, i).is_file()]
    if merge_only and todo:
        missing = sorted({s for s, _, _ in todo})
        raise ShardsIncomplete(
            f"{out}: {len(todo)} of {len(batches)} caption parts are not committed"
            f" (shards {', '.join(map(str, missing))})"
        )
    for s in shards:  # temporaries of a killed run of these shards; other shards may be live
        clean_stale_tmp(out, f".tmp-part-{s:03d}-*")
    total = sum(len(b) for *_, b in batches)
    done = total - sum(len(b) for *_, b in todo)
    progress(done, total, f"{len(batches) - len(todo)} of {len(batches)} parts committed")
    if todo:
        _Parts(ws, out, cc, shards, prompt, progress, done, total).commit(todo)
    return len(batches), len(batches) - len(todo)


Part = tuple[int, int, pd.DataFrame]  # (shard, index in the shard, batch)


class _Parts:
    """Commits caption parts, each held (`ws.hold`) by this process while it writes it."""

    def __init__(
        self,
        ws: Workspace,
        out: Path,
        cc: CaptionConfig,
        shards: list[int],
        prompt: str | None,
        progress: Progress,
        done: int,
        total: int,
    ):
        self.ws, self.out, self.cc, self.shards, self.prompt = ws, out, cc, shards, prompt
        self.progress, self.done, self.total = progress, done, total
        self.cap: Captioner | None = None

    def commit(self, todo: list[Part]) -> None:
        """Caption every part of `todo` no other process holds; then wait for the parts
        others hold and caption those they did not commit (a killed run's), until none
        is left."""
        try:
            while todo:
                busy = self._caption_free(todo)
                for s, i, _ in busy:
                    self._wait_for(s, i)
                todo = [(s, i, b) for s, i, b in busy if not part_path(self.out, s, i).is_file()]
        finally:
            if self.cap is not None:
                release(self.cap)

    def _claim(self, todo: list[Part], held: dict[int, ExitStack], busy: list[Part]):
        """(n, batch) of each part of `todo` this process now holds and nobody committed;
        the parts another process holds go to `busy`. Claimed before decoding: a skipped
        part is never in the decode queue."""
        for n, (s, i, batch) in enumerate(todo):
            lock = ExitStack()
            try:
                lock.enter_context(self.ws.hold(part_lock(self.ws, self.out, s, i), wait=False))
            except Busy:
                busy.append(todo[n])
                continue
            if part_path(self.out, s, i).is_file():  # committed by another process meanwhile
                lock.close()
                continue
            held[n] = lock
            yield n, batch

    def _caption_free(self, todo: list[Part]) -> list[Part]:
        """Caption the parts of `todo` that are free; returns those another process held."""
        held: dict[int, ExitStack] = {}
        busy: list[Part] = []
        cc = self.cc
        try:
            claimed = self._claim(todo, held, busy)
            for n, batch, decoded in prefetch(claimed, cc.num_frames, cc.decode_workers):
                s, i, _ = todo[n]
                rows = caption_batch(self._captioner(), batch, decoded, cc, self.prompt)
                write_table(part_path(self.out, s, i), rows)
                held.pop(n).close()
                self.done += len(batch)
                self.progress(self.done, self.total, f"shard {s} part {i + 1}")
        finally:
            for lock in held.values():
                lock.close()
        return busy

    def _captioner(self) -> Captioner:
        """The captioner, loaded at the first part this process captions."""
        if self.cap is None:
            device = resolve_device(self.cc.device)
            if device == "cuda" and len(self.shards) == 1:  # one shard per GPU on a multi-GPU host
                device = _shard_device(self.shards[0])
            started = time.perf_counter()
            self.cap = load_captioner(self.cc, device)
            seconds = time.perf_counter() - started
            self.progress(self.done, self.total, f"captioner loaded on {device} in {seconds:.1f} s")
        return self.cap

    def _wait_for(self, shard: int, index: int) -> None:
        """Wait until the process writing part (shard, index) lets go of it."""
        name = part_path(self.out, shard, index).name

        def say(holder: str) -> None:
            self.progress(self.done, self.total, f"waiting for {name}, held by {holder}")

        with self.ws.hold(part_lock(self.ws, self.out, shard, index), on_wait=say):
            pass


def _shard_device(shard: int) -> str:
    import torch

    return f"cuda:{shard % max(torch.cuda.device_count(), 1)}"


def merge_parts(out: Path, clips: pd.DataFrame) -> pd.DataFrame:
    """Every committed part of `out`, one row per clip sorted by clip_id.

    Raises:
        RuntimeError: the parts do not cover `clips` exactly once.
    """
    table = read_parts(out)
    table = table if len(table) else pd.DataFrame(columns=COLUMNS)
    expected = set(clips.clip_id) if len(clips) else set()
    if table.clip_id.duplicated().any() or set(table.clip_id) != expected:
        raise RuntimeError(
            f"caption parts in {out} do not cover the {len(expected)} clips exactly once "
            f"({len(table)} rows); remove the folder and run again"
        )
    return table.sort_values("clip_id").reset_index(drop=True)


# --------------------------------------------------------------------------- stage


def kept_clips(check: StageResult) -> pd.DataFrame:
    clips = read_table(Path(check.path) / "clips.parquet")
    return clips[clips.keep.astype(bool)] if len(clips) else clips


def _to_caption(kept: pd.DataFrame, given: pd.DataFrame, existing: str) -> pd.DataFrame:
    """The clips the model captions: those without a given caption (fill), none (use)."""
    if existing == "use":
        return kept.iloc[:0]
    return kept[~kept.clip_id.isin(given.clip_id)]


def _with_existing(
    captioned: pd.DataFrame, kept: pd.DataFrame, given: pd.DataFrame, existing: str
) -> pd.DataFrame:
    """The model's rows, the given captions and (`use`) an error row per clip left without
    one: every kept clip once, sorted by clip_id."""
    rows = [given.assign(**EXISTING_COLUMNS)]
    if existing == "use":
        bare = kept.loc[~kept.clip_id.isin(given.clip_id), ["clip_id"]]
        error = "no caption (caption.existing: use, and none came with the data)"
        rows.append(bare.assign(caption=None, source=None, **(EXISTING_COLUMNS | {"error": error})))
    table = pd.concat([captioned, *rows], ignore_index=True)[COLUMNS]
    return table.astype({"truncated": bool, "tokens": int}).sort_values(
        "clip_id", ignore_index=True
    )


def run_caption(
    ws: Workspace,
    cfg: PipelineConfig,
    upstream: dict[str, StageResult],
    progress: Progress = no_progress,
    shard: int | None = None,
    merge_only: bool = False,
) -> StageResult | None:
    """Caption every kept clip and write `caption/<key>/captions.parquet`.

    Clips that come captioned (the dataset's captions, `caption.import_file`) keep their
    caption with its `source` under `caption.existing: fill` (the default) and `use`; the
    model captions the rest (fill), none (use, a clip without a caption is an error row), or
    every clip (ignore). The parts hold only the model's captions.

    Args:
        ws: the workspace.
        cfg: the pipeline config (uses `caption`).
        upstream: {"check": StageResult}.
        progress: called as (clips done, clips total, note) after every committed part.
        shard: caption only this shard and return None (a GPU worker's run); by default
            every shard not yet committed is captioned here, then the parts are merged.
        merge_only: only merge: every shard's runs have committed its parts (no model is
            loaded; a GPU pipeline merges on its CPU worker).

    Returns:
        The stage result (None for a single shard), with `_counts` and `_stats`.

    Raises:
        ConfigError: `shard` is not in [0, shards).
        ShardsIncomplete: `merge_only`, and a part is not committed.
        RuntimeError: the committed parts do not cover the kept clips exactly once.
    """
    started = time.time()
    cc = cfg.caption
    if shard is not None and not 0 <= shard < cc.shards:
        raise ConfigError(f"shard {shard} is not in [0, {cc.shards}) (caption.shards)")
    check = upstream["check"]
    key = key_of(cfg, {"check": check.key})
    out = ws.stage_dir("caption", key)
    if ws.done(out):
        return None if shard is not None else ws.result("caption", out)

    kept, clips = kept_clips(check), read_table(Path(check.path) / "clips.parquet")
    given, given_stats = existing_captions(cfg, kept, clips)
    todo = _to_caption(kept, given, cc.existing)
    shards = [shard] if shard is not None else list(range(cc.shards))
    parts, reused = caption_pass(
        ws, out, todo, cc, shards, progress=progress, merge_only=merge_only
    )
    if shard is not None:
        return None
    with ws.hold(f"caption-{key}-merge"):  # one writer of the table; a second finds it done
        if ws.done(out):
            return ws.result("caption", out)
        table = _with_existing(merge_parts(out, todo), kept, given, cc.existing)
        write_table(out / "captions.parquet", table)
        counts = _counts(table, parts, reused, model=len(todo), given=len(given))
        stats = _stats(table, given_stats)
        return ws.finish(StageResult("caption", key, str(out), counts, stats=stats), started)


def _stats(table: pd.DataFrame, given_stats: dict) -> dict:
    """The stage's stats: failures by kind, captions by source, and `existing_captions`'."""
    kinds = table.error.dropna().str.split(":").str[0].value_counts().to_dict()
    sources = table.source.value_counts().to_dict()
    return {"rejections": kinds, "sources": sources, **given_stats}


def _counts(table: pd.DataFrame, parts: int, reused: int, model: int, given: int) -> dict:
    """The stage's counts: clips, captioned, failed, truncated, tokens, parts (committed),
    parts_reused (committed before this run), model (clips for the model) and given (clips
    that came captioned)."""
    failed = table.error.notna()
    return {
        "clips": len(table),
        "captioned": int((~failed).sum()),
        "failed": int(failed.sum()),
        "truncated": int(table.truncated.astype(bool).sum()),
        "tokens": int(table.tokens.sum()),
        "parts": parts,
        "parts_reused": reused,
        "model": model,
        "given": given,
    }
