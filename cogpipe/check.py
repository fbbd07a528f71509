"""Check: accepted videos become clips (spans of their source), each scored and kept or not.

Per video, in a worker process under `check.timeout`:

1. **Sample, keyframe-aware.** Frame pairs (a frame and the next) at the keyframes, at
   four evenly spread times, then at more spread times only while the decoding stays
   under `max_decode_fraction` of the video's frames. A keyframe costs one frame to
   decode; a time between keyframes costs the frames from the keyframe before it. With
   keyframes every few seconds (web video) the whole check decodes a small fraction.
2. **Trim black leaders and trailers.** The edge between the last black and the first
   bright sample is found by decoding only that gap.
3. **Split at shots** with PySceneDetect's ContentDetector. `scenes: auto` decodes only
   the gaps between samples whose content changed, from the keyframe before the gap up
   to the cut, comparing every 8th frame and running ContentDetector only between two
   that differ; `always` runs it on every frame. Shots longer than `max_duration` are
   cut into equal clips.
4. **Split into training windows** (`precompute.windows: all | N`): a piece long enough
   for k >= 2 windows of `precompute.frames` at `precompute.fps` becomes k equal spans
   (each at least one window; 40 s with 6 s windows: 6 clips), or N of them spread over
   the piece. Each span is its own clip: its own clip_id, scores, caption and sample.
5. **Score each clip** from its own samples (three more are decoded where it has fewer
   than two): black ratio, frozen ratio and a motion score that is the mean *magnitude*
   of frame differences (opposite motions never cancel), plus perceptual hashes (pHash)
   at four fixed points of the span.

Then, over all clips: a clip too short for the shortest training window (`precompute.
frames`, or its shortest `frame_buckets` count, at `fps`) is rejected with the numbers
here, before anything is captioned, so `kept` counts training samples. Exact duplicates
(same video bytes and span) and near duplicates (mean pHash Hamming distance; window
spans of one video only where every hash point matches, as a replay or a loop does;
clustered as the connected components of those pairs) keep their best member
(resolution, then bitrate, then length) and record it in `dup_of`; the held-out split is drawn per group of clips that share a source
video or are near duplicates, so no held-out clip has a near duplicate in training. Every
clip keeps its row, with its reasons.

    cogpipe check demo/demo.yaml
"""

from __future__ import annotations

import bisect
import hashlib
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cogpipe.config import CheckConfig, PipelineConfig, PrecomputeConfig
from cogpipe.errors import EmptyStage
from cogpipe.pool import map_files
from cogpipe.report import reason_kind, write_check_report
from cogpipe.video import WINDOW_SLACK, VideoReader, luma
from cogpipe.workspace import (
    Progress,
    StageResult,
    Workspace,
    no_progress,
    read_table,
    stage_key,
    write_table,
)

VERSION = 3  # 3: clips too short for a training window rejected; windows all / N split
PROBE_SIZE = (64, 64)  # frames are decoded straight to 64x64 for the checks
HASH_POINTS = (0.125, 0.375, 0.625, 0.875)  # where in a clip's span the pHashes are taken
MIN_SCENE_S = 0.25  # PySceneDetect's min_scene_len, in seconds
MIN_SPREAD = 4  # evenly spread samples every video gets, whatever the decoding costs
CUT_STRIDE = 8  # frames decoded between two compared while looking for a cut in a gap
SCORE_COLUMNS = ["luma_mean", "black_ratio", "frozen_ratio", "motion", "samples"]
COLUMNS = [
    "clip_id",
    "video_id",
    "path",
    "start",
    "end",
    "duration",
    "fps",
    "width",
    "height",
    "rotation",
    "bitrate",
    "source_caption",
    *SCORE_COLUMNS,
    "hashes",
    "trimmed",
    "shot",
    "window",
    "keep",
    "reasons",
    "dup_group",
    "dup_of",
    "split",
]


