"""Ingest sources: list files, dataset layouts with their captions, and incremental re-ingest."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from cogpipe.config import PipelineConfig, PrecomputeConfig
from cogpipe.pipeline import run_stage
from cogpipe.sources import CAPTION_LISTS, VIDEO_LISTS, SourceError, list_source
from cogpipe.workspace import read_table


@pytest.fixture
def clips(sample_videos, tmp_path) -> Path:
    """A dataset folder with three sample clips under videos/."""
    root = tmp_path / "data"
    (root / "videos").mkdir(parents=True)
    for i in range(3):
        shutil.copy(sample_videos[f"shapes_0{i}.mp4"], root / "videos" / f"clip{i}.mp4")
    return root


def _manifest(cfg: PipelineConfig):
    result = run_stage(cfg, "ingest")
    return read_table(Path(result.path) / "videos.parquet").set_index("path")


def _cfg(tmp_path: Path, source: Path, **ingest) -> PipelineConfig:
    return PipelineConfig(workspace=tmp_path / "ws", ingest={"source": source, **ingest})


CAPTIONS = ["A man slaps.", "A woman slaps back.", "Both fall."]
VIDEOS_TXT = "".join(f"videos/clip{i}.mp4\n" for i in range(3))


def _captions(cfg: PipelineConfig) -> dict[str, str | None]:
    """path -> source caption of every entry the source lists (no probing: fast)."""
    return {path: caption for path, _, _, caption, _ in list_source(cfg)}


def _clip(root: Path, i: int) -> str:
    return str(root / "videos" / f"clip{i}.mp4")


def test_csv_list_with_captions_and_a_missing_entry(clips, tmp_path):
    listing = clips / "list.csv"
    rows = [f"videos/clip{i}.mp4,{c}" for i, c in enumerate(CAPTIONS)]
    listing.write_text("path,caption\n" + "\n".join([*rows, "videos/gone.mp4,"]) + "\n")
    videos = _manifest(_cfg(tmp_path, listing))
    assert len(videos) == 4
    for i, caption in enumerate(CAPTIONS):
        row = videos.loc[str(clips / "videos" / f"clip{i}.mp4")]
        assert row.status == "ok" and row.source_caption == caption
    assert videos.loc[str(clips / "videos" / "gone.mp4"), "reason"] == (
        "missing file (listed, not found)"
    )


def test_jsonl_list_with_absolute_paths(clips, tmp_path):
    listing = tmp_path / "list.jsonl"
    lines = [
        json.dumps({"video": str(clips / "videos" / f"clip{i}.mp4"), "text": c})
        for i, c in enumerate(CAPTIONS)
    ]
    listing.write_text("\n".join(lines) + "\n")
    videos = _manifest(_cfg(tmp_path, listing))
    assert sorted(videos.source_caption) == sorted(CAPTIONS)


def test_diffusers_layout_prompts_and_videos(clips, tmp_path):
    (clips / "videos.txt").write_text("".join(f"videos/clip{i}.mp4\n" for i in range(3)))
    (clips / "prompts.txt").write_text("".join(f"{c}\n" for c in CAPTIONS))
    videos = _manifest(_cfg(tmp_path, clips))
    assert len(videos) == 3  # the layout's entries, not every file in the folder
    assert videos.loc[str(clips / "videos" / "clip1.mp4"), "source_caption"] == CAPTIONS[1]


@pytest.mark.parametrize("caption_list", CAPTION_LISTS)
@pytest.mark.parametrize("video_list", VIDEO_LISTS)
def test_every_two_file_layout_keeps_every_caption_on_its_video(
    clips, tmp_path, caption_list, video_list
):
    (clips / video_list).write_text(VIDEOS_TXT)
    (clips / caption_list).write_text("".join(f"{c}\n" for c in CAPTIONS))
    captions = _captions(_cfg(tmp_path, clips))
    assert captions == {_clip(clips, i): c for i, c in enumerate(CAPTIONS)}


def test_blank_caption_line_keeps_its_place_in_the_alignment(clips, tmp_path):
    (clips / "video.txt").write_text(VIDEOS_TXT.replace("\n", "\r\n"))
    (clips / "captions.txt").write_text(f"{CAPTIONS[0]}\r\n\r\n{CAPTIONS[2]}")  # no final newline
    captions = _captions(_cfg(tmp_path, clips))
    assert captions == {
        _clip(clips, 0): CAPTIONS[0],
        _clip(clips, 1): None,
        _clip(clips, 2): CAPTIONS[2],
    }


@pytest.mark.parametrize(
    ("videos", "prompts", "match"),
    [
        (
            "videos/clip0.mp4\nvideos/clip1.mp4\n",
            "only one prompt\n",
            r"prompts\.txt has 1 lines but .*videos\.txt has 2: line 2 of .*videos\.txt has no"
            r" caption line",
        ),
        (
            "videos/clip0.mp4\n",
            "one\ntwo\n",
            r"prompts\.txt has 2 lines but .*videos\.txt has 1: line 2 of .*prompts\.txt captions"
            r" no video",
        ),
        (
            "videos/clip0.mp4\n\nvideos/clip2.mp4\n",
            "".join(f"{c}\n" for c in CAPTIONS),
            r"videos\.txt: line 2 is blank",
        ),
        (
            "videos/clip0.mp4\nvideos/clip1.mp4\n\n",
            "one\ntwo\n",
            r"prompts\.txt has 2 lines but .*videos\.txt has 3",
        ),  # a blank line is a line
    ],
    ids=["fewer-captions", "caption-without-video", "blank-video-line", "extra-blank-line"],
)
def test_two_file_layout_that_cannot_be_aligned_names_the_file_and_line(
    clips, tmp_path, videos, prompts, match
):
    (clips / "videos.txt").write_text(videos)
    (clips / "prompts.txt").write_text(prompts)
    with pytest.raises(SourceError, match=match):
        list_source(_cfg(tmp_path, clips))


@pytest.mark.parametrize(
    ("files", "match"),
    [
        (
            ["videos.txt", "prompts.txt", "captions.txt"],
            r"prompts\.txt and .*captions\.txt are both",
        ),
        (["video.txt", "videos.txt", "prompt.txt"], r"video\.txt and .*videos\.txt are both"),
        (["metadata.csv", "metadata.json"], r"metadata\.csv and .*metadata\.json are both"),
        (["videos.txt", "metadata.jsonl"], r"videos\.txt and .*metadata\.jsonl both list"),
        (["prompts.txt"], r"prompts\.txt is a caption list with no video list"),
    ],
    ids=["two-caption-lists", "two-video-lists", "two-metadata", "list-and-metadata", "no-videos"],
)
def test_ambiguous_or_unpaired_caption_sources_are_errors(clips, tmp_path, files, match):
    heads = {"metadata.csv": "file_name,caption\n", "metadata.json": "[]", "metadata.jsonl": ""}
    for name in files:
        (clips / name).write_text(heads.get(name, VIDEOS_TXT))
    with pytest.raises(SourceError, match=match):
        list_source(_cfg(tmp_path, clips))


@pytest.mark.parametrize("kind", ["diffusers", "metadata.jsonl", "list.csv"])
def test_a_video_listed_twice_with_two_captions_names_the_file_and_both_lines(
    clips, tmp_path, kind
):
    rows = [
        ("videos/clip0.mp4", "first"),
        ("videos/clip1.mp4", "x"),
        ("./videos/clip0.mp4", "other"),
    ]
    if kind == "diffusers":
        (clips / "videos.txt").write_text("".join(f"{p}\n" for p, _ in rows))
        (clips / "prompts.txt").write_text("".join(f"{c}\n" for _, c in rows))
        source, named, lines = clips, "videos.txt", (1, 3)
    elif kind == "metadata.jsonl":
        text = "".join(json.dumps({"file_name": p, "caption": c}) + "\n" for p, c in rows)
        (clips / kind).write_text(text)
        source, named, lines = clips, kind, (1, 3)
    else:
        (clips / kind).write_text("path,caption\n" + "".join(f"{p},{c}\n" for p, c in rows))
        source, named, lines = clips / kind, kind, (2, 4)
    with pytest.raises(
        SourceError,
        match=rf"{named}: \./videos/clip0\.mp4 is listed on line {lines[0]} and line"
        rf" {lines[1]} with different captions \('first' and 'other'\)",
    ):
        list_source(_cfg(tmp_path, source))


def test_a_video_listed_twice_with_one_caption_is_one_entry(clips, tmp_path):
    listing = clips / "list.jsonl"
    rows = [
        {"video": "videos/clip0.mp4"},
        {"video": "videos/clip0.mp4", "caption": "kept"},
        {"video": "videos/./clip0.mp4", "caption": "kept"},
    ]
    listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _captions(_cfg(tmp_path, listing)) == {_clip(clips, 0): "kept"}


def test_caption_file_pairs_in_a_folder(clips, tmp_path):
    videos = clips / "videos"
    (videos / "clip0.txt").write_text(f"  {CAPTIONS[0]}\n")
    (videos / "clip1.txt").write_text("\n")  # a blank caption file: no caption, still consumed
    (videos / "notes.txt").write_text("no video beside me")
    table = _manifest(_cfg(tmp_path, videos))
    assert sorted(Path(p).name for p in table.index) == [
        "clip0.mp4",
        "clip1.mp4",
        "clip2.mp4",
        "notes.txt",
    ]
    assert table.loc[_clip(clips, 0), "source_caption"] == CAPTIONS[0]
    assert table.loc[[_clip(clips, 1), _clip(clips, 2)], "source_caption"].isna().all()
    assert (table.loc[[_clip(clips, i) for i in range(3)], "status"] == "ok").all()
    notes = table.loc[str(videos / "notes.txt")]
    assert notes.status == "rejected" and notes.reason.startswith("not a video file")


def test_caption_file_beside_two_videos_of_its_stem_is_a_rejected_row(clips, tmp_path):
    videos = clips / "videos"
    shutil.copy(videos / "clip0.mp4", videos / "clip0.mov")
    (videos / "clip0.txt").write_text("which one?")
    entries = {e[0]: e for e in list_source(_cfg(tmp_path, videos))}
    assert entries[str(videos / "clip0.txt")][4] == (
        "caption file beside 2 videos (clip0.mov, clip0.mp4): which one is ambiguous"
    )
    assert entries[_clip(clips, 0)][3] is None


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "json"])
def test_finetrainers_metadata_layout(clips, tmp_path, suffix):
    if suffix == "csv":
        text = "file_name,caption\n" + "".join(
            f'videos/clip{i}.mp4,"{c}"\n' for i, c in enumerate(CAPTIONS)
        )
    elif suffix == "json":  # a JSON array of records, as HF datasets and finetrainers read
        records = [
            {"video_file_name": f"videos/clip{i}.mp4", "text": c} for i, c in enumerate(CAPTIONS)
        ]
        text = json.dumps(records, indent=2)
    else:
        text = "".join(
            json.dumps({"file_name": f"videos/clip{i}.mp4", "prompt": c}) + "\n"
            for i, c in enumerate(CAPTIONS)
        )
    (clips / f"metadata.{suffix}").write_text(text)
    videos = _manifest(_cfg(tmp_path, clips))
    assert len(videos) == 3 and (videos.status == "ok").all()
    for i, caption in enumerate(CAPTIONS):
        assert videos.loc[_clip(clips, i), "source_caption"] == caption


def test_metadata_json_record_without_a_path_names_its_line(clips, tmp_path):
    records = [{"file_name": "videos/clip0.mp4", "caption": "a"}, {"caption": "lost"}]
    (clips / "metadata.json").write_text(json.dumps(records, indent=2))
    with pytest.raises(SourceError, match=r"metadata\.json: line 6 has no path column"):
        list_source(_cfg(tmp_path, clips))


def test_list_without_a_path_column_is_a_clear_error(clips, tmp_path):
    listing = clips / "bad.csv"
    listing.write_text("name,caption\nclip0.mp4,hi\n")
    with pytest.raises(SourceError, match=r"bad\.csv: line 2 has no path column"):
        list_source(_cfg(tmp_path, listing))


def test_an_empty_source_folder_is_a_clear_error_and_status_says_so(tmp_path):
    from cogpipe.pipeline import status

    (tmp_path / "empty").mkdir()
    cfg = _cfg(tmp_path, tmp_path / "empty")
    with pytest.raises(SourceError, match=r"empty holds no files \(folder layout\)"):
        list_source(cfg)
    assert "holds no files" in status(cfg)["error"]["message"]


def test_source_captions_reach_the_clips_table(clips, tmp_path):
    (clips / "metadata.csv").write_text(
        "file_name,caption\n" + "".join(f"videos/clip{i}.mp4,{c}\n" for i, c in enumerate(CAPTIONS))
    )
    # 1 s training windows: the 3 s sample clips are kept (a check that keeps none fails).
    cfg = _cfg(tmp_path, clips).model_copy(update={"precompute": PrecomputeConfig(frames=9)})
    run_stage(cfg, "ingest")
    table = read_table(Path(run_stage(cfg, "check").path) / "clips.parquet")
    assert sorted(table.source_caption) == sorted(CAPTIONS)


@pytest.mark.serial  # the 60 s bound
def test_reingest_of_100k_unchanged_files_probes_nothing(tmp_path, sample_videos):
    """The acceptance bound: an unchanged 100,000-entry tree re-ingests in under 60 s."""
    src = tmp_path / "tree"
    for d in range(100):
        folder = src / f"d{d:02d}"
        folder.mkdir(parents=True)
        for i in range(1000):
            fd = os.open(folder / f"c{i:03d}.mp4", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, b"%d/%d" % (d, i))  # small non-video files: each still a row
            os.close(fd)
    shutil.copy(sample_videos["shapes_00.mp4"], src / "d99" / "c999.mp4")  # one video at least
    cfg = _cfg(tmp_path, src)
    first = run_stage(cfg, "ingest")
    assert first.counts["files"] == 100_000 and first.counts["probed"] == 100_000

    started = time.monotonic()
    again = run_stage(cfg, "ingest")  # unchanged: the whole stage is reused
    assert again.reused and time.monotonic() - started < 60

    os.utime(src / "d00" / "c000.mp4", ns=(1, 1))  # one file changed: one file read
    started = time.monotonic()
    changed = run_stage(cfg, "ingest")
    assert time.monotonic() - started < 60
    assert changed.key != first.key and changed.counts["probed"] == 1
    assert changed.counts["files"] == 100_000
