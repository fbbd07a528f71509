"""Caption: every kept clip gets a caption from a vision-language model, in resumable batches.

What is notable:
- Batches are a pure function of the kept clips sorted by `clip_id` and `batch_size`:
  batch i is clips[i*bs:(i+1)*bs], committed as `part-{i:05d}.parquet`. A restart skips
  committed parts (a crash loses at most the batch in flight) and never loads the model
  when none is left. Greedy decoding over the same batches gives a resumed run the same
  captions as an uninterrupted one (with left padding a caption can depend on its batch,
  which is why `batch_size` is part of the key).
- Frames are decoded one batch ahead in background threads, so the GPU does not wait on
  PyAV; the processor and `generate` run on the main thread.
- Video-native models (LLaVA-NeXT-Video, LLaVA-OneVision) get the frames as one video;
  image models (LLaVA, LLaVA-NeXT) get them as a sequence of images.
- A clip whose frames cannot be decoded is a row with `error` and no caption, and so is
  an empty caption; the stage goes on. A failure of `generate` itself (out of memory)
  stops the stage and leaves every committed part intact.

    cogpipe caption configs/demo.yaml
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cogpipe.config import CaptionConfig, PipelineConfig
from cogpipe.video import even_times, read_frames
from cogpipe.workspace import (
    Progress,
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

VERSION = 1
VIDEO_MODEL_TYPES = {"llava_next_video", "llava_onevision"}  # take frames as one video
COLUMNS = ["clip_id", "caption", "error", "model", "prompt_hash", "tokens", "truncated", "seconds"]
DECODE_WORKERS = 2  # batches decoded ahead of the one generating


def key_of(cfg: PipelineConfig, inputs: dict[str, str]) -> str:
    fields = cfg.caption.key_fields() | {
        "model_fp": model_fingerprint(cfg.caption.model, cfg.caption.revision)
    }
    return stage_key("caption", VERSION, fields, inputs)


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def part_path(out: Path, index: int) -> Path:
    return out / f"part-{index:05d}.parquet"


def make_batches(clips: pd.DataFrame, batch_size: int) -> list[pd.DataFrame]:
    """Split clips, sorted by clip_id, into consecutive batches: batch i = clips[i*bs:(i+1)*bs]."""
    clips = clips.sort_values("clip_id", kind="stable").reset_index(drop=True)
    return [clips.iloc[i : i + batch_size] for i in range(0, len(clips), batch_size)]


# --------------------------------------------------------------------------- model


@dataclass
class Captioner:
    """A loaded vision-language model and what generation needs to know about it."""

    processor: Any
    model: Any
    device: str
    video: bool  # frames go in as one video, not as separate images
    eos_ids: set[int]


def _dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def load_captioner(cc: CaptionConfig) -> Captioner:
    """Load the processor and model from a hub id or local folder, ready for batched generation.

    Args:
        cc: the caption config (model, revision, dtype, device).

    Returns:
        The Captioner, in eval mode on its device, with left padding.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = resolve_device(cc.device)
    processor = AutoProcessor.from_pretrained(cc.model, revision=cc.revision)
    processor.tokenizer.padding_side = "left"  # generation appends on the right
    model = AutoModelForImageTextToText.from_pretrained(
        cc.model, revision=cc.revision, dtype=_dtype(cc.dtype, device), attn_implementation="sdpa"
    )
    model = model.to(device).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    video = model.config.model_type in VIDEO_MODEL_TYPES
    return Captioner(processor, model, device, video, eos_ids)


def release(cap: Captioner) -> None:
    """Free the model's GPU memory for the stages that run next in the same process."""
    import torch

    cap.model = None
    if cap.device.startswith("cuda"):
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- frames


