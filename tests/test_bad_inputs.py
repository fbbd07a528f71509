"""Every kind of bad or odd input, through ingest and check: nothing lost, reasons exact."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from corpus import ROTATION, vfr_square_x, write_corpus

from cogpipe.check import _split
from cogpipe.config import PipelineConfig
from cogpipe.ingest import probe_file
from cogpipe.pool import map_files
from cogpipe.video import read_frames
from cogpipe.workspace import read_table

REJECTED = {
    "zero_byte": "empty file (0 bytes)",
    "truncated": "cannot open as video: Invalid data found",
    "truncated_faststart": "truncated: ",
    "not_video_text": "not a video (no container signature; content is text)",
    "not_video_ext": "not a video file (extension '.txt')",
    "random_bytes": "not a video (no container signature; content is unknown binary data)",
    "audio_only": "no video stream (only audio)",
    "dangling_link": "dangling symlink",
    "loop_a": "symlink loop",
    "loop_b": "symlink loop",
    "dir_loop": "symlink loop (links to a folder already scanned)",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    cases = write_corpus(root / "src")
    # Training windows of 9 frames at 8 fps (1 s): the corpus's 2-6 s clips are not too short.
    cfg = PipelineConfig(
        workspace=root / "ws", ingest={"source": root / "src"}, precompute={"frames": 9}
    )
    from cogpipe.pipeline import run_stage

    ingest = run_stage(cfg, "ingest")
    check = run_stage(cfg, "check")
    videos = read_table(Path(ingest.path) / "videos.parquet").set_index("path")
    clips = read_table(Path(check.path) / "clips.parquet")
    yield cases, videos, clips, check
    os.chmod(cases["unreadable"], 0o600)


def _row(videos: pd.DataFrame, cases: dict, name: str) -> pd.Series:
    return videos.loc[str(cases[name])]


def _clips(clips: pd.DataFrame, cases: dict, name: str) -> pd.DataFrame:
    return clips[clips.path == str(cases[name])].sort_values("start")


def test_every_input_is_exactly_one_manifest_row(corpus):
    cases, videos, _, _ = corpus
    assert videos.index.is_unique
    assert set(videos.index) == {str(p) for p in cases.values()}


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_bad_inputs_are_rejected_with_their_reason(corpus, name):
    cases, videos, _, _ = corpus
    row = _row(videos, cases, name)
    assert row.status == "rejected"
    assert row.reason.startswith(REJECTED[name]), row.reason


@pytest.mark.parametrize(
    "name",
    [
        "ok",
        "odd_dims",
        "vfr",
        "rotated",
        "ten_bit",
        "unicode_name",
        "single_frame",
        "huge",
        "symlink_file",
        "unreadable",
        "frozen",
        "multi_shot",
    ],
)
def test_readable_oddities_are_accepted_at_ingest(corpus, name):
    cases, videos, _, _ = corpus
    row = _row(videos, cases, name)
    if name == "unreadable" and os.geteuid() != 0:  # mode 000 stops everyone but root
        assert row.reason == "cannot read file: Permission denied"
    else:
        assert row.status == "ok", row.reason


def test_odd_sizes_depth_rotation_and_frame_rate_are_recorded(corpus):
    cases, videos, _, _ = corpus
    assert _row(videos, cases, "odd_dims")[["width", "height"]].tolist() == [161, 97]
    assert _row(videos, cases, "ten_bit").bit_depth == 10
    rotated = _row(videos, cases, "rotated")
    assert [rotated.width, rotated.height] == [96, 160]  # display size, not coded size
    assert rotated.rotation == ROTATION % 360
    assert _row(videos, cases, "vfr").vfr and not _row(videos, cases, "ok").vfr
    assert _row(videos, cases, "huge")[["width", "height"]].tolist() == [8192, 4352]


def test_reads_are_normalised(corpus):
    cases, _, _, _ = corpus
    # Rotation applied: the marker coded top-left shows top-right after a clockwise turn.
    frame = read_frames(cases["rotated"], [0.5])[0]
    assert frame.shape == (160, 96, 3)
    assert frame[:24, -12:].mean() > 240 and frame[:24, :12].mean() < 200
    # 10-bit becomes 8-bit RGB with the same picture as its source.
    ten = read_frames(cases["ten_bit"], [0.0, 1.0])
    assert ten.dtype == np.uint8 and 60 < ten.mean() < 200
    # Variable frame rate: each time gets the frame shown then (constant-rate resampling).
    times = [i / 8 for i in range(24)]
    frames = read_frames(cases["vfr"], times)
    shown = np.array([int(np.argmax(f[40:56, :, 0].mean(axis=0) > 200)) for f in frames])
    source_times = np.cumsum((0,) + (1, 3, 1, 1, 3, 3, 1, 3, 1, 1) * 10) / 30
    expected = [vfr_square_x(source_times[source_times <= t + 1e-9].max()) for t in times]
    assert np.abs(shown - expected).max() <= 1


def test_checks_trim_split_and_reject_as_expected(corpus):
    cases, _, clips, _ = corpus
    lead = _clips(clips, cases, "black_leader_trailer")
    assert len(lead) == 1 and lead.trimmed.iloc[0] and lead.keep.iloc[0]
    assert lead.start.iloc[0] == pytest.approx(1.0, abs=0.05)
    assert lead.end.iloc[0] == pytest.approx(3.0, abs=0.05)
    assert _clips(clips, cases, "frozen").reasons.iloc[0].startswith("frozen")
    shots = _clips(clips, cases, "multi_shot")
    assert shots.start.round(1).tolist() == [0.0, 2.0, 4.0]
    assert shots.end.round(1).tolist() == [2.0, 4.0, 6.0]
    assert shots.keep.all()
    assert "too short" in _clips(clips, cases, "single_frame").reasons.iloc[0]
    assert _clips(clips, cases, "huge").reasons.iloc[0].startswith("too large (8192x4352")
    readable = ["ok", "odd_dims", "vfr", "rotated", "ten_bit", "unicode_name"]
    for name in readable + (["unreadable"] if os.geteuid() == 0 else []):
        row = _clips(clips, cases, name).iloc[0]
        assert row.motion > 0.5 and row.frozen_ratio < 0.5, name


def test_duplicates_are_grouped_and_the_best_member_kept(corpus):
    cases, videos, clips, _ = corpus
    src, copy = _row(videos, cases, "near_dup_src"), _row(videos, cases, "exact_copy")
    assert src.video_id == copy.video_id  # exact copies: two rows, one video_id
    group = pd.concat([_clips(clips, cases, n) for n in ("near_dup_src", "exact_copy", "near_dup")])
    assert group.keep.sum() == 1
    best = group[group.keep].iloc[0]
    assert best.width == 320  # the larger encode wins over the small low-bitrate one
    dups = group[~group.keep]
    assert (dups.dup_of == best.clip_id).all() and (group.dup_group == best.clip_id).all()
    small = _clips(clips, cases, "near_dup").iloc[0]
    assert small.reasons.startswith(f"near duplicate of {best.clip_id}")
    other = dups[dups.path != small.path].iloc[0]
    assert other.reasons.startswith(f"exact duplicate of {best.clip_id}")
    link = pd.concat([_clips(clips, cases, n) for n in ("ok", "symlink_file")])
    assert link.video_id.nunique() == 1 and link.keep.sum() == 1


def test_heldout_is_drawn_per_duplicate_group_and_source_video(corpus):
    _, _, clips, _ = corpus
    for col in ("dup_group", "video_id"):
        grouped = clips.dropna(subset=[col]).groupby(col).split.nunique()
        assert (grouped == 1).all(), col
    # Forced to both splits: a held-out clip never has a near duplicate in training.
    table = pd.DataFrame(
        {
            "clip_id": [f"c{i}" for i in range(40)],
            "video_id": [f"v{i // 2}" for i in range(40)],  # two clips per source video
            "dup_group": [None] * 20 + [f"g{i // 4}" for i in range(20)],
        }
    )
    split = pd.Series(_split(table, 0.5))
    assert set(split) == {"train", "heldout"}
    for col in ("video_id", "dup_group"):
        assert (split.groupby(table[col]).nunique() == 1).all()
    assert _split(table, 0.5) == list(split)  # stable


def test_sampling_decodes_a_fraction_when_keyframes_allow(tmp_path):
    """A 10 s clip with a keyframe every second: checks decode well under a quarter."""
    from cogpipe.check import inspect_video
    from cogpipe.config import CheckConfig
    from cogpipe.video import probe_video, write_mp4

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (1, 72, 128, 3), dtype=np.uint8).repeat(100, axis=0)
    for i in range(100):  # a square moving over a still background
        frames[i, 20:40, i : i + 20] = 255
    path = write_mp4(tmp_path / "gop.mp4", frames, fps=10, options={"g": "10"})
    info, error = probe_video(path)
    assert error == "" and len(info["keyframes"]) == 10
    out = inspect_video(str(path), info, CheckConfig(sample_frames=8))
    assert out["decoded"] <= 0.25 * info["frames"]
    assert len(out["clips"]) == 1 and out["clips"][0]["samples"] >= 8


def test_auto_scene_split_finds_the_cuts_a_full_scan_finds(tmp_path):
    """Cuts between keyframes, two of them 7 frames apart: `scenes: auto` (strided
    comparisons, ContentDetector only where frames differ) places every cut on the same
    frame as ContentDetector on every frame, and decodes less."""
    from cogpipe.check import inspect_video
    from cogpipe.config import CheckConfig
    from cogpipe.video import probe_video, write_mp4

    rng = np.random.default_rng(1)
    cuts = [23, 40, 47]
    looks = [rng.integers(0, 255, (1, 72, 128, 3), dtype=np.uint8) for _ in range(4)]
    frames = np.concatenate([looks[sum(i >= c for c in cuts)] for i in range(100)])
    for i in range(100):  # a square moving over each shot
        frames[i, 20:40, i : i + 20] = 255
    path = write_mp4(
        tmp_path / "shots.mp4", frames, fps=10, options={"g": "100", "sc_threshold": "0"}
    )
    info, error = probe_video(path)
    assert error == "" and info["keyframes"] == [0.0]
    edges = {}
    for scenes in ("auto", "always"):
        out = inspect_video(str(path), info, CheckConfig(scenes=scenes, min_duration=0.1))
        edges[scenes] = [round(clip["start"] * 10) for clip in out["clips"]], out["decoded"]
    assert edges["auto"][0] == edges["always"][0] == [0, *cuts]
    assert edges["auto"][1] < edges["always"][1]


def test_a_hanging_or_crashing_file_costs_one_row_not_the_stage():
    started = time.monotonic()
    out = sorted(map_files(time.sleep, [(0.01,), (60,), (0.01,)], workers=2, timeout=2))
    assert [e for _, _, e in out] == ["", "timed out after 2s", ""]
    assert time.monotonic() - started < 20
    crashed = sorted(map_files(os._exit, [(3,), (0,)], workers=1, timeout=10))
    assert crashed[0][2] == "worker crashed (exit code 3) reading this file"


def test_ingest_time_limit_rejects_with_reason(tmp_path):
    """Every file timed out: the manifest says why per file, and the stage, left with no
    video, fails naming the commonest reasons instead of being done with nothing."""
    from cogpipe.errors import EmptyStage
    from cogpipe.pipeline import run_stage

    src = write_corpus(tmp_path / "src")
    cfg = PipelineConfig(
        workspace=tmp_path / "ws", ingest={"source": tmp_path / "src", "timeout": 1e-4}
    )
    with pytest.raises(EmptyStage, match=r"every one rejected \(probe failed \(\d+\), symlink"):
        run_stage(cfg, "ingest")
    manifest = next((tmp_path / "ws" / "ingest").glob("*/videos.parquet"))
    videos = read_table(manifest).set_index("path")
    assert videos.loc[str(src["ok"]), "reason"] == "probe failed: timed out after 0.0001s"
    assert len(videos) == len(src)
    os.chmod(src["unreadable"], 0o600)


def test_unreadable_file_is_rejected_for_permissions(corpus):
    """Root reads anything, so as root the probe runs in a child that became 'nobody'."""
    cases, _, _, _ = corpus
    folder = Path(tempfile.mkdtemp(prefix="cogpipe-perm-"))
    try:
        folder.chmod(0o755)
        path = folder / "locked.mp4"
        shutil.copyfile(cases["ok"], path)
        path.chmod(0o000)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: drop root, probe, report, exit
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                os.write(write_end, probe_file(str(path), [".mp4"])["reason"].encode())
            except BaseException as e:  # the parent's assertion shows it
                os.write(write_end, repr(e).encode())
            os._exit(0)
        os.close(write_end)
        os.waitpid(pid, 0)
        with os.fdopen(read_end) as f:
            assert f.read() == "cannot read file: Permission denied"
    finally:
        shutil.rmtree(folder)


def test_dataset_report_has_plots_and_counts(corpus):
    _, _, clips, check = corpus
    folder = Path(check.path)
    report = (folder / "report.md").read_text()
    for png in ("rejections.png", "durations.png", "resolutions.png"):
        assert (folder / png).stat().st_size > 1000 and f"]({png})" in report
    assert f"{len(clips)} clips" not in report  # the wording is "clips: N (...)"
    assert f"- clips: {len(clips)} (" in report and "symlink loop" in report
