"""Check: accepted videos become clips, each scored, deduplicated, split and kept or not.

One clip per video here (scene splitting and black-run trimming make several later).
A clip is a span of its source: `clip_id` = video_id + span, `start`/`end` in seconds.
Scores are columns, thresholds live in `CheckConfig`, and every rejected clip keeps its
row with the reasons. Near duplicates are found by a 64-bit difference hash of each
sampled frame; the best member of each group (largest, then longest) is kept.

    cogpipe check configs/demo.yaml
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pandas as pd

from cogpipe.config import PipelineConfig
from cogpipe.video import even_indices, luma, read_frames
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
HASH_SIZE = 8  # dHash: 8x8 bits per frame
PROBE_SIZE = 64  # frames are decoded at 64x64 for the checks


def key_of(cfg: PipelineConfig, inputs: dict[str, str]) -> str:
    return stage_key("check", VERSION, cfg.check.key_fields(), inputs)


def clip_id_of(video_id: str, start_frame: int, end_frame: int) -> str:
    return f"{video_id[:16]}-{start_frame:06d}-{end_frame:06d}"


def dhash(gray: np.ndarray) -> int:
    """64-bit difference hash of one [H, W] grayscale frame."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(gray, dtype=np.float32))[None, None]
    small = F.interpolate(x, size=(HASH_SIZE, HASH_SIZE + 1), mode="area")[0, 0].numpy()
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def frame_scores(frames: np.ndarray, cfg: PipelineConfig) -> dict:
    """Luma, black and frozen statistics and frame hashes of [F, H, W, 3] sampled frames."""
    y = luma(frames)  # [F, H, W] float
    means = y.mean(axis=(1, 2))
    diffs = np.abs(np.diff(y, axis=0)).mean(axis=(1, 2)) if len(y) > 1 else np.zeros(1)
    return {
        "luma_mean": float(means.mean()),
        "black_ratio": float((means < cfg.check.black_luma).mean()),
        "frozen_ratio": float((diffs < cfg.check.frozen_diff).mean()),
        "motion": float(diffs.mean()),  # mean |frame difference|, 0-255: never cancels out
        "hashes": [f"{dhash(f):016x}" for f in y],
    }


def hamming(a: list[str], b: list[str]) -> float:
    """Mean Hamming distance between two equally long lists of hex frame hashes."""
    return float(
        np.mean([bin(int(x, 16) ^ int(y, 16)).count("1") for x, y in zip(a, b, strict=True)])
    )


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        self.parent[self.find(i)] = self.find(j)


def _dedup(clips: pd.DataFrame, cfg: PipelineConfig) -> pd.DataFrame:
    """Group exact (same video_id) and near (frame hashes) duplicates among passing clips."""
    clips["dup_group"], clips["dup_of"] = None, None
    idx = [i for i in clips.index if not clips.at[i, "reasons"]]
    uf = _UnionFind(len(clips))
    for a_pos, a in enumerate(idx):
        for b in idx[a_pos + 1 :]:
            same = clips.at[a, "video_id"] == clips.at[b, "video_id"]
            if (
                same
                or hamming(clips.at[a, "hashes"], clips.at[b, "hashes"]) <= cfg.check.phash_bits
            ):
                uf.union(a, b)
    groups: dict[int, list[int]] = {}
    for i in idx:
        groups.setdefault(uf.find(i), []).append(i)
    for members in groups.values():
        # Keep the largest, then the longest, then the first by path.
        best = max(members, key=lambda i: (clips.at[i, "width"] * clips.at[i, "height"],
                                           clips.at[i, "end"] - clips.at[i, "start"], -i))  # fmt: skip
        if len(members) == 1:
            continue
        for i in members:
            clips.at[i, "dup_group"] = clips.at[best, "clip_id"]
            if i != best:
                clips.at[i, "dup_of"] = clips.at[best, "clip_id"]
                kind = "exact" if clips.at[i, "video_id"] == clips.at[best, "video_id"] else "near"
                clips.at[i, "reasons"] = [f"{kind} duplicate of {clips.at[best, 'path']}"]
    return clips


