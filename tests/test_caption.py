"""Captioning on the tiny LLaVA: one row per kept clip, resume after SIGKILL, keys, bad clips.

Every test runs the real ingest and check stages on the sample videos first, then the
caption stage through `run_stage`, loading the tiny model from its folder the way a hub
id is loaded.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from cogpipe import caption
from cogpipe.pipeline import plan, run_stage
from cogpipe.workspace import SUCCESS, read_table

CAPTION = {"num_frames": 4, "max_new_tokens": 24, "batch_size": 2}
REPO = Path(__file__).resolve().parents[1]

# Runs the caption stage of a config saved as JSON; after each committed part but the
# last it sleeps PAUSE_AFTER_PART seconds, so the test can kill it between parts.
KILLABLE = textwrap.dedent(
    """
    import os, sys, time
    from cogpipe.config import PipelineConfig
    from cogpipe.pipeline import run_stage

    cfg = PipelineConfig.model_validate_json(open(sys.argv[1]).read())
    pause = float(os.environ.get("PAUSE_AFTER_PART", "0"))

    def progress(done, total, note):
        if done and done < total:
            time.sleep(pause)

    run_stage(cfg, "caption", progress=progress)
    """
)


@pytest.fixture
def checked(demo_config, tmp_path):
    """A factory: config for a fresh workspace (caption overrides), ingest and check done."""

    def make(name: str = "workspace", **caption_overrides):
        cfg = demo_config(workspace=tmp_path / name, caption=CAPTION | caption_overrides)
        run_stage(cfg, "ingest")
        run_stage(cfg, "check")
        return cfg

    return make


def kept_ids(cfg) -> list[str]:
    clips = read_table(next((cfg.workspace / "check").glob("*/clips.parquet")))
    return sorted(clips.loc[clips.keep, "clip_id"])


def part_names(path: str | Path) -> list[str]:
    return sorted(p.name for p in Path(path).glob("part-*.parquet"))


def test_every_kept_clip_gets_one_caption(checked):
    cfg = checked()
    res = run_stage(cfg, "caption")

    ids = kept_ids(cfg)
    assert len(ids) >= 4
    table = read_table(Path(res.path) / "captions.parquet")
    assert list(table.columns) == caption.COLUMNS
    assert list(table.clip_id) == ids  # each kept clip once, sorted
    assert table.error.isna().all()
    assert all(isinstance(c, str) and c.strip() for c in table.caption)
    assert (table.tokens > 0).all() and (table.tokens <= 24).all()
    assert set(table.model) == {cfg.caption.model}
    assert set(table.prompt_hash) == {caption.prompt_hash(cfg.caption.prompt)}

    n_parts = math.ceil(len(ids) / 2)
    assert part_names(res.path) == [f"part-000-{i:05d}.parquet" for i in range(n_parts)]
    clips = read_table(cfg.workspace / "check" / plan(cfg, "check")["check"] / "clips.parquet")
    batches = [list(b.clip_id) for b in caption.make_batches(clips[clips.keep], 2)]
    assert [list(read_table(Path(res.path) / n).clip_id) for n in part_names(res.path)] == batches
    assert res.counts == {
        "clips": len(ids), "captioned": len(ids), "failed": 0, "parts": n_parts, "parts_reused": 0,
        "tokens": int(table.tokens.sum()), "truncated": int(table.truncated.sum()),
    }  # fmt: skip
    assert (Path(res.path) / SUCCESS).is_file()

    # The in-memory helper batches exactly as the stage does, so it gives the same captions.
    captioner = caption.load_captioner(cfg.caption)
    direct = caption.caption_clips(captioner, clips[clips.keep], cfg.caption)
    assert list(direct.caption) == list(table.caption)

    again = run_stage(cfg, "caption")
    assert again.reused and again.key == res.key


def test_all_parts_committed_never_loads_the_model(checked, monkeypatch):
    cfg = checked()
    res = run_stage(cfg, "caption")
    before = read_table(Path(res.path) / "captions.parquet")
    (Path(res.path) / SUCCESS).unlink()
    (Path(res.path) / "captions.parquet").unlink()

    def refuse(cc, device=None):
        raise AssertionError("the model was loaded although every part is committed")

    monkeypatch.setattr(caption, "load_captioner", refuse)
    again = run_stage(cfg, "caption")
    assert not again.reused
    assert again.counts["parts_reused"] == again.counts["parts"] == len(part_names(res.path))
    pd.testing.assert_frame_equal(read_table(Path(res.path) / "captions.parquet"), before)


def _run_until_first_part(cfg_json: Path, folder: Path, log: Path, timeout: float = 180) -> None:
    """Start the caption stage in a child process and SIGKILL it once a part is committed."""
    env = os.environ | {"PAUSE_AFTER_PART": "60", "PYTHONPATH": str(REPO)}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(cfg_json)], env=env,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while not part_names(folder):
            if proc.poll() is not None:
                pytest.fail(f"caption run exited ({proc.returncode}) early:\n{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no part committed within {timeout}s:\n{log.read_text()}")
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


def test_killed_run_resumes_with_identical_captions(checked, tmp_path):
    cfg = checked("killed", batch_size=1)
    n = len(kept_ids(cfg))
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(cfg.model_dump_json())
    out = cfg.workspace / "caption" / plan(cfg, "caption")["caption"]

    # The child sleeps 60 s after each committed part, so the kill lands between parts.
    _run_until_first_part(cfg_json, out, tmp_path / "caption.log")
    committed = part_names(out)
    assert 1 <= len(committed) < n
    mtimes = {p: (out / p).stat().st_mtime_ns for p in committed}
    assert not (out / SUCCESS).exists()
    (out / ".tmp-part-000-00004.parquet-deadbeef").write_bytes(b"torn write")  # a killed rename

    restarted = run_stage(cfg, "caption")  # the restart, as a Prefect retry would do it
    assert {p: (out / p).stat().st_mtime_ns for p in committed} == mtimes  # not redone
    assert part_names(out) == [f"part-000-{i:05d}.parquet" for i in range(n)]
    assert not list(out.glob(".tmp-*"))
    assert restarted.counts["parts_reused"] == len(committed)

    resumed = read_table(out / "captions.parquet")
    assert list(resumed.clip_id) == kept_ids(cfg)  # every clip once, none missing
    straight = run_stage(checked("straight", batch_size=1), "caption")
    assert straight.key == out.name
    expected = read_table(Path(straight.path) / "captions.parquet")
    same = ["clip_id", "caption", "error", "tokens", "truncated", "prompt_hash"]
    pd.testing.assert_frame_equal(resumed[same], expected[same])


def test_new_prompt_new_key_old_output_intact(checked, demo_config, tmp_path):
    cfg = checked()
    first = run_stage(cfg, "caption")
    snapshot = {p.name: p.read_bytes() for p in Path(first.path).iterdir()}

    other = demo_config(
        workspace=cfg.workspace, caption=CAPTION | {"prompt": "Describe the shapes and colours."}
    )
    second = run_stage(other, "caption")
    assert second.key != first.key and second.path != first.path
    assert {p.name: p.read_bytes() for p in Path(first.path).iterdir()} == snapshot
    assert sorted(p.name for p in (cfg.workspace / "caption").iterdir()) == sorted(
        [first.key, second.key]
    )
    table = read_table(Path(second.path) / "captions.parquet")
    assert set(table.prompt_hash) == {caption.prompt_hash("Describe the shapes and colours.")}
    # Unkeyed fields (device, dtype) reuse the finished output.
    assert run_stage(cfg.model_copy(update={"caption": cfg.caption.model_copy(
        update={"device": "cpu", "dtype": "float32"})}), "caption").reused  # fmt: skip


def test_unreadable_clip_is_a_row_with_an_error(demo_config, sample_videos, tmp_path):
    source = tmp_path / "videos"
    shutil.copytree(next(iter(sample_videos.values())).parent, source)
    cfg = demo_config(ingest={"source": str(source)}, caption=CAPTION)
    run_stage(cfg, "ingest")
    check = run_stage(cfg, "check")
    clips = read_table(Path(check.path) / "clips.parquet")
    broken = clips[clips.keep].sort_values("clip_id").iloc[1]
    Path(broken.path).write_bytes(Path(broken.path).read_bytes()[:300])  # no moov box any more

    # The source changed, so the planned ingest key did too: pass check's finished output.
    res = run_stage(cfg, "caption", upstream={"check": check})
    table = read_table(Path(res.path) / "captions.parquet")
    assert list(table.clip_id) == sorted(clips.loc[clips.keep, "clip_id"])
    row = table.set_index("clip_id").loc[broken.clip_id]
    assert pd.isna(row.caption) and row.error.startswith("cannot decode frames")
    assert row.tokens == 0
    others = table[table.clip_id != broken.clip_id]
    assert others.error.isna().all() and others.caption.str.len().gt(0).all()
    assert res.counts["failed"] == 1 and res.counts["captioned"] == len(table) - 1
    assert res.stats["rejections"] == {"cannot decode frames": 1}
    assert (Path(res.path) / SUCCESS).is_file()


def test_batches_are_a_pure_function_of_the_sorted_clips():
    clips = pd.DataFrame({"clip_id": ["c", "a", "e", "b", "d"]})
    batches = caption.make_batches(clips, 2)
    assert [list(b.clip_id) for b in batches] == [["a", "b"], ["c", "d"], ["e"]]
    # Clips of one frame size batch together (the same number of image tokens).
    sized = clips.assign(width=[640, 1280, 640, 1280, 640], height=[360, 720, 360, 720, 360])
    by_size = [list(b.clip_id) for b in caption.make_batches(sized, 2)]
    assert by_size == [["c", "d"], ["e", "a"], ["b"]]
    shuffled = caption.make_batches(clips.sample(frac=1, random_state=0), 2)
    assert [list(b.clip_id) for b in shuffled] == [list(b.clip_id) for b in batches]
