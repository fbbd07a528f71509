"""Precompute: curated clips become VAE latents and T5 prompt embeddings in shards.

Each selected clip of the configured splits (sorted by clip_id) gives one sample: a
contiguous window of `frames` frames resampled to `fps` from the clip's start (real
motion speed, never a stride over the whole clip), resized and centre-cropped to the
`height x width` bucket, VAE-encoded, and its caption T5-encoded. A clip too short for
the window, or one that fails to decode, keeps its row in the index with the reason.

Work units are shards of `shard_size` samples, `shard-{i:05d}.safetensors`, each holding
`<clip_id>.latents` [F', C, H/8, W/8] and `<clip_id>.prompt_embeds` [L, D]; a restart
skips committed shards. Tensors keep the encoders' dtype: fp32 on CPU, the model's
weight dtype on GPU (fp16 for 2B-type, bf16 for 5B-type). Training casts them anyway.

Per-item results are shared across keys in `cache/latents` (by video, span, window,
bucket and VAE) and `cache/text` (by caption, tokenizer + encoder and length), so a
new shard size re-encodes nothing and an edited caption re-encodes only that caption.
The VAE and T5 are loaded only when something is missing from the caches.

    cogpipe precompute configs/demo.yaml
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cogpipe.config import PipelineConfig
from cogpipe.video import read_frames, resize_center_crop, window_times
from cogpipe.workspace import (
    Progress,
    StageResult,
    Workspace,
    atomic_path,
    clean_stale_tmp,
    model_fingerprint,
    no_progress,
    read_table,
    resolve_device,
    sha256_json,
    stage_key,
    write_table,
)

VERSION = 1
DECODE_AHEAD = 2  # clips decoded in background threads while the VAE encodes


def key_of(cfg: PipelineConfig, inputs: dict[str, str]) -> str:
    config = cfg.precompute.key_fields() | {"model_fp": model_fingerprint(cfg.model)}
    return stage_key("precompute", VERSION, config, inputs)


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def write_shard(path: Path, tensors: dict[str, Any], rejected: dict[str, str]) -> None:
    """Commit one shard atomically; clips that failed inside it are listed in its metadata."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"rejected": json.dumps(rejected, sort_keys=True)})


