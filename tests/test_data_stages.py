"""Ingest, check and filter on generated footage: every file accounted for, reasons exact."""

import os
import shutil

import pandas as pd
import pytest

from cogpipe.check import near_pairs, phash
from cogpipe.config import FilterConfig
from cogpipe.filter import judge, repetition
from cogpipe.pipeline import plan, run_stage
from cogpipe.workspace import read_table


@pytest.fixture
def checked(demo_config):
    cfg = demo_config()
    ingest = run_stage(cfg, "ingest")
    check = run_stage(cfg, "check")
    return cfg, ingest, check


def test_every_file_is_a_row_and_bad_files_have_reasons(checked, sample_videos):
    cfg, ingest, _ = checked
    videos = read_table(ws_file(ingest, "videos.parquet")).set_index("path")
    assert sorted(videos.index) == sorted(str(p) for p in sample_videos.values())
    assert videos.loc[str(sample_videos["corrupt.mp4"]), "status"] == "rejected"
    assert "cannot open as video" in videos.loc[str(sample_videos["corrupt.mp4"]), "reason"]
    assert (
        videos.loc[str(sample_videos["notes.txt"]), "reason"]
        == "not a video file (extension '.txt')"
    )
    ok = videos[videos.status == "ok"]
    assert (ok.frames == 24).all() or set(ok.frames) >= {24}
    assert ingest.counts["files"] == len(sample_videos)


def test_black_frozen_and_duplicates_are_rejected_with_reasons(checked, sample_videos):
    _, _, check = checked
    clips = read_table(ws_file(check, "clips.parquet")).set_index("path")
    reason = lambda name: clips.loc[str(sample_videos[name + ".mp4"]), "reasons"]  # noqa: E731
    assert reason("black").startswith("black frames")
    assert reason("frozen").startswith("frozen")
    # The larger re-encode is kept; the original becomes its near duplicate.
    original, reencoded = (
        str(sample_videos["shapes_00.mp4"]),
        str(sample_videos["shapes_00_reencoded.mp4"]),
    )
    kept, dropped = (reencoded, original) if clips.loc[reencoded, "keep"] else (original, reencoded)
    assert clips.loc[kept, "keep"] and not clips.loc[dropped, "keep"]
    assert clips.loc[dropped, "dup_of"] == clips.loc[kept, "clip_id"]
    kept_id = clips.loc[kept, "clip_id"]
    assert clips.loc[dropped, "reasons"] == f"near duplicate of {kept_id} ({kept})"
    good = [f"shapes_{i:02d}" for i in range(1, 6)]
    assert all(clips.loc[str(sample_videos[g + ".mp4"]), "keep"] for g in good)
    assert set(clips.split) <= {"train", "heldout"}
    assert clips.clip_id.is_unique


def test_exact_copy_shares_video_id_and_one_is_kept(demo_config, sample_videos, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sample_videos["shapes_01.mp4"].parent, src)
    shutil.copy(src / "shapes_01.mp4", src / "copy of shapes_01.mp4")
    cfg = demo_config(ingest={"source": str(src)})
    run_stage(cfg, "ingest")
    clips = read_table(ws_file(run_stage(cfg, "check"), "clips.parquet")).set_index("path")
    pair = clips.loc[[str(src / "shapes_01.mp4"), str(src / "copy of shapes_01.mp4")]]
    assert pair.video_id.nunique() == 1
    assert pair.keep.sum() == 1
    assert pair[~pair.keep].reasons.iloc[0].startswith("exact duplicate of")


def test_second_ingest_probes_nothing_and_new_file_gives_new_key(
    demo_config, sample_videos, tmp_path
):
    src = tmp_path / "src"
    shutil.copytree(sample_videos["shapes_01.mp4"].parent, src)
    cfg = demo_config(ingest={"source": str(src)})
    first = run_stage(cfg, "ingest")
    assert first.counts["probed"] == len(sample_videos)
    assert run_stage(cfg, "ingest").reused
    shutil.copy(src / "shapes_02.mp4", src / "new.mp4")
    os.utime(src / "new.mp4", ns=(1, 1))
    third = run_stage(cfg, "ingest")
    assert third.key != first.key and not third.reused
    assert third.counts["probed"] == 1  # only the new file is read; the rest come from cache