@dataclass(frozen=True)
class Windows:
    """What check must know of precompute's training windows (`window_need()`)."""

    min_seconds: float  # the shortest clip that yields a sample: the fewest frames' window
    seconds: float  # one window of `precompute.frames`
    windows: str | int  # first: no split; all, or N: spans of about one window per piece
    shortest: str  # the shortest window in frames, for reasons: "49 frames at 8 fps"

    @classmethod
    def of(cls, p: PrecomputeConfig) -> Windows:
        need = p.window_need()
        shortest = f"{min(p.frame_counts())} frames at {p.fps:g} fps"
        return cls(need["min_seconds"], need["window_seconds"], need["windows"], shortest)

    @property
    def split(self) -> bool:
        return self.windows != "first"

    def too_short(self, length: float) -> str | None:
        """Why a clip of `length` seconds yields no sample, or None when it does (a clip
        exactly as long as the window does: precompute's `window_times` has the same slack)."""
        if length + WINDOW_SLACK >= self.min_seconds:
            return None
        return (
            f"too short for a training window ({length:.2f} s < {self.min_seconds:.2f} s:"
            f" {self.shortest})"
        )

    def spans(self, a: float, b: float) -> list[tuple[float, float, int | None]]:
        """[a, b) as (start, end, window) spans: itself, or, with windows all / N and room
        for k >= 2 windows, k equal spans (each at least one window) or N of them spread
        evenly, numbered by their place among the k."""
        k = math.floor((b - a + WINDOW_SLACK) / self.seconds)
        if not self.split or k < 2:
            return [(a, b, None)]
        picks = range(k)
        if isinstance(self.windows, int) and self.windows < k:
            picks = sorted({int(i) for i in np.linspace(0, k - 1, self.windows).round()})
        return [(a + (b - a) * i / k, a + (b - a) * (i + 1) / k, i) for i in picks]


def key_of(cfg: PipelineConfig, inputs: dict[str, str]) -> str:
    """The check key: its own settings, and what precompute's windows ask of a clip (the
    window length and `windows` only when clips are split into windows: with `windows:
    first` only the shortest window decides which clips pass, so a new `frames` over the
    same shortest bucket keeps every clip, caption and key)."""
    need = cfg.precompute.window_need()
    if need["windows"] == "first":
        need = {"min_seconds": need["min_seconds"]}
    return stage_key("check", VERSION, cfg.check.key_fields() | {"window": need}, inputs)


def clip_id_of(video_id: str, start: float, end: float) -> str:
    """`<first 16 hex of video_id>-<start ms>-<end ms>`: stable for a span of a video."""
    return f"{video_id[:16]}-{round(start * 1000):08d}-{round(end * 1000):08d}"


# -- sampling ----------------------------------------------------------------------------
def decode_cost(times: list[float], keyframes: list[float], fps: float) -> float:
    """Frames `VideoReader.at(times, following=1)` decodes (it seeks to keyframes)."""
    cost, pos = 0.0, None
    for t in sorted(times):
        k = keyframes[max(bisect.bisect_right(keyframes, t + 1e-6) - 1, 0)] if keyframes else 0.0
        if pos is None or t < pos or k > pos:
            cost += (t - k) * fps + 2
        else:
            cost += (t - pos) * fps + 1
        pos = t + 1 / fps
    return cost


def sample_times(
    keyframes: list[float], duration: float, fps: float, count: int, budget: float
) -> list[float]:
    """Sample times for a video.

    Up to `count` keyframes spread over the video (a frame each to decode); then
    `MIN_SPREAD` evenly spread times whatever they cost, so that a video with one
    keyframe is still seen from start to end; then more evenly spread times, cheapest
    first, while `decode_cost` stays within `budget` frames.
    """
    keys = [k for k in keyframes if 0 <= k < duration] or [0.0]
    if len(keys) > count:
        keys = [keys[i] for i in np.linspace(0, len(keys) - 1, count).round().astype(int)]
    chosen = sorted(set(keys))

    def spread(n: int, near: float = 0.5) -> list[float]:
        step = duration / n
        fills = [(i + 0.5) * step for i in range(n)]
        return [t for t in fills if min(abs(t - k) for k in chosen) > step * near]

    chosen = sorted({*chosen, *spread(MIN_SPREAD, 1.0)})
    if len(chosen) >= count:
        return chosen
    for t in sorted(spread(count), key=lambda t: decode_cost([t], keyframes, fps)):
        if decode_cost([*chosen, t], keyframes, fps) <= budget:
            chosen = sorted([*chosen, t])
    return chosen


