"""Held-out clips in evaluation: the suite's captions, the Fréchet reference, the conditions.

Check assigns each clip to `train` or `heldout` (stable by clip_id); evaluation never
samples training data. With `evaluate.prompts: heldout` the suite is the captions filter
accepted for the first `heldout_clips` held-out clips (`heldout_clips`), and those clips
are exactly the Fréchet reference; otherwise the reference is the first `real_clips` kept
held-out clips (`reference_clips`). An IC-LoRA or TIC-FT run pairs each prompt with one of
them (`paired_clips`: prompt i takes clip i mod N, so a held-out suite's caption keeps its
own clip) and samples on that clip's condition (`conditions`, via
`sampling.condition_for`); an image-to-video model pairs them the same way and starts
each video from its clip's first frame (`first_frames`). Real clips are cut like the
generated videos and their features cached per eval key and clip list (`real_features`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cogpipe import sampling
from cogpipe.config import EvaluateConfig, PipelineConfig
from cogpipe.video import even_times, read_frames, resize_center_crop, window_times
from cogpipe.workspace import StageResult, Workspace, atomic_path, read_table, sha256_json


def heldout_clips(check: StageResult, filter: StageResult | None, n: int) -> pd.DataFrame:
    """The first `n` held-out clips (by clip_id) that check kept and filter accepted, with
    their caption: clip_id, caption, path, start, end.

    Raises:
        StageNotReady: no filter result to read captions from.
        ValueError: no held-out clip is accepted (with the counts and the way out).
    """
    from cogpipe.workspace import StageNotReady

    if filter is None:
        raise StageNotReady("evaluate.prompts: heldout needs the filter stage's curated.parquet")
    clips = read_table(Path(check.path) / "clips.parquet")
    held = clips[clips.keep & (clips.split == "heldout")]
    curated = read_table(Path(filter.path) / "curated.parquet")
    curated = curated[curated.accepted][["clip_id", "caption"]]
    rows = curated.merge(held[["clip_id", "path", "start", "end"]], on="clip_id")
    if not len(rows):
        raise ValueError(
            f"evaluate.prompts: heldout, but none of the {len(held)} held-out clips of "
            f"{check.path}/clips.parquet has an accepted caption in {filter.path}/curated.parquet"
            " (raise check.heldout_fraction or list evaluate.prompts)"
        )
    return rows.sort_values("clip_id").head(n).reset_index(drop=True)


def reference_clips(cfg: PipelineConfig, check: StageResult, suite: pd.DataFrame | None):
    """The real clips of the Fréchet distance: the held-out suite's own clips, else the
    first `real_clips` held-out clips check kept (by clip_id)."""
    if suite is not None:
        return suite
    clips = read_table(Path(check.path) / "clips.parquet")
    clips = clips[clips.keep & (clips.split == "heldout")].sort_values("clip_id")
    return clips.head(cfg.evaluate.real_clips)


def paired_clips(
    cfg: PipelineConfig, check: StageResult, clips: pd.DataFrame | None, prompts: list[str]
) -> tuple[pd.DataFrame, int]:
    """The held-out clip of each prompt of an ic-lora or tic-ft run or an image-to-video
    model, and how many there were to pair with: prompt i takes clip i mod N of the
    held-out suite's clips (its own) or of the reference clips (`reference_clips`).

    Raises:
        ValueError: no kept held-out clip (with the counts and the way out).
    """
    pool = clips if clips is not None else reference_clips(cfg, check, None)
    if not len(pool):
        table = read_table(Path(check.path) / "clips.parquet")
        held = table.split == "heldout"
        why = (
            f"train.mode {cfg.train.mode} is evaluated on held-out clips' conditions"
            if cfg.train.mode in ("ic-lora", "tic-ft")
            else f"model {cfg.model} is image-to-video: each prompt's image is a held-out clip's "
            f"first frame"
        )
        raise ValueError(
            f"{why}, but "
            f"{check.path}/clips.parquet has no kept held-out clip ({len(table)} clips, "
            f"{int(table.keep.sum())} kept, {int(held.sum())} held out, "
            f"{int((held & table.keep).sum())} of them kept): raise check.heldout_fraction "
            f"(now {cfg.check.heldout_fraction})"
        )
    rows = [i % len(pool) for i in range(len(prompts))]
    return pool.iloc[rows].reset_index(drop=True), len(pool)


def conditions(cfg: PipelineConfig, paired: pd.DataFrame) -> list[sampling.Condition]:
    """Each prompt's condition from its held-out clip (`sampling.condition_for`), a clip
    paired with several prompts decoded once."""
    made: dict[str, sampling.Condition] = {}
    for row in paired.itertuples():
        if row.clip_id not in made:
            made[row.clip_id] = sampling.condition_for(cfg, row)
    return [made[c] for c in paired.clip_id]


def first_frames(paired: pd.DataFrame, height: int, width: int) -> list[np.ndarray]:
    """Each prompt's image for an image-to-video model: its held-out clip's frame at the
    clip's start, resized and centre-cropped to height x width, uint8 [H, W, 3] (a clip
    paired with several prompts decoded once).

    Raises:
        VideoError: a clip cannot be decoded.
    """
    made = {}
    for row in paired.itertuples():
        if row.clip_id not in made:
            frame = read_frames(row.path, [float(row.start)])
            made[row.clip_id] = resize_center_crop(frame, height, width)[0]
    return [made[c] for c in paired.clip_id]


def real_features(
    ws: Workspace, ekey: str, ec: EvaluateConfig, clips: pd.DataFrame, features
) -> np.ndarray:
    """Features [N, D] of real clips, cut like the generated videos: `frames` at `fps` from
    the clip's start (spread over the clip when it is shorter); clips that do not decode are
    left out ([0, 0] when none does). Cached per eval key and clip list, computed by one
    process at a time."""
    spans = clips[["clip_id", "start", "end"]].astype({"start": float, "end": float})
    cache = (
        ws.root / "evaluate" / ekey / f"real-features-{sha256_json(spans.values.tolist())[:12]}.npy"
    )
    with ws.hold(f"evaluate-{ekey}-{cache.stem}"):  # one process computes, the others read
        if cache.is_file():
            return np.load(cache)
        return _write_features(cache, clips, ec, features)


def _write_features(cache: Path, clips: pd.DataFrame, ec: EvaluateConfig, features) -> np.ndarray:
    """Compute `real_features` and commit them to `cache`."""
    videos = []
    for r in clips.itertuples():
        times = window_times(r.start, r.end, ec.fps, ec.frames) or even_times(
            r.start, r.end, ec.frames
        )
        try:
            videos.append(read_frames(r.path, times))
        except Exception:  # a clip check accepted can still fail further in; skip it
            continue
    feats = features(videos) if videos else np.zeros((0, 0))
    with atomic_path(cache) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, feats)
    return feats
