"""Ingest sources: list files, dataset layouts with their captions, and incremental re-ingest."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from cogpipe.config import PipelineConfig
from cogpipe.ingest import SourceError, list_source
from cogpipe.pipeline import run_stage
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
    lines = [json.dumps({"video": str(clips / "videos" / f"clip{i}.mp4"), "text": c})
             for i, c in enumerate(CAPTIONS)]  # fmt: skip
    listing.write_text("\n".join(lines) + "\n")
    videos = _manifest(_cfg(tmp_path, listing))
    assert sorted(videos.source_caption) == sorted(CAPTIONS)


def test_diffusers_layout_prompts_and_videos(clips, tmp_path):
    (clips / "videos.txt").write_text("".join(f"videos/clip{i}.mp4\n" for i in range(3)))
    (clips / "prompts.txt").write_text("".join(f"{c}\n" for c in CAPTIONS))
    videos = _manifest(_cfg(tmp_path, clips))
    assert len(videos) == 3  # the layout's entries, not every file in the folder
    assert videos.loc[str(clips / "videos" / "clip1.mp4"), "source_caption"] == CAPTIONS[1]


def test_diffusers_layout_with_mismatched_lines_names_both_files(clips, tmp_path):
    (clips / "videos.txt").write_text("videos/clip0.mp4\nvideos/clip1.mp4\n")
    (clips / "prompts.txt").write_text("only one prompt\n")
    with pytest.raises(SourceError, match=r"prompts\.txt has 1 prompts but .*videos\.txt has 2"):
        list_source(_cfg(tmp_path, clips))


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_finetrainers_metadata_layout(clips, tmp_path, suffix):
    if suffix == "csv":
        text = "file_name,caption\n" + "".join(
            f'videos/clip{i}.mp4,"{c}"\n' for i, c in enumerate(CAPTIONS)
        )
    else:
        text = "".join(
            json.dumps({"file_name": f"videos/clip{i}.mp4", "prompt": c}) + "\n"
            for i, c in enumerate(CAPTIONS)
        )
    (clips / f"metadata.{suffix}").write_text(text)
    videos = _manifest(_cfg(tmp_path, clips))
    assert videos.loc[str(clips / "videos" / "clip2.mp4"), "source_caption"] == CAPTIONS[2]


def test_list_without_a_path_column_is_a_clear_error(clips, tmp_path):
    listing = clips / "bad.csv"
    listing.write_text("name,caption\nclip0.mp4,hi\n")
    with pytest.raises(SourceError, match=r"bad\.csv: line 2 has no path column"):
        list_source(_cfg(tmp_path, listing))


def test_source_captions_reach_the_clips_table(clips, tmp_path):
    (clips / "metadata.csv").write_text(
        "file_name,caption\n" + "".join(f"videos/clip{i}.mp4,{c}\n" for i, c in enumerate(CAPTIONS))
    )
    cfg = _cfg(tmp_path, clips)
    run_stage(cfg, "ingest")
    table = read_table(Path(run_stage(cfg, "check").path) / "clips.parquet")
    assert sorted(table.source_caption) == sorted(CAPTIONS)


def test_reingest_of_100k_unchanged_files_probes_nothing(tmp_path):
    """The acceptance bound: an unchanged 100,000-entry tree re-ingests in under 60 s."""
    src = tmp_path / "tree"
    for d in range(100):
        folder = src / f"d{d:02d}"
        folder.mkdir(parents=True)
        for i in range(1000):
            fd = os.open(folder / f"c{i:03d}.mp4", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, b"%d/%d" % (d, i))  # small non-video files: each still a row
            os.close(fd)
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