def _is_black(frame: np.ndarray, c: CheckConfig) -> bool:
    return float(luma(frame[None]).mean()) < c.black_luma


def _first(reader: VideoReader, a: float, b: float, test) -> float:
    """Time of the first frame in [a, b] passing `test`, or b."""
    for t, frame in reader.scan(a, b + 1e-3):
        if test(frame):
            return t
    return b


def _cuts(reader: VideoReader, a: float, b: float, fps: float, threshold: float) -> list[float]:
    """Shot cuts in [a, b) found by PySceneDetect's ContentDetector on every frame."""
    from scenedetect.common import FrameTimecode
    from scenedetect.detectors import ContentDetector

    detector = ContentDetector(threshold=threshold, min_scene_len=max(1, round(MIN_SCENE_S * fps)))
    cuts, t = [], a
    for t, frame in reader.scan(a, b):
        found = detector.process_frame(FrameTimecode(t, fps), frame[..., ::-1].copy())
        cuts += [c.seconds for c in found]
    cuts += [c.seconds for c in detector.post_process(FrameTimecode(t, fps))]
    return [c for c in cuts if a < c < b]


def _cuts_in_gap(
    reader: VideoReader, a: float, b: float, until: np.ndarray, fps: float, threshold: float
) -> list[float]:
    """Shot cuts in the gap [a, b) between two samples that differ; `until` is the frame at b.

    Every frame is decoded (the codec needs them), but only every `CUT_STRIDE`-th is
    converted and compared with the one before; where two differ, ContentDetector runs
    over the frames between them, kept unconverted since. The scan stops once the frames
    look like `until`: the rest of the gap is the shot b is in. A shot shorter than the
    stride could hide between two alike frames; ContentDetector's own flash filter
    (`min_scene_len`) drops shots that short anyway.
    """
    from scenedetect.common import FrameTimecode
    from scenedetect.detectors import ContentDetector

    min_len = max(1, round(MIN_SCENE_S * fps))
    cuts: list[float] = []
    held: list[tuple[float, object]] = []  # frames decoded since the last compared one
    mark = None  # (time, converted frame) last compared

    def bracket(frames: list[tuple[float, np.ndarray]]) -> list[float]:
        detector = ContentDetector(threshold=threshold, min_scene_len=1)
        found = []
        for t, f in frames:
            found += detector.process_frame(FrameTimecode(t, fps), f[..., ::-1].copy())
        found += detector.post_process(FrameTimecode(frames[-1][0], fps))
        return [c.seconds for c in found]

    def compare(t: float, raw) -> bool:
        """Compare the newest frame with the mark; True once past every cut."""
        nonlocal mark, held
        frame = reader.array(raw)
        if mark is not None and _changed(mark[1], frame, threshold):
            inner = [(s, reader.array(f)) for s, f in held[:-1]]
            cuts.extend(bracket([mark, *inner, (t, frame)]))
        mark, held = (t, frame), []
        return bool(cuts) and not _changed(frame, until, threshold)

    for t, raw in reader.scan(a, b, convert=False):
        held.append((t, raw))
        if (mark is None or len(held) == CUT_STRIDE) and compare(t, raw):
            break
    else:
        if held:
            compare(*held[-1])
    merged: list[float] = []
    for c in sorted(cuts):  # one cut per shot change, as min_scene_len would leave them
        if a < c < b and (not merged or c - merged[-1] >= min_len / fps):
            merged.append(c)
    return merged


def _changed(a: np.ndarray, b: np.ndarray, threshold: float) -> bool:
    """Whether two frames differ like a cut would (ContentDetector's score on the pair)."""
    from scenedetect.common import FrameTimecode
    from scenedetect.detectors import ContentDetector

    detector = ContentDetector(threshold=threshold, min_scene_len=1)
    detector.process_frame(FrameTimecode(0, 1.0), a[..., ::-1].copy())
    return bool(detector.process_frame(FrameTimecode(1, 1.0), b[..., ::-1].copy()))


