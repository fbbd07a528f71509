"""export-dataset: the curated training clips as finetrainers, diffusers and jsonl datasets.

The demo pipeline runs once for the module (to filter), with `check.max_duration` 2 s so
every 3 s sample video becomes two 1.5 s clips: an export of whole videos instead of spans
would show in durations and in frame content. Each export is then ingested and checked as
a new source, the way a user would check what they hand to another trainer.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from cogpipe.cli import build_parser, main
from cogpipe.config import PipelineConfig
from cogpipe.dataset import (
    FORMATS,
    DatasetExportError,
    encode_clip,
    export_dataset,
    list_files,
    one_line,
    selected_clips,
)
from cogpipe.demo import DEMO_CONFIG
from cogpipe.errors import EmptyStage
from cogpipe.pipeline import run_all, run_stage
from cogpipe.video import VideoReader, probe_video, read_frames
from cogpipe.workspace import StageNotReady, read_table

LAYOUT = {
    "finetrainers": {".cogpipe", "videos", "metadata.csv"},
    "diffusers": {".cogpipe", "videos", "videos.txt", "prompts.txt"},
    "jsonl": {".cogpipe", "videos", "metadata.jsonl"},
}


def make_config(root: Path, sample_videos, tiny_models, **sections) -> PipelineConfig:
    """The `demo_config` fixture's config, for a module-scoped workspace."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEMO_CONFIG.items()}
    raw |= {
        "workspace": str(root / "workspace"),
        "model": str(tiny_models["cogvideox"]),
        "ingest": {"source": str(next(iter(sample_videos.values())).parent)},
    }
    raw["caption"]["model"] = str(tiny_models["llava"])
    raw["evaluate"]["clip_model"] = str(tiny_models["clip"])
    raw["check"] |= {"max_duration": 2.0}  # 3 s videos -> two 1.5 s clips each
    for section, values in sections.items():
        raw[section] = raw[section] | values
    return PipelineConfig.model_validate(raw)


@pytest.fixture(scope="module")
def curated(tmp_path_factory, sample_videos, tiny_models) -> PipelineConfig:
    cfg = make_config(tmp_path_factory.mktemp("export"), sample_videos, tiny_models)
    run_all(cfg, until="filter")
    return cfg


@pytest.fixture(scope="module")
def exports(curated, tmp_path_factory) -> dict[str, tuple[object, Path]]:
    root = tmp_path_factory.mktemp("exports")
    return {fmt: (export_dataset(curated, root / fmt, fmt), root / fmt) for fmt in FORMATS}


def reingest(cfg: PipelineConfig, source: Path):
    """Ingest and check an export as a new source: (videos table, clips table)."""
    new = cfg.model_copy(
        update={
            "workspace": source.parent / f"{source.name}-workspace",
            "ingest": cfg.ingest.model_copy(update={"source": source}),
            "check": cfg.check.model_copy(update={"heldout_fraction": 0.0}),
        }
    )
    ingest = run_stage(new, "ingest")
    check = run_stage(new, "check")
    return read_table(Path(ingest.path) / "videos.parquet"), read_table(
        Path(check.path) / "clips.parquet"
    )


