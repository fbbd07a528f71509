"""Captions that come with the data: `caption.existing` fill / use / ignore, and an import
file of an earlier run. The tiny LLaVA runs only on the clips left without a caption,
counted by wrapping `caption.generate`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest

from cogpipe import caption
from cogpipe.config import ConfigError
from cogpipe.pipeline import run_stage
from cogpipe.workspace import read_table

CAPTION = {"num_frames": 4, "max_new_tokens": 24, "batch_size": 2}
GOOD = [f"shapes_{i:02d}.mp4" for i in range(6)]


@pytest.fixture
def dataset(sample_videos, tmp_path) -> Path:
    """The sample videos as a metadata.csv dataset, every other good clip captioned."""
    root = tmp_path / "dataset"
    root.mkdir()
    rows = []
    for name, path in sample_videos.items():
        (root / name).symlink_to(path)
        text = f"A person in clip {name} slaps the opponent." if name in GOOD[::2] else ""
        rows.append({"file_name": name, "caption": text})
    with open(root / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["file_name", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture
def counted(monkeypatch) -> list[int]:
    """Clips passed to each `caption.generate` call."""
    calls: list[int] = []
    real = caption.generate

    def generate(cap, frames, *args, **kwargs):
        calls.append(len(frames))
        return real(cap, frames, *args, **kwargs)

    monkeypatch.setattr(caption, "generate", generate)
    return calls


def _run(demo_config, tmp_path, dataset, name="ws", **options):
    cfg = demo_config(
        workspace=tmp_path / name, ingest={"source": str(dataset)}, caption=CAPTION | options
    )
    for stage in ("ingest", "check"):
        run_stage(cfg, stage)
    res = run_stage(cfg, "caption")
    clips = read_table(Path(run_stage(cfg, "check").path) / "clips.parquet")
    return res, read_table(Path(res.path) / "captions.parquet"), clips[clips.keep]


def _name(clips: pd.DataFrame) -> dict[str, str]:
    return dict(zip(clips.clip_id, clips.path.map(lambda p: Path(p).name), strict=True))


def test_fill_captions_only_the_clips_without_one(demo_config, tmp_path, dataset, counted):
    res, table, kept = _run(demo_config, tmp_path, dataset)
    names = _name(kept)
    given = table[table.source == "dataset"]
    assert sorted(names[c] for c in given.clip_id) == sorted(
        n for n in GOOD[::2] if n in names.values()
    )
    assert all(
        t == f"A person in clip {names[c]} slaps the opponent."
        for c, t in zip(given.clip_id, given.caption, strict=True)
    )
    model = table[table.source == "model"]
    assert len(given) >= 2 and len(model) >= 2
    assert sum(counted) == len(model)  # the captioner saw the other clips only
    assert sorted(table.clip_id) == sorted(kept.clip_id) and table.error.isna().all()
    assert res.counts["model"] == len(model) and res.counts["given"] == len(given)
    assert res.stats["sources"] == {"dataset": len(given), "model": len(model)}

    # Both kinds pass the same gate into the curated set, each with its source.
    cfg = demo_config(workspace=tmp_path / "ws", ingest={"source": str(dataset)}, caption=CAPTION)
    for stage in ("recaption", "filter"):
        result = run_stage(cfg, stage)
    curated = read_table(Path(result.path) / "curated.parquet").set_index("clip_id")
    assert curated.loc[given.clip_id, "source"].eq("dataset").all()
    assert curated.loc[model.clip_id, "source"].eq("model").all()
    assert curated.loc[given.clip_id, "caption"].tolist() == given.caption.tolist()
    assert curated.accepted.any()
    report = (Path(result.path) / "report.md").read_text()
    assert f"| dataset | {len(given)} |" in report and f"| model | {len(model)} |" in report


def test_use_never_captions_and_ignore_captions_everything(demo_config, tmp_path, dataset, counted):
    _, table, kept = _run(demo_config, tmp_path, dataset, existing="use")
    assert counted == []
    bare = table[table.caption.isna()]
    assert len(bare) and set(bare.error) == {
        "no caption (caption.existing: use, and none came with the data)"
    }
    assert set(table.source.dropna()) == {"dataset"}

    _, table, kept = _run(demo_config, tmp_path, dataset, name="ws2", existing="ignore")
    assert sum(counted) == len(kept) and set(table.source) == {"model"}


def test_an_import_file_wins_over_the_dataset(demo_config, tmp_path, dataset, counted):
    earlier = tmp_path / "earlier.jsonl"
    lines = [
        {"path": str(dataset / GOOD[2]), "caption": "Imported by absolute path."},
        {"path": GOOD[1], "caption": "Imported by a path relative to the source."},
        {"file_name": f"/old/machine/clips/{GOOD[3]}", "caption": "Imported by file name."},
    ]
    earlier.write_text("".join(json.dumps(r) + "\n" for r in lines))
    _, table, kept = _run(demo_config, tmp_path, dataset, import_file=str(earlier))
    by_name = {
        _name(kept)[c]: (t, s)
        for c, t, s in zip(table.clip_id, table.caption, table.source, strict=True)
    }
    assert by_name[GOOD[2]] == ("Imported by absolute path.", "import")  # over the dataset's
    assert by_name[GOOD[1]] == ("Imported by a path relative to the source.", "import")
    assert by_name[GOOD[3]] == ("Imported by file name.", "import")
    assert by_name[GOOD[4]][1] == "dataset"
    assert sum(counted) == (table.source == "model").sum()


def test_an_import_row_that_matches_nothing_names_the_file_and_line(demo_config, tmp_path, dataset):
    earlier = tmp_path / "earlier.csv"
    earlier.write_text(f"path,caption\n{GOOD[1]},fine\nnot_there.mp4,lost\n")
    with pytest.raises(ConfigError, match=r"earlier.csv: line 3: path 'not_there.mp4' matches no"):
        _run(demo_config, tmp_path, dataset, import_file=str(earlier))


def test_an_import_file_enters_the_key_by_content(demo_config, tmp_path):
    from cogpipe.pipeline import stage_keys

    a, b = tmp_path / "a" / "c.csv", tmp_path / "b" / "c.csv"
    for p in (a, b):
        p.parent.mkdir()
        p.write_text("clip_id,caption\nx,y\n")
    keys = [
        stage_keys(demo_config(caption={"import_file": str(p)}), "caption")["caption"]
        for p in (a, b)
    ]
    assert keys[0] == keys[1]  # where the file lives does not matter
    b.write_text("clip_id,caption\nx,z\n")
    assert stage_keys(demo_config(caption={"import_file": str(b)}), "caption")["caption"] != keys[0]