def phash(frame: np.ndarray) -> str:
    """64-bit DCT perceptual hash (imagehash.phash) of an RGB frame, as 16 hex digits."""
    import imagehash
    from PIL import Image

    return str(imagehash.phash(Image.fromarray(frame).convert("L"), hash_size=8))


def _score(
    samples: list[tuple[float, np.ndarray, np.ndarray]], start: float, end: float, c: CheckConfig
) -> dict:
    """Scores of a clip from its (time, frame, next frame) samples."""
    frames = np.stack([s[1] for s in samples])
    nexts = np.stack([s[2] for s in samples])
    y, y_next = luma(frames), luma(nexts)
    means = y.mean(axis=(1, 2))
    diffs = np.abs(y_next - y).mean(axis=(1, 2))  # magnitude: opposite motions add up
    times = np.array([s[0] for s in samples])
    span = max(end - start, 1e-6)
    picks = [int(np.abs(times - (start + p * span)).argmin()) for p in HASH_POINTS]
    return {
        "luma_mean": float(means.mean()),
        "black_ratio": float((means < c.black_luma).mean()),
        "frozen_ratio": float((diffs < c.frozen_diff).mean()),
        "motion": float(diffs.mean()),
        "samples": len(samples),
        "hashes": [phash(frames[i]) for i in picks],
    }


def _pairs(reader: VideoReader, times: list[float]) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """(time, frame, next frame) at `times`, in time order, one per time."""
    got, frames = reader.at(times, following=1)
    samples = [(t, frames[2 * i], frames[2 * i + 1]) for i, t in enumerate(got)]
    return sorted({s[0]: s for s in samples}.values(), key=lambda s: s[0])


def _sample_count(duration: float, c: CheckConfig, windows: Windows | None) -> int:
    """Frame pairs to sample: `sample_frames` per max_duration piece, or per training window
    where long pieces are split into windows (more spans, each scored by its own samples)."""
    spans = math.ceil(duration / c.max_duration)
    if windows is not None and windows.split:
        spans = max(spans, math.floor(duration / windows.seconds))
    return c.sample_frames * max(1, spans)


def _auto_cuts(reader: VideoReader, inside: list, fps: float, c: CheckConfig) -> list[float]:
    """`scenes: auto`: full-decode only the gaps between samples whose ends differ, merged."""
    gaps: list[list] = []  # [start, end, the frame at end]
    for s, nxt in zip(inside, inside[1:], strict=False):
        if _changed(s[2], nxt[1], c.scene_threshold):
            if gaps and gaps[-1][1] >= s[0]:
                gaps[-1][1:] = nxt[0], nxt[1]
            else:
                gaps.append([s[0], nxt[0], nxt[1]])
    cuts: list[float] = []
    for a, b, frame in gaps:
        cuts += _cuts_in_gap(reader, a, b + 1.5 / fps, frame, fps, c.scene_threshold)
    return cuts


def _edges(reader: VideoReader, samples: list, duration: float, fps: float, c: CheckConfig):
    """(start, end, cuts): the span left after trimming black leader and trailer, and the
    shot cuts inside it. In time order, so the decoder mostly runs forward."""
    start, end = 0.0, duration
    bright = [i for i, s in enumerate(samples) if not _is_black(s[1], c)]
    first, last = (bright[0], bright[-1]) if bright else (0, len(samples) - 1)
    if c.trim_black and bright and first > 0:  # the edge lies between two samples
        a, b = samples[first - 1][0], samples[first][0]
        start = _first(reader, a, b, lambda f: not _is_black(f, c))
    cuts: list[float] = []
    if c.scenes == "always":
        cuts = _cuts(reader, start, samples[last][0], fps, c.scene_threshold)
    elif c.scenes == "auto":
        cuts = _auto_cuts(reader, samples[first : last + 1], fps, c)
    if c.trim_black and bright and last < len(samples) - 1:  # black trailer
        a, b = samples[last][0], samples[last + 1][0]
        end = _first(reader, a + 0.5 / fps, b, lambda f: _is_black(f, c))
    if c.scenes == "always" and end > samples[last][0]:
        cuts += _cuts(reader, samples[last][0], end, fps, c.scene_threshold)
    return start, end, sorted({t for t in cuts if start < t < end})


