"""Evaluation evidence on tiny models: the base suite generated once for every run and
sweep cell, held-out captions as the suite, the Fréchet distance refused below its
minimum with the numbers, intervals per metric, and no winner between identical
checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_evaluate import _heldout_check, add_checkpoint, loras, make_cfg, models, upstream_for

from cogpipe import evaluate
from cogpipe import train_sweep as sweeps
from cogpipe.workspace import StageResult, Workspace, read_table, write_table

__all__ = ["loras", "models"]  # module fixtures shared with test_evaluate


@pytest.fixture
def counted(monkeypatch) -> list[tuple[str, int]]:
    """Every (prompt, seed) that reaches the sampler."""
    calls, sample = [], evaluate.sample

    def counting(pipe, request):
        calls.append((request.prompt, request.seed))
        return sample(pipe, request)

    monkeypatch.setattr(evaluate, "sample", counting)
    return calls


def test_base_suite_is_generated_once_for_runs_and_sweep_cells(tmp_path, models, loras, counted):
    cfg = make_cfg(tmp_path / "ws", models, bootstrap=200)
    ws = Workspace(cfg.workspace)
    cells = sweeps.cells(cfg, {"train.rank": [4, 8, 16]}, sweep="grid")
    configs = [(n, cfg) for n in ("run-a", "run-b")] + cells
    for name, _ in configs:
        add_checkpoint(ws.root / "train" / name, "checkpoint-000002", loras[0])
    add_checkpoint(ws.root / "train" / "run-a", "checkpoint-000004", loras[0])  # identical
    for name, run_cfg in configs:
        evaluate.run_evaluate(ws, run_cfg, upstream_for(ws.root / "train" / name))

    # One base video (1 prompt x 1 seed) for five runs, then one per checkpoint.
    assert len(counted) == 1 + 6
    store = ws.root / "cache" / evaluate.BASE_STORE
    (video,) = store.glob("*.mp4")
    record = json.loads(video.with_suffix(".json").read_text())
    assert record["seed"] == 42 and record["prompt"] == cfg.evaluate.prompts[0]
    out = ws.root / "evaluate" / evaluate.eval_key(cfg)
    for name, _ in configs:  # every run's base unit: the store's file, scored
        assert (out / name / "base" / "p00-s42.mp4").stat().st_ino == video.stat().st_ino
        assert (out / name / "base" / "metrics.parquet").is_file()

    index = evaluate.read_index(ws)
    assert list(index.columns) == evaluate.INDEX_COLUMNS
    for m in evaluate.PER_VIDEO:  # one video per unit: no interval from one value
        assert index[m].notna().all() and index[f"{m}_low"].isna().all()
    report = (out / "run-a" / "report.md").read_text()
    assert "## Against the base model" in report and "paired bootstrap" in report
    assert "- clip score: no winner" in report  # checkpoint-000002 and -000004 are the same
    assert "| checkpoint-000004 | 4 |" in report


def test_identical_checkpoints_have_no_winner_and_intervals(tmp_path, models, loras):
    cfg = make_cfg(tmp_path / "ws", models, seeds=[1, 2, 3], bootstrap=200)
    ws = Workspace(cfg.workspace)
    run_dir = ws.root / "train" / "run-same"
    add_checkpoint(run_dir, "checkpoint-000002", loras[1])
    add_checkpoint(run_dir, "checkpoint-000004", loras[1])
    result = evaluate.run_evaluate(ws, cfg, upstream_for(run_dir))

    index = evaluate.read_index(ws)
    for m in evaluate.PER_VIDEO:
        assert (index[f"{m}_low"] <= index[m]).all() and (index[m] <= index[f"{m}_high"]).all()
    a, b = index.iloc[1], index.iloc[2]
    assert a.clip_score == b.clip_score and a.clip_score_low == b.clip_score_low
    out = Path(result.path)
    report = (out / "report.md").read_text()
    assert "- clip score: no winner" in report and "- dynamic degree: no winner" in report
    assert "clip score" in report and "[" in report.split("| checkpoint-000002 |")[1]
    from PIL import Image

    assert Image.open(out / "checkpoint-000002" / "ab_grid.png").size == (2 * 8 * 64, 3 * 64)


def _filter_for(folder, captions: dict[str, tuple[str, bool]]) -> StageResult:
    rows = [{"clip_id": c, "caption": t, "accepted": ok} for c, (t, ok) in captions.items()]
    write_table(folder / "curated.parquet", pd.DataFrame(rows))
    return StageResult(
        "filter", f"filter-{len(rows)}-{sum(ok for _, ok in captions.values())}", str(folder)
    )


def test_heldout_captions_are_the_suite_and_small_sets_refuse_the_distance(
    tmp_path, models, sample_videos
):
    from cogpipe.samples import write_tiny_videomae

    features = write_tiny_videomae(tmp_path / "videomae")
    cfg = make_cfg(
        tmp_path / "ws",
        models,
        prompts="heldout",
        heldout_clips=2,
        seeds=[7],
        video_features=str(features),
        bootstrap=200,
    )
    ws = Workspace(cfg.workspace)
    run_dir = ws.root / "train" / "run-h"
    run_dir.mkdir(parents=True)
    check = _heldout_check(tmp_path / "check", sample_videos, 3)  # clip1..clip3 held out
    captions = {
        "clip1": ("a slap in the ring", True),
        "clip2": ("rejected words", False),
        "clip3": ("the referee steps in", True),
    }
    (tmp_path / "filter").mkdir()
    upstream = {
        "train": StageResult("train", "run-h", str(run_dir)),
        "check": check,
        "filter": _filter_for(tmp_path / "filter", captions),
    }
    result = evaluate.run_evaluate(ws, cfg, upstream)

    metrics = read_table(Path(result.path) / "base" / "metrics.parquet")
    assert list(metrics.prompt) == ["a slap in the ring", "the referee steps in"]
    (cache,) = (
        ws.root / "evaluate" / evaluate.eval_key(cfg, {"filter": upstream["filter"].key})
    ).glob("real-features-*.npy")
    assert np.load(cache).shape == (2, 32)  # exactly the suite's clips
    refusal = "fd_videomae needs >= 32 generated and real videos, got 2 and 2"
    row = evaluate.read_index(ws).iloc[0]
    assert np.isnan(row.fd_videomae) and row.fd_note == refusal
    assert refusal in (Path(result.path) / "report.md").read_text()
    # The suite's captions are part of the eval key: another filter output, another key.
    assert evaluate.eval_key(cfg, {"filter": "a"}) != evaluate.eval_key(cfg, {"filter": "b"})

    none = {c: (t, False) for c, (t, _) in captions.items()}
    (tmp_path / "filter0").mkdir()
    upstream["filter"] = _filter_for(tmp_path / "filter0", none)
    with pytest.raises(ValueError, match="none of the 3 held-out clips .* has an accepted caption"):
        evaluate.run_evaluate(ws, cfg, upstream)