def decode_clip(clip: Any, num_frames: int) -> list:
    """`num_frames` PIL frames spread evenly over the clip's span [start, end).

    Args:
        clip: a clips.parquet row (path, start, end, fps).
        num_frames: frames to sample.

    Raises:
        Exception: whatever the decoder raises for an unreadable file.
    """
    from PIL import Image

    frames = read_frames(clip.path, even_times(clip.start, clip.end, num_frames))  # [F, H, W, 3]
    return [Image.fromarray(f) for f in frames]


def decode_batch(batch: pd.DataFrame, num_frames: int) -> list[tuple[list | None, str | None]]:
    """(frames, None) for every clip that decodes, (None, reason) for every clip that does not."""
    out = []
    for clip in batch.itertuples(index=False):
        try:
            out.append((decode_clip(clip, num_frames), None))
        except Exception as e:  # VideoError, OSError...
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            out.append((None, f"cannot decode frames: {first}"))
    return out


def prefetch(
    batches: list[tuple[int, pd.DataFrame]], num_frames: int, workers: int = DECODE_WORKERS
) -> Iterator[tuple[int, pd.DataFrame, list]]:
    """Yield (index, batch, decoded) in order, decoding up to `workers` batches ahead."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="caption-decode") as pool:
        pending: deque[tuple[int, pd.DataFrame, Future]] = deque()
        for index, batch in batches:
            pending.append((index, batch, pool.submit(decode_batch, batch, num_frames)))
            if len(pending) > workers:
                i, b, fut = pending.popleft()
                yield i, b, fut.result()
        while pending:
            i, b, fut = pending.popleft()
            yield i, b, fut.result()


# --------------------------------------------------------------------------- generation


def chat_text(cap: Captioner, num_frames: int, prompt: str) -> str:
    """The chat-formatted prompt: the frames (one video or `num_frames` images), then the text."""
    media = [{"type": "video"}] if cap.video else [{"type": "image"}] * num_frames
    messages = [{"role": "user", "content": [*media, {"type": "text", "text": prompt}]}]
    return cap.processor.apply_chat_template(messages, add_generation_prompt=True)


def generate(
    cap: Captioner, clips_frames: list[list], cc: CaptionConfig
) -> list[tuple[str, int, bool]]:
    """Greedy captions for a batch of clips.

    Args:
        cap: the loaded captioner.
        clips_frames: per clip, its list of PIL frames.
        cc: the caption config (prompt, max_new_tokens, no_repeat_ngram_size).

    Returns:
        Per clip: (caption, new tokens up to and including EOS, truncated without EOS).
    """
    import torch

    texts = [chat_text(cap, len(clips_frames[0]), cc.prompt)] * len(clips_frames)
    media = {"videos" if cap.video else "images": clips_frames}
    inputs = cap.processor(text=texts, return_tensors="pt", padding=True, **media)
    inputs = inputs.to(cap.device, cap.model.dtype)  # casts only floating tensors
    with torch.inference_mode():
        out = cap.model.generate(
            **inputs,
            max_new_tokens=cc.max_new_tokens,
            do_sample=False,
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
    cap: Captioner, batch: pd.DataFrame, decoded: list, cc: CaptionConfig
) -> pd.DataFrame:
    """One part's rows: a caption for every decoded clip, an error for every other.

    Args:
        cap: the loaded captioner.
        batch: clips.parquet rows of the batch.
        decoded: `decode_batch(batch, ...)`, aligned with `batch`.
        cc: the caption config.

    Returns:
        A table with COLUMNS, one row per clip of the batch, in batch order.
    """
    started = time.time()
    ok = [i for i, (frames, _) in enumerate(decoded) if frames is not None]
    results = generate(cap, [decoded[i][0] for i in ok], cc) if ok else []
    generated = dict(zip(ok, results, strict=True))  # position in batch -> result
    per_clip = round((time.time() - started) / max(len(ok), 1), 4)  # s, share of the batch
    rows, phash = [], prompt_hash(cc.prompt)
    for i, clip_id in enumerate(batch.clip_id):
        row = {"clip_id": clip_id, "model": cc.model, "prompt_hash": phash}
        if i in generated:
            text, tokens, truncated = generated[i]
            error = None if text else "empty caption"
            row |= {"caption": text or None, "error": error, "tokens": tokens,
                    "truncated": truncated, "seconds": per_clip}  # fmt: skip
        else:
            row |= {"caption": None, "error": decoded[i][1], "tokens": 0,
                    "truncated": False, "seconds": 0.0}  # fmt: skip
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def caption_clips(cap: Captioner, clips: pd.DataFrame, cc: CaptionConfig) -> pd.DataFrame:
    """Caption clips in memory (no workspace, no parts), batched exactly as the stage does."""
    parts = [
        caption_batch(cap, b, decode_batch(b, cc.num_frames), cc)
        for b in make_batches(clips, cc.batch_size)
    ]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS)


# --------------------------------------------------------------------------- stage


def run_caption(
    ws: Workspace,
    cfg: PipelineConfig,
    upstream: dict[str, StageResult],
    progress: Progress = no_progress,
) -> StageResult:
    """Caption every kept clip and write `caption/<key>/captions.parquet`.

    Args:
        ws: the workspace.
        cfg: the pipeline config (uses `caption`).
        upstream: {"check": StageResult}.
        progress: called as (clips done, clips total, note) after every committed part.

    Returns:
        The stage result; counts hold clips, captioned, failed, parts and parts_reused.

    Raises:
        RuntimeError: the committed parts do not cover the kept clips exactly once.
    """
    started = time.time()
    check = upstream["check"]
    key = key_of(cfg, {"check": check.key})
    out = ws.stage_dir("caption", key)
    if ws.done(out):
        return ws.result("caption", out)
    clean_stale_tmp(out)

    cc = cfg.caption
    clips = read_table(Path(check.path) / "clips.parquet")
    clips = clips[clips.keep.astype(bool)] if len(clips) else clips
    batches = make_batches(clips, cc.batch_size)
    todo = [(i, b) for i, b in enumerate(batches) if not part_path(out, i).is_file()]
    done = sum(len(b) for i, b in enumerate(batches) if part_path(out, i).is_file())
    progress(done, len(clips), f"{len(batches) - len(todo)} of {len(batches)} parts committed")

    if todo:
        cap = load_captioner(cc)
        for i, batch, decoded in prefetch(todo, cc.num_frames):
            write_table(part_path(out, i), caption_batch(cap, batch, decoded, cc))
            done += len(batch)
            progress(done, len(clips), f"part {i + 1}/{len(batches)}")
        release(cap)
    reused = len(batches) - len(todo)
    return _merge(ws, out, key, clips, parts=len(batches), reused=reused, started=started)


def _merge(
    ws: Workspace, out: Path, key: str, clips: pd.DataFrame, parts: int, reused: int, started: float
) -> StageResult:
    """Merge committed parts into captions.parquet and write the done marker."""
    table = read_parts(out)
    table = table if len(table) else pd.DataFrame(columns=COLUMNS)
    expected = set(clips.clip_id) if len(clips) else set()
    if table.clip_id.duplicated().any() or set(table.clip_id) != expected:
        raise RuntimeError(
            f"caption parts in {out} do not cover the {len(expected)} kept clips exactly once "
            f"({len(table)} rows); remove the folder and run again"
        )
    table = table.sort_values("clip_id").reset_index(drop=True)
    write_table(out / "captions.parquet", table)

    failed = table.error.notna()
    counts = {
        "clips": len(table),
        "captioned": int((~failed).sum()),
        "failed": int(failed.sum()),
        "truncated": int(table.truncated.astype(bool).sum()),
        "tokens": int(table.tokens.sum()),
        "parts": parts,
        "parts_reused": reused,
    }
    kinds = table.error.dropna().str.split(":").str[0].value_counts().to_dict()
    result = StageResult("caption", key, str(out), counts, stats={"rejections": kinds})
    return ws.finish(result, started)
