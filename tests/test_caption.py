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
import torch

from cogpipe import caption, vlm
from cogpipe.config import CaptionConfig
from cogpipe.pipeline import run_stage, stage_keys
from cogpipe.samples import write_tiny_captioner
from cogpipe.workspace import SUCCESS, ShardsIncomplete, read_parts, read_table

CAPTION = {"num_frames": 4, "max_new_tokens": 24, "batch_size": 2}
ARCHITECTURES = ["llava", "llava_next", "llava_next_video", "llava_onevision"]
REPO = Path(__file__).resolve().parents[1]

# Runs the caption stage of a config saved as JSON; after each committed part but the
# last it sleeps PAUSE_AFTER_PART seconds, so the test can kill it between parts.
KILLABLE = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from cogpipe import caption
    from cogpipe.config import PipelineConfig
    from cogpipe.pipeline import run_stage

    cfg = PipelineConfig.model_validate_json(open(sys.argv[1]).read())
    shard = int(sys.argv[2]) if len(sys.argv) > 2 else None
    pause = float(os.environ.get("PAUSE_AFTER_PART", "0"))
    hang_at = int(os.environ.get("HANG_IN_BATCH", "0"))  # 1-based batch to hang inside

    def progress(done, total, note):
        if done and done < total:
            time.sleep(pause)

    if hang_at:
        generate, calls = caption.generate, []

        def hanging(*args, **kwargs):
            calls.append(1)
            if len(calls) == hang_at:  # mid-batch: frames decoded, generate running
                Path(os.environ["HANG_MARKER"]).touch()
                time.sleep(600)
            return generate(*args, **kwargs)

        caption.generate = hanging

    run_stage(cfg, "caption", progress=progress, shard=shard)
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
    clips = read_table(
        cfg.workspace / "check" / stage_keys(cfg, "check")["check"] / "clips.parquet"
    )
    batches = [list(b.clip_id) for b in caption.make_batches(clips[clips.keep], 2)]
    assert [list(read_table(Path(res.path) / n).clip_id) for n in part_names(res.path)] == batches
    assert res.counts == {
        "clips": len(ids),
        "captioned": len(ids),
        "failed": 0,
        "parts": n_parts,
        "parts_reused": 0,
        "tokens": int(table.tokens.sum()),
        "truncated": int(table.truncated.sum()),
        "model": len(ids),
        "given": 0,
    }
    assert set(table.source) == {"model"}
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


def _run_until(
    ready, cfg_json: Path, log: Path, *args: str, timeout: float = 180, **env: str
) -> None:
    """Start the caption stage in a child process and SIGKILL it once `ready()` holds."""
    env = os.environ | {"PYTHONPATH": str(REPO)} | env
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLABLE, str(cfg_json), *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"caption run exited ({proc.returncode}) early:\n{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"not ready within {timeout}s:\n{log.read_text()}")
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


def test_killed_run_resumes_with_identical_captions(checked, tmp_path):
    cfg = checked("killed", batch_size=1)
    n = len(kept_ids(cfg))
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(cfg.model_dump_json())
    out = cfg.workspace / "caption" / stage_keys(cfg, "caption")["caption"]

    # The child sleeps 60 s after each committed part, so the kill lands between parts.
    _run_until(lambda: part_names(out), cfg_json, tmp_path / "caption.log", PAUSE_AFTER_PART="60")
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
    assert run_stage(
        cfg.model_copy(
            update={"caption": cfg.caption.model_copy(update={"device": "cpu", "dtype": "float32"})}
        ),
        "caption",
    ).reused


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
    # Batches are dealt to shards in turn: shards differ by at most one batch.
    cc = CaptionConfig(model="m", batch_size=2, shards=2)
    dealt = [[list(b.clip_id) for b in caption.shard_batches(clips, cc, s)] for s in (0, 1)]
    assert dealt == [[["a", "b"], ["e"]], [["c", "d"]]]


def test_sharded_run_killed_mid_batch_captions_every_clip_once(checked, tmp_path):
    cfg = checked("sharded", batch_size=1, shards=2)
    ids = kept_ids(cfg)
    kept = read_table(next((cfg.workspace / "check").glob("*/clips.parquet"))).query("keep")
    by_shard = {
        s: [c for b in caption.shard_batches(kept, cfg.caption, s) for c in b.clip_id]
        for s in (0, 1)
    }
    shard = max(by_shard, key=lambda s: len(by_shard[s]))  # the kill needs 2+ batches
    assert len(by_shard[shard]) >= 2 and all(by_shard.values())
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(cfg.model_dump_json())
    out = cfg.workspace / "caption" / stage_keys(cfg, "caption")["caption"]

    # The child commits its shard's first part, then hangs inside generate of the second.
    marker = tmp_path / "in-generate"
    _run_until(
        marker.exists,
        cfg_json,
        tmp_path / "shard.log",
        str(shard),
        HANG_IN_BATCH="2",
        HANG_MARKER=str(marker),
    )
    committed = part_names(out)
    assert committed == [f"part-{shard:03d}-00000.parquet"]  # the other shard is another run
    mtime = (out / committed[0]).stat().st_mtime_ns

    assert run_stage(cfg, "caption", shard=shard) is None  # restart of the killed shard
    # A merge-only run (a GPU pipeline's, on its CPU worker) refuses while a shard is undone.
    with pytest.raises(
        ShardsIncomplete, match=f"caption parts are not committed \\(shards {1 - shard}\\)"
    ):
        run_stage(cfg, "caption", merge_only=True)
    assert run_stage(cfg, "caption", shard=1 - shard) is None  # the other worker's shard
    assert not (out / SUCCESS).exists()  # shards commit parts; the merge marks the stage done
    merged = run_stage(cfg, "caption", merge_only=True)
    assert merged.counts["parts_reused"] == merged.counts["parts"] == len(ids)
    assert (out / committed[0]).stat().st_mtime_ns == mtime
    assert part_names(out) == sorted(
        f"part-{s:03d}-{i:05d}.parquet" for s in (0, 1) for i in range(len(by_shard[s]))
    )
    table = read_table(out / "captions.parquet")
    assert list(table.clip_id) == ids  # every clip captioned exactly once, none missing
    for s in (0, 1):
        in_parts = read_parts(out, f"part-{s:03d}-*.parquet")
        assert sorted(in_parts.clip_id) == sorted(by_shard[s])
    assert table.error.isna().all() and table.caption.str.len().gt(0).all()

    with pytest.raises(ValueError, match="shard 2 is not in"):
        run_stage(cfg, "caption", shard=2)