def _split(clip_id: str, fraction: float) -> str:
    """'heldout' for a stable `fraction` of clip ids, 'train' otherwise."""
    u = int(hashlib.sha256(clip_id.encode()).hexdigest()[:8], 16) / 0x1_0000_0000
    return "heldout" if u < fraction else "train"


def run_check(
    ws: Workspace,
    cfg: PipelineConfig,
    upstream: dict[str, StageResult],
    progress: Progress = no_progress,
) -> StageResult:
    """Score every accepted video as a clip and write `check/<key>/clips.parquet`.

    Args:
        ws: the workspace.
        cfg: the pipeline config (uses `check`).
        upstream: {"ingest": StageResult}.
        progress: called as (videos done, videos total, path).

    Returns:
        The stage result; counts hold clips, kept and each rejection kind.
    """
    started = time.time()
    ingest = upstream["ingest"]
    key = key_of(cfg, {"ingest": ingest.key})
    out = ws.stage_dir("check", key)
    if ws.done(out):
        return ws.result("check", out)

    videos = read_table(ws.root / "ingest" / ingest.key / "videos.parquet")
    videos = videos[videos.status == "ok"].reset_index(drop=True)
    c = cfg.check
    rows = []
    for i, v in enumerate(videos.itertuples(index=False)):
        start_f, end_f = 0, int(v.frames)
        row = {
            "clip_id": clip_id_of(v.video_id, start_f, end_f),
            "video_id": v.video_id, "path": v.path, "start": 0.0, "end": end_f / v.fps,
            "fps": v.fps, "width": v.width, "height": v.height, "reasons": [],
        }  # fmt: skip
        try:
            count = min(c.sample_frames, end_f)
            frames = read_frames(
                v.path, even_indices(start_f, end_f, count), PROBE_SIZE, PROBE_SIZE
            )
            row |= frame_scores(frames, cfg)
        except Exception as e:  # decodable at probe time, broken further in
            row |= {"luma_mean": np.nan, "black_ratio": np.nan, "frozen_ratio": np.nan,
                    "motion": np.nan, "hashes": []}  # fmt: skip
            row["reasons"] = [f"decode failed while sampling: {str(e).splitlines()[0][:200]}"]
        reasons = row["reasons"]
        if row["end"] - row["start"] < c.min_duration:
            reasons.append(f"too short ({row['end'] - row['start']:.2f}s < {c.min_duration}s)")
        if min(v.width, v.height) < c.min_size:
            reasons.append(f"too small ({v.width}x{v.height} < {c.min_size}px)")
        if row["black_ratio"] > c.max_black_ratio:
            reasons.append(f"black frames ({row['black_ratio']:.0%} > {c.max_black_ratio:.0%})")
        if row["frozen_ratio"] > c.max_frozen_ratio:
            reasons.append(f"frozen ({row['frozen_ratio']:.0%} of frame pairs unchanged)")
        rows.append(row)
        progress(i + 1, len(videos), v.path)

    clips = _dedup(pd.DataFrame(rows), cfg) if rows else pd.DataFrame(rows)
    if len(clips):
        clips["keep"] = clips.reasons.map(len) == 0
        clips["split"] = [_split(cid, c.heldout_fraction) for cid in clips.clip_id]
        clips["reasons"] = clips.reasons.map("; ".join)
    else:
        clips = pd.DataFrame(columns=["clip_id", "video_id", "path", "start", "end", "split",
                                      "keep", "reasons", "dup_group", "dup_of"])  # fmt: skip
    write_table(out / "clips.parquet", clips)

    kept = clips[clips.keep] if len(clips) else clips
    counts = {
        "clips": len(clips),
        "kept": len(kept),
        "rejected": len(clips) - len(kept),
        "train": int((kept.split == "train").sum()) if len(kept) else 0,
        "heldout": int((kept.split == "heldout").sum()) if len(kept) else 0,
    }
    reasons = clips.loc[~clips.keep, "reasons"].value_counts().to_dict() if len(clips) else {}
    result = StageResult("check", key, str(out), counts, stats={"rejections": reasons})
    return ws.finish(result, started)