def _spans(a: float, b: float, c: CheckConfig, windows: Windows | None) -> list[tuple]:
    """A shot [a, b) as clip spans (start, end, window): equal pieces no longer than
    `max_duration`, each split into training-window spans where `windows` asks for it
    (window: the span's place in its piece; None where the piece is not split)."""
    pieces = max(1, math.ceil((b - a) / c.max_duration - 1e-9))
    spans = []
    for p in range(pieces):
        s0, s1 = a + (b - a) * p / pieces, a + (b - a) * (p + 1) / pieces
        spans += windows.spans(s0, s1) if windows is not None else [(s0, s1, None)]
    return spans


def _score_span(
    reader: VideoReader, samples: list, s0: float, s1: float, fps: float, c: CheckConfig
) -> dict:
    """The span [s0, s1) scored from its own samples; where it has fewer than two, from
    three more decoded inside it."""
    mine = [s for s in samples if s0 <= s[0] < s1]
    if len(mine) < 2 and s1 - s0 >= 1.5 / fps:  # too few: a short decode here
        extra = _pairs(reader, [s0 + (s1 - s0) * q for q in (0.25, 0.5, 0.75)])
        mine = sorted({s[0]: s for s in [*mine, *extra]}.values(), key=lambda s: s[0])
        mine = [s for s in mine if s0 - 0.5 / fps <= s[0] < s1]
    scores = _score(mine, s0, s1, c) if mine else {"samples": 0, "hashes": []}
    return {"start": s0, "end": s1} | scores


def inspect_video(path: str, info: dict, c: CheckConfig, windows: Windows | None = None) -> dict:
    """Sample, trim, split and score one video (runs in a worker process).

    Args:
        path: the video.
        info: its probe (fps, duration, frames, keyframes).
        c: the check settings.
        windows: precompute's training windows; where they ask for it (`windows: all | N`),
            pieces long enough for several windows are split into spans of about one
            window. None: no window splitting.

    Returns:
        {"clips": [span, trimmed, shot, window and scores per clip], "decoded": frames
         decoded, "frames": the video's frames}.
    """
    fps, duration = float(info["fps"]), float(info["duration"])
    keyframes = sorted(float(k) for k in info["keyframes"])
    budget = c.max_decode_fraction * info["frames"]
    count = _sample_count(duration, c, windows)
    with VideoReader(path, size=PROBE_SIZE, keyframes=keyframes) as r:
        samples = _pairs(r, sample_times(keyframes, duration, fps, count, budget))
        start, end, cuts = _edges(r, samples, duration, fps, c)
        trimmed = start > 0 or end < duration
        edges = [start, *cuts, end]
        clips = []
        for shot, (a, b) in enumerate(zip(edges, edges[1:], strict=False)):
            for s0, s1, window in _spans(a, b, c, windows):
                clip = _score_span(r, samples, s0, s1, fps, c)
                clips.append(clip | {"trimmed": trimmed, "shot": shot, "window": window})
        return {"clips": clips, "decoded": r.decoded, "frames": int(info["frames"])}


