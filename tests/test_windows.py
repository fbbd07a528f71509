"""Training windows are part of the data contract: check rejects clips too short for one,
frame buckets keep shorter clips at fewer frames, `windows: all | N` splits long clips.

One corpus (tests/corpus.py `write_window_corpus`: 2, 4, 5.9, 6.1, 13 and 40 s at 160x96
and a portrait 8 s clip, all 10 fps) and one workspace for the module: ingest runs once,
each window setting is its own check key. Check uses the real default window, 49 frames
at 8 fps = 6.0 s; precompute encodes those 49 frames at 64x64 with the tiny VAE.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from corpus import window_name, write_window_corpus
from safetensors.torch import load_file

from cogpipe import precompute
from cogpipe.check import Windows, near_pairs
from cogpipe.config import PipelineConfig, PrecomputeConfig
from cogpipe.pipeline import run_all, run_stage
from cogpipe.workspace import StageResult, Workspace, read_table, write_table

S2, S4, S5_9, S6_1, S13, S40 = (window_name(s) for s in (2, 4, 5.9, 6.1, 13, 40))
BUCKETS = [33, 25, 17]  # with frames 49: windows of 6.0, 4.0, 3.0 and 2.0 s at 8 fps


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_models):
    """(config factory: precompute and filter overrides, {name: path})."""
    from cogpipe.demo import DEMO_CONFIG

    root = tmp_path_factory.mktemp("windows")
    cases = write_window_corpus(root / "src")

    def make(filter: dict | None = None, **precompute) -> PipelineConfig:
        raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEMO_CONFIG.items()}
        raw |= {
            "workspace": str(root / "ws"),
            "model": str(tiny_models["cogvideox"]),
            "ingest": {"source": str(root / "src")},
        }
        raw["check"] |= {"heldout_fraction": 0.0}  # every kept clip trains
        raw["caption"]["model"] = str(tiny_models["llava"])
        raw["evaluate"]["clip_model"] = str(tiny_models["clip"])
        raw["filter"] |= filter or {}
        raw["precompute"] = {
            "frames": 49,
            "fps": 8,
            "height": 64,
            "width": 64,
            "shard_size": 16,
            "min_psnr": 0,
            **precompute,
        }
        return PipelineConfig.model_validate(raw)

    run_stage(make(), "ingest")
    return make, cases


def _check(cfg: PipelineConfig) -> tuple[StageResult, pd.DataFrame]:
    """The check stage's result and its clips, with `name` (the corpus case) per row."""
    result = run_stage(cfg, "check")
    clips = read_table(Path(result.path) / "clips.parquet")
    clips["name"] = clips.path.map(lambda p: Path(p).stem)
    return result, clips.sort_values(["name", "start"], ignore_index=True)


def test_check_rejects_clips_too_short_for_the_window_before_captioning(corpus):
    make, _ = corpus
    result, clips = _check(make())
    by_name = clips.groupby("name")
    for name in (S2, S4, S5_9):
        (row,) = by_name.get_group(name).itertuples()
        assert not row.keep
        assert row.reasons == (
            f"too short for a training window ({row.duration:.2f} s < 6.00 s: 49 frames at 8 fps)"
        )
    assert [round(d, 2) for d in clips[~clips.keep].duration] == [2.0, 4.0, 5.9]
    kept = clips[clips.keep]
    assert sorted(set(kept.name)) == sorted([S13, S40, S6_1, "portrait"])
    assert len(by_name.get_group(S40)) == 2  # max_duration 30 s: two pieces of 20 s
    assert kept.window.isna().all()  # windows: first splits nothing
    counts = result.counts
    assert (counts["kept"], counts["too_short"], counts["windows_split"]) == (5, 3, 0)
    assert result.stats["rejections"] == {"too short for a training window": 3}
    window = {"min_seconds": 6.0, "window_seconds": 6.0, "windows": "first"}
    assert result.stats["window"] == window | {"shortest": "49 frames at 8 fps"}