@pytest.fixture(scope="module")
def captioners(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("captioners")
    return {a: write_tiny_captioner(folder / a, a) for a in ARCHITECTURES}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_architecture_captions_real_clips(arch, captioners, checked, monkeypatch):
    cfg = checked(arch, model=str(captioners[arch]), batch_size=3)
    seen = []  # what each generate call was given

    def load(*args, **kwargs):
        cap = vlm.load_captioner(*args, **kwargs)
        generate = cap.model.generate

        def spy(**inputs):
            seen.append({k: tuple(v.shape) for k, v in inputs.items() if hasattr(v, "shape")})
            return generate(**inputs)

        cap.model.generate = spy
        return cap

    monkeypatch.setattr(caption, "_load", load)
    res = run_stage(cfg, "caption")

    table = read_table(Path(res.path) / "captions.parquet")
    assert list(table.clip_id) == kept_ids(cfg)
    assert table.error.isna().all() and table.caption.str.split().str.len().ge(5).all()
    assert table.caption.nunique() == len(table)  # the frames matter: no two alike
    frames = cfg.caption.num_frames
    for inputs in seen:
        if arch in vlm.VIDEO_MODEL_TYPES:  # one video of num_frames frames per clip
            batch, f = inputs["pixel_values_videos"][:2]
            assert f == frames and "pixel_values" not in inputs
        else:  # num_frames images per clip (LLaVA-NeXT: each with its anyres tiles)
            assert inputs["pixel_values"][0] == frames * inputs["input_ids"][0]


# Captions like `cogpipe caption` once the file argv[2] exists (two runs start together,
# past their imports: each says "ready"), each generate slowed so that the runs overlap.
TOGETHER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from cogpipe import caption
    from cogpipe.config import PipelineConfig
    from cogpipe.pipeline import run_stage

    cfg = PipelineConfig.model_validate_json(open(sys.argv[1]).read())
    generate = caption.generate

    def slow(*args, **kwargs):
        time.sleep(0.3)
        return generate(*args, **kwargs)

    caption.generate = slow
    print("ready", flush=True)
    while not Path(sys.argv[2]).exists():
        time.sleep(0.01)
    run_stage(cfg, "caption")
    """
)


def test_two_runs_at_once_share_the_parts_and_equal_one(checked, tmp_path):
    cfg = checked("together", batch_size=1)
    shutil.copytree(cfg.workspace, tmp_path / "alone")
    cfg_json, go = tmp_path / "config.json", tmp_path / "go"
    cfg_json.write_text(cfg.model_dump_json())
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", TOGETHER, str(cfg_json), str(go)],
            env=env | {"COGPIPE_FAULT_LOG": str(tmp_path / f"points-{n}")},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for n in (0, 1)
    ]
    assert [run.stdout.readline() for run in runs] == [b"ready\n"] * 2
    go.touch()
    for run in runs:
        output = run.communicate(timeout=300)[0].decode()
        assert run.returncode == 0, output[-3000:]

    # Every part, the table and the done marker written once, by one run or the other.
    written = [
        [
            Path(p.split(" ", 1)[1]).name
            for p in (tmp_path / f"points-{n}").read_text().split("\n")
            if p
        ]
        for n in (0, 1)
    ]
    ids = kept_ids(cfg)
    parts = [f"part-000-{i:05d}.parquet" for i in range(len(ids))]
    assert sorted(written[0] + written[1]) == sorted([*parts, "captions.parquet", SUCCESS])
    assert all(set(w) & set(parts) for w in written)  # both captioned some

    out = cfg.workspace / "caption" / stage_keys(cfg, "caption")["caption"]
    assert not list(out.glob(".tmp-*"))
    together = read_table(out / "captions.parquet")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the two runs: the same float sums
    try:
        alone = run_stage(cfg.model_copy(update={"workspace": tmp_path / "alone"}), "caption")
    finally:
        torch.set_num_threads(threads)
    alone = read_table(Path(alone.path) / "captions.parquet")
    pd.testing.assert_frame_equal(together.drop(columns="seconds"), alone.drop(columns="seconds"))