# -- over all clips ----------------------------------------------------------------------
def components(n: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    """A label per node 0..n-1, shared by the nodes `pairs` join directly or through
    others (scipy's connected components); labels number components by smallest node."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    a, b = np.array(pairs, dtype=np.int64).reshape(-1, 2).T
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def near_pairs(
    hashes: np.ndarray,
    durations: np.ndarray,
    max_bits: float,
    groups: np.ndarray | None = None,
    group_bits: float = 0.0,
) -> list[tuple]:
    """Index pairs (i < j) whose mean pHash Hamming distance is at most `max_bits` and whose
    lengths agree within 10%. `hashes` is [N, P] uint64.

    Two clips of one `groups` label (>= 0; -1: none), the window spans of one video, must
    instead match at every hash point within `group_bits`: neighbouring windows of one shot
    look alike on average without being copies; a replay or a loop matches throughout.
    """
    pairs = []
    n = len(hashes)
    groups = np.full(n, -1) if groups is None else np.asarray(groups)
    for lo in range(0, n, 512):  # [512, N, P] popcounts at a time
        block = hashes[lo : lo + 512]
        bits = np.bitwise_count(block[:, None, :] ^ hashes[None, :, :])
        g_a, g_b = groups[lo : lo + 512, None], groups[None, :]
        same = (g_a == g_b) & (g_a >= 0)
        alike = np.where(same, bits.max(axis=-1) <= group_bits, bits.mean(axis=-1) <= max_bits)
        d_a, d_b = durations[lo : lo + 512, None], durations[None, :]
        close = alike & (np.abs(d_a - d_b) <= 0.1 * np.maximum(d_a, d_b) + 0.1)
        for a, b in zip(*np.nonzero(close), strict=True):
            if lo + a < b:
                pairs.append((lo + int(a), int(b)))
    return pairs


def _span_key(clips: pd.DataFrame, i: int) -> tuple:
    """(video_id, start, end) of a clip, to the millisecond: its footage, whatever the file."""
    return clips.at[i, "video_id"], round(clips.at[i, "start"], 3), round(clips.at[i, "end"], 3)


def _dup_pairs(clips: pd.DataFrame, live: list[int], c: CheckConfig) -> list[tuple[int, int]]:
    """Positions in `live` of exact duplicates (same video bytes and span) and near ones."""
    pairs, exact = [], {}
    for pos, i in enumerate(live):
        span = _span_key(clips, i)
        pairs += [(pos, exact[span])] if span in exact else []
        exact.setdefault(span, pos)
    hashes = np.array([[int(h, 16) for h in clips.at[i, "hashes"]] for i in live], dtype=np.uint64)
    durations = clips.loc[live, "duration"].to_numpy(dtype=float)
    windowed = clips.loc[live, "window"].notna().to_numpy()
    groups = np.where(windowed, pd.factorize(clips.loc[live, "video_id"])[0], -1)
    return pairs + near_pairs(hashes, durations, c.phash_bits, groups, c.phash_bits / 2)


def _dedup(clips: pd.DataFrame, c: CheckConfig) -> pd.DataFrame:
    """Group exact and near duplicates among passing clips; keep each group's best."""
    clips["dup_group"], clips["dup_of"] = None, None
    live = [i for i in clips.index if not clips.at[i, "reasons"] and len(clips.at[i, "hashes"])]
    if not live:
        return clips
    groups: dict[int, list[int]] = {}
    for label, i in zip(components(len(live), _dup_pairs(clips, live, c)), live, strict=True):
        groups.setdefault(label, []).append(i)
    for members in groups.values():
        if len(members) == 1:
            continue
        best = max(
            members,
            key=lambda i: (
                clips.at[i, "width"] * clips.at[i, "height"],
                clips.at[i, "bitrate"],
                clips.at[i, "duration"],
                -i,
            ),
        )
        for i in members:
            clips.at[i, "dup_group"] = clips.at[best, "clip_id"]
            if i != best:
                clips.at[i, "dup_of"] = clips.at[best, "clip_id"]
                kind = "exact" if _span_key(clips, i) == _span_key(clips, best) else "near"
                clips.at[i, "reasons"] = [
                    f"{kind} duplicate of {clips.at[best, 'clip_id']} ({clips.at[best, 'path']})"
                ]
    return clips


def _split(clips: pd.DataFrame, fraction: float) -> list[str]:
    """'heldout' or 'train' per clip, drawn per group of clips that share a source video or
    a duplicate group, stable by the group's smallest clip_id."""
    first: dict[str, int] = {}
    pairs = []
    for pos, (video, group) in enumerate(zip(clips.video_id, clips.dup_group, strict=True)):
        for label in (f"v:{video}", f"g:{group}" if group else None):
            if label is not None:
                pairs.append((pos, first.setdefault(label, pos)))
    labels = components(len(clips), pairs)
    names: dict[int, str] = {}
    for label, cid in zip(labels, clips.clip_id, strict=True):
        names[label] = min(names.get(label, cid), cid)
    out = []
    for label in labels:
        u = int(hashlib.sha256(names[label].encode()).hexdigest()[:8], 16) / 0x1_0000_0000
        out.append("heldout" if u < fraction else "train")
    return out


def _reasons(clip: dict, c: CheckConfig, windows: Windows) -> list[str]:
    out = list(clip.get("reasons", []))
    length = clip["end"] - clip["start"]
    if length < c.min_duration:
        out.append(f"too short ({length:.2f}s < {c.min_duration:g}s)")
    elif reason := windows.too_short(length):
        out.append(reason)
    if clip.get("samples", 0) == 0:
        return out
    if clip["black_ratio"] > c.max_black_ratio:
        out.append(f"black frames ({clip['black_ratio']:.0%} > {c.max_black_ratio:.0%})")
    if clip["frozen_ratio"] > c.max_frozen_ratio:
        out.append(f"frozen ({clip['frozen_ratio']:.0%} of frame pairs unchanged)")
    elif clip["motion"] < c.min_motion:
        out.append(f"static (motion {clip['motion']:.2f} < {c.min_motion:g})")
    return out


def _whole(duration: float, reason: str) -> list[dict]:
    """The clips of a video rejected as a whole: one, its full length, with the reason."""
    return [
        {
            "start": 0.0,
            "end": float(duration),
            "trimmed": False,
            "shot": 0,
            "samples": 0,
            "reasons": [reason],
        }
    ]


def _videos_to_check(videos: pd.DataFrame, c: CheckConfig) -> tuple[list, list[int]]:
    """(clips per video: rejected by size without decoding, else None; positions of the
    videos to inspect)."""
    per_video: list[list[dict] | None] = [None] * len(videos)
    for i, v in enumerate(videos.itertuples(index=False)):
        size = f"{int(v.width)}x{int(v.height)}"
        if min(v.width, v.height) < c.min_size:
            per_video[i] = _whole(v.duration, f"too small ({size} < {c.min_size}px)")
        elif max(v.width, v.height) > c.max_size:
            per_video[i] = _whole(v.duration, f"too large ({size} > {c.max_size}px)")
    return per_video, [i for i, clips in enumerate(per_video) if clips is None]


def _inspect_all(
    videos: pd.DataFrame,
    per_video: list,
    todo: list[int],
    c: CheckConfig,
    windows: Windows,
    progress: Progress,
) -> tuple[int, int]:
    """`inspect_video` on the videos at `todo` in worker processes, filling `per_video`
    (a video that fails or times out: one rejected clip with the reason).

    Returns:
        (frames decoded, frames in the videos inspected).
    """
    jobs = []
    for v in videos.iloc[todo].itertuples(index=False):
        info = {
            "fps": v.fps,
            "duration": v.duration,
            "frames": v.frames,
            "keyframes": list(v.keyframes),
        }
        jobs.append((v.path, info, c, windows))
    decoded = total = 0
    done = len(videos) - len(jobs)
    workers = c.workers or os.cpu_count() or 1
    for j, value, error in map_files(inspect_video, jobs, workers, c.timeout):
        i = todo[j]
        if error:
            per_video[i] = _whole(videos.at[i, "duration"], f"check failed: {error}")
        else:
            per_video[i] = value["clips"]
            decoded, total = decoded + value["decoded"], total + value["frames"]
        done += 1
        progress(done, len(videos), videos.at[i, "path"])
    return decoded, total


def _clip_rows(
    videos: pd.DataFrame, per_video: list, c: CheckConfig, windows: Windows
) -> pd.DataFrame:
    """clips.parquet: one row per clip with its reasons, duplicate group, split and keep."""
    rows = []
    for i, v in enumerate(videos.itertuples(index=False)):
        for clip in per_video[i]:
            row = {
                "clip_id": clip_id_of(v.video_id, clip["start"], clip["end"]),
                "video_id": v.video_id,
                "path": v.path,
                "duration": clip["end"] - clip["start"],
                "fps": v.fps,
                "width": v.width,
                "height": v.height,
                "rotation": v.rotation,
                "bitrate": v.bitrate,
                "source_caption": v.source_caption,
                "hashes": [],
                "window": None,
                **clip,
            }
            row["reasons"] = _reasons(row, c, windows)
            rows.append(row)
    clips = pd.DataFrame(rows, columns=COLUMNS)
    clips["window"] = clips.window.astype("Int64")  # a span's place in its piece, or <NA>
    if len(clips):
        clips = _dedup(clips, c)
        clips["keep"] = clips.reasons.map(len) == 0
        clips["split"] = _split(clips, c.heldout_fraction)
        clips["reasons"] = clips.reasons.map("; ".join)
    return clips


def _finish(
    ws: Workspace,
    key: str,
    out,
    videos: pd.DataFrame,
    clips: pd.DataFrame,
    decoded: tuple[int, int],
    windows: Windows,
    started: float,
) -> StageResult:
    """Counts (clips kept are training samples: each yields one window) and stats."""
    keep = clips.keep.astype(bool)
    kept, reasons = clips[keep] if len(clips) else clips, clips.reasons.astype(str)
    counts = {
        "videos": len(videos),
        "clips": len(clips),
        "kept": len(kept),
        "rejected": len(clips) - len(kept),
        "train": int((kept.split == "train").sum()),
        "heldout": int((kept.split == "heldout").sum()),
        "trimmed": int(clips.trimmed.astype(bool).sum()),
        "too_short": int(reasons.str.contains("too short", regex=False).sum()),
        "windows_split": int(clips.window.notna().sum()),
    }
    stats = {
        "rejections": clips.loc[~keep, "reasons"].map(reason_kind).value_counts().to_dict(),
        "decoded_fraction": round(decoded[0] / decoded[1], 4) if decoded[1] else 0.0,
        "window": {
            "min_seconds": windows.min_seconds,
            "window_seconds": windows.seconds,
            "windows": windows.windows,
            "shortest": windows.shortest,
        },
    }
    return ws.finish(StageResult("check", key, str(out), counts, stats=stats), started)


def run_check(
    ws: Workspace,
    cfg: PipelineConfig,
    upstream: dict[str, StageResult],
    progress: Progress = no_progress,
) -> StageResult:
    """Turn every accepted video into scored clips and write `check/<key>/clips.parquet`.

    Args:
        ws: the workspace.
        cfg: the pipeline config (uses `check`, and `precompute`'s training windows).
        upstream: {"ingest": StageResult}.
        progress: called as (videos done, videos total, path).

    Returns:
        The stage result; counts hold videos, clips, kept (the training samples to be),
        rejected, train, heldout, trimmed, too_short (clips rejected as too short) and
        windows_split (clips made by splitting long pieces into windows); stats hold the
        rejection reasons, the fraction of frames decoded and the window asked for.

    Raises:
        EmptyStage: every clip is rejected (clips.parquet and the report are written, the
            stage is not done).
    """
    started = time.time()
    ingest = upstream["ingest"]
    key = key_of(cfg, {"ingest": ingest.key})
    out = ws.stage_dir("check", key)
    if ws.done(out):
        return ws.result("check", out)

    manifest = read_table(ws.root / "ingest" / ingest.key / "videos.parquet")
    videos = manifest[manifest.status == "ok"].reset_index(drop=True)
    windows = Windows.of(cfg.precompute)
    per_video, todo = _videos_to_check(videos, cfg.check)
    decoded = _inspect_all(videos, per_video, todo, cfg.check, windows, progress)
    clips = _clip_rows(videos, per_video, cfg.check, windows)
    write_table(out / "clips.parquet", clips)
    write_check_report(out, manifest, clips)
    if not len(clips) or not clips.keep.any():  # written for a look, but not done
        raise _nothing_kept(videos, clips)
    return _finish(ws, key, out, videos, clips, decoded, windows, started)


def _nothing_kept(videos: pd.DataFrame, clips: pd.DataFrame) -> EmptyStage:
    """The error of a check that kept no clip, with the commonest reasons."""
    if not len(clips):
        return EmptyStage("check: no clip to check (ingest accepted no video)")
    kinds = clips.reasons.map(reason_kind).value_counts().head(3)
    top = ", ".join(f"{kind} ({n})" for kind, n in kinds.items())
    return EmptyStage(
        f"check: no clip kept: {len(clips)} clips of {len(videos)} videos, every one"
        f" rejected ({top})"
    )