def test_every_format_writes_its_documented_layout(curated, exports):
    chosen = selected_clips(curated)
    clips = read_table(Path(run_stage(curated, "check").path) / "clips.parquet")
    assert len(chosen) >= 4 and set(clips.set_index("clip_id").loc[chosen.clip_id].split) == {
        "train"
    }
    names = [f"{c}.mp4" for c in chosen.clip_id]
    for fmt, (result, out) in exports.items():
        assert {p.name for p in out.iterdir()} == LAYOUT[fmt], fmt
        assert sorted(p.name for p in (out / "videos").iterdir()) == names, fmt
        assert (result.clips, result.written, result.reused) == (len(chosen), len(chosen), 0)
        marker = json.loads((out / ".cogpipe" / "export.json").read_text())
        assert marker["format"] == fmt and marker["complete"] and marker["clips"] == len(chosen)
    head = (exports["finetrainers"][1] / "metadata.csv").read_text().splitlines()[0]
    assert head == "file_name,caption,source_clip_id,source_path,start,end,category,score"
    first = json.loads((exports["jsonl"][1] / "metadata.jsonl").read_text().splitlines()[0])
    row = chosen.iloc[0]
    assert first == {
        "file_name": f"videos/{row.clip_id}.mp4",
        "caption": row.caption,
        "source_clip_id": row.clip_id,
        "source_path": row.path,
        "start": row.start,
        "end": row.end,
        "category": row.category,
        "score": row.score,
    }
    diffusers = exports["diffusers"][1]
    assert (diffusers / "videos.txt").read_text().splitlines() == [f"videos/{n}" for n in names]
    assert (diffusers / "prompts.txt").read_text().splitlines() == list(
        chosen.caption.map(one_line)
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_reingests_as_the_same_spans_and_captions(curated, exports, fmt):
    chosen = selected_clips(curated).set_index("clip_id")
    out = exports[fmt][1]
    videos, clips = reingest(curated, out)
    assert (videos.status == "ok").all() and len(videos) == len(chosen)
    assert clips.keep.all() and len(clips) == len(chosen), clips.reasons.tolist()
    shorter = 0
    for clip in clips.itertuples(index=False):
        src = chosen.loc[Path(clip.path).stem]  # videos/<source clip_id>.mp4
        caption = one_line(src.caption) if fmt == "diffusers" else src.caption
        assert clip.source_caption == caption
        assert clip.end - clip.start == pytest.approx(src.end - src.start, abs=1 / src.fps)
        source_duration = probe_video(src.path)[0]["duration"]
        shorter += clip.end - clip.start < source_duration - 1 / src.fps
        assert_same_pixels(clip.path, src)
    assert shorter == len(clips)  # every clip is a span, not its whole source video


def assert_same_pixels(exported: str, src) -> None:
    """The exported clip's middle frame is the source frame at start + the same time."""
    k = round((src.end - src.start) * src.fps) // 2
    frame = read_frames(exported, [k / src.fps])[0].astype(np.float32)
    with VideoReader(src.path) as r:
        frames = np.stack([f for _, f in r.scan(0.0, 1e9)]).astype(np.float32)  # [F, H, W, 3]
    diffs = np.abs(frames - frame).mean(axis=(1, 2, 3))  # [F]
    expected = round(src.start * src.fps) + k
    assert diffs[expected] < 4.0, diffs[expected]
    assert int(diffs.argmin()) == expected  # the span's frame, not one at another offset


def test_a_second_export_reencodes_nothing_and_an_interrupted_one_resumes(curated, exports):
    out = exports["jsonl"][1].parent / "jsonl-resume"
    shutil.copytree(exports["jsonl"][1], out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "videos").iterdir()}
    again = export_dataset(curated, out, "jsonl")
    assert (again.written, again.reused, again.removed) == (0, again.clips, 0)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "videos").iterdir()} == mtimes

    # Killed mid-export: a temporary left behind, a clip whose record never came, a damaged file.
    damaged, unrecorded, touched = sorted(mtimes)[:3]
    os.utime(out / "videos" / touched, ns=(1, 1))  # same bytes, another mtime: hashed, reused
    (out / "videos" / damaged).write_bytes(b"\x00" * 100)
    (out / ".cogpipe" / "clips" / unrecorded.replace(".mp4", ".json")).unlink()
    (out / "videos" / f".tmp-{damaged}-0123abcd").write_bytes(b"partial")
    resumed = export_dataset(curated, out, "jsonl")
    assert (resumed.written, resumed.reused) == (2, resumed.clips - 2)
    assert sorted(p.name for p in (out / "videos").iterdir()) == sorted(mtimes)
    assert probe_video(out / "videos" / damaged)[1] == ""


def test_refuses_a_folder_that_is_not_an_export_of_the_format(curated, exports, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own files")
    with pytest.raises(DatasetExportError, match="not a cogpipe dataset export.*--force"):
        export_dataset(curated, mine, "jsonl")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]  # nothing written
    with pytest.raises(DatasetExportError, match="is a diffusers export.*--force"):
        export_dataset(curated, exports["diffusers"][1], "finetrainers")
    (tmp_path / "file").write_text("")
    with pytest.raises(DatasetExportError, match="not a folder"):
        export_dataset(curated, tmp_path / "file", "jsonl", force=True)

    # --force: a diffusers export becomes a finetrainers one, reusing its clip files.
    forced = tmp_path / "forced"
    shutil.copytree(exports["diffusers"][1], forced)
    result = export_dataset(curated, forced, "finetrainers", force=True)
    assert (result.written, result.reused) == (0, result.clips)
    assert {p.name for p in forced.iterdir()} == LAYOUT["finetrainers"]