def test_frame_buckets_give_each_clip_the_longest_window_that_fits(corpus, monkeypatch):
    from cogpipe.models import cogvideox

    make, _ = corpus
    cfg = make(frame_buckets=BUCKETS, batch_size=8)
    check, clips = _check(cfg)
    # The shortest window is 17 frames = 2.0 s: the 2.0 s clip is exactly as long and passes.
    assert clips.keep.all() and check.counts["too_short"] == 0
    assert check.stats["window"]["shortest"] == "17 frames at 8 fps"

    # Every kept clip selected (the filter stands aside), then precompute.
    folder = Path(cfg.workspace) / "filter" / "all-kept"
    curated = pd.DataFrame(
        {
            "clip_id": clips.clip_id,
            "caption": "A square slides.",
            "score": 1.0,
            "selected": True,
            "reasons": "",
        }
    )
    write_table(folder / "curated.parquet", curated)
    upstream = {"check": check, "filter": StageResult("filter", "all-kept", str(folder))}
    encode, shapes = cogvideox.encode_video, []

    def recorded(vae, frames, generators):
        shapes.append(tuple(frames.shape))  # [B, F, H, W, 3]: one shape per VAE call
        return encode(vae, frames, generators)

    monkeypatch.setattr(cogvideox, "encode_video", recorded)
    result = precompute.run_precompute(Workspace(cfg.workspace), cfg, upstream)
    index = read_table(Path(result.path) / "index.parquet").merge(clips[["clip_id", "name"]])
    assert (index.status == "ok").all()
    frames = index.groupby("name").frames.agg(set).map(sorted).to_dict()
    # (n - 1) / 8 s <= length: 49 needs 6.0 s, 33 needs 4.0 s, 25 3.0 s, 17 2.0 s.
    assert frames == {
        S2: [17],
        S4: [33],
        S5_9: [33],
        S6_1: [49],
        S13: [49],
        S40: [49],
        "portrait": [49],
    }
    assert (index.latent_frames == (index.frames - 1) // 4 + 1).all()
    assert sorted(shapes) == [(1, 17, 64, 64, 3), (2, 33, 64, 64, 3), (5, 49, 64, 64, 3)]
    assert result.stats["frames"] == {"17": 1, "33": 2, "49": 5}
    shard = load_file(Path(result.path) / index.shard[0])
    for r in index.itertuples():
        assert shard[r.latents_key].shape == (r.latent_frames, 4, 8, 8)  # [F', C, H/8, W/8]


def test_windows_all_splits_long_clips_into_spans_of_one_window(corpus):
    make, _ = corpus
    result, clips = _check(make(windows="all"))
    long = clips[clips.name == S40]
    # Two 20 s pieces (max_duration 30 s), each three equal spans of 6.67 s >= 6.0 s.
    assert long.window.tolist() == [0, 1, 2, 0, 1, 2]
    assert long.start.round(3).tolist() == [0.0, 6.667, 13.333, 20.0, 26.667, 33.333]
    assert long.end.round(3).tolist() == [6.667, 13.333, 20.0, 26.667, 33.333, 40.0]
    assert long.keep.all() and long.clip_id.is_unique and long.split.nunique() == 1
    assert long.hashes.map(tuple).is_unique  # each span scored from its own frames
    assert (long.samples >= 2).all()
    s13 = clips[clips.name == S13]
    assert s13.start.tolist() == [0.0, 6.5] and s13.end.tolist() == [6.5, 13.0]
    assert clips[clips.name.isin([S6_1, "portrait"])].window.isna().all()  # room for one
    counts = result.counts
    assert (counts["kept"], counts["windows_split"], counts["too_short"]) == (10, 8, 3)

    # windows N: at most N spans per piece, spread over it.
    _, clips = _check(make(windows=2))
    long = clips[clips.name == S40]
    assert long.window.tolist() == [0, 2, 0, 2]
    assert long.start.round(3).tolist() == [0.0, 13.333, 20.0, 33.333]
    assert clips[clips.name == S13].window.tolist() == [0, 1]


def test_window_spans_and_the_near_duplicates_of_one_video():
    w = Windows.of(PrecomputeConfig(windows="all"))  # 49 frames at 8 fps: 6.0 s
    assert w.spans(0.0, 11.9) == [(0.0, 11.9, None)]  # room for one window only
    assert w.spans(0.0, 12.0) == [(0.0, 6.0, 0), (6.0, 12.0, 1)]  # exactly two: each fits
    assert w.too_short(6.0) is None and w.too_short(6.0 - 1e-7) is None
    reason = "too short for a training window (5.99 s < 6.00 s: 49 frames at 8 fps)"
    assert w.too_short(5.99) == reason
    assert Windows.of(PrecomputeConfig(windows=3)).spans(0, 60) == [
        (0.0, 6.0, 0),
        (24.0, 30.0, 4),
        (54.0, 60.0, 9),
    ]
    assert Windows.of(PrecomputeConfig()).spans(0, 60) == [(0, 60, None)]  # windows: first
    # Spans of one video (group 0) look alike on average (mean 2 bits), not at every point
    # (one point 8 bits off): not duplicates. Two other videos that close are.
    a = np.zeros(4, np.uint64)
    b = np.array([0xFF, 0, 0, 0], np.uint64)  # 8, 0, 0, 0 bits off: mean 2
    hashes, lengths = np.stack([a, b, a, b]), np.full(4, 6.5)
    pairs = near_pairs(hashes, lengths, 4, groups=np.array([0, 0, -1, -1]), group_bits=2)
    assert (0, 1) not in pairs and (2, 3) in pairs and (0, 2) in pairs


def test_select_top_gives_exactly_n_samples_and_captions_only_kept_clips(corpus):
    make, _ = corpus
    n = 4
    cfg = make(filter={"select_top": n}, windows="all")
    results = {r.stage: r for r in run_all(cfg, until="precompute")}
    clips = read_table(Path(results["check"].path) / "clips.parquet")
    captions = read_table(Path(results["caption"].path) / "captions.parquet")
    # Nothing too short for a window reached the captioner: every kept clip, only those.
    assert sorted(captions.clip_id) == sorted(clips.clip_id[clips.keep])
    assert len(captions) == 10  # 6 spans of the 40 s clip, 2 of the 13 s, 6.1 s, portrait
    assert results["filter"].counts["accepted"] >= n
    index = read_table(Path(results["precompute"].path) / "index.parquet")
    assert len(index) == n and (index.status == "ok").all() and (index.frames == 49).all()
    assert results["precompute"].counts["ok"] == n


def test_a_temporal_patch_of_2_takes_only_16k_plus_1_frames(tmp_path, tiny_models, monkeypatch):
    from cogpipe.models import cogvideox

    config = cogvideox.transformer_config(str(tiny_models["cogvideox"]))
    monkeypatch.setattr(cogvideox, "transformer_config", lambda model: config | {"patch_size_t": 2})
    cfg = PipelineConfig(
        workspace=tmp_path,
        model=str(tiny_models["cogvideox"]),
        precompute={"frame_buckets": [33, 25, 17]},
    )
    nowhere = {s: StageResult(s, "k", str(tmp_path / s)) for s in ("check", "filter")}
    with pytest.raises(precompute.ConfigError, match=r"must be 16k\+1 .*; 25 of frames 49 and"):
        precompute.run_precompute(Workspace(tmp_path), cfg, nowhere)