def shard_rejections(path: Path) -> dict[str, str]:
    """{clip_id: reason} of the clips that failed inside a committed shard."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("rejected", "{}"))


def _plan(
    cfg: PipelineConfig, upstream: dict[str, StageResult], vae_fp: Any, text_fp: Any, max_len: int
) -> pd.DataFrame:
    """One row per selected clip of the configured splits, sorted by clip_id: its frame
    window (or why it has none), its cache keys and its shard."""
    p = cfg.precompute
    curated = read_table(Path(upstream["filter"].path) / "curated.parquet")
    clips = read_table(Path(upstream["check"].path) / "clips.parquet")
    clips = clips[clips.keep & clips.split.isin(p.splits)]
    cols = ["clip_id", "video_id", "path", "start", "end", "fps"]
    plan = curated.loc[curated.selected, ["clip_id", "caption"]].merge(clips[cols], on="clip_id")
    plan = plan.sort_values("clip_id", ignore_index=True)

    plan["times"] = [window_times(r.start, r.end, p.fps, p.frames) for r in plan.itertuples()]
    plan["status"], plan["reason"], plan["shard"] = "ok", "", None
    short = plan.times.isna()
    plan.loc[short, "status"] = "rejected"
    plan.loc[short, "reason"] = [
        f"too short for {p.frames} frames at {p.fps:g} fps: {e - s:.2f} s (needs {(p.frames - 1) / p.fps:.2f} s)"
        for s, e in zip(plan.start[short], plan.end[short], strict=True)
    ]  # fmt: skip
    plan["latents_cache"] = [
        sha256_json({"video_id": r.video_id, "start": r.start, "end": r.end, "frames": p.frames,
                     "fps": p.fps, "height": p.height, "width": p.width, "vae": vae_fp})
        for r in plan.itertuples()
    ]  # fmt: skip
    plan["embeds_cache"] = [
        sha256_json({"caption": c, "text_encoder": text_fp, "max_len": max_len})
        for c in plan.caption
    ]
    ok = plan.index[plan.status == "ok"]
    for i in range(0, len(ok), p.shard_size):
        plan.loc[ok[i : i + p.shard_size], "shard"] = shard_name(i // p.shard_size)
    return plan


def _index(plan: pd.DataFrame, out: Path, p, latent_frames: int) -> pd.DataFrame:
    """index.parquet, with the clips that failed inside committed shards marked rejected."""
    plan = plan.copy()
    for shard in plan.shard.dropna().unique():
        for clip_id, reason in shard_rejections(out / shard).items():
            row = plan.clip_id == clip_id
            plan.loc[row, "status"], plan.loc[row, "reason"], plan.loc[row, "shard"] = (
                "rejected",
                reason,
                None,
            )
    ok = plan.status == "ok"
    return pd.DataFrame(
        {
            "clip_id": plan.clip_id,
            "caption": plan.caption,
            "shard": plan.shard,
            "latents_key": (plan.clip_id + ".latents").where(ok, None),  # tensor names in the shard
            "embeds_key": (plan.clip_id + ".prompt_embeds").where(ok, None),
            "frames": p.frames,
            "height": p.height,
            "width": p.width,
            "latent_frames": latent_frames,
            "status": plan.status,
            "reason": plan.reason,
            "latents_cache": plan.latents_cache,  # content keys in cache/latents and cache/text
            "embeds_cache": plan.embeds_cache,
        }
    )


def _cache_file(folder: Path, key: str) -> Path:
    return folder / key[:2] / f"{key}.safetensors"


def _cache_get(folder: Path, key: str):
    from safetensors.torch import load_file

    path = _cache_file(folder, key)
    return load_file(path)["value"] if path.is_file() else None


def _cache_put(folder: Path, key: str, value) -> None:
    from safetensors.torch import save_file

    with atomic_path(_cache_file(folder, key)) as tmp:
        save_file({"value": value.contiguous()}, str(tmp))


def _prefetch(fn: Callable, items: Iterable, pool: ThreadPoolExecutor, depth: int) -> Iterator:
    """`map(fn, items)` in order, with up to `depth` calls running ahead in `pool`."""
    pending: list[Future] = []
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) > depth:
            yield pending.pop(0).result()
    for fut in pending:
        yield fut.result()


def _seed(row):
    """The latent sample's noise: a function of the clip's content and span only."""
    import torch

    seed = int(sha256_json([row.video_id, row.start, row.end])[:15], 16)
    return torch.Generator().manual_seed(seed)


def _decode(row, p) -> tuple[str, np.ndarray | None, str]:
    """(latents cache key, [F, height, width, 3] uint8 frames or None, failure reason)."""
    try:
        frames = read_frames(row.path, row.times)
        return row.latents_cache, resize_center_crop(frames, p.height, p.width), ""
    except Exception as e:  # a video decodable at probe time can still break further in
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return row.latents_cache, None, f"decode failed: {first[:200]}"


def run_precompute(
    ws: Workspace,
    cfg: PipelineConfig,
    upstream: dict[str, StageResult],
    progress: Progress = no_progress,
) -> StageResult:
    """Encode every selected clip into shards and write `precompute/<key>/index.parquet`.

    Args:
        ws: the workspace.
        cfg: the pipeline config (uses `model` and `precompute`).
        upstream: {"filter": StageResult, "check": StageResult}.
        progress: called as (shards done, shards total, shard name).

    Returns:
        The stage result; counts hold samples, ok, rejected, shards, encoded_videos,
        encoded_texts, latents_cache_hits and text_cache_hits.
    """
    started = time.time()
    key = key_of(cfg, {"filter": upstream["filter"].key, "check": upstream["check"].key})
    out = ws.stage_dir("precompute", key)
    if ws.done(out):
        return ws.result("precompute", out)  # before the heavy imports: a reused run takes ms
    clean_stale_tmp(out)

    import torch

    from cogpipe.models import cogvideox

    p = cfg.precompute

    tcfg = cogvideox.transformer_config(cfg.model)
    max_len = tcfg["max_text_seq_length"]
    ratio = cogvideox.vae_config(cfg.model)["temporal_compression_ratio"]  # 4 for CogVideoX
    latent_frames = (p.frames - 1) // ratio + 1
    vae_fp = cogvideox.component_fingerprint(cfg.model, "vae")
    text_fp = cogvideox.component_fingerprint(cfg.model, "tokenizer", "text_encoder")
    plan = _plan(cfg, upstream, vae_fp, text_fp, max_len)
    shards = sorted(plan.shard.dropna().unique())

    # What is left to encode: samples of uncommitted shards missing from the caches.
    latents_dir, text_dir = ws.cache_dir("latents"), ws.cache_dir("text")
    todo = plan[plan.shard.isin([s for s in shards if not (out / s).is_file()])]
    todo_video = todo[~todo.latents_cache.map(lambda k: _cache_file(latents_dir, k).is_file())]
    todo_video = todo_video.drop_duplicates("latents_cache")  # exact copies are encoded once
    need_text = not todo.embeds_cache.map(lambda k: _cache_file(text_dir, k).is_file()).all()

    device = resolve_device(p.device)
    dtype = cogvideox.weight_dtype("auto", tcfg, device)
    vae = cogvideox.load_vae(cfg.model, device, dtype) if len(todo_video) else None
    tokenizer, text_encoder = (
        cogvideox.load_text_encoder(cfg.model, device, dtype) if need_text else (None, None)
    )

    counts = dict.fromkeys(
        ("encoded_videos", "encoded_texts", "latents_cache_hits", "text_cache_hits"), 0
    )
    failed: dict[str, str] = {}  # latents cache key -> why its video did not decode

    def latents_of(r) -> torch.Tensor | None:
        """From the cache, or decoded (in the background) and encoded now; None: no decode."""
        latents = _cache_get(latents_dir, r.latents_cache)
        if latents is not None:
            counts["latents_cache_hits"] += 1
        elif r.latents_cache not in failed:
            cache_key, frames, reason = next(decoded)
            assert cache_key == r.latents_cache, "decode order diverged from the plan"
            if frames is None:
                failed[cache_key] = reason
                return None
            latents = cogvideox.encode_video(vae, torch.from_numpy(frames)[None], _seed(r))[0]
            _cache_put(latents_dir, cache_key, latents.cpu())
            counts["encoded_videos"] += 1
        return latents

    def embeds_of(r) -> torch.Tensor:
        embeds = _cache_get(text_dir, r.embeds_cache)
        if embeds is not None:
            counts["text_cache_hits"] += 1
            return embeds
        embeds = cogvideox.encode_prompt(tokenizer, text_encoder, [r.caption], max_len)[0]
        _cache_put(text_dir, r.embeds_cache, embeds.cpu())
        counts["encoded_texts"] += 1
        return embeds

    with ThreadPoolExecutor(DECODE_AHEAD) as pool:
        # Frames of todo_video, in plan order, decoded while the VAE encodes earlier clips.
        decoded = _prefetch(lambda r: _decode(r, p), todo_video.itertuples(), pool, DECODE_AHEAD)
        for i, name in enumerate(shards):
            if (out / name).is_file():
                progress(i + 1, len(shards), f"{name} committed earlier")
                continue
            tensors, rejected = {}, {}
            for r in plan[plan.shard == name].itertuples():
                latents = latents_of(r)
                if latents is None:
                    rejected[r.clip_id] = failed[r.latents_cache]
                    continue
                tensors[f"{r.clip_id}.latents"] = latents.cpu().contiguous()  # [F', C, h, w]
                tensors[f"{r.clip_id}.prompt_embeds"] = embeds_of(r).cpu().contiguous()  # [L, D]
            write_shard(out / name, tensors, rejected)
            progress(i + 1, len(shards), name)

    index = _index(plan, out, p, latent_frames)
    write_table(out / "index.parquet", index)
    n_ok = int((index.status == "ok").sum())
    counts = {
        "samples": len(index),
        "ok": n_ok,
        "rejected": len(index) - n_ok,
        "shards": len(shards),
    } | counts
    kinds = index.loc[index.status != "ok", "reason"].str.split(":").str[0]
    stats = {"rejections": kinds.value_counts().to_dict()}
    result = StageResult("precompute", key, str(out), counts, stats=stats)
    return ws.finish(result, started)
