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


GOOD = (
    "A tall fighter in black shorts plants his feet in a wide stance at the table, winds up "
    "with a long swing of his right arm and slaps his opponent flush on the cheek. The "
    "impact snaps the opponent's head sideways; he staggers back two steps, flinches, and "
    "the referee steps in while the crowd behind the stage rises. The camera holds a wide "
    "shot from the side."
)


def test_filter_accepts_a_good_caption_and_scores_it_high():
    score, reasons = judge(GOOD, FilterConfig(max_tokens=0))
    assert reasons == [] and score > 0.9


@pytest.mark.parametrize(
    ("caption", "truncated", "reason"),
    [
        ("", False, "empty caption"),
        ("A fighter slaps his opponent on the cheek at the table.", False, "too few words (11 < 40)"),
        (GOOD + " He then" + " slaps again" * 40 + ".", False, "too many words"),
        (GOOD, True, "truncated (hit the token limit)"),
        (GOOD[:-1] + " and then the", False, "truncated (no closing punctuation)"),
        (GOOD + " He slaps him hard and" * 12 + " done.", False, "repetitive"),
        ("I'm sorry, but I cannot help with that. " + GOOD, False, "refusal phrase (\"i'm sorry\")"),
        ("As an AI, I watched it: " + GOOD, False, "refusal phrase (\"as an ai\")"),
        ("Certainly! Here is what happens. " + GOOD, False, "assistant phrase (\"certainly!\")"),
        (GOOD + " I hope this helps.", False, "assistant phrase (\"i hope this helps\")"),
        ("The image shows two men at a table. " + GOOD, False, "still-image phrase (\"the image shows\")"),
        ("In this picture, " + GOOD, False, "still-image phrase (\"in this picture\")"),
        ("Un luchador alto con pantalones negros se coloca frente a la mesa, levanta el brazo "
         "derecho y abofetea a su rival en la mejilla; el golpe le gira la cabeza, retrocede dos "
         "pasos, el juez interviene y el publico se levanta mientras la camara mantiene un plano "
         "general desde un lado de la sala llena.", False, "not English"),
        ("\u4e00\u540d\u9ad8\u5927\u7684\u62f3\u624b " * 12 + GOOD, False, "not English"),
        ("A woman in a red coat walks along a quiet beach at sunset while gulls circle above "
         "the water and small waves roll in over the sand; she stops, looks out at the horizon, "
         "smiles, and keeps walking as the sky turns orange and the light slowly fades into a "
         "soft purple evening over the sea.", False, "off-domain (0 of 2 domain terms)"),
    ],
)  # fmt: skip
def test_filter_rejects_each_kind_with_its_reason(caption, truncated, reason):
    score, reasons = judge(caption, FilterConfig(max_tokens=0), truncated=truncated)
    assert any(r.startswith(reason) for r in reasons), reasons


def test_filter_counts_tokens_with_the_video_models_tokenizer():
    fc = FilterConfig(max_tokens=60)
    words = lambda text: len(text.split()) + 1  # noqa: E731  (a counter like T5's: + </s>)
    assert judge(GOOD, fc, count_tokens=words)[1] == [f"too many tokens ({words(GOOD)} > 60)"]
    assert judge(GOOD, fc.model_copy(update={"max_tokens": 226}), count_tokens=words)[1] == []


def test_filter_blocks_refusals_and_repetition_in_the_score():
    fc = FilterConfig(max_tokens=0)
    assert judge("I'm sorry, I cannot describe this. " + GOOD, fc)[0] == 0
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
    cfg = PipelineConfig(workspace=tmp_path, filter={"min_words": 3, "max_tokens": 0})
    result = run_filter(ws, cfg, {"caption": StageResult("caption", "k", str(cap))})
    table = read_table(ws_file(result, "curated.parquet")).set_index("clip_id")
    assert table.selected.tolist() == [True, False, False]
    assert table.loc["b", "reasons"] == "caption failed: cannot decode frames: truncated"
    assert table.loc["c", "reasons"] == "empty caption"
    assert result.counts == {"captions": 3, "selected": 1, "rejected": 2}