def test_unfinished_filter_and_empty_selection_are_clear_errors(curated, tmp_path):
    changed = curated.model_copy(
        update={"filter": curated.filter.model_copy(update={"min_words": 1000, "retries": 0})}
    )
    with pytest.raises(
        StageNotReady, match="filter stage is not finished.*`cogpipe run CONFIG --until filter`"
    ):
        export_dataset(changed, tmp_path / "out", "jsonl")
    # The captions are reused; each is rejected (too few words), so filter fails, not done.
    with pytest.raises(EmptyStage, match=r"^filter: no caption selected: .*too few words"):
        run_all(changed, until="filter")
    with pytest.raises(StageNotReady, match="filter stage is not finished"):
        export_dataset(changed, tmp_path / "out", "jsonl")
    assert not (tmp_path / "out").exists()


def test_captions_survive_each_layout(tmp_path):
    import pandas as pd

    from cogpipe.sources import list_source

    tricky = [
        'He says "stop", then, slaps; twice.',
        "Line one\nline two\r\nthree\u2028four.",
        "Caf\u00e9 \u2014 \u4e00\u540d fighter \U0001f44a,\tcheers.",
    ]
    clips = pd.DataFrame(
        {
            "clip_id": ["a", "b", "c"],
            "caption": tricky,
            "path": "/src.mp4",
            "start": 0.0,
            "end": 1.0,
            "category": "strike",
            "score": 0.5,
        }
    )
    for fmt in FORMATS:
        out = tmp_path / fmt
        (out / "videos").mkdir(parents=True)
        for name, text in list_files(clips, fmt).items():
            (out / name).write_text(text, encoding="utf-8")
        for clip_id in clips.clip_id:
            (out / "videos" / f"{clip_id}.mp4").write_bytes(b"")
        cfg = PipelineConfig(workspace=tmp_path / "ws", ingest={"source": str(out)})
        got = [entry[3] for entry in list_source(cfg)]
        want = [one_line(c) for c in tricky] if fmt == "diffusers" else tricky
        assert got == want, fmt
    assert one_line(tricky[1]) == "Line one line two three four."


def test_a_rotated_odd_sized_source_is_cut_upright_and_even(tmp_path):
    import av

    ys, xs = np.mgrid[0:63, 0:45]  # coded 45 x 63 (odd: 4:4:4 allows it)
    frames = np.zeros((12, 63, 45, 3), np.uint8)  # [F, H, W, 3]
    frames[..., 0], frames[..., 1], frames[..., 2] = xs * 5, ys * 4, 60
    for t in range(12):
        frames[t, 4 + 3 * t : 14 + 3 * t, 5:20, 2] = 250  # a square moving down
    src = tmp_path / "rotated.mp4"
    with av.open(str(src), "w") as container:
        stream = container.add_stream("libx264", rate=8, options={"crf": "0"})
        stream.width, stream.height, stream.pix_fmt = 45, 63, "yuv444p"
        stream.set_display_rotation(-90)  # shown turned 90 degrees clockwise: 63 x 45
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())

    assert encode_clip(src, 0.5, 1.25, 8.0, tmp_path / "cut.mp4") == 6
    info, _ = probe_video(tmp_path / "cut.mp4")
    assert (info["width"], info["height"], info["frames"], info["rotation"]) == (64, 46, 6, 0)
    assert (info["codec"], info["pix_fmt"]) == ("h264", "yuv420p")
    cut = read_frames(tmp_path / "cut.mp4", [k / 8 for k in range(6)]).astype(float)
    upright = np.rot90(frames[4:10], -1, axes=(1, 2))  # frames 4..9 = [0.5, 1.25) s, clockwise
    assert np.abs(cut[:, :45, :63] - upright).mean() < 4
    assert np.abs(cut[:, 45] - cut[:, 44]).mean() < 4  # the padding repeats the edge
    assert np.abs(cut[:, :, 63] - cut[:, :, 62]).mean() < 4


def test_cli_exports_and_reports_errors(curated, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(curated.model_dump(mode="json"), sort_keys=False))
    out = tmp_path / "cli-export"
    assert main(["export-dataset", str(config), "--format", "diffusers", str(out)]) == 0
    n = len(selected_clips(curated))
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"export-dataset: {n} clips ({n} written, 0 reused, 0 removed) in ")
    assert line.endswith(f"-> {out} (diffusers)")
    assert main(["export-dataset", str(config), "--format", "diffusers", str(out)]) == 0
    assert f"(0 written, {n} reused, 0 removed)" in capsys.readouterr().out
    assert main(["export-dataset", str(config), "--format", "jsonl", str(out)]) == 2
    assert "is a diffusers export" in capsys.readouterr().err
    parser = build_parser()
    for fmt in FORMATS:
        assert parser.parse_args(["export-dataset", "c", "--format", fmt, "o"]).format == fmt