def test_config_change_downstream_keeps_upstream_keys(demo_config):
    a = plan(demo_config())
    b = plan(demo_config(caption={"prompt": "Describe the slap."}))
    assert a["ingest"] == b["ingest"] and a["check"] == b["check"]
    for stage in ("caption", "filter", "precompute", "train", "evaluate"):
        assert a[stage] != b[stage], stage


def test_filter_rules():
    fc = FilterConfig(min_words=5, max_words=20)
    assert judge("", fc) == (0.0, ["empty caption"])
    assert judge("a man slaps", fc)[1] == ["too few words (3 < 5)"]
    assert "too many words" in judge(" ".join(["word"] * 30), fc)[1][0]
    loop = "he slaps him hard " * 5
    assert any(r.startswith("repetitive") for r in judge(loop, fc)[1])
    refusal = judge("I'm sorry, I cannot describe this video for you today.", fc)
    assert refusal[0] == 0 and any("refusal" in r for r in refusal[1])
    score, reasons = judge("A tall fighter winds up and slaps his opponent, who staggers back.", fc)
    assert reasons == [] and 0 < score <= 1
    assert repetition("a b c a b c a b c".split()) == pytest.approx(4 / 7)


def test_phash_matches_a_rescaled_frame_and_not_another_picture():
    import numpy as np

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (8, 12, 3)).astype(np.uint8).repeat(16, 0).repeat(16, 1)
    small = img[::2, ::2]
    other = rng.integers(0, 255, img.shape).astype(np.uint8)
    as_int = lambda frame: int(phash(frame), 16)  # noqa: E731
    hashes = np.array([[as_int(img)], [as_int(small)], [as_int(other)]], dtype=np.uint64)
    pairs = near_pairs(hashes, np.array([3.0, 3.0, 3.0]), max_bits=8)
    assert pairs == [(0, 1)]


def ws_file(result, name):
    from pathlib import Path

    return Path(result.path) / name


def test_stage_tables_have_the_documented_columns(checked):
    _, ingest, check = checked
    videos = read_table(ws_file(ingest, "videos.parquet"))
    assert {"video_id", "path", "status", "reason"} <= set(videos.columns)
    clips = read_table(ws_file(check, "clips.parquet"))
    assert {"clip_id", "video_id", "path", "start", "end", "split", "keep", "reasons",
            "dup_group", "dup_of"} <= set(clips.columns)  # fmt: skip
    assert isinstance(clips, pd.DataFrame)


def test_filter_carries_caption_failures_and_missing_captions(tmp_path):
    from cogpipe.config import PipelineConfig
    from cogpipe.filter import run_filter
    from cogpipe.workspace import StageResult, Workspace, write_table

    ws = Workspace(tmp_path)
    cap = tmp_path / "caption" / "k"
    write_table(cap / "captions.parquet", pd.DataFrame({
        "clip_id": ["a", "b", "c"],
        "caption": ["A fighter winds up and slaps his opponent hard.", None, None],
        "error": [None, "cannot decode frames: truncated", None],
    }))  # fmt: skip
    cfg = PipelineConfig(workspace=tmp_path, filter={"min_words": 3})
    result = run_filter(ws, cfg, {"caption": StageResult("caption", "k", str(cap))})
    table = read_table(ws_file(result, "curated.parquet")).set_index("clip_id")
    assert table.selected.tolist() == [True, False, False]
    assert table.loc["b", "reasons"] == "caption failed: cannot decode frames: truncated"
    assert table.loc["c", "reasons"] == "empty caption"
    assert result.counts == {"captions": 3, "selected": 1, "rejected": 2}
